//! `ferry run` with bad input: a non-zero exit, exactly one line on stderr that names the
//! problem, and no panic or backtrace.

use std::path::Path;
use std::time::Duration;

use ferry_tests::guest::guest;
use ferry_tests::process::{temp_path, Ferry};

fn expect_error(args: &[&str], needles: &[&str]) {
    let mut f = Ferry::spawn(args);
    let status = f.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{args:?}:\n{}", f.transcript());
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
    let parts: Vec<&str> = line.split(": ").collect();
    assert!(
        parts.windows(2).all(|w| w[0] != w[1]),
        "a cause is repeated: {line}"
    );
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

/// A copy of x86-64-v2 plus the first catalogue feature this host lacks.
fn profile_this_host_cannot_run() -> (std::path::PathBuf, &'static str) {
    ferry_tests::require_kvm();
    let kvm = vmm::vm::open_kvm().unwrap();
    let host = vmm::guest_cpu::model::host_dump(&kvm).unwrap();
    let present = cpuid::features::present(&host);
    let lacking = cpuid::features::CATALOGUE
        .iter()
        .map(|f| f.name)
        .find(|n| !present.contains(n) && !cpuid::profile::HIDDEN.iter().any(|(h, _)| h == n))
        .expect("some catalogue feature is missing on any real host");
    let mut p = cpuid::builtin::builtin("x86-64-v2", &host)
        .unwrap()
        .unwrap();
    p.name = "too-much".into();
    p.features.insert(lacking.to_string());
    let path = temp_path("too-much.json");
    std::fs::write(&path, p.to_json()).unwrap();
    (path, lacking)
}

#[test]
fn run_refuses_a_cpu_profile_this_host_cannot_run() {
    let g = guest();
    let (profile, lacking) = profile_this_host_cannot_run();
    expect_error(
        &["run", "--kernel", p(&g.vmlinux), "--cpu", p(&profile)],
        &["too-much", "cannot run it", lacking],
    );
    expect_error(
        &["run", "--kernel", p(&g.vmlinux), "--cpu", "no-such-profile"],
        &["no-such-profile", "harpertown-shanghai"],
    );
}

#[test]
fn cpu_check_exits_1_listing_every_missing_feature() {
    let opteron = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cpuid/testdata/amd-opteron-2378-shanghai-instlatx64.txt");
    let e5420 = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cpuid/testdata/intel-xeon-e5420-harpertown-libcpuid.txt");
    // E5420 alone keeps ss, ssse3 and sse4_1, which the Opteron lacks.
    let profile = temp_path("e5420.json");
    let mut f = Ferry::spawn(&["cpu", "baseline", p(&e5420), "-o", p(&profile)]);
    assert!(
        f.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        f.transcript()
    );
    let mut f = Ferry::spawn(&["cpu", "check", p(&profile), "--host", p(&opteron)]);
    assert_eq!(
        f.wait_exit(Duration::from_secs(30)).code(),
        Some(1),
        "{}",
        f.transcript()
    );
    let out = f.transcript();
    let line = out
        .lines()
        .find(|l| l.contains("missing features:"))
        .unwrap_or_else(|| panic!("{out}"));
    let names: Vec<&str> = line
        .split("missing features:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    // Sorted by name: self-snoop (Intel only), SSE4.1, SSSE3.
    assert_eq!(names, vec!["ss", "sse4_1", "ssse3"], "{out}");
    let mut f = Ferry::spawn(&["cpu", "check", "harpertown-shanghai", "--host", p(&opteron)]);
    assert!(
        f.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        f.transcript()
    );
}

#[test]
fn restore_refuses_a_corrupt_or_foreign_snapshot() {
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migration/tests/golden/v3-small.bin");
    let bytes = std::fs::read(&golden).unwrap();
    let garbage = temp_path("garbage.snap");
    std::fs::write(&garbage, b"not a snapshot at all").unwrap();
    expect_error(
        &["restore", p(&garbage)],
        &["snapshot", p(&garbage), "magic"],
    );
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let corrupt = temp_path("corrupt.snap");
    std::fs::write(&corrupt, &flipped).unwrap();
    expect_error(&["restore", p(&corrupt)], &["snapshot", p(&corrupt)]);
    // A snapshot of a later format version than this ferry knows: one line naming both.
    let mut v5 = bytes.clone();
    v5[8..12].copy_from_slice(&5u32.to_le_bytes());
    let foreign = temp_path("v5.snap");
    std::fs::write(&foreign, &v5).unwrap();
    expect_error(
        &["restore", p(&foreign)],
        &["format version 5", "versions 1 to 4"],
    );
    let truncated = temp_path("truncated.snap");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    expect_error(&["restore", p(&truncated)], &["snapshot", p(&truncated)]);
}

/// Every kind of argument and file, wrong, missing, oversized or hostile (an endless
/// /dev/zero where a file is expected): one line naming it, status 1, nothing read past a cap.
#[test]
fn hostile_and_oversized_run_flags_and_files() {
    ferry_tests::require_kvm();
    let g = guest();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["run", "--image", "/dev/zero", "--memory", "64M"],
            &["image /dev/zero", "larger than 67108864 bytes"],
        ),
        (
            &["run", "--image", "/dev/null", "--cpu", "/dev/zero"],
            &["/dev/zero", "larger than 1048576 bytes"],
        ),
        (
            &["run", "--kernel", "/dev/zero"],
            &["kernel /dev/zero", "not a regular file"],
        ),
        (
            &["run", "--kernel", p(&g.vmlinux), "--initrd", "/dev/zero"],
            &["initrd /dev/zero", "not a regular file"],
        ),
        (
            &["run", "--image", "/dev/null", "--disk", "path=/dev/zero"],
            &["disk /dev/zero", "not a regular file"],
        ),
        (
            &[
                "run",
                "--image",
                "/dev/null",
                "--net",
                "tap=abcdefghijklmnopq",
            ],
            &["abcdefghijklmnopq", "1 to 15 characters"],
        ),
        (
            &["run", "--image", "/dev/null", "--memory", "100T"],
            &["too large"],
        ),
        (
            &["run", "--image", "/dev/null", "--memory", "12Q"],
            &["12Q"],
        ),
        (&["run", "--image", "/dev/null", "--vcpus", "-1"], &["'-1'"]),
        (
            &["run", "--image", "/dev/null", "--initrd", "x"],
            &["--initrd", "--image"],
        ),
        (&["run", "--bogus"], &["--bogus"]),
        (
            &["run", "--image", "/dev/null", "--seccomp", "maybe"],
            &["maybe", "--seccomp"],
        ),
        (
            &["run", "--image", "/dev/null", "--user", "root"],
            &["--user", "\"root\" is not a number"],
        ),
    ];
    for (args, needles) in cases {
        expect_error(args, needles);
    }
}

#[test]
fn hostile_and_oversized_restore_receive_cpu_and_ctl_flags() {
    ferry_tests::require_kvm();
    let tls = temp_path("hostile-tls");
    std::fs::create_dir_all(&tls).unwrap();
    let _ = std::fs::remove_file(tls.join("ca-cert.pem"));
    std::os::unix::fs::symlink("/dev/zero", tls.join("ca-cert.pem")).unwrap();
    let sock = temp_path("hostile.sock");
    let listen = format!("unix:{}", sock.display());
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["restore", "/dev/zero"],
            &["/dev/zero", "not a ferry VM stream"],
        ),
        (&["restore", "/nonexistent.snap"], &["/nonexistent.snap"]),
        (
            &["receive", "--listen", &listen, "--tls-dir", p(&tls)],
            &["ca-cert.pem", "larger than"],
        ),
        (
            &["receive", "--listen", &listen, "--key-file", "/dev/zero"],
            &["/dev/zero"],
        ),
        (&["receive", "--listen", "bogus:1"], &["bogus:1"]),
        (
            &["receive", "--listen", &listen, "--max-memory", "lots"],
            &["--max-memory", "lots"],
        ),
        (&["cpu", "show", "/dev/zero"], &["/dev/zero", "larger than"]),
        (
            &["ctl", "--api-socket", p(&sock), "frobnicate"],
            &["frobnicate"],
        ),
    ];
    for (args, needles) in cases {
        expect_error(args, needles);
    }
    assert!(!sock.exists(), "no listener was left behind");
}

/// A missing required flag is named on the one line; `--version` works after a
/// subcommand too.
#[test]
fn a_missing_flag_is_named_and_version_works_everywhere() {
    expect_error(&["receive"], &["required", "--listen"]);
    expect_error(&["ctl", "status"], &["required", "--api-socket"]);
    expect_error(&["run"], &["required"]);
    for args in [
        &["--version"][..],
        &["run", "--version"],
        &["ctl", "--version"],
    ] {
        let out = std::process::Command::new(ferry_tests::process::ferry_bin())
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(text.starts_with("ferry "), "{args:?}: {text}");
    }
}
