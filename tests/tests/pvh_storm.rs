//! The ring-3 dirtier the migration benchmark boots in ferry and QEMU alike
//! (tests/tiny/pvh_storm.S, a PVH ELF): ferry boots it as a kernel, its local APIC timer
//! heartbeats every millisecond on the debug port, and a live migration to another ferry
//! process (it rewrites 256 MiB without pause: pages go again and again) carries the timer
//! and the count on: the destination's first heartbeat is the source's last plus one.

use std::time::Duration;

use ferry_tests::process::{free_tcp_port, temp_path, Ferry};
use ferry_tests::tiny::{wait_for, PVH_STORM};

const LIMIT: Duration = Duration::from_secs(120);

fn beats(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

#[test]
fn the_ring3_storm_boots_heartbeats_and_migrates_with_its_timer() {
    ferry_tests::require_kvm();
    let elf = PVH_STORM.write_to_temp();
    let (hb_src, hb_dst) = (temp_path("storm-src.hb"), temp_path("storm-dst.hb"));
    let (sock_src, sock_dst) = (temp_path("storm-src.sock"), temp_path("storm-dst.sock"));
    let mut src = Ferry::spawn(&[
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--memory",
        "512M",
        "--cmdline",
        "",
        "--debug-console",
        hb_src.to_str().unwrap(),
        "--api-socket",
        sock_src.to_str().unwrap(),
    ]);
    src.wait_line(LIMIT, |l| l.contains("GUEST-READY pvh_storm"));
    wait_for("300 heartbeats", LIMIT, || beats(&hb_src).len() >= 300);
    let b = beats(&hb_src);
    for w in b.windows(2) {
        assert_eq!(w[1], w[0].wrapping_add(1), "heartbeats count by one");
    }

    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = Ferry::receive(
        &url,
        &[
            "--debug-console",
            hb_dst.to_str().unwrap(),
            "--api-socket",
            sock_dst.to_str().unwrap(),
        ],
    );
    let (ok, out) = src.ctl(&["--json", "migrate", &url]);
    assert!(ok, "{out}\n{}", src.transcript());
    let r: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    eprintln!("storm migration: {}", r["report"]);
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
    for w in d.windows(2) {
        assert_eq!(w[1], w[0].wrapping_add(1), "heartbeats count by one");
    }
    assert!(dst.ctl(&["stop"]).0);
    assert!(dst.wait_exit(LIMIT).success());
    let _ = std::fs::remove_file(elf);
}
