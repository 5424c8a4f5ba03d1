//! The Markdown that migrate-bench prints and writes into BENCHMARKS.md: each case's table
//! (min / median / max per mode), the pair lines of --tls and --postcopy, the growth curve of
//! the idle cases, and the section's head and foot.

use ferry_benches::{host_facts, stats};

use super::*;

/// The section's title and the description of how it was measured.
pub fn intro(args: &Args, begin: &str) -> String {
    let sub = if args.named_cases.is_empty() {
        String::new()
    } else {
        format!(", cases with {}", args.named_cases.join("; "))
    };
    let mut md = if args.postcopy {
        format!("{begin}\n## Postcopy: ferry and QEMU side by side{sub}\n\nEach VMM switching to postcopy once one full precopy pass is out (ferry `--postcopy-after 1`, which switches then unless precopy has converged; QEMU `postcopy-ram` on both sides and `migrate-start-postcopy` once `dirty-sync-count` reaches 2) and, for reference, by precopy, in the same run. ")
    } else if args.tls {
        format!("{begin}\n## Live migration over TLS: ferry and QEMU side by side{sub}\n\nEach VMM encrypted (TLS 1.3, certificates made for the run by `ferry tls generate` and read by both: ferry `--tls-dir` on both sides, QEMU `tls-creds-x509` with `verify-peer` on both sides and `tls-hostname`) and, for reference, in plaintext, in the same run. ")
    } else {
        format!("{begin}\n## Live migration: ferry and QEMU side by side{sub}\n\n")
    };
    md += &format!(
        "Test guest (tests/guest: Linux 6.1, PVH ELF vmlinux), 1 vCPU, asked for a heartbeat \
         every 1 ms on the debug port (`hb_us=1000 hb_port`; the interval it achieves on this \
         host is given per case: its kernel runs emulated here); the heaviest cases boot \
         tests/tiny/pvh_storm.S instead (a PVH ELF both VMMs boot: ring 3 rewriting 256 MiB at \
         native speed, a 1 ms local APIC timer heartbeat; with 4 vCPUs, each rewrites its 64 MiB \
         and the host's 2 cores are shared by the 4 vCPU threads and the VMM's own), migrated over loopback TCP from one process to a new one, {} runs per mode; \
         per case and VMM the guest boots once and each migration moves it on, after 50 \
         heartbeats at its new host (a guest that just arrived warms up first). Modes are \
         interleaved: every run migrates once in each mode, ferry's modes first in odd runs \
         and QEMU's in even ones, each VMM's modes in the order shown in odd runs and in \
         reverse in even ones, the other VMM's guest paused meanwhile. Cells are \
         min / **median** / max. Total time and downtime as each VMM reports them (ferry: \
         pause to Restored; QEMU: query-migrate); blackout: host time from the last heartbeat \
         of the source to the first of the destination (debug-port bytes: the measure's \
         resolution is the heartbeat interval); MiB on the wire; rounds (QEMU: \
         dirty-sync-count). QEMU `-M microvm,acpi=off -cpu host`, `-incoming defer`.\n\n",
        args.runs
    );
    md
}

/// The host, the guest and the command that reproduces the section.
pub fn outro(args: &Args, end: &str, qemu_version: &str, g: &ferry_tests::guest::Guest) -> String {
    let mut md = String::new();
    md += &format!("Host:\n\n{}\n", host_facts(qemu_version));
    let named: String = args
        .named_cases
        .iter()
        .map(|c| format!("--case {c:?} "))
        .collect();
    md += &format!(
        "Guest: {}. Reproduce: `cargo build --release --workspace && target/release/migrate-bench {}{named}--runs {} --write BENCHMARKS.md`\n{end}\n",
        g.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        match (args.tls, args.postcopy) {
            (true, _) => "--tls ",
            (_, true) => "--postcopy ",
            _ => "",
        },
        args.runs
    );
    md
}

/// "min / median / max" of the finished samples' field, or "did not finish".
pub fn cell(samples: &[Option<Sample>], f: impl Fn(&Sample) -> f64, digits: usize) -> String {
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

pub fn median(samples: &[Option<Sample>], f: impl Fn(&Sample) -> f64) -> Option<f64> {
    let v: Vec<f64> = samples.iter().flatten().map(&f).collect();
    (v.len() == samples.len() && !v.is_empty()).then(|| stats(&v).1)
}

pub fn section_markers(args: &Args) -> (String, String) {
    let (begin, end) = if args.tls {
        (TLS_BEGIN, TLS_END)
    } else if args.postcopy {
        (POSTCOPY_BEGIN, POSTCOPY_END)
    } else {
        (BEGIN, END)
    };
    if args.named_cases.is_empty() {
        return (begin.into(), end.into());
    }
    let cases = args.named_cases.join("; ").replace("--", "-");
    let mark = |m: &str| format!("{} (cases: {cases}) -->", m.trim_end_matches(" -->"));
    (mark(begin), mark(end))
}

/// An idle case with ferry's defaults' samples and QEMU unthrottled's.
type IdleCase<'a> = (&'a Case, Vec<Option<Sample>>, Vec<Option<Sample>>);

/// The growth curve over the idle cases: ferry's defaults (and QEMU unthrottled beside
/// them), total time per GiB of guest and per GiB actually sent (medians).
pub fn growth(idle: &[IdleCase]) -> String {
    let mut md = "### Growth: idle guests from 256 MiB up\n\nMedians of the cases above. \
        Time per GiB of guest is what a user waits per GiB of the machine; time per GiB sent \
        is the cost of the bytes that move (an idle guest's are few: its zero and untouched \
        pages are never sent); what grows faster than the bytes sent is a cost of the guest's \
        size itself (scanning, dirty-log bitmaps, memslots).\n\n\
        | guest RAM | ferry total ms | ferry MiB sent | ferry ms per GiB of guest | ferry ms per GiB sent | QEMU unthrottled total ms | QEMU ms per GiB of guest |\n\
        |---|---:|---:|---:|---:|---:|---:|\n"
        .to_string();
    for (case, f, q) in idle {
        let gib = vmm::config::parse_size(case.memory).unwrap_or(0) as f64 / (1u64 << 30) as f64;
        let (Some(ft), Some(fb), Some(qt)) = (
            median(f, |x| x.total_ms),
            median(f, |x| x.bytes),
            median(q, |x| x.total_ms),
        ) else {
            continue;
        };
        let sent = fb / (1u64 << 30) as f64;
        md += &format!(
            "| {} | {ft:.1} | {:.1} | {:.1} | {:.0} | {qt:.1} | {:.1} |\n",
            case.memory,
            fb / (1u64 << 20) as f64,
            ft / gib,
            ft / sent,
            qt / gib
        );
    }
    md + "\n"
}

/// `--tls` or `--postcopy`: ferry's first mode (TLS, postcopy) against QEMU's, and each
/// against its own reference mode (plaintext, precopy).
pub fn pair_line(
    case: &Case,
    f: &[(Mode, Vec<Option<Sample>>)],
    q: &[(Mode, Vec<Option<Sample>>)],
    what: &str,
) -> String {
    let mut line = format!("\n{}: ", case.name);
    let total = |x: &Sample| x.total_ms;
    let blackout = |x: &Sample| x.blackout_ms;
    let reference = if what == "TLS" {
        "plaintext"
    } else {
        "precopy"
    };
    for (what, a, b) in [
        (format!("ferry {what} / QEMU {what}"), &f[0].1, &q[0].1),
        (
            format!("ferry {what} / ferry {reference}"),
            &f[0].1,
            &f[1].1,
        ),
        (format!("QEMU {what} / QEMU {reference}"), &q[0].1, &q[1].1),
    ] {
        line += &format!("{what}: ");
        for (m, get) in [
            ("total", &total as &dyn Fn(&Sample) -> f64),
            ("blackout", &blackout),
        ] {
            match (median(a, get), median(b, get)) {
                (Some(x), Some(y)) => line += &format!("{m} {x:.1} / {y:.1} ms = {:.2}, ", x / y),
                _ => line += &format!("{m} n/a, "),
            }
        }
        line.truncate(line.len() - 2);
        line += "; ";
    }
    line.truncate(line.len() - 2);
    line
}

/// `--app`: ferry and QEMU's modes in turn, each through `runs` migrations of the guest's
/// service; the table, and BENCHMARKS.md's section with `--write`.
/// A case's table and its summary line (ferry's defaults against QEMU's best mode).
pub fn case_section(
    case: &Case,
    f_beat: f64,
    q_beat: f64,
    f: &[(Mode, Vec<Option<Sample>>)],
    q: &[(Mode, Vec<Option<Sample>>)],
) -> (String, String) {
    let mut md = String::new();
    md += &format!("### {}\n\nHeartbeat interval the guest achieved (median): ferry {f_beat:.1} ms, QEMU {q_beat:.1} ms.\n\n| mode | total ms | downtime ms | blackout ms | MiB | rounds |\n|---|---|---|---|---|---|\n", case.name);
    for (mode, s) in f.iter().chain(q) {
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

    (md, line)
}
