//! The ring-3 dirtier the migration benchmark boots in ferry and QEMU alike
//! (tests/tiny/pvh_storm.S, a PVH ELF): ferry boots it as a kernel, it brings up the other
//! vCPUs itself (INIT and SIPI) and each rewrites its share of 256 MiB from ring 3, its local
//! APIC timer heartbeats every millisecond on the debug port, and a live migration to another
//! ferry process (pages go again and again) carries the timer, the count and every vCPU on:
//! the destination's first heartbeat is the source's last plus one, and every vCPU's pass
//! count goes on rising there.

use std::time::Duration;

use ferry_tests::process::{free_tcp_port, temp_path, Ferry};
use ferry_tests::storm::pvh_storm_passes;
use ferry_tests::tiny::{wait_for, PVH_STORM};

const LIMIT: Duration = Duration::from_secs(120);

fn beats(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

fn assert_by_one(b: &[u8]) {
    for w in b.windows(2) {
        assert_eq!(w[1], w[0].wrapping_add(1), "heartbeats count by one");
    }
}

/// Snapshots the guest until `done` holds for its pass counts (within [`LIMIT`]: a first
/// pass over fresh RAM, or a vCPU thread waiting for one of 2 cores, can take a while).
fn passes_until(f: &Ferry, vcpus: u64, tag: &str, done: impl Fn(&[u64]) -> bool) -> Vec<u64> {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let now = pvh_storm_passes(f, vcpus, tag);
        if done(&now) {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{tag}: the vCPUs' pass counts stay at {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every one of the guest's `vcpus` vCPUs has passed over its share of the working set,
/// and does again: a later look finds every pass count higher.
fn assert_all_rewrite(f: &Ferry, vcpus: u64, tag: &str) -> Vec<u64> {
    let before = passes_until(f, vcpus, &format!("{tag}-1.snap"), |p| {
        p.iter().all(|n| *n > 0)
    });
    passes_until(f, vcpus, &format!("{tag}-2.snap"), |p| {
        before.iter().zip(p).all(|(b, a)| a > b)
    })
}

fn p(x: &std::path::Path) -> &str {
    x.to_str().unwrap()
}

fn boot_migrate(vcpus: u64, tag: &str) {
    ferry_tests::require_kvm();
    let elf = PVH_STORM.write_to_temp();
    let hb_src = temp_path(&format!("{tag}-src.hb"));
    let hb_dst = temp_path(&format!("{tag}-dst.hb"));
    let sock_src = temp_path(&format!("{tag}-src.sock"));
    let sock_dst = temp_path(&format!("{tag}-dst.sock"));
    let n = vcpus.to_string();
    let (elf_s, hb_s, sock_s) = (p(&elf), p(&hb_src), p(&sock_src));
    let mut src = Ferry::spawn(&[
        "run",
        "--kernel",
        elf_s,
        "--memory",
        "512M",
        "--vcpus",
        &n,
        "--cmdline",
        "",
        "--debug-console",
        hb_s,
        "--api-socket",
        sock_s,
    ]);
    let ready = src.wait_line(LIMIT, |l| l.contains("GUEST-READY pvh_storm"));
    assert!(
        ready.contains(&format!("cpus={vcpus}")),
        "all {vcpus} vCPUs came up: {ready}"
    );
    wait_for("300 heartbeats", LIMIT, || beats(&hb_src).len() >= 300);
    assert_by_one(&beats(&hb_src));
    let at_source = assert_all_rewrite(&src, vcpus, &format!("{tag}-src"));

    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let args = ["--debug-console", p(&hb_dst), "--api-socket", p(&sock_dst)];
    let mut dst = Ferry::receive(&url, &args);
    let (ok, out) = src.ctl(&["--json", "migrate", &url]);
    assert!(ok, "{out}\n{}", src.transcript());
    let r: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    eprintln!("storm migration, {vcpus} vCPUs: {}", r["report"]);
    let pages = r["report"]["pages_per_round"].as_array().unwrap();
    assert!(
        pages.len() >= 2 && pages[1].as_u64().unwrap() > 0,
        "it rewrites its working set without pause: pages are sent again: {r}"
    );
    assert!(src.wait_exit(LIMIT).success());
    wait_for("100 heartbeats at the destination", LIMIT, || {
        beats(&hb_dst).len() >= 100
    });
    let (s, d) = (beats(&hb_src), beats(&hb_dst));
    assert_eq!(
        d[0],
        s.last().unwrap().wrapping_add(1),
        "the destination's first heartbeat follows the source's last"
    );
    assert_by_one(&d);
    let at_destination = assert_all_rewrite(&dst, vcpus, &format!("{tag}-dst"));
    for (i, (s, d)) in at_source.iter().zip(&at_destination).enumerate() {
        assert!(
            d > s,
            "vCPU {i}'s passes go on from where they were: {s} then {d}"
        );
    }
    assert!(dst.ctl(&["stop"]).0);
    assert!(dst.wait_exit(LIMIT).success());
    let _ = std::fs::remove_file(elf);
}

#[test]
fn the_ring3_storm_boots_heartbeats_and_migrates_with_its_timer() {
    boot_migrate(1, "storm1");
}

#[test]
fn four_vcpus_each_rewrite_their_share_before_and_after_a_migration() {
    boot_migrate(4, "storm4");
}
