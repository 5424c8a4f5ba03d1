//! Boot benchmark: time from process start to the guest's first kernel line and to
//! GUEST-READY, for ferry and for QEMU (`-M microvm`) booting the same test guest kernel,
//! initramfs and command line, interleaved in one run. Prints a Markdown table and, with
//! `--write`, replaces the boot section of BENCHMARKS.md.
//!
//!     cargo build --release --workspace
//!     target/release/boot-bench --runs 5 --write BENCHMARKS.md
//!
//! Needs /dev/kvm and `qemu-system-x86_64` (Debian: qemu-system-x86). Run by hand, never in CI.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_benches::{ferry_binary, host_facts, qemu_version, replace_section, stats};
use ferry_tests::guest::Guest;

const BEGIN: &str = "<!-- boot-bench begin -->";
const END: &str = "<!-- boot-bench end -->";

struct Args {
    runs: usize,
    memory: String,
    write: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        runs: 5,
        memory: "256M".into(),
        write: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => a.runs = val()?.parse().context("--runs")?,
            "--memory" => a.memory = val()?,
            "--write" => a.write = Some(PathBuf::from(val()?)),
            "--help" | "-h" => {
                print!(
                    "usage: boot-bench [--runs N] [--memory SIZE] [--write FILE]\n  \
                     --runs N       boots per VMM (default 5)\n  \
                     --memory SIZE  guest RAM (default 256M)\n  \
                     --write FILE   replace the boot section of FILE (BENCHMARKS.md)\n"
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

/// Seconds from spawn to the first kernel line and to GUEST-READY.
fn time_boot(cmd: &mut Command) -> Result<(f64, f64)> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let out = child.stdout.take().context("stdout")?;
    let mut first = None;
    let mut ready = None;
    for line in BufReader::new(out).lines() {
        let line = line?;
        if first.is_none() && line.contains("Linux version") {
            first = Some(start.elapsed().as_secs_f64());
        }
        if line.contains("GUEST-READY") {
            ready = Some(start.elapsed().as_secs_f64());
            break;
        }
        if start.elapsed() > Duration::from_secs(900) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    match (first, ready) {
        (Some(f), Some(r)) => Ok((f, r)),
        _ => bail!("{cmd:?}: no GUEST-READY"),
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    ferry_tests::require_kvm();
    let guest = ferry_tests::guest::guest();
    let ferry = ferry_binary()?;
    let qemu_version = qemu_version()?;
    // Without `quiet` and with the early serial console, so that the first kernel line
    // ("Linux version ...") is printed as soon as the kernel runs, not when the 8250 driver
    // registers late in boot.
    let cmdline = guest
        .cmdline_with("workload=idle hb_ms=1000 earlyprintk=serial,ttyS0,115200")
        .replace(" quiet", "");
    let (mut f_first, mut f_ready, mut q_first, mut q_ready) = (vec![], vec![], vec![], vec![]);
    for run in 1..=args.runs {
        let (a, b) = time_boot(&mut ferry_cmd(&ferry, guest, &args.memory, &cmdline))?;
        eprintln!(
            "run {run}/{}: ferry first line {a:.3} s, GUEST-READY {b:.3} s",
            args.runs
        );
        f_first.push(a);
        f_ready.push(b);
        let (a, b) = time_boot(&mut qemu_cmd(guest, &args.memory, &cmdline))?;
        eprintln!(
            "run {run}/{}: qemu  first line {a:.3} s, GUEST-READY {b:.3} s",
            args.runs
        );
        q_first.push(a);
        q_ready.push(b);
    }
    let md = table(
        &args,
        guest,
        &qemu_version,
        [&f_first, &q_first, &f_ready, &q_ready],
    );
    print!("{md}");
    if let Some(path) = &args.write {
        replace_section(path, BEGIN, END, &md)?;
    }
    Ok(())
}

fn ferry_cmd(ferry: &Path, guest: &Guest, memory: &str, cmdline: &str) -> Command {
    let mut c = Command::new(ferry);
    c.arg("run")
        .arg("--kernel")
        .arg(&guest.vmlinux)
        .arg("--initrd")
        .arg(&guest.initramfs);
    c.args(["--memory", memory, "--vcpus", "1", "--cmdline", cmdline]);
    c
}

fn qemu_cmd(guest: &Guest, memory: &str, cmdline: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        memory,
        "-smp",
        "1",
    ]);
    c.args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
    ]);
    c.arg("-kernel")
        .arg(&guest.vmlinux)
        .arg("-initrd")
        .arg(&guest.initramfs)
        .arg("-append")
        .arg(cmdline);
    c
}

/// The Markdown section: ferry's and QEMU's first kernel line and GUEST-READY times.
fn table(args: &Args, guest: &Guest, qemu_version: &str, times: [&[f64]; 4]) -> String {
    let [f_first, q_first, f_ready, q_ready] = times;
    let row = |name: &str, v: &[f64]| {
        let (lo, med, hi) = stats(v);
        format!("| {name} | {lo:.3} | {med:.3} | {hi:.3} |\n")
    };
    let ratio = |f: &[f64], q: &[f64]| stats(f).1 / stats(q).1;
    let mut md = format!("{BEGIN}\n## Boot: process start to guest milestones\n\n");
    md += &format!(
        "Test guest (tests/guest: Linux 6.1, PVH ELF vmlinux, {} initramfs bytes), 1 vCPU, {} RAM, \
         `workload=idle`, the test guest's command line without `quiet` and with `earlyprintk=serial,ttyS0,115200`; {} runs each, ferry and \
         QEMU interleaved. Seconds.\n\n",
        std::fs::metadata(&guest.initramfs).map(|m| m.len()).unwrap_or(0),
        args.memory,
        args.runs
    );
    md += "| VMM, milestone | min | median | max |\n|---|---|---|---|\n";
    md += &row("ferry, first kernel line", f_first);
    md += &row("QEMU `-M microvm,acpi=off`, first kernel line", q_first);
    md += &row("ferry, GUEST-READY", f_ready);
    md += &row("QEMU `-M microvm,acpi=off`, GUEST-READY", q_ready);
    md += &format!(
        "\nRatio of medians ferry/QEMU: first kernel line {:.2}, GUEST-READY {:.2}.\n\n",
        ratio(f_first, q_first),
        ratio(f_ready, q_ready)
    );
    md += &format!("Host:\n\n{}\n", host_facts(qemu_version));
    md += &format!(
        "Reproduce: `cargo build --release --workspace && target/release/boot-bench --runs {} --memory {} --write BENCHMARKS.md`\n{END}\n",
        args.runs, args.memory
    );
    md
}
