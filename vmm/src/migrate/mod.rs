//! Live migration to a peer ferry process by precopy (docs/migration-format.md, "Protocol"),
//! on the handshake of migration::protocol:
//!
//! ```text
//! source                                         destination
//! Hello ------------------------------------->   checks the CPU profile, creates the VM
//!       <-------------------------------------   Accept | Refuse
//! dirty tracking on; round 0: every touched, non-zero page (pagemap, no reads of the rest)
//! round n: the pages dirtied during round n-1 (KVM's log | ferry's own writes)
//!   ... until migration::converge says switch over (or cancel; throttle meanwhile)
//! pause; the last dirty pages; State + VM stream ->   loads the state
//!       <-------------------------------------   Restored | Failed
//! Commit ------------------------------------>   runs the guest
//!       <-------------------------------------   Running | Failed
//! ```
//! The guest runs on exactly one side: before Commit any failure or cancel leaves it
//! running on the source (dirty tracking off, throttle off, vCPUs resumed); after Commit it
//! belongs to the destination, which confirms with Running (the source then ends its copy)
//! or, if it could not start it, Failed (the source resumes it). A source that sent Commit
//! and hears neither keeps the guest paused: the destination may be running it, so only
//! the operator can tell whether to resume it here ([`Error::Unconfirmed`]).
//!
//! Either side gives up on a peer that closes the connection, or sends or takes nothing for
//! the peer timeout; every error names the [`Phase`] it happened in.

mod destination;
mod error;
pub mod key;
mod net;
mod source;
mod tls;

pub use destination::{accept_source, Source, MAX_HANDSHAKES};
pub use destination::{host_memory_limit, host_vcpu_limit};
pub use destination::{keep_userfaultfd_open, PostcopyStats, PREFAULT_SLACK};
pub use destination::{receive, receive_from, receive_over, receive_source, receive_with};
pub use destination::{ReceiveError, ReceiveOptions, DEFAULT_DEADLINE};
pub use error::{AuthFailure, Cancel, Error, TlsFiles};
pub use net::{check_local, Address, Listener};
pub use source::{send, send_over};
pub use tls::{
    default_name as tls_default_name, generate as tls_generate, Generate as TlsGenerate,
};
pub use tls::{warm_up as warm_up_tls, DestinationTls, SourceTls, HANDSHAKE_TIMEOUT};

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use migration::auth::{self, Key};
use migration::protocol;

/// How long either side waits, by default, for the peer to send or take anything.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);

pub use migration::receiver::Phase;

/// Defaults of `ferry ctl migrate`.
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(20);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a throttled vCPU is sent out of the guest: it runs this long, then sleeps.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// The vCPU and device state sent at switchover, estimated per vCPU and for the rest.
const STATE_BYTES_PER_VCPU: u64 = 16 << 10;
const STATE_BYTES_FIXED: u64 = 16 << 10;
/// Pages (in 64-page words) write-protected again at once before they are sent, with manual
/// dirty-log protection: 2 MiB.
const CLEAR_WORDS: usize = 8;
/// Rounds whose page counts the report lists (it counts all).
const MAX_ROUNDS_REPORTED: usize = 1000;
/// The pause after a round that found nothing to send.
const IDLE_ROUND: Duration = Duration::from_millis(5);
/// Rounds that put fewer bytes on the wire than this do not count in the bandwidth measure.
const BULK_ROUND: u64 = 1 << 20;
/// How often the progress callback runs at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
const PAGE: u64 = crate::memory::PAGE_SIZE;
/// How much page data the destination reads before adding it to the frame's CRC.
const CRC_PIECE: usize = 128 << 10;

/// How a migration should go.
#[derive(Debug, Clone)]
pub struct Options {
    /// Switch over once the predicted downtime fits this.
    pub max_downtime: Duration,
    /// Give up (the guest stays here) if it has not switched over by then.
    pub timeout: Duration,
    /// Send at most this many bytes per second (None: as fast as the connection goes).
    pub max_bandwidth: Option<u64>,
    /// Most vCPU time throttling may take, percent (0: never throttle).
    pub max_throttle: u8,
    /// Prove this shared key to the destination, and have it prove it (migration::auth),
    /// inside TLS (self::tls).
    pub key: Option<Key>,
    /// TLS with certificates (--tls-dir), the destination's name checked.
    pub tls: Option<SourceTls>,
    /// Give up on a destination that sends or takes nothing for this long.
    pub peer_timeout: Duration,
    /// Postcopy: if precopy has not converged after this many rounds (0: at once, no
    /// precopy round), the destination runs the guest and fetches the rest on demand.
    pub postcopy_after: Option<u32>,
    /// Without a key or certificates, send the guest in plaintext even to a peer off this
    /// host (or a Unix socket of another user); refused by default.
    pub insecure: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_downtime: DEFAULT_MAX_DOWNTIME,
            timeout: DEFAULT_TIMEOUT,
            max_bandwidth: None,
            max_throttle: 99,
            key: None,
            tls: None,
            peer_timeout: PEER_TIMEOUT,
            postcopy_after: None,
            insecure: false,
        }
    }
}

/// Where a running migration is (for progress lines and `status`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub round: u32,
    /// Bytes on the wire so far.
    pub sent_bytes: u64,
    /// Guest bytes of this round not sent yet.
    pub remaining_bytes: u64,
    /// Measured rate, MB/s (10^6 bytes).
    pub rate_mbps: f64,
    pub predicted_downtime_ms: f64,
    pub throttle_pct: u8,
    pub elapsed_ms: f64,
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The destination has the guest.
    Completed,
    /// The guest runs here.
    #[default]
    Cancelled,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Completed => "completed",
            Outcome::Cancelled => "cancelled",
        })
    }
}

/// What a migration measured, finished or not.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub outcome: Outcome,
    /// Why it was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub total_ms: f64,
    /// From pausing the guest here to the destination's Restored (it resumes on Commit).
    pub downtime_ms: f64,
    /// Bytes on the wire, both directions' frames included.
    pub bytes: u64,
    pub rounds: u32,
    /// Pages sent in each round, the first 1000 rounds (the last is sent with the guest
    /// paused).
    pub pages_per_round: Vec<u64>,
    /// Zero pages not sent as data (skipped in round 0, a flag later).
    pub zero_pages: u64,
    /// Pages never touched (pagemap), skipped without being read.
    pub untouched_pages: u64,
    /// The highest throttle applied, percent of vCPU time.
    pub throttle_pct: u8,
    pub max_downtime_ms: f64,
    pub predicted_downtime_ms: f64,
    /// Measured while sending, MB/s.
    pub bandwidth_mbps: f64,
    /// Where the downtime went.
    pub downtime_phases: DowntimePhases,
    /// From the start to the destination's Accept (connecting, the CPU check and the new VM
    /// there), ms.
    pub handshake_ms: f64,
    /// How long each round took (the first 1000), ms.
    pub round_ms: Vec<f64>,
    /// Postcopy: pages named missing at the switch, pages sent on request (the same,
    /// once complete), requests answered, and ms from Running to PostcopyDone (absent from
    /// the JSON without postcopy).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub postcopy_missing: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub postcopy_pages: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub postcopy_requests: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub postcopy_ms: f64,
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The downtime, phase by phase (ms).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DowntimePhases {
    /// Until every vCPU was out of the guest.
    pub pause_ms: f64,
    /// The pages dirtied since the last round.
    pub last_round_ms: f64,
    /// Saving vCPU and device state.
    pub save_ms: f64,
    /// Writing it.
    pub send_state_ms: f64,
    /// Until the destination answered Restored (reading and loading the state there).
    pub destination_ms: f64,
}

/// The outgoing migration of a VM: one at a time, cancellable from another thread.
#[derive(Debug, Default)]
pub struct Control {
    active: AtomicBool,
    cancel: AtomicBool,
    progress: Mutex<Option<Progress>>,
}

/// Marks a migration active for its lifetime.
struct Active<'a>(&'a Control);

impl Control {
    fn begin(&self) -> Option<Active<'_>> {
        self.active
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()?;
        self.cancel.store(false, Ordering::SeqCst);
        Some(Active(self))
    }

    fn set_progress(&self, p: Option<Progress>) {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Asks the running outgoing migration to stop (the guest stays here); false if none runs.
    pub fn cancel(&self) -> bool {
        let active = self.active.load(Ordering::SeqCst);
        if active {
            self.cancel.store(true, Ordering::SeqCst);
        }
        active
    }

    /// The running outgoing migration's progress.
    /// Whether a migration is under way.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    pub fn progress(&self) -> Option<Progress> {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.set_progress(None);
        self.0.active.store(false, Ordering::SeqCst);
    }
}

fn proto(phase: Phase, what: &'static str) -> impl FnOnce(protocol::Error) -> Error {
    move |source| Error::Protocol {
        phase,
        what,
        source,
    }
}

fn io(phase: Phase, what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Protocol {
        phase,
        what,
        source: e.into(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `N` bytes from the kernel's random source (getrandom(2): no file to open, so a filtered
/// thread may ask).
fn random<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut n = [0u8; N];
    let mut filled = 0;
    while filled < N {
        let rest = &mut n[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which is valid
        // for writes of that many bytes for the call.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += got as usize;
    }
    Ok(n)
}

/// A handshake nonce.
fn nonce() -> Result<[u8; auth::NONCE_SIZE], Error> {
    random().map_err(Error::Random)
}

/// The source's side of migration::auth, its errors as the migration names them.
fn authenticate_to(conn: &mut (impl Read + Write), key: &Key) -> Result<(), Error> {
    use auth::Error as A;
    auth::source_handshake(conn, key, nonce()?).map_err(|e| match e {
        A::Protocol(source) => Error::Protocol {
            phase: Phase::Handshake,
            what: "authenticating",
            source,
        },
        A::Refused(r) => Error::Refused(r),
        A::BadProof => Error::Auth(AuthFailure::DestinationProof),
        other => Error::Auth(AuthFailure::Handshake(other)),
    })
}

/// The guest runs on the destination now: every thread of this process gives way to
/// everything else on the host (nice 19) before the VM's memory is released, so that
/// tearing down a source never competes for a CPU with the guest's first steps at a
/// destination on the same host. Best effort: a thread that cannot be reniced is left.
pub fn step_aside() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for tid in tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok())
    {
        // SAFETY: setpriority takes plain integers and changes only the nice value of
        // thread `tid` of this process (PRIO_PROCESS with a thread ID, on Linux).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) };
    }
}
