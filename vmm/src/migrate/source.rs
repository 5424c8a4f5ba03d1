//! The source side: precopy rounds over the dirty log, switchover, Commit.

use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use migration::protocol::{self, Hello, Message};
use vm_memory::{Bytes, GuestAddress};

use crate::vcpu::RunState;
use crate::vm::Vm;

use super::net::connect;
use super::*;

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
    let conn = connect(addr, opts.peer_timeout)?;
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
    if let Some(key) = &opts.key {
        authenticate_to(&mut conn, key)?;
    }
    let hello = Hello::new(
        vm.memory_size(),
        vm.num_vcpus(),
        vm.cpu_profile().to_json(),
        Some(vm.guest_cpu()),
    );
    protocol::send(&mut conn, &Message::Hello(hello))
        .map_err(proto(Phase::Handshake, "sending Hello"))?;
    // While the destination checks the Hello: the map of RAM round 0 will fill.
    let touched = touched_map(vm);
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
            control,
            conn: &mut conn,
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
            quiescent: was_paused,
            in_place: Vec::new(),
            touched,
        };
        let r = s.run();
        drop(stop_throttle);
        let bandwidth_mbps = s.reported_bandwidth() / 1e6;
        r.map_err(|e| (e, Box::new(s.report), bandwidth_mbps))
    });
    match result {
        Ok(report) => Ok(report),
        Err((e, mut report, bandwidth_mbps)) => {
            let _ = vm.ram().set_dirty_tracking(false);
            // After Commit without an answer the guest may run there: it stays paused here.
            if !was_paused && !matches!(e, Error::Unconfirmed(_)) {
                if let Err(r) = vm.resume() {
                    log::error!("resuming the VM after a failed migration: {r}");
                }
            }
            if let Error::Cancelled { reason, .. } = e {
                // Tell the destination, so that it ends at once and says why.
                let _ = protocol::send(&mut conn, &Message::Cancel(reason.clone()));
                report.outcome = Outcome::Cancelled;
                report.total_ms = ms(started.elapsed());
                report.bandwidth_mbps = bandwidth_mbps;
                report.reason = Some(reason.clone());
                return Err(Error::Cancelled { reason, report });
            }
            Err(e)
        }
    }
}

/// The Touched map: each block of guest-physical memory (protocol::TOUCHED_BLOCK) that
/// holds a page the guest has touched, from address 0 to the end of RAM.
fn touched_map(vm: &Vm) -> Vec<u64> {
    let end = vm.ram().regions().iter().map(|&(s, l)| s + l).max();
    let mut words = vec![0u64; protocol::touched_words(end.unwrap_or(0))];
    for block in vm
        .ram()
        .resident_blocks(protocol::TOUCHED_BLOCK)
        .into_iter()
        .map(|gpa| gpa / protocol::TOUCHED_BLOCK)
    {
        words[(block / 64) as usize] |= 1 << (block % 64);
    }
    words
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
}

impl<'a, C: Read + Write> Sender<'a, C> {
    fn run(&mut self) -> Result<Report, Error> {
        let vm = self.vm;
        // First what round 0 will fill, so that the destination backs it meanwhile.
        let words = std::mem::take(&mut self.touched);
        self.report.bytes += protocol::send(self.conn, &Message::Touched(words))
            .map_err(proto(Phase::Memory { round: 0 }, "sending the touched RAM"))?;
        vm.ram()
            .set_dirty_tracking(true)
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
                .ram()
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
        self.quiescent = true;
        let t_paused = Instant::now();
        let more = vm
            .ram()
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
        let r = self.finish(paused_at);
        r.map(|mut r| {
            r.downtime_phases.destination_ms = ms(t_sent.elapsed());
            r
        })
    }

    /// Reads the destination's answer, which must be `expected` (by name): its Failed, or
    /// any other message, fails the migration in `phase`.
    fn answer(
        &mut self,
        phase: Phase,
        expected: &'static str,
        what: &'static str,
    ) -> Result<(), Error> {
        match protocol::expect(&mut *self.conn, expected).map_err(proto(phase, what))? {
            Message::Failed(reason) => Err(Error::DestinationFailed { phase, reason }),
            m if m.name() == expected => Ok(()),
            other => Err(Error::DestinationFailed {
                phase,
                reason: format!("expected {expected}, got {}", other.name()),
            }),
        }
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
        r.outcome = Outcome::Completed;
        r.downtime_ms = ms(downtime);
        r.total_ms = ms(self.started.elapsed());
        r.bandwidth_mbps = self.reported_bandwidth() / 1e6;
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
        let manual = vm.ram().manual_protect() && !self.paused;
        // Round 0 only: later rounds take their pages from the dirty log.
        let pagemap = round0.then(crate::memory::Pagemap::open);
        const ALL: [u64; CLEAR_WORDS] = [u64::MAX; CLEAR_WORDS];
        for (region, &(start, len)) in regions.iter().enumerate() {
            let words = (len / PAGE).div_ceil(64) as usize;
            let in_place = match self.quiescent {
                // SAFETY: the guest is quiescent (see the field): nothing writes its RAM
                // until the migration ends, and the pieces taken from these bytes are
                // written and dropped by the round's last flush.
                true => Some(
                    unsafe { crate::memory::ram_bytes(vm.memory(), start, len) }.ok_or_else(
                        || Error::Save(format!("RAM at {start:#x} is not one region")),
                    )?,
                ),
                false => None,
            };
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
                        vm.ram()
                            .clear_dirty_log(region as u32, chunk as u64 * 64, mask)
                            .map_err(|e| Error::Save(format!("clearing the dirty log: {e}")))?;
                    }
                }
                let touched;
                let chunk_bits = match bits {
                    Some(b) => &b[region][chunk..end],
                    None => {
                        let pagemap = pagemap.as_ref().expect("opened for round 0");
                        touched =
                            vm.ram()
                                .touched_range(pagemap, region, chunk as u64 * 64, end - chunk);
                        let n = count_pages(std::slice::from_ref(&touched));
                        let chunk_pages =
                            ((end - chunk) as u64 * 64).min(len / PAGE - chunk as u64 * 64);
                        self.report.untouched_pages += chunk_pages - n;
                        self.remaining = self.remaining.saturating_sub((chunk_pages - n) * PAGE);
                        &touched[..]
                    }
                };
                let first = chunk as u64 * 64;
                for page in crate::memory::set_pages(chunk_bits, first) {
                    if page * PAGE >= len {
                        break;
                    }
                    self.send_page(start, page * PAGE, in_place, round0)?;
                }
            }
        }
        self.flush()?;
        if !self.paused {
            // The destination has every page of the round in RAM before the next decision:
            // the bandwidth is end to end, and no backlog there lands in the downtime.
            let phase = self.phase();
            let sync = protocol::send(self.conn, &Message::Sync)
                .map_err(proto(phase, "sending memory"))?;
            self.answer(phase, "Synced", "waiting for Synced")?;
            // Sync, and Synced back (an empty message, as long).
            self.round_bytes += 2 * sync;
            self.report.bytes += 2 * sync;
        }
        if self.round_bytes >= BULK_ROUND {
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

    /// Puts the page at `offset` of the RAM region at `start` into the frame: read in place
    /// from `in_place` (a quiescent guest's region) or copied; zero pages as a flag (round
    /// 0: not at all). Sends the frame when it is full.
    fn send_page(
        &mut self,
        start: u64,
        offset: u64,
        in_place: Option<&'a [u8]>,
        round0: bool,
    ) -> Result<(), Error> {
        let gpa = start + offset;
        let zero = match in_place {
            Some(bytes) => {
                let at = offset as usize;
                let page = &bytes[at..at + PAGE as usize];
                let zero = self.batch.commit_in_place(gpa, page, round0);
                if !zero {
                    self.take_in_place(bytes, at);
                }
                zero
            }
            None => {
                self.vm
                    .memory()
                    .read_slice(self.batch.page_slot(), GuestAddress(gpa))
                    .map_err(|e| Error::Save(format!("reading guest page {gpa:#x}: {e}")))?;
                self.batch.commit_page(gpa, round0)
            }
        };
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
        Ok(())
    }

    /// Writes the frame being built (if any), paces to the bandwidth limit, reports
    /// progress, and stops for a cancel or the timeout.
    fn flush(&mut self) -> Result<(), Error> {
        if !self.batch.is_empty() {
            let phase = self.phase();
            let pages: Vec<&[u8]> = self.in_place.iter().map(|(b, s, e)| &b[*s..*e]).collect();
            let frame = self.batch.finish();
            frame
                .write_with(&mut *self.conn, &pages)
                .map_err(io(phase, "sending memory"))?;
            let n = frame.len() as u64;
            self.report.bytes += n;
            self.round_bytes += n;
        }
        self.batch.reset();
        self.in_place.clear();
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
            self.control.set_progress(Some(p));
        }
        if self.control.cancel.load(Ordering::SeqCst) {
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

    /// Adds the page at `offset` of a region's `bytes`, taken in place, to the frame's
    /// data: to the last piece where it follows it.
    fn take_in_place(&mut self, bytes: &'a [u8], offset: usize) {
        if let Some((b, _, end)) = self.in_place.last_mut() {
            if std::ptr::eq(*b, bytes) && *end == offset {
                *end += PAGE as usize;
                return;
            }
        }
        self.in_place.push((bytes, offset, offset + PAGE as usize));
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

    /// The rate the report gives: the bandwidth measure, or where no round was large enough
    /// for one, what the whole migration moved per second (latency-bound, but not 0).
    fn reported_bandwidth(&self) -> f64 {
        match self.bandwidth() {
            b if b > 0.0 => b,
            _ => self.report.bytes as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
        }
    }

    /// Bytes per second on the wire while sending: the rounds that sent at least
    /// [`BULK_ROUND`], and the current one once it has. A round of a few pages takes about
    /// one round trip whatever the link's speed; counted, such rounds would drag the measure
    /// down to bytes per round trip, and predict a downtime the next round could never meet
    /// (0 until measured: converge then assumes its default).
    fn bandwidth(&self) -> f64 {
        let mut bytes = self.busy_bytes;
        let mut t = self.busy_time;
        if self.round_bytes >= BULK_ROUND {
            bytes += self.round_bytes;
            t += self.round_started.elapsed().saturating_sub(self.paced);
        }
        if bytes == 0 || t.is_zero() {
            0.0
        } else {
            bytes as f64 / t.as_secs_f64()
        }
    }
}
