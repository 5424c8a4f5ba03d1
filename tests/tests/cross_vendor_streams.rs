//! The cross-vendor stream corpus (tests/data/cross-vendor-streams/, docs/cross-vendor.md):
//! live migrations of the Linux test guest with its disk and network card, recorded on real
//! hosts of either vendor as the source sent them (scripts/cross-vendor-stream). Each is played
//! here into a real `ferry receive`, which must answer as the recording says (Accept after the
//! Hello, Synced after each round, Restored after the state, Running after Commit); then the
//! guest must go on at the heartbeat after the recorded one, keep its profile's vendor and
//! signature, verify its memory over two more dirty passes, answer its network service on a
//! tap of this host with the next request numbers, and keep every request it had logged on its
//! disk before the switch.
//!
//! Prints, per stream, where it was made and received, the profile, the heartbeat n -> n+1 and
//! whether it crossed vendors; fails if the corpus lacks either vendor's streams or none
//! crossed. `FERRY_RECORD_EVIDENCE=1` also writes the results into the
//! streams' evidence table of docs/cross-vendor.md (rows of other hosts are kept).

use std::io::Read;
use std::path::{Path, PathBuf};

use ferry_tests::corpus::{
    guest_cpu, pass, printk_time, profile_identity, record_evidence, repo, say, sidecars,
    this_host, Cpu,
};
use ferry_tests::netns::Netns;
use ferry_tests::process::{heartbeat, temp_path};
use ferry_tests::recording::{play, PlayError, Recording};
use ferry_tests::service::{read_log, Record};
use ferry_tests::streams::{disk_path, receive, requests, HOST_IP, LIMIT, RECORDS};
use serde_json::Value;

/// One recorded stream and its sidecar.
struct Stream {
    name: String,
    recording: Recording,
    disk: Vec<u8>,
    made_on: Cpu,
    profile: String,
    format: u32,
    /// The last heartbeat before the switch, and the dirty passes completed then.
    heartbeat: u64,
    pass: u64,
}

fn dir() -> PathBuf {
    repo().join("tests/data/cross-vendor-streams")
}

/// A file of the corpus, zstd-compressed as committed.
fn unzstd(path: &Path) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut z = ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::new(file))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    z.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    out
}

fn corpus() -> Vec<Stream> {
    sidecars("cross-vendor-streams")
        .into_iter()
        .map(|(name, p, j)| stream(name, &p, &j))
        .collect()
}

fn stream(name: String, sidecar: &Path, j: &Value) -> Stream {
    let s = |k: &str| j[k].as_str().unwrap_or_else(|| panic!("{sidecar:?}: {k}"));
    let recording = Recording::read_file(&dir().join(format!("{name}.stream.zst")))
        .unwrap_or_else(|e| panic!("{e}"));
    let last = s("last_heartbeat_before_switch");
    assert_eq!(
        s("disk_path"),
        disk_path(&name).to_str().unwrap(),
        "{name}: the disk's path"
    );
    Stream {
        disk: unzstd(&dir().join(format!("{name}.disk.zst"))),
        made_on: Cpu::of_sidecar(j).unwrap_or_else(|| panic!("{sidecar:?}: the host")),
        profile: s("profile").into(),
        format: j["format_version"].as_u64().unwrap() as u32,
        heartbeat: heartbeat(last).unwrap_or_else(|| panic!("{sidecar:?}: {last:?}")),
        pass: pass(last).unwrap_or_else(|| panic!("{sidecar:?}: {last:?}")),
        recording,
        name,
    }
}

/// A network of this host for the guest's card: a bridge with the host's address and a tap.
fn network(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.bridge("playbr", &format!("{HOST_IP}/24"));
    ns.tap_on_bridge("play0", "playbr");
    ns
}

fn client() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_service-client"))
}

/// What one stream showed.
struct Outcome {
    line: String,
    crossed: bool,
    row: Vec<String>,
}

/// What the guest left: heartbeats by one and its clock forward in `text` (its console), no
/// corruption and no reboot; on its disk every request, the recorded ones and three more.
/// Returns the heartbeats.
fn went_on(s: &Stream, text: &str, disk: &Path) -> Vec<u64> {
    let beats: Vec<u64> = text.lines().filter_map(heartbeat).collect();
    for w in beats.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{}: heartbeats by one:\n{text}", s.name);
    }
    let times: Vec<f64> = text.lines().filter_map(printk_time).collect();
    assert!(
        times.windows(2).all(|w| w[1] >= w[0]),
        "{}: the guest clock went backwards:\n{text}",
        s.name
    );
    assert!(!text.contains("HB-CORRUPT"), "{}:\n{text}", s.name);
    assert!(!text.contains("GUEST-READY"), "{}:\n{text}", s.name);
    let log = read_log(&std::fs::read(disk).unwrap());
    let _ = std::fs::remove_file(disk);
    assert_eq!(log.bad_end, None, "{}: the disk's log ends cleanly", s.name);
    let want: Vec<Record> = (1..=RECORDS + 3)
        .map(|n| Record { seq: n, request: n })
        .collect();
    assert_eq!(log.records, want, "{}: every request on the disk", s.name);
    beats
}

/// Plays `s` into a real destination here and watches the guest go on.
fn check(s: &Stream, here: &Cpu) -> Outcome {
    let hello = s
        .recording
        .hello()
        .unwrap_or_else(|e| panic!("{}: {e}", s.name));
    assert_eq!(
        hello.format_version, s.format,
        "{}: sidecar and Hello",
        s.name
    );
    let identity = profile_identity(&s.name, &hello.cpu_profile);
    let ns = network("play");
    let disk = disk_path(&s.name);
    std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
    std::fs::write(&disk, &s.disk).unwrap();
    let (mut f, at) = receive(&ns, &format!("{}-play", s.name), &disk, "play0");
    let answers = play(&s.recording, &at, LIMIT)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", s.name, f.transcript()));
    f.wait_line_err(LIMIT, |l| l.contains("received the VM"));
    let first = f.wait_line(LIMIT, |l| heartbeat(l).is_some());
    let next = s.heartbeat + 1;
    assert_eq!(
        heartbeat(&first),
        Some(next),
        "{}: the guest must go on at HB {next}:\n{}",
        s.name,
        f.transcript()
    );
    assert_eq!(guest_cpu(&f), identity, "{}: the guest's CPU", s.name);
    // The card answers on this host's tap, and the service goes on from its last request.
    requests(client(), &ns, RECORDS + 1, 3);
    f.wait_line(LIMIT, |l| pass(l).is_some_and(|p| p >= s.pass + 2));
    assert!(f.ctl(&["stop"]).0);
    assert!(f.wait_exit(LIMIT).success(), "{}", f.transcript());
    let text = f.stdout_text();
    let beats = went_on(s, &text, &disk);
    let passes = text.lines().rev().find_map(pass).unwrap_or(0) - s.pass;
    let rounds = answers.iter().filter(|a| *a == "SYND").count();
    let crossed = s.made_on.vendor != here.vendor;
    let (n, last) = (s.heartbeat, beats.last().copied().unwrap_or(0));
    let (family, model) = (identity.1 .0, identity.1 .1);
    Outcome {
        line: format!(
            "stream made on {} -> received on {here}: {} ({} {family:#x}/{model:#x}), format {}, {rounds} rounds while the guest ran, HB {n} -> {} .. {last}, {passes} dirty passes verified, {} disk records, crossed vendors: {}",
            s.made_on, s.profile, identity.0, s.format, n + 1, RECORDS + 3, if crossed { "yes" } else { "no" }
        ),
        crossed,
        row: vec![
            format!("`{}`", s.name),
            s.made_on.to_string(),
            format!("{} ({})", s.profile, identity.0),
            s.format.to_string(),
            format!("{here} ({})", ferry_tests::corpus::kvm_flavour()),
            format!("HB {n} -> {}, {rounds} live rounds, {passes} passes verified, disk and card", n + 1),
        ],
    }
}

#[test]
fn every_recorded_stream_plays_into_a_destination_here() {
    ferry_tests::require_kvm();
    let here = this_host();
    let streams = corpus();
    assert!(!streams.is_empty(), "the stream corpus is empty");
    // Both vendors' hosts have recorded: whichever host plays them, some cross the line.
    let vendors: std::collections::BTreeSet<&str> =
        streams.iter().map(|s| s.made_on.vendor.as_str()).collect();
    assert!(
        vendors.contains("GenuineIntel") && vendors.contains("AuthenticAMD"),
        "the stream corpus must hold streams from both vendors' hosts: {vendors:?}"
    );
    let (mut crossed, mut rows) = (0, Vec::new());
    for s in &streams {
        let o = check(s, &here);
        say(&o.line);
        crossed += usize::from(o.crossed);
        rows.push(o.row);
    }
    say(&format!(
        "cross-vendor streams: {} played into a destination on {here}, {crossed} of them made on a host of the other vendor",
        streams.len()
    ));
    assert!(crossed > 0, "no stream crossed vendors");
    if std::env::var_os("FERRY_RECORD_EVIDENCE").is_some_and(|v| v == "1") {
        let path = repo().join("docs/cross-vendor.md");
        record_evidence(&path, (BEGIN, END), &HEAD, (0, 4), &rows);
    }
}

/// A stream whose Hello claims a newer format than this ferry reads is refused before any
/// memory moves, with one line naming both versions, on both sides.
#[test]
fn a_stream_of_a_newer_format_is_refused_naming_both_versions() {
    ferry_tests::require_kvm();
    let s = corpus().into_iter().next().expect("a recorded stream");
    let newer = migration::limits::FORMAT_VERSION + 1;
    let rec = s.recording.with_hello_version(newer);
    let ns = network("newer");
    // Its own image, at another path: a Hello of a later version is refused on its version
    // alone, before the devices are compared.
    let disk = temp_path(&format!("{}-newer.img", s.name));
    std::fs::write(&disk, &s.disk).unwrap();
    let (mut f, at) = receive(&ns, &format!("{}-newer", s.name), &disk, "play0");
    let err = play(&rec, &at, LIMIT).unwrap_err();
    let PlayError::Refused { tag, reason } = &err else {
        panic!("refused, not {err}");
    };
    assert_eq!(tag, "RFSE", "{err}");
    let (ours, theirs) = (
        migration::limits::FORMAT_VERSION.to_string(),
        newer.to_string(),
    );
    assert!(
        reason.contains(&theirs) && reason.contains(&ours),
        "both versions named: {reason}"
    );
    let status = f.wait_exit(LIMIT);
    assert!(!status.success(), "{}", f.transcript());
    let errors: Vec<&str> = f
        .stderr_lines()
        .into_iter()
        .filter(|l| l.starts_with("ferry: error"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {}", f.transcript());
    assert!(errors[0].contains(&theirs), "{}", errors[0]);
    say(&format!("a stream of format {newer}: {}", errors[0]));
}

const BEGIN: &str =
    "<!-- cross-vendor stream evidence: written by tests/tests/cross_vendor_streams.rs -->";
const END: &str = "<!-- end of cross-vendor stream evidence -->";
const HEAD: [&str; 6] = [
    "stream",
    "made on",
    "profile (guest vendor)",
    "format",
    "received on",
    "result",
];
