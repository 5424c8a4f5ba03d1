//! A destination's listener cannot be held shut, nor a migration stretched past its
//! deadline: with 8 idle connections sitting on a keyed listener, a real source still gets
//! through (handshakes run several at once, the oldest idle one dropped for a newcomer);
//! a source that trickles a page frame one byte at a time is cut at `--deadline` (with a
//! peer timeout far longer), and the destination says so.

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ferry_tests::process::{count_line, free_tcp_port, run_tiny, temp_path, Ferry};
use ferry_tests::tiny::LONG_COUNT;
use migration::pages::BatchWriter;
use migration::protocol::{self, Hello, Message};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn eight_idle_connections_do_not_stop_a_keyed_migration() {
    ferry_tests::require_kvm();
    let key = temp_path("door.key");
    let _ = std::fs::remove_file(&key);
    let mut gen = Ferry::spawn(&["key", "generate", key.to_str().unwrap()]);
    assert!(gen.wait_exit(LIMIT).success(), "{}", gen.transcript());
    let key = key.to_str().unwrap();
    let port = free_tcp_port();
    let url = format!("tcp:127.0.0.1:{port}");
    let mut dst = Ferry::receive(&url, &["--key-file", key]);
    let idle: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mut src = run_tiny(&LONG_COUNT, &[], &temp_path("door-src.sock"));
    src.wait_line(LIMIT, |l| count_line(l).is_some_and(|n| n >= 10));
    let (ok, out) = src.ctl(&["migrate", &url, "--key-file", key]);
    assert!(
        ok && out.contains("migration completed"),
        "{out}\n{}",
        dst.transcript()
    );
    dst.wait_line(LIMIT, |l| count_line(l).is_some());
    let dropped = dst
        .stderr_lines()
        .iter()
        .filter(|l| l.contains("handshakes were under way, the oldest goes"))
        .count();
    assert_eq!(dropped, 1, "{}", dst.transcript());
    assert!(
        dst.stderr_lines()
            .iter()
            .any(|l| l.contains("dropped the connection from 127.0.0.1:")),
        "the dropped peer is named: {}",
        dst.transcript()
    );
    drop(idle);
}

#[test]
fn a_trickling_source_is_cut_at_the_deadline() {
    ferry_tests::require_kvm();
    let path = temp_path("door-trickle.sock");
    let url = format!("unix:{}", path.display());
    let mut dst = Ferry::receive(&url, &["--deadline", "3s", "--peer-timeout", "10m"]);
    let mut s = UnixStream::connect(&path).unwrap();
    let hello = Hello::new(64 << 20, 1, ferry_tests::host_profile_json(), None);
    protocol::send(&mut s, &Message::Hello(hello)).unwrap();
    assert_eq!(protocol::recv(&mut s).unwrap(), Message::Accept);
    // One page frame, a byte every 100 ms: each read gets something long before the peer
    // timeout, and the whole would take minutes.
    let mut w = BatchWriter::new();
    w.page_slot().fill(0x5a);
    w.commit_page(0, false);
    let frame = w.finish().to_vec();
    let trickle = std::thread::spawn(move || {
        for b in frame {
            if s.write_all(&[b]).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    let st = dst.wait_exit(LIMIT);
    assert!(!st.success(), "{}", dst.transcript());
    let text = dst.stderr_lines().join("\n");
    assert!(
        text.contains("the migration's deadline (--deadline) passed"),
        "{text}"
    );
    assert!(
        trickle.join().unwrap(),
        "the destination hung up on the trickle"
    );
}
