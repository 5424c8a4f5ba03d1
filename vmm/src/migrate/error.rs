//! The migration's errors, each with the kind of failure it is ([`Code`]), as the control
//! socket reports it.

use std::time::Duration;

use migration::auth;
use migration::protocol;

use super::{key, Phase, ReceiveError, Report};
use crate::codes::Code;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad migration address {0:?}: expected tcp:HOST:PORT or unix:PATH")]
    Address(String),
    #[error("{what} {addr}: {source}")]
    Connect {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("{what} (phase: {phase}): {source}")]
    Protocol {
        phase: Phase,
        what: &'static str,
        source: protocol::Error,
    },
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("the destination failed (phase: {phase}): {reason}")]
    DestinationFailed { phase: Phase, reason: String },
    /// This side refused the source's VM (the source was told why).
    #[error("refused: {0}")]
    RefusedHere(#[source] Box<ReceiveError>),
    /// This side could not go on with the VM (the source was told why, where it could be).
    #[error("receiving the VM: {0}")]
    FailedHere(#[source] Box<ReceiveError>),
    #[error("saving the VM: {what}: {source}")]
    DirtyLog {
        what: &'static str,
        #[source]
        source: crate::memory::Error,
    },
    #[error("saving the VM: {0}")]
    Pause(#[source] crate::vm::Error),
    #[error("saving the VM: {0}")]
    SaveState(#[source] crate::vm::state::Error),
    #[error("saving the VM: reading guest page {gpa:#x}: {source}")]
    ReadPage {
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("saving the VM: RAM at {0:#x} is not one region")]
    RamLayout(u64),
    #[error("starting the {what} thread: {source}")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("getrandom: {0}")]
    Random(#[source] std::io::Error),
    #[error("no Commit from the source (phase: after Restored, before Commit): {0}; the guest stays with the source")]
    NoCommit(#[source] protocol::Error),
    #[error("no word from the destination after Commit (phase: after Commit): {0}; the guest stays paused here, as it may run there: if the destination does not run it, `ferry ctl resume --api-socket PATH` runs it here")]
    Unconfirmed(#[source] protocol::Error),
    #[error("the link broke during postcopy (phase: postcopy, the guest running at the destination): {0}; the guest has run there since the switch and some of its pages were never sent: it stays paused here (`ferry ctl resume --api-socket PATH` would roll it back to the switch)")]
    PostcopyBroken(#[source] Box<Error>),
    #[error("postcopy failed with the guest running here: {0}; pages of the guest that never arrived are only at the source, so it cannot go on here (the source keeps its copy paused)")]
    PostcopyLost(#[source] Box<Error>),
    #[error("migration cancelled: {why}; the VM runs here as before")]
    Cancelled { why: Cancel, report: Box<Report> },
    #[error("the source cancelled the migration: {0}")]
    CancelledBySource(String),
    #[error("a migration of this VM is already in progress")]
    Busy,
    #[error("authentication: {0}")]
    Auth(#[source] AuthFailure),
    #[error("refusing to listen on {0} without --key-file or --tls-dir: anyone who can reach it could hand this ferry a VM; use a Unix socket or a loopback address, or give a shared key or certificates")]
    Unauthenticated(String),
    #[error("refusing to send the guest unencrypted to {0}: give --key-file or --tls-dir (on both sides), or --insecure to send its memory and state in the clear anyway")]
    Plaintext(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("TLS files: {0}")]
    TlsFiles(#[source] TlsFiles),
    #[error("the destination gave up: {}", deadline_passed(*.deadline, *.phase))]
    Deadline { deadline: Duration, phase: Phase },
    #[error("{0}: another process is listening there (a second `ferry receive` on one path?)")]
    AddressInUse(String),
    #[error("the source sent pages at {gpa:#x} ({len} bytes) outside guest RAM")]
    PagesOutsideRam { gpa: u64, len: u64 },
    #[error("the source's map of touched RAM has {words} words, where this guest's RAM needs {expected}")]
    BadTouchedMap { words: usize, expected: usize },
}

/// Why the peer was not taken as the one holding the key or the certificate.
#[derive(Debug, thiserror::Error)]
pub enum AuthFailure {
    #[error("the destination could not prove the shared key")]
    DestinationProof,
    #[error("the source could not prove the shared key")]
    SourceProof,
    /// The names this side was given with --tls-allow.
    #[error("the source's certificate names none of --tls-allow {}", .0.join(", "))]
    NotAllowed(Vec<String>),
    #[error(transparent)]
    Handshake(auth::Error),
}

/// A TLS file, name or option that is not what it must be.
#[derive(Debug, thiserror::Error)]
pub enum TlsFiles {
    #[error("{}: {source}", .path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key the TLS library would not take, in its words.
    #[error("{}: {why}", .path.display())]
    Refused {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("{}: no certificate in it", .0.display())]
    NoCertificate(std::path::PathBuf),
    #[error(transparent)]
    Key(#[from] key::Error),
    /// The name given (--tls-name, or the address's host).
    #[error("{0:?} is not a host name or address")]
    NotAName(String),
    /// A name given with --tls-allow.
    #[error("--tls-allow {0:?}: not a name")]
    NotAnAllowedName(String),
    #[error("making a certificate: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("the destination's certificate needs at least one name")]
    NoNames,
    #[error("a certificate is valid for 1 day or more")]
    NoDays,
    #[error("{}: the CA key goes outside {}, which both hosts are given", .key.display(), .dir.display())]
    CaKeyInside {
        key: std::path::PathBuf,
        dir: std::path::PathBuf,
    },
    #[error("{} exists already: ferry tls generate writes only new files", .0.display())]
    Exists(std::path::PathBuf),
}

/// Why a migration was cancelled at the source (the guest runs on there).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Cancel {
    #[error("cancelled by request in round {round} after {bytes} bytes")]
    Requested { round: u32, bytes: u64 },
    #[error("timed out after {:.1} s in round {round}", .elapsed.as_secs_f64())]
    TimedOut { elapsed: Duration, round: u32 },
    /// Precopy could not converge within the timeout.
    #[error(transparent)]
    Stuck(#[from] migration::converge::Stuck),
}

/// What a destination whose deadline passed tells the source (its Failed's reason).
pub(super) fn deadline_passed(deadline: Duration, phase: Phase) -> String {
    format!(
        "its deadline of {} s passed (phase: {phase}); the source keeps the guest",
        deadline.as_secs()
    )
}

impl Error {
    /// What kind of failure this is (docs/api.md, "Error codes").
    pub fn code(&self) -> Code {
        match self {
            Error::Address(_) | Error::AddressInUse(_) => Code::BadRequest,
            Error::Connect { source, .. } => Code::of_connection(source),
            Error::Protocol { source, .. } => match source {
                protocol::Error::Io(e) => Code::of_connection(e),
                _ => Code::Protocol,
            },
            Error::PagesOutsideRam { .. } | Error::BadTouchedMap { .. } => Code::Protocol,
            Error::Refused(_) => Code::Refused,
            Error::RefusedHere(e) | Error::FailedHere(e) => e.code(),
            Error::DestinationFailed { .. } => Code::PeerFailed,
            Error::Unauthenticated(_) | Error::Plaintext(_) => Code::RefusedPolicy,
            Error::Auth(_) | Error::Tls(_) => Code::AuthFailed,
            Error::TlsFiles(e) => e.code(),
            Error::DirtyLog { .. } | Error::Pause(_) | Error::SaveState(_) => Code::Kvm,
            Error::NoCommit(_) => Code::LinkLost,
            Error::Deadline { .. } => Code::TimedOut,
            Error::Unconfirmed(_) => Code::Unconfirmed,
            Error::PostcopyBroken(_) | Error::PostcopyLost(_) => Code::PostcopyBroken,
            Error::Cancelled { .. } | Error::CancelledBySource(_) => Code::Cancelled,
            Error::Busy => Code::Busy,
            Error::ReadPage { .. }
            | Error::RamLayout(_)
            | Error::Thread { .. }
            | Error::Random(_) => Code::Internal,
        }
    }
}

impl TlsFiles {
    /// What kind of failure this is: a file that could not be read or written, one that is
    /// not a certificate or key, or a name or option that is not one.
    pub fn code(&self) -> Code {
        match self {
            TlsFiles::Io { .. } | TlsFiles::Key(_) => Code::Io,
            TlsFiles::Refused { .. } | TlsFiles::NoCertificate(_) => Code::BadFile,
            TlsFiles::NotAName(_)
            | TlsFiles::NotAnAllowedName(_)
            | TlsFiles::NoNames
            | TlsFiles::NoDays
            | TlsFiles::CaKeyInside { .. }
            | TlsFiles::Exists(_)
            | TlsFiles::Generate(_) => Code::BadRequest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_or_silent_peer_is_a_lost_link_or_a_timeout() {
        use std::io::{Error as E, ErrorKind as K};
        let proto = |e: E| Error::Protocol {
            phase: super::super::Phase::Handshake,
            what: "reading",
            source: protocol::Error::Io(e),
        };
        assert_eq!(proto(E::from(K::UnexpectedEof)).code(), Code::LinkLost);
        assert_eq!(proto(E::from(K::WouldBlock)).code(), Code::TimedOut);
        let unexpected = Error::Protocol {
            phase: super::super::Phase::Handshake,
            what: "reading",
            source: protocol::Error::Unexpected {
                expected: "Accept",
                found: "Hello".into(),
            },
        };
        assert_eq!(unexpected.code(), Code::Protocol);
        assert_eq!(Error::Busy.code().as_str(), "busy");
    }

    #[test]
    fn a_cancel_and_a_failed_proof_keep_their_kind_and_say_why() {
        let cancelled = Error::Cancelled {
            why: super::super::Cancel::Requested {
                round: 3,
                bytes: 4096,
            },
            report: Box::default(),
        };
        assert_eq!(cancelled.code(), Code::Cancelled);
        assert_eq!(
            cancelled.to_string(),
            "migration cancelled: cancelled by request in round 3 after 4096 bytes; the VM runs here as before"
        );
        let allow = vec!["a.example".to_string(), "b.example".to_string()];
        let refused = Error::Auth(super::super::AuthFailure::NotAllowed(allow));
        assert_eq!(refused.code(), Code::AuthFailed);
        assert!(refused
            .to_string()
            .ends_with("--tls-allow a.example, b.example"));
    }
}
