//! The control protocol's messages as types, shared by the server and `ferry ctl`
//! (docs/api.md is tested against them): a request is one JSON object on a line, tagged by
//! `"cmd"`; an answer is one JSON object on a line with `"ok"` and the fields of the
//! request's answer type, or `"ok":false` and `"error"`.
//!
//! ```text
//! Request::Status                      -> Status { state, vcpus, memory, migration? }
//! Request::Pause | Resume | Stop       -> StateAnswer { state }
//! Request::Cpuid                       -> Cpuid { profile, requested, effective, forced, .. }
//! Request::Snapshot { path, stop }     -> Snapshot { state, path, bytes, memory_ranges, ms }
//! Request::Migrate(MigrateRequest)     -> Migrated { state, report }  ({"progress":..} lines first)
//! Request::Cancel                      -> Cancelled { cancelled }
//! any, failed                          -> Failure { error, code, state?, report? }
//! ```

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::codes::Code;
use crate::migrate::{Progress, Report};
use crate::vcpu::RunState;

/// A request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Cpuid,
    Pause,
    Resume,
    Stop,
    Cancel,
    Snapshot {
        /// Where to write, resolved in the server's working directory (send it absolute).
        path: PathBuf,
        /// End the VM after writing.
        #[serde(default)]
        stop: bool,
    },
    Migrate(MigrateRequest),
}

/// A migration's destination and options; absent options take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// tcp:HOST:PORT or unix:PATH.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<f64>,
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Percent of vCPU time, 0..=99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_throttle: Option<u8>,
    /// A shared key file the server reads (send it absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// A directory of TLS certificates the server reads (--tls-dir; send it absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the address's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_timeout_ms: Option<f64>,
    /// Postcopy after this many precopy rounds (0: at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_after: Option<u32>,
    /// Send the guest unencrypted even to a peer off this host (without `key_file` or
    /// `tls_dir`): by default only to loopback or to a Unix socket of this user.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Send `{"progress":...}` lines before the answer.
    #[serde(default)]
    pub progress: bool,
}

/// What the VM is doing, as answers name it: a vCPU state, or `migrated` once a migration
/// has handed the guest over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    Running,
    Paused,
    Stopped,
    Migrated,
}

impl From<RunState> for VmStatus {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Running => VmStatus::Running,
            RunState::Paused => VmStatus::Paused,
            RunState::Stopped => VmStatus::Stopped,
        }
    }
}

impl std::fmt::Display for VmStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmStatus::Running => "running",
            VmStatus::Paused => "paused",
            VmStatus::Stopped => "stopped",
            VmStatus::Migrated => "migrated",
        })
    }
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: VmStatus,
    pub vcpus: Vec<VmStatus>,
    pub memory: u64,
    /// The outgoing migration under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Progress>,
}

/// The answer to `pause`, `resume` and `stop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateAnswer {
    pub state: VmStatus,
}

/// The answer to `cpuid`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cpuid {
    pub profile: cpuid::profile::CpuProfile,
    /// vCPU 0's table as ferry asked KVM for it.
    pub requested: Vec<cpuid::Leaf>,
    /// vCPU 0's table as KVM holds it (KVM_GET_CPUID2).
    pub effective: Vec<cpuid::Leaf>,
    /// Features KVM changed (`+name` forced on, `-name` taken off).
    pub forced: Vec<String>,
    /// Other registers KVM changed, as `function.index.register`.
    pub forced_registers: Vec<String>,
}

/// The answer to `snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub state: VmStatus,
    pub path: PathBuf,
    pub bytes: u64,
    pub memory_ranges: usize,
    pub ms: f64,
}

/// The answer to a `migrate` that handed the guest over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migrated {
    pub state: VmStatus,
    pub report: Report,
}

/// The answer to `cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancelled {
    pub cancelled: bool,
}

/// A failed request: the error, and for a migration that was cancelled the VM's state and
/// the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub error: String,
    /// What kind of failure it is (docs/api.md, "Error codes").
    #[serde(default)]
    pub code: Code,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
}

impl Failure {
    pub fn new(code: Code, error: impl Into<String>) -> Self {
        Failure {
            error: error.into(),
            code,
            state: None,
            report: None,
        }
    }
}

/// Any answer, as the server writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Status(Status),
    State(StateAnswer),
    Cpuid(Box<Cpuid>),
    Snapshot(Snapshot),
    Migrated(Migrated),
    Cancelled(Cancelled),
    Failure(Failure),
}

/// The commands, for the error that names an unknown one.
const COMMANDS: &str = "status, cpuid, pause, resume, snapshot, migrate, cancel or stop";

/// A request line as a [`Request`], or the one-line reason it is not one.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("request is not JSON: {e}"))?;
    let Some(cmd) = v.get("cmd").and_then(|c| c.as_str()).map(str::to_string) else {
        return Err("request has no \"cmd\" string".into());
    };
    let req: Request = serde_json::from_value(v.clone()).map_err(|e| {
        if e.to_string().starts_with("unknown variant") {
            format!("unknown command {cmd:?} (expected {COMMANDS})")
        } else {
            format!("bad {cmd} request: {e}")
        }
    })?;
    // A field the request type does not know (serde keeps quiet about extra fields of a
    // unit variant): whatever it meant would be ignored, so refuse it.
    let known = serde_json::to_value(&req).unwrap_or_default();
    if let Some(fields) = v.as_object() {
        for (k, value) in fields {
            if !value.is_null() && known.get(k).is_none() {
                return Err(format!("bad {cmd} request: unknown field `{k}`"));
            }
        }
    }
    Ok(req)
}

/// An answer with its `"ok"` field: the line the server writes.
pub fn answer_line(a: &Answer) -> String {
    #[derive(Serialize)]
    struct Line<'a> {
        ok: bool,
        #[serde(flatten)]
        answer: &'a Answer,
    }
    let ok = !matches!(a, Answer::Failure(_));
    serde_json::to_string(&Line { ok, answer: a })
        .unwrap_or_else(|e| format!(r#"{{"ok":false,"error":"cannot encode the answer: {e}"}}"#))
}

/// A progress line of a migration asked for progress: `{"progress":PROGRESS}`.
pub fn progress_line(p: &Progress) -> String {
    serde_json::json!({ "progress": p }).to_string()
}

/// One line a client reads: a progress update, or the answer (Ok: the request's answer type
/// `T`; Err: the failure).
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming<T> {
    Progress(Progress),
    /// Boxed: an answer (a migration's report) is far larger than a progress line.
    Answer(Box<Result<T, Failure>>),
}

/// Parses a line the server wrote in answer to a request whose answer type is `T`.
pub fn parse_line<T: DeserializeOwned>(line: &str) -> Result<Incoming<T>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Head {
        ok: Option<bool>,
        progress: Option<Progress>,
    }
    let head: Head = serde_json::from_str(line)?;
    Ok(match (head.ok, head.progress) {
        (None, Some(p)) => Incoming::Progress(p),
        (Some(true), _) => Incoming::Answer(Box::new(Ok(serde_json::from_str(line)?))),
        _ => Incoming::Answer(Box::new(Err(serde_json::from_str(line)?))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// `line` parsed as an answer to a request of answer type `T`, written back by the
    /// server's own writer: the same JSON.
    fn round_trip<T: DeserializeOwned>(line: &str, wrap: fn(T) -> Answer) -> bool {
        let answer = match parse_line::<T>(line).unwrap_or_else(|e| panic!("{line}: {e}")) {
            Incoming::Answer(a) => match *a {
                Ok(t) => wrap(t),
                Err(f) => Answer::Failure(f),
            },
            Incoming::Progress(_) => panic!("{line}: a progress line"),
        };
        let back: Value = serde_json::from_str(&answer_line(&answer)).unwrap();
        back == serde_json::from_str::<Value>(line).unwrap()
    }

    fn answer_reads_back(req: &Request, line: &str) -> bool {
        match req {
            Request::Status => round_trip(line, Answer::Status),
            Request::Pause | Request::Resume | Request::Stop => round_trip(line, Answer::State),
            Request::Cpuid => round_trip(line, |c| Answer::Cpuid(Box::new(c))),
            Request::Cancel => round_trip(line, Answer::Cancelled),
            Request::Snapshot { .. } => round_trip(line, Answer::Snapshot),
            Request::Migrate(_) => round_trip(line, Answer::Migrated),
        }
    }

    #[test]
    fn every_example_in_docs_api_md_is_a_message_of_these_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md");
        let text = std::fs::read_to_string(path).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-> ") || l.starts_with("<- "))
            .collect();
        assert!(lines.len() >= 20, "{} example lines", lines.len());
        let mut commands = std::collections::BTreeSet::new();
        for pair in lines.chunks(2) {
            let [req, ans] = pair else {
                panic!("a request without its answer: {pair:?}")
            };
            let (req, ans) = (&req[3..], &ans[3..]);
            match parse_request(req.as_bytes()) {
                Ok(r) => {
                    let back = serde_json::to_value(&r).unwrap();
                    assert_eq!(back, serde_json::from_str::<Value>(req).unwrap(), "{req}");
                    assert!(answer_reads_back(&r, ans), "{req}\n{ans}");
                    commands.insert(format!("{:?}", std::mem::discriminant(&r)));
                }
                Err(e) => {
                    let f: Failure = serde_json::from_str(ans).unwrap();
                    assert_eq!(f.error, e, "{req}");
                    assert_eq!(f.code, Code::BadRequest, "{req}");
                }
            }
        }
        assert_eq!(commands.len(), 8, "every command has an example");
    }

    #[test]
    fn progress_lines_and_answers_are_told_apart() {
        let p = Progress {
            round: 3,
            sent_bytes: 1 << 20,
            ..Default::default()
        };
        match parse_line::<Status>(&progress_line(&p)).unwrap() {
            Incoming::Progress(q) => assert_eq!(q, p),
            other => panic!("{other:?}"),
        }
        let f = parse_line::<Status>(r#"{"ok":false,"error":"x","code":"busy"}"#).unwrap();
        assert_eq!(
            f,
            Incoming::Answer(Box::new(Err(Failure::new(Code::Busy, "x"))))
        );
        assert!(parse_line::<Status>(r#"{"ok":true,"state":"running"}"#).is_err());
    }

    #[test]
    fn a_request_with_a_field_it_does_not_know_is_refused() {
        let e = parse_request(br#"{"cmd":"snapshot","path":"/x","stopp":true}"#).unwrap_err();
        assert!(
            e.starts_with("bad snapshot request") && e.contains("stopp"),
            "{e}"
        );
        let e = parse_request(br#"{"cmd":"pause","now":1}"#).unwrap_err();
        assert!(e.contains("now"), "{e}");
        assert!(parse_request(b"{\"command\":\"status\"}")
            .unwrap_err()
            .contains("\"cmd\""));
    }
}
