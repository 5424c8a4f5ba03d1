//! The kind of each migration error ([`Code`]), as the control socket reports it.

use super::{protocol, Error};
use crate::codes::Code;

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
            Error::TlsFiles(_) => Code::Io,
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
