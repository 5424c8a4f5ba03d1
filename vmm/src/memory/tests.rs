//! GuestRam: regions, the dirty log's shapes, touched and resident pages.

use super::*;
use vm_memory::Bytes;

#[test]
fn layout_splits_around_the_mmio_gap() {
    assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    let r = ram_ranges(4 << 30);
    assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
    assert_eq!(
        r[1],
        (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
    );
}

#[test]
fn pagemap_finds_exactly_the_touched_pages() {
    let ram = GuestRam::new(8 << 20).unwrap();
    assert!(ram.touched_pages()[0].iter().all(|w| *w == 0));
    for page in [0u64, 5, 64, 2047] {
        ram.memory()
            .write_obj(1u8, GuestAddress(page * PAGE_SIZE + 100))
            .unwrap();
    }
    let bits = &ram.touched_pages()[0];
    let set: Vec<u64> = (0..2048u64)
        .filter(|p| bits[*p as usize / 64] >> (p % 64) & 1 == 1)
        .collect();
    // Exactly these with 4 KiB pages; with transparent huge pages, whole 2 MiB pages
    // around them, but never the pages in between.
    for p in [0, 5, 64, 2047] {
        assert!(set.contains(&p), "{p}: {set:?}");
    }
    assert!(set.iter().all(|p| !(600..1500).contains(p)), "{set:?}");
}

#[test]
fn pagemap_scan_and_entries_agree_from_any_first_page() {
    let ram = GuestRam::new(64 << 20).unwrap();
    let pages = (64u64 << 20) / PAGE_SIZE;
    // A scattered pattern: single pages, a run across a word boundary, the last page.
    let mut touched = vec![3u64, 64, 65, 1000, 4095, pages - 1];
    touched.extend(120..200);
    for p in &touched {
        ram.memory()
            .write_obj(7u8, GuestAddress(p * PAGE_SIZE))
            .unwrap();
    }
    let pagemap = Pagemap::open();
    let host = ram.memory().get_host_address(GuestAddress(0)).unwrap() as u64;
    for first in [0u64, 64, 1024] {
        let n = (pages - first) as usize;
        let mut read = vec![0u64; n.div_ceil(64)];
        pagemap.mark_touched_by_reading(host + first * PAGE_SIZE, n, &mut read);
        let got = ram.touched_range(&pagemap, 0, first, n.div_ceil(64));
        assert_eq!(got, read, "from page {first}");
        let mut scanned = vec![0u64; n.div_ceil(64)];
        match pagemap.mark_touched_by_scan(host + first * PAGE_SIZE, n, &mut scanned) {
            Ok(()) => assert_eq!(scanned, read, "PAGEMAP_SCAN from page {first}"),
            // Kernels before 6.7 have no PAGEMAP_SCAN: the entries are what counts there.
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                eprintln!("no PAGEMAP_SCAN on this kernel: {e}")
            }
            Err(e) => panic!("PAGEMAP_SCAN: {e}"),
        }
        for p in touched.iter().filter(|p| **p >= first) {
            let i = (p - first) as usize;
            assert_eq!(got[i / 64] >> (i % 64) & 1, 1, "page {p} from {first}");
        }
    }
}

#[test]
fn resident_blocks_are_the_touched_ones() {
    let ram = GuestRam::new(72 << 20).unwrap();
    assert_eq!(ram.resident_blocks(2 << 20), Vec::<u64>::new());
    for gpa in [5 * PAGE_SIZE, (6 << 20) + 1, (70 << 20) - 8] {
        ram.memory().write_obj(1u64, GuestAddress(gpa)).unwrap();
    }
    assert_eq!(ram.resident_blocks(2 << 20), vec![0, 6 << 20, 68 << 20]);
    assert_eq!(ram.resident_blocks(64 << 20), vec![0, 64 << 20]);
}

#[test]
fn populate_backs_ram_without_changing_it() {
    let ram = GuestRam::new(8 << 20).unwrap();
    ram.memory()
        .write_obj(0x5au8, GuestAddress(10 * PAGE_SIZE + 1))
        .unwrap();
    // Past the end of RAM: clipped.
    populate(ram.memory(), 4 << 20, 8 << 20).unwrap();
    let bits = &ram.touched_pages()[0];
    assert!(
        bits[1024 / 64..].iter().all(|w| *w == u64::MAX),
        "{bits:x?}"
    );
    let got: u8 = ram
        .memory()
        .read_obj(GuestAddress(10 * PAGE_SIZE + 1))
        .unwrap();
    assert_eq!(got, 0x5a);
    let got: u64 = ram.memory().read_obj(GuestAddress(6 << 20)).unwrap();
    assert_eq!(got, 0, "populated RAM reads as zero");
}

#[test]
fn set_pages_reads_a_bitmap_in_order() {
    let words = [0b1001u64, 0, 1 << 63];
    let pages: Vec<u64> = set_pages(&words, 128).collect();
    assert_eq!(pages, [128, 131, 128 + 191]);
    assert_eq!(set_pages(&[], 0).count(), 0);
}

#[test]
fn vmm_writes_are_tracked() {
    let ram = GuestRam::new(16 << 20).unwrap();
    ram.take_vmm_dirty();
    ram.memory()
        .write_obj(7u64, GuestAddress(3 * PAGE_SIZE + 8))
        .unwrap();
    let bits = ram.take_vmm_dirty();
    assert_eq!(bits[0][0], 1 << 3);
    assert_eq!(ram.take_vmm_dirty()[0][0], 0);
}
