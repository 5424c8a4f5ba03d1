//! The rounds of the source: which pages a round sends, and how they go into frames (copied
//! while the guest runs, taken where they lie once it cannot write), paced and measured.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;

/// The Touched map: each block of guest-physical memory (protocol::TOUCHED_BLOCK) that
/// holds a page the guest has touched, from address 0 to the end of RAM.
pub(super) fn touched_map(vm: &Vm) -> Vec<u64> {
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

/// The pages a round sends.
#[derive(Clone, Copy)]
pub(super) enum Round<'a> {
    /// Round 0: every page the guest ever touched.
    Touched,
    /// A later round, or the last: these pages.
    Dirty(&'a PageSet),
}

/// 64-page words `first..end` of RAM region `region` (`len` bytes): what a round
/// write-protects and reads at once.
struct Chunk {
    region: usize,
    len: u64,
    first: usize,
    end: usize,
}

impl<'a, C: Read + Write> Sender<'a, C> {
    /// Sends one round: the dirty pages of `round` (a dirty page now zero goes as a ZERO
    /// run), or round 0: every page ever touched (pagemap, looked up chunk by chunk just
    /// after the chunk is write-protected, so that a page first touched later is logged),
    /// zero pages dropped (the destination's fresh RAM is zero).
    pub(super) fn send_round(&mut self, round: Round<'_>) -> Result<(), Error> {
        self.start_round(round);
        let round0 = matches!(round, Round::Touched);
        let manual = self.vm.ram().manual_protect() && !self.paused;
        // Round 0 only: later rounds take their pages from the dirty log.
        let pagemap = round0.then(crate::memory::Pagemap::open);
        for (region, (start, len)) in self.regions.clone().into_iter().enumerate() {
            let words = (len / PAGE).div_ceil(64) as usize;
            let in_place = match self.quiescent {
                // SAFETY: the guest is quiescent (see the field): nothing writes its RAM
                // until the migration ends, and the pieces taken from these bytes are
                // written and dropped by the round's last flush.
                true => Some(
                    unsafe { crate::memory::ram_bytes(self.vm.memory(), start, len) }
                        .ok_or(Error::RamLayout(start))?,
                ),
                false => None,
            };
            for chunk in (0..words).step_by(CLEAR_WORDS) {
                let chunk = Chunk {
                    region,
                    len,
                    first: chunk,
                    end: (chunk + CLEAR_WORDS).min(words),
                };
                if manual {
                    self.protect(&chunk, round)?;
                }
                let pages = match round {
                    Round::Dirty(b) => b.region(chunk.region)[chunk.first..chunk.end].to_vec(),
                    Round::Touched => {
                        self.touched(&chunk, pagemap.as_ref().expect("opened for round 0"))
                    }
                };
                for page in crate::memory::set_pages(&pages, chunk.first as u64 * 64) {
                    if page * PAGE >= len {
                        break;
                    }
                    self.send_page(start, page * PAGE, in_place, round0)?;
                }
            }
        }
        self.flush()?;
        self.end_round()
    }

    /// Resets the round's counters; the bytes it will send at most.
    fn start_round(&mut self, round: Round<'_>) {
        self.round_started = Instant::now();
        self.round_bytes = 0;
        self.round_pages = 0;
        self.paced = Duration::ZERO;
        let total: u64 = self.regions.iter().map(|(_, len)| len / PAGE).sum();
        self.remaining = match round {
            Round::Dirty(b) => b.count() * PAGE,
            Round::Touched => total * PAGE,
        };
        self.batch.set_round(self.report.rounds);
        // The round under pause is the switch-over's (its own event).
        if !self.paused {
            let pages = self.remaining / PAGE;
            let props = serde_json::json!({ "round": self.report.rounds, "pages": pages });
            crate::monitor::emit("vm", "migration-round", Some(props));
        }
    }

    /// Write-protects a chunk again just before reading it: a write from now on is logged
    /// and sent in a later round. Round 0 clears every page (the log starts all set), later
    /// rounds the ones found dirty.
    fn protect(&self, c: &Chunk, round: Round<'_>) -> Result<(), Error> {
        const ALL: [u64; CLEAR_WORDS] = [u64::MAX; CLEAR_WORDS];
        let mask = match round {
            Round::Dirty(b) => &b.region(c.region)[c.first..c.end],
            Round::Touched => &ALL[..c.end - c.first],
        };
        if mask.iter().any(|m| *m != 0) {
            self.vm
                .ram()
                .clear_dirty_log(c.region as u32, c.first as u64 * 64, mask)
                .map_err(|source| Error::DirtyLog {
                    what: "clearing the dirty log",
                    source,
                })?;
        }
        Ok(())
    }

    /// Round 0's pages of a chunk: those ever touched (pagemap); the others count as
    /// untouched and leave the round's remaining bytes.
    fn touched(&mut self, c: &Chunk, pagemap: &crate::memory::Pagemap) -> Vec<u64> {
        let first_page = c.first as u64 * 64;
        let touched = self
            .vm
            .ram()
            .touched_range(pagemap, c.region, first_page, c.end - c.first);
        let n: u64 = touched.iter().map(|w| u64::from(w.count_ones())).sum();
        let chunk_pages = ((c.end - c.first) as u64 * 64).min(c.len / PAGE - first_page);
        self.report.untouched_pages += chunk_pages - n;
        self.remaining = self.remaining.saturating_sub((chunk_pages - n) * PAGE);
        touched
    }

    /// After a round's last frame: Sync (while the guest runs), the bandwidth measure, the
    /// report's lists.
    fn end_round(&mut self) -> Result<(), Error> {
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
    pub(super) fn send_page(
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
                    .map_err(|source| Error::ReadPage { gpa, source })?;
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
    pub(super) fn flush(&mut self) -> Result<(), Error> {
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
        // Once the guest runs at the destination (postcopy) there is nothing to cancel.
        if self.control.cancel.load(Ordering::SeqCst) && !self.serving {
            return Err(Error::Cancelled {
                why: Cancel::Requested {
                    round: self.report.rounds,
                    bytes: self.report.bytes,
                },
                report: Box::default(),
            });
        }
        if !self.paused && self.started.elapsed() >= self.opts.timeout {
            return Err(Error::Cancelled {
                why: Cancel::TimedOut {
                    elapsed: self.started.elapsed(),
                    round: self.report.rounds,
                },
                report: Box::default(),
            });
        }
        Ok(())
    }

    /// Adds the page at `offset` of a region's `bytes`, taken in place, to the frame's
    /// data: to the last piece where it follows it.
    pub(super) fn take_in_place(&mut self, bytes: &'a [u8], offset: usize) {
        if let Some((b, _, end)) = self.in_place.last_mut() {
            if std::ptr::eq(*b, bytes) && *end == offset {
                *end += PAGE as usize;
                return;
            }
        }
        self.in_place.push((bytes, offset, offset + PAGE as usize));
    }

    /// The phase the source is in.
    pub(super) fn phase(&self) -> Phase {
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
    pub(super) fn reported_bandwidth(&self) -> f64 {
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
    pub(super) fn bandwidth(&self) -> f64 {
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
