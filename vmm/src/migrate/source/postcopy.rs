//! Postcopy at the source: the pages the destination lacks named (Missing) instead of sent
//! while the guest is paused, then, once the destination runs the guest, each page it asks
//! for sent at once, until it says PostcopyDone. The guest stays paused here throughout,
//! so pages are sent from where they lie.

use std::io::{Read, Write};

use migration::protocol::{self, Message, MAX_MISSING_WORDS};

use super::*;

impl<'a, C: Read + Write> Sender<'a, C> {
    /// The Missing messages: each region's bits (pages from the region's start) as pages of
    /// guest-physical memory, in pieces of at most [`MAX_MISSING_WORDS`]; words with no page
    /// set at either end of a piece are left out.
    pub(super) fn send_missing(&mut self, bits: &PageSet) -> Result<u64, Error> {
        let mut pages = 0;
        for (&(start, _), words) in self.regions.clone().iter().zip(bits.regions()) {
            if (start / PAGE) % 64 != 0 {
                return Err(Error::RamLayout(start));
            }
            for (i, piece) in words.chunks(MAX_MISSING_WORDS).enumerate() {
                let Some(first) = piece.iter().position(|w| *w != 0) else {
                    continue;
                };
                let last = piece.iter().rposition(|w| *w != 0).unwrap_or(first);
                let m = Message::Missing {
                    first_page: start / PAGE + 64 * (i * MAX_MISSING_WORDS + first) as u64,
                    words: piece[first..=last].to_vec(),
                };
                pages += piece.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                self.report.bytes += protocol::send(self.conn, &m)
                    .map_err(proto(Phase::Switchover, "sending the missing pages"))?;
            }
        }
        Ok(pages)
    }

    /// The destination runs the guest: answers its requests until PostcopyDone. Any error
    /// here leaves the guest split between the two hosts ([`Error::PostcopyBroken`]).
    pub(super) fn serve(&mut self) -> Result<(), Error> {
        self.serving = true;
        let broken = |e: Error| Error::PostcopyBroken(Box::new(e));
        loop {
            let m = protocol::recv(&mut *self.conn)
                .map_err(|e| broken(proto(Phase::Postcopy, "waiting for page requests")(e)))?;
            let ranges = match m {
                Message::PageRequest(r) => r,
                Message::PostcopyDone => return Ok(()),
                Message::Failed(reason) => {
                    return Err(broken(Error::DestinationFailed {
                        phase: Phase::Postcopy,
                        reason,
                    }))
                }
                other => {
                    let e = super::answers::unexpected(Phase::Postcopy, "PageRequest", &other);
                    return Err(broken(e));
                }
            };
            self.answer_request(&ranges).map_err(broken)?;
        }
    }

    /// One page frame with exactly the pages asked for (protocol caps: they fit in one).
    fn answer_request(&mut self, ranges: &[(u64, u32)]) -> Result<(), Error> {
        self.batch.set_round(self.report.rounds);
        protocol::check_request(ranges, &self.regions).map_err(|source| Error::Protocol {
            phase: Phase::Postcopy,
            what: "a page request",
            source,
        })?;
        for &(gpa, n) in ranges {
            let len = u64::from(n) * PAGE;
            let Some(&(start, rlen)) = self.regions.iter().find(|&&(s, l)| gpa >= s && gpa - s < l)
            else {
                return Err(Error::RamLayout(gpa));
            };
            let vm: &'a Vm = self.vm;
            // SAFETY: the guest is paused for good (it runs at the destination now) and the
            // lifecycle guard keeps it so: nothing writes its RAM while these bytes are
            // read, and the pieces taken from them are written by the flush below.
            let bytes = unsafe { crate::memory::ram_bytes(vm.memory(), start, rlen) }
                .ok_or(Error::RamLayout(start))?;
            for offset in (gpa - start..gpa - start + len).step_by(PAGE as usize) {
                self.send_page(start, offset, Some(bytes), false)?;
            }
        }
        self.report.postcopy_pages += ranges.iter().map(|&(_, n)| u64::from(n)).sum::<u64>();
        self.report.postcopy_requests += 1;
        self.flush()
    }
}
