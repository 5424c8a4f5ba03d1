//! The fault matrix: a live migration of the Linux test guest between two ferry processes,
//! stopped at each phase by a relay on the wire (ferry_tests::relay), and there hit by one
//! fault: the destination killed (-9), the source killed (-9), the connection closed, or the
//! peer stalled past the peer timeout (3 s on both sides here). One test per row.
//!
//! What every row checks:
//! - before Commit, the guest runs on at the source (heartbeats go on there, none at the
//!   destination, which exits non-zero), unless the source itself was killed: then the
//!   destination never starts it either (never on both sides);
//! - after Commit, the destination holds it (heartbeats there); the source, which did not
//!   hear Running, keeps its copy paused and says so, and never resumes it by itself;
//! - no process hangs: each one ends or answers within a limit far above the peer timeout;
//! - every error message names the phase it happened in.
//!
//! The guest is booted once per test binary and snapshotted; every row restores that
//! snapshot in a new source process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use ferry_tests::process::{ferry_bin, free_tcp_port, heartbeat, run_guest, temp_path, Ferry};
use ferry_tests::relay::{At, Relay};

const BOOT_LIMIT: Duration = Duration::from_secs(600);
/// Guards every wait against a hang; far above the peer timeout.
const LIMIT: Duration = Duration::from_secs(60);
const PEER_TIMEOUT: &str = "3s";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillDestination,
    KillSource,
    Close,
    Stall,
}

/// The test guest (2 vCPUs, dirtying memory, heartbeat every 100 ms), booted once, running,
/// saved to a snapshot.
fn snapshot() -> &'static Path {
    static SNAP: OnceLock<PathBuf> = OnceLock::new();
    SNAP.get_or_init(|| {
        ferry_tests::require_kvm();
        let sock = temp_path("boot.sock");
        let mut g = run_guest(
            None,
            2,
            "workload=dirty:4 hb_ms=100",
            &["--cpu", "harpertown-shanghai"],
            &sock,
        );
        g.wait_line(BOOT_LIMIT, |l| l.contains("GUEST-READY"));
        g.wait_line(LIMIT, |l| l.contains("] HB ") && l.contains("pass=1"));
        let snap = temp_path("guest.snap");
        let (ok, out) = g.ctl(&["snapshot", snap.to_str().unwrap(), "--stop"]);
        assert!(ok, "snapshot: {out}");
        assert!(g.wait_exit(LIMIT).success(), "{}", g.transcript());
        snap
    })
}

fn max_heartbeat(f: &Ferry) -> Option<u64> {
    f.stdout_text().lines().filter_map(heartbeat).max()
}

/// Waits for three heartbeats past the last one `f` printed so far.
fn three_more_heartbeats(f: &mut Ferry, who: &str) {
    f.drain();
    let from = max_heartbeat(f).unwrap_or(0);
    let line = f.wait_line(LIMIT, |l| heartbeat(l).is_some_and(|n| n >= from + 3));
    eprintln!("{who} heartbeats on: {line}");
}

/// `ferry ctl status`; a destination binds its control socket only once it holds the
/// guest, just after it has answered Running, so the socket is waited for first.
fn status(f: &Ferry) -> String {
    let sock = f.api_socket.clone().expect("a control socket");
    ferry_tests::tiny::wait_for("the control socket", LIMIT, || sock.exists());
    let (ok, out) = f.ctl(&["status"]);
    assert!(ok, "status: {out}");
    out
}

/// A row's two processes and the source's migration to the destination through a relay
/// frozen at `at`, once the fault is injected: what `ferry ctl migrate` printed.
struct Row {
    tag: String,
    src: Ferry,
    dst: Ferry,
    ctl_msg: String,
}

/// Restores the guest in a source, starts a destination behind a relay frozen at `at`,
/// migrates, injects `fault` there, and waits for the migration to fail.
fn start_row(at: At, fault: Fault) -> Row {
    let snap = snapshot();
    let tag = format!("{at:?}-{fault:?}")
        .to_lowercase()
        .replace(['(', ')'], "");
    let src_sock = temp_path(&format!("{tag}-src.sock"));
    let dst_sock = temp_path(&format!("{tag}-dst.sock"));
    let mut src = Ferry::spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--api-socket",
        src_sock.to_str().unwrap(),
    ]);
    src.wait_line(LIMIT, |l| heartbeat(l).is_some());
    let port = free_tcp_port();
    let mut dst = Ferry::receive(
        &format!("tcp:127.0.0.1:{port}"),
        &[
            "--peer-timeout",
            PEER_TIMEOUT,
            "--api-socket",
            dst_sock.to_str().unwrap(),
        ],
    );
    let relay = Relay::start(at, port);
    let mut ctl = std::process::Command::new(ferry_bin());
    ctl.arg("ctl").arg("--api-socket").arg(&src_sock).args([
        "migrate",
        &relay.url(),
        "--peer-timeout",
        PEER_TIMEOUT,
    ]);
    let (tx, migrated) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(ctl.output().expect("run ferry ctl migrate")));
    relay.wait_frozen(LIMIT);
    match fault {
        Fault::KillDestination => {
            dst.kill9();
            relay.close();
        }
        Fault::KillSource => {
            src.kill9();
            relay.close();
        }
        Fault::Close => relay.close(),
        // Nothing moves; both sides give up after the peer timeout.
        Fault::Stall => {}
    }
    let out = migrated
        .recv_timeout(LIMIT)
        .expect("ferry ctl migrate hung");
    let ctl_msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{tag}: ctl migrate: {}", ctl_msg.trim());
    assert!(
        !out.status.success(),
        "the migration cannot succeed: {ctl_msg}"
    );
    Row {
        tag,
        src,
        dst,
        ctl_msg,
    }
}

/// The phases the source and the destination name for a fault at `at`, as each sees it.
fn phases(at: At) -> (&'static str, Option<&'static str>) {
    match at {
        At::Hello => ("phase: handshake", Some("phase: handshake")),
        At::Pages(_) => ("phase: memory round 0", Some("phase: memory round 0")),
        At::State => (
            "phase: after the pause, before Restored",
            Some("phase: after the pause, before Restored"),
        ),
        // Restored never reached the source.
        At::Restored => (
            "phase: after the pause, before Restored",
            Some("phase: after Restored, before Commit"),
        ),
        At::Running => ("phase: after Commit", None),
        At::PageRequest(_) => ("phase: postcopy", Some("phase: postcopy")),
    }
}

/// One row: migrate through a relay frozen at `at`, inject `fault`, check the outcome.
fn row(at: At, fault: Fault) {
    ferry_tests::require_kvm();
    let r = start_row(at, fault);
    if at == At::Running {
        after_commit(r, at, fault);
    } else {
        before_commit(r, at, fault);
    }
}

/// A fault before Commit: the destination never runs the guest and ends, saying where; the
/// source keeps running it (unless it was the one killed).
fn before_commit(mut r: Row, at: At, fault: Fault) {
    let (src_phase, dst_phase) = phases(at);
    let (tag, dst) = (&r.tag, &mut r.dst);
    if fault != Fault::KillDestination {
        let st = dst.wait_exit(LIMIT);
        assert!(
            !st.success(),
            "the destination must fail:\n{}",
            dst.transcript()
        );
        let err = dst.stderr_lines().join("\n");
        eprintln!("{tag}: destination: {}", err.lines().last().unwrap_or(""));
        let want = dst_phase.unwrap();
        assert!(
            err.contains(want),
            "the destination's error must name {want:?}:\n{err}"
        );
    }
    assert!(
        !dst.stdout_text().contains(" HB "),
        "the guest must never run at the destination:\n{}",
        dst.transcript()
    );
    if fault == Fault::KillSource {
        // The only running copy was killed with its process; nothing runs it now.
        return;
    }
    let ctl_msg = &r.ctl_msg;
    assert!(
        ctl_msg.contains(src_phase) && ctl_msg.contains("runs here as before"),
        "the source's error must name {src_phase:?} and keep the guest: {ctl_msg}"
    );
    assert!(status(&r.src).contains("running"));
    three_more_heartbeats(&mut r.src, "source");
    assert!(r.src.ctl(&["stop"]).0);
    assert!(r.src.wait_exit(LIMIT).success());
}

/// A fault after Commit: the guest is the destination's; the source, which did not hear
/// Running, keeps its copy paused, says so, and does not resume it by itself.
fn after_commit(mut r: Row, at: At, fault: Fault) {
    let (src_phase, _) = phases(at);
    if fault != Fault::KillDestination {
        // (A killed destination held the guest: the guest died with it.)
        assert!(status(&r.dst).contains("running"), "{}", r.dst.transcript());
        three_more_heartbeats(&mut r.dst, "destination");
    }
    if fault == Fault::KillSource {
        return;
    }
    let ctl_msg = &r.ctl_msg;
    assert!(
        ctl_msg.contains(src_phase) && ctl_msg.contains("stays paused here"),
        "the source must say the guest stays paused after Commit: {ctl_msg}"
    );
    r.src.drain();
    let last_here = max_heartbeat(&r.src);
    assert!(status(&r.src).contains("paused"));
    if fault != Fault::KillDestination {
        // The destination goes on meanwhile; the source stays silent.
        three_more_heartbeats(&mut r.dst, "destination");
    } else {
        std::thread::sleep(Duration::from_millis(500));
    }
    r.src.drain();
    assert_eq!(
        max_heartbeat(&r.src),
        last_here,
        "the source must not run the guest after Commit"
    );
    assert!(r.src.ctl(&["stop"]).0);
    assert!(r.src.wait_exit(LIMIT).success());
    if fault != Fault::KillDestination {
        assert!(r.dst.ctl(&["stop"]).0);
        assert!(r.dst.wait_exit(LIMIT).success());
    }
}

macro_rules! rows {
    ($($name:ident: $at:expr, $fault:expr;)*) => {
        $(
            #[test]
            fn $name() {
                row($at, $fault);
            }
        )*
    };
}

rows! {
    handshake_kill_destination: At::Hello, Fault::KillDestination;
    handshake_kill_source: At::Hello, Fault::KillSource;
    handshake_close_connection: At::Hello, Fault::Close;
    handshake_stall: At::Hello, Fault::Stall;
    memory_rounds_kill_destination: At::Pages(3), Fault::KillDestination;
    memory_rounds_kill_source: At::Pages(3), Fault::KillSource;
    memory_rounds_close_connection: At::Pages(3), Fault::Close;
    memory_rounds_stall: At::Pages(3), Fault::Stall;
    paused_before_restored_kill_destination: At::State, Fault::KillDestination;
    paused_before_restored_kill_source: At::State, Fault::KillSource;
    paused_before_restored_close_connection: At::State, Fault::Close;
    paused_before_restored_stall: At::State, Fault::Stall;
    restored_before_commit_kill_destination: At::Restored, Fault::KillDestination;
    restored_before_commit_kill_source: At::Restored, Fault::KillSource;
    restored_before_commit_close_connection: At::Restored, Fault::Close;
    restored_before_commit_stall: At::Restored, Fault::Stall;
    after_commit_kill_destination: At::Running, Fault::KillDestination;
    after_commit_kill_source: At::Running, Fault::KillSource;
    after_commit_close_connection: At::Running, Fault::Close;
    after_commit_stall: At::Running, Fault::Stall;
}
