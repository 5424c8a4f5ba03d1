//! The control API's messages as types, shared by the server and `ferry ctl` (docs/api.md
//! and docs/openapi.json are tested against them): [`Request`] is what a route of the HTTP
//! API asks for (crate::api::routes maps method and path to it), the other types are the
//! JSON bodies of requests and answers.
//!
//! ```text
//! GET  ferry.status                  -> Status { state, vcpus, memory, migration? }
//! GET  vmm.ping                      -> Ping { build_version, version, pid, features }
//! GET  vm.info                       -> VmInfo { config, state, memory_actual_size }
//! GET  vm.counters                   -> Counters { device: { counter: n } }
//! GET  ferry.cpuid                   -> Cpuid { profile, requested, effective, forced, .. }
//! GET  ferry.progress                -> Progress
//! PUT  vm.pause | vm.resume | vm.shutdown | vmm.shutdown -> 204
//! PUT  vm.snapshot SnapshotRequest   -> Snapshot { state, path, bytes, memory_ranges, ms }
//! PUT  vm.send-migration MigrateRequest -> Migrated { state, report }
//! PUT  ferry.cancel                  -> Cancelled { cancelled }
//! PUT  vm.create CreateRequest | vm.boot | vm.restore RestoreRequest
//!      | vm.receive-migration ReceiveRequest (crate::api::create) -> 204
//! any, failed                        -> Failure { code, message, state?, report? }
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::codes::Code;
use crate::migrate::{Progress, Report};
use crate::vcpu::RunState;

/// What a request asks for (each a route of the HTTP API, crate::api::routes).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Ping,
    Info,
    Counters,
    Status,
    Cpuid,
    Progress,
    Metrics,
    Pause,
    Resume,
    /// vm.shutdown: the VM ends, and with it this ferry.
    Stop,
    /// vmm.shutdown: this ferry ends, and with it its VM.
    Shutdown,
    Cancel,
    Snapshot {
        /// Where to write, resolved in the server's working directory (send it absolute).
        path: PathBuf,
        /// End the VM after writing.
        stop: bool,
    },
    Migrate(Box<MigrateRequest>),
    CpuCheck(CpuCheckRequest),
    /// vm.create: a `ferry serve`'s VM, kept until vm.boot.
    Create(Box<super::create::CreateRequest>),
    Boot,
    /// vm.delete: the configuration vm.create kept, before vm.boot.
    Delete,
    Restore(super::create::RestoreRequest),
    Receive(Box<super::create::ReceiveRequest>),
}

/// vm.snapshot's body: Cloud Hypervisor's `destination_url` (`file:///PATH`: a file, or
/// a directory to write `ferry.snap` into), and ferry's `stop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub destination_url: String,
    /// End the VM after writing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stop: bool,
}

/// vm.send-migration's body: Cloud Hypervisor's `destination_url` and `local`, and ferry's
/// options; absent options take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// tcp:HOST:PORT or unix:PATH.
    pub destination_url: String,
    /// Cloud Hypervisor's hand-over of memory to a process on this host: not done by this
    /// ferry (refused when true).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
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
    /// Cloud Hypervisor's: keep the source's VM, paused, after the migration (refused when
    /// true: a ferry source ends once the destination has the guest).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preserve_source: bool,
    /// Cloud Hypervisor's downtime target in ms (max_downtime_ms says the same, finer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Cloud Hypervisor's timeout in seconds (timeout_ms says the same, finer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Cloud Hypervisor's: what happens at the timeout; `Cancel` (ferry's way) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_strategy: Option<String>,
    /// Cloud Hypervisor's number of connections; 1 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// Cloud Hypervisor's `Precopy` or `Postcopy` (postcopy at once: postcopy_after 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mode: Option<String>,
}

/// ferry.cpu-check's body: a CPU profile, a built-in name (or `default`) or a profile file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuCheckRequest {
    pub profile: String,
}

/// ferry.cpu-check's answer: whether this host runs the profile, what it lacks, and what
/// the guest kernel must not use on this emulating KVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuCheck {
    /// The profile's name.
    pub profile: String,
    /// The host checked (its CPU dump's source).
    pub host: String,
    pub runs: bool,
    /// Features the profile has and the host lacks.
    pub missing: Vec<String>,
    /// Anything else the host lacks (address sizes, XSAVE layout), a sentence each.
    pub other: Vec<String>,
    pub notes: Vec<String>,
}

/// vmm.ping's answer (Cloud Hypervisor's VmmPingResponse).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ping {
    pub build_version: String,
    pub version: String,
    pub pid: u32,
    pub features: Vec<String>,
}

/// vm.info's answer (Cloud Hypervisor's VmInfo, with the parts of VmConfig ferry has).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub config: VmInfoConfig,
    /// `Running`, `Paused` or `Shutdown`.
    pub state: String,
    pub memory_actual_size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfoConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub disks: Vec<DiskConfig>,
    pub net: Vec<NetConfig>,
    /// ferry's own: the guest CPU profile's name.
    pub cpu_profile: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryConfig {
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: String,
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: String,
}

/// vm.counters' answer: counters by device (`vcpu0`, ..., `migration`), each by name.
pub type Counters = std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>;

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

/// A failed request's body: what kind of failure (docs/api.md, "Error codes"), the
/// sentence, and for a migration that was cancelled the VM's state and the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    #[serde(default)]
    pub code: Code,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Box<Report>>,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            state: None,
            report: None,
        }
    }
}

/// Any answer, as the server writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Ping(Ping),
    Info(Box<VmInfo>),
    Counters(Counters),
    Status(Status),
    /// Answered with 204 and no body.
    State(StateAnswer),
    Cpuid(Box<Cpuid>),
    Progress(Progress),
    /// ferry.metrics: Prometheus' text format.
    Metrics(String),
    CpuCheck(Box<CpuCheck>),
    Snapshot(Snapshot),
    Migrated(Box<Migrated>),
    Cancelled(Cancelled),
    Failure(Failure),
}
