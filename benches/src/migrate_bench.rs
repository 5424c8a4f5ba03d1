//! Migration benchmark: ferry and QEMU (driven over QMP) live-migrate the same test guest
//! through the same cases over loopback TCP, in one run, and the numbers are measured the
//! same way for both. Prints a Markdown table and, with `--write`, replaces the migration
//! section of BENCHMARKS.md.
//!
//!     cargo build --release --workspace
//!     target/release/migrate-bench --runs 5 --write BENCHMARKS.md
//!
//! Per case and VMM the guest boots once; every migration then moves it from the current
//! process to a new one (the destination becomes the next source). Modes are interleaved:
//! each run migrates once in every mode, ferry's modes first in odd runs and QEMU's in even
//! ones, so that the host's load drifting over a case (this kind of host is a VM on a shared
//! server) falls on both VMMs alike; the guest of the VMM not migrating is paused meanwhile.
//! Metrics per migration:
//! - total time and downtime as the VMM reports them (ferry's report; QEMU's query-migrate);
//! - guest-visible blackout: host time between the last heartbeat read from the source and
//!   the first from the destination. The guest asks for a heartbeat every millisecond
//!   (`hb_us=1000`) and writes each one's number to the debug console port 0xe9 (`hb_port`),
//!   which both VMMs send to a FIFO the benchmark reads (ferry `--debug-console`, QEMU
//!   `-debugcon`); the interval the guest achieves is measured and reported;
//! - bytes on the wire and rounds (QEMU: ram.transferred and dirty-sync-count).
//!
//! Needs /dev/kvm and `qemu-system-x86_64` (Debian: qemu-system-x86). Run by hand, never in CI.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_benches::{ferry_binary, host_facts, qemu_version, replace_section, stats};
use serde_json::{json, Value};

const BEGIN: &str = "<!-- migrate-bench begin -->";
const END: &str = "<!-- migrate-bench end -->";
/// A migration that has not finished by then counts as not finished (and is cancelled).
const MIGRATION_LIMIT: Duration = Duration::from_secs(30);
const BOOT_LIMIT: Duration = Duration::from_secs(900);

const USAGE: &str = "\
usage: migrate-bench [--runs N] [--write FILE] [--case NAME]... [--only ferry|qemu]
  --runs N       migrations per mode and case (default 5)
  --write FILE   replace the migration section of FILE (BENCHMARKS.md) with the table
  --case NAME    only the cases whose name contains NAME (repeatable; default all)
  --only VMM     only ferry's or only QEMU's modes (default both)
";

struct Args {
    runs: usize,
    write: Option<PathBuf>,
    cases: Vec<String>,
    /// Only this VMM ("ferry" or "qemu"); both by default.
    only: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        runs: 5,
        write: None,
        cases: Vec::new(),
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => a.runs = val()?.parse().context("--runs")?,
            "--write" => a.write = Some(PathBuf::from(val()?)),
            "--case" => a.cases.push(val()?),
            "--only" => a.only = Some(val()?),
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if let Some(o) = a.only.as_deref().filter(|o| !["ferry", "qemu"].contains(o)) {
        bail!("--only {o:?}: expected ferry or qemu");
    }
    if let Some(c) = a
        .cases
        .iter()
        .find(|n| !CASES.iter().any(|c| c.name.contains(n.as_str())))
    {
        let names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
        bail!("--case {c:?} matches no case (cases: {})", names.join("; "));
    }
    Ok(a)
}

/// A guest and what it does.
struct Case {
    name: &'static str,
    memory: &'static str,
    guest: CaseGuest,
}

/// Which guest a case boots.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CaseGuest {
    /// The Linux test guest with this workload option.
    Linux(&'static str),
    /// tests/tiny/pvh_storm.S: ring 3 rewriting 256 MiB at native speed, a 1 ms heartbeat
    /// from its local APIC timer.
    Storm,
}

const CASES: [Case; 5] = [
    Case {
        name: "256 MiB idle",
        memory: "256M",
        guest: CaseGuest::Linux("workload=idle"),
    },
    Case {
        name: "1 GiB idle",
        memory: "1G",
        guest: CaseGuest::Linux("workload=idle"),
    },
    Case {
        name: "256 MiB, 16 MiB dirtied",
        memory: "256M",
        guest: CaseGuest::Linux("workload=dirty:16"),
    },
    Case {
        name: "1 GiB, 128 MiB dirtied",
        memory: "1G",
        guest: CaseGuest::Linux("workload=dirty:128"),
    },
    Case {
        name: "1 GiB, 256 MiB rewritten from ring 3 (the heaviest dirtying here)",
        memory: "1G",
        guest: CaseGuest::Storm,
    },
];

/// The kernel (or PVH ELF), initrd and command line a case boots.
fn boot_files(case: &Case) -> (PathBuf, Option<PathBuf>, String) {
    match case.guest {
        CaseGuest::Linux(workload) => {
            let g = ferry_tests::guest::guest();
            (
                g.vmlinux.clone(),
                Some(g.initramfs.clone()),
                g.cmdline_with(&format!("{workload} hb_us=1000 hb_port hb_print=1000")),
            )
        }
        CaseGuest::Storm => {
            static ELF: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
            let elf = ELF.get_or_init(|| {
                // In this run's temporary directory, which main removes at the end.
                let path = temp("pvh_storm.elf");
                std::fs::write(&path, ferry_tests::tiny::PVH_STORM.elf).expect("write the ELF");
                path
            });
            (elf.clone(), None, String::new())
        }
    }
}

/// How one VMM migrates.
#[derive(Clone, Copy)]
enum Mode {
    /// `ferry ctl migrate` with these extra arguments.
    Ferry(&'static str, &'static [&'static str]),
    /// QEMU with these migration parameters and capabilities.
    Qemu {
        name: &'static str,
        unthrottled: bool,
        downtime_ms: Option<u64>,
        capability: Option<&'static str>,
    },
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Ferry(n, _) | Mode::Qemu { name: n, .. } => n,
        }
    }
}

const FERRY_MODES: [Mode; 3] = [
    Mode::Ferry("ferry defaults (20 ms target)", &[]),
    Mode::Ferry("ferry --max-downtime 10ms", &["--max-downtime", "10ms"]),
    Mode::Ferry("ferry --max-downtime 1ms", &["--max-downtime", "1ms"]),
];

const QEMU_MODES: [Mode; 6] = [
    Mode::Qemu {
        name: "QEMU defaults",
        unthrottled: false,
        downtime_ms: None,
        capability: None,
    },
    Mode::Qemu {
        name: "QEMU unthrottled",
        unthrottled: true,
        downtime_ms: None,
        capability: None,
    },
    Mode::Qemu {
        name: "QEMU unthrottled, downtime-limit 10 ms",
        unthrottled: true,
        downtime_ms: Some(10),
        capability: None,
    },
    Mode::Qemu {
        name: "QEMU unthrottled, downtime-limit 1 ms",
        unthrottled: true,
        downtime_ms: Some(1),
        capability: None,
    },
    Mode::Qemu {
        name: "QEMU unthrottled, auto-converge",
        unthrottled: true,
        downtime_ms: None,
        capability: Some("auto-converge"),
    },
    Mode::Qemu {
        name: "QEMU unthrottled, multifd (2 channels)",
        unthrottled: true,
        downtime_ms: None,
        capability: Some("multifd"),
    },
];

/// One migration's numbers; None where it did not finish.
#[derive(Clone, Copy, Debug)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    blackout_ms: f64,
    bytes: f64,
    rounds: f64,
}

/// Heartbeat bytes with their arrival times.
type Beats = Arc<Mutex<Vec<(Instant, u8)>>>;
/// A case on one VMM: the heartbeat interval achieved, and the samples per mode.
type CaseResult = (f64, Vec<(Mode, Vec<Option<Sample>>)>);

/// A VMM process whose output lines and heartbeat bytes are time-stamped as they arrive.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    beats: Beats,
}

/// A FIFO for a VMM's debug console and a thread recording each byte with its arrival time.
fn debug_fifo(name: &str) -> Result<(PathBuf, Beats)> {
    let path = temp(name);
    let _ = std::fs::remove_file(&path);
    let ok = Command::new("mkfifo").arg(&path).status()?.success();
    if !ok {
        bail!("mkfifo {}", path.display());
    }
    let beats = Arc::new(Mutex::new(Vec::new()));
    let (p, b) = (path.clone(), beats.clone());
    std::thread::spawn(move || {
        use std::io::Read;
        let Ok(mut f) = std::fs::File::open(&p) else {
            return;
        };
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = f.read(&mut buf) {
            let now = Instant::now();
            b.lock().unwrap().extend(buf[..n].iter().map(|x| (now, *x)));
        }
    });
    Ok((path, beats))
}

impl Proc {
    /// Spawns `cmd`, which must send its debug console to the FIFO made by [`debug_fifo`].
    fn spawn(cmd: &mut Command, beats: Beats) -> Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stdout.take().context("stdout")?) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().context("stderr")?),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    lines.lock().unwrap().push((Instant::now(), line));
                }
            });
        }
        Ok(Proc {
            child,
            lines,
            beats,
        })
    }

    /// Waits until `n` heartbeats have arrived.
    fn wait_beats(&self, n: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self.beats.lock().unwrap().len() < n {
            if Instant::now() > deadline {
                bail!("timed out waiting for {n} heartbeats");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Waits for a line matching `pred` at or after index `from`; returns its index and time.
    fn wait_line(
        &self,
        from: usize,
        limit: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, Instant)> {
        let deadline = Instant::now() + limit;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                if let Some(i) = (from..lines.len()).find(|i| pred(&lines[*i].1)) {
                    return Ok((i, lines[i].0));
                }
            }
            if Instant::now() > deadline {
                let tail: Vec<String> = self
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .take(5)
                    .map(|l| l.1.clone())
                    .collect();
                bail!("timed out waiting for {what}; last lines: {tail:?}");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Median interval between the last `n` heartbeats, ms.
    fn heartbeat_interval_ms(&self, n: usize) -> f64 {
        let beats = self.beats.lock().unwrap();
        let t: Vec<Instant> = beats.iter().map(|(t, _)| *t).collect();
        let t = &t[t.len().saturating_sub(n)..];
        let d: Vec<f64> = t
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
            .collect();
        if d.is_empty() {
            f64::NAN
        } else {
            stats(&d).1
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("process did not exit");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-migrate-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name)
}

/// Boots the guest and waits until it heartbeats.
fn boot(p: &Proc) -> Result<()> {
    p.wait_line(0, BOOT_LIMIT, "GUEST-READY", |l| l.contains("GUEST-READY"))?;
    // A little steady state (the dirtying workload's first passes).
    p.wait_beats(500, BOOT_LIMIT)
}

/// Heartbeats a guest gives at its current host before it is migrated again: a guest that
/// just arrived runs slowly for a while (on hosts that emulate guest ring 0, its kernel's
/// memory is mapped anew page by page), and a blackout measured then would be that
/// warm-up, not the migration's.
const SETTLE_BEATS: usize = 50;

/// Waits for [`SETTLE_BEATS`] more heartbeats at `p`.
fn settle(p: &Proc) -> Result<()> {
    let n = p.beats.lock().unwrap().len();
    p.wait_beats(n + SETTLE_BEATS, MIGRATION_LIMIT)
}

/// Blackout: from the source's last heartbeat to the destination's first. Heartbeats go on
/// by one across the move (their low byte), or the run is reported.
fn blackout(src: &Proc, dst: &Proc) -> Result<f64> {
    dst.wait_beats(1, MIGRATION_LIMIT)?;
    let (first, b) = dst.beats.lock().unwrap()[0];
    let (last, a) = *src
        .beats
        .lock()
        .unwrap()
        .last()
        .context("no heartbeat at the source")?;
    if b != a.wrapping_add(1) {
        eprintln!("heartbeat {a} at the source, then {b} at the destination");
    }
    Ok(first.saturating_duration_since(last).as_secs_f64() * 1e3)
}

/// A case's guest under one VMM, kept running across its migrations.
trait Guest {
    /// The process that holds the guest now.
    fn src(&self) -> &Proc;
    /// Pauses or resumes the guest's vCPUs.
    fn run(&mut self, on: bool) -> Result<()>;
    /// One migration to a new process, which then holds the guest; None if it did not
    /// finish (the guest stays where it was).
    fn migrate(&mut self, case: &Case, mode: &Mode, run: usize) -> Result<Option<Sample>>;
}

/// A case's guest under ferry, kept running across its migrations: `src` is the process
/// that holds it now, listening on API socket `n`.
struct FerryGuest {
    ferry: PathBuf,
    src: Proc,
    n: usize,
}

impl FerryGuest {
    fn sock(n: usize) -> PathBuf {
        temp(&format!("ferry-{n}.sock"))
    }

    fn boot(ferry: &Path, case: &Case) -> Result<FerryGuest> {
        let (kernel, initrd, cmdline) = boot_files(case);
        let (fifo, beats) = debug_fifo("ferry-0.hb")?;
        let mut cmd = Command::new(ferry);
        cmd.arg("run").arg("--kernel").arg(&kernel);
        if let Some(initrd) = &initrd {
            cmd.arg("--initrd").arg(initrd);
        }
        cmd.args(["--memory", case.memory, "--vcpus", "1", "--cmdline"])
            .arg(&cmdline)
            .arg("--api-socket")
            .arg(Self::sock(0))
            .arg("--debug-console")
            .arg(fifo);
        let src = Proc::spawn(&mut cmd, beats)?;
        boot(&src)?;
        Ok(FerryGuest {
            ferry: ferry.to_path_buf(),
            src,
            n: 0,
        })
    }

    fn ctl(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(&self.ferry)
            .arg("ctl")
            .arg("--api-socket")
            .arg(Self::sock(self.n))
            .args(args)
            .output()?)
    }
}

impl Guest for FerryGuest {
    fn src(&self) -> &Proc {
        &self.src
    }

    fn run(&mut self, on: bool) -> Result<()> {
        let o = self.ctl(&[if on { "resume" } else { "pause" }])?;
        if !o.status.success() {
            bail!("ferry ctl: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(())
    }

    fn migrate(&mut self, case: &Case, mode: &Mode, run: usize) -> Result<Option<Sample>> {
        let Mode::Ferry(_, extra) = mode else {
            unreachable!()
        };
        let n = self.n + 1;
        let url = format!("tcp:127.0.0.1:{}", free_port()?);
        let (fifo, beats) = debug_fifo(&format!("ferry-{n}.hb"))?;
        let dst = Proc::spawn(
            Command::new(&self.ferry)
                .args(["receive", "--listen", &url, "--api-socket"])
                .arg(Self::sock(n))
                .arg("--debug-console")
                .arg(fifo),
            beats,
        )?;
        dst.wait_line(0, MIGRATION_LIMIT, "the destination", |l| {
            l.contains("waiting for a VM")
        })?;
        let mut args = vec!["--json", "migrate", &url, "--timeout", "30s"];
        args.extend_from_slice(extra);
        let o = self.ctl(&args)?;
        let answer: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let r = &answer["report"];
        if answer["ok"] != true {
            eprintln!(
                "{}, {}: run {run}: {}",
                case.name,
                mode.name(),
                String::from_utf8_lossy(&o.stdout)
            );
            return Ok(None);
        }
        self.src.wait_exit(MIGRATION_LIMIT)?;
        let s = Sample {
            total_ms: r["total_ms"].as_f64().unwrap_or(f64::NAN),
            downtime_ms: r["downtime_ms"].as_f64().unwrap_or(f64::NAN),
            blackout_ms: blackout(&self.src, &dst)?,
            bytes: r["bytes"].as_f64().unwrap_or(f64::NAN),
            rounds: r["rounds"].as_f64().unwrap_or(f64::NAN),
        };
        eprintln!(
            "{}, {}: run {run}: {s:?}; rounds {} ms, downtime {}",
            case.name,
            mode.name(),
            r["round_ms"],
            r["downtime_phases"]
        );
        self.src = dst;
        self.n = n;
        Ok(Some(s))
    }
}

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(e).with_context(|| format!("QMP {}", path.display())),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.exec("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn exec(&mut self, cmd: &str, args: Value) -> Result<Value> {
        writeln!(self.w, "{}", json!({"execute": cmd, "arguments": args}))?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                bail!("QMP closed during {cmd}");
            }
            let v: Value = serde_json::from_str(&line)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
        }
    }
}

fn qemu_cmd(case: &Case, qmp: &Path, debugcon: &Path, incoming: bool) -> Command {
    let (kernel, initrd, cmdline) = boot_files(case);
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host"])
        .args(["-m", case.memory, "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel);
    if let Some(initrd) = &initrd {
        c.arg("-initrd").arg(initrd).arg("-append").arg(&cmdline);
    }
    c.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-debugcon")
        .arg(format!("file:{}", debugcon.display()));
    if incoming {
        c.args(["-incoming", "defer"]);
    }
    c
}

fn qemu_setup(q: &mut Qmp, mode: &Mode) -> Result<()> {
    let Mode::Qemu {
        unthrottled,
        downtime_ms,
        capability,
        ..
    } = *mode
    else {
        unreachable!()
    };
    let caps: Vec<Value> = ["auto-converge", "multifd"]
        .iter()
        .map(|c| json!({"capability": c, "state": capability == Some(*c)}))
        .collect();
    q.exec("migrate-set-capabilities", json!({ "capabilities": caps }))?;
    let mut params = json!({"downtime-limit": downtime_ms.unwrap_or(300), "multifd-channels": 2});
    // QEMU 7.2's default is 32 MiB/s.
    params["max-bandwidth"] = json!(if unthrottled {
        1_000_000_000_000u64
    } else {
        32u64 << 20
    });
    q.exec("migrate-set-parameters", params)?;
    Ok(())
}

/// A case's guest under QEMU, kept running across its migrations.
struct QemuGuest {
    src: Proc,
    qmp: Qmp,
    n: usize,
}

impl QemuGuest {
    fn qmp_path(n: usize) -> PathBuf {
        temp(&format!("qemu-{n}.qmp"))
    }

    fn boot(case: &Case) -> Result<QemuGuest> {
        let (fifo, beats) = debug_fifo("qemu-0.hb")?;
        let src = Proc::spawn(&mut qemu_cmd(case, &Self::qmp_path(0), &fifo, false), beats)?;
        let qmp = Qmp::connect(&Self::qmp_path(0))?;
        boot(&src)?;
        Ok(QemuGuest { src, qmp, n: 0 })
    }
}

impl Guest for QemuGuest {
    fn src(&self) -> &Proc {
        &self.src
    }

    fn run(&mut self, on: bool) -> Result<()> {
        self.qmp.exec(if on { "cont" } else { "stop" }, json!({}))?;
        Ok(())
    }

    /// A migration that does not finish in time is cancelled; the guest runs on.
    fn migrate(&mut self, case: &Case, mode: &Mode, run: usize) -> Result<Option<Sample>> {
        let n = self.n + 1;
        let (fifo, beats) = debug_fifo(&format!("qemu-{n}.hb"))?;
        let dst = Proc::spawn(&mut qemu_cmd(case, &Self::qmp_path(n), &fifo, true), beats)?;
        let mut dst_qmp = Qmp::connect(&Self::qmp_path(n))?;
        qemu_setup(&mut dst_qmp, mode)?;
        let uri = format!("tcp:127.0.0.1:{}", free_port()?);
        dst_qmp.exec("migrate-incoming", json!({ "uri": uri }))?;
        qemu_setup(&mut self.qmp, mode)?;
        self.qmp.exec("migrate", json!({ "uri": uri }))?;
        let deadline = Instant::now() + MIGRATION_LIMIT;
        let info = loop {
            let info = self.qmp.exec("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => break Some(info),
                Some("failed") | Some("cancelled") => bail!("QEMU migration: {info}"),
                _ if Instant::now() > deadline => break None,
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let Some(info) = info else {
            eprintln!(
                "{}, {}: run {run}: did not finish in {MIGRATION_LIMIT:?}",
                case.name,
                mode.name()
            );
            self.qmp.exec("migrate_cancel", json!({}))?;
            // The source runs on once the cancel has taken effect.
            let deadline = Instant::now() + MIGRATION_LIMIT;
            while self.qmp.exec("query-status", json!({}))?["status"] != "running" {
                if Instant::now() > deadline {
                    bail!("QEMU did not run again after migrate_cancel");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            return Ok(None);
        };
        let s = Sample {
            total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
            downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
            blackout_ms: blackout(&self.src, &dst)?,
            bytes: info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN),
            rounds: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
        };
        eprintln!("{}, {}: run {run}: {s:?}", case.name, mode.name());
        let _ = self.qmp.exec("quit", json!({}));
        self.src = dst;
        self.qmp = dst_qmp;
        self.n = n;
        Ok(Some(s))
    }
}

/// Both VMMs through every mode of a case, interleaved: each run migrates once in every
/// mode, ferry's modes first in odd runs and QEMU's first in even ones, so that a change in
/// the host's load in the course of the case falls on every mode alike. Each VMM's guest
/// boots once; the one not migrating is paused (the heaviest case's guest keeps a core
/// busy), and resumed and given [`SETTLE_BEATS`] before its next migration.
fn run_case(ferry: &Path, case: &Case, args: &Args) -> Result<(CaseResult, CaseResult)> {
    let want = |vmm: &str| args.only.as_deref().is_none_or(|o| o == vmm);
    let mut f = want("ferry")
        .then(|| FerryGuest::boot(ferry, case))
        .transpose()?;
    let f_beat = f
        .as_ref()
        .map_or(f64::NAN, |g| g.src.heartbeat_interval_ms(500));
    if let Some(g) = &mut f {
        g.run(false)?;
    }
    let mut q = want("qemu").then(|| QemuGuest::boot(case)).transpose()?;
    let q_beat = q
        .as_ref()
        .map_or(f64::NAN, |g| g.src.heartbeat_interval_ms(500));
    if let Some(g) = &mut q {
        g.run(false)?;
    }
    eprintln!(
        "{}: heartbeat interval ferry {f_beat:.2} ms, QEMU {q_beat:.2} ms",
        case.name
    );
    let mut fs: Vec<Vec<Option<Sample>>> = vec![Vec::new(); FERRY_MODES.len()];
    let mut qs: Vec<Vec<Option<Sample>>> = vec![Vec::new(); QEMU_MODES.len()];
    for run in 1..=args.runs {
        for ferry_turn in [run % 2 == 1, run % 2 == 0] {
            let (g, modes, samples): (Option<&mut dyn Guest>, &[Mode], _) = if ferry_turn {
                (f.as_mut().map(|g| g as _), &FERRY_MODES, &mut fs)
            } else {
                (q.as_mut().map(|g| g as _), &QEMU_MODES, &mut qs)
            };
            let Some(g) = g else { continue };
            g.run(true)?;
            for (mode, samples) in modes.iter().zip(samples) {
                settle(g.src())?;
                samples.push(g.migrate(case, mode, run)?);
            }
            g.run(false)?;
        }
    }
    let results = |modes: &[Mode], samples: Vec<Vec<Option<Sample>>>, on: bool| {
        if on {
            modes.iter().copied().zip(samples).collect()
        } else {
            Vec::new()
        }
    };
    Ok((
        (f_beat, results(&FERRY_MODES, fs, f.is_some())),
        (q_beat, results(&QEMU_MODES, qs, q.is_some())),
    ))
}

/// "min / median / max" of the finished samples' field, or "did not finish".
fn cell(samples: &[Option<Sample>], f: impl Fn(&Sample) -> f64, digits: usize) -> String {
    let v: Vec<f64> = samples.iter().flatten().map(&f).collect();
    if v.is_empty() {
        return "did not finish".into();
    }
    let (lo, med, hi) = stats(&v);
    let unfinished = samples.len() - v.len();
    let mut s = format!("{lo:.digits$} / **{med:.digits$}** / {hi:.digits$}");
    if unfinished > 0 {
        s += &format!(" ({unfinished} did not finish)");
    }
    s
}

fn median(samples: &[Option<Sample>], f: impl Fn(&Sample) -> f64) -> Option<f64> {
    let v: Vec<f64> = samples.iter().flatten().map(&f).collect();
    (v.len() == samples.len() && !v.is_empty()).then(|| stats(&v).1)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    ferry_tests::require_kvm();
    let g = ferry_tests::guest::guest();
    let ferry = ferry_binary()?;
    let qemu_version = qemu_version()?;
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| args.cases.is_empty() || args.cases.iter().any(|n| c.name.contains(n.as_str())))
        .collect();
    let mut md = format!("{BEGIN}\n## Live migration: ferry and QEMU side by side\n\n");
    md += &format!(
        "Test guest (tests/guest: Linux 6.1, PVH ELF vmlinux), 1 vCPU, asked for a heartbeat \
         every 1 ms on the debug port (`hb_us=1000 hb_port`; the interval it achieves on this \
         host is given per case: its kernel runs emulated here); the heaviest case boots \
         tests/tiny/pvh_storm.S instead (a PVH ELF both VMMs boot: ring 3 rewriting 256 MiB at \
         native speed, a 1 ms local APIC timer heartbeat), migrated over loopback TCP from one process to a new one, {} runs per mode; \
         per case and VMM the guest boots once and each migration moves it on, after 50 \
         heartbeats at its new host (a guest that just arrived warms up first). Modes are \
         interleaved: every run migrates once in each mode, ferry's modes first in odd runs \
         and QEMU's in even ones, the other VMM's guest paused meanwhile. Cells are \
         min / **median** / max. Total time and downtime as each VMM reports them (ferry: \
         pause to Restored; QEMU: query-migrate); blackout: host time from the last heartbeat \
         of the source to the first of the destination (debug-port bytes: the measure's \
         resolution is the heartbeat interval); MiB on the wire; rounds (QEMU: \
         dirty-sync-count). QEMU `-M microvm,acpi=off -cpu host`, `-incoming defer`.\n\n",
        args.runs
    );
    let mut summary = String::new();
    for case in cases {
        let ((f_beat, f), (q_beat, q)) = run_case(&ferry, case, &args)?;
        if f.is_empty() || q.is_empty() {
            continue;
        }
        md += &format!("### {}\n\nHeartbeat interval the guest achieved (median): ferry {f_beat:.1} ms, QEMU {q_beat:.1} ms.\n\n| mode | total ms | downtime ms | blackout ms | MiB | rounds |\n|---|---|---|---|---|---|\n", case.name);
        for (mode, s) in f.iter().chain(&q) {
            md += &format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                mode.name(),
                cell(s, |x| x.total_ms, 1),
                cell(s, |x| x.downtime_ms, 1),
                cell(s, |x| x.blackout_ms, 1),
                cell(s, |x| x.bytes / 1048576.0, 1),
                cell(s, |x| x.rounds, 0),
            );
        }
        // ferry's defaults against QEMU's best mode on each metric (by median).
        let best = |f: &dyn Fn(&Sample) -> f64| -> Option<(f64, &'static str)> {
            q.iter()
                .filter_map(|(m, s)| median(s, f).map(|v| (v, m.name())))
                .min_by(|a, b| a.0.total_cmp(&b.0))
        };
        let mut line = format!(
            "\n{}: ferry defaults / QEMU's best mode (medians): ",
            case.name
        );
        for (what, get) in [
            (
                "total",
                &(|x: &Sample| x.total_ms) as &dyn Fn(&Sample) -> f64,
            ),
            ("blackout", &|x: &Sample| x.blackout_ms),
        ] {
            match (median(&f[0].1, get), best(get)) {
                (Some(a), Some((b, who))) => {
                    line += &format!("{what} {a:.1} / {b:.1} ms = {:.2} ({who}); ", a / b)
                }
                _ => line += &format!("{what}: n/a; "),
            }
        }
        if let (Some(a), Some(b)) = (
            median(&f[0].1, |x| x.total_ms),
            median(&q[1].1, |x| x.total_ms),
        ) {
            line += &format!("total vs QEMU unthrottled {:.2}", a / b);
        }
        md += &line;
        md += "\n\n";
        summary += &line;
        summary += "\n";
    }
    md += &format!("Host:\n\n{}\n", host_facts(&qemu_version));
    md += &format!(
        "Guest: {}. Reproduce: `cargo build --release --workspace && target/release/migrate-bench --runs {} --write BENCHMARKS.md`\n{END}\n",
        g.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        args.runs
    );
    print!("{md}");
    eprint!("{summary}");
    if let Some(path) = &args.write {
        replace_section(path, BEGIN, END, &md)?;
    }
    let _ = std::fs::remove_dir_all(temp(""));
    Ok(())
}
