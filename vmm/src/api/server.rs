//! The control socket's server: HTTP/1.1 on a Unix stream socket (crate::api::http), the
//! routes of crate::api::routes, JSON bodies of crate::api::wire's types (docs/api.md,
//! docs/openapi.json).
//!
//! ```text
//! ApiServer::start(path, vm) -> thread "api": accept -> thread "api-conn" per connection:
//!   read a request (body <= MAX_REQUEST) -> route -> handle -> status + body -> After
//!   (next request, close, stop the VM, or end it: migrated)
//! ```
//! Pause, resume and snapshot hold the VM's lifecycle lock, so they never interleave across
//! connections. The outgoing migration's control (cancel, progress) belongs to the server:
//! one migration at a time per VM it serves. The socket is mode 0600.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::handlers::{self, Served};
use super::http;
use super::routes::{self, After, Routed};
use super::wire::{Answer, Code, Failure};
use crate::vm::Vm;

/// Longest request body accepted.
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
    pub fn serve(self, vm: Arc<Vm>) -> Result<ApiServer, Error> {
        self.serve_with(Arc::new(Served::new(vm)))
    }

    /// Serves `served` (which may get its VM later) on a background thread.
    pub fn serve_with(mut self, served: Arc<Served>) -> Result<ApiServer, Error> {
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
                        Ok(stream) => accept(stream, &served, &open),
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
fn accept(mut stream: UnixStream, served: &Arc<Served>, open: &Arc<AtomicUsize>) {
    if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        open.fetch_sub(1, Ordering::SeqCst);
        let e = format!("more than {MAX_CONNECTIONS} control connections at once");
        let (status, body) = routes::respond(&Answer::Failure(Failure::new(Code::Busy, e)));
        let busy = http::Out {
            close: true,
            ..http::Out::json(status, &body)
        };
        let _ = http::write_response(&mut stream, busy);
        return;
    }
    let (served, count) = (served.clone(), open.clone());
    let spawned = std::thread::Builder::new()
        .name("api-conn".into())
        .spawn(move || {
            serve(stream, &served);
            count.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        open.fetch_sub(1, Ordering::SeqCst);
        log::warn!("api: cannot start a connection thread: {e}");
    }
}

/// Answers the requests of one connection until it closes, asks to, or one ends the VM.
fn serve(stream: UnixStream, served: &Served) {
    let mut out = match stream.try_clone() {
        Ok(out) => out,
        Err(e) => {
            log::warn!("api: cannot use a connection: {e}");
            return;
        }
    };
    let mut input = stream;
    let mut reader = http::Reader::default();
    loop {
        let req = match reader.request(&mut input, &mut out, MAX_REQUEST) {
            Ok(req) => req,
            Err(http::ReadError::Closed { .. }) => return,
            Err(http::ReadError::Io(e)) => {
                log::warn!("api: reading a request failed: {e}");
                return;
            }
            Err(http::ReadError::Malformed { status, why }) => {
                let failure = Failure::new(Code::BadRequest, why);
                let (_, body) = routes::respond(&Answer::Failure(failure));
                let refused = http::Out {
                    close: true,
                    ..http::Out::json(status, &body)
                };
                let _ = http::write_response(&mut out, refused);
                return;
            }
        };
        let (a, after) = answer(&req, served);
        let close = req.close || after != After::Nothing;
        let o = http::Out {
            status: a.status,
            body: &a.body,
            content_type: a.content_type,
            close,
            allow: a.allow,
        };
        let written = http::write_response(&mut out, o);
        // Act only once the answer is written: a stop ends the process.
        if after == After::Nothing && written.is_ok() && !close {
            continue;
        }
        act(after, served);
        return;
    }
}

/// What a connection does once it has written its last answer.
fn act(after: After, served: &Served) {
    match after {
        After::Nothing => {}
        After::Stop => {
            if let Some(vm) = served.vm() {
                vm.request_stop("control socket");
            }
        }
        After::Migrated => {
            crate::migrate::step_aside();
            if let Some(vm) = served.vm() {
                vm.request_stop("migration (the guest runs on the destination now)");
            }
        }
        After::Exit => {
            if let Some(s) = served.setups() {
                s.exit();
            }
        }
    }
}

/// An answer to write: its status, body, content type and Allow header.
struct Answered {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
    allow: Option<&'static str>,
}

/// The answer to one request read, and what the connection does after writing it.
fn answer(req: &http::Request, served: &Served) -> (Answered, After) {
    let json = "application/json";
    let (a, after) = match routes::route(&req.method, &req.path, &req.body) {
        Ok(Routed::Openapi) => {
            let body = routes::OPENAPI.as_bytes().to_vec();
            ((200, body, json, None), After::Nothing)
        }
        Ok(Routed::Request(r)) => {
            let (answer, after) = handlers::handle(&r, served);
            let (status, body) = routes::respond(&answer);
            ((status, body, routes::content_type(&answer), None), after)
        }
        Err(refusal) => {
            let body = refusal.body();
            ((refusal.status, body, json, refusal.allow), After::Nothing)
        }
    };
    let (status, body, content_type, allow) = a;
    let answered = Answered {
        status,
        body,
        content_type,
        allow,
    };
    (answered, after)
}
