//! The Linux test guest (2 vCPUs, dirtying, the harpertown-shanghai CPU) moved between ferry
//! processes ten times, alternating TCP loopback and Unix sockets: heartbeats go on strictly
//! by one across every hop, no HB-CORRUPT, one GUEST-READY, every source exits 0 after Commit.

use std::time::Duration;

use ferry_tests::process::{run_guest, temp_path, Ferry};
use ferry_tests::tiny::wait_for;

const BOOT_LIMIT: Duration = Duration::from_secs(600);
const LIMIT: Duration = Duration::from_secs(120);

fn heartbeat(line: &str) -> Option<u64> {
    line[line.find("] HB ")? + 5..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn ten_hops_and_the_guest_never_notices() {
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
    for hop in 1..=10 {
        let url = if hop % 2 == 0 {
            format!("unix:{}", temp_path(&format!("hop{hop}.mig")).display())
        } else {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            format!("tcp:127.0.0.1:{port}")
        };
        let api = temp_path(&format!("hop{hop}.sock"));
        let mut dst = Ferry::spawn(&[
            "receive",
            "--listen",
            &url,
            "--api-socket",
            api.to_str().unwrap(),
        ]);
        dst.wait_line_err(LIMIT, |l| l.contains("waiting for a VM"));
        let (ok, out) = src.ctl(&["migrate", &url]);
        assert!(ok, "hop {hop}: {out}\n{}", src.transcript());
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
