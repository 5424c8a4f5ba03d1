//! The control socket's client (`ferry ctl`, tests): sends one [`Request`] and reads its
//! typed answer, progress lines first.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::server::Error;
use super::wire::{self, Failure, Incoming, Request};
use crate::migrate::Progress;

/// An answer as it came: its line (for `--json`) and its typed form.
#[derive(Debug, Clone)]
pub struct Reply<T> {
    pub line: String,
    pub answer: Result<T, Failure>,
}

/// Sends `req` to the ferry at `path` and reads the answer as `T` (the request's answer
/// type); each progress line before it goes to `progress`, each within `timeout` of the
/// last.
pub fn call<T: DeserializeOwned>(
    path: &Path,
    req: &Request,
    timeout: Duration,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Reply<T>, Error> {
    let line = serde_json::to_string(req).map_err(|e| Error::BadResponse {
        path: path.to_path_buf(),
        line: format!("(the request could not be encoded: {e})"),
    })?;
    call_raw(path, line.as_bytes(), timeout, progress)
}

/// [`call`] with a request line as given (tests send malformed ones).
pub fn call_raw<T: DeserializeOwned>(
    path: &Path,
    request: &[u8],
    timeout: Duration,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Reply<T>, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.write_all(request).map_err(io)?;
    s.write_all(b"\n").map_err(io)?;
    let mut reader = BufReader::new(s);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(io)? == 0 {
            return Err(Error::Closed {
                path: path.to_path_buf(),
            });
        }
        let bad = |_| Error::BadResponse {
            path: path.to_path_buf(),
            line: line.clone(),
        };
        match wire::parse_line::<T>(&line).map_err(bad)? {
            Incoming::Progress(p) => progress(&p),
            Incoming::Answer(answer) => {
                return Ok(Reply {
                    line: line.trim_end().to_string(),
                    answer: *answer,
                })
            }
        }
    }
}
