//! The pages a postcopy still has to fetch: wanted (not asked for yet) and asked for (not
//! here yet), as bitmaps over guest-physical pages, and the requests made of them.

use migration::protocol::{MAX_REQUEST_PAGES, MAX_REQUEST_RANGES};

use super::PAGE;

/// The pages still to fetch, and those asked for and not yet here, over guest-physical
/// pages `0..pages`.
#[derive(Debug)]
pub(in crate::migrate::destination) struct Missing {
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
    /// Asked for and not here yet.
    pub fn asked_for(&self, page: u64) -> bool {
        bit(&self.asked, page)
    }

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

    /// Adds a Missing message's pages; every one must be a page of RAM (Err: the first
    /// address that is not).
    pub fn add(
        &mut self,
        first_page: u64,
        words: &[u64],
        regions: &[(u64, u64)],
    ) -> Result<(), u64> {
        for (i, &w) in words.iter().enumerate() {
            let base = first_page + 64 * i as u64;
            for b in (0..64).filter(|b| w & (1 << b) != 0) {
                let page = base + b;
                let gpa = page * PAGE;
                let in_ram = regions
                    .iter()
                    .any(|&(s, l)| gpa >= s && gpa + PAGE <= s + l);
                if page >= self.pages || !in_ram {
                    return Err(gpa);
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

    pub(super) fn is_done(&self) -> bool {
        self.left == 0
    }

    /// Moves `page` from wanted to asked; false if it was not wanted.
    pub(super) fn ask(&mut self, page: u64) -> bool {
        if clear(&mut self.want, page) {
            set(&mut self.asked, page);
            true
        } else {
            false
        }
    }

    /// Moves `page` back from asked to wanted (to go with a later request).
    pub(super) fn unask(&mut self, page: u64) {
        if clear(&mut self.asked, page) {
            set(&mut self.want, page);
        }
    }

    /// `page` has arrived: true if it was asked for (and is to be placed).
    pub(super) fn arrived(&mut self, page: u64) -> bool {
        let asked = clear(&mut self.asked, page);
        if asked {
            self.left -= 1;
        }
        asked
    }

    /// The next wanted pages from the cursor on (wrapping once), as ranges of a request.
    pub(super) fn background(&mut self, regions: &[(u64, u64)]) -> Vec<(u64, u32)> {
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
pub(super) fn push_page(ranges: &mut Vec<(u64, u32)>, page: u64, regions: &[(u64, u64)]) {
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
