//! The source side: precopy rounds over the dirty log, switchover, Commit.

use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use migration::protocol::{self, Hello, Message};

use crate::vcpu::RunState;
use crate::vm::Vm;

use super::net::connect;
use super::*;

mod answers;
mod postcopy;
mod round;
use crate::memory::PageSet;
use round::{touched_map, Round};

/// What is left to send at the switchover, before the pages dirtied since.
enum Left {
    /// The pages dirtied during the last round sent.
    Dirtied(PageSet),
    /// Postcopy at once, no round sent: every page the guest has touched.
    AllTouched,
}

/// The pages written since the last harvest.
fn take_dirty(vm: &Vm) -> Result<PageSet, Error> {
    vm.ram().take_dirty().map_err(|source| Error::DirtyLog {
        what: "reading the dirty log",
        source,
    })
}

/// Source side: moves `vm` to the ferry listening at `addr`, one migration at a time per
/// `control` (which another thread may cancel it through). On success the VM is paused and
/// belongs to the destination (the caller ends it); on failure it runs here as before.
pub fn send(
    vm: &Vm,
    control: &Control,
    addr: &Address,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, Error> {
    let _active = control.begin().ok_or(Error::Busy)?;
    let plaintext = opts.key.is_none() && opts.tls.is_none();
    if plaintext && !opts.insecure {
        if let (false, Address::Tcp(hp)) = (super::net::is_local(addr)?, addr) {
            return Err(Error::Plaintext(format!("{hp}, an address off this host")));
        }
    }
    let sock = connect(addr, opts.peer_timeout, plaintext && !opts.insecure)?;
    if plaintext && opts.insecure {
        log::warn!("sending the guest unencrypted to {addr:?} (--insecure): anyone on the path can read and change its memory and state");
    }
    let conn = super::tls::to_destination(
        sock,
        opts.key.as_ref(),
        opts.tls.as_ref(),
        HANDSHAKE_TIMEOUT.min(opts.peer_timeout),
        opts.peer_timeout,
    )?;
    send_on(vm, control, conn, opts, progress)
}

/// [`send`] over a connected stream (a socket pair in tests).
pub fn send_over(
    vm: &Vm,
    control: &Control,
    conn: impl Read + Write + Send,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, Error> {
    let _active = control.begin().ok_or(Error::Busy)?;
    send_on(vm, control, conn, opts, progress)
}

fn send_on(
    vm: &Vm,
    control: &Control,
    mut conn: impl Read + Write + Send,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, Error> {
    let started = Instant::now();
    let touched = handshake(vm, &mut conn)?;
    // No other controller pauses, resumes or snapshots the VM meanwhile.
    let _lifecycle = vm.lifecycle();
    let was_paused = vm.state() == RunState::Paused;
    let throttle = AtomicU8::new(0);
    let (stop_throttle, throttle_stopped) = std::sync::mpsc::channel::<()>();
    let result = std::thread::scope(|scope| {
        let throttle = &throttle;
        std::thread::Builder::new()
            .name("mig-throttle".into())
            .spawn_scoped(scope, move || {
                crate::sandbox::enter_or_exit(crate::sandbox::Kind::Throttle);
                throttle_loop(vm, throttle, throttle_stopped)
            })
            .map_err(|source| {
                let e = Error::Thread {
                    what: "throttle",
                    source,
                };
                (e, Box::<Report>::default(), 0.0)
            })?;
        let mut s = Sender::new(vm, control, &mut conn, opts, started, throttle, progress);
        s.quiescent = was_paused;
        s.touched = touched;
        let r = s.run();
        drop(stop_throttle);
        let bandwidth_mbps = s.reported_bandwidth() / 1e6;
        r.map_err(|e| (e, Box::new(s.report), bandwidth_mbps))
    });
    result.map_err(|(e, report, bandwidth_mbps)| {
        let _ = vm.ram().set_dirty_tracking(false);
        if !was_paused && !answers::stays_paused(&e) {
            if let Err(r) = vm.resume() {
                log::error!("resuming the VM after a failed migration: {r}");
            }
        }
        let Error::Cancelled { why, .. } = e else {
            return e;
        };
        // Tell the destination, so that it ends at once and says why.
        let _ = protocol::send(&mut conn, &Message::Cancel(why.to_string()));
        let mut report = report;
        report.outcome = Outcome::Cancelled;
        report.total_ms = ms(started.elapsed());
        report.bandwidth_mbps = bandwidth_mbps;
        report.reason = Some(why.to_string());
        Error::Cancelled { why, report }
    })
}

/// Hello and the destination's Accept (authenticated already, if at all: super::tls);
/// returns the Touched map, read while the destination checks the Hello.
fn handshake(vm: &Vm, conn: &mut (impl Read + Write)) -> Result<Vec<u64>, Error> {
    let hello = Hello::new(
        vm.memory_size(),
        vm.num_vcpus(),
        vm.cpu_profile().to_json(),
        Some(vm.guest_cpu()),
    )
    .with_devices(vm.device_backends());
    protocol::send(conn, &Message::Hello(hello))
        .map_err(proto(Phase::Handshake, "sending Hello"))?;
    // While the destination checks the Hello: the map of RAM round 0 will fill.
    let touched = touched_map(vm);
    let answer =
        protocol::expect(conn, "Accept").map_err(proto(Phase::Handshake, "waiting for Accept"))?;
    answers::accepted(answer).map(|()| touched)
}

/// Keeps the vCPUs out of the guest for the throttle's share of each slice, until told to
/// stop (the channel closes).
fn throttle_loop(vm: &Vm, throttle: &AtomicU8, stopped: std::sync::mpsc::Receiver<()>) {
    loop {
        let pct = u32::from(throttle.load(Ordering::SeqCst).min(99));
        let sleep = THROTTLE_SLICE * pct / (100 - pct);
        if pct > 0 {
            vm.throttle_vcpus(sleep);
        }
        match stopped.recv_timeout(THROTTLE_SLICE + sleep) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// The source's side of one migration.
struct Sender<'a, C: Read + Write> {
    vm: &'a Vm,
    control: &'a Control,
    conn: &'a mut C,
    opts: Options,
    started: Instant,
    batch: migration::pages::BatchWriter,
    regions: Vec<(u64, u64)>,
    report: Report,
    round_started: Instant,
    round_bytes: u64,
    round_pages: u64,
    /// Bytes and time of the rounds that sent at least [`BULK_ROUND`]: the bandwidth measure.
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
    /// Nothing writes guest RAM until the migration ends: the guest was paused when it
    /// began (the lifecycle guard keeps it so), or is paused for the last round. Pages are
    /// then sent from where they lie, not copied into the frame first.
    quiescent: bool,
    /// The frame's pages taken in place: pieces (a region's bytes, start, end) of pages
    /// that lie next to each other.
    in_place: Vec<(&'a [u8], usize, usize)>,
    /// The Touched map, sent before round 0.
    touched: Vec<u64>,
    /// Postcopy: the destination runs the guest and asks for pages (no cancel any more).
    serving: bool,
}

impl<'a, C: Read + Write> Sender<'a, C> {
    fn new(
        vm: &'a Vm,
        control: &'a Control,
        conn: &'a mut C,
        opts: &Options,
        started: Instant,
        throttle: &'a AtomicU8,
        progress: &'a mut dyn FnMut(&Progress),
    ) -> Self {
        Sender {
            vm,
            control,
            conn,
            opts: opts.clone(),
            started,
            batch: migration::pages::BatchWriter::new(),
            regions: vm.ram().regions(),
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
            quiescent: false,
            in_place: Vec::new(),
            touched: Vec::new(),
            serving: false,
        }
    }

    fn run(&mut self) -> Result<Report, Error> {
        if self.opts.postcopy_after == Some(0) {
            return self.switchover(Left::AllTouched, true);
        }
        let (dirty, postcopy) = self.precopy()?;
        self.switchover(Left::Dirtied(dirty), postcopy)
    }

    /// The Touched map, dirty tracking on, then rounds until the policy says switch over
    /// (or, with postcopy, the rounds asked for have been sent); returns the pages dirtied
    /// during the last round sent, and whether to go on in postcopy.
    fn precopy(&mut self) -> Result<(PageSet, bool), Error> {
        let vm = self.vm;
        // First what round 0 will fill, so that the destination backs it meanwhile.
        let words = std::mem::take(&mut self.touched);
        self.report.bytes += protocol::send(self.conn, &Message::Touched(words))
            .map_err(proto(Phase::Memory { round: 0 }, "sending the touched RAM"))?;
        vm.ram()
            .set_dirty_tracking(true)
            .map_err(|source| Error::DirtyLog {
                what: "starting dirty tracking",
                source,
            })?;
        self.send_round(Round::Touched)?;
        let target = migration::converge::Target {
            max_downtime: self.opts.max_downtime,
            timeout: self.opts.timeout,
            max_throttle: self.opts.max_throttle,
        };
        let state_bytes = STATE_BYTES_FIXED + STATE_BYTES_PER_VCPU * u64::from(vm.num_vcpus());
        loop {
            let dirty = take_dirty(vm)?;
            let observed = migration::converge::Observed {
                elapsed: self.started.elapsed(),
                rounds: self.report.rounds,
                last_round_bytes: self.round_bytes,
                dirty_bytes: dirty.count() * PAGE,
                state_bytes,
                bandwidth: self.bandwidth(),
                throttle: self.throttle.load(Ordering::SeqCst),
            };
            let predicted = migration::converge::predicted_downtime(&observed);
            self.report.predicted_downtime_ms = ms(predicted);
            use migration::converge::Decision;
            let decision = migration::converge::decide(&target, &observed);
            let postcopy_due = self
                .opts
                .postcopy_after
                .is_some_and(|n| self.report.rounds >= n);
            if postcopy_due && decision != Decision::Switchover {
                return Ok((dirty, true));
            }
            match decision {
                Decision::Switchover => return Ok((dirty, false)),
                Decision::Cancel(stuck) => {
                    return Err(Error::Cancelled {
                        why: stuck.into(),
                        report: Box::default(),
                    })
                }
                Decision::Throttle(pct) => {
                    self.throttle.store(pct, Ordering::SeqCst);
                    self.report.throttle_pct = self.report.throttle_pct.max(pct);
                }
                Decision::Continue => {}
            }
            self.send_round(Round::Dirty(&dirty))?;
        }
    }

    /// Pause; what the guest dirtied since the last harvest joins `left`; those pages sent,
    /// or with `postcopy` named Missing; the state; then Restored, Commit and Running; with
    /// `postcopy`, the pages the destination asks for until it has them all.
    fn switchover(&mut self, left: Left, postcopy: bool) -> Result<Report, Error> {
        let vm = self.vm;
        self.throttle.store(0, Ordering::SeqCst);
        let paused_at = Instant::now();
        vm.pause().map_err(Error::Pause)?;
        self.paused = true;
        self.quiescent = true;
        let switched = serde_json::json!({ "postcopy": postcopy });
        crate::monitor::emit("vm", "migration-switched", Some(switched));
        let t_paused = Instant::now();
        let dirty = match left {
            Left::Dirtied(mut dirty) => {
                dirty.add(&take_dirty(vm)?);
                dirty
            }
            Left::AllTouched => vm.ram().touched_pages(),
        };
        if postcopy {
            self.report.postcopy_missing = self.send_missing(&dirty)?;
        } else {
            self.send_round(Round::Dirty(&dirty))?;
        }
        let t_last_round = Instant::now();
        let state = vm.save_state_with(false).map_err(Error::SaveState)?;
        let t_saved = Instant::now();
        self.report.bytes += protocol::send(self.conn, &Message::State)
            .map_err(proto(Phase::Switchover, "sending the VM state"))?;
        let mut w = BufWriter::new(&mut *self.conn);
        self.report.bytes += migration::stream::write_vm(&mut w, &state)
            .and_then(|n| w.flush().map(|()| n))
            .map_err(io(Phase::Switchover, "sending the VM state"))?;
        drop(w);
        let t_sent = Instant::now();
        let ms_between = |a: Instant, b: Instant| ms(b.saturating_duration_since(a));
        self.report.downtime_phases = DowntimePhases {
            pause_ms: ms_between(paused_at, t_paused),
            last_round_ms: ms_between(t_paused, t_last_round),
            save_ms: ms_between(t_last_round, t_saved),
            send_state_ms: ms_between(t_saved, t_sent),
            destination_ms: 0.0,
        };
        let mut r = self.finish(paused_at)?;
        r.downtime_phases.destination_ms = ms(t_sent.elapsed());
        if postcopy {
            let running = Instant::now();
            self.serve()?;
            r.postcopy_ms = ms(running.elapsed());
            r.postcopy_pages = self.report.postcopy_pages;
            r.postcopy_requests = self.report.postcopy_requests;
            r.bytes = self.report.bytes;
            r.total_ms = ms(self.started.elapsed());
        }
        Ok(r)
    }

    /// Reads the destination's answer, which must be `expected` (by name): its Failed, or
    /// any other message, fails the migration in `phase`.
    fn answer(
        &mut self,
        phase: Phase,
        expected: &'static str,
        what: &'static str,
    ) -> Result<(), Error> {
        let answer = protocol::expect(&mut *self.conn, expected).map_err(proto(phase, what))?;
        answers::answered(phase, expected, answer)
    }

    /// Waits for Restored, commits, waits for Running, and completes the report.
    fn finish(&mut self, paused_at: Instant) -> Result<Report, Error> {
        self.answer(Phase::Switchover, "Restored", "waiting for Restored")?;
        let downtime = paused_at.elapsed();
        // A Commit the socket did not take never reached the destination: the guest is
        // still only here, and the caller resumes it.
        protocol::send(self.conn, &Message::Commit)
            .map_err(proto(Phase::AwaitCommit, "sending Commit"))?;
        // From here the destination may be running the guest.
        answers::after_commit(protocol::recv(&mut *self.conn))?;
        let mut r = self.report.clone();
        r.outcome = Outcome::Completed;
        r.downtime_ms = ms(downtime);
        r.total_ms = ms(self.started.elapsed());
        r.bandwidth_mbps = self.reported_bandwidth() / 1e6;
        Ok(r)
    }
}
