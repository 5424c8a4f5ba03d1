//! The HTTP API's routes: a method and path under `/api/v1/` (Cloud Hypervisor's names where
//! ferry does what Cloud Hypervisor does, `ferry.*` for what only ferry has) to a
//! [`Request`], and an [`Answer`] to a status and a JSON body. docs/openapi.json documents
//! exactly [`ROUTES`] (a test checks both ways).
//!
//! ```text
//! route("PUT", "/api/v1/vm.pause", b"") -> Routed::Request(Request::Pause)
//! respond(&Answer::State(..))           -> (204, [])
//! respond(&Answer::Failure(f))          -> (f.code.http_status(), {"code","message",..})
//! ```

use std::path::PathBuf;

use serde::de::DeserializeOwned;

use super::create::{CreateRequest, ReceiveRequest, RestoreRequest};
use super::wire::{Answer, Code, Failure, MigrateRequest, Request, SnapshotRequest};

/// Where the routes are.
pub const PREFIX: &str = "/api/v1/";

/// The file a snapshot or restore URL that names a directory means, in that directory.
pub const SNAPSHOT_IN_DIR: &str = "ferry.snap";

/// What the connection does after writing an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Read the next request.
    Nothing,
    /// End the VM (and so the process).
    Stop,
    /// End the VM here: it now runs on a migration destination.
    Migrated,
    /// End this ferry, which has no VM (vmm.shutdown of a `ferry serve`).
    Exit,
}

/// Every route: its method and its name under [`PREFIX`].
pub const ROUTES: [(&str, &str); 21] = [
    ("GET", "vmm.ping"),
    ("PUT", "vmm.shutdown"),
    ("PUT", "vm.create"),
    ("PUT", "vm.boot"),
    ("PUT", "vm.delete"),
    ("PUT", "vm.restore"),
    ("PUT", "vm.receive-migration"),
    ("GET", "vm.info"),
    ("GET", "vm.counters"),
    ("PUT", "vm.pause"),
    ("PUT", "vm.resume"),
    ("PUT", "vm.shutdown"),
    ("PUT", "vm.snapshot"),
    ("PUT", "vm.send-migration"),
    ("GET", "ferry.status"),
    ("GET", "ferry.cpuid"),
    ("GET", "ferry.progress"),
    ("PUT", "ferry.cancel"),
    ("GET", "ferry.openapi"),
    ("GET", "ferry.metrics"),
    ("PUT", "ferry.cpu-check"),
];

/// The OpenAPI document of these routes (served at ferry.openapi).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// What a route asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    Request(Request),
    /// The OpenAPI document.
    Openapi,
}

/// A refused request: its HTTP status, code and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: Code,
    pub message: String,
    /// With 405: the method the route takes (the `Allow` header).
    pub allow: Option<&'static str>,
}

impl Refusal {
    /// The body that answers it.
    pub fn body(&self) -> Vec<u8> {
        let failure = Failure::new(self.code, self.message.clone());
        respond(&Answer::Failure(failure)).1
    }
}

fn refuse(status: u16, code: Code, message: String) -> Refusal {
    Refusal {
        status,
        code,
        message,
        allow: None,
    }
}

/// The request a method, path and body make, or why they make none.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<Routed, Refusal> {
    let name = path.strip_prefix(PREFIX).unwrap_or("");
    let Some((expected, _)) = ROUTES.iter().find(|(_, n)| *n == name) else {
        let e = format!("no route {path:?} (the API's routes are under {PREFIX}: docs/api.md)");
        return Err(refuse(404, Code::NotFound, e));
    };
    if *expected != method {
        let e = format!("{name} takes {expected}, not {method}");
        return Err(Refusal {
            allow: Some(expected),
            ..refuse(405, Code::NotFound, e)
        });
    }
    let request = match name {
        "vm.snapshot" => snapshot(name, body)?,
        "vm.send-migration" => Request::Migrate(Box::new(parse::<MigrateRequest>(name, body)?)),
        "ferry.cpu-check" => Request::CpuCheck(parse(name, body)?),
        "vm.create" => Request::Create(Box::new(parse::<CreateRequest>(name, body)?)),
        "vm.restore" => Request::Restore(parse::<RestoreRequest>(name, body)?),
        "vm.receive-migration" => Request::Receive(Box::new(parse::<ReceiveRequest>(name, body)?)),
        _ => {
            no_body(name, body)?;
            match name {
                "ferry.openapi" => return Ok(Routed::Openapi),
                "vmm.ping" => Request::Ping,
                "vmm.shutdown" => Request::Shutdown,
                "vm.boot" => Request::Boot,
                "vm.delete" => Request::Delete,
                "vm.info" => Request::Info,
                "vm.counters" => Request::Counters,
                "vm.pause" => Request::Pause,
                "vm.resume" => Request::Resume,
                "vm.shutdown" => Request::Stop,
                "ferry.status" => Request::Status,
                "ferry.cpuid" => Request::Cpuid,
                "ferry.progress" => Request::Progress,
                "ferry.metrics" => Request::Metrics,
                _ => Request::Cancel,
            }
        }
    };
    Ok(Routed::Request(request))
}

/// A route that takes no body takes an empty one, `{}` or `null`; anything else would be
/// ignored, so it is refused.
fn no_body(name: &str, body: &[u8]) -> Result<(), Refusal> {
    let text = String::from_utf8_lossy(body);
    match text.trim() {
        "" | "{}" | "null" => Ok(()),
        _ => Err(refuse(
            400,
            Code::BadRequest,
            format!("{name} takes no body (got {} bytes)", body.len()),
        )),
    }
}

fn parse<T: DeserializeOwned>(name: &str, body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body)
        .map_err(|e| refuse(400, Code::BadRequest, format!("bad {name} body: {e}")))
}

fn snapshot(name: &str, body: &[u8]) -> Result<Request, Refusal> {
    let s: SnapshotRequest = parse(name, body)?;
    Ok(Request::Snapshot {
        path: file_url(&s.destination_url)
            .map_err(|e| refuse(400, Code::BadRequest, format!("destination_url: {e}")))?,
        stop: s.stop,
    })
}

/// The absolute path of a `file://` URL (`file:///dir/x`).
pub fn file_url(url: &str) -> Result<PathBuf, String> {
    let Some(path) = url.strip_prefix("file://") else {
        return Err(format!("{url:?} is not a file:///PATH URL"));
    };
    if !path.starts_with('/') {
        return Err(format!("{url:?}: the path must be absolute (file:///PATH)"));
    }
    Ok(PathBuf::from(path))
}

/// The HTTP status and body of an answer: 204 and nothing for a lifecycle change, the
/// failure's status for a failure, 200 and the JSON otherwise (the metrics' text).
pub fn respond(answer: &Answer) -> (u16, Vec<u8>) {
    let status = match answer {
        Answer::State(_) => return (204, Vec::new()),
        Answer::Metrics(text) => return (200, text.clone().into_bytes()),
        Answer::Failure(f) => f.code.http_status(),
        _ => 200,
    };
    let body = serde_json::to_vec(answer).unwrap_or_else(|e| {
        format!(r#"{{"code":"internal","message":"cannot encode the answer: {e}"}}"#).into_bytes()
    });
    (status, body)
}

/// The content type of an answer's body.
pub fn content_type(answer: &Answer) -> &'static str {
    match answer {
        Answer::Metrics(_) => METRICS_TYPE,
        _ => "application/json",
    }
}

/// Prometheus' text format.
pub const METRICS_TYPE: &str = "text/plain; version=0.0.4";

/// The method, path and body that ask for `req` (the client's side of [`route`]).
pub fn to_http(req: &Request) -> (&'static str, String, Option<Vec<u8>>) {
    let (method, name, body) = match req {
        Request::Ping => ("GET", "vmm.ping", None),
        Request::Shutdown => ("PUT", "vmm.shutdown", None),
        Request::Info => ("GET", "vm.info", None),
        Request::Counters => ("GET", "vm.counters", None),
        Request::Pause => ("PUT", "vm.pause", None),
        Request::Resume => ("PUT", "vm.resume", None),
        Request::Stop => ("PUT", "vm.shutdown", None),
        Request::Status => ("GET", "ferry.status", None),
        Request::Cpuid => ("GET", "ferry.cpuid", None),
        Request::Progress => ("GET", "ferry.progress", None),
        Request::Metrics => ("GET", "ferry.metrics", None),
        Request::Cancel => ("PUT", "ferry.cancel", None),
        Request::Snapshot { path, stop } => {
            let body = SnapshotRequest {
                destination_url: format!("file://{}", path.display()),
                stop: *stop,
            };
            ("PUT", "vm.snapshot", serde_json::to_vec(&body).ok())
        }
        Request::Migrate(m) => ("PUT", "vm.send-migration", serde_json::to_vec(m).ok()),
        Request::Create(c) => ("PUT", "vm.create", serde_json::to_vec(c).ok()),
        Request::CpuCheck(c) => ("PUT", "ferry.cpu-check", serde_json::to_vec(c).ok()),
        Request::Boot => ("PUT", "vm.boot", None),
        Request::Delete => ("PUT", "vm.delete", None),
        Request::Restore(r) => ("PUT", "vm.restore", serde_json::to_vec(r).ok()),
        Request::Receive(r) => ("PUT", "vm.receive-migration", serde_json::to_vec(r).ok()),
    };
    (method, format!("{PREFIX}{name}"), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_goes_out_and_comes_back_the_same() {
        let reqs = [
            Request::Ping,
            Request::Shutdown,
            Request::Info,
            Request::Counters,
            Request::Pause,
            Request::Resume,
            Request::Stop,
            Request::Status,
            Request::Cpuid,
            Request::Progress,
            Request::Metrics,
            Request::Cancel,
            Request::Snapshot {
                path: "/tmp/x".into(),
                stop: true,
            },
            Request::Migrate(Box::new(MigrateRequest {
                destination_url: "unix:/tmp/m.sock".into(),
                max_downtime_ms: Some(5.0),
                postcopy_after: Some(0),
                ..Default::default()
            })),
            Request::Create(Box::new(
                serde_json::from_str(r#"{"payload":{"kernel":"/k"},"memory":{"size":1}}"#).unwrap(),
            )),
            Request::Boot,
            Request::Delete,
            Request::CpuCheck(super::super::wire::CpuCheckRequest {
                profile: "default".into(),
            }),
            Request::Restore(RestoreRequest {
                source_url: "file:///tmp/x".into(),
                prefault: false,
                paused: true,
            }),
            Request::Receive(Box::new(ReceiveRequest {
                receiver_url: "unix:/tmp/r.sock".into(),
                max_vcpus: Some(2),
                ..Default::default()
            })),
        ];
        let mut served = std::collections::BTreeSet::new();
        for r in reqs {
            let (method, path, body) = to_http(&r);
            let back = route(method, &path, body.as_deref().unwrap_or_default());
            assert_eq!(back, Ok(Routed::Request(r)), "{method} {path}");
            served.insert(path);
        }
        assert_eq!(served.len() + 1, ROUTES.len(), "all but ferry.openapi");
        assert_eq!(
            route("GET", "/api/v1/ferry.openapi", b""),
            Ok(Routed::Openapi)
        );
    }

    #[test]
    fn unknown_routes_methods_fields_and_bodies_are_refused_naming_them() {
        let refused = |m: &str, p: &str, b: &str| match route(m, p, b.as_bytes()) {
            Err(r) => (r.status, r.code, r.message),
            Ok(r) => panic!("{m} {p} {b}: {r:?}"),
        };
        let (s, c, _) = refused("GET", "/api/v1/vm.reboot", "");
        assert_eq!((s, c), (404, Code::NotFound));
        let (s, _, m) = refused("GET", "/api/v1/vm.pause", "");
        assert_eq!(s, 405);
        assert!(m.contains("PUT"), "{m}");
        let wrong = route("GET", "/api/v1/vm.pause", b"").unwrap_err();
        assert_eq!(wrong.allow, Some("PUT"), "the Allow header of a 405");
        let (s, c, m) = refused(
            "PUT",
            "/api/v1/vm.snapshot",
            r#"{"destination_url":"file:///x","stopp":true}"#,
        );
        assert_eq!((s, c), (400, Code::BadRequest));
        assert!(m.contains("stopp"), "{m}");
        let (_, _, m) = refused("PUT", "/api/v1/vm.snapshot", r#"{"destination_url":"/x"}"#);
        assert!(m.contains("file:///"), "{m}");
        let (_, _, m) = refused("PUT", "/api/v1/vm.pause", r#"{"now":1}"#);
        assert!(m.contains("no body"), "{m}");
        let (_, _, m) = refused(
            "PUT",
            "/api/v1/vm.send-migration",
            r#"{"destination_url":"unix:/x","prefault":true}"#,
        );
        assert!(m.contains("prefault"), "{m}");
        assert!(route("PUT", "/api/v1/vm.pause", b"{}").is_ok());
    }

    #[test]
    fn answers_take_their_status() {
        let f = Failure::new(Code::RefusedCpu, "no");
        let (status, body) = respond(&Answer::Failure(f));
        assert_eq!(status, 422);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": "refused-cpu", "message": "no"})
        );
        let state = super::super::wire::StateAnswer {
            state: super::super::wire::VmStatus::Paused,
        };
        assert_eq!(respond(&Answer::State(state)), (204, vec![]));
    }
}

#[cfg(test)]
mod document {
    use super::*;

    /// docs/openapi.json documents every route served and serves every route documented.
    #[test]
    fn the_openapi_document_and_the_routes_agree_both_ways() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(doc["servers"][0]["url"], "http://localhost/api/v1");
        let mut documented = std::collections::BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                let name = path.trim_start_matches('/').to_string();
                documented.insert((method.to_uppercase(), name));
            }
        }
        let served: std::collections::BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, n)| (m.to_string(), n.to_string()))
            .collect();
        assert_eq!(documented, served);
        let codes = &doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"];
        let all: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(codes, &serde_json::json!(all), "the Error schema's codes");
    }
}

#[cfg(test)]
mod examples {
    use serde_json::Value;

    use super::super::wire;
    use super::*;

    /// `body` read as `T` and written back: the same JSON.
    fn reads_back<T: DeserializeOwned + serde::Serialize>(body: &str) -> bool {
        let t: T = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}"));
        serde_json::to_value(&t).unwrap() == serde_json::from_str::<Value>(body).unwrap()
    }

    fn answer_reads_back(req: &Request, body: &str) -> bool {
        match req {
            Request::Ping => reads_back::<wire::Ping>(body),
            Request::Info => reads_back::<wire::VmInfo>(body),
            Request::Counters => reads_back::<wire::Counters>(body),
            Request::Status => reads_back::<wire::Status>(body),
            Request::Cpuid => reads_back::<wire::Cpuid>(body),
            Request::Progress => reads_back::<crate::migrate::Progress>(body),
            Request::Metrics => false,
            Request::CpuCheck(_) => reads_back::<wire::CpuCheck>(body),
            Request::Snapshot { .. } => reads_back::<wire::Snapshot>(body),
            Request::Migrate(_) => reads_back::<wire::Migrated>(body),
            Request::Cancel => reads_back::<wire::Cancelled>(body),
            Request::Pause
            | Request::Resume
            | Request::Stop
            | Request::Shutdown
            | Request::Create(_)
            | Request::Boot
            | Request::Delete
            | Request::Restore(_)
            | Request::Receive(_) => false,
        }
    }

    /// Each exchange of docs/api.md's examples: the request routes as it says and the answer
    /// is that request's answer (or a failure of its status).
    #[test]
    fn every_example_in_docs_api_md_is_a_route_and_its_answer() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md");
        let text = std::fs::read_to_string(path).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-> ") || l.starts_with("<- "))
            .collect();
        let mut routes = std::collections::BTreeSet::new();
        for pair in lines.chunks(2) {
            let [req, ans] = pair else {
                panic!("a request without its answer: {pair:?}")
            };
            let mut r = req[3..].splitn(3, ' ');
            let (method, target) = (r.next().unwrap(), r.next().unwrap());
            let body = r.next().unwrap_or("");
            let (status, answer) = ans[3..].split_once(' ').unwrap_or((&ans[3..], ""));
            let status: u16 = status.parse().unwrap();
            routes.insert(target.to_string());
            match route(method, target, body.as_bytes()) {
                Ok(Routed::Request(r)) if status == 204 => {
                    assert!(answer.is_empty() && !answer_reads_back(&r, "{}"), "{req}");
                }
                Ok(Routed::Request(r)) if status == 200 => {
                    assert!(answer_reads_back(&r, answer), "{req}\n{ans}");
                }
                Ok(Routed::Request(_)) => {
                    let f: Failure = serde_json::from_str(answer).unwrap();
                    assert_eq!(f.code.http_status(), status, "{req}");
                    assert!(reads_back::<Failure>(answer), "{ans}");
                }
                Ok(Routed::Openapi) => assert_eq!(status, 200),
                Err(refusal) => {
                    let f: Failure = serde_json::from_str(answer).unwrap();
                    assert_eq!((refusal.status, refusal.code), (status, f.code), "{req}");
                    assert_eq!(refusal.message, f.message, "{req}");
                }
            }
        }
        assert!(
            routes.len() >= 12,
            "{} routes in the examples",
            routes.len()
        );
    }
}
