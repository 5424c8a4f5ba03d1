//! Migrations over TLS with certificates (`ferry tls generate`, `--tls-dir` on both sides),
//! between real ferry processes: mutual authentication, the destination's name checked; a
//! source of another CA, the wrong name, a plaintext source, a stray or silent connection and
//! a peer of another user are each refused while the destination goes on waiting for its
//! real source.

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::process::{count_line as count, free_tcp_port, run_tiny, temp_path, Ferry};
use ferry_tests::tiny::LONG_COUNT;

const LIMIT: Duration = Duration::from_secs(60);

/// A new CA and its certificates, from `ferry tls generate`.
fn certificates(name: &str) -> PathBuf {
    let dir = temp_path(name);
    let mut gen = Ferry::spawn(&[
        "tls",
        "generate",
        dir.to_str().unwrap(),
        "--name",
        "127.0.0.1",
        "--name",
        "localhost",
    ]);
    assert!(gen.wait_exit(LIMIT).success(), "{}", gen.transcript());
    dir
}

fn source(name: &str) -> Ferry {
    let mut f = run_tiny(&LONG_COUNT, &[], &temp_path(name));
    f.wait_line(LIMIT, |l| count(l).is_some_and(|n| n >= 20));
    f
}

fn migrate(src: &Ferry, url: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["migrate", url];
    args.extend_from_slice(extra);
    src.ctl(&args)
}

/// The destination refused one connection (naming `why`), ran nothing, and still waits.
fn refused(dst: &mut Ferry, why: &str) {
    let line = dst.wait_line_err(LIMIT, |l| l.contains("refused a connection"));
    assert!(line.contains(why), "{line}");
    assert!(!dst.stdout_text().lines().any(|l| count(l).is_some()));
    assert!(
        dst.try_status().is_none(),
        "still waiting: {}",
        dst.transcript()
    );
}

/// The source keeps its guest, and then the real one gets through to `dst`.
fn src_keeps_it_then_the_real_one_gets_through(
    src: Ferry,
    dst: &mut Ferry,
    url: &str,
    certs: &Path,
) {
    let (ok, st) = src.ctl(&["status"]);
    assert!(ok && st.contains("running"), "{st}");
    drop(src);
    let port = url.rsplit(':').next().unwrap();
    let real = source(&format!("tls-real-{port}.sock"));
    let (ok, out) = migrate(&real, url, &["--tls-dir", certs.to_str().unwrap()]);
    assert!(ok && out.contains("migration completed"), "{out}");
    dst.wait_line(LIMIT, |l| count(l).is_some());
}

/// Whether `cert` is still valid `days` from now (`openssl x509 -checkend`).
fn valid_in(cert: &Path, days: u64) -> bool {
    let out = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-checkend",
            &(days * 86400).to_string(),
            "-in",
        ])
        .arg(cert)
        .output()
        .expect("openssl");
    out.status.success()
}

#[test]
fn generated_certificates_keep_their_keys_private_expire_and_the_ca_key_stays_apart() {
    let dir = certificates("tls-gen");
    for (f, mode) in [
        ("ca-cert.pem", 0o644),
        ("server-cert.pem", 0o644),
        ("server-key.pem", 0o600),
        ("client-cert.pem", 0o644),
        ("client-key.pem", 0o600),
    ] {
        let m = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m & 0o077, mode & 0o077, "{f}: {m:o}");
    }
    // The CA key, which makes certificates, is not in the directory both hosts get.
    assert!(!dir.join("ca-key.pem").exists());
    let ca_key = PathBuf::from(format!("{}.ca-key.pem", dir.display()));
    let m = std::fs::metadata(&ca_key).unwrap().permissions().mode() & 0o777;
    assert_eq!(m, 0o600, "{}", ca_key.display());
    // A year by default; --days otherwise.
    for f in ["ca-cert.pem", "server-cert.pem", "client-cert.pem"] {
        assert!(valid_in(&dir.join(f), 364), "{f}");
        assert!(!valid_in(&dir.join(f), 366), "{f} expires within a year");
    }
    let short = temp_path("tls-gen-2d");
    let mut gen = Ferry::spawn(&["tls", "generate", short.to_str().unwrap(), "--days", "2"]);
    assert!(gen.wait_exit(LIMIT).success(), "{}", gen.transcript());
    assert!(valid_in(&short.join("client-cert.pem"), 1));
    assert!(!valid_in(&short.join("client-cert.pem"), 3));
    // Never over existing files.
    let mut again = Ferry::spawn(&["tls", "generate", dir.to_str().unwrap()]);
    assert!(!again.wait_exit(LIMIT).success());
    assert!(again.stderr_lines().join("\n").contains("exists already"));
}

#[test]
fn tls_allow_takes_only_a_source_certificate_of_that_name() {
    ferry_tests::require_kvm();
    let certs = certificates("tls-allow");
    let dir = certs.to_str().unwrap();
    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = Ferry::receive(&url, &["--tls-dir", dir, "--tls-allow", "backup-host"]);
    let src = source("tls-allow.sock");
    let (ok, out) = migrate(&src, &url, &["--tls-dir", dir]);
    assert!(!ok, "{out}");
    refused(&mut dst, "names none of --tls-allow backup-host");
    drop(dst);
    // The name `ferry tls generate` gives the source by default.
    let mut dst = Ferry::receive(&url, &["--tls-dir", dir, "--tls-allow", "ferry-source"]);
    let (ok, out) = migrate(&src, &url, &["--tls-dir", dir]);
    assert!(ok && out.contains("migration completed"), "{out}");
    dst.wait_line(LIMIT, |l| count(l).is_some());
}

#[test]
fn certificates_on_both_sides_carry_the_migration() {
    ferry_tests::require_kvm();
    let certs = certificates("tls-ok");
    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = Ferry::receive(&url, &["--tls-dir", certs.to_str().unwrap()]);
    let src = source("tls-ok.sock");
    let (ok, out) = migrate(&src, &url, &["--tls-dir", certs.to_str().unwrap()]);
    assert!(ok && out.contains("migration completed"), "{out}");
    dst.wait_line(LIMIT, |l| count(l).is_some());
}

#[test]
fn a_source_of_another_ca_or_a_wrong_name_or_no_tls_is_refused() {
    ferry_tests::require_kvm();
    let certs = certificates("tls-ca");
    let other = certificates("tls-other-ca");
    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = Ferry::receive(&url, &["--tls-dir", certs.to_str().unwrap()]);
    let src = source("tls-ca.sock");

    // Another CA: the source does not take the destination's certificate.
    let (ok, out) = migrate(&src, &url, &["--tls-dir", other.to_str().unwrap()]);
    assert!(!ok && out.contains("certificate"), "{out}");
    refused(&mut dst, "TLS");
    // Its own CA, but the destination is not who the source asked for.
    let (ok, out) = migrate(
        &src,
        &url,
        &[
            "--tls-dir",
            certs.to_str().unwrap(),
            "--tls-name",
            "db.example",
        ],
    );
    assert!(!ok && out.contains("certificate"), "{out}");
    // No TLS at all: the source is told the destination speaks it.
    let (ok, out) = migrate(&src, &url, &[]);
    assert!(!ok && out.contains("speaks TLS"), "{out}");
    src_keeps_it_then_the_real_one_gets_through(src, &mut dst, &url, &certs);
}

#[test]
fn a_stray_or_silent_connection_does_not_end_the_listener() {
    ferry_tests::require_kvm();
    let certs = certificates("tls-stray");
    let port = free_tcp_port();
    let url = format!("tcp:127.0.0.1:{port}");
    let mut dst = Ferry::receive(
        &url,
        &["--tls-dir", certs.to_str().unwrap(), "--peer-timeout", "2s"],
    );
    let mut stray = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stray.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    refused(&mut dst, "TLS");
    // Connected, then silent: dropped at the handshake deadline (the peer timeout here).
    let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let line = dst.wait_line_err(LIMIT, |l| l.contains("took too long"));
    assert!(line.contains("refused a connection"), "{line}");
    drop((stray, silent));
    let src = source("tls-stray.sock");
    src_keeps_it_then_the_real_one_gets_through(src, &mut dst, &url, &certs);
}

#[test]
fn without_a_key_a_unix_destination_takes_only_its_own_user() {
    ferry_tests::require_kvm();
    let path = temp_path("tls-peercred.sock");
    let url = format!("unix:{}", path.display());
    let mut dst = Ferry::receive(&url, &[]);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is private");
    // Opened up by hand: another user can connect now, and is refused by SO_PEERCRED.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(
        path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(1)",
            path.to_str().unwrap(),
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{out:?}");
    let line = dst.wait_line_err(LIMIT, |l| l.contains("refused a peer of uid"));
    assert!(line.contains("uid 65534"), "{line}");
    // The same user's source gets through.
    let src = source("tls-peercred-src.sock");
    let (ok, out) = migrate(&src, &url, &[]);
    assert!(ok && out.contains("migration completed"), "{out}");
    dst.wait_line(LIMIT, |l| count(l).is_some());
}
