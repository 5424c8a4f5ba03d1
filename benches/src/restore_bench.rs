//! Restore benchmark: `ferry restore` from process start to the VM loaded, to the first
//! KVM_RUN and to the guest's first heartbeat, with the snapshot file in the page cache and
//! dropped from it; snapshot creation (`ferry ctl snapshot` on the running guest); and
//! ferry's start-up broken down by milestone (`--timeline`), for `ferry restore` and for
//! `ferry run`. Prints Markdown and, with `--write`, replaces the restore section of
//! BENCHMARKS.md.
//!
//!     cargo build --release --workspace
//!     target/release/restore-bench --runs 10 --write BENCHMARKS.md
//!
//! Needs /dev/kvm and root (to drop a file's cached pages). Run by hand, never in CI.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_benches::{ferry_binary, host_facts, replace_section, stats};
use vmm::timeline::monotonic;

const BEGIN: &str = "<!-- restore-bench begin -->";
const END: &str = "<!-- restore-bench end -->";

struct Args {
    runs: usize,
    sizes: Vec<String>,
    write: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        runs: 10,
        sizes: vec!["256M".into(), "2G".into()],
        write: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => a.runs = val()?.parse().context("--runs")?,
            "--sizes" => a.sizes = val()?.split(',').map(String::from).collect(),
            "--write" => a.write = Some(PathBuf::from(val()?)),
            "--help" | "-h" => {
                print!(
                    "usage: restore-bench [--runs N] [--sizes 256M,2G] [--write FILE]\n  \
                     --runs N        restores per case, snapshots per size (default 10)\n  \
                     --sizes A,B     guest RAM sizes (default 256M,2G)\n  \
                     --write FILE    replace the restore section of FILE (BENCHMARKS.md)\n"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(a)
}

/// ferry's `--timeline` line: main's CLOCK_MONOTONIC time, each milestone in ms after main,
/// and the CPU time at the first KVM_RUN.
#[derive(Debug, Clone)]
struct Timeline {
    main: f64,
    marks: Vec<(String, f64)>,
    cpu_ms: f64,
}

fn parse_timeline(line: &str) -> Option<Timeline> {
    let rest = line.strip_prefix("ferry: timeline: main at ")?;
    let mut parts = rest.split("; ");
    let main: f64 = parts.next()?.split(' ').next()?.parse().ok()?;
    let marks = parts
        .next()?
        .split(", ")
        .map(|m| {
            let m = m.strip_suffix(" ms")?;
            let (name, ms) = m.rsplit_once(' ')?;
            Some((name.to_string(), ms.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    let cpu_ms = parts
        .next()?
        .strip_prefix("CPU ")?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some(Timeline {
        main,
        marks,
        cpu_ms,
    })
}

/// One start: ms from spawn to main and the timeline; ms from spawn to the first heartbeat
/// (restores only).
struct Start {
    spawn_to_main: f64,
    timeline: Timeline,
    heartbeat: Option<f64>,
}

impl Start {
    /// ms from spawn to milestone `name`.
    fn at(&self, name: &str) -> f64 {
        let m = self.timeline.marks.iter().find(|(n, _)| n == name);
        self.spawn_to_main + m.map_or(f64::NAN, |(_, ms)| *ms)
    }
}

fn mkfifo(path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    if !Command::new("mkfifo").arg(path).status()?.success() {
        bail!("mkfifo {}", path.display());
    }
    Ok(())
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("restore-bench-{}-{name}", std::process::id()))
}

/// Reads `child`'s stderr until the timeline line.
fn read_timeline(child: &mut Child) -> Result<Timeline> {
    let err = child.stderr.take().context("stderr")?;
    for line in BufReader::new(err).lines() {
        let line = line?;
        if let Some(t) = parse_timeline(&line) {
            return Ok(t);
        }
        if line.contains("error") {
            bail!("{line}");
        }
    }
    bail!("no timeline line")
}

/// Spawns `cmd` (a ferry with `--timeline`, its debug console on `fifo` if given), waits for
/// its timeline and its first heartbeat byte, then kills it.
fn start_once(mut cmd: Command, fifo: Option<&Path>) -> Result<Start> {
    cmd.arg("--timeline")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t0 = monotonic();
    let mut child = cmd.spawn().context("spawn ferry")?;
    let heartbeat = match fifo {
        Some(f) => {
            let mut beat = [0u8; 1];
            std::fs::File::open(f)?.read_exact(&mut beat)?;
            Some((monotonic() - t0) * 1e3)
        }
        None => None,
    };
    let timeline = read_timeline(&mut child);
    let _ = child.kill();
    let _ = child.wait();
    let timeline = timeline?;
    Ok(Start {
        spawn_to_main: (timeline.main - t0) * 1e3,
        timeline,
        heartbeat,
    })
}

/// A running test guest that heartbeats every millisecond on its debug console.
struct Source {
    child: Child,
    sock: PathBuf,
}

fn cmdline() -> String {
    ferry_tests::guest::guest().cmdline_with("hb_us=1000 hb_port")
}

fn boot_source(ferry: &Path, memory: &str) -> Result<Source> {
    let guest = ferry_tests::guest::guest();
    let (sock, fifo) = (temp("source.sock"), temp("source.hb"));
    mkfifo(&fifo)?;
    let child = Command::new(ferry)
        .args(["run", "--kernel"])
        .arg(&guest.vmlinux)
        .arg("--initrd")
        .arg(&guest.initramfs)
        .args(["--memory", memory, "--cmdline", &cmdline(), "--api-socket"])
        .arg(&sock)
        .arg("--debug-console")
        .arg(&fifo)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // 200 heartbeats: the guest is up and idle.
    let mut beats = vec![0u8; 200];
    std::fs::File::open(&fifo)?.read_exact(&mut beats)?;
    // Keep draining, so that the guest never blocks on a full FIFO.
    std::thread::spawn(move || {
        let Ok(mut f) = std::fs::File::open(&fifo) else {
            return;
        };
        let mut buf = [0u8; 4096];
        while let Ok(1..) = f.read(&mut buf) {}
    });
    Ok(Source { child, sock })
}

/// One snapshot of the running source: ferry's own time (ms), the wall time of `ferry ctl
/// snapshot` (ms).
fn snapshot(ferry: &Path, src: &Source, file: &Path) -> Result<(f64, f64)> {
    let t = Instant::now();
    let out = Command::new(ferry)
        .args(["ctl", "--api-socket"])
        .arg(&src.sock)
        .arg("snapshot")
        .arg(file)
        .output()?;
    let wall = t.elapsed().as_secs_f64() * 1e3;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "ferry ctl snapshot: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ms = text
        .split(" in ")
        .nth(1)
        .and_then(|r| r.split(" ms").next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no time in {text:?}"))?;
    Ok((ms, wall))
}

/// Everything measured for one guest size.
struct SizeResult {
    memory: String,
    create: Vec<(f64, f64)>,
    file_len: u64,
    on_disk: u64,
    warm: Vec<Start>,
    cold: Vec<Start>,
    run: Vec<Start>,
}

fn measure_size(ferry: &Path, memory: &str, runs: usize) -> Result<SizeResult> {
    use std::os::unix::fs::MetadataExt;
    let file = temp(&format!("{memory}.snap"));
    let src = boot_source(ferry, memory)?;
    let mut create = Vec::new();
    for i in 0..runs {
        create.push(snapshot(ferry, &src, &file)?);
        eprintln!("{memory}: snapshot {}/{runs}: {:?} ms", i + 1, create[i]);
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut src = src;
    let _ = src.child.kill();
    let _ = src.child.wait();
    let meta = std::fs::metadata(&file)?;
    let (mut warm, mut cold, mut run) = (Vec::new(), Vec::new(), Vec::new());
    let guest = ferry_tests::guest::guest();
    for i in 0..runs {
        for dropped in [false, true] {
            if dropped {
                vmm::files::drop_cached(&file)?;
            } else {
                // Warm: read once so that every page of it is cached.
                std::io::copy(&mut std::fs::File::open(&file)?, &mut std::io::sink())?;
            }
            let fifo = temp("restore.hb");
            mkfifo(&fifo)?;
            let mut cmd = Command::new(ferry);
            cmd.arg("restore")
                .arg(&file)
                .arg("--debug-console")
                .arg(&fifo);
            let s = start_once(cmd, Some(&fifo))?;
            eprintln!(
                "{memory}: restore {}/{runs} ({}): loaded {:.1} ms, first KVM_RUN {:.1} ms, heartbeat {:.1} ms",
                i + 1,
                if dropped { "dropped" } else { "warm" },
                s.at("loaded"),
                s.at("first KVM_RUN"),
                s.heartbeat.unwrap_or(f64::NAN)
            );
            if dropped { &mut cold } else { &mut warm }.push(s);
        }
        let mut cmd = Command::new(ferry);
        cmd.args(["run", "--kernel"])
            .arg(&guest.vmlinux)
            .arg("--initrd")
            .arg(&guest.initramfs)
            .args(["--memory", memory, "--cmdline", &cmdline()]);
        run.push(start_once(cmd, None)?);
    }
    let _ = std::fs::remove_file(&file);
    Ok(SizeResult {
        memory: memory.into(),
        create,
        file_len: meta.len(),
        on_disk: meta.blocks() * 512,
        warm,
        cold,
        run,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    ferry_tests::require_kvm();
    let ferry = ferry_binary()?;
    let mut results = Vec::new();
    for size in &args.sizes {
        results.push(measure_size(&ferry, size, args.runs)?);
    }
    let md = report(&args, &results);
    print!("{md}");
    if let Some(path) = &args.write {
        replace_section(path, BEGIN, END, &md)?;
    }
    Ok(())
}

/// "min / **median** / max" of `v`.
fn cell(v: &[f64]) -> String {
    let (lo, med, hi) = stats(v);
    format!("{lo:.1} / **{med:.1}** / {hi:.1}")
}

fn median(v: &[f64]) -> f64 {
    stats(v).1
}

/// The breakdown of `starts` (one kind of start): each milestone's median time after spawn
/// and the median step from the milestone before.
fn breakdown(starts: &[Start]) -> String {
    let names: Vec<String> = starts[0]
        .timeline
        .marks
        .iter()
        .map(|m| m.0.clone())
        .collect();
    let mut md =
        "| milestone | ms after spawn (median) | step (median) |\n|---|---:|---:|\n".to_string();
    let main: Vec<f64> = starts.iter().map(|s| s.spawn_to_main).collect();
    md += &format!(
        "| main (exec, loader, Rust runtime) | {:.2} | {:.2} |\n",
        median(&main),
        median(&main)
    );
    let mut prev = main;
    for name in names {
        let at: Vec<f64> = starts.iter().map(|s| s.at(&name)).collect();
        let step: Vec<f64> = at.iter().zip(&prev).map(|(a, p)| a - p).collect();
        md += &format!("| {name} | {:.2} | {:.2} |\n", median(&at), median(&step));
        prev = at;
    }
    let cpu: Vec<f64> = starts.iter().map(|s| s.timeline.cpu_ms).collect();
    md += &format!(
        "| CPU time of the process to first KVM_RUN | {} | |\n",
        cell(&cpu)
    );
    md
}

fn report(args: &Args, results: &[SizeResult]) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut md = format!("{BEGIN}\n## Restore: process start to a running guest\n\n");
    md += &format!(
        "Test guest (tests/guest: Linux 6.1), 1 vCPU, heartbeat every 1 ms on the debug port \
         (`hb_us=1000 hb_port`), booted, snapshotted {} times while it runs (`ferry ctl \
         snapshot`), then restored {} times per case from the last snapshot by `ferry restore \
         --timeline` in a new process, the file in the page cache (read once before) and \
         dropped from it (`posix_fadvise DONTNEED`) in turn. Times from the benchmark's spawn \
         (CLOCK_MONOTONIC, the clock of ferry's milestones): *loaded* = the VM built and its \
         state in, vCPUs ready (Firecracker's \"snapshot loaded\"); *first KVM_RUN* = a vCPU \
         enters the guest; *first heartbeat* = the guest's first byte on the debug console \
         after the restore. Cells are min / **median** / max in ms. Firecracker's figures are \
         the ones quoted for this kind of host (256 MiB), not measured here.\n\n",
        args.runs, args.runs
    );
    md += "| guest RAM, snapshot file | loaded | first KVM_RUN | first heartbeat | CPU to first KVM_RUN |\n|---|---|---|---|---|\n";
    for r in results {
        for (what, starts) in [("page cache", &r.warm), ("dropped", &r.cold)] {
            let v = |f: &dyn Fn(&Start) -> f64| starts.iter().map(f).collect::<Vec<_>>();
            md += &format!(
                "| {}, {what} | {} | {} | {} | {} |\n",
                r.memory,
                cell(&v(&|s| s.at("loaded"))),
                cell(&v(&|s| s.at("first KVM_RUN"))),
                cell(&v(&|s| s.heartbeat.unwrap_or(f64::NAN))),
                cell(&v(&|s| s.timeline.cpu_ms)),
            );
        }
    }
    md += "| Firecracker, 256 MiB (quoted) | 27 | | 75 | |\n\n";
    md += "### Snapshot creation\n\n`ferry ctl snapshot FILE` on the running guest: pause, save, write the file \
           (non-zero pages; the file is synced and renamed into place), resume. ferry's own time \
           as it reports it, and the wall time of the `ferry ctl` command.\n\n";
    md += "| guest RAM | ferry's time ms | `ferry ctl` wall ms | file length | on disk |\n|---|---|---|---:|---:|\n";
    for r in results {
        let (own, wall): (Vec<f64>, Vec<f64>) = r.create.iter().copied().unzip();
        md += &format!(
            "| {} | {} | {} | {:.0} MiB | {:.1} MiB |\n",
            r.memory,
            cell(&own),
            cell(&wall),
            mib(r.file_len),
            mib(r.on_disk)
        );
    }
    md += "| Firecracker, 256 MiB (quoted) | 265 | | | |\n\n";
    if let Some(r) = results.first() {
        md += &format!(
            "### ferry's start-up, broken down ({})\n\n`ferry restore` from the page cache:\n\n{}\n`ferry run` of the same guest (kernel and initramfs loaded, to its first instruction):\n\n{}\n",
            r.memory,
            breakdown(&r.warm),
            breakdown(&r.run)
        );
    }
    md += &format!("Host:\n\n{}\n", host_facts("not used"));
    md += &format!(
        "Reproduce: `cargo build --release --workspace && target/release/restore-bench --runs {} --sizes {} --write BENCHMARKS.md`\n{END}\n",
        args.runs,
        args.sizes.join(",")
    );
    md
}
