//! Moving a running guest between two ferry processes (stop-and-copy for now): the
//! destination checks the CPU profile before any memory moves, restores, and runs the guest
//! after Commit; the source then exits 0. A destination that cannot run the profile refuses,
//! and the guest keeps running on the source.

use std::path::Path;
use std::time::Duration;

use ferry_tests::process::{assert_counts_by_one, count_line as count, free_tcp_port};
use ferry_tests::process::{run_tiny, temp_path, Ferry};
use ferry_tests::storm::{json_report, storm_pass, storm_source};
use ferry_tests::tiny::{wait_for, LONG_COUNT};

const LIMIT: Duration = Duration::from_secs(60);

fn source(sock: &Path) -> Ferry {
    run_tiny(&LONG_COUNT, &[], sock)
}

fn migrate_and_check(url: &str, tag: &str) {
    ferry_tests::require_kvm();
    let (s_sock, d_sock) = (
        temp_path(&format!("{tag}-src.sock")),
        temp_path(&format!("{tag}-dst.sock")),
    );
    let mut src = source(&s_sock);
    src.wait_line(LIMIT, |l| count(l).is_some_and(|n| n >= 100));
    let mut dst = Ferry::receive(url, &["--api-socket", d_sock.to_str().unwrap()]);
    let (ok, out) = src.ctl(&["migrate", url]);
    assert!(
        ok && out.contains("migration completed"),
        "{out}\n{}",
        src.transcript()
    );
    assert!(
        src.wait_exit(LIMIT).success(),
        "the source must exit 0 after Commit:\n{}",
        src.transcript()
    );
    let before = src.stdout_text();
    dst.wait_line(LIMIT, |l| count(l).is_some());
    wait_for("the destination's control socket", LIMIT, || {
        d_sock.exists()
    });
    let (ok, status) = dst.ctl(&["status"]);
    assert!(ok && status.contains("running"), "{status}");
    assert!(dst.ctl(&["stop"]).0);
    assert!(dst.wait_exit(LIMIT).success(), "{}", dst.transcript());
    assert_counts_by_one(&(before + &dst.stdout_text()), 101);
}

#[test]
fn migrate_over_a_unix_socket() {
    let url = format!("unix:{}", temp_path("mig.sock").display());
    migrate_and_check(&url, "unix");
}

#[test]
fn migrate_over_tcp_loopback() {
    migrate_and_check(&format!("tcp:127.0.0.1:{}", free_tcp_port()), "tcp");
}

#[test]
fn a_destination_that_cannot_run_the_profile_refuses_and_the_source_runs_on() {
    ferry_tests::require_kvm();
    let opteron = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cpuid/testdata/amd-opteron-2378-shanghai-instlatx64.txt");
    let s_sock = temp_path("refuse-src.sock");
    let url = format!("unix:{}", temp_path("refuse.sock").display());
    let mut src = source(&s_sock);
    src.wait_line(LIMIT, |l| count(l).is_some_and(|n| n >= 50));
    let mut dst = Ferry::receive(&url, &["--host", opteron.to_str().unwrap()]);
    // The default profile (x86-64-v2) has ssse3, which the Opteron 2378 lacks.
    let (ok, out) = src.ctl(&["migrate", &url]);
    assert!(
        !ok && out.contains("refused") && out.contains("ssse3"),
        "{out}"
    );
    let status = dst.wait_exit(LIMIT);
    assert!(
        !status.success(),
        "the refusing destination must exit non-zero"
    );
    let err = dst.stderr_lines().join("\n");
    assert!(err.contains("ssse3") && err.contains("refused"), "{err}");
    assert!(
        !dst.stdout_text().lines().any(|l| count(l).is_some()),
        "the destination must not run the guest"
    );
    // The source never paused: it goes on counting and is still running.
    let (ok, st) = src.ctl(&["status"]);
    assert!(ok && st.contains("running"), "{st}");
    let last = src.seen.iter().rev().find_map(|l| match l {
        ferry_tests::process::Line::Out(s) => count(s),
        _ => None,
    });
    src.wait_line(LIMIT, |l| {
        count(l).is_some_and(|n| Some(n) > last.map(|x| x + 10))
    });
    assert!(src.ctl(&["stop"]).0);
    assert!(src.wait_exit(LIMIT).success());
}

#[test]
fn a_host_profile_guest_is_refused_by_a_host_of_the_other_vendor() {
    ferry_tests::require_kvm();
    let kvm = vmm::vm::open_kvm().unwrap();
    let here = vmm::guest_cpu::model::host_dump(&kvm)
        .unwrap()
        .vendor()
        .unwrap();
    // A recorded CPU of the other vendor stands in for the destination host.
    let other = match here {
        cpuid::Vendor::Intel => "amd-epyc-9124-genoa-instlatx64.txt",
        cpuid::Vendor::Amd => "intel-xeon-w7-2475x-sapphirerapids-instlatx64.txt",
    };
    let other = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cpuid/testdata")
        .join(other);
    let s_sock = temp_path("hostcpu-src.sock");
    let url = format!("unix:{}", temp_path("hostcpu.mig").display());
    let mut src = run_tiny(&LONG_COUNT, &["--cpu", "host"], &s_sock);
    src.wait_line(LIMIT, |l| count(l).is_some());
    let mut dst = Ferry::receive(&url, &["--host", other.to_str().unwrap()]);
    let (ok, out) = src.ctl(&["--json", "migrate", &url]);
    assert!(
        !ok && out.contains("not migratable to a host of another vendor"),
        "{out}"
    );
    // A program tells a refusal from a broken link by its code.
    assert!(out.contains(r#""code":"refused""#), "{out}");
    assert!(!dst.wait_exit(LIMIT).success());
    let (ok, st) = src.ctl(&["status"]);
    assert!(ok && st.contains("running"), "{st}");
    assert!(src.ctl(&["stop"]).0);
    assert!(src.wait_exit(LIMIT).success());
}

#[test]
fn the_storm_guest_moves_between_processes_with_every_page_intact() {
    ferry_tests::require_kvm();
    let (s_sock, d_sock) = (temp_path("storm-src.sock"), temp_path("storm-dst.sock"));
    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut src = storm_source(&s_sock);
    wait_for("the storm guest to run", LIMIT, || {
        storm_pass(&src, "storm-before.snap") >= 3
    });
    let before = storm_pass(&src, "storm-before.snap");
    let mut dst = Ferry::receive(&url, &["--api-socket", d_sock.to_str().unwrap()]);
    let (ok, out) = src.ctl(&["--json", "migrate", &url, "--max-downtime", "5ms"]);
    assert!(ok, "{out}");
    let report = json_report(&out);
    eprintln!("{report}");
    assert_eq!(report["outcome"], "completed");
    assert!(report["rounds"].as_u64().unwrap() >= 2, "{report}");
    assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
    wait_for("the destination's control socket", LIMIT, || {
        d_sock.exists()
    });
    let first = storm_pass(&dst, "storm-after1.snap");
    assert!(
        first > before,
        "pass {first} after the move, {before} before"
    );
    wait_for("the guest to go on at the destination", LIMIT, || {
        storm_pass(&dst, "storm-after2.snap") > first + 5
    });
    assert!(dst.ctl(&["stop"]).0);
    assert!(dst.wait_exit(LIMIT).success(), "{}", dst.transcript());
}

#[test]
fn an_unreachable_target_throttles_then_cancels_and_the_guest_runs_on_at_the_source() {
    ferry_tests::require_kvm();
    let s_sock = temp_path("storm-cancel-src.sock");
    let url = format!("unix:{}", temp_path("storm-cancel.mig").display());
    let mut src = storm_source(&s_sock);
    wait_for("the storm guest to run", LIMIT, || {
        storm_pass(&src, "storm-cancel0.snap") >= 3
    });
    let mut dst = Ferry::receive(&url, &[]);
    let (ok, out) = src.ctl(&[
        "--json",
        "migrate",
        &url,
        "--max-downtime",
        "0ms",
        "--timeout",
        "3s",
        // Each round of the 16 MiB working set then takes ~330 ms, and the guest rewrites
        // all of it meanwhile: the throttle must rise.
        "--max-bandwidth",
        "50M",
    ]);
    assert!(!ok, "{out}");
    let report = json_report(&out);
    eprintln!("{report}");
    assert_eq!(report["outcome"], "cancelled", "{report}");
    assert!(report["throttle_pct"].as_u64().unwrap() > 0, "{report}");
    assert!(
        out.contains("timed out") && out.contains("runs here as before"),
        "{out}"
    );
    // The destination gives up, saying why; the guest runs on at the source.
    assert!(!dst.wait_exit(LIMIT).success());
    let err = dst.stderr_lines().join("\n");
    assert!(err.contains("the source cancelled the migration"), "{err}");
    let (ok, st) = src.ctl(&["status"]);
    assert!(ok && st.contains("running"), "{st}");
    let first = storm_pass(&src, "storm-cancel1.snap");
    wait_for("the guest to go on at the source", LIMIT, || {
        storm_pass(&src, "storm-cancel2.snap") > first + 5
    });
    assert!(src.ctl(&["stop"]).0);
    assert!(src.wait_exit(LIMIT).success());
}
