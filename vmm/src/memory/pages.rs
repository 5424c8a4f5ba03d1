//! A set of guest pages: what the dirty log, ferry's own writes and the pages ever touched
//! are, and what a round sends.

/// Pages of guest RAM, one bitmap per RAM region in the order of the VM's regions: bit i of
/// word w is page 64 w + i of that region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageSet(Vec<Vec<u64>>);

impl PageSet {
    /// A set from one bitmap per region.
    pub fn new(regions: Vec<Vec<u64>>) -> PageSet {
        PageSet(regions)
    }

    /// Region `i`'s bitmap (empty for a region it does not have).
    pub fn region(&self, i: usize) -> &[u64] {
        self.0.get(i).map_or(&[], Vec::as_slice)
    }

    /// Every region's bitmap.
    pub fn regions(&self) -> &[Vec<u64>] {
        &self.0
    }

    /// How many pages are in the set.
    pub fn count(&self) -> u64 {
        self.0
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Adds the pages of `other` (region by region).
    pub fn add(&mut self, other: &PageSet) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= y;
            }
        }
    }
}

impl std::ops::Index<usize> for PageSet {
    type Output = [u64];

    fn index(&self, region: usize) -> &[u64] {
        &self.0[region]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_union_keeps_both_sets_and_counts_each_page_once() {
        let mut a = PageSet::new(vec![vec![0b101, 0], vec![1]]);
        let b = PageSet::new(vec![vec![0b110, 1 << 63], vec![1]]);
        a.add(&b);
        assert_eq!(a, PageSet::new(vec![vec![0b111, 1 << 63], vec![1]]));
        assert_eq!(a.count(), 5);
        assert_eq!(a.region(1), &[1]);
        assert!(a.region(2).is_empty());
    }
}
