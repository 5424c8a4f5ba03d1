//! A source never sends a guest unencrypted to another host or another user unless told
//! `--insecure` in so many words: without a key or certificates, a migration to an address
//! off loopback (one in a test namespace) is refused before it connects, and one to a Unix
//! socket another user listens on is refused once SO_PEERCRED names that user; the guest
//! runs on at the source. With `--insecure` the source connects (one warning line first).

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use ferry_tests::netns::Netns;
use ferry_tests::process::{count_line, ferry_bin, temp_path, Ferry};
use ferry_tests::tiny::{wait_for, LONG_COUNT};

const LIMIT: Duration = Duration::from_secs(60);

/// A counting tiny guest started by `cmd` (ferry, or ferry inside a namespace).
fn counting_source(cmd: Command, name: &str) -> (Ferry, std::path::PathBuf) {
    let img = temp_path(&format!("{name}.bin"));
    std::fs::write(&img, LONG_COUNT.bytes).unwrap();
    let sock = temp_path(&format!("{name}.sock"));
    let mut f = Ferry::start(
        cmd,
        &[
            "run",
            "--image",
            img.to_str().unwrap(),
            "--memory",
            "64M",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    wait_for("the control socket", LIMIT, || sock.exists());
    f.wait_line(LIMIT, |l| count_line(l).is_some_and(|n| n >= 3));
    (f, sock)
}

#[test]
fn plaintext_to_an_address_off_this_host_needs_insecure() {
    ferry_tests::require_kvm();
    let ns = Netns::new("plain");
    ns.bridge("fr-plain0", "10.79.0.1/24");
    let port = ferry_tests::process::free_tcp_port();
    let url = format!("tcp:10.79.0.1:{port}");
    let key = temp_path("plain.key");
    let _ = std::fs::remove_file(&key);
    let made = Command::new(ferry_bin())
        .args(["key", "generate", key.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(made.success());
    // A keyed destination in the namespace (it may listen off loopback).
    let mut dest = Ferry::start(
        ns.command(ferry_bin()),
        &[
            "receive",
            "--listen",
            &url,
            "--key-file",
            key.to_str().unwrap(),
        ],
    );
    dest.wait_line_err(LIMIT, |l| l.contains("waiting for a VM"));
    let (mut src, _) = counting_source(ns.command(ferry_bin()), "plain-src");

    let (ok, out) = src.ctl(&["migrate", &url]);
    assert!(
        !ok && out.contains("refusing to send the guest unencrypted to 10.79.0.1")
            && out.contains("--insecure"),
        "{out}"
    );
    eprintln!("refused: {}", out.trim());
    src.still_counting(LIMIT, 3);
    dest.drain();
    assert!(
        !dest.transcript().contains("refused a connection"),
        "the source never connected: {}",
        dest.transcript()
    );

    // Told --insecure: it connects in plaintext (the keyed destination answers that it
    // speaks TLS only), after one warning line; the guest runs on.
    let (ok, out) = src.ctl(&["migrate", &url, "--insecure", "--peer-timeout", "5s"]);
    assert!(!ok, "{out}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{out}");
    assert!(warnings[0].contains("unencrypted"), "{out}");
    assert!(out.contains("the peer speaks TLS"), "{out}");
    dest.wait_line_err(LIMIT, |l| l.contains("refused a connection"));
    src.still_counting(LIMIT, 3);
    src.stop();
}

#[test]
fn plaintext_to_another_users_unix_socket_needs_insecure() {
    ferry_tests::require_kvm();
    let dir = temp_path("plain-other");
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for d in [&dir, dir.parent().unwrap()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let path = dir.join("theirs.sock");
    // Another user listens there and takes one connection.
    let theirs = std::process::Command::new("python3")
        .args([
            "-c",
            "import os,socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777); s.listen(1); print('ready', flush=True); c,_=s.accept(); print('connected', flush=True)",
            path.to_str().unwrap(),
        ])
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    wait_for("the other user's socket", LIMIT, || path.exists());
    let (mut src, _) = counting_source(Command::new(ferry_bin()), "plain-unix-src");
    let url = format!("unix:{}", path.display());
    let (ok, out) = src.ctl(&["migrate", &url]);
    assert!(
        !ok && out.contains("refusing to send the guest unencrypted") && out.contains("uid 65534"),
        "{out}"
    );
    src.still_counting(LIMIT, 3);
    let (ok, out) = src.ctl(&["migrate", &url, "--insecure", "--peer-timeout", "5s"]);
    assert!(!ok && out.contains("warning"), "{out}");
    let got = theirs.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&got.stdout).contains("connected"),
        "with --insecure the source connects"
    );
    src.still_counting(LIMIT, 3);
    src.stop();
}
