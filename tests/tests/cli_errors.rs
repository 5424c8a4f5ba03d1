//! `ferry run` with bad input: a non-zero exit, exactly one line on stderr that names the
//! problem, and no panic or backtrace.

use std::path::Path;
use std::time::Duration;

use ferry_tests::guest::guest;
use ferry_tests::process::{temp_path, Ferry};

fn expect_error(args: &[&str], needles: &[&str]) {
    let mut f = Ferry::spawn(args);
    let status = f.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{args:?} succeeded:\n{}", f.transcript());
    let err = f.stderr_lines();
    assert_eq!(
        err.len(),
        1,
        "{args:?}: want one stderr line:\n{}",
        f.transcript()
    );
    let line = err[0];
    assert!(line.starts_with("ferry: error: "), "{line}");
    for n in needles {
        assert!(line.contains(n), "{args:?}: {line:?} does not name {n:?}");
    }
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(
            !f.transcript().contains(bad),
            "{args:?}:\n{}",
            f.transcript()
        );
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn missing_kernel() {
    expect_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        &["kernel", "/nonexistent/vmlinux", "No such file"],
    );
}

#[test]
fn unreadable_initrd() {
    let g = guest();
    expect_error(
        &[
            "run",
            "--kernel",
            p(&g.vmlinux),
            "--initrd",
            "/nonexistent/initrd",
        ],
        &["initrd", "/nonexistent/initrd", "No such file"],
    );
    let dir = temp_path("initrd-is-a-dir");
    std::fs::create_dir_all(&dir).unwrap();
    expect_error(
        &["run", "--kernel", p(&g.vmlinux), "--initrd", p(&dir)],
        &["initrd", "not a regular file"],
    );
}

#[test]
fn a_file_that_is_not_a_kernel() {
    let notakernel = temp_path("notakernel");
    std::fs::write(&notakernel, vec![0x5a; 8192]).unwrap();
    expect_error(
        &["run", "--kernel", p(&notakernel)],
        &["not a kernel", p(&notakernel)],
    );
}

#[test]
fn zero_memory() {
    let g = guest();
    expect_error(
        &["run", "--kernel", p(&g.vmlinux), "--memory", "0"],
        &["memory size 0", "too small"],
    );
    expect_error(
        &["run", "--kernel", p(&g.vmlinux), "--memory", "lots"],
        &["--memory", "lots"],
    );
}

#[test]
fn zero_vcpus() {
    let g = guest();
    expect_error(
        &["run", "--kernel", p(&g.vmlinux), "--vcpus", "0"],
        &["--vcpus", "at least 1"],
    );
}

#[test]
fn more_vcpus_than_kvm_allows() {
    ferry_tests::require_kvm();
    let g = guest();
    expect_error(
        &["run", "--kernel", p(&g.vmlinux), "--vcpus", "100000"],
        &["--vcpus 100000", "more than this host's KVM allows"],
    );
}

#[test]
fn ctl_without_a_server() {
    let sock = temp_path("nobody-listens.sock");
    let mut f = Ferry::spawn(&["ctl", "--api-socket", p(&sock), "status"]);
    assert!(!f.wait_exit(Duration::from_secs(30)).success());
    let err = f.stderr_lines();
    assert_eq!(err.len(), 1, "{}", f.transcript());
    assert!(
        err[0].contains("cannot connect") && err[0].contains(p(&sock)),
        "{}",
        err[0]
    );
}
