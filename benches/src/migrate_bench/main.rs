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

mod app;
mod cases;
mod ferry;
mod proc;
mod qemu;
mod report;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_benches::{ferry_binary, host_facts, qemu_version, replace_section, stats};

use cases::*;
use ferry::FerryGuest;
use proc::*;
use qemu::QemuGuest;
use report::{case_section, growth, pair_line, section_markers};

const BEGIN: &str = "<!-- migrate-bench begin -->";
const END: &str = "<!-- migrate-bench end -->";
const APP_BEGIN: &str = "<!-- migrate-bench app begin -->";
const APP_END: &str = "<!-- migrate-bench app end -->";
const TLS_BEGIN: &str = "<!-- migrate-bench tls begin -->";
const TLS_END: &str = "<!-- migrate-bench tls end -->";
const POSTCOPY_BEGIN: &str = "<!-- migrate-bench postcopy begin -->";
const POSTCOPY_END: &str = "<!-- migrate-bench postcopy end -->";
/// A migration that has not finished by then counts as not finished (and is cancelled).
const MIGRATION_LIMIT: Duration = Duration::from_secs(30);
const BOOT_LIMIT: Duration = Duration::from_secs(900);

const USAGE: &str = "\
usage: migrate-bench [--runs N] [--write FILE] [--case NAME]... [--only ferry|qemu] [--app]
  --runs N       migrations per mode and case (default 5)
  --app          the application's view instead of the cases: the guest's service with a
                 disk and a card on a bridge, a client streaming requests and UDP probes
                 every 1 ms while it migrates (needs root and ip(8))
  --tls          each VMM over TLS (certificates made for the run, both sides
                 authenticated: ferry --tls-dir, QEMU tls-creds-x509) and in plaintext
  --postcopy     each VMM switching to postcopy after one full pass (ferry --postcopy-after 1,
                 QEMU postcopy-ram and migrate-start-postcopy) and by precopy; by default
                 the heaviest case and 1 GiB with 128 MiB dirtied
  --write FILE   replace the migration section of FILE (BENCHMARKS.md) with the table
  --case NAME    only the cases whose name contains NAME (repeatable; default all); with
                 --write, they get a section of their own beside the full run's
  --only VMM     only ferry's or only QEMU's modes (default both)
";

struct Args {
    runs: usize,
    write: Option<PathBuf>,
    cases: Vec<String>,
    /// The cases named by `--case` (not the ones a mode picks by default): a run of these
    /// writes its own section, leaving the full table alone.
    named_cases: Vec<String>,
    /// Only this VMM ("ferry" or "qemu"); both by default.
    only: Option<String>,
    /// The application's view (app.rs) instead of the cases.
    app: bool,
    /// Encrypted against plaintext (cases::FERRY_TLS_MODES, QEMU_TLS_MODES).
    tls: bool,
    /// Postcopy against precopy (cases::FERRY_POSTCOPY_MODES, QEMU_POSTCOPY_MODES).
    postcopy: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        runs: 5,
        write: None,
        cases: Vec::new(),
        named_cases: Vec::new(),
        only: None,
        app: false,
        tls: false,
        postcopy: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => a.runs = val()?.parse().context("--runs")?,
            "--write" => a.write = Some(PathBuf::from(val()?)),
            "--case" => a.cases.push(val()?),
            "--only" => a.only = Some(val()?),
            "--app" => a.app = true,
            "--tls" => a.tls = true,
            "--postcopy" => a.postcopy = true,
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
    if a.tls && a.postcopy {
        bail!("--tls and --postcopy are separate runs");
    }
    a.named_cases = a.cases.clone();
    if a.postcopy && a.cases.is_empty() {
        a.cases = vec![
            "rewritten from ring 3".into(),
            "1 GiB, 128 MiB dirtied".into(),
        ];
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

/// Both VMMs through every mode of a case, interleaved: each run migrates once in every
/// mode, ferry's modes first in odd runs and QEMU's first in even ones, and each VMM's modes
/// in order in odd runs and in reverse in even ones, so that a change in the host's load in
/// the course of the case falls on every mode alike. Each VMM's guest
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
    let (fmodes, qmodes): (&[Mode], &[Mode]) = if args.tls {
        (&FERRY_TLS_MODES, &QEMU_TLS_MODES)
    } else if args.postcopy {
        (&FERRY_POSTCOPY_MODES, &QEMU_POSTCOPY_MODES)
    } else {
        (&FERRY_MODES, &QEMU_MODES)
    };
    let mut fs: Vec<Vec<Option<Sample>>> = vec![Vec::new(); fmodes.len()];
    let mut qs: Vec<Vec<Option<Sample>>> = vec![Vec::new(); qmodes.len()];
    for run in 1..=args.runs {
        for ferry_turn in [run % 2 == 1, run % 2 == 0] {
            let (g, modes, samples): (Option<&mut dyn Guest>, &[Mode], _) = if ferry_turn {
                (f.as_mut().map(|g| g as _), fmodes, &mut fs)
            } else {
                (q.as_mut().map(|g| g as _), qmodes, &mut qs)
            };
            let Some(g) = g else { continue };
            g.run(true)?;
            // In order in odd runs, in reverse in even ones: a cost that falls on whichever
            // mode goes first (the destination's first touch of fresh RAM) falls on each.
            let mut order: Vec<usize> = (0..modes.len()).collect();
            if run % 2 == 0 {
                order.reverse();
            }
            for i in order {
                settle(g.src())?;
                samples[i].push(g.migrate(case, &modes[i], run)?);
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
        (f_beat, results(fmodes, fs, f.is_some())),
        (q_beat, results(qmodes, qs, q.is_some())),
    ))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    ferry_tests::require_kvm();
    let g = ferry_tests::guest::guest();
    let ferry = ferry_binary()?;
    // QEMU is needed only where its modes run: checked before anything is built or booted.
    let qemu_version = match args.only.as_deref() {
        Some("ferry") => "none (--only ferry)".to_string(),
        _ => qemu_version()?,
    };
    if args.app {
        return app_main(&ferry, &args, &qemu_version);
    }
    if args.tls {
        let g = vmm::migrate::TlsGenerate::new(&tls_dir(), vec!["127.0.0.1".into()]);
        vmm::migrate::tls_generate(&tls_dir(), &g)?;
    }
    let (begin, end) = section_markers(&args);
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| args.cases.is_empty() || args.cases.iter().any(|n| c.name.contains(n.as_str())))
        .collect();
    let mut md = report::intro(&args, &begin);
    let mut summary = String::new();
    let mut idle = Vec::new();
    for case in cases {
        let ((f_beat, f), (q_beat, q)) = run_case(&ferry, case, &args)?;
        if f.is_empty() || q.is_empty() {
            continue;
        }
        if case.guest == CaseGuest::Linux("workload=idle") {
            idle.push((case, f[0].1.clone(), q[1].1.clone()));
        }
        let (section, line) = if args.tls || args.postcopy {
            let (s, _) = case_section(case, f_beat, q_beat, &f, &q);
            (
                s,
                pair_line(case, &f, &q, if args.tls { "TLS" } else { "postcopy" }),
            )
        } else {
            case_section(case, f_beat, q_beat, &f, &q)
        };
        md += &section;
        md += &line;
        md += "\n\n";
        summary += &line;
        summary += "\n";
    }
    if idle.len() >= 2 && !args.tls && !args.postcopy {
        md += &growth(&idle);
    }
    md += &report::outro(&args, &end, &qemu_version, g);
    print!("{md}");
    eprint!("{summary}");
    if let Some(path) = &args.write {
        replace_section(path, &begin, &end, &md)?;
    }
    let _ = std::fs::remove_dir_all(temp(""));
    Ok(())
}

/// The markers of the section a run writes: one per kind of run (plain, `--tls`,
/// `--postcopy`), and one more per set of cases named with `--case`, so that a run of some
/// cases does not replace the table of a full run.
fn app_main(ferry: &Path, args: &Args, qemu_version: &str) -> Result<()> {
    let want = |vmm: &str| args.only.as_deref().is_none_or(|o| o == vmm);
    let mut vmms = Vec::new();
    if want("ferry") {
        vmms.push(app::Vmm::Ferry(ferry.to_path_buf()));
    }
    if want("qemu") {
        vmms.extend(QEMU_MODES[..3].iter().map(|m| app::Vmm::Qemu(*m)));
    }
    let results = vmms
        .into_iter()
        .map(|v| app::run_app(v, args.runs))
        .collect::<Result<Vec<_>>>()?;
    let (table, line) = app::app_table(&results);
    let md = format!(
        "{APP_BEGIN}\n## Live migration as the application sees it\n\n\
         The test guest (1 vCPU, 256 MiB) runs its network service \
         (tests/guest/ferry_service.c) with a {} MiB virtio disk and a virtio network card on \
         a tap of a bridge in a network namespace of its own; QEMU: microvm, \
         virtio-blk-device, virtio-net-device, tap without vhost. From the host, in that \
         namespace, one client sends requests back to back on one TCP connection (each \
         answered once its record is on the disk, about 30 ms each on this host, whose \
         guest kernel runs emulated) and another sends a UDP probe every {} ms to the \
         service's echo (every 1 ms, the emulated guest kernel spends itself echoing and \
         the request stream starves, under either VMM: 10 requests answered in a run \
         instead of 200; at 50 ms the probes cost it about a third). Each VMM's guest boots once and migrates {} times, each time to a \
         new process whose card is on the other tap, 2 s apart. Per migration: the longest \
         gap between two answers that overlaps it (from its start to 1 s after its end), the \
         probes lost in that window (the emulated guest also drops probes when busy, under \
         both VMMs), the total time and downtime each VMM reports, and whether the one TCP \
         connection lived through every migration. A gap holds the request in progress \
         (about 35 ms here) and the guest's first steps at its new host, where this host's \
         KVM maps an emulated guest kernel's memory anew page by page; the downtime column is \
         each VMM's own account of its pause. Cells are min / **median** / max.\n\n\
         {table}{line}\nHost:\n\n{}\n\
         Reproduce: `cargo build --release --workspace && target/release/migrate-bench --app \
         --runs {} --write BENCHMARKS.md`\n{APP_END}\n",
        app::DISK_MB,
        app::PROBE_INTERVAL.as_millis(),
        args.runs,
        host_facts(qemu_version),
        args.runs
    );
    print!("{md}");
    eprint!("{line}");
    if let Some(path) = &args.write {
        replace_section(path, APP_BEGIN, APP_END, &md)?;
    }
    let _ = std::fs::remove_dir_all(temp(""));
    Ok(())
}
