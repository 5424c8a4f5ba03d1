//! The Linux test guest (2 vCPUs, `workload=dirty`) snapshotted with --stop and continued by
//! `ferry restore` in a new process, twice: heartbeats go on at n+1, no HB-CORRUPT, no second
//! GUEST-READY, and the guest clock never goes backwards. Neither the snapshot nor the
//! restore holds a second copy of guest RAM.

use std::time::Duration;

use ferry_tests::process::{proc_status_bytes, run_guest, temp_path, Ferry};
use ferry_tests::require_kvm;

const BOOT_LIMIT: Duration = Duration::from_secs(600);
const LIMIT: Duration = Duration::from_secs(120);

/// (printk seconds, heartbeat number) of every complete `HB <n>` line in `text`.
fn heartbeats(text: &str) -> Vec<(f64, u64)> {
    text.lines()
        .filter_map(|l| {
            let t: f64 = l.get(l.find('[')? + 1..l.find(']')?)?.trim().parse().ok()?;
            let n = l[l.find("] HB ")? + 5..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((t, n))
        })
        .collect()
}

/// The dirty workload's completed passes in a heartbeat line.
fn pass(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("pass=")?.parse().ok())
}

/// Waits until the guest has completed two more dirty passes than `from`: each pass checks
/// every page against the previous one, so memory from before a restore is verified.
fn two_more_passes(f: &mut Ferry, from: u64) -> u64 {
    let line = f.wait_line(LIMIT, |l| {
        l.contains(" HB ") && pass(l).is_some_and(|p| p >= from + 2)
    });
    pass(&line).unwrap()
}

fn snapshot_and_stop(f: &mut Ferry, file: &std::path::Path) {
    let (ok, out) = f.ctl(&["snapshot", file.to_str().unwrap(), "--stop"]);
    assert!(ok, "snapshot failed: {out}\n{}", f.transcript());
    let status = f.wait_exit(LIMIT);
    assert!(
        status.success(),
        "the snapshotted ferry exited with {status}:\n{}",
        f.transcript()
    );
}

fn restore(file: &std::path::Path, socket: &std::path::Path) -> Ferry {
    Ferry::spawn(&[
        "restore".as_ref(),
        file.as_os_str(),
        "--api-socket".as_ref(),
        socket.as_os_str(),
    ])
}

#[test]
fn snapshot_stop_restore_twice_and_the_guest_goes_on() {
    require_kvm();
    let (s0, s1, s2) = (
        temp_path("snap0.sock"),
        temp_path("snap1.sock"),
        temp_path("snap2.sock"),
    );
    let (file1, file2) = (temp_path("guest1.snap"), temp_path("guest2.snap"));
    let mut f = run_guest(None, 2, "workload=dirty:4 hb_ms=100", &[], &s0);
    f.wait_line(BOOT_LIMIT, |l| l.contains("GUEST-READY"));
    let p0 = two_more_passes(&mut f, 0);
    snapshot_and_stop(&mut f, &file1);
    let mut text = f.stdout_text();

    let mut r1 = restore(&file1, &s1);
    let p1 = two_more_passes(&mut r1, p0);
    snapshot_and_stop(&mut r1, &file2);
    text.push_str(&r1.stdout_text());

    let mut r2 = restore(&file2, &s2);
    two_more_passes(&mut r2, p1);
    let (ok, out) = r2.ctl(&["stop"]);
    assert!(ok, "{out}");
    assert!(r2.wait_exit(LIMIT).success(), "{}", r2.transcript());
    text.push_str(&r2.stdout_text());

    let hb = heartbeats(&text);
    assert!(hb.len() >= 15, "{text}");
    for w in hb.windows(2) {
        assert_eq!(
            w[1].1,
            w[0].1 + 1,
            "heartbeats must go on by exactly one across restores:\n{text}"
        );
        assert!(
            w[1].0 >= w[0].0,
            "the guest clock went backwards ({} -> {}):\n{text}",
            w[0].0,
            w[1].0
        );
    }
    assert_eq!(text.matches("GUEST-READY").count(), 1, "{text}");
    assert!(!text.contains("HB-CORRUPT"), "{text}");
}

#[test]
fn snapshot_and_restore_hold_no_second_copy_of_guest_ram() {
    const MIB: u64 = 1 << 20;
    require_kvm();
    let (s0, s1) = (temp_path("peak0.sock"), temp_path("peak1.sock"));
    let file = temp_path("peak.snap");
    // 128 MiB of pages the guest rewrites and checks: none of them zero.
    let mut f = run_guest(None, 1, "workload=dirty:128 hb_ms=100", &[], &s0);
    f.wait_line(BOOT_LIMIT, |l| l.contains("GUEST-READY"));
    two_more_passes(&mut f, 0);
    let (rss, hwm) = (
        proc_status_bytes(f.pid(), "VmRSS"),
        proc_status_bytes(f.pid(), "VmHWM"),
    );
    let (ok, out) = f.ctl(&["snapshot", file.to_str().unwrap()]);
    assert!(ok, "snapshot failed: {out}\n{}", f.transcript());
    let saving = proc_status_bytes(f.pid(), "VmHWM").saturating_sub(hwm);
    let (ok, out) = f.ctl(&["stop"]);
    assert!(ok, "{out}");
    f.wait_exit(LIMIT);
    let state = vmm::snapshot::read_file(&file).unwrap();
    let ram: u64 = state.memory.iter().map(|r| r.data.len() as u64).sum();
    assert!(ram >= 128 * MIB, "the snapshot carries {} MiB", ram / MIB);

    let mut r = Ferry::spawn(&[
        "restore".as_ref(),
        file.as_os_str(),
        "--paused".as_ref(),
        "--api-socket".as_ref(),
        s1.as_os_str(),
    ]);
    ferry_tests::tiny::wait_for("the restored ferry's control socket", LIMIT, || s1.exists());
    // The socket is bound before the snapshot is read; it answers once the VM exists.
    let (ok, out) = r.ctl(&["status"]);
    assert!(ok && out.contains("paused"), "{out}");
    let restored = proc_status_bytes(r.pid(), "VmHWM");
    eprintln!(
        "guest RAM in the snapshot {} MiB; source resident {} MiB, its peak grew by {} KiB \
         while saving; the restoring process peaked at {} MiB",
        ram / MIB,
        rss / MIB,
        saving / 1024,
        restored / MIB
    );
    // A copy of the guest's RAM on the heap would add `ram` to either peak.
    assert!(
        saving < 16 * MIB,
        "saving raised the source's peak by {} MiB",
        saving / MIB
    );
    assert!(
        restored < rss + 32 * MIB,
        "restoring peaked at {} MiB; the source was resident in {} MiB",
        restored / MIB,
        rss / MIB
    );
    let (ok, out) = r.ctl(&["stop"]);
    assert!(ok, "{out}");
    r.wait_exit(LIMIT);
}
