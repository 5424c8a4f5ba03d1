//! The Linux test guest (2 vCPUs, dirtying, the harpertown-shanghai CPU), booted once:
//! first a live migration cancelled in the middle of its first round (the guest heartbeats on
//! at the source, the destination exits non-zero saying why), then ten live migrations
//! between ferry processes over TCP loopback, the last two by postcopy (after one precopy
//! round, then at once): heartbeats go on strictly by one across every hop, no
//! HB-CORRUPT, one GUEST-READY, every source exits 0 after Commit.

use std::time::Duration;

use ferry_tests::process::{heartbeat, run_guest, temp_path, Ferry};
use ferry_tests::tiny::wait_for;

const BOOT_LIMIT: Duration = Duration::from_secs(600);
const LIMIT: Duration = Duration::from_secs(120);

fn free_url() -> String {
    format!("tcp:127.0.0.1:{}", ferry_tests::process::free_tcp_port())
}

/// Starts a migration paced to 4 MB/s (round 0 of a 256 MiB guest takes seconds), cancels it
/// once part of round 0 is out, and checks that the guest stays on the source.
fn cancel_mid_round(src: &mut Ferry, text: &str) {
    let url = free_url();
    let mut dst = Ferry::receive(&url, &[]);
    let mut ctl = std::process::Command::new(ferry_tests::process::ferry_bin());
    ctl.args(["ctl", "--api-socket"])
        .arg(src.api_socket.as_ref().unwrap())
        .args(["migrate", &url, "--max-bandwidth", "4M"]);
    let migrating = std::thread::spawn(move || ctl.output());
    let mut at_cancel = serde_json::Value::Null;
    wait_for("round 0 to be under way", LIMIT, || {
        let (_, out) = src.ctl(&["--json", "status"]);
        let st: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let m = &st["migration"];
        let under_way = m["round"] == 0
            && m["sent_bytes"].as_u64().unwrap_or(0) > 1 << 20
            && m["remaining_bytes"].as_u64().unwrap_or(0) > 1 << 20;
        if under_way {
            at_cancel = m.clone();
        }
        under_way
    });
    let (ok, out) = src.ctl(&["cancel"]);
    assert!(ok, "{out}");
    let out = migrating.join().unwrap().expect("run ferry ctl migrate");
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("cancelled at {at_cancel}: {msg}");
    assert!(!out.status.success());
    assert!(
        msg.contains("cancelled by request in round 0") && msg.contains("runs here as before"),
        "{msg}"
    );
    assert!(!dst.wait_exit(LIMIT).success(), "the destination must fail");
    let err = dst.stderr_lines().join("\n");
    assert!(err.contains("the source cancelled the migration"), "{err}");
    assert!(
        !dst.stdout_text().contains(" HB "),
        "the guest never ran there"
    );
    // The source goes on heartbeating.
    let (ok, st) = src.ctl(&["status"]);
    assert!(ok && st.contains("running"), "{st}");
    let last = text
        .lines()
        .chain(src.stdout_text().lines())
        .filter_map(heartbeat)
        .max();
    src.wait_line(LIMIT, |l| {
        heartbeat(l).is_some_and(|n| Some(n) >= last.map(|x| x + 3))
    });
}

/// A hop's report (`ctl --json migrate`): completed; by precopy in two or more rounds that
/// skipped untouched pages, or by postcopy (hop 9 after one round, hop 10 at once) with
/// every missing page fetched.
fn check_hop(hop: u32, out: &str, postcopy: bool) {
    let answer: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    let r = &answer["report"];
    eprintln!("hop {hop}: {r}");
    assert_eq!(r["outcome"], "completed");
    let rounds = r["rounds"].as_u64().unwrap();
    if !postcopy {
        assert!(rounds >= 2, "precopy rounds: {r}");
        assert!(r["untouched_pages"].as_u64().unwrap() > 0, "{r}");
    } else {
        assert_eq!(rounds, if hop == 9 { 1 } else { 0 }, "precopy rounds: {r}");
        let missing = r["postcopy_missing"].as_u64().unwrap_or(0);
        assert!(missing > 0, "{r}");
        assert_eq!(r["postcopy_pages"].as_u64(), Some(missing), "{r}");
    }
}

#[test]
fn a_cancel_mid_round_keeps_the_guest_here_then_ten_hops_and_it_never_notices() {
    ferry_tests::require_kvm();
    let sock0 = temp_path("hop0.sock");
    let mut src = run_guest(
        None,
        2,
        "workload=dirty:4 hb_ms=100",
        &["--cpu", "harpertown-shanghai"],
        &sock0,
    );
    src.wait_line(BOOT_LIMIT, |l| l.contains("GUEST-READY"));
    src.wait_line(LIMIT, |l| l.contains("] HB ") && l.contains("pass=1"));
    let mut text = String::new();
    cancel_mid_round(&mut src, &text);
    for hop in 1..=10 {
        let url = free_url();
        let api = temp_path(&format!("hop{hop}.sock"));
        let mut dst = Ferry::receive(&url, &["--api-socket", api.to_str().unwrap()]);
        // Hop 9: postcopy after one round (a downtime no round meets); hop 10: at once.
        let postcopy: &[&str] = match hop {
            9 => &["--max-downtime", "0ms", "--postcopy-after", "1"],
            10 => &["--postcopy-after", "0"],
            _ => &[],
        };
        let mut args = vec!["--json", "migrate", &url];
        args.extend_from_slice(postcopy);
        let (ok, out) = src.ctl(&args);
        assert!(ok, "hop {hop}: {out}\n{}", src.transcript());
        check_hop(hop, &out, !postcopy.is_empty());
        let status = src.wait_exit(LIMIT);
        assert!(
            status.success(),
            "hop {hop}: the source exited with {status}:\n{}",
            src.transcript()
        );
        text.push_str(&src.stdout_text());
        // The guest runs on at the destination: a few heartbeats there before the next hop.
        for _ in 0..3 {
            dst.wait_line(LIMIT, |l| l.contains(" HB "));
        }
        wait_for("the destination's control socket", LIMIT, || api.exists());
        src = dst;
    }
    assert!(src.ctl(&["stop"]).0);
    assert!(src.wait_exit(LIMIT).success());
    text.push_str(&src.stdout_text());

    let hb: Vec<u64> = text.lines().filter_map(heartbeat).collect();
    assert!(hb.len() >= 30, "{text}");
    for w in hb.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "heartbeats must go on by exactly one across every hop"
        );
    }
    assert_eq!(text.matches("GUEST-READY").count(), 1);
    assert!(!text.contains("HB-CORRUPT"), "{text}");
    assert!(text.contains("vendor=GenuineIntel family=6 model=23"));
}
