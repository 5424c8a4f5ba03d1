//! The control socket's server: a Unix stream socket, one JSON request per line and one
//! JSON answer per line (the messages are crate::api::wire's types; docs/api.md).
//!
//! ```text
//! ApiServer::start(path, vm) -> thread "api": accept -> thread "api-conn" per connection:
//!   read a line (<= MAX_REQUEST) -> Request -> handle -> Answer line -> After (next, close,
//!   stop the VM, or end it: migrated)
//! ```
//! Pause, resume and snapshot hold the VM's lifecycle lock, so they never interleave across
//! connections. The outgoing migration's control (cancel, progress) belongs to the server:
//! one migration at a time per VM it serves. The socket is mode 0600.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::wire::{self, Answer, Code, Failure, MigrateRequest, Request, StateAnswer, VmStatus};
use crate::migrate::Control;
use crate::vm::Vm;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Connections served at once, each on its own thread; one more is answered with a
/// failure and closed (a bound on the threads and files a client can make ferry hold).
pub const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("api socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("api socket {path} exists and is not a socket: refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("api socket {path} is in use by a running process")]
    InUse { path: PathBuf },
    #[error("api socket {path}: cannot connect: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("api socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("api socket {path}: bad response {line:?}")]
    BadResponse { path: PathBuf, line: String },
    #[error("api socket {path}: the ferry there closed the connection without answering (it ended, or was killed)")]
    Closed { path: PathBuf },
}

/// The control socket server.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
}

/// A control socket bound (as root, before ferry gives up privileges) and not yet served.
#[derive(Debug)]
pub struct ApiListener {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket file nobody listens on) and serves `vm` on a
    /// background thread.
    pub fn start(path: &Path, vm: Arc<Vm>) -> Result<ApiServer, Error> {
        ApiServer::bind(path)?.serve(vm)
    }

    /// Binds `path` (replacing a stale socket file nobody listens on), mode 0600; serve it
    /// with [`ApiListener::serve`] once the VM exists.
    pub fn bind(path: &Path) -> Result<ApiListener, Error> {
        let bind = |source| Error::Bind {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(Error::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(bind)?;
        }
        let listener = UnixListener::bind(path).map_err(bind)?;
        let bound = ApiListener {
            listener: Some(listener),
            path: path.to_path_buf(),
        };
        // Only ferry's own user may steer the VM (and make it write files).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
        Ok(bound)
    }
}

impl ApiListener {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves `vm` on a background thread.
    pub fn serve(mut self, vm: Arc<Vm>) -> Result<ApiServer, Error> {
        let control = Arc::new(Control::default());
        // From here the server's Drop removes the socket file.
        let path = std::mem::take(&mut self.path);
        let Some(listener) = self.listener.take() else {
            return Err(Error::Closed { path });
        };
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // Its connection threads inherit the filter.
                crate::sandbox::enter_or_exit(crate::sandbox::Kind::Api);
                let open = Arc::new(AtomicUsize::new(0));
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => accept(stream, &vm, &control, &open),
                        Err(e) => log::warn!("api: accept failed: {e}"),
                    }
                }
            })
            .map_err(|source| Error::Bind {
                path: path.clone(),
                source,
            })?;
        Ok(ApiServer { path })
    }
}

impl Drop for ApiListener {
    /// A listener never served takes its socket file with it.
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves `stream` on a thread of its own, unless MAX_CONNECTIONS are open already.
fn accept(mut stream: UnixStream, vm: &Arc<Vm>, control: &Arc<Control>, open: &Arc<AtomicUsize>) {
    if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        open.fetch_sub(1, Ordering::SeqCst);
        let e = format!("more than {MAX_CONNECTIONS} control connections at once");
        let answer = Answer::Failure(Failure::new(Code::Busy, e));
        let _ = writeln!(stream, "{}", wire::answer_line(&answer));
        return;
    }
    let (vm, control, count) = (vm.clone(), control.clone(), open.clone());
    let spawned = std::thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || {
            serve(stream, &vm, &control);
            count.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        open.fetch_sub(1, Ordering::SeqCst);
        log::warn!("api: cannot start a connection thread: {e}");
    }
}

fn serve(stream: UnixStream, vm: &Vm, control: &Control) {
    let mut out = match stream.try_clone() {
        Ok(out) => out,
        Err(e) => {
            log::warn!("api: cannot use a connection: {e}");
            return;
        }
    };
    let mut reader = std::io::Read::take(BufReader::new(stream), u64::MAX);
    loop {
        let mut line = Vec::new();
        reader.set_limit(MAX_REQUEST as u64 + 1);
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Err(e) => {
                log::warn!("api: reading a request failed: {e}");
                return;
            }
            Ok(_) => {}
        }
        let (answer, after) = if line.len() > MAX_REQUEST {
            let e = format!("request longer than {MAX_REQUEST} bytes");
            (
                Answer::Failure(Failure::new(Code::BadRequest, e)),
                After::Close,
            )
        } else {
            match wire::parse_request(&line) {
                Ok(req) => {
                    // A migration asked for progress gets one line per update first.
                    let mut progress = |p: &crate::migrate::Progress| {
                        let _ = writeln!(out, "{}", wire::progress_line(p));
                    };
                    handle(&req, vm, control, &mut progress)
                }
                Err(e) => (
                    Answer::Failure(Failure::new(Code::BadRequest, e)),
                    After::Nothing,
                ),
            }
        };
        let written = writeln!(out, "{}", wire::answer_line(&answer));
        // Act only once the answer is written: a stop ends the process.
        match after {
            After::Nothing if written.is_ok() => {}
            After::Nothing | After::Close => return,
            After::Stop => {
                vm.request_stop("control socket");
                return;
            }
            After::Migrated => {
                crate::migrate::step_aside();
                vm.request_stop("migration (the guest runs on the destination now)");
                return;
            }
        }
    }
}

/// What the connection does after writing an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Read the next request.
    Nothing,
    /// Close the connection.
    Close,
    /// End the VM (and so the process).
    Stop,
    /// End the VM here: it now runs on a migration destination.
    Migrated,
}

fn state(vm: &Vm) -> VmStatus {
    vm.state().into()
}

/// A failed request's answer, the connection kept.
fn fail(code: Code, error: String) -> (Answer, After) {
    (Answer::Failure(Failure::new(code, error)), After::Nothing)
}

/// Answers one request; the caller writes the answer, then does what [`After`] says. A
/// migration asked for progress calls `progress` with each update before answering.
pub fn handle(
    req: &Request,
    vm: &Vm,
    control: &Control,
    progress: &mut dyn FnMut(&crate::migrate::Progress),
) -> (Answer, After) {
    let done = |r: Result<(), crate::vm::Error>| match r {
        Ok(()) => (
            Answer::State(StateAnswer { state: state(vm) }),
            After::Nothing,
        ),
        Err(e) => fail(e.code(), e.to_string()),
    };
    match req {
        Request::Status => (
            Answer::Status(wire::Status {
                state: state(vm),
                vcpus: vm.vcpu_states().into_iter().map(Into::into).collect(),
                memory: vm.memory_size(),
                migration: control.progress(),
            }),
            After::Nothing,
        ),
        Request::Cancel => match control.cancel() {
            true => (
                Answer::Cancelled(wire::Cancelled { cancelled: true }),
                After::Nothing,
            ),
            false => fail(Code::WrongState, "no migration is in progress".into()),
        },
        Request::Cpuid => (Answer::Cpuid(Box::new(cpuid(vm))), After::Nothing),
        Request::Migrate(m) => migrate(vm, control, m, progress),
        Request::Snapshot { path, stop } => match snapshot(vm, path, *stop) {
            Ok(answer) => (
                Answer::Snapshot(answer),
                if *stop { After::Stop } else { After::Nothing },
            ),
            Err((code, e)) => fail(code, format!("snapshot to {}: {e}", path.display())),
        },
        Request::Pause => done({
            let _lifecycle = vm.lifecycle();
            vm.pause()
        }),
        Request::Resume => done({
            let _lifecycle = vm.lifecycle();
            vm.resume()
        }),
        // The VM ends once this answer is written (see `serve`).
        Request::Stop => (
            Answer::State(StateAnswer {
                state: VmStatus::Stopped,
            }),
            After::Stop,
        ),
    }
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

fn migrate(
    vm: &Vm,
    control: &Control,
    m: &MigrateRequest,
    progress: &mut dyn FnMut(&crate::migrate::Progress),
) -> (Answer, After) {
    let url = &m.url;
    let addr: crate::migrate::Address = match url.parse() {
        Ok(a) => a,
        Err(e) => return fail(Code::BadRequest, format!("{e}")),
    };
    let opts = match migrate_options(m, &addr) {
        Ok(o) => o,
        Err((code, e)) => return fail(code, e),
    };
    let mut on_progress = |p: &crate::migrate::Progress| {
        if m.progress {
            progress(p);
        }
    };
    match crate::migrate::send(vm, control, &addr, &opts, &mut on_progress) {
        // Committed: the guest is the destination's now; this ferry ends.
        Ok(report) => (
            Answer::Migrated(wire::Migrated {
                state: VmStatus::Migrated,
                report,
            }),
            After::Migrated,
        ),
        Err(crate::migrate::Error::Cancelled { why, report }) => (
            Answer::Failure(Failure {
                error: format!("migration to {url} cancelled, the VM runs here as before: {why}"),
                code: Code::Cancelled,
                state: Some(state(vm)),
                report: Some(*report),
            }),
            After::Nothing,
        ),
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

/// Pauses the VM, writes its state to `path` (crate::snapshot::write_file), and resumes it
/// unless `stop`. On any failure the VM is resumed.
fn snapshot(vm: &Vm, path: &Path, stop: bool) -> Result<wire::Snapshot, (Code, String)> {
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
