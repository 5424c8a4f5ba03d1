//! The control socket: a Unix stream socket speaking JSON, one request object per line and
//! one response object per line (documented in docs/api.md).
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"state":"running","vcpus":["running","running"],"memory":536870912}
//! -> {"cmd":"pause"}     <- {"ok":true,"state":"paused"}
//! -> {"cmd":"resume"}    <- {"ok":true,"state":"running"}
//! -> {"cmd":"stop"}      <- {"ok":true,"state":"stopped"}   (ferry then exits 0)
//! -> anything else       <- {"ok":false,"error":"..."}
//! ```
//! Each connection is served on its own thread. Pause, resume and snapshot hold the VM's
//! lifecycle lock, so they never interleave across connections. The socket is mode 0600.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::vm::Vm;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

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

impl ApiServer {
    /// Binds `path` (replacing a stale socket file nobody listens on) and serves `vm` on a
    /// background thread.
    pub fn start(path: &Path, vm: Arc<Vm>) -> Result<ApiServer, Error> {
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
            std::fs::remove_file(path).map_err(|source| Error::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        // Only ferry's own user may steer the VM (and make it write files).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| Error::Bind {
                path: path.to_path_buf(),
                source,
            },
        )?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            let vm = vm.clone();
                            if let Err(e) = std::thread::Builder::new()
                                .name("api-conn".into())
                                .spawn(move || serve(stream, &vm))
                            {
                                log::warn!("api: cannot start a connection thread: {e}");
                            }
                        }
                        Err(e) => log::warn!("api: accept failed: {e}"),
                    }
                }
            })
            .map_err(|source| Error::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(ApiServer {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, vm: &Vm) {
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
        let (response, after) = if line.len() > MAX_REQUEST {
            let e = format!("request longer than {MAX_REQUEST} bytes");
            (json!({"ok": false, "error": e}), After::Close)
        } else {
            // A migration asked for progress gets one JSON line per update first.
            let mut progress = |p: Value| {
                let _ = writeln!(out, "{}", json!({ "progress": p }));
            };
            handle(&line, vm, &mut progress)
        };
        let written = writeln!(out, "{response}");
        // Act only once the answer is written: a stop ends the process.
        match after {
            After::Nothing if written.is_ok() => {}
            After::Nothing | After::Close => return,
            After::Stop => {
                vm.request_stop("control socket");
                return;
            }
            After::Migrated => {
                vm.request_stop("migration (the guest runs on the destination now)");
                return;
            }
        }
    }
}

fn state_str(vm: &Vm) -> Value {
    serde_json::to_value(vm.state()).unwrap_or(Value::Null)
}

/// Answers one request line.
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

/// Answers one request line; the caller writes the answer, then does what [`After`] says.
/// A `migrate` with `"progress":true` calls `progress` with each update before answering.
pub fn handle(line: &[u8], vm: &Vm, progress: &mut dyn FnMut(Value)) -> (Value, After) {
    let fail = |e: String| (json!({"ok": false, "error": e}), After::Nothing);
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return fail(format!("request is not JSON: {e}")),
    };
    let Some(cmd) = req.get("cmd").and_then(Value::as_str) else {
        return fail("request has no \"cmd\" string".into());
    };
    let done = |r: Result<(), crate::vm::Error>| match r {
        Ok(()) => (json!({"ok": true, "state": state_str(vm)}), After::Nothing),
        Err(e) => fail(e.to_string()),
    };
    match cmd {
        "status" => {
            let mut answer = json!({
                "ok": true,
                "state": state_str(vm),
                "vcpus": vm.vcpu_states(),
                "memory": vm.memory_size(),
            });
            if let Some(p) = vm.migration_progress() {
                answer["migration"] = json!(p);
            }
            (answer, After::Nothing)
        }
        "cancel" => {
            if vm.cancel_migration() {
                (json!({"ok": true, "cancelled": true}), After::Nothing)
            } else {
                fail("no migration is in progress".into())
            }
        }
        "cpuid" => {
            let cpuid::table::TableDiff {
                features: forced,
                registers: other,
            } = vm.cpuid_forced();
            let other: Vec<String> = other
                .iter()
                .map(|(f, i, r)| format!("{f:#x}.{i}.{r:?}"))
                .collect();
            let answer = json!({
                "ok": true,
                "profile": vm.cpu_profile(),
                "requested": vm.cpuid_requested(),
                "effective": vm.cpuid_effective(),
                "forced": forced,
                "forced_registers": other,
            });
            (answer, After::Nothing)
        }
        "migrate" => {
            let Some(url) = req.get("url").and_then(Value::as_str) else {
                return fail("migrate needs a \"url\" string (tcp:HOST:PORT or unix:PATH)".into());
            };
            let addr: crate::migrate::Address = match url.parse() {
                Ok(a) => a,
                Err(e) => return fail(e.to_string()),
            };
            let opts = match migrate_options(&req) {
                Ok(o) => o,
                Err(e) => return fail(e),
            };
            let want_progress = req.get("progress").and_then(Value::as_bool) == Some(true);
            let mut on_progress = |p: &crate::migrate::Progress| {
                if want_progress {
                    progress(json!(p));
                }
            };
            match crate::migrate::send(vm, &addr, &opts, &mut on_progress) {
                // Committed: the guest is the destination's now; this ferry ends.
                Ok(report) => (
                    json!({"ok": true, "state": "migrated", "report": report}),
                    After::Migrated,
                ),
                Err(crate::migrate::Error::Cancelled { reason, report }) => (
                    json!({
                        "ok": false,
                        "error": format!("migration to {url} cancelled, the VM runs here as before: {reason}"),
                        "state": state_str(vm),
                        "report": report,
                    }),
                    After::Nothing,
                ),
                // Commit went out unanswered: the guest stays paused here (see the error).
                Err(e @ crate::migrate::Error::Unconfirmed(_)) => {
                    fail(format!("migration to {url}: {e}"))
                }
                Err(e) => fail(format!(
                    "migration to {url} failed, the VM runs here as before: {e}"
                )),
            }
        }
        "snapshot" => {
            let Some(path) = req.get("path").and_then(Value::as_str) else {
                return fail("snapshot needs a \"path\" string".into());
            };
            let stop = req.get("stop").and_then(Value::as_bool).unwrap_or(false);
            match snapshot(vm, std::path::Path::new(path), stop) {
                Ok(answer) => (answer, if stop { After::Stop } else { After::Nothing }),
                Err(e) => fail(format!("snapshot to {path}: {e}")),
            }
        }
        "pause" => done({
            let _lifecycle = vm.lifecycle();
            vm.pause()
        }),
        "resume" => done({
            let _lifecycle = vm.lifecycle();
            vm.resume()
        }),
        // The VM ends once this answer is written (see `serve`).
        "stop" => (json!({"ok": true, "state": "stopped"}), After::Stop),
        other => fail(format!(
            "unknown command {other:?} (expected status, cpuid, pause, resume, snapshot, migrate, cancel or stop)"
        )),
    }
}

/// The migration options of a `migrate` request: `max_downtime_ms`, `timeout_ms`,
/// `max_bandwidth` (bytes per second), `max_throttle` (percent), `peer_timeout_ms`, `key_file`;
/// defaults where absent.
fn migrate_options(req: &Value) -> Result<crate::migrate::Options, String> {
    let mut o = crate::migrate::Options::default();
    let num = |key: &str| -> Result<Option<f64>, String> {
        match req.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x >= 0.0 => Ok(Some(x)),
                _ => Err(format!("{key} must be a number >= 0, not {v}")),
            },
        }
    };
    if let Some(ms) = num("max_downtime_ms")? {
        o.max_downtime = Duration::from_secs_f64(ms.min(1e9) / 1e3);
    }
    if let Some(ms) = num("timeout_ms")? {
        o.timeout = Duration::from_secs_f64(ms.min(1e12) / 1e3);
    }
    if let Some(bw) = num("max_bandwidth")? {
        o.max_bandwidth = (bw >= 1.0).then_some(bw as u64);
    }
    if let Some(path) = req.get("key_file").and_then(Value::as_str) {
        let bytes = std::fs::read(path).map_err(|e| format!("key file {path}: {e}"))?;
        o.key =
            Some(migration::auth::Key::new(&bytes).map_err(|e| format!("key file {path}: {e}"))?);
    }
    if let Some(ms) = num("peer_timeout_ms")? {
        if ms < 1.0 {
            return Err(format!("peer_timeout_ms must be at least 1, not {ms}"));
        }
        o.peer_timeout = Duration::from_secs_f64(ms.min(1e12) / 1e3);
    }
    if let Some(t) = num("max_throttle")? {
        if t > 99.0 {
            return Err(format!("max_throttle is at most 99 (percent), not {t}"));
        }
        o.max_throttle = t as u8;
    }
    Ok(o)
}

/// Pauses the VM, writes its state to `path` (through a temporary file, renamed when
/// complete), and resumes it unless `stop`. On any failure the VM is resumed.
fn snapshot(vm: &Vm, path: &std::path::Path, stop: bool) -> Result<Value, String> {
    let started = std::time::Instant::now();
    // One lifecycle change at a time: no other client can resume the VM mid-save.
    let _lifecycle = vm.lifecycle();
    let was_paused = vm.state() == crate::vcpu::RunState::Paused;
    let paused = vm.pause().map_err(|e| format!("pausing: {e}"));
    let result = paused.and_then(|()| write_snapshot(vm, path));
    // Resume on every path unless asked to stop after a good write; a VM that was already
    // paused stays paused.
    if !was_paused && (result.is_err() || !stop) {
        if let Err(e) = vm.resume() {
            let written = if result.is_ok() {
                "the snapshot was written, but "
            } else {
                ""
            };
            return Err(format!("{written}resuming the VM failed: {e}"));
        }
    }
    let (bytes, ranges) = result?;
    Ok(json!({
        "ok": true,
        "state": if stop { "stopped".into() } else { state_str(vm) },
        "path": path.display().to_string(),
        "bytes": bytes,
        "memory_ranges": ranges,
        "ms": started.elapsed().as_secs_f64() * 1e3,
    }))
}

/// Writes the state to `<path>.partial` (a new file, never through an existing one or a
/// link), syncs it, renames it over `path` and syncs the directory; removes the partial
/// file on failure.
fn write_snapshot(vm: &Vm, path: &std::path::Path) -> Result<(u64, usize), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let state = vm.save_state().map_err(|e| e.to_string())?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".partial");
    let tmp = std::path::PathBuf::from(tmp_name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    let written = (|| -> Result<u64, String> {
        let mut w = std::io::BufWriter::new(file);
        let bytes = migration::stream::write_vm(&mut w, &state).map_err(|e| e.to_string())?;
        let file = w.into_inner().map_err(|e| e.to_string())?;
        file.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(bytes)
    })();
    match written {
        Ok(bytes) => Ok((bytes, state.memory.len())),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Sends one request and returns the response object.
pub fn request(path: &Path, req: &Value, timeout: Duration) -> Result<Value, Error> {
    request_with_progress(path, req, timeout, &mut |_| {})
}

/// Sends one request; progress lines (`{"progress":...}`) before the answer go to
/// `progress`, each within `timeout` of the last. Returns the response object.
pub fn request_with_progress(
    path: &Path,
    req: &Value,
    timeout: Duration,
    progress: &mut dyn FnMut(&Value),
) -> Result<Value, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    writeln!(s, "{req}").map_err(io)?;
    let mut reader = BufReader::new(s);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(io)? == 0 {
            return Err(Error::Closed {
                path: path.to_path_buf(),
            });
        }
        let v: Value = serde_json::from_str(&line).map_err(|_| Error::BadResponse {
            path: path.to_path_buf(),
            line: line.clone(),
        })?;
        match v.get("progress") {
            Some(p) if v.get("ok").is_none() => progress(p),
            _ => return Ok(v),
        }
    }
}
