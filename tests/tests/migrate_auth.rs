//! Authentication between migrating ferry processes (migration::auth inside TLS): a
//! destination with `--key-file` takes only a source that proves the same key, and proves it
//! back; no key, a wrong key and a replayed session are refused, nothing is restored, and
//! the destination goes on waiting for the real source; without a key a destination listens
//! on Unix sockets and loopback only.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_tests::process::{count_line as count, free_tcp_port, run_tiny, temp_path, Ferry};
use ferry_tests::tiny::LONG_COUNT;

const LIMIT: Duration = Duration::from_secs(60);

/// A key file private to its owner (ferry refuses any other).
fn key_file(name: &str, bytes: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = temp_path(name);
    std::fs::write(&p, bytes).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn source(sock: &Path) -> Ferry {
    let mut f = run_tiny(&LONG_COUNT, &[], sock);
    f.wait_line(LIMIT, |l| count(l).is_some_and(|n| n >= 20));
    f
}

fn destination(url: &str, key: Option<&Path>) -> Ferry {
    match key {
        Some(k) => Ferry::receive(url, &["--key-file", k.to_str().unwrap()]),
        None => Ferry::receive(url, &[]),
    }
}

/// The source still runs its guest: its count goes on.
fn still_running(src: &mut Ferry) {
    let (ok, st) = src.ctl(&["status"]);
    assert!(ok && st.contains("running"), "{st}");
    let last = src.stdout_text().lines().filter_map(count).max().unwrap();
    src.wait_line(LIMIT, |l| count(l).is_some_and(|n| n > last + 5));
    assert!(src.ctl(&["stop"]).0);
    assert!(src.wait_exit(LIMIT).success());
}

/// A destination that refused a connection: it names why in a warning, never ran a guest,
/// and still waits for its source.
fn refused(dst: &mut Ferry, why: &str) {
    let line = dst.wait_line_err(LIMIT, |l| l.contains("refused a connection"));
    assert!(line.contains(why), "{line}");
    assert!(
        !dst.stdout_text().lines().any(|l| count(l).is_some()),
        "nothing was restored"
    );
    assert!(
        dst.try_status().is_none(),
        "still waiting: {}",
        dst.transcript()
    );
}

/// The real source, after a refused one, still gets through: the listener went on waiting.
fn then_the_real_source_gets_through(dst: &mut Ferry, url: &str, key: &Path) {
    let port = url.rsplit(':').next().unwrap();
    let sock = temp_path(&format!("auth-after-{port}.sock"));
    let mut src = source(&sock);
    let (ok, out) = src.ctl(&["migrate", url, "--key-file", key.to_str().unwrap()]);
    assert!(ok && out.contains("migration completed"), "{out}");
    assert!(src.wait_exit(LIMIT).success());
    dst.wait_line(LIMIT, |l| count(l).is_some());
}

#[test]
fn a_shared_key_lets_the_migration_through() {
    ferry_tests::require_kvm();
    let key = key_file("auth-ok.key", b"a shared key of 32 bytes, random");
    let s_sock = temp_path("auth-ok-src.sock");
    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut src = source(&s_sock);
    let mut dst = destination(&url, Some(&key));
    let (ok, out) = src.ctl(&["migrate", &url, "--key-file", key.to_str().unwrap()]);
    assert!(ok && out.contains("migration completed"), "{out}");
    assert!(src.wait_exit(LIMIT).success());
    // The guest runs on at the destination (dropping it ends the process).
    dst.wait_line(LIMIT, |l| count(l).is_some());
}

#[test]
fn a_source_without_the_key_is_refused_and_nothing_is_restored() {
    ferry_tests::require_kvm();
    let key = key_file("auth-nokey.key", b"a shared key of 32 bytes, random");
    let s_sock = temp_path("auth-nokey-src.sock");
    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut src = source(&s_sock);
    let mut dst = destination(&url, Some(&key));
    let (ok, out) = src.ctl(&["migrate", &url]);
    assert!(!ok, "{out}");
    refused(&mut dst, "TLS");
    still_running(&mut src);
    then_the_real_source_gets_through(&mut dst, &url, &key);
}

#[test]
fn a_wrong_key_is_refused_on_both_sides() {
    ferry_tests::require_kvm();
    let key = key_file("auth-right.key", b"a shared key of 32 bytes, random");
    let wrong = key_file("auth-wrong.key", b"another key, also long enough: 32+");
    let s_sock = temp_path("auth-wrong-src.sock");
    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut src = source(&s_sock);
    let mut dst = destination(&url, Some(&key));
    let (ok, out) = src.ctl(&["migrate", &url, "--key-file", wrong.to_str().unwrap()]);
    assert!(
        !ok && out.contains("the destination could not prove the shared key"),
        "{out}"
    );
    refused(&mut dst, "authenticating the source (phase: handshake)");
    still_running(&mut src);
    then_the_real_source_gets_through(&mut dst, &url, &key);
}

#[test]
fn a_replayed_handshake_is_refused() {
    ferry_tests::require_kvm();
    let key = key_file("auth-replay.key", b"a shared key of 32 bytes, random");
    let s_sock = temp_path("auth-replay-src.sock");
    let d_port = free_tcp_port();
    let d_url = format!("tcp:127.0.0.1:{d_port}");
    let mut src = source(&s_sock);
    let mut dst = destination(&d_url, Some(&key));
    // A recording relay between the source and the destination: everything the source
    // sends (its challenge, its proof, the Hello, the pages) is kept.
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_url = format!("tcp:{}", relay.local_addr().unwrap());
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let rec = recorded.clone();
    let relay_thread = std::thread::spawn(move || {
        let (from_src, _) = relay.accept().unwrap();
        let to_dst = TcpStream::connect(("127.0.0.1", d_port)).unwrap();
        let (mut a, mut b) = (from_src.try_clone().unwrap(), to_dst.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut b, &mut a);
        });
        let (mut r, mut w) = (from_src, to_dst);
        let mut buf = [0u8; 65536];
        while let Ok(n @ 1..) = r.read(&mut buf) {
            rec.lock().unwrap().extend_from_slice(&buf[..n]);
            if w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = w.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
    });
    let (ok, out) = src.ctl(&["migrate", &relay_url, "--key-file", key.to_str().unwrap()]);
    assert!(ok, "the recorded migration itself works: {out}");
    assert!(src.wait_exit(LIMIT).success());
    dst.wait_line(LIMIT, |l| count(l).is_some());
    drop(dst);
    relay_thread.join().unwrap();
    let bytes = recorded.lock().unwrap().clone();
    assert!(bytes.len() > 4096, "the session was recorded");

    // Encrypted: none of the protocol's tags (nor the Hello's CPU profile) is on the wire.
    assert_eq!(bytes[0], 0x16, "a TLS handshake record first");
    for plain in [&b"HELO"[..], b"PAGS", b"VMST", b"CMIT", b"x86-64"] {
        assert!(
            !bytes.windows(plain.len()).any(|w| w == plain),
            "{} in the clear",
            String::from_utf8_lossy(plain)
        );
    }

    // The same bytes to a new destination with the same key: its TLS session is new, so the
    // recorded one fails and nothing is restored.
    let port2 = free_tcp_port();
    let url2 = format!("tcp:127.0.0.1:{port2}");
    let mut dst2 = destination(&url2, Some(&key));
    let mut s = TcpStream::connect(("127.0.0.1", port2)).unwrap();
    let _ = s.write_all(&bytes);
    refused(&mut dst2, "TLS");
    drop(s);
    then_the_real_source_gets_through(&mut dst2, &url2, &key);
}

#[test]
fn an_unauthenticated_listener_on_a_network_address_is_refused_at_start() {
    ferry_tests::require_kvm();
    let url = format!("tcp:0.0.0.0:{}", free_tcp_port());
    let mut dst = Ferry::spawn(&["receive", "--listen", &url]);
    assert!(!dst.wait_exit(LIMIT).success());
    let err = dst.stderr_lines();
    assert_eq!(err.len(), 1, "one line: {err:?}");
    assert!(
        err[0].contains("without --key-file or --tls-dir") && err[0].contains("0.0.0.0"),
        "{}",
        err[0]
    );
}
