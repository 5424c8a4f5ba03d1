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

mod missing;
pub mod uffd;

use missing::push_page;
pub(super) use missing::Missing;

use std::io::{Read, Write};
use std::time::Instant;

use migration::pages::FrameHead;
use migration::protocol::{self, Message, Precopy, MAX_REQUEST_PAGES, MAX_REQUEST_RANGES};

use super::error::ReceiveError as Here;
use super::{io, proto, Error, Phase, PAGE};
use uffd::Uffd;

/// Requests the destination keeps outstanding: one answer on the wire while the next is
/// read, so that the link stays busy; a fault waits for at most this many answers.
const IN_FLIGHT: usize = 2;

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
pub(super) fn prepare(ram: &Ram, missing: &Missing) -> Result<Uffd, Here> {
    let os = |what| move |source| Here::Postcopy { what, source };
    let uffd = Uffd::take().map_err(os("opening a userfaultfd"))?;
    for &(_, len, host) in &ram.regions {
        uffd.register(host, len as usize)
            .map_err(os("registering guest RAM"))?;
    }
    for (page, n) in missing.runs() {
        let host = ram
            .host(page * PAGE, n * PAGE)
            .ok_or(Here::MissingOutsideRam(page * PAGE))?;
        // SAFETY: [host, host + n pages) lies in one region of guest RAM (checked by
        // `host`), private anonymous memory that the VM keeps mapped; MADV_DONTNEED drops
        // its pages, so the next access faults to the userfaultfd. No vCPU runs yet.
        if unsafe { libc::madvise(host.cast(), (n * PAGE) as usize, libc::MADV_DONTNEED) } != 0 {
            return Err(os("dropping stale pages")(std::io::Error::last_os_error()));
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

/// The pages of the faults waiting now, as ranges to request (at most
/// MAX_REQUEST_RANGES; the rest are asked for with the next request); a fault on a page the
/// source never touched gets a zero page at once.
fn faults(
    uffd: &Uffd,
    ram: &Ram,
    missing: &mut Missing,
    regions: &[(u64, u64)],
    stats: &mut Stats,
) -> Result<Vec<(u64, u32)>, Error> {
    let mut urgent: Vec<(u64, u32)> = Vec::new();
    for addr in uffd.faults(0).map_err(io(Phase::Postcopy, "postcopy"))? {
        let Some(page) = ram.page_of(addr) else {
            continue;
        };
        if missing.ask(page) {
            stats.faults += 1;
            if urgent.len() < MAX_REQUEST_RANGES {
                push_page(&mut urgent, page, regions);
            } else {
                missing.unask(page);
            }
        } else if !missing.asked_for(page) {
            // Never touched at the source: a zero page.
            let host = ram.host(page * PAGE, PAGE).expect("a page of RAM");
            uffd.zero(host, PAGE as usize)
                .map_err(io(Phase::Postcopy, "placing a zero page"))?;
            stats.zero_faults += 1;
        }
    }
    Ok(urgent)
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
            let urgent = faults(&uffd, ram, &mut missing, &regions, &mut stats)?;
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
                return Err(Error::FailedHere(Box::new(Here::PagesNotSent)));
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
        return Err(Error::FailedHere(Box::new(Here::OversizedAnswer(
            head.data_len as u64,
        ))));
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
        let bytes = (!run.zero).then(|| &data[at..at + run.len() as usize]);
        placed += place_run(uffd, ram, missing, run, bytes)?;
        at += bytes.map_or(0, <[u8]>::len);
    }
    Ok(placed)
}

/// Places one run's pages (`bytes`: its data, None for a ZERO run) in stretches of pages
/// asked for and not here yet, each with one ioctl; any other page is left alone (never
/// one the guest may have written). Returns the pages placed.
fn place_run(
    uffd: &Uffd,
    ram: &Ram,
    missing: &mut Missing,
    run: &migration::pages::RunHead,
    bytes: Option<&[u8]>,
) -> Result<u64, Error> {
    let (pages, first) = (run.len() / PAGE, run.gpa / PAGE);
    let (mut i, mut placed) = (0, 0);
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
        let r = match bytes {
            None => uffd.zero(host, (n * PAGE) as usize),
            Some(b) => uffd.copy(host, &b[(i * PAGE) as usize..((i + n) * PAGE) as usize]),
        };
        r.map_err(io(Phase::Postcopy, "placing pages"))?;
        placed += n;
        i += n;
    }
    Ok(placed)
}
