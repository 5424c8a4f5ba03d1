//! Why the destination refuses a VM, or cannot go on with one: kept typed on this side (a
//! caller matches its kind, the control socket its [`Code`]); its words are what the source
//! is told, in Refuse (before Accept) or Failed (after).

use migration::limits::{FORMAT_VERSION, OLDEST_FORMAT_VERSION};
use migration::receiver::Phase;

use crate::codes::Code;
use crate::devices::virtio::backends::Mismatch;
use crate::guest_cpu::admission;

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The source offered a key; this side has none.
    #[error("{}", migration::receiver::NO_KEY)]
    NoKey,
    #[error("the guest has {} MiB of RAM, more than this destination takes (--max-memory {} MiB)", .asked >> 20, .max >> 20)]
    TooMuchMemory { asked: u64, max: u64 },
    #[error("the guest has {asked} vCPUs, more than this destination takes (--max-vcpus {max})")]
    TooManyVcpus { asked: u32, max: u32 },
    #[error("stream format version {0}, this ferry reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}")]
    FormatVersion(u32),
    /// KVM, or the machine's size, or its RAM: this host cannot create the VM.
    #[error("cannot create the VM here: {0}")]
    Machine(#[source] crate::vm::Error),
    #[error(transparent)]
    Profile(#[from] cpuid::profile::Error),
    #[error("cannot create the VM here: {0}")]
    Probe(#[from] admission::Error),
    /// This host's CPU cannot run the guest as it ran.
    #[error(transparent)]
    Cpu(#[from] admission::Refusal),
    #[error(transparent)]
    Devices(#[from] Mismatch),
    #[error("starting the thread that builds the VM: {0}")]
    BuildThread(#[source] std::io::Error),
    #[error("building the VM panicked")]
    BuildPanicked,
    #[error("the source names page {0:#x} missing, which is not guest RAM")]
    MissingOutsideRam(u64),
    #[error("postcopy: the source did not send pages it was asked for")]
    PagesNotSent,
    #[error("postcopy: the source answered a request with {0} bytes of pages, more than any request asks")]
    OversizedAnswer(u64),
    #[error("postcopy: {what}: {source}")]
    Postcopy {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The VM stream is not the machine the Hello announced.
    #[error(transparent)]
    NotAnnounced(migration::stream::Error),
    #[error("the VM state's devices are not the ones the Hello announced")]
    DevicesDiffer,
    #[error("loading the VM state: {0}")]
    State(#[source] crate::vm::state::Error),
    #[error("starting the guest (phase: {phase}): {source}; the source keeps it")]
    Start {
        phase: Phase,
        #[source]
        source: crate::vm::Error,
    },
    /// The receiver asked for a step whose input an earlier step did not leave (a bug).
    #[error("{0} before its turn")]
    OutOfTurn(&'static str),
}

impl ReceiveError {
    /// What kind of failure this is (docs/api.md, "Error codes").
    pub fn code(&self) -> Code {
        match self {
            ReceiveError::NoKey => Code::AuthFailed,
            ReceiveError::TooMuchMemory { .. } | ReceiveError::TooManyVcpus { .. } => {
                Code::RefusedPolicy
            }
            ReceiveError::Devices(_) => Code::RefusedPolicy,
            ReceiveError::FormatVersion(_) | ReceiveError::Profile(_) => Code::Refused,
            ReceiveError::Cpu(_) => Code::RefusedCpu,
            ReceiveError::Machine(e) | ReceiveError::Start { source: e, .. } => e.code(),
            ReceiveError::Probe(_) | ReceiveError::Postcopy { .. } => Code::Kvm,
            ReceiveError::MissingOutsideRam(_)
            | ReceiveError::PagesNotSent
            | ReceiveError::OversizedAnswer(_)
            | ReceiveError::NotAnnounced(_)
            | ReceiveError::DevicesDiffer => Code::Protocol,
            ReceiveError::State(e) => e.code(),
            ReceiveError::BuildThread(_)
            | ReceiveError::BuildPanicked
            | ReceiveError::OutOfTurn(_) => Code::Internal,
        }
    }
}
