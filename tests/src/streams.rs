//! The cross-vendor stream corpus (tests/data/cross-vendor-streams/, docs/cross-vendor.md):
//! a live migration of the Linux test guest with its disk and network card, recorded on the
//! host at hand by [`record`] (scripts/cross-vendor-stream) and played into a real destination
//! on every host by tests/tests/cross_vendor_streams.rs. What both sides must agree on lives
//! here: the guest's command line and addresses, its disk's path and records.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::corpus::{pass, this_host};
use crate::netns::Netns;
use crate::process::{ferry_bin, guest_args, heartbeat, temp_path, Ferry};
use crate::recording::{Recorder, Recording};

/// The guest's address on its card and the host side's (a bridge in the test's namespace).
pub const GUEST_IP: &str = "10.0.6.2";
pub const HOST_IP: &str = "10.0.6.1";
/// The guest's service port.
pub const PORT: u16 = 7000;
/// The guest's disk: this many bytes, zero but for its request log.
pub const DISK_BYTES: usize = 16 << 20;
/// Requests the service logs on the disk before the migration.
pub const RECORDS: u64 = 20;
/// The dirty workload and heartbeat of the recorded guest.
pub const WORKLOAD: &str = "workload=dirty:16 hb_ms=200";
/// How long any one wait may take (guards against hangs; not a timing check).
pub const LIMIT: Duration = Duration::from_secs(180);

/// The guest's command line beyond the test guest's default.
pub fn cmdline() -> String {
    format!("{WORKLOAD} ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off ferry.service={PORT}")
}

/// Where a stream's disk image lies, on the recording host and on every host that plays it:
/// a migration's two sides name the same image (shared storage mounted at the same path), and
/// the Hello carries that path.
pub fn disk_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/ferry-stream-disks/{name}.img"))
}

/// The service's client (`bin`, tests/src/bin/service-client.rs) in `ns`: `args` after the
/// address; its output lines.
pub fn client(bin: &Path, ns: &Netns, args: &[&str]) -> Vec<String> {
    let out = ns
        .command(bin)
        .arg(format!("{GUEST_IP}:{PORT}"))
        .args(args)
        .output()
        .expect("service-client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "service-client {args:?}: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_string).collect()
}

/// Requests `first` .. `first + n - 1`; each must be logged with its own number as sequence.
pub fn requests(bin: &Path, ns: &Netns, first: u64, n: u64) {
    let lines = client(bin, ns, &["requests", &first.to_string(), &n.to_string()]);
    let want: Vec<String> = (first..first + n).map(|k| format!("ACK {k} {k}")).collect();
    assert_eq!(lines, want, "the service's answers");
}

/// What recording one stream made.
#[derive(Debug)]
pub struct Made {
    pub recording: Recording,
    /// The disk image at the switch (source paused, destination not yet running).
    pub disk: Vec<u8>,
    pub console: String,
    pub sidecar: Value,
}

/// `ferry ctl migrate` options that make the recorded migration take several precopy rounds.
const MIGRATE: [&str; 2] = ["--max-downtime", "1ms"];

fn cpuinfo(name: &str) -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    info.lines()
        .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default()
}

/// A `ferry receive` in `ns` listening on a Unix socket, its disk `disk`, its card on
/// `tap`; returned once it waits, with the socket's path.
pub fn receive(ns: &Netns, name: &str, disk: &Path, tap: &str) -> (Ferry, PathBuf) {
    let at = temp_path(&format!("{name}-destination.mig"));
    let api = temp_path(&format!("{name}-destination.sock"));
    let listen = format!("unix:{}", at.display());
    let disk = format!("path={}", disk.display());
    let net = format!("tap={tap}");
    let args = [
        "receive", "--listen", &listen, "--disk", &disk, "--net", &net,
    ];
    let mut args: Vec<std::ffi::OsString> = args.iter().map(|a| a.into()).collect();
    args.extend(["--api-socket".into(), api.into()]);
    let mut f = Ferry::start(ns.command(ferry_bin()), &args);
    f.wait_line_err(LIMIT, |l| l.contains("waiting for a VM"));
    (f, at)
}

/// Migrates `src` to the destination listening on `dst_sock` through a recording relay;
/// returns the migration's report, the recording, and the disk image `disk` as it was at
/// the switch (the source paused, the destination holding the guest and waiting for Commit).
fn migrate_recorded(
    src: &mut Ferry,
    dst: &Ferry,
    dst_sock: &Path,
    disk: &Path,
) -> (String, Recording, Vec<u8>) {
    let at_switch: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let (copy, path) = (at_switch.clone(), disk.to_path_buf());
    let relay = temp_path(&format!("{}-record.mig", dst.pid()));
    let recorder = Recorder::start(
        &relay,
        dst_sock,
        Box::new(move |tag| {
            if tag == b"RSTD" {
                *copy.lock().unwrap() = std::fs::read(&path).ok();
            }
        }),
    );
    let url = format!("unix:{}", relay.display());
    let mut migrate = vec!["migrate", url.as_str()];
    migrate.extend(MIGRATE);
    let (ok, report) = src.ctl(&migrate);
    assert!(ok, "migrate: {report}\n{}", dst.transcript());
    assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
    let recording = recorder.finish().expect("the recording relay");
    let disk = at_switch.lock().unwrap().take();
    (report, recording, disk.expect("the disk at Restored"))
}

/// Boots the guest with `profile`, logs [`RECORDS`] requests on its disk, and live-migrates
/// it after heartbeat 9 through a recording relay to a real `ferry receive` on this host.
/// `client_bin` is the service's client.
pub fn record(profile: &str, name: &str, client_bin: &Path) -> Made {
    let ns = Netns::new("rec");
    ns.bridge("recbr", &format!("{HOST_IP}/24"));
    ["rec0", "rec1"]
        .iter()
        .for_each(|t| ns.tap_on_bridge(t, "recbr"));
    let disk = disk_path(name);
    std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
    std::fs::write(&disk, vec![0u8; DISK_BYTES]).unwrap();
    let disk_arg = format!("path={}", disk.display());
    let sock = temp_path(&format!("{name}-source.sock"));
    let extra = ["--cpu", profile, "--disk", &disk_arg, "--net", "tap=rec0"];
    let args = guest_args(None, 2, &cmdline(), &extra, &sock);
    let mut src = Ferry::start(ns.command(ferry_bin()), &args);
    src.wait_line(LIMIT, |l| l.contains("SERVICE-READY"));
    requests(client_bin, &ns, 1, RECORDS);
    src.wait_line(LIMIT, |l| heartbeat(l).is_some_and(|n| n >= 9));

    let (mut dst, dst_sock) = receive(&ns, name, &disk, "rec1");

    let (report, recording, disk_at_switch) = migrate_recorded(&mut src, &dst, &dst_sock, &disk);
    dst.wait_line_err(LIMIT, |l| l.contains("received the VM"));
    let console = src.stdout_text();
    let last = console
        .lines()
        .rev()
        .find(|l| heartbeat(l).is_some())
        .expect("a heartbeat before the switch")
        .to_string();
    // The destination goes on at the next heartbeat (what every player checks too).
    let first = dst.wait_line(LIMIT, |l| heartbeat(l).is_some());
    assert_eq!(
        heartbeat(&first),
        heartbeat(&last).map(|n| n + 1),
        "{first}"
    );
    assert!(dst.ctl(&["stop"]).0);
    assert!(dst.wait_exit(LIMIT).success(), "{}", dst.transcript());
    let _ = std::fs::remove_file(&disk);

    let sidecar = sidecar(profile, &recording, &disk, &report, &last);
    Made {
        recording,
        disk: disk_at_switch,
        console,
        sidecar,
    }
}

/// The JSON beside a recorded stream: where and by what it was made, and what it holds.
fn sidecar(profile: &str, recording: &Recording, disk: &Path, report: &str, last: &str) -> Value {
    let here = this_host();
    let hello = recording.hello().expect("the recorded Hello");
    let guest = crate::guest::guest();
    json!({
        "host_vendor": here.vendor,
        "host_family": here.family,
        "host_model": here.model,
        "host_stepping": cpuinfo("stepping").parse::<u32>().unwrap_or(0),
        "host_model_name": cpuinfo("model name"),
        "host_kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "kvm": crate::corpus::kvm_flavour(),
        "ferry_commit": std::env::var("FERRY_COMMIT").unwrap_or_else(|_| "unknown".into()),
        "format_version": hello.format_version,
        "guest": std::fs::read_to_string(guest.dir.join("VERSION")).unwrap_or_default().trim(),
        "guest_cmdline": cmdline(),
        "profile": profile,
        "memory": "256M",
        "vcpus": 2,
        "disk_path": disk.display().to_string(),
        "disk_records": RECORDS,
        "migrate_options": MIGRATE.join(" "),
        "migration_report": report.trim(),
        "answers": recording.answers(),
        "sent_bytes": recording.sent_bytes(),
        "last_heartbeat_before_switch": last,
        "pass_before_switch": pass(last),
    })
}
