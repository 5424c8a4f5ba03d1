//! The storm guest (tests/tiny/long_storm.S) as the migration tests drive it: started in a
//! ferry process, and its memory checked from a snapshot of the running process.

use std::path::Path;

use crate::process::{run_tiny, temp_path, Ferry};

/// The storm guest (tests/tiny/long_storm.S): its status (passes, bad pages) and working set.
const STORM_STATUS: u64 = 0x80_0000;
const STORM_BUF: u64 = 0x100_0000;
const STORM_PAGES: u64 = 4096;

pub fn storm_source(sock: &Path) -> Ferry {
    run_tiny(&crate::tiny::LONG_STORM, &[], sock)
}

fn read_u64(state: &migration::VmState, gpa: u64) -> u64 {
    for r in &state.memory {
        if gpa >= r.gpa && gpa + 8 <= r.gpa + r.data.len() as u64 {
            let at = (gpa - r.gpa) as usize;
            return u64::from_le_bytes(r.data[at..at + 8].try_into().unwrap());
        }
    }
    0
}

/// A snapshot of a running ferry's VM (which goes on running), decoded.
fn snapshot(f: &Ferry, tag: &str) -> migration::VmState {
    let path = temp_path(tag);
    let (ok, out) = f.ctl(&["snapshot", path.to_str().unwrap()]);
    assert!(ok, "{out}");
    let state = migration::stream::decode_vm(&std::fs::read(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    state
}

/// Snapshots the storm guest of a running ferry (which goes on running) and checks its memory
/// is consistent: no bad page seen, and the working set holds pass + 1 up to some page and
/// pass from there. Returns the pass.
pub fn storm_pass(f: &Ferry, tag: &str) -> u64 {
    let state = snapshot(f, tag);
    let (pass, bad) = (
        read_u64(&state, STORM_STATUS),
        read_u64(&state, STORM_STATUS + 8),
    );
    assert_eq!(bad, 0, "the guest found pages without its last store");
    let values: Vec<u64> = (0..STORM_PAGES)
        .map(|i| read_u64(&state, STORM_BUF + i * 4096))
        .collect();
    let done = values.iter().take_while(|v| **v == pass + 1).count();
    assert!(values[done..].iter().all(|v| *v == pass), "pass {pass}");
    pass
}

/// tests/tiny/pvh_storm.S: vCPU i's pass count.
const PVH_STORM_STATUS: u64 = 0x30_0000;

/// Snapshots the PVH storm guest of a running ferry (which goes on running) and returns the
/// pass count of each of its first `vcpus` vCPUs.
pub fn pvh_storm_passes(f: &Ferry, vcpus: u64, tag: &str) -> Vec<u64> {
    let state = snapshot(f, tag);
    (0..vcpus)
        .map(|i| read_u64(&state, PVH_STORM_STATUS + 8 * i))
        .collect()
}

pub fn json_report(out: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or(""))
        .unwrap_or_else(|_| panic!("ctl --json prints the answer first: {out}"));
    v["report"].clone()
}
