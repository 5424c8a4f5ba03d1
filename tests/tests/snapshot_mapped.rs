//! A snapshot's memory mapped, not copied: `ferry ctl snapshot` writes page-aligned images
//! whose zero pages are holes, `ferry restore` maps them from the file (private: the guest's
//! writes never reach it), and pages the restored guest never touched (not in its page
//! table, not even in the page cache) still go into its next snapshot and through a
//! migration.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use ferry_tests::process::{assert_counts_by_one, count_line as count, free_tcp_port};
use ferry_tests::process::{run_tiny, temp_path, Ferry};
use ferry_tests::tiny::{wait_for, LONG_COUNT};

const LIMIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn memory(path: &Path) -> Vec<migration::MemoryRange> {
    vmm::snapshot::read_file(path).unwrap().memory
}

#[test]
fn a_restored_guest_maps_its_snapshot_and_its_untouched_pages_move_on() {
    ferry_tests::require_kvm();
    let (s0, s1, s2) = (
        temp_path("mapped0.sock"),
        temp_path("mapped1.sock"),
        temp_path("mapped2.sock"),
    );
    let (snap, again) = (temp_path("mapped.snap"), temp_path("mapped-again.snap"));
    let p = |x: &Path| x.to_str().unwrap().to_string();

    let mut f = run_tiny(&LONG_COUNT, &[], &s0);
    f.wait_line(LIMIT, |l| count(l).is_some_and(|n| n >= 50));
    let (ok, out) = f.ctl(&["snapshot", &p(&snap), "--stop"]);
    assert!(ok, "{out}");
    assert!(f.wait_exit(LIMIT).success(), "{}", f.transcript());
    let before = f.stdout_text();
    let meta = std::fs::metadata(&snap).unwrap();
    eprintln!(
        "snapshot: {} bytes long, {} bytes on disk",
        meta.len(),
        meta.blocks() * 512
    );
    assert!(
        meta.len() > 64 * MIB,
        "the file holds the whole 64 MiB image"
    );
    assert!(meta.blocks() * 512 < 4 * MIB, "zero pages are holes");

    // Restored paused: nothing of the image touched yet, and not in the page cache either.
    let mut r = Ferry::spawn(&["restore", &p(&snap), "--paused", "--api-socket", &p(&s1)]);
    wait_for("the restored ferry's control socket", LIMIT, || s1.exists());
    // The socket is bound before the snapshot is read; it answers once the VM exists.
    let (ok, out) = r.ctl(&["status"]);
    assert!(ok && out.contains("paused"), "{out}");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", r.pid())).unwrap();
    assert!(maps.contains(&p(&snap)), "the snapshot is mapped:\n{maps}");
    vmm::files::drop_cached(&snap).unwrap();
    let (ok, out) = r.ctl(&["snapshot", &p(&again)]);
    assert!(ok, "{out}");
    assert!(
        memory(&again) == memory(&snap),
        "the snapshot of the restored VM differs"
    );

    // Migrated while paused and untouched: the destination gets every page and counts on.
    vmm::files::drop_cached(&snap).unwrap();
    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = Ferry::receive(&url, &["--api-socket", &p(&s2)]);
    let (ok, out) = r.ctl(&["migrate", &url]);
    assert!(
        ok && out.contains("migration completed"),
        "{out}\n{}",
        r.transcript()
    );
    assert!(r.wait_exit(LIMIT).success(), "{}", r.transcript());
    dst.wait_line(LIMIT, |l| count(l).is_some_and(|n| n >= 200));
    dst.stop();
    assert_counts_by_one(&(before + &dst.stdout_text()), 150);
    // The guest's writes stayed in the processes: the file is as it was written.
    assert!(memory(&snap) == memory(&again));
}
