//! The application's view of a live migration (`migrate-bench --app`): the test guest
//! (1 vCPU, 256 MiB) runs its network service (tests/guest/ferry_service.c) with a virtio
//! disk and a virtio network card on a tap of a bridge in a network namespace of its own,
//! under ferry and under QEMU (microvm, virtio-blk-device, virtio-net-device, tap without
//! vhost) alike. On the host side, in that namespace, one client sends requests back to back
//! on one TCP connection (each answered once its record is on the disk) and another sends a
//! UDP probe every [`PROBE_INTERVAL`] to the service's echo. The guest migrates `runs` times, each
//! time to a new process whose card is on the other tap of the bridge, 2 s apart. Per
//! migration: the longest gap between two answers of the request stream that overlaps the
//! migration (from its start to 1 s after its end), the probes lost in that window, the
//! total migration time as the VMM reports it; per VMM and mode: whether the TCP connection
//! survived every migration.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_tests::netns::Netns;
use ferry_tests::service::unix_ms;
use serde_json::{json, Value};

use super::qemu::{qemu_setup, Qmp};
use super::*;

const GUEST_IP: &str = "10.0.2.2";
const HOST_IP: &str = "10.0.2.1";
const PORT: u16 = 7000;
const TAPS: [&str; 2] = ["app0", "app1"];
/// Between migrations, and the end of each one's window.
const SETTLE: Duration = Duration::from_secs(2);
pub(crate) const DISK_MB: u64 = 64;
/// Between UDP probes. Every 1 ms overloads a guest whose kernel runs emulated (kvm_pvm
/// hosts): its echo then starves the request stream under either VMM.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// One VMM (and mode) under test.
#[derive(Clone)]
pub(crate) enum Vmm {
    Ferry(PathBuf),
    Qemu(Mode),
}

impl Vmm {
    fn name(&self) -> &'static str {
        match self {
            Vmm::Ferry(_) => "ferry defaults",
            Vmm::Qemu(m) => m.name(),
        }
    }
}

/// One migration as the application saw it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AppSample {
    pub(crate) total_ms: f64,
    pub(crate) downtime_ms: f64,
    pub(crate) gap_ms: f64,
    pub(crate) probes_lost: f64,
}

/// A VMM's migrations, and whether the TCP connection lived through all of them.
pub(crate) struct AppResult {
    pub(crate) vmm: &'static str,
    pub(crate) samples: Vec<AppSample>,
    pub(crate) connection_survived: bool,
    pub(crate) answered: u64,
}

fn cmdline() -> String {
    ferry_tests::guest::guest().cmdline_with(&format!(
        "ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off ferry.service={PORT}"
    ))
}

/// The guest under one VMM: the process that holds it now, on tap `tap` (it goes before
/// the namespace, which is deleted after it).
struct AppGuest {
    src: Proc,
    qmp: Option<Qmp>,
    vmm: Vmm,
    ns: Netns,
    n: usize,
    tap: usize,
    disk: PathBuf,
}

fn no_beats() -> Beats {
    Arc::new(Mutex::new(Vec::new()))
}

fn sock(n: usize) -> PathBuf {
    temp(&format!("app-{n}.sock"))
}

/// `ferry run` of the guest in `ns`, its card on the first tap.
fn ferry_run(ns: &Netns, disk: &Path, ferry: &Path) -> Command {
    let g = ferry_tests::guest::guest();
    let mut c = ns.command(ferry);
    c.arg("run").arg("--kernel").arg(&g.vmlinux);
    c.arg("--initrd").arg(&g.initramfs);
    c.args(["--memory", "256M", "--vcpus", "1", "--cmdline", &cmdline()]);
    c.arg("--disk").arg(format!("path={}", disk.display()));
    c.arg("--net").arg(format!("tap={}", TAPS[0]));
    c.arg("--api-socket").arg(sock(0));
    c
}

/// QEMU process `n` of the guest in `ns` on tap `tap` (waiting for a migration if
/// `incoming`).
fn qemu_run(ns: &Netns, disk: &Path, n: usize, tap: usize, incoming: bool) -> Command {
    let g = ferry_tests::guest::guest();
    let mut c = ns.command(Path::new("qemu-system-x86_64"));
    c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host"]);
    c.args(["-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config"]);
    c.args(["-nographic", "-serial", "stdio", "-kernel"])
        .arg(&g.vmlinux);
    c.arg("-initrd").arg(&g.initramfs);
    c.arg("-append").arg(cmdline());
    let drive = format!("id=d0,file={},format=raw,if=none", disk.display());
    c.args(["-drive", &drive, "-device", "virtio-blk-device,drive=d0"]);
    let tap = TAPS[tap];
    let netdev = format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off");
    c.args(["-netdev", &netdev, "-device", "virtio-net-device,netdev=n0"]);
    c.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock(n).display()));
    if incoming {
        c.args(["-incoming", "defer"]);
    }
    c
}

impl AppGuest {
    fn boot(vmm: Vmm) -> Result<AppGuest> {
        let ns = Netns::new("appbench");
        ns.bridge("appbr", &format!("{HOST_IP}/24"));
        TAPS.iter().for_each(|t| ns.tap_on_bridge(t, "appbr"));
        let disk = temp("app.img");
        std::fs::File::create(&disk)?.set_len(DISK_MB << 20)?;
        let (src, qmp) = match &vmm {
            Vmm::Ferry(ferry) => (
                Proc::spawn(&mut ferry_run(&ns, &disk, ferry), no_beats())?,
                None,
            ),
            Vmm::Qemu(_) => {
                let p = Proc::spawn(&mut qemu_run(&ns, &disk, 0, 0, false), no_beats())?;
                (p, Some(Qmp::connect(&sock(0))?))
            }
        };
        src.wait_line(0, BOOT_LIMIT, "SERVICE-READY", |l| {
            l.contains("SERVICE-READY")
        })?;
        Ok(AppGuest {
            src,
            qmp,
            vmm,
            ns,
            n: 0,
            tap: 0,
            disk,
        })
    }

    /// One migration to a new process on the other tap; its total time and downtime as the
    /// VMM reports them (ms).
    fn migrate(&mut self) -> Result<(f64, f64)> {
        let (n, tap) = (self.n + 1, 1 - self.tap);
        let (dst, total) = match self.vmm.clone() {
            Vmm::Ferry(ferry) => self.migrate_ferry(&ferry, n, tap)?,
            Vmm::Qemu(mode) => self.migrate_qemu(&mode, n, tap)?,
        };
        self.src.wait_exit(MIGRATION_LIMIT)?;
        self.src = dst;
        (self.n, self.tap) = (n, tap);
        Ok(total)
    }

    fn migrate_ferry(&mut self, ferry: &Path, n: usize, tap: usize) -> Result<(Proc, (f64, f64))> {
        let url = format!("unix:{}", temp(&format!("app-{n}.mig")).display());
        let mut c = self.ns.command(ferry);
        c.args(["receive", "--listen", &url, "--net"]);
        c.arg(format!("tap={}", TAPS[tap]));
        c.arg("--disk").arg(format!("path={}", self.disk.display()));
        c.arg("--api-socket").arg(sock(n));
        let dst = Proc::spawn(&mut c, no_beats())?;
        dst.wait_line(0, MIGRATION_LIMIT, "the destination", |l| {
            l.contains("waiting for a VM")
        })?;
        let o = Command::new(ferry)
            .arg("ctl")
            .arg("--api-socket")
            .arg(sock(self.n))
            .args(["--json", "migrate", &url])
            .output()?;
        let answer: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if answer["ok"] != true {
            bail!("ferry migration: {}", String::from_utf8_lossy(&o.stdout));
        }
        let r = &answer["report"];
        let ms = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        Ok((dst, (ms("total_ms"), ms("downtime_ms"))))
    }

    fn migrate_qemu(&mut self, mode: &Mode, n: usize, tap: usize) -> Result<(Proc, (f64, f64))> {
        let dst = Proc::spawn(
            &mut qemu_run(&self.ns, &self.disk, n, tap, true),
            no_beats(),
        )?;
        let mut dst_qmp = Qmp::connect(&sock(n))?;
        qemu_setup(&mut dst_qmp, mode)?;
        let uri = format!("tcp:127.0.0.1:{}", 4400 + n);
        dst_qmp.exec("migrate-incoming", json!({ "uri": uri }))?;
        let qmp = self.qmp.as_mut().context("QMP")?;
        qemu_setup(qmp, mode)?;
        qmp.exec("migrate", json!({ "uri": uri }))?;
        let deadline = Instant::now() + MIGRATION_LIMIT;
        let total = loop {
            let info = qmp.exec("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => {
                    let ms = |k: &str| info[k].as_f64().unwrap_or(f64::NAN);
                    break (ms("total-time"), ms("downtime"));
                }
                Some("failed") | Some("cancelled") => bail!("QEMU migration: {info}"),
                _ if Instant::now() > deadline => bail!("QEMU migration did not finish"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let _ = qmp.exec("quit", json!({}));
        self.qmp = Some(dst_qmp);
        Ok((dst, total))
    }

    /// A client in the namespace: `service-client ADDR args...`.
    fn client(&self, args: &[String]) -> Result<Child> {
        let bin = std::env::current_exe()?.with_file_name("service-client");
        if !bin.exists() {
            bail!(
                "{} is missing: cargo build --release --workspace",
                bin.display()
            );
        }
        Ok(self
            .ns
            .command(&bin)
            .arg(format!("{GUEST_IP}:{PORT}"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }
}

/// A client's output: (succeeded, stdout lines, stderr).
fn finish(child: Child) -> Result<(bool, Vec<String>, String)> {
    let out = child.wait_with_output()?;
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    Ok((out.status.success(), lines, err))
}

/// (value, at_unix_ms) of every `PREFIX value ... at_unix_ms T` line.
fn timed(lines: &[String], prefix: &str) -> Vec<(f64, u64)> {
    lines
        .iter()
        .filter_map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            if w.first() != Some(&prefix) {
                return None;
            }
            let v = w.get(1)?.parse().ok()?;
            let at = w.iter().position(|x| *x == "at_unix_ms")?;
            Some((v, w.get(at + 1)?.parse().ok()?))
        })
        .collect()
}

/// Boots the guest under `vmm`, starts both clients, migrates it `runs` times.
pub(crate) fn run_app(vmm: Vmm, runs: usize) -> Result<AppResult> {
    let name = vmm.name();
    let mut g = AppGuest::boot(vmm)?;
    let stop = temp("app.stop");
    let _ = std::fs::remove_file(&stop);
    let s = stop.display().to_string();
    let stream = g.client(&["stream".into(), "1".into(), s.clone(), "0".into()])?;
    let interval = PROBE_INTERVAL.as_micros().to_string();
    let probes = g.client(&["probe".into(), interval, s])?;
    std::thread::sleep(SETTLE);
    let mut windows = Vec::new();
    for run in 1..=runs {
        let start = unix_ms();
        let (total, downtime) = g.migrate()?;
        let end = unix_ms();
        eprintln!("{name}: run {run}: total {total:.1} ms, downtime {downtime:.1} ms");
        // Half the pause after it: windows never overlap, so a gap counts once.
        windows.push((start, end + SETTLE.as_millis() as u64 / 2, total, downtime));
        std::thread::sleep(SETTLE);
    }
    std::fs::write(&stop, b"")?;
    let (survived, stream_out, err) = finish(stream)?;
    if !survived {
        eprintln!("{name}: the request stream broke: {}", err.trim());
    }
    let (_, probe_out, _) = finish(probes)?;
    let gaps = timed(&stream_out, "gap_ms");
    let lost = timed(&probe_out, "lost");
    let samples: Vec<AppSample> = windows
        .iter()
        .map(|&(s, e, total_ms, downtime_ms)| AppSample {
            total_ms,
            downtime_ms,
            // A gap [at - len, at] that overlaps the window.
            gap_ms: gaps
                .iter()
                .filter(|(len, at)| *at >= s && (*at as f64 - len) <= e as f64)
                .map(|(len, _)| *len)
                .fold(0.0, f64::max),
            probes_lost: lost
                .iter()
                .filter(|(_, at)| (s..=e).contains(at))
                .map(|(n, _)| n)
                .fold(0.0, |a, b| a + b),
        })
        .collect();
    for (i, s) in samples.iter().enumerate() {
        eprintln!("{name}: migration {}: {s:?}", i + 1);
    }
    let answered = stream_out
        .iter()
        .find_map(|l| l.strip_prefix("answered ")?.parse().ok())
        .unwrap_or(0);
    Ok(AppResult {
        vmm: name,
        samples,
        connection_survived: survived,
        answered,
    })
}

/// The Markdown table of every VMM's results, and the summary line (ferry against QEMU's
/// best mode by median gap).
pub(crate) fn app_table(results: &[AppResult]) -> (String, String) {
    let col = |r: &AppResult, f: fn(&AppSample) -> f64, d: usize| {
        let v: Vec<f64> = r.samples.iter().map(f).collect();
        if v.is_empty() {
            return "n/a".to_string();
        }
        let (lo, med, hi) = stats(&v);
        format!("{lo:.d$} / **{med:.d$}** / {hi:.d$}")
    };
    let mut md = format!(
        "| mode | longest gap in answers, ms | UDP probes lost ({} ms apart) | total ms | downtime ms (as reported) | TCP connection | requests answered |\n|---|---|---|---|---|---|---|\n",
        PROBE_INTERVAL.as_millis()
    );
    for r in results {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.vmm,
            col(r, |s| s.gap_ms, 1),
            col(r, |s| s.probes_lost, 0),
            col(r, |s| s.total_ms, 1),
            col(r, |s| s.downtime_ms, 1),
            if r.connection_survived {
                "survived every migration"
            } else {
                "broken"
            },
            r.answered
        );
    }
    let med = |r: &AppResult, f: fn(&AppSample) -> f64| {
        stats(&r.samples.iter().map(f).collect::<Vec<_>>()).1
    };
    let worst = |r: &AppResult| stats(&r.samples.iter().map(|s| s.gap_ms).collect::<Vec<_>>()).2;
    let mut line = String::new();
    if let (Some(f), Some(q)) = (
        results.iter().find(|r| r.vmm.starts_with("ferry")),
        results
            .iter()
            .filter(|r| !r.vmm.starts_with("ferry") && !r.samples.is_empty())
            .min_by(|a, b| med(a, |s| s.gap_ms).total_cmp(&med(b, |s| s.gap_ms))),
    ) {
        line = format!(
            "\napplication blackout: ferry / QEMU's best mode ({}): median gap {:.1} / {:.1} ms = {:.2}; worst gap {:.1} / {:.1} ms = {:.2}; median probes lost {:.0} / {:.0}\n",
            q.vmm,
            med(f, |s| s.gap_ms),
            med(q, |s| s.gap_ms),
            med(f, |s| s.gap_ms) / med(q, |s| s.gap_ms),
            worst(f),
            worst(q),
            worst(f) / worst(q),
            med(f, |s| s.probes_lost),
            med(q, |s| s.probes_lost),
        );
    }
    (md, line)
}
