//! The control socket's client (`ferry ctl`, tests): sends one [`Request`] as its HTTP
//! request and reads the typed answer.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::http;
use super::routes;
use super::server::Error;
use super::wire::{Failure, Request, VmStatus};

/// Longest answer body read (a migration's report with 1000 rounds, a CPUID table).
pub const MAX_ANSWER: usize = 4 << 20;

/// An answer as it came: `ferry ctl --json`'s line (`{"ok":true,...}` with the answer's
/// fields, or `{"ok":false,"error":...,"code":...}`) and its typed form.
#[derive(Debug, Clone)]
pub struct Reply<T> {
    pub line: String,
    pub answer: Result<T, Failure>,
}

/// Sends `req` to the ferry at `path` and reads the answer as `T` (the request's answer
/// type), waiting at most `timeout` for it.
pub fn call<T: DeserializeOwned>(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Reply<T>, Error> {
    let (method, target, body) = routes::to_http(req);
    let resp = request(path, method, &target, body.as_deref(), timeout)?;
    let bad = |why: String| Error::BadResponse {
        path: path.to_path_buf(),
        line: why,
    };
    let mut fields: serde_json::Value = match resp.status {
        // A lifecycle change: the state it leaves the VM in.
        204 => match state_after(req) {
            Some(state) => serde_json::json!({ "state": state }),
            None => serde_json::json!({}),
        },
        _ => serde_json::from_slice(&resp.body).map_err(|e| {
            bad(format!(
                "{} {}: {e}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            ))
        })?,
    };
    let ok = (200..300).contains(&resp.status);
    let answer = if ok {
        Ok(serde_json::from_value::<T>(fields.clone()).map_err(|e| bad(e.to_string()))?)
    } else {
        Err(serde_json::from_value::<Failure>(fields.clone()).map_err(|e| bad(e.to_string()))?)
    };
    let Some(map) = fields.as_object_mut() else {
        return Err(bad(format!("{} is not a JSON object", resp.status)));
    };
    if let Some(message) = map.remove("message") {
        map.insert("error".into(), message);
    }
    // `"ok"` first, then the answer's fields.
    let inner = fields.to_string();
    let inner = inner.trim_start_matches('{').trim_end_matches('}');
    let sep = if inner.is_empty() { "" } else { "," };
    let line = format!("{{\"ok\":{ok}{sep}{inner}}}");
    Ok(Reply { line, answer })
}

/// The state a request answered with 204 leaves the VM in.
fn state_after(req: &Request) -> Option<VmStatus> {
    match req {
        Request::Pause => Some(VmStatus::Paused),
        Request::Resume | Request::Boot | Request::Receive(_) => Some(VmStatus::Running),
        Request::Restore(r) if r.paused => Some(VmStatus::Paused),
        Request::Restore(_) => Some(VmStatus::Running),
        Request::Create(_) | Request::Delete => None,
        _ => Some(VmStatus::Stopped),
    }
}

/// One HTTP request on a connection of its own: the response, whatever its status.
pub fn request(
    path: &Path,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<http::Response, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    http::write_request(&mut s, method, target, body).map_err(io)?;
    match http::Reader::default().response(&mut s, MAX_ANSWER) {
        Ok(r) => Ok(r),
        Err(http::ReadError::Io(e)) => Err(io(e)),
        Err(http::ReadError::Closed { .. }) => Err(Error::Closed {
            path: path.to_path_buf(),
        }),
        Err(http::ReadError::Malformed { why, .. }) => Err(Error::BadResponse {
            path: path.to_path_buf(),
            line: why,
        }),
    }
}
