//! What the source makes of the destination's answers, apart from the I/O: where each
//! answer leaves the guest (docs/migration-format.md, section 14). Before Commit any
//! failure leaves it running here; after Commit only the destination's Failed lets it
//! resume here, and silence keeps it paused (it may run there).

use migration::protocol::{self, Message};

use super::{Error, Phase};

/// The destination's answer to the Hello: Accept, or its Refuse in its own words.
pub(super) fn accepted(answer: Message) -> Result<(), Error> {
    match answer {
        Message::Accept => Ok(()),
        Message::Refuse(why) | Message::Failed(why) => Err(Error::Refused(why)),
        other => Err(unexpected(Phase::Handshake, "Accept", &other)),
    }
}

/// The destination's answer where `expected` is due in `phase`: its Failed, or any other
/// message, fails the migration there.
pub(super) fn answered(phase: Phase, expected: &'static str, answer: Message) -> Result<(), Error> {
    match answer {
        m if m.name() == expected => Ok(()),
        Message::Failed(reason) => Err(Error::DestinationFailed { phase, reason }),
        other => Err(unexpected(phase, expected, &other)),
    }
}

/// The destination's answer after Commit (or the failure to read one): Running, or its
/// Failed (it does not run the guest: resuming it here is safe); anything else leaves the
/// guest's fate unknown ([`Error::Unconfirmed`]).
pub(super) fn after_commit(answer: Result<Message, protocol::Error>) -> Result<(), Error> {
    match answer {
        Ok(Message::Running) => Ok(()),
        Ok(Message::Failed(reason)) => Err(Error::DestinationFailed {
            phase: Phase::AfterCommit,
            reason,
        }),
        Ok(other) => Err(Error::Unconfirmed(protocol::Error::Unexpected {
            expected: "Running",
            found: other.name().into(),
        })),
        Err(e) => Err(Error::Unconfirmed(e)),
    }
}

/// Whether a failed migration leaves the guest paused here: after Commit without an answer
/// it may run there, and in a broken postcopy it has run there.
pub(super) fn stays_paused(e: &Error) -> bool {
    matches!(e, Error::Unconfirmed(_) | Error::PostcopyBroken(_))
}

pub(super) fn unexpected(phase: Phase, expected: &'static str, got: &Message) -> Error {
    Error::Protocol {
        phase,
        what: "reading the destination's answer",
        source: protocol::Error::Unexpected {
            expected,
            found: got.name().into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::Code;

    fn lost() -> protocol::Error {
        protocol::Error::Io(std::io::ErrorKind::UnexpectedEof.into())
    }

    #[test]
    fn before_commit_every_failure_leaves_the_guest_running_here() {
        let refused = accepted(Message::Refuse("no ssse3".into())).unwrap_err();
        assert!(
            matches!(&refused, Error::Refused(w) if w == "no ssse3"),
            "{refused}"
        );
        assert_eq!(refused.code(), Code::Refused);
        assert!(!stays_paused(&refused));
        let odd = accepted(Message::Synced).unwrap_err();
        assert_eq!(odd.code(), Code::Protocol, "{odd}");
        assert!(accepted(Message::Accept).is_ok());
        let failed = answered(Phase::Switchover, "Restored", Message::Failed("x".into()));
        let failed = failed.unwrap_err();
        assert_eq!(failed.code(), Code::PeerFailed);
        assert!(!stays_paused(&failed));
        assert!(answered(Phase::Switchover, "Restored", Message::Restored).is_ok());
        let odd = answered(Phase::Memory { round: 2 }, "Synced", Message::Running).unwrap_err();
        assert_eq!(odd.code(), Code::Protocol, "{odd}");
        assert!(odd.to_string().contains("memory round 2"), "{odd}");
    }

    #[test]
    fn after_commit_only_the_destinations_failed_gives_the_guest_back() {
        assert!(after_commit(Ok(Message::Running)).is_ok());
        let failed = after_commit(Ok(Message::Failed("no room".into()))).unwrap_err();
        assert!(
            !stays_paused(&failed),
            "it said it does not run the guest: {failed}"
        );
        assert_eq!(failed.code(), Code::PeerFailed);
        for silence in [after_commit(Err(lost())), after_commit(Ok(Message::Synced))] {
            let e = silence.unwrap_err();
            assert!(stays_paused(&e), "the guest may run there: {e}");
            assert_eq!(e.code(), Code::Unconfirmed);
            assert!(e.to_string().contains("stays paused here"), "{e}");
        }
        let broken = Error::PostcopyBroken(Box::new(Error::Protocol {
            phase: Phase::Postcopy,
            what: "waiting for page requests",
            source: lost(),
        }));
        assert!(stays_paused(&broken));
        assert_eq!(broken.code(), Code::PostcopyBroken);
    }
}
