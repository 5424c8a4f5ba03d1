//! The cross-vendor corpus (tests/data/cross-vendor/, docs/cross-vendor.md): snapshots of the
//! Linux test guest made on real hosts of both CPU vendors, each restored here by `ferry
//! restore` straight from its zstd file. The guest must go on at the heartbeat after the one
//! its sidecar names, verify its memory over two more dirty passes, never print HB-CORRUPT or
//! a second GUEST-READY, keep its clock going forward, and still have its profile's vendor
//! and signature; then it is
//! snapshotted again by this ferry and that snapshot restored too.
//!
//! Prints `made on <vendor family/model> -> restored on <vendor family/model>` for each, and
//! how many crossed vendors. `FERRY_RECORD_EVIDENCE=1` also writes the results into the
//! evidence tables of docs/cross-vendor.md and README.md (rows of other hosts are kept).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::corpus::{
    guest_cpu, kvm_flavour, pass, printk_time, profile_identity, record_evidence, repo, say,
    sidecars, this_host, Cpu, Identity,
};
use ferry_tests::process::{heartbeat, temp_path, Ferry};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(180);

/// One snapshot of the corpus and its sidecar.
struct Entry {
    name: String,
    snap: PathBuf,
    made_on: Cpu,
    profile: String,
    format: u64,
    /// The last heartbeat before the snapshot, and the dirty passes completed then.
    heartbeat: u64,
    pass: u64,
}

fn corpus() -> Vec<Entry> {
    sidecars("cross-vendor")
        .into_iter()
        .map(|(name, p, j)| entry(name, &p, &j))
        .collect()
}

fn entry(name: String, sidecar: &Path, j: &Value) -> Entry {
    let s = |k: &str| j[k].as_str().unwrap_or_else(|| panic!("{sidecar:?}: {k}"));
    let last = s("last_heartbeat_before_snapshot");
    Entry {
        snap: sidecar.with_file_name(format!("{name}.snap.zst")),
        name,
        made_on: Cpu::of_sidecar(j).unwrap_or_else(|| panic!("{sidecar:?}: the host")),
        profile: s("profile").into(),
        format: j["format_version"].as_u64().unwrap_or(1),
        heartbeat: heartbeat(last).unwrap_or_else(|| panic!("{sidecar:?}: {last:?}")),
        pass: pass(last).unwrap_or_else(|| panic!("{sidecar:?}: {last:?}")),
    }
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

/// Restores `file`, requires the first heartbeat to be `next`, checks the guest's CPU, and
/// runs until the guest has completed two more dirty passes than `pass`. Returns the ferry
/// (running) and the last (heartbeat, pass) seen.
fn restore_and_run(
    e: &Entry,
    file: &Path,
    next: u64,
    pass_then: u64,
    identity: &Identity,
) -> (Ferry, u64, u64) {
    let sock = temp_path(&format!("{}-{next}.sock", e.name));
    let mut f = Ferry::spawn(&["restore", p(file), "--api-socket", p(&sock)]);
    let first = f.wait_line(LIMIT, |l| heartbeat(l).is_some());
    assert_eq!(
        heartbeat(&first),
        Some(next),
        "{}: the guest must go on at HB {next}:\n{}",
        e.name,
        f.transcript()
    );
    assert_eq!(&guest_cpu(&f), identity, "{}: the guest's CPU", e.name);
    let last = f.wait_line(LIMIT, |l| pass(l).is_some_and(|p| p >= pass_then + 2));
    (f, heartbeat(&last).unwrap(), pass(&last).unwrap())
}

/// Everything one entry showed.
struct Outcome {
    line: String,
    crossed: bool,
    row: Vec<String>,
}

fn check(e: &Entry, here: &Cpu) -> Outcome {
    // Read through the documented format's reader (zstd included): the profile and, from
    // format version 2, where it was made.
    let state = vmm::snapshot::read_file(&e.snap).unwrap_or_else(|x| panic!("{}: {x}", e.name));
    assert_eq!(state.guest_cpu.is_some(), e.format >= 2, "{}", e.name);
    if let Some(g) = &state.guest_cpu {
        assert_eq!(
            g.host_vendor, e.made_on.vendor,
            "{}: sidecar and stream",
            e.name
        );
    }
    let identity = profile_identity(&e.name, &state.cpu_profile);
    let (family, model) = (identity.1 .0, identity.1 .1);
    let (mut f, hb1, pass1) = restore_and_run(e, &e.snap, e.heartbeat + 1, e.pass, &identity);
    // Snapshotted again by this ferry (the current format), and restored again.
    let again = temp_path(&format!("{}-again.snap", e.name));
    let (ok, out) = f.ctl(&["snapshot", p(&again), "--stop"]);
    assert!(ok, "{out}");
    assert!(f.wait_exit(LIMIT).success(), "{}", f.transcript());
    let mut text = f.stdout_text();
    let hb_saved = text.lines().rev().find_map(heartbeat).unwrap_or(hb1);
    let pass_saved = text.lines().rev().find_map(pass).unwrap_or(pass1);
    let (mut g, _, _) = restore_and_run(e, &again, hb_saved + 1, pass_saved, &identity);
    assert!(g.ctl(&["stop"]).0);
    assert!(g.wait_exit(LIMIT).success(), "{}", g.transcript());
    text.push_str(&g.stdout_text());
    let beats: Vec<u64> = text.lines().filter_map(heartbeat).collect();
    assert_eq!(beats.first(), Some(&(e.heartbeat + 1)), "{}", e.name);
    for w in beats.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{}: heartbeats by one:\n{text}", e.name);
    }
    // The guest's clock (printk time, kvmclock) goes on across hosts whose TSC rates differ.
    let times: Vec<f64> = text.lines().filter_map(printk_time).collect();
    for w in times.windows(2) {
        assert!(
            w[1] >= w[0],
            "{}: the guest clock went backwards:\n{text}",
            e.name
        );
    }
    assert!(!text.contains("HB-CORRUPT"), "{}:\n{text}", e.name);
    assert!(!text.contains("GUEST-READY"), "{}:\n{text}", e.name);
    let passes = text.lines().rev().find_map(pass).unwrap_or(0) - e.pass;
    let crossed = e.made_on.vendor != here.vendor;
    let (n, last) = (e.heartbeat, beats.last().copied().unwrap_or(0));
    Outcome {
        line: format!(
            "made on {} -> restored on {here}: {} ({} {:#x}/{:#x}), format {}, HB {n} -> {} .. {last}, {passes} dirty passes verified, saved and restored again",
            e.made_on, e.profile, identity.0, family, model, e.format, n + 1
        ),
        crossed,
        row: vec![
            format!("`{}`", e.name),
            e.made_on.to_string(),
            format!("{} ({})", e.profile, identity.0),
            e.format.to_string(),
            format!("{here} ({})", kvm_flavour()),
            format!("HB {n} -> {}, {passes} passes verified", n + 1),
        ],
    }
}

#[test]
fn every_corpus_snapshot_restores_on_this_host() {
    ferry_tests::require_kvm();
    let here = this_host();
    let entries = corpus();
    let vendors: std::collections::BTreeSet<&str> =
        entries.iter().map(|e| e.made_on.vendor.as_str()).collect();
    assert!(
        vendors.contains("GenuineIntel") && vendors.contains("AuthenticAMD"),
        "the corpus must hold snapshots from both vendors' hosts: {vendors:?}"
    );
    let mut crossed = 0;
    let mut rows = Vec::new();
    for e in &entries {
        let o = check(e, &here);
        say(&o.line);
        crossed += usize::from(o.crossed);
        rows.push(o.row);
    }
    say(&format!(
        "cross-vendor corpus: {} snapshots restored on {here}, {crossed} of them made on a host of the other vendor",
        entries.len()
    ));
    assert!(crossed > 0, "no snapshot crossed vendors");
    if std::env::var_os("FERRY_RECORD_EVIDENCE").is_some_and(|v| v == "1") {
        record(&rows);
    }
}

const BEGIN: &str = "<!-- cross-vendor evidence: written by tests/tests/cross_vendor.rs -->";
const END: &str = "<!-- end of cross-vendor evidence -->";
const HEAD: [&str; 6] = [
    "snapshot",
    "made on",
    "profile (guest vendor)",
    "format",
    "restored on",
    "result",
];

/// Merges `rows` into the evidence tables of docs/cross-vendor.md and README.md.
fn record(rows: &[Vec<String>]) {
    for file in ["docs/cross-vendor.md", "README.md"] {
        record_evidence(&repo().join(file), (BEGIN, END), &HEAD, (0, 4), rows);
    }
}
