//! The Linux test guest in real `ferry run` processes: it boots to GUEST-READY with one and
//! with two vCPUs, reports the CPUs it found, heartbeats without gaps, and the control
//! socket ends it. Boots through the PVH entry of the ELF vmlinux and through the bzImage.

use std::time::Duration;

use ferry_tests::guest::guest;
use ferry_tests::process::{heartbeat, run_guest, temp_path};
use ferry_tests::require_kvm;

/// Hang guard for a boot: ~10 s on our CI hosts; a slow host gets ample room.
const BOOT_LIMIT: Duration = Duration::from_secs(600);
const HB_LIMIT: Duration = Duration::from_secs(120);

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn boot_and_check(vcpus: u32, kernel: &std::path::Path, name: &str) {
    require_kvm();
    let socket = temp_path(&format!("{name}.sock"));
    let mut f = run_guest(Some(kernel), vcpus, "workload=idle hb_ms=50", &[], &socket);
    let ready = f.wait_line(BOOT_LIMIT, |l| l.contains("GUEST-READY"));
    assert_eq!(field(&ready, "cpus"), Some(u64::from(vcpus)), "{ready}");

    let first = heartbeat(&f.wait_line(HB_LIMIT, |l| heartbeat(l).is_some())).unwrap();
    let mut prev = first;
    for _ in 0..10 {
        let line = f.wait_line(HB_LIMIT, |l| heartbeat(l).is_some());
        let n = heartbeat(&line).unwrap();
        assert_eq!(
            n,
            prev + 1,
            "heartbeats must increase by exactly one:\n{}",
            f.transcript()
        );
        assert_eq!(field(&line, "cpus"), Some(u64::from(vcpus)), "{line}");
        prev = n;
    }
    let (ok, status) = f.ctl(&["status"]);
    if !(ok && status.contains("state: running")) {
        let exit = f.wait_exit(HB_LIMIT);
        panic!(
            "status: {status}\nferry exited with {exit}:\n{}",
            f.transcript()
        );
    }
    assert!(status.contains(&format!("vcpus: {vcpus}")), "{status}");
    let (ok, out) = f.ctl(&["stop"]);
    assert!(ok, "{out}");
    let status = f.wait_exit(HB_LIMIT);
    assert!(
        status.success(),
        "ferry exited with {status}:\n{}",
        f.transcript()
    );
    let ready_lines = f
        .seen
        .iter()
        .filter(|l| matches!(l, ferry_tests::process::Line::Out(s) if s.contains("GUEST-READY")))
        .count();
    assert_eq!(ready_lines, 1);
    assert!(!f.transcript().contains("HB-CORRUPT"));
}

#[test]
fn pvh_boot_with_one_vcpu() {
    boot_and_check(1, &guest().vmlinux, "pvh1");
}

#[test]
fn pvh_boot_with_two_vcpus() {
    boot_and_check(2, &guest().vmlinux, "pvh2");
}

#[test]
fn bzimage_boot_with_two_vcpus() {
    boot_and_check(2, &guest().bzimage, "bz2");
}
