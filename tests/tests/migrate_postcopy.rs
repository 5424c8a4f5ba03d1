//! Postcopy between ferry processes: the destination runs the guest before all of its
//! memory is there and fetches the rest on demand (userfaultfd). The storm guest, which
//! rewrites its working set faster than precopy converges, moves after one round with every
//! page intact; the counting guest moves at once (no precopy round) and counts on by one;
//! and when the link dies after the switch, the destination says the guest is lost there
//! and ends, and the source keeps its copy paused (never two guests running).

use std::time::Duration;

use ferry_tests::process::{assert_counts_by_one, count_line as count, free_tcp_port};
use ferry_tests::process::{run_tiny, temp_path, Ferry};
use ferry_tests::relay::{At, Relay};
use ferry_tests::storm::{json_report, storm_pass, storm_source};
use ferry_tests::tiny::{wait_for, LONG_COUNT};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn the_storm_guest_moves_by_postcopy_after_one_round_with_every_page_intact() {
    ferry_tests::require_kvm();
    let (s_sock, d_sock) = (
        temp_path("pc-storm-src.sock"),
        temp_path("pc-storm-dst.sock"),
    );
    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut src = storm_source(&s_sock);
    wait_for("the storm guest to run", LIMIT, || {
        storm_pass(&src, "pc-storm-before.snap") >= 3
    });
    let before = storm_pass(&src, "pc-storm-before.snap");
    let mut dst = Ferry::receive(&url, &["--api-socket", d_sock.to_str().unwrap()]);
    // A downtime no round can meet: precopy never converges, postcopy takes over.
    let (ok, out) = src.ctl(&[
        "--json",
        "migrate",
        &url,
        "--max-downtime",
        "0ms",
        "--postcopy-after",
        "1",
    ]);
    assert!(ok, "{out}\n{}", src.transcript());
    let report = json_report(&out);
    eprintln!("{report}");
    assert_eq!(report["outcome"], "completed");
    assert_eq!(report["rounds"], 1, "one precopy round: {report}");
    let missing = report["postcopy_missing"].as_u64().unwrap();
    assert!(missing > 0, "the storm dirties pages every round: {report}");
    assert_eq!(
        report["postcopy_pages"].as_u64().unwrap(),
        missing,
        "{report}"
    );
    assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
    wait_for("the destination's control socket", LIMIT, || {
        d_sock.exists()
    });
    let first = storm_pass(&dst, "pc-storm-after1.snap");
    assert!(
        first >= before,
        "pass {first} after the move, {before} before"
    );
    wait_for("the guest to go on at the destination", LIMIT, || {
        storm_pass(&dst, "pc-storm-after2.snap") > first + 3
    });
    dst.stop();
}

#[test]
fn the_counting_guest_moves_by_postcopy_at_once_and_counts_on_by_one() {
    ferry_tests::require_kvm();
    let (s_sock, d_sock) = (temp_path("pc-now-src.sock"), temp_path("pc-now-dst.sock"));
    let url = format!("unix:{}", temp_path("pc-now-mig.sock").display());
    let mut src = run_tiny(&LONG_COUNT, &[], &s_sock);
    src.wait_line(LIMIT, |l| count(l).is_some_and(|n| n >= 100));
    let mut dst = Ferry::receive(&url, &["--api-socket", d_sock.to_str().unwrap()]);
    let (ok, out) = src.ctl(&["--json", "migrate", &url, "--postcopy-after", "0"]);
    assert!(ok, "{out}\n{}", src.transcript());
    let report = json_report(&out);
    eprintln!("{report}");
    assert_eq!(report["rounds"], 0, "no precopy round: {report}");
    let missing = report["postcopy_missing"].as_u64().unwrap();
    assert!(missing > 0, "{report}");
    assert_eq!(
        report["postcopy_pages"].as_u64().unwrap(),
        missing,
        "{report}"
    );
    assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
    let before = src.stdout_text();
    let last = before.lines().filter_map(count).max().unwrap();
    dst.wait_line(LIMIT, |l| count(l).is_some_and(|n| n >= last + 50));
    wait_for("the destination's control socket", LIMIT, || {
        d_sock.exists()
    });
    dst.stop();
    assert_counts_by_one(&(before + &dst.stdout_text()), 150);
}

#[test]
fn a_link_that_dies_in_postcopy_ends_the_destination_and_keeps_the_source_paused() {
    ferry_tests::require_kvm();
    let (s_sock, d_sock) = (temp_path("pc-cut-src.sock"), temp_path("pc-cut-dst.sock"));
    let port = free_tcp_port();
    let mut src = run_tiny(&LONG_COUNT, &[], &s_sock);
    src.wait_line(LIMIT, |l| count(l).is_some_and(|n| n >= 50));
    let mut dst = Ferry::receive(
        &format!("tcp:127.0.0.1:{port}"),
        &["--api-socket", d_sock.to_str().unwrap()],
    );
    // The destination runs the guest and asks for its first pages; they never come.
    let relay = Relay::start(At::PageRequest(1), port);
    let url = relay.url();
    let sock = s_sock.clone();
    let migrating = std::thread::spawn(move || {
        std::process::Command::new(ferry_tests::process::ferry_bin())
            .args(["ctl", "--api-socket"])
            .arg(&sock)
            .args(["migrate", &url, "--postcopy-after", "0"])
            .output()
            .expect("run ferry ctl migrate")
    });
    relay.wait_frozen(LIMIT);
    relay.close();
    let out = migrating.join().unwrap();
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{msg}");
    assert!(msg.contains("link broke during postcopy"), "{msg}");
    assert!(msg.contains("stays paused here"), "{msg}");
    // The destination cannot run a guest whose pages are at the source: it ends, saying so.
    let status = dst.wait_exit(LIMIT);
    assert!(!status.success(), "{}", dst.transcript());
    let err = dst.stderr_lines().join("\n");
    assert!(
        err.contains("postcopy failed with the guest running here"),
        "{err}"
    );
    // The source kept its copy, paused: nothing runs it twice.
    let (ok, st) = src.ctl(&["status"]);
    assert!(ok && st.contains("paused"), "{st}");
    let counted = src.stdout_text().lines().filter_map(count).max().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let still = src.stdout_text().lines().filter_map(count).max().unwrap();
    assert_eq!(counted, still, "a paused source does not count");
    // Resuming it is the operator's call (it rolls the guest back to the switch): it works.
    assert!(src.ctl(&["resume"]).0);
    src.wait_line(LIMIT, |l| count(l).is_some_and(|n| n >= still + 20));
    src.stop();
}
