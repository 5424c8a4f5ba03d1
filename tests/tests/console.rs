//! `--serial`: the counting tiny guest's console in a file, on a pty ferry names, and on a
//! Unix socket a client attaches to (and leaves, and another attaches); the guest never
//! waits for a reader.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::process::{count_line, run_tiny, temp_path, Ferry};
use ferry_tests::tiny::LONG_COUNT;

const LIMIT: Duration = Duration::from_secs(60);

/// Reads lines from `r` until `n` counting lines have come, which must go on by one.
fn counts(r: impl std::io::Read, n: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    for line in BufReader::new(r).lines() {
        let line = line.expect("read the console");
        if let Some(c) = count_line(line.trim_end_matches('\r')) {
            seen.push(c);
            if seen.len() == n {
                break;
            }
        }
    }
    assert_eq!(seen.len(), n, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    seen
}

fn stop(f: &mut Ferry) {
    let (ok, said) = f.ctl(&["stop"]);
    assert!(ok, "{said}");
    assert!(f.wait_exit(LIMIT).success(), "{}", f.transcript());
}

#[test]
fn the_console_in_a_file() {
    ferry_tests::require_kvm();
    let file = temp_path("console.txt");
    let arg = format!("file={}", file.display());
    let mut f = run_tiny(
        &LONG_COUNT,
        &["--serial", &arg],
        &temp_path("console-file.sock"),
    );
    let deadline = Instant::now() + LIMIT;
    while std::fs::read_to_string(&file).map_or(0, |t| t.lines().filter_map(count_line).count()) < 5
    {
        assert!(Instant::now() < deadline, "{}", f.transcript());
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(&mut f);
    assert!(
        f.stdout_text().lines().all(|l| count_line(l).is_none()),
        "nothing of the guest on stdout"
    );
    counts(std::fs::File::open(&file).unwrap(), 5);
}

#[test]
fn the_console_on_a_pty_ferry_names() {
    ferry_tests::require_kvm();
    let mut f = run_tiny(
        &LONG_COUNT,
        &["--serial", "pty"],
        &temp_path("console-pty.sock"),
    );
    let line = f.wait_line_err(LIMIT, |l| l.contains("serial console on /dev/pts/"));
    let pty = line.rsplit(' ').next().unwrap().trim().to_string();
    let tty = std::fs::File::open(&pty).unwrap_or_else(|e| panic!("{pty}: {e}"));
    counts(tty, 5);
    stop(&mut f);
}

fn attach(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s
}

#[test]
fn the_console_on_a_socket_one_client_after_another() {
    ferry_tests::require_kvm();
    let path = temp_path("console-serial.sock");
    let arg = format!("socket={}", path.display());
    let mut f = run_tiny(
        &LONG_COUNT,
        &["--serial", &arg],
        &temp_path("console-sock.sock"),
    );
    f.wait_line_err(LIMIT, |l| l.contains("serial console on socket"));
    let first = counts(attach(&path), 3);
    // The guest went on while nobody was attached; the next client sees it further on.
    std::thread::sleep(Duration::from_millis(300));
    let second = counts(attach(&path), 3);
    assert!(second[0] > first[2], "{first:?} then {second:?}");
    stop(&mut f);
}
