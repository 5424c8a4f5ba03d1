//! `ferry ctl`: one request to a running ferry's HTTP API (vmm::api), its answer printed for
//! people (or as a JSON line with `--json`). Exit 0 when the answer is ok. A migration's
//! progress line comes from ferry.progress, asked on another connection while it runs.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;
use vmm::api::client::{self, Reply};
use vmm::api::wire::{self, MigrateRequest, Request};
use vmm::config::parse_size;
use vmm::migrate::{Progress, Report};

use super::args::{CtlArgs, CtlCmd};

/// How long ferry ctl waits for each line of an answer.
const WAIT: Duration = Duration::from_secs(600);

/// Prints a line to stdout; a reader that went away (`| head`) is not an error.
fn say(line: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// A warning for a migration sent in plaintext on purpose (--insecure).
fn warn_insecure(req: &Request) {
    if let Request::Migrate(m) = req {
        if m.insecure && m.key_file.is_none() && m.tls_dir.is_none() {
            eprintln!(
                "ferry: warning: --insecure: the guest's memory and state go to {} unencrypted and unauthenticated",
                m.destination_url
            );
        }
    }
}

pub fn ctl(a: CtlArgs) -> anyhow::Result<ExitCode> {
    let req = request(&a.cmd)?;
    let name = command_name(&req);
    warn_insecure(&req);
    let show_progress = !a.json && std::io::stderr().is_terminal();
    let s = &a.api_socket;
    let result = match &req {
        Request::Status => call(s, &req, a.json, |st: wire::Status| {
            format!(
                "state: {}, vcpus: {}, memory: {} MiB",
                st.state,
                st.vcpus.len(),
                st.memory >> 20
            )
        }),
        Request::Pause
        | Request::Resume
        | Request::Stop
        | Request::Shutdown
        | Request::Boot
        | Request::Restore(_)
        | Request::Receive(_) => call(s, &req, a.json, |st: wire::StateAnswer| {
            format!("state: {}", st.state)
        }),
        Request::Create(_) | Request::Delete => call(s, &req, a.json, |_: serde_json::Value| {
            format!("{name}: done")
        }),
        Request::Cancel => call(s, &req, a.json, |_: wire::Cancelled| {
            "migration cancelled; the guest runs here".to_string()
        }),
        Request::Cpuid => call(s, &req, a.json, |c: wire::Cpuid| cpuid_text(&c)),
        Request::Snapshot { .. } => call(s, &req, a.json, |r: wire::Snapshot| {
            format!(
                "snapshot: {} bytes to {} in {:.1} ms ({} memory ranges); VM {}",
                r.bytes,
                r.path.display(),
                r.ms,
                r.memory_ranges,
                r.state
            )
        }),
        Request::Migrate(_) => with_progress(s, show_progress, || {
            call(s, &req, a.json, |m: wire::Migrated| report_line(&m.report))
        }),
        Request::Metrics => metrics(s),
        Request::CpuCheck(_) => call(s, &req, a.json, cpu_check_text),
        Request::Ping | Request::Info | Request::Counters | Request::Progress => {
            call(s, &req, a.json, |v: serde_json::Value| v.to_string())
        }
    };
    match result? {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(failure) => {
            // A cancelled migration's report is printed for people, then its error.
            if let (false, Some(r)) = (a.json, &failure.report) {
                say(&report_line(r));
            }
            anyhow::bail!("{name}: {}", failure.message)
        }
    }
}

/// Runs `work` (a migration) while another thread shows its progress line on stderr, if
/// `show`, from ferry.progress ten times a second.
fn with_progress<R>(socket: &Path, show: bool, work: impl FnOnce() -> R) -> R {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let shown = scope.spawn(|| {
            let mut shown = false;
            while show && !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let asked = client::call::<Progress>(socket, &Request::Progress, WAIT);
                if let Ok(Reply { answer: Ok(p), .. }) = asked {
                    shown = true;
                    eprint!("\r\x1b[K{}", progress_line(&p));
                }
            }
            shown
        });
        let result = work();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        if shown.join().unwrap_or(false) {
            eprintln!();
        }
        result
    })
}

/// ferry.metrics' text, printed as it comes (Prometheus' format).
fn metrics(socket: &Path) -> anyhow::Result<Result<(), wire::Failure>> {
    let r = client::request(socket, "GET", "/api/v1/ferry.metrics", None, WAIT)?;
    if r.status == 200 {
        let _ = std::io::stdout().lock().write_all(&r.body);
        return Ok(Ok(()));
    }
    Ok(Err(serde_json::from_slice(&r.body).with_context(|| {
        format!("a {} answer to ferry.metrics", r.status)
    })?))
}

/// Sends `req`, prints the ok answer (the line with `json`, else `text` of it) and returns
/// the failure, if the answer is one, for the caller to report.
fn call<T: DeserializeOwned>(
    socket: &Path,
    req: &Request,
    json: bool,
    text: impl FnOnce(T) -> String,
) -> anyhow::Result<Result<(), wire::Failure>> {
    let Reply { line, answer } = client::call::<T>(socket, req, WAIT)?;
    if json {
        say(&line);
    }
    Ok(match answer {
        Ok(t) => {
            if !json {
                say(&text(t));
            }
            Ok(())
        }
        Err(f) => Err(f),
    })
}

fn command_name(req: &Request) -> &'static str {
    match req {
        Request::Status => "status",
        Request::Ping => "ping",
        Request::Info => "info",
        Request::Counters => "counters",
        Request::Progress => "progress",
        Request::Metrics => "metrics",
        Request::CpuCheck(_) => "cpu-check",
        Request::Shutdown => "shutdown",
        Request::Cpuid => "cpuid",
        Request::Pause => "pause",
        Request::Resume => "resume",
        Request::Stop => "stop",
        Request::Cancel => "cancel",
        Request::Snapshot { .. } => "snapshot",
        Request::Migrate(_) => "migrate",
        Request::Create(_) => "create",
        Request::Boot => "boot",
        Request::Delete => "delete",
        Request::Restore(_) => "restore",
        Request::Receive(_) => "receive",
    }
}

/// The request a `ferry ctl` command line asks for. Paths go absolute: the server resolves
/// them in its own working directory.
fn request(cmd: &CtlCmd) -> anyhow::Result<Request> {
    let absolute = |p: &Path| std::path::absolute(p).with_context(|| format!("{}", p.display()));
    Ok(match cmd {
        CtlCmd::Status => Request::Status,
        CtlCmd::Metrics => Request::Metrics,
        CtlCmd::CpuCheck { profile } => Request::CpuCheck(wire::CpuCheckRequest {
            profile: profile.clone(),
        }),
        CtlCmd::Create { config } => Request::Create(Box::new(read_config(config)?)),
        CtlCmd::Boot => Request::Boot,
        CtlCmd::Delete => Request::Delete,
        CtlCmd::Restore { file, paused } => Request::Restore(vmm::api::create::RestoreRequest {
            source_url: format!("file://{}", absolute(file)?.display()),
            prefault: false,
            paused: *paused,
        }),
        CtlCmd::Receive { url } => Request::Receive(Box::new(vmm::api::create::ReceiveRequest {
            receiver_url: url.clone(),
            ..Default::default()
        })),
        CtlCmd::Ping => Request::Ping,
        CtlCmd::Info => Request::Info,
        CtlCmd::Counters => Request::Counters,
        CtlCmd::Pause => Request::Pause,
        CtlCmd::Resume => Request::Resume,
        CtlCmd::Stop => Request::Stop,
        CtlCmd::Cpuid => Request::Cpuid,
        CtlCmd::Cancel => Request::Cancel,
        CtlCmd::Snapshot { file, stop } => Request::Snapshot {
            path: absolute(file)?,
            stop: *stop,
        },
        CtlCmd::Migrate {
            url,
            max_downtime,
            timeout,
            max_bandwidth,
            max_throttle,
            key_file,
            tls_dir,
            tls_name,
            peer_timeout,
            postcopy_after,
            insecure,
        } => Request::Migrate(Box::new(MigrateRequest {
            destination_url: url.clone(),
            local: false,
            max_downtime_ms: Some(max_downtime.as_secs_f64() * 1e3),
            timeout_ms: Some(timeout.as_secs_f64() * 1e3),
            max_bandwidth: max_bandwidth
                .as_deref()
                .map(|b| parse_size(b).context("--max-bandwidth"))
                .transpose()?,
            max_throttle: Some(*max_throttle),
            key_file: key_file.as_deref().map(absolute).transpose()?,
            tls_dir: tls_dir.as_deref().map(absolute).transpose()?,
            tls_name: tls_name.clone(),
            peer_timeout_ms: Some(peer_timeout.as_secs_f64() * 1e3),
            postcopy_after: *postcopy_after,
            insecure: *insecure,
            ..Default::default()
        })),
    })
}

/// vm.create's body from a JSON file (`-`: stdin), as ch-remote create takes it.
fn read_config(path: &Path) -> anyhow::Result<vmm::api::create::CreateRequest> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the VM config from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("VM config {}", path.display()))
}

/// One progress line of a running migration.
pub fn progress_line(p: &Progress) -> String {
    format!(
        "migrating: round {}, {:.1} MiB sent, {:.1} MiB left in the round, {:.0} MB/s, predicted downtime {:.1} ms, throttle {}%",
        p.round,
        p.sent_bytes as f64 / 1048576.0,
        p.remaining_bytes as f64 / 1048576.0,
        p.rate_mbps,
        p.predicted_downtime_ms,
        p.throttle_pct
    )
}

/// The final report of a migration, for people.
pub fn report_line(r: &Report) -> String {
    let all: Vec<String> = r.pages_per_round.iter().map(|v| v.to_string()).collect();
    // The first rounds and the last ones; a long middle is elided.
    let pages = if all.len() > 12 {
        let mut p = all[..8].to_vec();
        p.push("...".into());
        p.extend_from_slice(&all[all.len() - 4..]);
        p
    } else {
        all
    };
    let mut line = format!(
        "migration {}: total {:.1} ms, downtime {:.1} ms (target {:.1} ms), {:.1} MiB on the wire at {:.0} MB/s, {} rounds (pages per round: {}), {} zero and {} untouched pages skipped, throttle {}%",
        r.outcome,
        r.total_ms,
        r.downtime_ms,
        r.max_downtime_ms,
        r.bytes as f64 / 1048576.0,
        r.bandwidth_mbps,
        r.rounds,
        pages.join(" "),
        r.zero_pages,
        r.untouched_pages,
        r.throttle_pct
    );
    if let Some(why) = &r.reason {
        line.push_str(&format!("; {why}"));
    }
    line
}

fn cpu_check_text(c: wire::CpuCheck) -> String {
    let mut t = match c.runs {
        true => format!("{}: {} can run it", c.profile, c.host),
        false => format!(
            "{}: {} cannot run it: lacks {}",
            c.profile,
            c.host,
            [c.missing, c.other].concat().join(", ")
        ),
    };
    for n in c.notes {
        t.push_str(&format!("\n  {n}"));
    }
    t
}

fn cpuid_text(c: &wire::Cpuid) -> String {
    let id = &c.profile.identity;
    let mut text = format!(
        "profile: {} ({} family {} model {} stepping {}, {} features)",
        c.profile.name,
        id.vendor.id_string(),
        id.family,
        id.model,
        id.stepping,
        c.profile.features.len()
    );
    if !c.forced.is_empty() {
        text.push_str(&format!(
            "\nchanged by this host's KVM: {}",
            c.forced.join(" ")
        ));
    }
    text.push_str("\n(--json prints both tables)");
    text
}
