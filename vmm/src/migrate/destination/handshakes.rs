//! The destination's front door: several connections authenticate at once, and the first
//! that does is the source.
//!
//! ```text
//! accept (polled) --> slot free? ---------------------------> handshake thread 1..=MAX
//!                     all MAX taken: the oldest is dropped       TLS and the key's proofs
//!                     (its socket shut down) for the new one     within the handshake
//!                                                                deadline
//!              <-- the first Ok: every other handshake is shut down, the listener closed
//!              <-- an Err: logged with the peer's address; the slot is free again
//! ```
//! A peer that connects and says nothing costs one slot for at most the handshake
//! deadline, and only until MAX newer connections push it out: idle connections delay a
//! real source by one handshake at most, never block it.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::net::{Bounded, Closer, Conn, Listener, Socket};
use super::{DestinationTls, Error, Key, ReceiveOptions, HANDSHAKE_TIMEOUT};

/// A source that has connected and authenticated, its VM not yet received.
pub struct Source {
    pub(super) conn: Box<dyn Conn>,
    /// Set once the guest is handed over: the deadline no longer bounds the connection.
    pub(super) lifted: Arc<AtomicBool>,
    /// The peer's address (on a Unix socket, its uid and pid).
    pub peer: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").field("peer", &self.peer).finish()
    }
}

/// Waits at `listener` for the source: the first connection that authenticates as `opts`
/// say (up to [`MAX_HANDSHAKES`] at once, each in a thread filtered as a handshake); its
/// reads and writes are bounded by `opts.deadline` from when it connected. The listener
/// closes.
pub fn accept_source(listener: Listener, opts: &ReceiveOptions) -> Result<Source, Error> {
    let lifted = Arc::new(AtomicBool::new(false));
    let (deadline, timeout) = (opts.deadline, opts.peer_timeout);
    let wrap = |sock: Box<dyn Socket>| -> Box<dyn Socket> {
        let until = Instant::now() + deadline;
        Box::new(Bounded::new(sock, until, timeout, lifted.clone()))
    };
    let door = Door {
        key: opts.key.as_ref(),
        tls: opts.tls.as_ref(),
        peer_timeout: opts.peer_timeout,
        wrap: &wrap,
    };
    if opts.key.is_some() || opts.tls.is_some() {
        super::tls::warm_up();
    }
    let (conn, peer) = first_source(&listener, &door)?;
    log::info!("the source is {peer}");
    Ok(Source { conn, lifted, peer })
}

/// Handshakes under way at once, at most.
pub const MAX_HANDSHAKES: usize = 8;
/// How long the accepting loop waits at most before it looks again (a new connection or a
/// handshake's end wakes it at once).
const POLL: Duration = Duration::from_secs(1);

/// How a connection must authenticate.
struct Door<'a> {
    key: Option<&'a Key>,
    tls: Option<&'a DestinationTls>,
    peer_timeout: Duration,
    /// Each accepted socket, wrapped (the migration's deadline) before its handshake.
    wrap: &'a (dyn Fn(Box<dyn Socket>) -> Box<dyn Socket> + Sync),
}

/// A handshake's end: its id and its connection, authenticated, or why not.
type Finished = (u64, Result<Box<dyn Conn>, Error>);

/// A handshake under way.
struct Pending {
    id: u64,
    closer: Closer,
    peer: String,
}

/// Waits at `listener` for the first connection that authenticates as `door` says, with up
/// to [`MAX_HANDSHAKES`] under way at once; returns it and the peer's name.
fn first_source(listener: &Listener, door: &Door<'_>) -> Result<(Box<dyn Conn>, String), Error> {
    let secured = door.key.is_some() || door.tls.is_some();
    let handshake = HANDSHAKE_TIMEOUT.min(door.peer_timeout);
    let (done_tx, done) = mpsc::channel::<Finished>();
    // A handshake that ends says so here too, so that the loop waiting on the listener
    // wakes at once (not a poll later: that would be the migration's time).
    let ended = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Thread {
        what: "handshake wake-up",
        source,
    })?;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    std::thread::scope(|scope| {
        let mut next_id = 0u64;
        let won = loop {
            if let Some(won) = collect(&done, &mut pending) {
                break Ok(won);
            }
            let Some((sock, closer, peer)) =
                listener.accept_within(door.peer_timeout, secured, POLL, &ended)?
            else {
                continue;
            };
            if pending.len() >= MAX_HANDSHAKES {
                if let Some(old) = pending.pop_front() {
                    old.closer.close();
                    log::warn!(
                        "dropped the connection from {}: {MAX_HANDSHAKES} handshakes were under way, the oldest goes",
                        old.peer
                    );
                }
            }
            let (id, tx) = (next_id, done_tx.clone());
            next_id += 1;
            let sock = (door.wrap)(sock);
            let (key, tls, timeout, ended) = (door.key, door.tls, door.peer_timeout, &ended);
            let spawned = std::thread::Builder::new()
                .name("mig-handshake".into())
                .spawn_scoped(scope, move || {
                    crate::sandbox::enter_or_exit(crate::sandbox::Kind::Handshake);
                    let r = super::tls::from_source(sock, key, tls, handshake, timeout);
                    let _ = tx.send((id, r));
                    let _ = ended.write(1);
                });
            if let Err(source) = spawned {
                break Err(Error::Thread {
                    what: "handshake",
                    source,
                });
            }
            pending.push_back(Pending { id, closer, peer });
        };
        // The rest are shut down, so that their threads end now.
        for p in pending.drain(..) {
            p.closer.close();
        }
        won
    })
}

/// The handshakes finished so far: failures logged and their slots freed; the first
/// success, with its peer's name.
fn collect(
    done: &mpsc::Receiver<Finished>,
    pending: &mut VecDeque<Pending>,
) -> Option<(Box<dyn Conn>, String)> {
    while let Ok((id, result)) = done.try_recv() {
        let Some(at) = pending.iter().position(|p| p.id == id) else {
            continue; // dropped for a newer one already
        };
        let Some(p) = pending.remove(at) else {
            continue;
        };
        match result {
            Ok(conn) => return Some((conn, p.peer)),
            Err(e) => log::warn!(
                "refused a connection from {}: {e}; waiting for the source",
                p.peer
            ),
        }
    }
    None
}
