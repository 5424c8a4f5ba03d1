//! Guest RAM mapped from a snapshot file: a MEMI image (docs/migration-format.md, section
//! 8.1) becomes a private mapping of the file over its region, so a restore reads no page
//! until the guest (or ferry) touches it, and the file is never written: a write makes the
//! page the process's own (copy on write).
//!
//! A mapped page that was never touched is not resident and not in this process's page
//! table, yet holds the file's data: the extents are kept, and every question "which pages
//! may hold data" (touched pages, resident blocks: what a snapshot or migration sends)
//! includes them.

use std::os::unix::io::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{advise, GuestRam, PAGE_SIZE};

/// Whether the extents of `image` are nonzero, page aligned, ascending and inside it: what
/// the pages and blocks below count on (the stream's reader refuses any other).
fn extents_inside(image: &migration::Image) -> bool {
    let mut next = image.gpa;
    let end = image.gpa.checked_add(image.len);
    image.extents.iter().all(|&(gpa, len)| {
        let ok = len != 0
            && (gpa | len) % PAGE_SIZE == 0
            && gpa >= next
            && gpa.checked_add(len).is_some_and(|e| Some(e) <= end);
        next = gpa.saturating_add(len);
        ok
    })
}

impl GuestRam {
    /// Maps `image` from `file` (the snapshot, `file_len` bytes long) over the RAM region it
    /// covers, before the RAM is attached to a VM: its data extents read from the file on
    /// demand, its holes zero. The image must lie inside one region, at a page-aligned file
    /// offset, whole pages long, and end within the file; its extents (which the stream's
    /// reader checked already) nonzero, page aligned, ascending and inside it.
    pub fn map_image(
        &mut self,
        file: &std::fs::File,
        file_len: u64,
        image: &migration::Image,
    ) -> Result<(), &'static str> {
        if self.vm.get().is_some() {
            return Err("guest RAM is attached to a VM already");
        }
        if (image.offset | image.gpa | image.len) % PAGE_SIZE != 0 {
            return Err("image is not page aligned");
        }
        if !extents_inside(image) {
            return Err("image extents are not page aligned, ascending and inside the image");
        }
        if image
            .offset
            .checked_add(image.len)
            .is_none_or(|end| end > file_len)
        {
            return Err("image ends beyond the end of the snapshot file");
        }
        let host = self
            .mem
            .get_slice(GuestAddress(image.gpa), image.len as usize)
            .map_err(|_| "image is not inside one RAM region")?
            .ptr_guard_mut()
            .as_ptr();
        let offset = libc::off_t::try_from(image.offset).map_err(|_| "image offset too large")?;
        // SAFETY: [host, host + len) lies inside one region's mapping, which `self.mem` owns
        // and which nothing else uses yet (not attached to a VM: no vCPU, no device, no
        // memslot); MAP_FIXED replaces those pages with a private mapping of the file, the
        // same size and protection, so every pointer into the region stays valid. The file
        // covers the whole range (checked above); MAP_PRIVATE never writes it.
        let mapped = unsafe {
            libc::mmap(
                host.cast(),
                image.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if mapped != host.cast() {
            return Err("cannot map the image from the snapshot file");
        }
        advise(host, image.len as usize, libc::MADV_DONTDUMP)
            .map_err(|_| "cannot keep the mapped image out of core dumps")?;
        self.file_extents.extend(&image.extents);
        self.file_extents.sort_unstable();
        Ok(())
    }

    /// Whether any RAM is mapped from a snapshot file.
    pub fn mapped_from_file(&self) -> bool {
        !self.file_extents.is_empty()
    }

    /// Sets in `bits` (pages from `first_page` of the region at `start`) the pages of file
    /// extents.
    pub(super) fn add_file_pages(&self, bits: &mut [u64], start: u64, first_page: u64) {
        let (from, to) = (first_page, first_page + bits.len() as u64 * 64);
        for &(gpa, len) in &self.file_extents {
            let Some(rel) = gpa.checked_sub(start) else {
                continue;
            };
            let (a, b) = (
                (rel / PAGE_SIZE).max(from),
                ((rel + len) / PAGE_SIZE).min(to),
            );
            for p in a..b {
                let i = (p - from) as usize;
                bits[i / 64] |= 1 << (i % 64);
            }
        }
    }

    /// Adds to `blocks` (ascending, of `block` bytes) every block holding part of a file
    /// extent, keeping them ascending and unique.
    pub(super) fn add_file_blocks(&self, blocks: &mut Vec<u64>, block: u64) {
        if self.file_extents.is_empty() {
            return;
        }
        for &(gpa, len) in &self.file_extents {
            let mut b = gpa / block * block;
            while b < gpa + len {
                blocks.push(b);
                b += block;
            }
        }
        blocks.sort_unstable();
        blocks.dedup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Found by the snapshot_image fuzz target: an image whose extents lay outside it (or
    // ran past u64) was mapped, and counting its blocks allocated without bound; an image
    // not whole pages long mapped file bytes over RAM past its end.
    #[test]
    fn images_with_bad_extents_or_partial_pages_are_refused() {
        let p = std::env::temp_dir().join(format!("ferry-image-{}.bin", std::process::id()));
        std::fs::write(&p, vec![7u8; 4 * PAGE_SIZE as usize]).unwrap();
        let file = std::fs::File::open(&p).unwrap();
        let image = |len, extents| migration::Image {
            gpa: PAGE_SIZE,
            len,
            offset: PAGE_SIZE,
            extents,
        };
        let page = PAGE_SIZE;
        let bad = [
            image(2 * page, vec![(4 * page, page)]),
            image(2 * page, vec![(page, u64::MAX - page)]),
            image(2 * page, vec![(2 * page, page), (page, page)]),
            image(2 * page, vec![(page, 0)]),
            image(page + 100, vec![]),
        ];
        let mut ram = GuestRam::new(16 * page).unwrap();
        for i in &bad {
            assert!(ram.map_image(&file, 4 * page, i).is_err(), "{i:?}");
        }
        let good = image(2 * page, vec![(page, page), (2 * page, page)]);
        ram.map_image(&file, 4 * page, &good).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(ram.resident_blocks(page), [page, 2 * page]);
    }
}
