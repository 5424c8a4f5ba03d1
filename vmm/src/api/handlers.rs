//! What each request does to the VM it serves, and its answer ([`handle`]); the HTTP
//! side (crate::api::server, crate::api::routes) writes the answer, then does what
//! [`After`] says.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::routes::{After, SNAPSHOT_IN_DIR};
use super::setup::Setups;
use super::views;
use super::wire::{self, Answer, Code, Failure, MigrateRequest, Request, StateAnswer, VmStatus};
use crate::migrate::Control;
use crate::monitor;
use crate::vm::Vm;

/// The VM a control socket serves (a `ferry serve` gets it later, from its API: `setups`),
/// its outgoing migration's control (one at a time), and the migration counters of
/// vm.counters.
#[derive(Debug)]
pub struct Served {
    vm: OnceLock<Arc<Vm>>,
    pub control: Control,
    migrations: Migrations,
    setups: Option<Setups>,
}

/// Outgoing migrations so far, by how they ended.
#[derive(Debug, Default)]
struct Migrations {
    started: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
}

impl Served {
    /// Serves `vm`.
    pub fn new(vm: Arc<Vm>) -> Served {
        let s = Served::waiting(None);
        let _ = s.vm.set(vm);
        s
    }

    /// Serves no VM until [`Served::attach`] gives it one; `setups` make it.
    pub fn waiting(setups: Option<Setups>) -> Served {
        Served {
            vm: OnceLock::new(),
            control: Control::default(),
            migrations: Migrations::default(),
            setups,
        }
    }

    /// The VM from now on (once: a later one is refused and handed back).
    pub fn attach(&self, vm: Arc<Vm>) -> Result<(), Arc<Vm>> {
        self.vm.set(vm)
    }

    /// The VM, once there is one.
    pub fn vm(&self) -> Option<&Arc<Vm>> {
        self.vm.get()
    }

    /// What makes the VM of a `ferry serve`.
    pub fn setups(&self) -> Option<&Setups> {
        self.setups.as_ref()
    }
}

fn state(vm: &Vm) -> VmStatus {
    vm.state().into()
}

/// A failed request's answer.
fn fail(code: Code, message: String) -> (Answer, After) {
    (Answer::Failure(Failure::new(code, message)), After::Nothing)
}

/// Answers one request; the caller writes the answer, then does what [`After`] says.
pub fn handle(req: &Request, served: &Served) -> (Answer, After) {
    match (served.vm(), req) {
        (_, Request::Ping) => (Answer::Ping(views::ping()), After::Nothing),
        (None, _) => super::setup::before_vm(req, served.setups()),
        (Some(vm), _) => with_vm(req, served, vm),
    }
}

/// Answers a request to the VM there is.
fn with_vm(req: &Request, served: &Served, vm: &Vm) -> (Answer, After) {
    let done = |r: Result<(), crate::vm::Error>| match r {
        Ok(()) => (
            Answer::State(StateAnswer { state: state(vm) }),
            After::Nothing,
        ),
        Err(e) => fail(e.code(), e.to_string()),
    };
    let answer = |a: Answer| (a, After::Nothing);
    match req {
        Request::Info => answer(Answer::Info(Box::new(views::info(vm)))),
        Request::Counters | Request::Metrics => {
            let counters = views::counters(vm, &migration_counts(served));
            match req {
                Request::Metrics => answer(Answer::Metrics(views::metrics(vm, &counters))),
                _ => answer(Answer::Counters(counters)),
            }
        }
        Request::Status => answer(Answer::Status(wire::Status {
            state: state(vm),
            vcpus: vm.vcpu_states().into_iter().map(Into::into).collect(),
            memory: vm.memory_size(),
            migration: served.control.progress(),
        })),
        Request::Progress => match served.control.progress() {
            Some(p) => answer(Answer::Progress(p)),
            None => fail(Code::WrongState, "no migration is in progress".into()),
        },
        Request::Cancel => match served.control.cancel() {
            true => answer(Answer::Cancelled(wire::Cancelled { cancelled: true })),
            false => fail(Code::WrongState, "no migration is in progress".into()),
        },
        Request::Cpuid => answer(Answer::Cpuid(Box::new(cpuid(vm)))),
        Request::Migrate(m) => migrate(served, vm, m),
        Request::Snapshot { path, stop } => snapshot_answer(vm, path, *stop),
        Request::Pause => done({
            let _lifecycle = vm.lifecycle();
            vm.pause().inspect(|()| monitor::emit("vm", "paused", None))
        }),
        Request::Resume => done({
            let _lifecycle = vm.lifecycle();
            vm.resume()
                .inspect(|()| monitor::emit("vm", "resumed", None))
        }),
        // The VM ends once this answer is written (see crate::api::server).
        Request::Stop | Request::Shutdown => (
            Answer::State(StateAnswer {
                state: VmStatus::Stopped,
            }),
            After::Stop,
        ),
        Request::Ping => answer(Answer::Ping(views::ping())),
        Request::CpuCheck(c) => answer(views::cpu_check_answer(&c.profile, vm.host_cpu())),
        Request::Create(_) | Request::Boot | Request::Restore(_) | Request::Receive(_) => {
            let e = "this ferry has its VM already (one VM per ferry process)";
            fail(Code::WrongState, e.into())
        }
        Request::Delete => {
            let e = "the VM runs: vm.shutdown ends it (vm.delete drops a configuration not booted)";
            fail(Code::WrongState, e.into())
        }
    }
}

/// vm.snapshot's answer, and its event.
fn snapshot_answer(vm: &Vm, path: &Path, stop: bool) -> (Answer, After) {
    match snapshot(vm, path, stop) {
        Ok(a) => {
            let written = serde_json::json!({ "path": a.path, "bytes": a.bytes });
            monitor::emit("vm", "snapshotted", Some(written));
            let after = if stop { After::Stop } else { After::Nothing };
            (Answer::Snapshot(a), after)
        }
        Err((code, e)) => fail(code, format!("snapshot to {}: {e}", path.display())),
    }
}

/// The migration counters of vm.counters and ferry.metrics.
fn migration_counts(served: &Served) -> [(&'static str, u64); 5] {
    let m = &served.migrations;
    let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
    [
        ("started", l(&m.started)),
        ("completed", l(&m.completed)),
        ("cancelled", l(&m.cancelled)),
        ("failed", l(&m.failed)),
        ("bytes_sent", l(&m.bytes)),
    ]
}

fn cpuid(vm: &Vm) -> wire::Cpuid {
    let cpuid::table::TableDiff {
        features: forced,
        registers: other,
    } = vm.cpuid_forced();
    wire::Cpuid {
        profile: vm.cpu_profile().clone(),
        requested: vm.cpuid_requested(),
        effective: vm.cpuid_effective().to_vec(),
        forced,
        forced_registers: other
            .iter()
            .map(|(f, i, r)| format!("{f:#x}.{i}.{r:?}"))
            .collect(),
    }
}

fn migrate(served: &Served, vm: &Vm, m: &MigrateRequest) -> (Answer, After) {
    let counts = &served.migrations;
    let url = &m.destination_url;
    if m.local {
        let e = "local: handing the guest's memory to a ferry on this host is not supported (its memory goes through the socket: send without local)";
        return fail(Code::BadRequest, e.into());
    }
    let addr: crate::migrate::Address = match url.parse() {
        Ok(a) => a,
        Err(e) => return fail(Code::BadRequest, format!("destination_url: {e}")),
    };
    let opts = match migrate_options(m, &addr) {
        Ok(o) => o,
        Err((code, e)) => return fail(code, e),
    };
    counts.started.fetch_add(1, Ordering::Relaxed);
    let started = serde_json::json!({ "destination_url": url });
    monitor::emit("vm", "migration-started", Some(started));
    let result = crate::migrate::send(vm, &served.control, &addr, &opts, &mut |_| {});
    let (ended, event) = match &result {
        Ok(_) => (&counts.completed, "migration-finished"),
        Err(crate::migrate::Error::Cancelled { .. }) => (&counts.cancelled, "migration-cancelled"),
        Err(_) => (&counts.failed, "migration-failed"),
    };
    ended.fetch_add(1, Ordering::Relaxed);
    let props = match &result {
        Ok(r) => serde_json::json!({ "total_ms": r.total_ms, "downtime_ms": r.downtime_ms }),
        Err(e) => serde_json::json!({ "code": e.code(), "message": e.to_string() }),
    };
    monitor::emit("vm", event, Some(props));
    match result {
        // Committed: the guest is the destination's now; this ferry ends.
        Ok(report) => {
            counts.bytes.fetch_add(report.bytes, Ordering::Relaxed);
            (
                Answer::Migrated(Box::new(wire::Migrated {
                    state: VmStatus::Migrated,
                    report,
                })),
                After::Migrated,
            )
        }
        Err(crate::migrate::Error::Cancelled { why, report }) => {
            counts.bytes.fetch_add(report.bytes, Ordering::Relaxed);
            let message =
                format!("migration to {url} cancelled, the VM runs here as before: {why}");
            (
                Answer::Failure(Failure {
                    code: Code::Cancelled,
                    message,
                    state: Some(state(vm)),
                    report: Some(report),
                }),
                After::Nothing,
            )
        }
        // Commit went out unanswered: the guest stays paused here (see the error).
        Err(e @ crate::migrate::Error::Unconfirmed(_)) => {
            fail(e.code(), format!("migration to {url}: {e}"))
        }
        Err(e) => fail(
            e.code(),
            format!("migration to {url} failed, the VM runs here as before: {e}"),
        ),
    }
}

/// The migration options of a request, defaults where absent.
fn migrate_options(
    m: &MigrateRequest,
    addr: &crate::migrate::Address,
) -> Result<crate::migrate::Options, (Code, String)> {
    let bad = |e: String| (Code::BadRequest, e);
    let mut o = crate::migrate::Options::default();
    let ms = |key: &str, v: Option<f64>, min: f64| -> Result<Option<Duration>, (Code, String)> {
        match v {
            None => Ok(None),
            Some(x) if x.is_finite() && x >= min => {
                Ok(Some(Duration::from_secs_f64(x.min(1e12) / 1e3)))
            }
            Some(x) => Err(bad(format!("{key} must be a number >= {min}, not {x}"))),
        }
    };
    if let Some(d) = ms("max_downtime_ms", m.max_downtime_ms, 0.0)? {
        o.max_downtime = d;
    }
    if let Some(d) = ms("timeout_ms", m.timeout_ms, 0.0)? {
        o.timeout = d;
    }
    if let Some(d) = ms("peer_timeout_ms", m.peer_timeout_ms, 1.0)? {
        o.peer_timeout = d;
    }
    o.max_bandwidth = m.max_bandwidth.filter(|b| *b >= 1);
    o.postcopy_after = m.postcopy_after;
    cloud_hypervisor_options(m, &mut o).map_err(bad)?;
    o.insecure = m.insecure;
    if let Some(t) = m.max_throttle {
        if t > 99 {
            return Err(bad(format!(
                "max_throttle is at most 99 (percent), not {t}"
            )));
        }
        o.max_throttle = t;
    }
    if let Some(path) = &m.key_file {
        o.key = Some(crate::migrate::key::load(path).map_err(|e| (Code::Io, e.to_string()))?);
    }
    if let Some(dir) = &m.tls_dir {
        let name = m
            .tls_name
            .clone()
            .unwrap_or_else(|| crate::migrate::tls_default_name(addr));
        let tls = crate::migrate::SourceTls::load(dir, &name);
        o.tls = Some(tls.map_err(|e| (e.code(), e.to_string()))?);
    } else if m.tls_name.is_some() {
        let e = "tls_name without tls_dir: a name is checked only with certificates";
        return Err(bad(e.into()));
    }
    Ok(o)
}

/// Cloud Hypervisor's fields of vm.send-migration, where ferry does the same; a value ferry
/// does not do is refused, naming the field.
fn cloud_hypervisor_options(
    m: &MigrateRequest,
    o: &mut crate::migrate::Options,
) -> Result<(), String> {
    let twice = |ch: &str, ferry: &str| format!("{ch} and {ferry} say the same: give one");
    if let Some(d) = m.downtime_ms {
        if m.max_downtime_ms.is_some() {
            return Err(twice("downtime_ms", "max_downtime_ms"));
        }
        o.max_downtime = Duration::from_millis(d.clamp(1, 1 << 40));
    }
    if let Some(t) = m.timeout_s {
        if m.timeout_ms.is_some() {
            return Err(twice("timeout_s", "timeout_ms"));
        }
        o.timeout = Duration::from_secs(t.clamp(1, 1 << 32));
    }
    if m.preserve_source {
        return Err("preserve_source: a ferry source ends once the destination runs the guest (send without it)".into());
    }
    if let Some(s) = m.timeout_strategy.as_deref().filter(|s| *s != "Cancel") {
        return Err(format!("timeout_strategy {s:?}: ferry cancels at the timeout (Cancel), it never forces the switch-over"));
    }
    if let Some(n) = m.connections.filter(|n| *n != 1) {
        return Err(format!(
            "connections {n}: ferry sends a migration over one connection"
        ));
    }
    match m.memory_mode.as_deref() {
        None | Some("Precopy") => {}
        Some("Postcopy") if m.postcopy_after.is_none() => o.postcopy_after = Some(0),
        Some("Postcopy") => return Err(twice("memory_mode Postcopy", "postcopy_after")),
        Some(other) => return Err(format!("memory_mode {other:?}: Precopy or Postcopy")),
    }
    Ok(())
}

/// Pauses the VM, writes its state to `path` (crate::snapshot::write_file), and resumes it
/// unless `stop`. On any failure the VM is resumed.
fn snapshot(vm: &Vm, path: &Path, stop: bool) -> Result<wire::Snapshot, (Code, String)> {
    // Cloud Hypervisor's destination is a directory: ferry writes its one file into it.
    let in_dir;
    let path = if path.is_dir() {
        in_dir = path.join(SNAPSHOT_IN_DIR);
        &in_dir
    } else {
        path
    };
    let started = std::time::Instant::now();
    // One lifecycle change at a time: no other client can resume the VM mid-save.
    let lifecycle = vm.lifecycle();
    let was_paused = vm.state() == crate::vcpu::RunState::Paused;
    let paused = vm.pause().map_err(|e| (e.code(), format!("pausing: {e}")));
    let result = paused.and_then(|()| {
        crate::snapshot::write_file(vm, &lifecycle, path).map_err(|e| (e.code(), e.to_string()))
    });
    // Resume on every path unless asked to stop after a good write; a VM that was already
    // paused stays paused.
    if !was_paused && (result.is_err() || !stop) {
        if let Err(e) = vm.resume() {
            let written = if result.is_ok() {
                "the snapshot was written, but "
            } else {
                ""
            };
            return Err((e.code(), format!("{written}resuming the VM failed: {e}")));
        }
    }
    let (bytes, memory_ranges) = result?;
    Ok(wire::Snapshot {
        state: if stop { VmStatus::Stopped } else { state(vm) },
        path: path.to_path_buf(),
        bytes,
        memory_ranges,
        ms: started.elapsed().as_secs_f64() * 1e3,
    })
}
