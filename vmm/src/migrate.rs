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

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cpuid::profile::CpuProfile;
use cpuid::CpuidDump;
use migration::auth::{self, Key};
use migration::protocol::{self, Hello, Message, Precopy};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::vcpu::RunState;

use crate::vm::Vm;

/// How long either side waits, by default, for the peer to send or take anything.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a migration is, as its errors name it.
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
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Handshake => write!(f, "handshake"),
            Phase::Memory { round } => write!(f, "memory round {round}"),
            Phase::Switchover => write!(f, "after the pause, before Restored"),
            Phase::AwaitCommit => write!(f, "after Restored, before Commit"),
            Phase::AfterCommit => write!(f, "after Commit"),
        }
    }
}

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
    #[error("refused: {0}")]
    RefusedHere(String),
    #[error("restoring: {0}")]
    Restore(String),
    #[error("saving the VM: {0}")]
    Save(String),
    #[error("no Commit from the source (phase: after Restored, before Commit): {0}; the guest stays with the source")]
    NoCommit(String),
    #[error("no word from the destination after Commit (phase: after Commit): {0}; the guest stays paused here, as it may run there: if the destination does not run it, `ferry ctl resume` runs it here")]
    Unconfirmed(String),
    #[error("migration cancelled: {reason}; the VM runs here as before")]
    Cancelled { reason: String, report: Box<Report> },
    #[error("the source cancelled the migration: {0}")]
    CancelledBySource(String),
    #[error("a migration of this VM is already in progress")]
    Busy,
    #[error("authentication: {0}")]
    Auth(String),
    #[error("refusing to listen on {0} without --key-file: anyone who can reach it could hand this ferry a VM; use a Unix socket or a loopback address, or give a shared key")]
    Unauthenticated(String),
    #[error("the source sent pages at {gpa:#x} ({len} bytes) outside guest RAM")]
    PagesOutsideRam { gpa: u64, len: u64 },
}

/// A migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Address {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.split_once(':') {
            Some(("tcp", hp))
                if hp
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(Address::Tcp(hp.to_string()))
            }
            Some(("unix", p)) if !p.is_empty() => Ok(Address::Unix(PathBuf::from(p))),
            _ => Err(Error::Address(s.to_string())),
        }
    }
}

/// A connected peer: one stream, read and written.
trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

fn connect(addr: &Address, timeout: Duration) -> Result<Box<dyn Conn>, Error> {
    let err = |source| Error::Connect {
        what: "connecting to",
        addr: format!("{addr:?}"),
        source,
    };
    Ok(match addr {
        Address::Tcp(hp) => {
            let s = TcpStream::connect(hp).map_err(err)?;
            // Small protocol messages must not wait for Nagle.
            s.set_nodelay(true).map_err(err)?;
            s.set_read_timeout(Some(timeout)).map_err(err)?;
            s.set_write_timeout(Some(timeout)).map_err(err)?;
            Box::new(s)
        }
        Address::Unix(p) => {
            let s = UnixStream::connect(p).map_err(err)?;
            s.set_read_timeout(Some(timeout)).map_err(err)?;
            s.set_write_timeout(Some(timeout)).map_err(err)?;
            Box::new(s)
        }
    })
}

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
/// How often the progress callback runs at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
const PAGE: u64 = migration::pages::PAGE_SIZE as u64;
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
    /// Prove this shared key to the destination, and have it prove it (migration::auth).
    pub key: Option<Key>,
    /// Give up on a destination that sends or takes nothing for this long.
    pub peer_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_downtime: DEFAULT_MAX_DOWNTIME,
            timeout: DEFAULT_TIMEOUT,
            max_bandwidth: None,
            max_throttle: 99,
            key: None,
            peer_timeout: PEER_TIMEOUT,
        }
    }
}

/// Where a running migration is (for progress lines and `status`).
#[derive(Debug, Clone, Default, serde::Serialize)]
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

/// What a migration measured, finished or not.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// "completed" (the destination has the guest) or "cancelled" (the guest runs here).
    pub outcome: &'static str,
    /// Why it was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
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
}

/// The downtime, phase by phase (ms).
#[derive(Debug, Clone, Default, serde::Serialize)]
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
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.set_progress(None);
        self.0.active.store(false, Ordering::SeqCst);
    }
}

impl Vm {
    /// Asks the running outgoing migration to stop (the guest stays here); false if none runs.
    pub fn cancel_migration(&self) -> bool {
        let active = self.migration.active.load(Ordering::SeqCst);
        if active {
            self.migration.cancel.store(true, Ordering::SeqCst);
        }
        active
    }

    /// The running outgoing migration's progress.
    pub fn migration_progress(&self) -> Option<Progress> {
        self.migration
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

/// Source side: moves `vm` to the ferry listening at `addr`. On success the VM is paused and
/// belongs to the destination (the caller ends it); on failure it runs here as before.
pub fn send(
    vm: &Vm,
    addr: &Address,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, Error> {
    let _active = vm.migration.begin().ok_or(Error::Busy)?;
    let conn = connect(addr, opts.peer_timeout)?;
    send_on(vm, conn, opts, progress)
}

/// [`send`] over a connected stream (a socket pair in tests).
pub fn send_over(
    vm: &Vm,
    conn: impl Read + Write + Send,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, Error> {
    let _active = vm.migration.begin().ok_or(Error::Busy)?;
    send_on(vm, conn, opts, progress)
}

fn send_on(
    vm: &Vm,
    mut conn: impl Read + Write + Send,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, Error> {
    let started = Instant::now();
    if let Some(key) = &opts.key {
        authenticate_to(&mut conn, key)?;
    }
    let hello = Hello::new(vm.memory_size(), vm.num_vcpus(), vm.cpu_profile().to_json());
    protocol::send(&mut conn, &Message::Hello(hello))
        .map_err(proto(Phase::Handshake, "sending Hello"))?;
    match protocol::expect(&mut conn, "Accept")
        .map_err(proto(Phase::Handshake, "waiting for Accept"))?
    {
        Message::Accept => {}
        Message::Refuse(r) => return Err(Error::Refused(r)),
        other => return Err(Error::Refused(format!("unexpected {}", other.name()))),
    }
    // No other controller pauses, resumes or snapshots the VM meanwhile.
    let _lifecycle = vm.lifecycle();
    let was_paused = vm.state() == RunState::Paused;
    let throttle = AtomicU8::new(0);
    let (stop_throttle, throttle_stopped) = std::sync::mpsc::channel::<()>();
    let result = std::thread::scope(|scope| {
        let throttle = &throttle;
        std::thread::Builder::new()
            .name("mig-throttle".into())
            .spawn_scoped(scope, move || loop {
                let pct = u32::from(throttle.load(Ordering::SeqCst).min(99));
                let sleep = THROTTLE_SLICE * pct / (100 - pct);
                if pct > 0 {
                    vm.throttle_vcpus(sleep);
                }
                match throttle_stopped.recv_timeout(THROTTLE_SLICE + sleep) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            })
            .map_err(|e| {
                (
                    Error::Save(format!("starting the throttle thread: {e}")),
                    Box::<Report>::default(),
                    0.0,
                )
            })?;
        let mut s = Sender {
            vm,
            conn: &mut conn,
            opts: opts.clone(),
            started,
            batch: migration::pages::BatchWriter::new(),
            regions: vm.ram_regions(),
            report: Report {
                max_downtime_ms: ms(opts.max_downtime),
                handshake_ms: ms(started.elapsed()),
                ..Default::default()
            },
            round_started: started,
            round_bytes: 0,
            round_pages: 0,
            busy_bytes: 0,
            busy_time: Duration::ZERO,
            paced: Duration::ZERO,
            remaining: 0,
            throttle,
            last_progress: started,
            progress,
            paused: false,
        };
        let r = s.run();
        drop(stop_throttle);
        let bandwidth_mbps = s.bandwidth() / 1e6;
        r.map_err(|e| (e, Box::new(s.report), bandwidth_mbps))
    });
    match result {
        Ok(report) => Ok(report),
        Err((e, mut report, bandwidth_mbps)) => {
            let _ = vm.set_dirty_tracking(false);
            // After Commit without an answer the guest may run there: it stays paused here.
            if !was_paused && !matches!(e, Error::Unconfirmed(_)) {
                if let Err(r) = vm.resume() {
                    log::error!("resuming the VM after a failed migration: {r}");
                }
            }
            if let Error::Cancelled { reason, .. } = e {
                // Tell the destination, so that it ends at once and says why.
                let _ = protocol::send(&mut conn, &Message::Cancel(reason.clone()));
                report.outcome = "cancelled";
                report.total_ms = ms(started.elapsed());
                report.bandwidth_mbps = bandwidth_mbps;
                report.reason = Some(reason.clone());
                return Err(Error::Cancelled { reason, report });
            }
            Err(e)
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn count_pages(bits: &[Vec<u64>]) -> u64 {
    bits.iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// The source's side of one migration.
struct Sender<'a, C: Read + Write> {
    vm: &'a Vm,
    conn: &'a mut C,
    opts: Options,
    started: Instant,
    batch: migration::pages::BatchWriter,
    regions: Vec<(u64, u64)>,
    report: Report,
    round_started: Instant,
    round_bytes: u64,
    round_pages: u64,
    /// Bytes and time of the rounds that sent something: the bandwidth measure.
    busy_bytes: u64,
    busy_time: Duration,
    /// Time this round slept to keep to --max-bandwidth (not part of the bandwidth measure).
    paced: Duration,
    /// Guest bytes of this round not sent yet.
    remaining: u64,
    throttle: &'a AtomicU8,
    last_progress: Instant,
    progress: &'a mut dyn FnMut(&Progress),
    /// The guest is paused: the last round, no timeout any more.
    paused: bool,
}

impl<C: Read + Write> Sender<'_, C> {
    fn run(&mut self) -> Result<Report, Error> {
        let vm = self.vm;
        vm.set_dirty_tracking(true)
            .map_err(|e| Error::Save(format!("starting dirty tracking: {e}")))?;
        self.send_round(None)?;
        let target = migration::converge::Target {
            max_downtime: self.opts.max_downtime,
            timeout: self.opts.timeout,
            max_throttle: self.opts.max_throttle,
        };
        let state_bytes = STATE_BYTES_FIXED + STATE_BYTES_PER_VCPU * u64::from(vm.num_vcpus());
        let mut dirty;
        loop {
            dirty = vm
                .take_dirty()
                .map_err(|e| Error::Save(format!("reading the dirty log: {e}")))?;
            let observed = migration::converge::Observed {
                elapsed: self.started.elapsed(),
                rounds: self.report.rounds,
                last_round_bytes: self.round_bytes,
                dirty_bytes: count_pages(&dirty) * PAGE,
                state_bytes,
                bandwidth: self.bandwidth(),
                throttle: self.throttle.load(Ordering::SeqCst),
            };
            let predicted = migration::converge::predicted_downtime(&observed);
            self.report.predicted_downtime_ms = ms(predicted);
            use migration::converge::Decision;
            match migration::converge::decide(&target, &observed) {
                Decision::Switchover => break,
                Decision::Cancel(reason) => {
                    return Err(Error::Cancelled {
                        reason,
                        report: Box::default(),
                    })
                }
                Decision::Throttle(pct) => {
                    self.throttle.store(pct, Ordering::SeqCst);
                    self.report.throttle_pct = self.report.throttle_pct.max(pct);
                }
                Decision::Continue => {}
            }
            self.send_round(Some(&dirty))?;
        }
        // Switchover: what the guest dirtied since the last harvest joins the last round.
        self.throttle.store(0, Ordering::SeqCst);
        let paused_at = Instant::now();
        vm.pause().map_err(|e| Error::Save(e.to_string()))?;
        self.paused = true;
        let t_paused = Instant::now();
        let more = vm
            .take_dirty()
            .map_err(|e| Error::Save(format!("reading the dirty log: {e}")))?;
        for (a, b) in dirty.iter_mut().zip(more) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= y;
            }
        }
        self.send_round(Some(&dirty))?;
        let t_last_round = Instant::now();
        let state = vm
            .save_state_with(false)
            .map_err(|e| Error::Save(e.to_string()))?;
        let t_saved = Instant::now();
        protocol::send(self.conn, &Message::State)
            .map_err(proto(Phase::Switchover, "sending the VM state"))?;
        let mut w = BufWriter::new(&mut *self.conn);
        self.report.bytes += migration::stream::write_vm(&mut w, &state)
            .and_then(|n| w.flush().map(|()| n))
            .map_err(io(Phase::Switchover, "sending the VM state"))?;
        drop(w);
        self.report.bytes += 8;
        let t_sent = Instant::now();
        let ms_between = |a: Instant, b: Instant| ms(b.saturating_duration_since(a));
        self.report.downtime_phases = DowntimePhases {
            pause_ms: ms_between(paused_at, t_paused),
            last_round_ms: ms_between(t_paused, t_last_round),
            save_ms: ms_between(t_last_round, t_saved),
            send_state_ms: ms_between(t_saved, t_sent),
            destination_ms: 0.0,
        };
        let r = self.finish(paused_at);
        r.map(|mut r| {
            r.downtime_phases.destination_ms = ms(t_sent.elapsed());
            r
        })
    }

    /// Waits for Restored, commits, waits for Running, and completes the report.
    fn finish(&mut self, paused_at: Instant) -> Result<Report, Error> {
        let phase = Phase::Switchover;
        match protocol::expect(&mut *self.conn, "Restored")
            .map_err(proto(phase, "waiting for Restored"))?
        {
            Message::Restored => {}
            Message::Failed(reason) => return Err(Error::DestinationFailed { phase, reason }),
            other => {
                return Err(Error::DestinationFailed {
                    phase,
                    reason: format!("unexpected {}", other.name()),
                })
            }
        }
        let downtime = paused_at.elapsed();
        // A Commit the socket did not take never reached the destination: the guest is
        // still only here, and the caller resumes it.
        protocol::send(self.conn, &Message::Commit)
            .map_err(proto(Phase::AwaitCommit, "sending Commit"))?;
        // From here the destination may be running the guest.
        match protocol::recv(&mut *self.conn) {
            Ok(Message::Running) => {}
            Ok(Message::Failed(reason)) => {
                // It says it does not run the guest: resuming it here is safe.
                return Err(Error::DestinationFailed {
                    phase: Phase::AfterCommit,
                    reason,
                });
            }
            Ok(other) => {
                return Err(Error::Unconfirmed(format!(
                    "expected Running, got {}",
                    other.name()
                )))
            }
            Err(e) => return Err(Error::Unconfirmed(e.to_string())),
        }
        let mut r = self.report.clone();
        r.outcome = "completed";
        r.downtime_ms = ms(downtime);
        r.total_ms = ms(self.started.elapsed());
        r.bandwidth_mbps = self.bandwidth() / 1e6;
        Ok(r)
    }

    /// Sends one round: with `bits`, the pages set there (a dirty page now zero goes as a
    /// ZERO run); without, round 0: every page ever touched (pagemap, looked up chunk by
    /// chunk just after the chunk is write-protected, so that a page first touched later is
    /// logged), zero pages dropped (the destination's fresh RAM is zero).
    fn send_round(&mut self, bits: Option<&[Vec<u64>]>) -> Result<(), Error> {
        let vm = self.vm;
        self.round_started = Instant::now();
        self.round_bytes = 0;
        self.round_pages = 0;
        self.paced = Duration::ZERO;
        let round0 = bits.is_none();
        let total: u64 = self.regions.iter().map(|(_, len)| len / PAGE).sum();
        self.remaining = match bits {
            Some(b) => count_pages(b) * PAGE,
            None => total * PAGE,
        };
        self.batch.set_round(self.report.rounds);
        let regions = self.regions.clone();
        let manual = vm.manual_dirty_protect() && !self.paused;
        // Round 0 only: later rounds take their pages from the dirty log.
        let pagemap = round0.then(crate::memory::Pagemap::open);
        const ALL: [u64; CLEAR_WORDS] = [u64::MAX; CLEAR_WORDS];
        for (region, &(start, len)) in regions.iter().enumerate() {
            let words = (len / PAGE).div_ceil(64) as usize;
            for chunk in (0..words).step_by(CLEAR_WORDS) {
                let end = (chunk + CLEAR_WORDS).min(words);
                if manual {
                    // Write-protect this chunk again just before reading it: a write from
                    // now on is logged and sent in a later round. Round 0 clears every
                    // page (the log starts all set), later rounds the ones found dirty.
                    let mask = match bits {
                        Some(b) => &b[region][chunk..end],
                        None => &ALL[..end - chunk],
                    };
                    if mask.iter().any(|m| *m != 0) {
                        vm.clear_dirty(region, chunk as u64 * 64, mask)
                            .map_err(|e| Error::Save(format!("clearing the dirty log: {e}")))?;
                    }
                }
                let touched;
                let chunk_bits = match bits {
                    Some(b) => &b[region][chunk..end],
                    None => {
                        let pagemap = pagemap.as_ref().expect("opened for round 0");
                        touched = vm.touched_range(pagemap, region, chunk as u64 * 64, end - chunk);
                        let n = count_pages(std::slice::from_ref(&touched));
                        let chunk_pages =
                            ((end - chunk) as u64 * 64).min(len / PAGE - chunk as u64 * 64);
                        self.report.untouched_pages += chunk_pages - n;
                        self.remaining = self.remaining.saturating_sub((chunk_pages - n) * PAGE);
                        &touched[..]
                    }
                };
                for (i, word) in chunk_bits.iter().enumerate() {
                    let w = chunk + i;
                    let mut word = *word;
                    while word != 0 {
                        let bit = u64::from(word.trailing_zeros());
                        word &= word - 1;
                        let offset = (w as u64 * 64 + bit) * PAGE;
                        if offset >= len {
                            break;
                        }
                        let gpa = start + offset;
                        vm.memory()
                            .read_slice(self.batch.page_slot(), GuestAddress(gpa))
                            .map_err(|e| {
                                Error::Save(format!("reading guest page {gpa:#x}: {e}"))
                            })?;
                        let zero = self.batch.commit_page(gpa, round0);
                        if zero {
                            self.report.zero_pages += 1;
                        }
                        if !(zero && round0) {
                            self.round_pages += 1;
                        }
                        self.remaining = self.remaining.saturating_sub(PAGE);
                        if self.batch.is_full() {
                            self.flush()?;
                        }
                    }
                }
            }
        }
        self.flush()?;
        if !self.paused {
            // The destination has every page of the round in RAM before the next decision:
            // the bandwidth is end to end, and no backlog there lands in the downtime.
            let phase = self.phase();
            protocol::send(self.conn, &Message::Sync).map_err(proto(phase, "sending memory"))?;
            match protocol::recv(self.conn).map_err(proto(phase, "waiting for Synced"))? {
                Message::Synced => {}
                Message::Failed(reason) => return Err(Error::DestinationFailed { phase, reason }),
                other => {
                    return Err(Error::DestinationFailed {
                        phase,
                        reason: format!("expected Synced, got {}", other.name()),
                    })
                }
            }
            self.round_bytes += 16;
            self.report.bytes += 16;
        }
        if self.round_bytes > 0 {
            self.busy_bytes += self.round_bytes;
            self.busy_time += self.round_started.elapsed().saturating_sub(self.paced);
        }
        if self.report.pages_per_round.len() < MAX_ROUNDS_REPORTED {
            self.report.pages_per_round.push(self.round_pages);
            self.report.round_ms.push(ms(self.round_started.elapsed()));
        }
        self.report.rounds += 1;
        if self.round_pages == 0 && !self.paused {
            // Nothing was dirty: give the guest a moment rather than spin on the log.
            std::thread::sleep(IDLE_ROUND);
        }
        Ok(())
    }

    /// Writes the frame being built (if any), paces to the bandwidth limit, reports
    /// progress, and stops for a cancel or the timeout.
    fn flush(&mut self) -> Result<(), Error> {
        if !self.batch.is_empty() {
            let phase = self.phase();
            let frame = self.batch.finish();
            frame
                .write_to(&mut *self.conn)
                .map_err(io(phase, "sending memory"))?;
            let n = frame.len() as u64;
            self.report.bytes += n;
            self.round_bytes += n;
        }
        self.batch.reset();
        // Pace while the guest runs; once it is paused, every millisecond is downtime.
        if let Some(bw) = self.opts.max_bandwidth.filter(|b| *b > 0 && !self.paused) {
            let due =
                self.round_started + Duration::from_secs_f64(self.round_bytes as f64 / bw as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
                self.paced += due - now;
            }
        }
        if self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            let p = Progress {
                round: self.report.rounds,
                sent_bytes: self.report.bytes,
                remaining_bytes: self.remaining,
                rate_mbps: self.bandwidth() / 1e6,
                predicted_downtime_ms: self.report.predicted_downtime_ms,
                throttle_pct: self.throttle.load(Ordering::SeqCst),
                elapsed_ms: ms(self.started.elapsed()),
            };
            (self.progress)(&p);
            self.vm.migration.set_progress(Some(p));
        }
        if self.vm.migration.cancel.load(Ordering::SeqCst) {
            return Err(Error::Cancelled {
                reason: format!(
                    "cancelled by request in round {} after {} bytes",
                    self.report.rounds, self.report.bytes
                ),
                report: Box::default(),
            });
        }
        if !self.paused && self.started.elapsed() >= self.opts.timeout {
            return Err(Error::Cancelled {
                reason: format!(
                    "timed out after {:.1} s in round {}",
                    self.started.elapsed().as_secs_f64(),
                    self.report.rounds
                ),
                report: Box::default(),
            });
        }
        Ok(())
    }

    /// The phase the source is in.
    fn phase(&self) -> Phase {
        if self.paused {
            Phase::Switchover
        } else {
            Phase::Memory {
                round: self.report.rounds,
            }
        }
    }

    /// Bytes per second on the wire while sending: the rounds that sent something, and the
    /// current one (rounds that found nothing dirty do not dilute it).
    fn bandwidth(&self) -> f64 {
        let bytes = self.busy_bytes + self.round_bytes;
        let mut t = self.busy_time;
        if self.round_bytes > 0 {
            t += self.round_started.elapsed().saturating_sub(self.paced);
        }
        if bytes == 0 || t.is_zero() {
            0.0
        } else {
            bytes as f64 / t.as_secs_f64()
        }
    }
}

/// How the destination takes a VM.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Check the CPU profile against this recorded host instead of this one.
    pub host: Option<CpuidDump>,
    /// Take only a source that proves this key (and prove it to the source).
    pub key: Option<Key>,
    /// Give up on a source that sends or takes nothing for this long.
    pub peer_timeout: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            host: None,
            key: None,
            peer_timeout: PEER_TIMEOUT,
        }
    }
}

/// Destination side: waits at `addr` for one VM, checks its CPU profile against this host
/// (or a recorded one) before any memory is sent, receives its memory and state, and once
/// the source has committed, calls `start` (which runs the guest) and confirms Running to
/// the source, or Failed with `start`'s error (the source then resumes it).
/// With a key, only a source that proves it is taken (and this side proves it too);
/// without one, only a Unix socket or a loopback address may be listened on.
pub fn receive(
    addr: &Address,
    opts: &ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), String>,
) -> Result<Vm, Error> {
    if opts.key.is_none() {
        check_local(addr)?;
    }
    receive_from(Listener::bind(addr)?, opts, console, start)
}

/// [`receive`] on a listener bound already.
pub fn receive_from(
    listener: Listener,
    opts: &ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), String>,
) -> Result<Vm, Error> {
    let conn = listener.accept(opts.peer_timeout)?;
    receive_with(conn, opts, console, start)
}

/// [`receive`] over a connected stream, without a key; the VM comes back paused (the
/// source is told Running: the caller starts it).
pub fn receive_over(
    conn: impl Read + Write,
    host: Option<&CpuidDump>,
    console: Box<dyn std::io::Write + Send>,
) -> Result<Vm, Error> {
    let opts = ReceiveOptions {
        host: host.cloned(),
        ..Default::default()
    };
    receive_with(conn, &opts, console, |_| Ok(()))
}

/// Refuses an address other hosts can reach: without a key anyone who can connect could
/// hand this ferry a VM to run.
pub fn check_local(addr: &Address) -> Result<(), Error> {
    let Address::Tcp(hp) = addr else {
        return Ok(());
    };
    use std::net::ToSocketAddrs;
    let addrs: Vec<std::net::SocketAddr> = hp
        .to_socket_addrs()
        .map_err(|e| Error::Connect {
            what: "resolving",
            addr: hp.clone(),
            source: e,
        })?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(Error::Unauthenticated(hp.clone()));
    }
    Ok(())
}

/// 32 bytes from the kernel's random source.
fn nonce() -> Result<[u8; auth::NONCE_SIZE], Error> {
    let mut n = [0u8; auth::NONCE_SIZE];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(|e| Error::Auth(format!("reading /dev/urandom: {e}")))?;
    Ok(n)
}

/// The source's side of migration::auth: challenge, check the destination's proof, prove.
fn authenticate_to(conn: &mut (impl Read + Write), key: &Key) -> Result<(), Error> {
    let ns = nonce()?;
    let auth = || proto(Phase::Handshake, "authenticating");
    protocol::send(conn, &Message::AuthChallenge(ns)).map_err(auth())?;
    let nd = match protocol::recv(conn).map_err(auth())? {
        Message::AuthResponse(nd, proof) => {
            key.check_destination(&ns, &nd, &proof).map_err(|_| {
                Error::Auth("the destination could not prove the shared key".into())
            })?;
            nd
        }
        Message::Refuse(r) => return Err(Error::Refused(r)),
        other => {
            return Err(Error::Auth(format!(
                "expected the destination's proof, got {}",
                other.name()
            )))
        }
    };
    protocol::send(conn, &Message::AuthProof(key.source_proof(&nd, &ns))).map_err(auth())
}

/// [`receive`] over a connected stream (its timeouts set by the caller).
pub fn receive_with(
    mut conn: impl Read + Write,
    opts: &ReceiveOptions,
    console: Box<dyn std::io::Write + Send>,
    start: impl FnOnce(&Vm) -> Result<(), String>,
) -> Result<Vm, Error> {
    let (host, key) = (opts.host.as_ref(), opts.key.as_ref());
    let refuse = |mut conn: &mut dyn Write, reason: String| {
        let _ = protocol::send(&mut conn, &Message::Refuse(reason.clone()));
        Error::RefusedHere(reason)
    };
    let hs = |what| proto(Phase::Handshake, what);
    let mut first = protocol::recv(&mut conn).map_err(hs("waiting for Hello"))?;
    match (key, &first) {
        (Some(key), Message::AuthChallenge(ns)) => {
            let ns = *ns;
            let nd = nonce()?;
            let proof = key.destination_proof(&ns, &nd);
            protocol::send(&mut conn, &Message::AuthResponse(nd, proof))
                .map_err(hs("authenticating"))?;
            match protocol::recv(&mut conn).map_err(hs("authenticating"))? {
                Message::AuthProof(p) if key.check_source(&nd, &ns, &p).is_ok() => {}
                _ => {
                    return Err(refuse(
                        &mut conn,
                        "the source could not prove the shared key".into(),
                    ))
                }
            }
            first = protocol::recv(&mut conn).map_err(hs("waiting for Hello"))?;
        }
        (Some(_), other) => {
            let reason = format!(
                "this destination takes only a source that proves the shared key (--key-file); it sent {} first",
                other.name()
            );
            return Err(refuse(&mut conn, reason));
        }
        (None, Message::AuthChallenge(_)) => {
            let reason = "this destination has no key (--key-file): it takes unauthenticated migrations only".to_string();
            return Err(refuse(&mut conn, reason));
        }
        (None, _) => {}
    }
    let hello = match first {
        Message::Hello(h) => h,
        other => {
            return Err(Error::RefusedHere(format!(
                "expected Hello, got {}",
                other.name()
            )))
        }
    };
    if let Err(reason) = acceptable(&hello, host) {
        return Err(refuse(&mut conn, reason));
    }
    // RAM first (an mmap: at once); the rest of the machine (KVM, memslots, vCPUs, CPUID)
    // is built on another thread while round 0's pages arrive into that RAM.
    let ram = crate::memory::GuestRam::new(hello.memory)
        .map_err(|e| refuse(&mut conn, format!("cannot create the VM here: {e}")))?;
    let mem = ram.memory().clone();
    let (vcpus, profile_json) = (hello.vcpus, hello.cpu_profile.clone());
    let mut building = Some(
        std::thread::Builder::new()
            .name("mig-build".into())
            .spawn(move || Vm::for_restore_with_ram(ram, vcpus, &profile_json, console))
            .map_err(|e| refuse(&mut conn, format!("cannot create the VM here: {e}")))?,
    );
    let mut built: Option<Vm> = None;
    protocol::send(&mut conn, &Message::Accept).map_err(hs("sending Accept"))?;
    let regions: Vec<(u64, u64)> = {
        use vm_memory::GuestMemoryRegion;
        mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
    };
    // The machine is needed by the first Sync (the end of round 0) at the latest.
    let mut finish_building = |conn: &mut dyn Write| -> Result<(), Error> {
        if let Some(b) = building.take() {
            let vm = b
                .join()
                .map_err(|_| Error::Restore("building the VM panicked".into()))
                .and_then(|r| r.map_err(|e| Error::Restore(format!("creating the VM: {e}"))));
            match vm {
                Ok(vm) => built = Some(vm),
                Err(e) => {
                    let mut conn = conn;
                    let _ = protocol::send(&mut conn, &Message::Failed(e.to_string()));
                    return Err(e);
                }
            }
        }
        Ok(())
    };
    // The round of the last page frame: the phase errors name.
    let mut round = 0;
    loop {
        let phase = Phase::Memory { round };
        match protocol::recv_precopy(&mut conn).map_err(proto(phase, "receiving memory"))? {
            Precopy::Pages(head) => {
                round = head.round;
                receive_pages(&mem, &regions, head, &mut conn, Phase::Memory { round })?
            }
            Precopy::Cancel(reason) => return Err(Error::CancelledBySource(reason)),
            Precopy::Sync => {
                finish_building(&mut conn)?;
                protocol::send(&mut conn, &Message::Synced)
                    .map_err(proto(phase, "sending Synced"))?
            }
            Precopy::State => {
                finish_building(&mut conn)?;
                break;
            }
        }
    }
    let Some(mut vm) = built else {
        return Err(Error::Restore("the VM was not built".into()));
    };
    let state =
        migration::stream::read_vm_until_end(&mut BufReader::new(&mut conn)).map_err(|e| {
            use migration::stream::Error as S;
            let e = match e {
                S::Io { source, .. } => source,
                S::Truncated { .. } => std::io::ErrorKind::UnexpectedEof.into(),
                other => std::io::Error::other(other.to_string()),
            };
            io(Phase::Switchover, "receiving the VM state")(e)
        })?;
    let got_state = Instant::now();
    let loaded = if state.cpu_profile != hello.cpu_profile
        || state.config.memory != hello.memory
        || state.config.vcpus != hello.vcpus
    {
        Err("the VM state does not match the Hello (memory, vCPUs or CPU profile)".to_string())
    } else {
        vm.load_state(&state).map_err(|e| e.to_string())
    };
    if let Err(e) = loaded {
        let _ = protocol::send(&mut conn, &Message::Failed(e.clone()));
        return Err(Error::Restore(e));
    }
    protocol::send(&mut conn, &Message::Restored)
        .map_err(proto(Phase::Switchover, "sending Restored"))?;
    log::debug!("receive: state loaded in {:?}", got_state.elapsed());
    match protocol::recv(&mut conn) {
        Ok(Message::Commit) => {}
        Ok(other) => return Err(Error::NoCommit(format!("got {}", other.name()))),
        Err(e) => return Err(Error::NoCommit(e.to_string())),
    }
    // The guest is this side's now.
    match start(&vm) {
        Ok(()) => {
            if let Err(e) = protocol::send(&mut conn, &Message::Running) {
                // The source keeps its copy paused and says the guest may run here.
                log::warn!(
                    "confirming Running to the source (phase: {}): {e}",
                    Phase::AfterCommit
                );
            }
            Ok(vm)
        }
        Err(e) => {
            // Not running here: the source resumes its copy.
            let _ = protocol::send(&mut conn, &Message::Failed(e.clone()));
            Err(Error::Restore(format!(
                "starting the guest (phase: {}): {e}; the source keeps it",
                Phase::AfterCommit
            )))
        }
    }
}

/// Receives a page frame whose head has been read: checks that every run lies inside one
/// RAM region before reading any page, reads the pages straight into guest RAM, checks the
/// CRC, then zeroes the ZERO runs. The destination's vCPUs have not run yet.
fn receive_pages(
    mem: &crate::memory::GuestMemoryMmap,
    regions: &[(u64, u64)],
    mut head: migration::pages::FrameHead,
    conn: &mut impl Read,
    phase: Phase,
) -> Result<(), Error> {
    for run in &head.runs {
        let inside = regions
            .iter()
            .any(|&(start, len)| run.gpa >= start && run.gpa + run.len() <= start + len);
        if !inside {
            return Err(Error::PagesOutsideRam {
                gpa: run.gpa,
                len: run.len(),
            });
        }
    }
    let runs = std::mem::take(&mut head.runs);
    for run in runs.iter().filter(|r| !r.zero) {
        let len = run.len() as usize;
        let host =
            mem.get_host_address(GuestAddress(run.gpa))
                .map_err(|_| Error::PagesOutsideRam {
                    gpa: run.gpa,
                    len: run.len(),
                })?;
        // SAFETY: the run lies inside one RAM region (checked above), so [host, host + len)
        // is within that region's mapping, which `mem` keeps alive for longer than this
        // borrow. No vCPU of this VM has run yet and nothing else in ferry holds a reference
        // into this memory (the thread building the VM only registers it with KVM), so the
        // mutable slice is the only access while it lives.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host, len) };
        // In pieces that stay in cache between the copy from the socket and the CRC.
        for piece in bytes.chunks_mut(CRC_PIECE) {
            conn.read_exact(piece)
                .map_err(io(phase, "receiving memory"))?;
            head.crc_update(piece);
        }
    }
    head.check_crc(conn)
        .map_err(|e| proto(phase, "receiving memory")(e.into()))?;
    static ZEROS: [u8; migration::pages::PAGE_SIZE] = [0; migration::pages::PAGE_SIZE];
    for run in runs.iter().filter(|r| r.zero) {
        (0..u64::from(run.pages))
            .try_for_each(|i| mem.write_slice(&ZEROS, GuestAddress(run.gpa + i * PAGE)))
            .map_err(|_| Error::PagesOutsideRam {
                gpa: run.gpa,
                len: run.len(),
            })?;
    }
    Ok(())
}

/// Whether this host can take the VM a Hello describes; the reason if not.
fn acceptable(h: &Hello, host: Option<&CpuidDump>) -> Result<(), String> {
    if h.format_version != migration::stream::FORMAT_VERSION {
        return Err(format!(
            "stream format version {}, this ferry reads version {}",
            h.format_version,
            migration::stream::FORMAT_VERSION
        ));
    }
    // The machine's size, checked here so that a Hello this host cannot build is refused
    // before Accept (the machine is built while pages arrive).
    let kvm = crate::vm::open_kvm().map_err(|e| e.to_string())?;
    crate::config::validate_memory(h.memory)
        .and_then(|()| crate::config::validate_vcpus(h.vcpus, crate::vm::max_vcpus(&kvm)))
        .map_err(|e| format!("cannot create the VM here: {e}"))?;
    let profile = CpuProfile::from_json("the source's CPU profile", &h.cpu_profile)
        .map_err(|e| e.to_string())?;
    let live;
    let host = match host {
        Some(h) => h,
        None => {
            live = crate::cpu_model::host_dump(&kvm).map_err(|e| e.to_string())?;
            &live
        }
    };
    if !profile.migratable && host.vendor() != Some(profile.identity.vendor) {
        return Err(format!(
            "CPU profile {} describes one host and is not migratable to a host of another vendor",
            profile.name
        ));
    }
    cpuid::profile::check(&profile, host)
        .map_err(|m| format!("this host cannot run CPU profile {}: {m}", profile.name))
}

/// A bound migration listener: the destination says it is waiting only once this exists,
/// so a source that connects then always finds it.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener, String),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr` (replacing only a stale Unix socket, never another kind of file).
    pub fn bind(addr: &Address) -> Result<Listener, Error> {
        let err = |source| Error::Connect {
            what: "listening on",
            addr: format!("{addr:?}"),
            source,
        };
        Ok(match addr {
            Address::Tcp(hp) => Listener::Tcp(TcpListener::bind(hp).map_err(err)?, hp.clone()),
            Address::Unix(p) => {
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(p);
                }
                Listener::Unix(UnixListener::bind(p).map_err(err)?, p.clone())
            }
        })
    }

    /// Waits for one peer; reads and writes on the connection give up after `timeout`.
    fn accept(self, timeout: Duration) -> Result<Box<dyn Conn>, Error> {
        let err = |addr: String, source| Error::Connect {
            what: "accepting on",
            addr,
            source,
        };
        Ok(match self {
            Listener::Tcp(l, hp) => {
                let (s, _) = l.accept().map_err(|e| err(hp.clone(), e))?;
                s.set_nodelay(true).map_err(|e| err(hp.clone(), e))?;
                s.set_read_timeout(Some(timeout))
                    .and_then(|()| s.set_write_timeout(Some(timeout)))
                    .map_err(|e| err(hp.clone(), e))?;
                Box::new(s)
            }
            Listener::Unix(l, p) => {
                let shown = p.display().to_string();
                let (s, _) = l.accept().map_err(|e| err(shown.clone(), e))?;
                let _ = std::fs::remove_file(&p);
                s.set_read_timeout(Some(timeout))
                    .and_then(|()| s.set_write_timeout(Some(timeout)))
                    .map_err(|e| err(shown, e))?;
                Box::new(s)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Address>().unwrap(),
            Address::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "unix:/tmp/m.sock".parse::<Address>().unwrap(),
            Address::Unix("/tmp/m.sock".into())
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "udp:h:1",
            "unix:",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }
}
