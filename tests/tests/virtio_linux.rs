//! The Linux test guest with a virtio disk and a virtio network card on a real tap: its
//! service (tests/guest/ferry_service.c) answers 100 requests from the host, in order, and
//! every request it acknowledged is on the disk image afterwards, checksums good; booted
//! again on the same image, it goes on from the last record.

use std::path::Path;
use std::time::Duration;

use ferry_tests::netns::Netns;
use ferry_tests::process::{ferry_bin, guest_args, temp_path, Ferry};
use ferry_tests::service::{read_log, Record};

const BOOT: Duration = Duration::from_secs(300);
const GUEST_IP: &str = "10.0.2.2";
const HOST_IP: &str = "10.0.2.1";
const PORT: u16 = 7000;

/// The guest's command line for the service on a card addressed `GUEST_IP`.
fn service_cmdline() -> String {
    format!("ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off ferry.service={PORT}")
}

/// `service-client ADDR args...` inside `ns`: its stdout lines, after checking it succeeded.
fn client(ns: &Netns, args: &[&str]) -> Vec<String> {
    let bin = Path::new(env!("CARGO_BIN_EXE_service-client"));
    let out: std::process::Output = ns
        .command(bin)
        .arg(format!("{GUEST_IP}:{PORT}"))
        .args(args)
        .output()
        .expect("run service-client");
    assert!(
        out.status.success(),
        "service-client {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Boots the guest in `ns` with `disk` and a card on `tap`; returns once the service is up.
fn boot(ns: &Netns, name: &str, disk: &Path, tap: &str) -> Ferry {
    let sock = temp_path(&format!("{name}.sock"));
    let disk_arg = format!("path={}", disk.display());
    let net_arg = format!("tap={tap}");
    let args = guest_args(
        None,
        1,
        &service_cmdline(),
        &["--disk", &disk_arg, "--net", &net_arg],
        &sock,
    );
    let mut f = Ferry::start(ns.command(ferry_bin()), &args);
    f.wait_line(BOOT, |l| l.contains("SERVICE-READY"));
    f
}

#[test]
fn the_service_answers_100_requests_in_order_and_the_disk_holds_each() {
    ferry_tests::require_kvm();
    let ns = Netns::new("svc");
    ns.tap_with_address("fr-svc0", &format!("{HOST_IP}/24"));
    let disk = temp_path("service-log.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let mut f = boot(&ns, "service", &disk, "fr-svc0");
    let ready = f.transcript();
    assert!(ready.contains("records=0"), "{ready}");

    let lines = client(&ns, &["requests", "1", "100"]);
    let acks: Vec<(u64, u64)> = lines
        .iter()
        .map(|l| {
            let mut w = l.split(' ').skip(1).map(|x| x.parse::<u64>().unwrap());
            (w.next().unwrap(), w.next().unwrap())
        })
        .collect();
    let want: Vec<(u64, u64)> = (1..=100).map(|n| (n, n)).collect();
    assert_eq!(acks, want, "every request answered once, in order");

    assert_eq!(client(&ns, &["ping", "5"]).len(), 5);
    f.stop();
    let log = read_log(&std::fs::read(&disk).unwrap());
    assert_eq!(log.bad_end, None, "the log ends cleanly");
    let want: Vec<Record> = (1..=100).map(|n| Record { seq: n, request: n }).collect();
    assert_eq!(
        log.records, want,
        "every acknowledged request is on the disk"
    );

    let mut f = boot(&ns, "service-again", &disk, "fr-svc0");
    assert!(f.transcript().contains("records=100"), "{}", f.transcript());
    let lines = client(&ns, &["requests", "500", "5"]);
    let want: Vec<String> = (0..5)
        .map(|i| format!("ACK {} {}", 500 + i, 101 + i))
        .collect();
    assert_eq!(lines, want);
    f.stop();
    let log = read_log(&std::fs::read(&disk).unwrap());
    assert_eq!(log.bad_end, None);
    assert_eq!(log.records.len(), 105);
    assert_eq!(
        log.records[104],
        Record {
            seq: 105,
            request: 504
        }
    );
}
