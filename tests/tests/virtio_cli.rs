//! `ferry run --disk` and `--net` refuse what they cannot use with one line and status 1:
//! a missing or directory disk file, a bad option, a tap that does not exist, two devices
//! on one tap. A restore or a migration whose other side names another disk image, or no
//! disk at all (this side opens only the images its own command line names), is refused
//! with one line before any memory moves, and the guest goes on running.

use std::process::Command;

use ferry_tests::netns::Netns;
use std::time::Duration;

use ferry_tests::process::{count_line, ferry_bin, one_error_line, run_tiny, temp_path, Ferry};
use ferry_tests::tiny::LONG_COUNT;

fn image() -> std::path::PathBuf {
    let img = temp_path("virtio-cli.bin");
    std::fs::write(&img, ferry_tests::tiny::REAL_HLT.bytes).unwrap();
    img
}

fn run(extra: &[&str]) -> Command {
    let img = image();
    let mut c = Command::new(ferry_bin());
    c.args([
        "run",
        "--image",
        img.to_str().unwrap(),
        "--entry",
        "real",
        "--memory",
        "64M",
    ]);
    c.args(extra);
    c
}

#[test]
fn a_disk_that_cannot_be_used_is_one_line() {
    ferry_tests::require_kvm();
    let missing = temp_path("no-such-disk.img");
    let e = one_error_line(&mut run(&[
        "--disk",
        &format!("path={}", missing.display()),
    ]));
    assert!(
        e.contains(missing.to_str().unwrap()) && e.contains("No such file"),
        "{e}"
    );
    let dir = std::env::temp_dir();
    let e = one_error_line(&mut run(&["--disk", &format!("path={}", dir.display())]));
    assert!(e.contains("not a regular file"), "{e}");
    let e = one_error_line(&mut run(&["--disk", "file=x.img"]));
    assert!(e.contains("--disk") && e.contains("file=x.img"), "{e}");
}

#[test]
fn a_tap_that_is_missing_or_taken_is_one_line() {
    ferry_tests::require_kvm();
    let ns = Netns::new("tapcli");
    let img = image();
    let cmd = |taps: &[&str]| {
        let mut c = ns.command(ferry_bin());
        c.args([
            "run",
            "--image",
            img.to_str().unwrap(),
            "--entry",
            "real",
            "--memory",
            "64M",
        ]);
        for t in taps {
            c.args(["--net", &format!("tap={t}")]);
        }
        c
    };
    let e = one_error_line(&mut cmd(&["fr-none0"]));
    assert!(e.contains("fr-none0") && e.contains("no such tap"), "{e}");
    ns.tap("fr-tap0");
    let e = one_error_line(&mut cmd(&["fr-tap0", "fr-tap0"]));
    assert!(e.contains("fr-tap0") && e.contains("in use"), "{e}");
    let e = one_error_line(&mut run(&["--net", "tap=fr-tap0,mac=zz"]));
    assert!(e.contains("bad MAC"), "{e}");
}

#[test]
fn another_disk_image_or_none_is_refused_by_restore_and_by_the_destination_and_the_guest_runs_on() {
    ferry_tests::require_kvm();
    let limit = Duration::from_secs(60);
    let disk = temp_path("carried.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let other = temp_path("carried-other.img");
    std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
    let sock = temp_path("carried.sock");
    let mut f = run_tiny(
        &LONG_COUNT,
        &["--disk", &format!("path={}", disk.display())],
        &sock,
    );
    f.wait_line(limit, |l| count_line(l).is_some_and(|n| n >= 10));
    let snap = temp_path("carried.snap");
    let (ok, out) = f.ctl(&["snapshot", snap.to_str().unwrap()]);
    assert!(ok, "a VM with a disk snapshots: {out}");
    let mut restore = Command::new(ferry_bin());
    restore.args(["restore", snap.to_str().unwrap(), "--disk"]);
    restore.arg(format!("path={}", other.display()));
    let line = one_error_line(&mut restore);
    assert!(
        line.contains("both sides must name the same image"),
        "{line}"
    );
    eprintln!("restore refused: {line}");
    // Given no disk, the snapshot's path is not taken: the flag to give is named.
    let line = one_error_line(Command::new(ferry_bin()).args(["restore", snap.to_str().unwrap()]));
    assert!(
        line.contains("1 disk(s): give --disk path=IMAGE") && line.contains("never those"),
        "{line}"
    );
    eprintln!("restore refused: {line}");

    let port = ferry_tests::process::free_tcp_port();
    let url = format!("tcp:127.0.0.1:{port}");
    let other_disk = format!("path={}", other.display());
    let mut dest = Ferry::receive(&url, &["--disk", &other_disk]);
    let (ok, out) = f.ctl(&["migrate", &url]);
    assert!(
        !ok && out.contains("both sides must name the same image"),
        "{out}"
    );
    eprintln!("migration refused: {}", out.trim());
    assert!(!dest.wait_exit(limit).success(), "{}", dest.transcript());
    f.still_counting(limit, 5);
    // A destination given no disk: refused at the Hello (before Accept, so before any
    // page moves).
    let url = format!("unix:{}", temp_path("carried-none.mig").display());
    let mut dest = Ferry::receive(&url, &[]);
    let (ok, out) = f.ctl(&["migrate", &url]);
    assert!(
        !ok && out.contains("the destination refused the VM") && out.contains("give --disk"),
        "{out}\n{}",
        dest.transcript()
    );
    eprintln!("migration refused: {}", out.trim());
    assert!(!dest.wait_exit(limit).success(), "{}", dest.transcript());
    f.still_counting(limit, 5);
    assert!(f.ctl(&["stop"]).0);
    assert!(f.wait_exit(limit).success(), "{}", f.transcript());
}
