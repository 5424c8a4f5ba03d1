//! The host decides which of its files and taps a guest gets, never a peer: a hostile
//! source's Hello naming a host file (a copy of /etc/passwd, padded to whole sectors) and
//! another image as its disks gets a refusal, and the destination never opens either
//! (traced with strace: no open of those paths at all). A real source's guest with a disk
//! and a destination given none: tests/tests/virtio_cli.rs.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use ferry_tests::process::{ferry_bin, temp_path, Ferry};
use migration::protocol::{self, Hello, Message};
use migration::DeviceBackend;

const LIMIT: Duration = Duration::from_secs(60);

/// A file of `len` bytes at a fresh temporary path.
fn image(name: &str, len: usize) -> std::path::PathBuf {
    let p = temp_path(name);
    std::fs::write(&p, vec![0u8; len]).unwrap();
    std::fs::canonicalize(p).unwrap()
}

/// Plays a source that sends `hello` to `ferry receive --listen unix:.. extra` run under
/// strace; returns the destination's answer and every path it opened.
fn hostile_hello(name: &str, hello: Hello, extra: &[&str]) -> (Message, String) {
    let listen = temp_path(&format!("{name}.sock"));
    let trace = temp_path(&format!("{name}.strace"));
    let mut cmd = Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-e",
        "trace=open,openat,openat2,creat,truncate",
    ]);
    cmd.arg("-o").arg(&trace).arg(ferry_bin());
    let url = format!("unix:{}", listen.display());
    let mut args = vec!["receive", "--listen", url.as_str()];
    args.extend_from_slice(extra);
    let mut dest = Ferry::start(cmd, &args);
    dest.wait_line_err(LIMIT, |l| l.contains("waiting for a VM"));
    let mut conn = UnixStream::connect(&listen).unwrap();
    conn.set_read_timeout(Some(LIMIT)).unwrap();
    protocol::send(&mut conn, &Message::Hello(hello)).unwrap();
    let answer = protocol::recv(&mut conn).expect("an answer to the Hello");
    let _ = conn.flush();
    drop(conn);
    assert!(!dest.wait_exit(LIMIT).success(), "{}", dest.transcript());
    let opened = std::fs::read_to_string(&trace).expect("strace's log");
    (answer, opened)
}

#[test]
fn a_hostile_hello_naming_host_files_as_disks_never_opens_them() {
    ferry_tests::require_kvm();
    assert!(
        Command::new("strace").arg("-V").output().is_ok(),
        "this test needs strace (scripts/test installs it)"
    );
    // A host file the destination's user may read and write, and another tenant's image.
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let mut padded = passwd.clone();
    padded.resize(passwd.len().div_ceil(512) * 512, b'\n');
    let secret = temp_path("passwd-copy");
    std::fs::write(&secret, &padded).unwrap();
    let secret = std::fs::canonicalize(secret).unwrap();
    let tenant = image("tenant.img", 1 << 20);
    let mine = image("mine.img", 1 << 20);
    let disk = |p: &std::path::Path, size| DeviceBackend::Disk {
        path: p.to_string_lossy().into_owned(),
        size,
        read_only: false,
    };
    let hello = || {
        Hello::new(64 << 20, 1, ferry_tests::host_profile_json(), None).with_devices(vec![
            disk(&secret, padded.len() as u64),
            disk(&tenant, 1 << 20),
        ])
    };
    let never_opened = |trace: &str| {
        for p in [&secret, &tenant] {
            let p = p.to_str().unwrap();
            assert!(!trace.contains(p), "{p} was opened:\n{trace}");
        }
    };

    // Given no disk: refused, with the flag to give.
    let (answer, trace) = hostile_hello("hostile-none", hello(), &[]);
    let Message::Refuse(why) = answer else {
        panic!("expected a refusal, got {answer:?}");
    };
    assert!(why.contains("2 disk(s): give --disk"), "{why}");
    never_opened(&trace);

    // Given its own images: compared, refused, the named ones still never opened.
    let given = format!("path={}", mine.display());
    let (answer, trace) = hostile_hello(
        "hostile-given",
        hello(),
        &["--disk", &given, "--disk", &given],
    );
    let Message::Refuse(why) = answer else {
        panic!("expected a refusal, got {answer:?}");
    };
    assert!(why.contains("both sides must name the same image"), "{why}");
    assert!(
        trace.contains(mine.to_str().unwrap()),
        "strace saw this side's own image opened:\n{trace}"
    );
    never_opened(&trace);
    assert_eq!(std::fs::read(&secret).unwrap(), padded, "left as it was");
}
