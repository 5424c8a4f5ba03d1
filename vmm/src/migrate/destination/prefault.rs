//! Readahead for a destination's fresh guest RAM in round 0.
//!
//! Round 0 writes pages into RAM nothing has touched yet: every first touch of a 2 MiB
//! block makes the kernel allocate and zero it, which on the receiving thread costs more
//! than the copy from the socket (two thirds of that thread's time in profiles). The source
//! sends round 0 in ascending guest address order, so where frames of densely packed pages
//! follow each other, the next frames most likely continue right after them: a helper
//! thread backs the RAM past the last frame's end ([`crate::memory::populate`]) while the
//! receiving thread copies, the way a file system reads ahead of a sequential reader. As
//! there, the window starts at one 2 MiB block on the second dense frame in a row and
//! doubles with each further one, up to [`AHEAD`]; a sparse frame or a jump closes it. So
//! RAM the guest never touched is backed only past the end of a sequential stretch, and
//! never more than the stretch itself held. The helper never writes page contents; it
//! stops at the end of round 0. Whatever the source claims (a Touched map of all RAM), the
//! helper backs at most [`SLACK`] more than the page data that has arrived so far.

use std::sync::{Arc, Condvar, Mutex};

use migration::pages::{RunHead, PAGE_SIZE};
use migration::protocol::TOUCHED_BLOCK;

use crate::memory::GuestMemoryMmap;

/// How far past a dense frame the helper backs RAM.
pub const AHEAD: u64 = 16 << 20;
/// How much RAM the helper may back beyond the page data received so far.
pub const SLACK: u64 = 64 << 20;
/// The helper's step: a transparent huge page.
const BLOCK: u64 = 2 << 20;
// The helper backs one BLOCK per block of the source's Touched map.
const _: () = assert!(TOUCHED_BLOCK == BLOCK);

/// What the helper is asked to back: [next, end) first, then the source's touched blocks
/// from the top down while they lie at or above `floor`.
#[derive(Debug, Default)]
struct Window {
    next: u64,
    end: u64,
    /// Blocks the source's guest touched, ascending; the helper takes them from the end.
    plan: Vec<u64>,
    /// The end of the highest frame received: the receiving thread works below it.
    floor: u64,
    /// Bytes the helper may back in all: [`SLACK`] plus the page data received.
    allowed: u64,
    /// Bytes it has backed.
    backed: u64,
    stop: bool,
}

/// The readahead helper of one receive.
#[derive(Debug)]
pub struct Prefault {
    shared: Arc<(Mutex<Window>, Condvar)>,
    helper: Option<crate::sandbox::Spawning<()>>,
    /// The end of the last dense frame's pages (0: none yet).
    last_end: u64,
    /// The current readahead, bytes (0: closed).
    window: u64,
    /// A plan is being worked through: frames move the helper's floor.
    planned: bool,
    /// The end of the highest frame so far.
    high: u64,
    /// Page data received so far, bytes.
    received: u64,
}

impl Prefault {
    /// Starts the helper over `mem` (where a thread cannot be started, readahead is off).
    pub fn start(mem: GuestMemoryMmap) -> Prefault {
        let window = Window {
            allowed: SLACK,
            ..Window::default()
        };
        let shared = Arc::new((Mutex::new(window), Condvar::new()));
        let s = shared.clone();
        let helper = crate::sandbox::spawn_soon("mig-prefault".into(), move || {
            crate::sandbox::enter_or_exit(crate::sandbox::Kind::Prefault);
            run(&mem, &s)
        });
        Prefault {
            shared,
            helper: Some(helper),
            last_end: 0,
            window: 0,
            planned: false,
            high: 0,
            received: 0,
        }
    }

    /// The source's map of touched blocks (migration::protocol::TOUCHED_BLOCK): the helper
    /// backs them from the highest down, while the receiving
    /// thread fills RAM from the lowest up, until the two meet (a block below the highest
    /// frame received so far is the receiver's). Blocks outside RAM are skipped.
    pub fn touched(&mut self, words: &[u64]) {
        let plan: Vec<u64> = words
            .iter()
            .enumerate()
            .flat_map(|(i, &w)| {
                (0..64)
                    .filter(move |b| w >> b & 1 == 1)
                    .map(move |b| (i as u64 * 64 + b) * TOUCHED_BLOCK)
            })
            .collect();
        self.planned = !plan.is_empty();
        let (lock, wake) = &*self.shared;
        let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
        w.plan = plan;
        w.floor = self.high;
        wake.notify_one();
    }

    /// A frame's runs have arrived: a dense frame (its pages span at most twice their own
    /// size in guest addresses) that starts within a block of the last one's end opens or
    /// doubles the window, and the helper is asked to back that much past its end; anything
    /// else closes the window.
    pub fn frame(&mut self, runs: &[RunHead]) {
        let mut data = runs.iter().filter(|r| !r.zero);
        let Some(first) = data.next() else { return };
        let (start, mut end, mut bytes) = (first.gpa, first.gpa + first.len(), first.len());
        for r in data {
            end = end.max(r.gpa + r.len());
            bytes += r.len();
        }
        let dense = end - start <= 2 * bytes && bytes >= 64 * PAGE_SIZE as u64;
        let follows = self.last_end > 0
            && start >= self.last_end - self.last_end.min(BLOCK)
            && start <= self.last_end + BLOCK;
        self.window = match (dense, follows) {
            (true, true) => (self.window * 2).clamp(BLOCK, AHEAD),
            _ => 0,
        };
        self.last_end = if dense { end } else { 0 };
        self.high = self.high.max(end);
        self.received += bytes;
        let (lock, wake) = &*self.shared;
        let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
        w.floor = w.floor.max(end);
        w.allowed = SLACK.saturating_add(self.received);
        if self.window == 0 {
            if self.planned {
                wake.notify_one();
            }
            return;
        }
        // Blocks below `end` hold this frame's pages: the receiving thread backed them.
        w.next = w.next.max(end.next_multiple_of(BLOCK));
        w.end = w.end.max(end.saturating_add(self.window));
        wake.notify_one();
    }

    /// Stops the helper and waits for it (it finishes the block it is backing).
    pub fn stop(&mut self) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        wake.notify_one();
        if let Some(h) = self.helper.take() {
            match h.handle() {
                Ok(h) => {
                    let _ = h.join();
                }
                Err(e) => log::info!("there was no readahead of guest RAM: {e}"),
            }
        }
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(mem: &GuestMemoryMmap, shared: &(Mutex<Window>, Condvar)) {
    let (lock, wake) = shared;
    loop {
        let block = {
            let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if w.stop {
                    return;
                }
                if w.backed + BLOCK > w.allowed {
                    // No further ahead of the pages than SLACK: wait for more of them.
                    w = wake.wait(w).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                if w.next < w.end {
                    let at = w.next;
                    w.next += BLOCK;
                    w.backed += BLOCK;
                    break at;
                }
                match w.plan.pop() {
                    Some(at) if at >= w.floor => {
                        w.backed += BLOCK;
                        break at;
                    }
                    // The receiver has passed it, and every lower one.
                    Some(_) => w.plan.clear(),
                    None => w = wake.wait(w).unwrap_or_else(|e| e.into_inner()),
                }
            }
        };
        if let Err(e) = crate::memory::populate(mem, block, BLOCK) {
            log::info!("readahead of guest RAM off: {e}");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestRam, PAGE_SIZE};

    const MIB: u64 = 1 << 20;

    /// One frame of `pages` data pages, one run per `stride` pages from `gpa`.
    fn frame(gpa: u64, pages: u32, stride: u64) -> Vec<RunHead> {
        if stride == 1 {
            return vec![RunHead {
                gpa,
                pages,
                zero: false,
            }];
        }
        (0..u64::from(pages))
            .map(|i| RunHead {
                gpa: gpa + i * stride * PAGE_SIZE,
                pages: 1,
                zero: false,
            })
            .collect()
    }

    fn backed(ram: &GuestRam, gpa: u64) -> bool {
        let p = gpa / PAGE_SIZE;
        ram.touched_pages()[0][p as usize / 64] >> (p % 64) & 1 == 1
    }

    /// Waits (bounded) until the helper has backed `gpa`.
    fn wait_backed(ram: &GuestRam, gpa: u64) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !backed(ram, gpa) {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn dense_frames_in_a_row_back_ram_ahead_and_the_window_doubles() {
        let ram = GuestRam::new(64 * MIB).unwrap();
        let mut p = Prefault::start(ram.memory().clone());
        p.frame(&frame(0, 512, 1));
        assert_eq!(p.window, 0, "one dense frame is not a sequence yet");
        p.frame(&frame(2 * MIB, 512, 1));
        assert_eq!(p.window, 2 * MIB);
        p.frame(&frame(4 * MIB, 512, 1));
        assert_eq!(p.window, 4 * MIB);
        // Asked for [6 MiB, 10 MiB): its last page gets backed.
        assert!(wait_backed(&ram, 10 * MIB - PAGE_SIZE));
        p.stop();
        assert!(!backed(&ram, 12 * MIB), "backed past the window");
        assert!(
            !backed(&ram, 0),
            "the frames' own pages are the receiver's to write"
        );
        for _ in 0..8 {
            let at = p.last_end;
            p.frame(&frame(at, 512, 1));
        }
        assert_eq!(p.window, AHEAD, "the window stops doubling at AHEAD");
    }

    #[test]
    fn touched_blocks_are_backed_from_the_top_down_to_the_receiver() {
        let ram = GuestRam::new(64 * MIB).unwrap();
        let mut p = Prefault::start(ram.memory().clone());
        // The receiver is at 10 MiB: blocks 2 (4 MiB) and 4 (8 MiB) are below it.
        p.frame(&frame(8 * MIB, 512, 1));
        // Blocks 2, 4, 12, 20 and 31 (62 MiB, RAM's last).
        p.touched(&[1 << 2 | 1 << 4 | 1 << 12 | 1 << 20 | 1 << 31]);
        for gpa in [24 * MIB, 40 * MIB, 62 * MIB] {
            assert!(wait_backed(&ram, gpa + 2 * MIB - PAGE_SIZE), "{gpa:#x}");
        }
        p.stop();
        assert!(!backed(&ram, 4 * MIB), "a block below the receiver");
        assert!(!backed(&ram, 8 * MIB), "the receiver's own block");
        assert!(!backed(&ram, 30 * MIB), "a block not in the map");
    }

    #[test]
    fn a_touched_map_of_all_ram_backs_no_more_than_the_slack_beyond_the_pages() {
        let ram = GuestRam::new(512 * MIB).unwrap();
        let mut p = Prefault::start(ram.memory().clone());
        // Every block of 512 MiB, and no page yet.
        p.touched(&[u64::MAX; 4]);
        assert!(
            wait_backed(&ram, 512 * MIB - PAGE_SIZE),
            "the top block first"
        );
        let count = |ram: &GuestRam| {
            (0..512 * MIB / BLOCK)
                .filter(|b| backed(ram, b * BLOCK))
                .count() as u64
        };
        // However slow the helper (a loaded host), it gets there; then, given time to
        // overshoot, it has not.
        let settled = |want: u64| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while count(&ram) < want && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            count(&ram)
        };
        assert_eq!(
            settled(SLACK / BLOCK),
            SLACK / BLOCK,
            "SLACK and not a block more"
        );
        // 8 MiB of pages arrive (at the bottom): 4 more blocks may be backed.
        p.frame(&frame(0, 2048, 1));
        assert!(wait_backed(&ram, 512 * MIB - SLACK - 8 * MIB));
        let want = (SLACK + 8 * MIB) / BLOCK;
        assert_eq!(settled(want), want);
        p.stop();
        assert_eq!(count(&ram), want);
    }

    #[test]
    fn sparse_frames_and_jumps_ask_for_nothing() {
        let ram = GuestRam::new(64 * MIB).unwrap();
        let mut p = Prefault::start(ram.memory().clone());
        // 512 pages, one in every 4: spread over 8 MiB.
        p.frame(&frame(0, 512, 4));
        p.frame(&frame(8 * MIB, 512, 4));
        assert_eq!(p.window, 0);
        // Dense, then a jump: the window closes.
        p.frame(&frame(20 * MIB, 512, 1));
        p.frame(&frame(22 * MIB, 512, 1));
        assert_eq!(p.window, 2 * MIB);
        p.frame(&frame(40 * MIB, 512, 1));
        assert_eq!(p.window, 0);
        assert!(wait_backed(&ram, 26 * MIB - PAGE_SIZE));
        p.stop();
        assert!(!backed(&ram, 42 * MIB), "a jump backed RAM ahead");
        assert!(!backed(&ram, 28 * MIB), "backed past the window");
        assert!(!backed(&ram, 16 * MIB), "sparse frames backed RAM");
    }
}
