//! What kind of failure an error is, for a program that acts on it rather than reads it: each
//! kind has a stable code that the control socket returns beside the sentence
//! (`"code":"refused"`; docs/api.md, "Error codes"). A code never changes meaning; a new kind
//! of failure gets a new code.

use serde::{Deserialize, Serialize};

/// A kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Code {
    /// A request, field or option that this ferry does not take as given.
    BadRequest,
    /// No such route, not with this method, or a thing a request names (a CPU profile)
    /// does not exist.
    NotFound,
    /// A migration of this VM is under way already.
    Busy,
    /// The VM, or the migration, is not in a state for this request.
    WrongState,
    /// Refused by policy: this side's limits, or plaintext or an unauthenticated listener
    /// where only keyed or TLS peers are allowed.
    RefusedPolicy,
    /// The destination refused the VM, in its own words (its limits, its host's CPU, its
    /// devices).
    Refused,
    /// This host cannot run the guest's CPU: a profile it lacks features for, or a guest
    /// that would see another CPU here.
    RefusedCpu,
    /// The peer did not prove the shared key, or its TLS certificate was not accepted.
    AuthFailed,
    /// The peer broke the protocol: an unexpected message, a malformed or oversized frame, a
    /// bad checksum, pages outside guest RAM.
    Protocol,
    /// The peer could not be reached, or the connection closed or failed.
    LinkLost,
    /// A peer timeout or a deadline passed.
    TimedOut,
    /// Reading or writing a named file failed.
    Io,
    /// A file is not what it must be: a corrupt, truncated or hostile snapshot, or one of a
    /// format this ferry does not read.
    BadFile,
    /// KVM refused an operation.
    Kvm,
    /// The migration was cancelled (by `cancel`, its timeout or the source): the guest runs
    /// on at the source.
    Cancelled,
    /// The peer failed after taking part: the destination could not load or start the
    /// guest, and the source keeps it.
    PeerFailed,
    /// Commit went out and no answer came: the guest stays paused at the source, as it may
    /// run at the destination.
    Unconfirmed,
    /// The link broke after the postcopy switch: the guest's memory is split between the
    /// hosts; it stays paused at the source.
    PostcopyBroken,
    /// Anything else.
    #[default]
    Internal,
}

impl Code {
    /// Every code, in the order docs/api.md lists them.
    pub const ALL: [Code; 19] = [
        Code::BadRequest,
        Code::NotFound,
        Code::Busy,
        Code::WrongState,
        Code::RefusedPolicy,
        Code::Refused,
        Code::RefusedCpu,
        Code::AuthFailed,
        Code::Protocol,
        Code::LinkLost,
        Code::TimedOut,
        Code::Io,
        Code::BadFile,
        Code::Kvm,
        Code::Cancelled,
        Code::PeerFailed,
        Code::Unconfirmed,
        Code::PostcopyBroken,
        Code::Internal,
    ];

    /// The code as the control socket writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad-request",
            Code::NotFound => "not-found",
            Code::Busy => "busy",
            Code::WrongState => "wrong-state",
            Code::RefusedPolicy => "refused-policy",
            Code::Refused => "refused",
            Code::RefusedCpu => "refused-cpu",
            Code::AuthFailed => "auth-failed",
            Code::Protocol => "protocol",
            Code::LinkLost => "link-lost",
            Code::TimedOut => "timed-out",
            Code::Io => "io",
            Code::BadFile => "bad-file",
            Code::Kvm => "kvm",
            Code::Cancelled => "cancelled",
            Code::PeerFailed => "peer-failed",
            Code::Unconfirmed => "unconfirmed",
            Code::PostcopyBroken => "postcopy-broken",
            Code::Internal => "internal",
        }
    }

    /// The HTTP status a failure of this kind is answered with (the HTTP layer may answer a
    /// malformed message more precisely: 405, 411, 413, 431).
    pub fn http_status(self) -> u16 {
        match self {
            Code::BadRequest => 400,
            Code::NotFound => 404,
            Code::Busy | Code::WrongState | Code::Cancelled => 409,
            Code::RefusedPolicy | Code::AuthFailed => 403,
            Code::RefusedCpu | Code::Io | Code::BadFile => 422,
            Code::Refused
            | Code::Protocol
            | Code::LinkLost
            | Code::TimedOut
            | Code::PeerFailed
            | Code::Unconfirmed
            | Code::PostcopyBroken => 424,
            Code::Kvm | Code::Internal => 500,
        }
    }

    /// The code of a failed read or write on a connection: a timeout, or a lost link.
    pub fn of_connection(e: &std::io::Error) -> Code {
        match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Code::TimedOut,
            _ => Code::LinkLost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_once_and_serializes_as_written() {
        let mut seen = std::collections::BTreeSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c.as_str()), "{c:?} twice");
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<Code>(&json).unwrap(), c);
        }
    }

    #[test]
    fn docs_api_md_lists_every_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md");
        let text = std::fs::read_to_string(path).unwrap();
        let table = text
            .split("## Error codes")
            .nth(1)
            .expect("the codes' section");
        let listed: Vec<String> = table
            .lines()
            .filter_map(|l| {
                let mut cells = l.strip_prefix("| `")?.split(" | ");
                let code = cells.next()?.trim_end_matches('`');
                Some(format!("{code} {}", cells.next()?))
            })
            .collect();
        let all: Vec<String> = Code::ALL
            .iter()
            .map(|c| format!("{} {}", c.as_str(), c.http_status()))
            .collect();
        assert_eq!(listed, all, "docs/api.md's table and vmm::codes::Code");
    }
}
