//! The application does not notice: the Linux test guest, with a virtio disk and a virtio
//! network card, serves one TCP connection from a client on the host that sends requests
//! back to back, while the guest moves 10 times between ferry processes (each hop to the
//! other of two taps on one bridge), is snapshotted and restored once, and survives a
//! destination killed in the middle of a migration. Every request is answered in sequence
//! on the same connection, and after the last hop every acknowledged request is on the
//! disk image, checksums good.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use ferry_tests::netns::Netns;
use ferry_tests::process::{ferry_bin, guest_args, temp_path, Ferry};
use ferry_tests::service::{read_log, Record};

const BOOT: Duration = Duration::from_secs(300);
const LIMIT: Duration = Duration::from_secs(120);
const GUEST_IP: &str = "10.0.3.2";
const HOST_IP: &str = "10.0.3.1";
const PORT: u16 = 7000;
const TAPS: [&str; 2] = ["app0", "app1"];
const HOPS: usize = 10;

/// The guest's command line: its card addressed `GUEST_IP`, the service on `PORT`.
fn service_cmdline() -> String {
    format!("ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off ferry.service={PORT}")
}

/// A ferry in `ns` with `args`.
fn ferry_in(ns: &Netns, args: &[std::ffi::OsString]) -> Ferry {
    Ferry::start(ns.command(ferry_bin()), args)
}

fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(|a| a.into()).collect()
}

/// The guest's disk, as every side names it (`--disk`).
fn disk_arg() -> String {
    format!("path={}", temp_path("app-log.img").display())
}

/// `ferry receive` in `ns`, its card on `tap`, its disk the source's image; returns it once
/// it listens, and the URL it listens on.
fn receive(ns: &Netns, name: &str, tap: &str) -> (Ferry, String) {
    let url = format!("unix:{}", temp_path(&format!("{name}.mig")).display());
    let sock = temp_path(&format!("{name}.sock"));
    let net = format!("tap={tap}");
    let disk = disk_arg();
    let mut args = os(&["receive", "--listen", &url, "--disk", &disk, "--net", &net]);
    args.push("--api-socket".into());
    args.push(sock.into());
    let mut f = ferry_in(ns, &args);
    f.wait_line_err(LIMIT, |l| l.contains("waiting for a VM"));
    (f, url)
}

/// One hop: the guest moves from `src` to a new ferry whose card is on `tap`.
fn hop(ns: &Netns, src: &mut Ferry, name: &str, tap: &str) -> Ferry {
    let (mut dst, url) = receive(ns, name, tap);
    let (ok, out) = src.ctl(&["migrate", &url]);
    assert!(ok, "migrate {name}: {out}\n{}", dst.transcript());
    assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
    dst.wait_line_err(LIMIT, |l| l.contains("received the VM"));
    dst
}

/// Snapshots the guest in `src` (which ends) and restores it in a new ferry on `tap`.
fn snapshot_and_restore(ns: &Netns, src: &mut Ferry, tap: &str) -> Ferry {
    let snap = temp_path("app.snap");
    let (ok, out) = src.ctl(&["snapshot", snap.to_str().unwrap(), "--stop"]);
    assert!(ok, "snapshot: {out}");
    assert!(src.wait_exit(LIMIT).success(), "{}", src.transcript());
    let sock = temp_path("app-restored.sock");
    let net = format!("tap={tap}");
    let disk = disk_arg();
    let mut args = os(&[
        "restore",
        snap.to_str().unwrap(),
        "--disk",
        &disk,
        "--net",
        &net,
    ]);
    args.extend(os(&["--api-socket", sock.to_str().unwrap()]));
    let f = ferry_in(ns, &args);
    let deadline = std::time::Instant::now() + LIMIT;
    while !f.ctl(&["status"]).1.contains("running") {
        assert!(std::time::Instant::now() < deadline, "{}", f.transcript());
        std::thread::sleep(Duration::from_millis(50));
    }
    f
}

/// A migration whose destination is killed (-9) in its first round (the source sends at
/// 2 MB/s, so that round lasts): the migration fails and the guest runs on at the source.
fn killed_destination(ns: &Netns, src: &Ferry, tap: &str) {
    let (mut dst, url) = receive(ns, "app-killed", tap);
    let sock = src_socket(src);
    let migrate = std::thread::spawn(move || {
        std::process::Command::new(ferry_bin())
            .arg("ctl")
            .arg("--api-socket")
            .arg(&sock)
            .args(["migrate", &url, "--max-bandwidth", "2M"])
            .output()
            .expect("ferry ctl migrate")
    });
    std::thread::sleep(Duration::from_secs(1));
    dst.kill9();
    let out = migrate.join().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the migration failed: {text}");
    eprintln!("destination killed: {}", text.trim());
    let (ok, st) = src.ctl(&["status"]);
    assert!(ok && st.contains("running"), "the guest runs on: {st}");
}

fn src_socket(f: &Ferry) -> PathBuf {
    f.api_socket.clone().expect("a control socket")
}

/// The client, in `ns`: one connection, requests from 1 until `stop` exists. Returns once
/// its first request is answered (the stream flows).
fn start_client(ns: &Netns, stop: &Path) -> Child {
    use std::io::BufRead;
    let bin = Path::new(env!("CARGO_BIN_EXE_service-client"));
    let mut child = ns
        .command(bin)
        .arg(format!("{GUEST_IP}:{PORT}"))
        .args(["stream", "1"])
        .arg(stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start service-client");
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).expect("the client's first line");
    assert!(line.starts_with("streaming"), "service-client: {line}");
    child.stderr = Some(err.into_inner());
    child
}

/// What the client reported: (answered, longest gap in ms, seconds it streamed, every gap
/// line).
fn client_report(child: Child) -> (u64, f64, f64, Vec<String>) {
    let out = child.wait_with_output().expect("service-client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the client's one connection held and every answer was in sequence: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {stdout}"))
    };
    assert_eq!(field("first_request"), 1.0);
    assert_eq!(field("first_seq"), 1.0, "a fresh disk: the log starts at 1");
    let gaps = stdout
        .lines()
        .filter(|l| l.starts_with("gap_ms"))
        .map(str::to_string)
        .collect();
    let answered = field("answered") as u64;
    (answered, field("longest_gap_ms"), field("seconds"), gaps)
}

#[test]
fn ten_hops_a_snapshot_and_a_killed_destination_on_one_connection() {
    ferry_tests::require_kvm();
    let ns = Netns::new("app");
    ns.bridge("appbr", &format!("{HOST_IP}/24"));
    TAPS.iter().for_each(|t| ns.tap_on_bridge(t, "appbr"));
    let disk = temp_path("app-log.img");
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let disk_arg = disk_arg();
    let net_arg = format!("tap={}", TAPS[0]);
    let sock = temp_path("app-0.sock");
    let extra = ["--disk", &disk_arg, "--net", &net_arg];
    let args = guest_args(None, 1, &service_cmdline(), &extra, &sock);
    let mut guest = ferry_in(&ns, &args);
    guest.wait_line(BOOT, |l| l.contains("SERVICE-READY"));

    let stop = temp_path("app-client.stop");
    let _ = std::fs::remove_file(&stop);
    let client = start_client(&ns, &stop);
    let moving = std::time::Instant::now();
    let mut tap = 0;
    for i in 1..=HOPS {
        if i == HOPS / 2 + 1 {
            tap = 1 - tap;
            guest = snapshot_and_restore(&ns, &mut guest, TAPS[tap]);
            std::thread::sleep(Duration::from_millis(500));
            killed_destination(&ns, &guest, TAPS[1 - tap]);
        }
        tap = 1 - tap;
        guest = hop(&ns, &mut guest, &format!("app-{i}"), TAPS[tap]);
        eprintln!("hop {i}: the guest is on {}", TAPS[tap]);
        std::thread::sleep(Duration::from_millis(300));
    }
    let moved = moving.elapsed().as_secs_f64();
    std::fs::write(&stop, b"").unwrap();
    let (answered, longest, seconds, gaps) = client_report(client);
    let _ = std::fs::remove_file(&stop);
    eprintln!(
        "{HOPS} hops, 1 snapshot/restore, 1 killed destination in {moved:.1} s: {answered} requests answered on one connection in {seconds:.1} s, longest gap {longest:.1} ms"
    );
    gaps.iter().for_each(|g| eprintln!("  {g}"));
    assert!(
        seconds >= moved,
        "the client streamed through every move ({seconds:.1} s, the moves took {moved:.1} s)"
    );

    assert!(guest.ctl(&["stop"]).0);
    assert!(guest.wait_exit(LIMIT).success(), "{}", guest.transcript());
    let log = read_log(&std::fs::read(&disk).unwrap());
    assert_eq!(log.bad_end, None, "the log ends cleanly");
    let want: Vec<Record> = (1..=answered)
        .map(|n| Record { seq: n, request: n })
        .collect();
    assert_eq!(log.records.len(), want.len(), "one record per answer");
    assert_eq!(
        log.records, want,
        "every acknowledged request is on the disk"
    );
}
