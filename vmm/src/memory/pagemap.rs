//! Which pages of this process's memory were ever touched (present in RAM or swapped out),
//! from the kernel's page table, without reading the pages: the PAGEMAP_SCAN ioctl on
//! /proc/self/pagemap where the kernel has it (Linux 6.7 on), which answers with ranges and
//! skips unpopulated page tables whole, so that its cost follows the touched memory rather
//! than the guest's size; else a read of one 8-byte pagemap entry per page.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use migration::limits::PAGE_SIZE as PAGE;

/// `struct pm_scan_arg` (include/uapi/linux/fs.h).
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: pages `[start, end)` (addresses) share `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
pub(crate) const PAGEMAP_SCAN: libc::c_ulong =
    0xc000_0000 | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16) | (0x66 << 8) | 16;
/// Ranges asked for per ioctl.
const REGIONS: usize = 512;

/// This process's /proc/self/pagemap, opened once for many lookups (None where it cannot
/// be read: then every page counts as touched).
#[derive(Debug)]
pub struct Pagemap {
    file: Option<File>,
    /// PAGEMAP_SCAN is tried until the kernel refuses it once.
    scan: AtomicBool,
}

impl Pagemap {
    pub fn open() -> Pagemap {
        Pagemap {
            file: File::open("/proc/self/pagemap")
                .inspect_err(|e| log::info!("pagemap: {e}; treating every page as touched"))
                .ok(),
            scan: AtomicBool::new(true),
        }
    }

    /// Sets bit i of `bits` (bit i % 64 of word i / 64) for each page i of the `pages`
    /// pages from `host` (page-aligned, this process's memory) that was ever touched; where
    /// pagemap cannot be read, for every page. `bits` holds at least `pages` bits.
    pub fn mark_touched(&self, host: u64, pages: usize, bits: &mut [u64]) {
        let Some(file) = &self.file else {
            return set_bits(bits, 0, pages);
        };
        if self.scan.load(Ordering::Relaxed) {
            match scan(file, host, pages, bits) {
                Ok(()) => return,
                Err(e) => {
                    log::info!("PAGEMAP_SCAN: {e}; reading pagemap entries instead");
                    self.scan.store(false, Ordering::Relaxed);
                }
            }
        }
        if read(file, host, pages, bits).is_err() {
            set_bits(bits, 0, pages);
        }
    }

    /// As [`Pagemap::mark_touched`], by reading entries only (what kernels before 6.7
    /// get; for the tests and the micro-benchmark).
    pub fn mark_touched_by_reading(&self, host: u64, pages: usize, bits: &mut [u64]) {
        match &self.file {
            Some(f) if read(f, host, pages, bits).is_ok() => {}
            _ => set_bits(bits, 0, pages),
        }
    }

    /// As [`Pagemap::mark_touched`], by PAGEMAP_SCAN only.
    pub fn mark_touched_by_scan(
        &self,
        host: u64,
        pages: usize,
        bits: &mut [u64],
    ) -> std::io::Result<()> {
        let f = self.file.as_ref().ok_or(std::io::ErrorKind::NotFound)?;
        scan(f, host, pages, bits)
    }
}

/// Sets bits `[from, to)`.
fn set_bits(bits: &mut [u64], from: usize, to: usize) {
    let mut p = from;
    while p < to {
        let (w, b) = (p / 64, p % 64);
        let n = (64 - b).min(to - p);
        bits[w] |= (u64::MAX >> (64 - n)) << b;
        p += n;
    }
}

/// The touched ranges by PAGEMAP_SCAN, a batch of ranges per call.
fn scan(file: &File, host: u64, pages: usize, bits: &mut [u64]) -> std::io::Result<()> {
    let end = host + pages as u64 * PAGE;
    let mut regions = vec![PageRegion::default(); REGIONS];
    let mut start = host;
    while start < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: REGIONS as u64,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` page_regions to
        // `vec`, which points at `regions` (that many, alive and unaliased for the call),
        // and `walk_end` in `arg`; it only reads the page table of [start, end).
        let n = unsafe { libc::ioctl(file.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for r in regions.iter().take(n as usize) {
            let from = r.start.clamp(host, end);
            let to = r.end.clamp(from, end);
            set_bits(
                bits,
                ((from - host) / PAGE) as usize,
                ((to - host) / PAGE) as usize,
            );
        }
        if arg.walk_end <= start {
            return Err(std::io::Error::other("PAGEMAP_SCAN made no progress"));
        }
        start = arg.walk_end;
    }
    Ok(())
}

/// The touched pages by reading their pagemap entries (bit 63: present; bit 62: swapped).
fn read(file: &File, host: u64, pages: usize, bits: &mut [u64]) -> std::io::Result<()> {
    let mut entries = vec![0u8; 8 * pages.min(8192)];
    let mut page = 0usize;
    while page < pages {
        let n = (pages - page).min(8192);
        let buf = &mut entries[..8 * n];
        file.read_exact_at(buf, (host / PAGE + page as u64) * 8)?;
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if e & (3 << 62) != 0 {
                let p = page + i;
                bits[p / 64] |= 1 << (p % 64);
            }
        }
        page += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_ranges_within_and_across_words() {
        let mut bits = vec![0u64; 3];
        set_bits(&mut bits, 3, 5);
        set_bits(&mut bits, 60, 130);
        assert_eq!(bits[0], 0b11000 | (0xf << 60));
        assert_eq!(bits[1], u64::MAX);
        assert_eq!(bits[2], 0b11);
        set_bits(&mut bits, 192, 192);
        assert_eq!(bits[2], 0b11);
    }
}
