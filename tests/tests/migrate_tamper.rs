//! An attacker on the path of an encrypted migration (ferry_tests::tls_relay) flips, drops,
//! reorders or replays one TLS record, at every phase: the handshake, precopy, the end of
//! the stream (Commit), and each record the destination sends back (Accept, Synced,
//! Restored, Running). Whatever it does: the guest never runs on both sides, a migration
//! never reports success unless the destination runs the guest, and a failure before Commit
//! leaves the guest running at the source.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::process::{count_line as count, free_tcp_port, run_tiny, temp_path, Ferry};
use ferry_tests::tiny::LONG_COUNT;
use ferry_tests::tls_relay::{Dir, Tamper, Target, TlsRelay};

const LIMIT: Duration = Duration::from_secs(60);
/// How long a side waits for a peer gone silent (a dropped record leaves one waiting).
const PEER_TIMEOUT: &str = "3s";
/// The same for the clean run that counts the records: nothing is dropped there, so a
/// longer wait costs nothing, and two keyed migrations on a busy 2-core host can go quiet
/// for more than 3 s.
const CLEAN_PEER_TIMEOUT: &str = "30s";

fn key_file() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = temp_path("tamper.key");
    std::fs::write(&p, b"the key of the tampering tests, 32").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Where the guest ended up.
#[derive(Debug)]
struct Outcome {
    /// `ferry ctl migrate` said it completed.
    ok: bool,
    answer: String,
    src_running: bool,
    src_paused: bool,
    dst_runs: bool,
    /// Records forwarded: (to the destination, to the source).
    counts: (usize, usize),
}

fn migrate_through(name: &str, key: &Path, target: Option<Target>) -> Outcome {
    let peer_timeout = match target {
        Some(_) => PEER_TIMEOUT,
        None => CLEAN_PEER_TIMEOUT,
    };
    let port = free_tcp_port();
    let k = key.to_str().unwrap();
    let mut dst = Ferry::receive(
        &format!("tcp:127.0.0.1:{port}"),
        &["--key-file", k, "--peer-timeout", peer_timeout],
    );
    let mut src = run_tiny(&LONG_COUNT, &[], &temp_path(&format!("{name}.sock")));
    src.wait_line(LIMIT, |l| count(l).is_some_and(|n| n >= 20));
    let relay = TlsRelay::start(port, target);
    let (ok, answer) = src.ctl(&[
        "migrate",
        &relay.url(),
        "--key-file",
        k,
        "--peer-timeout",
        peer_timeout,
    ]);
    let dst_runs = dst
        .line_within(Duration::from_secs(4), |l| count(l).is_some())
        .is_some();
    let (src_running, src_paused) = if ok {
        assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
        (false, false)
    } else {
        let (alive, st) = src.ctl(&["status"]);
        assert!(alive, "the source answers after a failed migration: {st}");
        (st.contains("running"), st.contains("paused"))
    };
    Outcome {
        ok,
        answer,
        src_running,
        src_paused,
        dst_runs,
        counts: relay.counts(),
    }
}

/// The rules every outcome keeps.
fn check(what: &str, o: &Outcome) {
    assert!(
        !(o.src_running && o.dst_runs),
        "{what}: the guest runs twice: {o:?}"
    );
    if o.ok {
        assert!(
            o.dst_runs,
            "{what}: a success the destination does not run: {o:?}"
        );
        return;
    }
    assert!(!o.answer.trim().is_empty(), "{what}: a failure says why");
    if o.answer.contains("stays paused") {
        // After Commit without a word back: paused here, as it may run there.
        assert!(o.src_paused, "{what}: {o:?}");
    } else {
        assert!(
            o.src_running,
            "{what}: before Commit the source keeps it: {o:?}"
        );
        assert!(!o.dst_runs, "{what}: {o:?}");
    }
}

/// A clean migration through the relay: how many records go each way.
fn clean(name: &str, key: &Path) -> (usize, usize) {
    let o = migrate_through(name, key, None);
    assert!(o.ok && o.dst_runs, "{o:?}");
    o.counts
}

fn case(name: &str, key: &Path, dir: Dir, index: usize, tamper: Tamper) -> Outcome {
    let o = migrate_through(name, key, Some(Target { dir, index, tamper }));
    let what = format!("{tamper:?} record {index} {dir:?}");
    eprintln!(
        "{what}: ok {}, source {}, destination {}: {}",
        o.ok,
        if o.src_running {
            "running"
        } else if o.src_paused {
            "paused"
        } else {
            "gone"
        },
        if o.dst_runs {
            "runs the guest"
        } else {
            "does not"
        },
        o.answer.lines().next().unwrap_or("")
    );
    check(&what, &o);
    // A shorter run than the clean one may not reach the record: nothing was tampered.
    let reached = match dir {
        Dir::ToDestination => o.counts.0 >= index,
        Dir::ToSource => o.counts.1 >= index,
    };
    assert!(
        !(reached && o.ok),
        "{what}: tampering went unnoticed: {o:?}"
    );
    o
}

#[test]
fn every_record_the_destination_sends_back_tampered() {
    ferry_tests::require_kvm();
    let key = key_file();
    let (_, back) = clean("tamper-back-clean", &key);
    assert!(
        back >= 4,
        "handshake, Accept, Restored, Running at least: {back}"
    );
    let mut after_commit = 0;
    for i in 1..=back {
        let o = case(
            &format!("tamper-back-{i}"),
            &key,
            Dir::ToSource,
            i,
            Tamper::Flip,
        );
        after_commit += usize::from(o.answer.contains("stays paused"));
    }
    // The last one is Running: dropped, the source hears nothing and keeps it paused.
    let o = case("tamper-back-drop", &key, Dir::ToSource, back, Tamper::Drop);
    after_commit += usize::from(o.answer.contains("stays paused"));
    case(
        "tamper-back-replay",
        &key,
        Dir::ToSource,
        back - 1,
        Tamper::Replay,
    );
    assert!(
        after_commit >= 1,
        "a forged or lost Running after Commit was among them"
    );
}

#[test]
fn records_the_source_sends_tampered_at_every_phase() {
    ferry_tests::require_kvm();
    let key = key_file();
    let (out, _) = clean("tamper-out-clean", &key);
    assert!(out > 10, "{out}");
    let mid = out / 2;
    for (i, t) in [
        (1, Tamper::Flip),   // the ClientHello
        (3, Tamper::Flip),   // the key's proof
        (mid, Tamper::Flip), // pages
        (mid, Tamper::Drop),
        (mid, Tamper::Reorder),
        (mid, Tamper::Replay),
        (out, Tamper::Flip), // Commit
        (out, Tamper::Drop),
    ] {
        case(
            &format!("tamper-out-{i}-{t:?}"),
            &key,
            Dir::ToDestination,
            i,
            t,
        );
    }
}
