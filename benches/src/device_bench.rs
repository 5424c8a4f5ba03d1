//! Device benchmark: the test guest's network service (tests/guest/ferry_service.c) on
//! ferry and on QEMU, side by side in one run, with the same guest kernel, the same disk
//! image size and the same tap setup: each VMM's guest gets a virtio-blk disk on a raw image
//! file and a virtio-net card on a tap in a network namespace of its own (QEMU: microvm,
//! virtio-blk-device and virtio-net-device, no vhost). Prints a Markdown table and, with
//! `--write`, replaces the device section of BENCHMARKS.md.
//!
//!     cargo build --release --workspace
//!     target/release/device-bench --runs 5 --write BENCHMARKS.md
//!
//! Both guests boot once; every run measures each row once on both, ferry first in odd runs
//! and QEMU first in even ones. Rows: request/response latency (the median of 100 PINGs
//! over one TCP connection), stream throughput host -> guest (SINK) and guest -> host
//! (SOURCE) of 1 MiB, and sequential disk write (then flush) and read of 16 MiB by the
//! guest in 128 KiB requests, timed on the host from request to answer. The guest's kernel
//! (its TCP stack included) runs emulated on kvm_pvm hosts, so absolute numbers there are
//! low for both VMMs alike, and sizes are small to keep a run in minutes.
//!
//! Needs /dev/kvm, root (namespaces and taps), ip(8) and `qemu-system-x86_64`. Run by hand.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_benches::{ferry_binary, host_facts, qemu_version, replace_section, stats};
use ferry_tests::netns::Netns;

const BEGIN: &str = "<!-- device-bench begin -->";
const END: &str = "<!-- device-bench end -->";
const GUEST_IP: &str = "10.0.2.2";
const HOST_IP: &str = "10.0.2.1";
const PORT: u16 = 7000;
const TAP: &str = "fr-bench0";
const DISK_MB: u64 = 128;
const STREAM: u64 = 1 << 20;
const DISK_IO_MB: u64 = 16;
const PINGS: usize = 100;
const BOOT_LIMIT: Duration = Duration::from_secs(600);

/// One measurement: its label, its unit, and whether more is better.
struct Row {
    name: &'static str,
    unit: &'static str,
    higher_is_better: bool,
}

const ROWS: [Row; 5] = [
    Row {
        name: "TCP request/response latency (PING, median of 100)",
        unit: "ms",
        higher_is_better: false,
    },
    Row {
        name: "TCP stream host -> guest (1 MiB)",
        unit: "MB/s",
        higher_is_better: true,
    },
    Row {
        name: "TCP stream guest -> host (1 MiB)",
        unit: "MB/s",
        higher_is_better: true,
    },
    Row {
        name: "disk sequential write + flush (16 MiB, 128 KiB requests)",
        unit: "MB/s",
        higher_is_better: true,
    },
    Row {
        name: "disk sequential read (16 MiB, 128 KiB requests)",
        unit: "MB/s",
        higher_is_better: true,
    },
];

/// A guest of one VMM, serving in its own namespace.
struct Guest {
    vmm: &'static str,
    ns: Netns,
    child: Child,
    _console: Receiver<String>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cmdline() -> String {
    ferry_tests::guest::guest().cmdline_with(&format!(
        "ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off ferry.service={PORT}"
    ))
}

fn ferry_args(ferry: &Path, disk: &Path) -> Vec<String> {
    let g = ferry_tests::guest::guest();
    let p = |p: &Path| p.display().to_string();
    vec![
        p(ferry),
        "run".into(),
        "--kernel".into(),
        p(&g.vmlinux),
        "--initrd".into(),
        p(&g.initramfs),
        "--memory".into(),
        "256M".into(),
        "--cmdline".into(),
        cmdline(),
        "--disk".into(),
        format!("path={}", disk.display()),
        "--net".into(),
        format!("tap={TAP}"),
    ]
}

fn qemu_args(disk: &Path) -> Vec<String> {
    let g = ferry_tests::guest::guest();
    let p = |p: &Path| p.display().to_string();
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut a = s(&[
        "qemu-system-x86_64",
        "-M",
        "microvm,acpi=off",
        "-enable-kvm",
    ]);
    a.extend(s(&[
        "-cpu",
        "host",
        "-m",
        "256M",
        "-smp",
        "1",
        "-nodefaults",
    ]));
    a.extend(s(&["-no-user-config", "-nographic", "-serial", "stdio"]));
    a.extend([
        "-kernel".into(),
        p(&g.vmlinux),
        "-initrd".into(),
        p(&g.initramfs),
    ]);
    a.extend(["-append".into(), cmdline()]);
    a.extend([
        "-drive".into(),
        format!("id=d0,file={},format=raw,if=none", disk.display()),
    ]);
    a.extend(s(&["-device", "virtio-blk-device,drive=d0"]));
    a.extend([
        "-netdev".into(),
        format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"),
    ]);
    a.extend(s(&["-device", "virtio-net-device,netdev=n0"]));
    a
}

/// Starts `argv` in a new namespace with the tap and waits for the service.
fn boot(vmm: &'static str, argv: Vec<String>) -> Result<Guest> {
    let ns = Netns::new(&format!("bench-{vmm}"));
    ns.tap_with_address(TAP, &format!("{HOST_IP}/24"));
    let mut child = ns
        .command(Path::new(&argv[0]))
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {vmm}"))?;
    let (tx, rx) = channel();
    let out = child.stdout.take().context("stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        match rx.recv_timeout(BOOT_LIMIT) {
            Ok(l) if l.contains("SERVICE-READY") => break,
            Ok(l) if l.contains("SERVICE-ERROR") => bail!("{vmm}: {l}"),
            Ok(_) => {}
            Err(_) => bail!("{vmm}: the guest's service did not start"),
        }
    }
    eprintln!("{vmm}: service ready");
    Ok(Guest {
        vmm,
        ns,
        child,
        _console: rx,
    })
}

/// The client, run inside the guest's namespace by this binary (`--client ARGS`).
fn client(g: &Guest, args: &[String]) -> Result<Vec<String>> {
    let me = std::env::current_exe()?;
    let out =
        g.ns.command(&me)
            .arg("--client")
            .arg(format!("{GUEST_IP}:{PORT}"))
            .args(args)
            .output()?;
    if !out.status.success() {
        bail!("{}: {}", g.vmm, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn seconds(lines: &[String]) -> Result<f64> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("seconds ")?.parse().ok())
        .context("no time in the client's answer")
}

/// One value of each row.
fn measure(g: &Guest) -> Result<[f64; 5]> {
    let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let pings = client(g, &a(&["ping", &PINGS.to_string()]))?;
    let rtts: Vec<f64> = pings
        .iter()
        .filter_map(|l| l.strip_prefix("rtt_us ")?.parse().ok())
        .collect();
    if rtts.len() != PINGS {
        bail!("{}: {} of {PINGS} pings answered", g.vmm, rtts.len());
    }
    let mbps = |bytes: u64, s: f64| bytes as f64 / s / 1e6;
    let stream = STREAM.to_string();
    let sink = seconds(&client(g, &a(&["sink", &stream]))?)?;
    let source = seconds(&client(g, &a(&["source", &stream]))?)?;
    let mb = DISK_IO_MB.to_string();
    let w = seconds(&client(g, &a(&["diskw", &mb]))?)?;
    let r = seconds(&client(g, &a(&["diskr", &mb]))?)?;
    let disk = DISK_IO_MB << 20;
    Ok([
        stats(&rtts).1 / 1e3,
        mbps(STREAM, sink),
        mbps(STREAM, source),
        mbps(disk, w),
        mbps(disk, r),
    ])
}

fn table(runs: usize, f: &[[f64; 5]], q: &[[f64; 5]]) -> String {
    let mut md = String::from(
        "| | ferry min / **median** / max | QEMU min / **median** / max | ferry vs QEMU |\n|---|---|---|---|\n",
    );
    for (i, row) in ROWS.iter().enumerate() {
        let col = |v: &[[f64; 5]]| stats(&v.iter().map(|x| x[i]).collect::<Vec<_>>());
        let (fl, fm, fh) = col(f);
        let (ql, qm, qh) = col(q);
        let ratio = if row.higher_is_better {
            fm / qm
        } else {
            qm / fm
        };
        md += &format!(
            "| {} ({}) | {fl:.2} / **{fm:.2}** / {fh:.2} | {ql:.2} / **{qm:.2}** / {qh:.2} | {ratio:.2}x |\n",
            row.name, row.unit
        );
    }
    md + &format!(
        "\n{runs} runs. \"ferry vs QEMU\": ferry's median over QEMU's for throughput, QEMU's over \
         ferry's for latency; above 1.00x ferry is ahead. Where the min-max ranges of the two \
         overlap, the difference is within this host's run-to-run noise.\n"
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--client") {
        let lines = ferry_tests::service::client_command(&args[1..]).map_err(anyhow::Error::msg)?;
        lines.iter().for_each(|l| println!("{l}"));
        return Ok(());
    }
    let (runs, write) = parse_args(&args)?;
    ferry_tests::require_kvm();
    let ferry = ferry_binary()?;
    let qemu = qemu_version()?;
    let dir = std::env::temp_dir().join(format!("device-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let disk = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::File::create(&p)?.set_len(DISK_MB << 20)?;
        Ok(p)
    };
    let f = boot("ferry", ferry_args(&ferry, &disk("ferry.img")?))?;
    let q = boot("qemu", qemu_args(&disk("qemu.img")?))?;
    let (mut fs, mut qs) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let order = if run % 2 == 1 { [&f, &q] } else { [&q, &f] };
        for g in order {
            let m = measure(g)?;
            eprintln!("run {run} {}: {m:.2?}", g.vmm);
            if g.vmm == "ferry" {
                fs.push(m)
            } else {
                qs.push(m)
            }
        }
    }
    drop((f, q));
    let _ = std::fs::remove_dir_all(&dir);
    let md = format!(
        "{BEGIN}\n## Devices: virtio-net and virtio-blk, ferry and QEMU side by side\n\n\
         The test guest (tests/guest, Linux 6.1) runs its network service \
         (tests/guest/ferry_service.c) with 1 vCPU and 256 MiB, a {DISK_MB} MiB raw disk image \
         and a card on a tap in a network namespace of its own; QEMU: microvm, \
         virtio-blk-device, virtio-net-device, tap without vhost, its default cache mode. \
         The host side talks to the guest over TCP from inside the namespace.\n\n{}\n\
         Host:\n{}\nMade by `target/release/device-bench --runs {runs} --write BENCHMARKS.md`.\n{END}\n",
        table(runs, &fs, &qs),
        host_facts(&qemu)
    );
    print!("{md}");
    if let Some(path) = write {
        replace_section(&path, BEGIN, END, &md)?;
    }
    Ok(())
}

fn parse_args(args: &[String]) -> Result<(usize, Option<PathBuf>)> {
    let (mut runs, mut write) = (5, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => runs = val()?.parse().context("--runs")?,
            "--write" => write = Some(PathBuf::from(val()?)),
            other => {
                bail!("unknown argument {other:?} (usage: device-bench [--runs N] [--write FILE])")
            }
        }
    }
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok((runs, write))
}
