//! SIGTERM in the middle of a migration: the migration is cancelled, the guest stays with
//! the source, which then stops the VM in order and exits 0; the destination never runs
//! it. SIGINT on a ferry that only runs its VM stops it the same way.

use std::process::Command;
use std::time::Duration;

use ferry_tests::binary::ferry_bin;
use ferry_tests::process::{count_line, run_tiny, temp_path, Ferry};
use ferry_tests::tiny::LONG_COUNT;

const LIMIT: Duration = Duration::from_secs(60);

fn kill(f: &Ferry, signal: &str) {
    let st = Command::new("kill")
        .args([signal, &f.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(st.success());
}

#[test]
fn sigterm_mid_migration_cancels_it_and_stops_the_vm_here() {
    ferry_tests::require_kvm();
    let events = temp_path("sigterm.events");
    let mig = temp_path("sigterm-mig.sock");
    let url = format!("unix:{}", mig.display());
    let mut dst = Ferry::receive(&url, &[]);
    let sock = temp_path("sigterm-src.sock");
    let monitor = format!("path={}", events.display());
    let mut src = run_tiny(&LONG_COUNT, &["--event-monitor", &monitor], &sock);
    src.wait_line(LIMIT, |l| count_line(l).is_some());
    // Slow enough (64 KiB/s) that the signal comes while round 0 is under way.
    let mut ctl = Command::new(ferry_bin());
    ctl.arg("ctl").arg("--api-socket").arg(&sock);
    ctl.args(["migrate", &url, "--max-bandwidth", "64K"]);
    let migrating = std::thread::spawn(move || ctl.output().expect("run ferry ctl migrate"));
    ferry_tests::tiny::wait_for("the migration's first round", LIMIT, || {
        std::fs::read_to_string(&events).is_ok_and(|t| t.contains("migration-round"))
    });
    kill(&src, "-TERM");
    let out = migrating.join().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("cancelled"), "{said}");
    assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
    assert!(
        src.stderr_lines()
            .iter()
            .any(|l| l.contains("stopped by SIGTERM")),
        "{}",
        src.transcript()
    );
    let text = std::fs::read_to_string(&events).unwrap();
    let names: Vec<&str> = text
        .lines()
        .map(|l| {
            l.split("\"event\":\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
        })
        .collect();
    let tail = &names[names.len() - 3..];
    assert_eq!(
        tail,
        ["migration-cancelled", "shutdown", "shutdown"],
        "{text}"
    );
    assert!(text.contains(r#""reason":"stop-requested""#), "{text}");
    assert!(
        dst.line_within(Duration::from_secs(3), |l| count_line(l).is_some())
            .is_none(),
        "the destination never runs the guest: {}",
        dst.transcript()
    );
}

#[test]
fn sigint_stops_a_running_vm_in_order() {
    ferry_tests::require_kvm();
    let sock = temp_path("sigint.sock");
    let mut f = run_tiny(&LONG_COUNT, &[], &sock);
    f.wait_line(LIMIT, |l| count_line(l).is_some());
    kill(&f, "-INT");
    assert!(f.wait_exit(LIMIT).success(), "{}", f.transcript());
    assert!(
        f.stderr_lines()
            .iter()
            .any(|l| l.contains("stopped by SIGINT")),
        "{}",
        f.transcript()
    );
}
