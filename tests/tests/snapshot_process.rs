//! A tiny counting guest in a real `ferry run` process, snapshotted and restored by
//! `ferry restore` in a NEW process: it prints the next value; the restored VM, saved again
//! before it runs, equals the original snapshot apart from clocks.

use std::time::Duration;

use ferry_tests::process::{temp_path, Ferry};
use ferry_tests::tiny::LONG_COUNT;
use migration::VmState;

const LIMIT: Duration = Duration::from_secs(60);

/// The complete counter lines (16 hex digits) of a console transcript.
fn counts(text: &str) -> Vec<u64> {
    text.lines()
        .filter(|l| l.len() == 16)
        .filter_map(|l| u64::from_str_radix(l, 16).ok())
        .collect()
}

fn decode(path: &std::path::Path) -> VmState {
    migration::stream::decode_vm(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_counting_guest_continues_in_a_new_process() {
    ferry_tests::require_kvm();
    let image = temp_path("long_count.bin");
    std::fs::write(&image, LONG_COUNT.bytes).unwrap();
    let (s0, s1) = (temp_path("count0.sock"), temp_path("count1.sock"));
    let (snap1, snap2) = (temp_path("count1.snap"), temp_path("count2.snap"));
    let p = |x: &std::path::Path| x.to_str().unwrap().to_string();

    let mut f = Ferry::spawn(&[
        "run",
        "--image",
        &p(&image),
        "--memory",
        "64M",
        "--api-socket",
        &p(&s0),
    ]);
    f.wait_line(LIMIT, |l| u64::from_str_radix(l, 16).is_ok_and(|n| n >= 50));
    let (ok, out) = f.ctl(&["snapshot", &p(&snap1), "--stop"]);
    assert!(ok, "{out}");
    assert!(f.wait_exit(LIMIT).success(), "{}", f.transcript());
    let before = f.stdout_text();

    let mut r = Ferry::spawn(&["restore", &p(&snap1), "--paused", "--api-socket", &p(&s1)]);
    ferry_tests::tiny::wait_for("the restored ferry's control socket", LIMIT, || s1.exists());
    // Paused, the restored VM is the snapshotted one: save it again and compare.
    let (ok, out) = r.ctl(&["snapshot", &p(&snap2)]);
    assert!(ok, "{out}");
    assert!(out.contains("VM paused"), "{out}");
    let (a, b) = (decode(&snap1), decode(&snap2));
    assert_eq!(a.vcpus[0].regs, b.vcpus[0].regs, "registers");
    assert_eq!(a.memory, b.memory, "memory");
    assert_eq!(
        ferry_tests::without_clocks(a.clone()),
        ferry_tests::without_clocks(b),
        "the whole state apart from clocks"
    );
    // A snapshot leaves a paused VM paused; resumed, it goes on counting.
    let (ok, out) = r.ctl(&["resume"]);
    assert!(ok, "{out}");
    r.wait_line(LIMIT, |l| {
        u64::from_str_radix(l, 16).is_ok_and(|n| n >= 200)
    });
    assert!(r.ctl(&["stop"]).0);
    assert!(r.wait_exit(LIMIT).success(), "{}", r.transcript());

    // Joined, the two consoles count without a gap or a repeat.
    let all = counts(&(before + &r.stdout_text()));
    assert!(all.len() >= 200, "{} values", all.len());
    for w in all.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "the count must go on by one across processes"
        );
    }
    // And the counter in the snapshot's memory is the last value printed before it.
    let counter = a
        .memory
        .iter()
        .find(|r| r.gpa <= 0x30_0000 && 0x30_0000 < r.gpa + r.data.len() as u64)
        .unwrap();
    let off = (0x30_0000 - counter.gpa) as usize;
    let in_memory = u64::from_le_bytes(counter.data[off..off + 8].try_into().unwrap());
    assert!(
        all.contains(&in_memory) && all.contains(&(in_memory + 1)),
        "{in_memory}"
    );
}
