//! `ferry serve` driven as an orchestrator drives Cloud Hypervisor, with plain HTTP requests
//! over the Unix socket: create and boot the Linux test guest, pause, resume, snapshot,
//! send it to a second `ferry serve` told to receive it (vm.receive-migration), restore the
//! snapshot in a third, and shut each down.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::process::{heartbeat, http, temp_path, Ferry};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

/// `ferry serve` at a new socket, once it serves.
fn serve(name: &str) -> (Ferry, PathBuf) {
    let sock = temp_path(name);
    let mut f = Ferry::spawn(&["serve", "--api-socket", sock.to_str().unwrap()]);
    f.wait_line_err(LIMIT, |l| l.contains("with no VM yet"));
    (f, sock)
}

/// Waits for `f`'s guest to print a heartbeat past `after`; returns it.
fn beats_past(f: &mut Ferry, after: u64) -> u64 {
    let line = f.wait_line(LIMIT, |l| heartbeat(l).is_some_and(|n| n > after));
    heartbeat(&line).unwrap()
}

fn create_body() -> Value {
    let g = ferry_tests::guest::guest();
    json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256u64 << 20},
        "payload": {
            "kernel": g.vmlinux,
            "initramfs": g.initramfs,
            "cmdline": g.cmdline_with("hb_ms=100"),
        },
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    })
}

/// Create and boot the guest on a fresh `ferry serve`, pause, resume and snapshot it into a
/// directory: the serve, its socket, the snapshot's URL and the last heartbeat seen.
fn boot_and_snapshot() -> (Ferry, PathBuf, String, u64) {
    let (mut src, s) = serve("serve-src.sock");
    assert_eq!(http(&s, "GET", "vmm.ping", None).0, 200);
    let (st, none) = http(&s, "GET", "vm.info", None);
    assert_eq!((st, &none["code"]), (409, &json!("wrong-state")), "{none}");
    assert_eq!(
        http(&s, "PUT", "vm.boot", None).0,
        409,
        "boot before create"
    );
    let (st, bad) = http(
        &s,
        "PUT",
        "vm.create",
        Some(json!({"payload": {"kernel": "/k"}, "rng": {}})),
    );
    assert!(
        st == 400 && bad["message"].as_str().unwrap().contains("rng"),
        "{bad}"
    );
    assert_eq!(
        http(&s, "PUT", "vm.create", Some(create_body())),
        (204, Value::Null)
    );
    let (_, info) = http(&s, "GET", "vm.info", None);
    assert_eq!(info["state"], "Created", "{info}");
    assert_eq!(http(&s, "PUT", "vm.boot", None), (204, Value::Null));
    let hb = beats_past(&mut src, 0);
    let (_, info) = http(&s, "GET", "vm.info", None);
    assert_eq!(info["state"], "Running", "{info}");
    let (st, again) = http(&s, "PUT", "vm.create", Some(create_body()));
    assert_eq!(
        (st, &again["code"]),
        (409, &json!("wrong-state")),
        "{again}"
    );
    assert_eq!(http(&s, "PUT", "vm.pause", None), (204, Value::Null));
    assert_eq!(http(&s, "PUT", "vm.resume", None), (204, Value::Null));
    let snap_dir = temp_path("serve-snap");
    std::fs::create_dir_all(&snap_dir).unwrap();
    let url = format!("file://{}", snap_dir.display());
    let (st, snap) = http(
        &s,
        "PUT",
        "vm.snapshot",
        Some(json!({"destination_url": url})),
    );
    assert_eq!(st, 200, "{snap}");
    assert_eq!(
        snap["path"],
        json!(snap_dir.join("ferry.snap")),
        "a directory gets ferry.snap"
    );
    let hb = beats_past(&mut src, hb);
    (src, s, url, hb)
}

/// vm.receive-migration on a second `ferry serve`, then vm.send-migration to it: the guest
/// goes on there past heartbeat `hb`; then vm.shutdown ends it.
fn migrate_to_a_second_serve(mut src: Ferry, s: &Path, hb: u64) {
    let (mut dst, d) = serve("serve-dst.sock");
    let mig = temp_path("serve-mig.sock");
    let receiver_url = format!("unix:{}", mig.display());
    let d2 = d.clone();
    let receiving = std::thread::spawn(move || {
        http(
            &d2,
            "PUT",
            "vm.receive-migration",
            Some(json!({"receiver_url": receiver_url})),
        )
    });
    dst.wait_line_err(LIMIT, |l| l.contains("waiting for a VM"));
    let (st, sent) = http(
        s,
        "PUT",
        "vm.send-migration",
        Some(json!({"destination_url": format!("unix:{}", mig.display())})),
    );
    assert_eq!(st, 200, "{sent}");
    assert_eq!(
        receiving.join().unwrap(),
        (204, Value::Null),
        "vm.receive-migration answers once the VM runs"
    );
    assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
    beats_past(&mut dst, hb);
    let (_, info) = http(&d, "GET", "vm.info", None);
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(http(&d, "PUT", "vm.shutdown", None), (204, Value::Null));
    assert!(dst.wait_exit(LIMIT).success(), "{}", dst.transcript());
}

#[test]
fn an_orchestrator_creates_boots_snapshots_migrates_and_restores_by_http() {
    ferry_tests::require_kvm();
    let (src, s, url, hb) = boot_and_snapshot();
    migrate_to_a_second_serve(src, &s, hb);
    // The snapshot, restored by a third.
    let (mut third, t) = serve("serve-restore.sock");
    let (st, bad) = http(
        &t,
        "PUT",
        "vm.restore",
        Some(json!({"source_url": url, "prefault": true})),
    );
    assert!(
        st == 400 && bad["message"].as_str().unwrap().contains("prefault"),
        "{bad}"
    );
    assert_eq!(
        http(&t, "PUT", "vm.restore", Some(json!({"source_url": url}))),
        (204, Value::Null)
    );
    beats_past(&mut third, 0);
    assert_eq!(http(&t, "PUT", "vmm.shutdown", None), (204, Value::Null));
    assert!(third.wait_exit(LIMIT).success(), "{}", third.transcript());
}

#[test]
fn a_failed_boot_keeps_the_vmm_and_its_configuration_can_be_deleted() {
    ferry_tests::require_kvm();
    let (mut f, s) = serve("serve-empty.sock");
    let mut body = create_body();
    body["payload"]["kernel"] = json!("/nonexistent/vmlinux");
    assert_eq!(http(&s, "PUT", "vm.create", Some(body)), (204, Value::Null));
    let (st, failed) = http(&s, "PUT", "vm.boot", None);
    assert!(
        st >= 400
            && failed["message"]
                .as_str()
                .unwrap()
                .contains("/nonexistent/vmlinux"),
        "{st} {failed}"
    );
    assert!(
        f.try_status().is_none(),
        "still serving after a failed boot"
    );
    let (st, kept) = http(&s, "PUT", "vm.create", Some(create_body()));
    assert_eq!((st, &kept["code"]), (409, &json!("wrong-state")), "{kept}");
    assert_eq!(http(&s, "PUT", "vm.delete", None), (204, Value::Null));
    assert_eq!(
        http(&s, "PUT", "vm.create", Some(create_body())),
        (204, Value::Null)
    );
    assert_eq!(http(&s, "GET", "vmm.ping", None).0, 200);
    assert_eq!(http(&s, "PUT", "vmm.shutdown", None), (204, Value::Null));
    assert!(f.wait_exit(LIMIT).success(), "{}", f.transcript());
}
