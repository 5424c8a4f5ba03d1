//! Postcopy at the destination: the guest runs before all of its memory is here. The pages
//! the source named Missing are dropped from guest RAM before the vCPUs start (stale copies
//! of an earlier round), guest RAM is registered with a userfaultfd, and one thread (the
//! one that received the VM) then asks the source for pages: those a vCPU or a device
//! faulted on first, the rest in the background, at most [`IN_FLIGHT`] requests at a
//! time. A fault on a page that is not missing (never touched at the source) gets a zero
//! page. Each answer is checked (runs inside RAM, asked for, CRC) before a page is placed;
//! UFFDIO_COPY places it atomically and wakes whoever waits on it.
//!
//! If the link dies before every page is here, the guest cannot go on: its memory is split
//! between the two hosts. This side then leaves the faulting threads blocked (the
//! userfaultfd stays open) and reports the error; the source keeps its copy paused.

pub mod uffd;

use std::io::{Read, Write};
use std::time::Instant;

use migration::pages::FrameHead;
use migration::protocol::{self, Message, Precopy, MAX_REQUEST_PAGES, MAX_REQUEST_RANGES};

use super::{io, proto, Error, Phase, PAGE};
use uffd::Uffd;

/// Requests the destination keeps outstanding: one answer on the wire while the next is
/// read, so that the link stays busy; a fault waits for at most this many answers.
const IN_FLIGHT: usize = 2;

/// The pages still to fetch, and those asked for and not yet here, over guest-physical
/// pages `0..pages`.
#[derive(Debug)]
pub(super) struct Missing {
    /// Not asked for yet.
    want: Vec<u64>,
    /// Asked for, not here yet.
    asked: Vec<u64>,
    pages: u64,
    /// Where the background scan goes on from (a page number).
    cursor: u64,
    /// Pages named missing in all.
    pub total: u64,
    /// Pages wanted or asked for, not placed yet.
    left: u64,
}

fn bit(words: &[u64], page: u64) -> bool {
    words
        .get((page / 64) as usize)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

fn clear(words: &mut [u64], page: u64) -> bool {
    let Some(w) = words.get_mut((page / 64) as usize) else {
        return false;
    };
    let was = *w & (1 << (page % 64)) != 0;
    *w &= !(1 << (page % 64));
    was
}

impl Missing {
    /// None missing, over RAM ending at guest address `ram_end`.
    pub fn new(ram_end: u64) -> Missing {
        let pages = ram_end.div_ceil(PAGE);
        let words = pages.div_ceil(64) as usize;
        Missing {
            want: vec![0; words],
            asked: vec![0; words],
            pages,
            cursor: 0,
            total: 0,
            left: 0,
        }
    }

    /// Adds a Missing message's pages; every one must be a page of RAM.
    pub fn add(
        &mut self,
        first_page: u64,
        words: &[u64],
        regions: &[(u64, u64)],
    ) -> Result<(), String> {
        for (i, &w) in words.iter().enumerate() {
            let base = first_page + 64 * i as u64;
            for b in (0..64).filter(|b| w & (1 << b) != 0) {
                let page = base + b;
                let gpa = page * PAGE;
                let in_ram = regions
                    .iter()
                    .any(|&(s, l)| gpa >= s && gpa + PAGE <= s + l);
                if page >= self.pages || !in_ram {
                    return Err(format!(
                        "the source names page {gpa:#x} missing, which is not guest RAM"
                    ));
                }
                if !bit(&self.want, page) {
                    set(&mut self.want, page);
                    self.total += 1;
                    self.left += 1;
                }
            }
        }
        Ok(())
    }

    /// The runs of missing pages (first page, count), in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for page in crate::memory::set_pages(&self.want, 0) {
            match out.last_mut() {
                Some((first, n)) if *first + *n == page => *n += 1,
                _ => out.push((page, 1)),
            }
        }
        out
    }

    fn is_done(&self) -> bool {
        self.left == 0
    }

    /// Moves `page` from wanted to asked; false if it was not wanted.
    fn ask(&mut self, page: u64) -> bool {
        if clear(&mut self.want, page) {
            set(&mut self.asked, page);
            true
        } else {
            false
        }
    }

    /// Moves `page` back from asked to wanted (to go with a later request).
    fn unask(&mut self, page: u64) {
        if clear(&mut self.asked, page) {
            set(&mut self.want, page);
        }
    }

    /// `page` has arrived: true if it was asked for (and is to be placed).
    fn arrived(&mut self, page: u64) -> bool {
        let asked = clear(&mut self.asked, page);
        if asked {
            self.left -= 1;
        }
        asked
    }

    /// The next wanted pages from the cursor on (wrapping once), as ranges of a request.
    fn background(&mut self, regions: &[(u64, u64)]) -> Vec<(u64, u32)> {
        let mut ranges: Vec<(u64, u32)> = Vec::new();
        let mut total = 0u32;
        let words = self.want.len() as u64;
        for step in 0..words {
            let w = (self.cursor / 64 + step) % words;
            while self.want[w as usize] != 0 && total < MAX_REQUEST_PAGES {
                let page = w * 64 + u64::from(self.want[w as usize].trailing_zeros());
                self.ask(page);
                push_page(&mut ranges, page, regions);
                total += 1;
                if ranges.len() == MAX_REQUEST_RANGES {
                    break;
                }
            }
            if total >= MAX_REQUEST_PAGES || ranges.len() == MAX_REQUEST_RANGES {
                self.cursor = w * 64;
                break;
            }
        }
        ranges
    }
}

fn set(words: &mut [u64], page: u64) {
    words[(page / 64) as usize] |= 1 << (page % 64);
}

/// Adds a page to a request's ranges: to the last range where it follows it inside one
/// region (a request's range never crosses a region's end).
fn push_page(ranges: &mut Vec<(u64, u32)>, page: u64, regions: &[(u64, u64)]) {
    let gpa = page * PAGE;
    if let Some((start, n)) = ranges.last_mut() {
        let follows = *start + u64::from(*n) * PAGE == gpa;
        let same_region = regions
            .iter()
            .any(|&(s, l)| *start >= s && gpa + PAGE <= s + l);
        if follows && same_region {
            *n += 1;
            return;
        }
    }
    ranges.push((gpa, 1));
}

/// Guest RAM as the postcopy thread sees it: each region's guest range and host address.
pub(super) struct Ram {
    regions: Vec<(u64, u64, *mut u8)>,
}

// SAFETY: the host addresses point into guest RAM's mappings, which the VM keeps for as
// long as a postcopy runs; the postcopy thread only hands them to the kernel (ioctls and
// madvise), never dereferences them.
unsafe impl Send for Ram {}

impl Ram {
    pub fn new(mem: &crate::memory::GuestMemoryMmap, regions: &[(u64, u64)]) -> Option<Ram> {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        let regions = regions
            .iter()
            .map(|&(s, l)| Some((s, l, mem.get_host_address(GuestAddress(s)).ok()?)))
            .collect::<Option<_>>()?;
        Some(Ram { regions })
    }

    fn ranges(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|&(s, l, _)| (s, l)).collect()
    }

    /// The host address of `[gpa, gpa + len)`, which must lie inside one region.
    fn host(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        self.regions
            .iter()
            .find(|&&(s, l, _)| gpa >= s && gpa + len <= s + l)
            // The offset is inside the region's mapping (checked just above).
            .map(|&(s, _, h)| h.wrapping_add((gpa - s) as usize))
    }

    /// The guest page a host address (a fault's) lies in.
    fn page_of(&self, host: u64) -> Option<u64> {
        self.regions.iter().find_map(|&(s, l, h)| {
            let h = h as u64;
            (host >= h && host < h + l).then(|| (s + (host - h)) / PAGE)
        })
    }
}

/// Before the vCPUs start: guest RAM registered with the userfaultfd, and every missing
/// page dropped (an earlier round's copy, or nothing), so that its first access faults.
pub(super) fn prepare(ram: &Ram, missing: &Missing) -> Result<Uffd, String> {
    let uffd = Uffd::take().map_err(|e| format!("postcopy: {e}"))?;
    for &(_, len, host) in &ram.regions {
        uffd.register(host, len as usize)
            .map_err(|e| format!("postcopy: {e}"))?;
    }
    for (page, n) in missing.runs() {
        let host = ram
            .host(page * PAGE, n * PAGE)
            .ok_or_else(|| format!("postcopy: page {:#x} is not guest RAM", page * PAGE))?;
        // SAFETY: [host, host + n pages) lies in one region of guest RAM (checked by
        // `host`), private anonymous memory that the VM keeps mapped; MADV_DONTNEED drops
        // its pages, so the next access faults to the userfaultfd. No vCPU runs yet.
        if unsafe { libc::madvise(host.cast(), (n * PAGE) as usize, libc::MADV_DONTNEED) } != 0 {
            return Err(format!(
                "postcopy: dropping stale pages: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(uffd)
}

/// What a postcopy took.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub pages: u64,
    /// Faults on missing pages (each asked for ahead of the background).
    pub faults: u64,
    pub zero_faults: u64,
    pub requests: u64,
    pub ms: f64,
}

/// The guest runs: fetches every missing page, faulted ones first, then tells the source
/// PostcopyDone and stops reporting faults. An error leaves the userfaultfd open (the
/// threads that wait on a page keep waiting; the caller ends the process).
pub(super) fn fetch(
    conn: &mut (impl Read + Write),
    uffd: Uffd,
    ram: &Ram,
    mut missing: Missing,
) -> Result<Stats, Error> {
    let began = Instant::now();
    let mut stats = Stats::default();
    let regions = ram.ranges();
    let mut in_flight = 0usize;
    let mut buf = vec![0u8; (MAX_REQUEST_PAGES as u64 * PAGE) as usize];
    let result = (|| -> Result<(), Error> {
        loop {
            // Faults first (those waiting now: there is always an answer due, or a
            // request to make, until the end).
            let mut urgent: Vec<(u64, u32)> = Vec::new();
            for addr in uffd.faults(0).map_err(io(Phase::Postcopy, "postcopy"))? {
                let Some(page) = ram.page_of(addr) else {
                    continue;
                };
                if missing.ask(page) {
                    stats.faults += 1;
                    if urgent.len() < MAX_REQUEST_RANGES {
                        push_page(&mut urgent, page, &regions);
                    } else {
                        // Asked for with the next request instead.
                        missing.unask(page);
                    }
                } else if !bit(&missing.asked, page) {
                    // Never touched at the source: a zero page.
                    let host = ram.host(page * PAGE, PAGE).expect("a page of RAM");
                    uffd.zero(host, PAGE as usize)
                        .map_err(io(Phase::Postcopy, "placing a zero page"))?;
                    stats.zero_faults += 1;
                }
            }
            if !urgent.is_empty() {
                request(conn, urgent)?;
                in_flight += 1;
                stats.requests += 1;
            }
            while in_flight < IN_FLIGHT {
                let next = missing.background(&regions);
                if next.is_empty() {
                    break;
                }
                request(conn, next)?;
                in_flight += 1;
                stats.requests += 1;
            }
            if in_flight == 0 {
                if missing.is_done() {
                    return Ok(());
                }
                // Nothing left to ask for, nothing due, yet pages missing.
                return Err(Error::Restore(
                    "postcopy: the source did not send pages it was asked for".into(),
                ));
            }
            stats.pages += place(conn, &uffd, ram, &mut missing, &mut buf)?;
            in_flight -= 1;
        }
    })();
    if let Err(e) = result {
        // Waiting threads stay blocked on their pages: never a zero page in their place.
        std::mem::forget(uffd);
        return Err(e);
    }
    for &(_, len, host) in &ram.regions {
        uffd.unregister(host, len as usize)
            .map_err(io(Phase::Postcopy, "postcopy"))?;
    }
    protocol::send(conn, &Message::PostcopyDone)
        .map_err(proto(Phase::Postcopy, "confirming every page"))?;
    stats.ms = super::ms(began.elapsed());
    Ok(stats)
}

fn request(conn: &mut impl Write, ranges: Vec<(u64, u32)>) -> Result<(), Error> {
    protocol::send(conn, &Message::PageRequest(ranges))
        .map(|_| ())
        .map_err(proto(Phase::Postcopy, "asking for pages"))
}

/// Reads one answer (a page frame), checks it whole, and places the pages that were asked
/// for and are still missing; returns how many it placed.
fn place(
    conn: &mut impl Read,
    uffd: &Uffd,
    ram: &Ram,
    missing: &mut Missing,
    buf: &mut [u8],
) -> Result<u64, Error> {
    let what = "receiving pages";
    let mut head: FrameHead =
        match protocol::recv_precopy(conn).map_err(proto(Phase::Postcopy, what))? {
            Precopy::Pages(h) => h,
            other => {
                return Err(proto(Phase::Postcopy, what)(protocol::Error::Unexpected {
                    expected: "Pages",
                    found: format!("{other:?}").chars().take(40).collect(),
                }))
            }
        };
    if head.data_len > buf.len() {
        return Err(Error::Restore(format!(
            "the source answered a request with {} bytes of pages, more than any request asks",
            head.data_len
        )));
    }
    for run in &head.runs {
        if ram.host(run.gpa, run.len()).is_none() {
            return Err(Error::PagesOutsideRam {
                gpa: run.gpa,
                len: run.len(),
            });
        }
    }
    let data = &mut buf[..head.data_len];
    conn.read_exact(data).map_err(io(Phase::Postcopy, what))?;
    head.crc_update(data);
    let runs = std::mem::take(&mut head.runs);
    head.check_crc(conn)
        .map_err(|e| proto(Phase::Postcopy, what)(e.into()))?;
    let mut at = 0usize;
    let mut placed = 0;
    for run in &runs {
        let pages = run.len() / PAGE;
        let first = run.gpa / PAGE;
        // Stretches of pages asked for and not here yet, each placed with one ioctl; any
        // other page is left alone (never one the guest may have written).
        let mut i = 0;
        while i < pages {
            if !missing.arrived(first + i) {
                i += 1;
                continue;
            }
            let mut n = 1;
            while i + n < pages && missing.arrived(first + i + n) {
                n += 1;
            }
            let host = ram
                .host((first + i) * PAGE, n * PAGE)
                .expect("checked above");
            let r = if run.zero {
                uffd.zero(host, (n * PAGE) as usize)
            } else {
                let from = at + (i * PAGE) as usize;
                uffd.copy(host, &data[from..from + (n * PAGE) as usize])
            };
            r.map_err(io(Phase::Postcopy, "placing pages"))?;
            placed += n;
            i += n;
        }
        if !run.zero {
            at += (pages * PAGE) as usize;
        }
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_missing_set_takes_only_ram_and_hands_out_capped_requests() {
        // RAM at [0, 8 MiB) and [16 MiB, 24 MiB).
        let regions = [(0, 8 << 20), (16 << 20, 8 << 20)];
        let mut m = Missing::new(24 << 20);
        // Page 2048 (8 MiB) lies in the gap.
        assert!(m.add(2048, &[1], &regions).is_err());
        // Every page of both regions, in 64-page words.
        for first in [0u64, 4096] {
            m.add(first, &[u64::MAX; 32], &regions).unwrap();
        }
        assert_eq!(m.total, 4096);
        assert_eq!(m.runs(), vec![(0, 2048), (4096, 2048)]);
        let mut asked = 0u64;
        while !m.want.iter().all(|w| *w == 0) {
            let r = m.background(&regions);
            let pages: u64 = r.iter().map(|&(_, n)| u64::from(n)).sum();
            assert!(!r.is_empty() && r.len() <= MAX_REQUEST_RANGES, "{r:?}");
            assert!(pages <= u64::from(MAX_REQUEST_PAGES));
            // A range never crosses a region's end.
            for &(gpa, n) in &r {
                let end = gpa + u64::from(n) * PAGE;
                assert!(regions.iter().any(|&(s, l)| gpa >= s && end <= s + l));
            }
            asked += pages;
        }
        assert_eq!(asked, 4096);
        assert!(!m.is_done(), "asked for is not arrived");
        // A page arrives once; one never asked for is not placed.
        assert!(m.arrived(5));
        assert!(!m.arrived(5));
        m.unask(6);
        assert!(!m.arrived(6), "back among the wanted");
        assert_eq!(m.background(&regions), vec![(6 * PAGE, 1)]);
        for page in (0..2048).chain(4096..6144).filter(|p| *p != 5) {
            assert!(m.arrived(page), "{page}");
        }
        assert!(m.is_done());
    }
}
