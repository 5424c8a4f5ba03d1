//! The destination's side of the protocol as a state machine with no I/O: input a decoded
//! message (or the outcome of an action it asked for), output the next action. The vmm's
//! destination is the driver around it (reading, writing, building the machine); the
//! receiver fuzz target drives the same machine.
//!
//! ```text
//! Handshake (authenticated already, where a key or TLS is set: vmm's migrate::tls)
//!     |  \__________Hello______________________________
//!     |                                                   v
//!     |                                          Checking (CheckHello)
//!     |                                              | Done(ok): Accept
//!     v                                              v
//!  Failed <--- anything unexpected ---  Accepted -> Precopy{round} <-> Syncing (Sync, Synced)
//!                                                    | State
//!                                                    v
//!                               DeviceState (LoadState) --Done(ok): Restored--> AwaitCommit
//!                                                    Commit: Start --> Starting --Done(ok)--> Running
//! ```
//! Missing (postcopy: the pages to fetch after Running) is taken in any precopy state.
//! After Running a postcopy driver asks for those pages while the guest runs (Phase
//! Postcopy); the machine has ended by then.
//! Touched (the blocks round 0 fills) is taken only before the first Sync; Cancel ends it
//! in any precopy state. A refusal carries the Refuse to send, a failure of this side the
//! Failed to send, so that the source knows why.

use crate::protocol::{Hello, Message};

/// Where a migration is, as errors name it (either side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting, authenticating, Hello and Accept.
    Handshake,
    /// Precopy: the guest runs at the source while its memory goes over.
    Memory { round: u32 },
    /// The guest is paused at the source; the last pages and the state go over.
    Switchover,
    /// The destination has restored the guest (paused) and waits for Commit.
    AwaitCommit,
    /// Commit sent (source) or received (destination).
    AfterCommit,
    /// Postcopy: the guest runs at the destination, which fetches its missing pages.
    Postcopy,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Handshake => write!(f, "handshake"),
            Phase::Memory { round } => write!(f, "memory round {round}"),
            Phase::Switchover => write!(f, "after the pause, before Restored"),
            Phase::AwaitCommit => write!(f, "after Restored, before Commit"),
            Phase::AfterCommit => write!(f, "after Commit"),
            Phase::Postcopy => write!(f, "postcopy, the guest running at the destination"),
        }
    }
}

/// The receiver's states (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Handshake,
    Checking,
    Accepted,
    Precopy { round: u32, round0_open: bool },
    Syncing { round: u32 },
    DeviceState,
    AwaitCommit,
    Starting,
    Running,
    Failed,
}

/// What the driver hands the machine; `E` is the driver's own error, which a failed action
/// reports and the machine hands back in its [`Error`] (its text is what the source is told).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input<E = String> {
    /// A control message from the source.
    Message(Message),
    /// The head of a page frame of `round` (the driver holds it and its pages).
    Pages { round: u32 },
    /// The outcome of the last action that asked for one.
    Done(Result<(), E>),
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read the next input.
    Next,
    /// Send this to the source, then read the next input.
    Reply(Message),
    /// Check the Hello against this host; report with [`Input::Done`] (Err: the reason to
    /// refuse).
    CheckHello(Box<Hello>),
    /// Send Accept; build the machine and back its RAM meanwhile; read the next input.
    Accept,
    /// Read the frame's pages into guest RAM; read the next input.
    WritePages,
    /// A hint: the 2 MiB blocks round 0 fills (the driver checks the map's length).
    Readahead(Vec<u64>),
    /// Postcopy: these pages are to be fetched after Running (the driver checks them
    /// against RAM).
    Missing { first_page: u64, words: Vec<u64> },
    /// The end of a round: every page in RAM and the machine built; report with Done.
    Sync,
    /// Read the VM stream and restore it; report with Done.
    LoadState,
    /// Run the guest; report with Done.
    Start,
    /// The guest runs here: confirm Running to the source; the end.
    Running,
}

/// Why the receiver ends without the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error<E = String> {
    /// This side's check of the Hello refused it.
    #[error("refused: {0}")]
    Refused(E),
    /// The source offered a key this side does not have.
    #[error("refused: {NO_KEY}")]
    NoKey,
    /// The source's own words.
    #[error("the source cancelled the migration: {0}")]
    CancelledBySource(String),
    #[error("expected {expected}, the source sent {got} (phase: {phase})")]
    Unexpected {
        phase: Phase,
        expected: &'static str,
        got: &'static str,
    },
    #[error("no Commit from the source: got {0}")]
    NoCommit(&'static str),
    /// An action of this side failed.
    #[error("{0}")]
    Failed(E),
    #[error("the migration has ended")]
    Ended,
}

/// An end without the guest: the error, and what to tell the source first, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure<E = String> {
    pub reply: Option<Box<Message>>,
    pub error: Error<E>,
}

/// The receiver.
#[derive(Debug)]
pub struct Receiver {
    state: State,
}

fn name<E>(i: &Input<E>) -> &'static str {
    match i {
        Input::Message(m) => m.name(),
        Input::Pages { .. } => "Pages",
        Input::Done(_) => "an outcome",
    }
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    /// A receiver at the start of a connection (authenticated already, if at all).
    pub fn new() -> Self {
        Receiver {
            state: State::Handshake,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The phase, as errors name it.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::Handshake | State::Checking => Phase::Handshake,
            State::Accepted => Phase::Memory { round: 0 },
            State::Precopy { round, .. } | State::Syncing { round } => Phase::Memory { round },
            State::DeviceState => Phase::Switchover,
            State::AwaitCommit => Phase::AwaitCommit,
            State::Starting | State::Running | State::Failed => Phase::AfterCommit,
        }
    }

    /// What the next read waits for, as a read error names it.
    pub fn awaits(&self) -> &'static str {
        match self.state {
            State::AwaitCommit => "waiting for Commit",
            State::Accepted | State::Precopy { .. } => "receiving memory",
            _ => "waiting for Hello",
        }
    }

    /// Whether the next input is read as precopy traffic (page frames among the messages).
    pub fn in_precopy(&self) -> bool {
        matches!(self.state, State::Accepted | State::Precopy { .. })
    }

    /// Takes one input; Ok is what to do next, Err how the migration ends here.
    pub fn step<E: std::fmt::Display>(&mut self, input: Input<E>) -> Result<Action, Failure<E>> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let result = self.transition(state, input);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn transition<E: std::fmt::Display>(
        &mut self,
        state: State,
        input: Input<E>,
    ) -> Result<Action, Failure<E>> {
        match (state, input) {
            (State::Handshake, Input::Message(Message::AuthChallenge(_))) => Err(Failure {
                reply: Some(Box::new(Message::Refuse(NO_KEY.into()))),
                error: Error::NoKey,
            }),
            (State::Handshake, Input::Message(Message::Hello(h))) => {
                self.state = State::Checking;
                Ok(Action::CheckHello(Box::new(h)))
            }
            (State::Checking, Input::Done(Ok(()))) => {
                self.state = State::Accepted;
                Ok(Action::Accept)
            }
            (State::Checking, Input::Done(Err(why))) => Err(Failure {
                reply: Some(Box::new(Message::Refuse(why.to_string()))),
                error: Error::Refused(why),
            }),
            (State::Accepted, i) => self.precopy(0, true, i),
            (State::Precopy { round, round0_open }, i) => self.precopy(round, round0_open, i),
            (State::Syncing { round }, Input::Done(r)) => {
                r.map_err(fail)?;
                self.state = State::Precopy {
                    round,
                    round0_open: false,
                };
                Ok(Action::Reply(Message::Synced))
            }
            (State::DeviceState, Input::Done(r)) => {
                r.map_err(fail)?;
                self.state = State::AwaitCommit;
                Ok(Action::Reply(Message::Restored))
            }
            (State::AwaitCommit, Input::Message(Message::Commit)) => {
                self.state = State::Starting;
                Ok(Action::Start)
            }
            (State::AwaitCommit, i) => Err(Failure {
                reply: None,
                error: Error::NoCommit(name(&i)),
            }),
            (State::Starting, Input::Done(r)) => {
                r.map_err(fail)?;
                self.state = State::Running;
                Ok(Action::Running)
            }
            (State::Running | State::Failed, _) => Err(Failure {
                reply: None,
                error: Error::Ended,
            }),
            (s, i) => {
                self.state = s;
                Err(self.unexpected(&i))
            }
        }
    }

    fn precopy<E>(
        &mut self,
        round: u32,
        round0_open: bool,
        i: Input<E>,
    ) -> Result<Action, Failure<E>> {
        self.state = State::Precopy { round, round0_open };
        match i {
            Input::Pages { round } => {
                self.state = State::Precopy { round, round0_open };
                Ok(Action::WritePages)
            }
            Input::Message(Message::Touched(words)) if round0_open => Ok(Action::Readahead(words)),
            Input::Message(Message::Missing { first_page, words }) => {
                Ok(Action::Missing { first_page, words })
            }
            Input::Message(Message::Sync) => {
                self.state = State::Syncing { round };
                Ok(Action::Sync)
            }
            Input::Message(Message::Cancel(why)) => Err(Failure {
                reply: None,
                error: Error::CancelledBySource(why),
            }),
            Input::Message(Message::State) => {
                self.state = State::DeviceState;
                Ok(Action::LoadState)
            }
            other => Err(self.unexpected(&other)),
        }
    }

    fn unexpected<E>(&self, i: &Input<E>) -> Failure<E> {
        let expected = match self.state {
            State::Handshake => "Hello",
            State::Precopy {
                round0_open: true, ..
            } => "Pages, Sync, Touched, Missing, Cancel or State",
            State::Precopy { .. } => "Pages, Sync, Missing, Cancel or State",
            _ => "the outcome of the last step",
        };
        Failure {
            reply: None,
            error: Error::Unexpected {
                phase: self.phase(),
                expected,
                got: name(i),
            },
        }
    }
}

/// Why a source that offers a key is refused by a destination that has none.
pub const NO_KEY: &str =
    "this destination has no key (--key-file): it takes unauthenticated migrations only";

/// A failure of this side's: told to the source.
fn fail<E: std::fmt::Display>(why: E) -> Failure<E> {
    Failure {
        reply: Some(Box::new(Message::Failed(why.to_string()))),
        error: Error::Failed(why),
    }
}

#[cfg(test)]
mod tests;
