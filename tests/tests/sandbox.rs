//! Seccomp filters on ferry's threads: a call outside a thread kind's filter ends the
//! process with one line naming the thread and the call; every thread of a running ferry
//! (a VM with a disk, a waiting destination, the VM it received) runs under a filter, and
//! `--seccomp=off` leaves them all unfiltered.

use std::process::Command;
use std::time::Duration;

use ferry_tests::process::{count_line, free_tcp_port, run_tiny, temp_path, Ferry};
use ferry_tests::tiny::{wait_for, LONG_COUNT};
use vmm::sandbox::Kind;

const LIMIT: Duration = Duration::from_secs(60);

fn probe(mode: &str, kind: &str, call: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sandbox-probe"))
        .args([mode, kind, call])
        .output()
        .expect("run sandbox-probe")
}

/// Each kind refuses a call no thread makes, an ioctl that is none of KVM's, TUN's,
/// userfaultfd's or PAGEMAP_SCAN, an openat that would create or truncate a file for
/// writing, and an executable mapping, each with one line naming the thread and the call.
#[test]
fn a_forbidden_call_in_any_thread_kind_is_one_line_naming_it() {
    for kind in Kind::ALL {
        for (call, named) in [
            ("getppid", "getppid (110)"),
            ("ioctl", "ioctl (16)"),
            ("openat", "openat (257)"),
            ("exec", "mmap (9)"),
        ] {
            let out = probe("on", kind.name(), call);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(159),
                "{} {call}: {err}",
                kind.name()
            );
            assert_eq!(
                err,
                format!(
                    "ferry: seccomp: the {} thread made a system call outside its filter: \
                     {named}; ferry stops (--seccomp=log lets it through and logs it)\n",
                    kind.name()
                )
            );
            assert!(out.stdout.is_empty(), "the call did not return");
        }
    }
}

#[test]
fn log_mode_lets_the_call_through() {
    let out = probe("log", "vcpu", "getppid");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ppid = std::process::id();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("ppid {ppid}\n")
    );
}

/// Each thread of `pid`: its name and its seccomp mode (0 none, 2 filter).
fn threads(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in dir.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let Some(mode) = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
        else {
            continue;
        };
        out.push((comm.trim().to_string(), mode));
    }
    out.sort();
    out
}

/// Waits until every thread of `f` is filtered and `names` are among them; returns them.
fn all_filtered(f: &Ferry, names: &[&str]) -> Vec<(String, u32)> {
    let pid = f.pid();
    let ready = || {
        let t = threads(pid);
        names.iter().all(|n| t.iter().any(|(c, _)| c == n)) && t.iter().all(|(_, m)| *m == 2)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ready() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = threads(pid);
    for n in names {
        assert!(t.iter().any(|(c, _)| c == n), "no {n} thread in {t:?}");
    }
    for (name, mode) in &t {
        assert_eq!(
            *mode, 2,
            "thread {name} of ferry {pid} is not filtered: {t:?}"
        );
    }
    t
}

#[test]
fn every_thread_of_a_running_ferry_and_of_its_destination_is_filtered() {
    ferry_tests::require_kvm();
    let disk = temp_path("sandbox.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", disk.display());
    let sock = temp_path("sandbox.sock");
    let mut src = run_tiny(&LONG_COUNT, &["--disk", &disk_arg], &sock);
    src.wait_line(LIMIT, |l| count_line(l).is_some_and(|n| n >= 3));
    let t = all_filtered(&src, &["ferry", "vcpu0", "virtio", "api"]);
    eprintln!("source: {t:?}");

    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let d_sock = temp_path("sandbox-dst.sock");
    let mut dst = Ferry::receive(
        &url,
        &[
            "--disk",
            &disk_arg,
            "--api-socket",
            d_sock.to_str().unwrap(),
        ],
    );
    let t = all_filtered(&dst, &["ferry"]);
    eprintln!("waiting destination: {t:?}");
    // By postcopy: the userfaultfd that reports KVM's faults, opened before the drop.
    let (ok, out) = src.ctl(&["migrate", &url, "--postcopy-after", "0"]);
    assert!(ok, "{out}");
    assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
    wait_for("the destination's control socket", LIMIT, || {
        d_sock.exists()
    });
    dst.wait_line(LIMIT, |l| count_line(l).is_some());
    let t = all_filtered(&dst, &["ferry", "vcpu0", "virtio", "api"]);
    eprintln!("destination running: {t:?}");
    dst.stop();
}

#[test]
fn seccomp_off_leaves_every_thread_unfiltered() {
    ferry_tests::require_kvm();
    let sock = temp_path("sandbox-off.sock");
    let mut f = run_tiny(&LONG_COUNT, &["--seccomp", "off"], &sock);
    f.wait_line(LIMIT, |l| count_line(l).is_some_and(|n| n >= 3));
    let t = threads(f.pid());
    assert!(t.iter().any(|(c, _)| c == "vcpu0"), "{t:?}");
    assert!(t.iter().all(|(_, m)| *m == 0), "{t:?}");
    let warned: Vec<&str> = f
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("warning"))
        .collect();
    assert_eq!(warned.len(), 1, "one warning line: {warned:?}");
    assert!(warned[0].contains("--seccomp off"), "{warned:?}");
    f.stop();
}

#[test]
fn guest_ram_is_left_out_of_core_dumps() {
    ferry_tests::require_kvm();
    let sock = temp_path("sandbox-dump.sock");
    let mut f = run_tiny(&LONG_COUNT, &[], &sock);
    f.wait_line(LIMIT, |l| count_line(l).is_some());
    // run_tiny gives the guest 64 MiB: one anonymous mapping of 65536 kB.
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", f.pid())).unwrap();
    let (mut size, mut flags) = ("", Vec::new());
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("Size:") {
            size = v.trim();
        } else if let Some(v) = l.strip_prefix("VmFlags:") {
            if size == "65536 kB" {
                flags.push(v.trim());
            }
        }
    }
    assert_eq!(flags.len(), 1, "one 64 MiB mapping: {flags:?}");
    assert!(
        flags[0].split_whitespace().any(|f| f == "dd"),
        "VmFlags:{}",
        flags[0]
    );
    f.stop();
}

/// The `Uid:`, `Gid:`, `Groups:` and `CapEff:` lines of each thread of `pid`.
fn credentials(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let keep = ["Uid:", "Gid:", "Groups:", "CapEff:"];
        let lines: Vec<String> = status
            .lines()
            .filter(|l| keep.iter().any(|k| l.starts_with(k)))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        out.push(lines.join(", "));
    }
    out
}

const NOBODY: &str = "Uid: 65534 65534 65534 65534, Gid: 65534 65534 65534 65534, \
                      Groups: 65534, CapEff: 0000000000000000";

#[test]
fn user_makes_every_thread_that_user_once_set_up_and_a_migration_runs_between_two() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    ferry_tests::require_kvm();
    // A directory the user may write: the snapshot and the destination's sockets go there.
    let dir = temp_path("as-nobody");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.join("src.sock");
    let mut src = run_tiny(&LONG_COUNT, &["--user", "65534:65534"], &sock);
    src.wait_line(LIMIT, |l| count_line(l).is_some_and(|n| n >= 3));
    for c in credentials(src.pid()) {
        assert_eq!(c, NOBODY);
    }
    assert_eq!(
        std::fs::metadata(&sock).unwrap().uid(),
        65534,
        "the control socket"
    );
    let snap = dir.join("as-nobody.snap");
    let (ok, out) = src.ctl(&["snapshot", snap.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert_eq!(
        std::fs::metadata(&snap).unwrap().uid(),
        65534,
        "the snapshot"
    );

    // A destination as the same user: its listener and VM built after the drop (with the
    // /dev/kvm and the userfaultfd it kept), the source admitted as its own user
    // (SO_PEERCRED).
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let d_sock = dir.join("dst.sock");
    let args = ["--user", "65534", "--api-socket", d_sock.to_str().unwrap()];
    let mut dst = Ferry::receive(&url, &args);
    wait_for("the destination to listen", LIMIT, || {
        dir.join("mig.sock").exists()
    });
    for c in credentials(dst.pid()) {
        assert_eq!(c, NOBODY);
    }
    // By postcopy: the userfaultfd that reports KVM's faults, opened before the drop.
    let (ok, out) = src.ctl(&["migrate", &url, "--postcopy-after", "0"]);
    assert!(ok, "{out}");
    assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
    wait_for("the destination's control socket", LIMIT, || {
        d_sock.exists()
    });
    dst.wait_line(LIMIT, |l| count_line(l).is_some());
    for c in credentials(dst.pid()) {
        assert_eq!(c, NOBODY);
    }
    dst.stop();
}

#[test]
fn a_bad_user_is_one_line() {
    for (arg, says) in [
        ("x", "user id \"x\" is not a number"),
        ("0:y", "group id \"y\" is not a number"),
        ("4000000", "no entry in the password database"),
    ] {
        let mut cmd = Command::new(ferry_tests::process::ferry_bin());
        cmd.args(["run", "--image", "/nonexistent", "--user", arg]);
        let line = ferry_tests::process::one_error_line(&mut cmd);
        assert!(line.contains(says) && line.contains("--user"), "{line}");
    }
}
