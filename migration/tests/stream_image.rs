//! Snapshot memory as MEMI images (format version 4): written page aligned with holes
//! (`write_vm_image`), read back either extent by extent into a sink (`read_vm`, a
//! compressed file) or as images to map (`Rest::memory_mapped`), and refused when the table,
//! an extent, a hole, the padding or the version is wrong.

use std::io::{Cursor, Seek, SeekFrom};

use migration::stream::{Error, Tag};
use migration::*;

#[allow(dead_code)] // rich_vm is for the other stream tests
mod fixtures;
use fixtures::golden_vm;

const PAGE: usize = 4096;
/// The image snapshot below as format version 4 writes it (`FERRY_UPDATE_GOLDEN=1` rewrites
/// it when the format changes on purpose, which also means a new version).
const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/v4-image.bin");
/// Two regions as ferry lays them out around an MMIO hole, small.
const REGIONS: [(u64, u64); 2] = [(0, 16 * PAGE as u64), (1 << 32, 8 * PAGE as u64)];

/// The golden VM with 24 pages of RAM and no memory of its own.
fn vm() -> VmState {
    let mut vm = golden_vm();
    vm.config.memory = 24 * PAGE as u64;
    vm.memory.clear();
    vm
}

/// Extents: pages 1-2 and 9 of the first region (a hole between), page 0 of the second.
fn extents() -> Vec<(u64, Vec<u8>)> {
    let page = |seed: u8, n: usize| (0..n * PAGE).map(|i| seed ^ (i % 251) as u8).collect();
    vec![
        (PAGE as u64, page(1, 2)),
        (9 * PAGE as u64, page(2, 1)),
        (1 << 32, page(3, 1)),
    ]
}

/// Writes the image snapshot into a buffer whose stream starts at `base`.
fn write(base: u64) -> Vec<u8> {
    let ext = extents();
    let borrowed: Vec<(u64, &[u8])> = ext.iter().map(|(g, d)| (*g, &d[..])).collect();
    let mut c = Cursor::new(vec![0xaa; base as usize]);
    c.seek(SeekFrom::Start(base)).unwrap();
    let n = write_vm_image(&mut c, &vm(), &REGIONS, &borrowed).unwrap();
    let bytes = c.into_inner();
    assert_eq!(n, bytes.len() as u64 - base, "returns the stream's length");
    bytes[base as usize..].to_vec()
}

/// Reads `bytes` through `memory_mapped`: the images met and the ranges handed over.
fn mapped(bytes: &[u8]) -> Result<Vec<Image>, Error> {
    let mut r = Cursor::new(bytes);
    let (_, rest) = read_head(&mut r)?;
    let mut images = Vec::new();
    rest.memory_mapped(
        |i| {
            images.push(i.clone());
            Ok(())
        },
        |_, _| Err("no MEMR expected"),
    )?;
    Ok(images)
}

#[test]
fn an_image_snapshot_reads_back_as_its_extents_and_maps_page_aligned() {
    let bytes = write(0);
    assert_eq!(bytes[8..12], 4u32.to_le_bytes(), "format version 4");
    let back = decode_vm(&bytes).unwrap();
    let mut want = vm();
    want.memory = extents()
        .into_iter()
        .map(|(gpa, data)| MemoryRange { gpa, data })
        .collect();
    assert_eq!(back, want);
    let images = mapped(&bytes).unwrap();
    assert_eq!(images.len(), 2);
    for (image, (gpa, len)) in images.iter().zip(REGIONS) {
        assert_eq!((image.gpa, image.len), (gpa, len));
        assert_eq!(image.offset % PAGE as u64, 0, "{image:?}");
        // Every page of the image in the file is the guest's page at that address.
        for p in 0..len / PAGE as u64 {
            let at = (image.offset + p * PAGE as u64) as usize;
            let page = &bytes[at..at + PAGE];
            let gpa = gpa + p * PAGE as u64;
            let data = want.memory.iter().find_map(|r| {
                let off = gpa.checked_sub(r.gpa)? as usize;
                r.data.get(off..off + PAGE)
            });
            assert_eq!(page, data.unwrap_or(&[0; PAGE]), "page at {gpa:#x}");
        }
    }
    assert_eq!(images[0].extents, vec![(4096, 8192), (9 * 4096, 4096)]);
    assert_eq!(images[1].extents, vec![(1 << 32, 4096)]);
}

#[test]
fn golden_image_file_matches_byte_for_byte() {
    let bytes = write(0);
    if std::env::var_os("FERRY_UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::write(GOLDEN, &bytes).unwrap();
    }
    let golden = std::fs::read(GOLDEN).expect("the version 4 golden file");
    assert!(
        golden == bytes,
        "write_vm_image output differs from {GOLDEN}"
    );
    assert_eq!(decode_vm(&golden).unwrap().memory.len(), 3);
}

#[test]
fn the_image_is_aligned_in_the_file_wherever_the_stream_starts() {
    let at_100 = write(100);
    // The stream's images sit at stream offsets 100 short of a page boundary: page aligned in
    // the file it was written into, 100 bytes in.
    let images = mapped(&at_100).unwrap();
    assert!(images.iter().all(|i| (i.offset + 100) % PAGE as u64 == 0));
    assert_eq!(decode_vm(&at_100).unwrap().memory.len(), 3);
}

/// The first MEMI frame's stream offset and its extent count.
fn first_memi(bytes: &[u8]) -> (usize, usize) {
    let at = bytes.windows(4).position(|w| w == b"MEMI").unwrap();
    let count = u32::from_le_bytes(bytes[at + 32..at + 36].try_into().unwrap());
    (at, count as usize)
}

/// Rewrites the table CRC of the MEMI frame at `at` after an edit of its table.
fn fix_table_crc(bytes: &mut [u8], at: usize, count: usize) {
    let end = at + 16 + 24 + 20 * count;
    let crc = crc32fast::hash(&bytes[at..end]);
    bytes[end..end + 4].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn a_damaged_table_extent_hole_or_padding_is_refused() {
    let good = write(0);
    let (at, count) = first_memi(&good);
    assert_eq!(count, 2);
    let image = mapped(&good).unwrap()[0].offset as usize;

    let mut b = good.clone();
    b[at + 40] ^= 1; // first extent's offset, table CRC not fixed
    assert!(matches!(
        decode_vm(&b),
        Err(Error::Crc { tag: Tag::MEMI, .. })
    ));
    assert!(matches!(mapped(&b), Err(Error::Crc { tag: Tag::MEMI, .. })));

    let mut b = good.clone();
    b[image + PAGE + 7] ^= 0x40; // inside the first extent
    let err = decode_vm(&b).unwrap_err().to_string();
    assert!(err.contains("CRC-32 of the extent"), "{err}");
    assert!(
        mapped(&b).is_ok(),
        "a mapping restore does not read the image"
    );

    let mut b = good.clone();
    b[image + 5 * PAGE] = 1; // a hole
    let err = decode_vm(&b).unwrap_err().to_string();
    assert!(err.contains("outside every extent is not zero"), "{err}");

    let mut b = good.clone();
    b[image - 1] = 1; // padding
    let err = decode_vm(&b).unwrap_err().to_string();
    assert!(err.contains("padding is not zero"), "{err}");

    // Extents out of order, outside the image, unaligned: refused even with a good CRC.
    for (field, value) in [(40, 9 * PAGE as u64), (40, 15 * PAGE as u64), (48, 100)] {
        let mut b = good.clone();
        b[at + field..at + field + 8].copy_from_slice(&value.to_le_bytes());
        fix_table_crc(&mut b, at, count);
        let err = decode_vm(&b).unwrap_err().to_string();
        assert!(err.contains("MEMI extent"), "{field} = {value}: {err}");
        assert!(mapped(&b).is_err());
    }

    // A count past the pages of the image, and a length that does not match the frame.
    let mut b = good.clone();
    b[at + 32..at + 36].copy_from_slice(&17u32.to_le_bytes());
    assert!(matches!(decode_vm(&b), Err(Error::TooLarge { .. })));
    let mut b = good.clone();
    b[at + 8] ^= 0x10;
    let err = decode_vm(&b).unwrap_err().to_string();
    assert!(err.contains("does not hold a 65536-byte image"), "{err}");
}

#[test]
fn every_truncation_and_every_flip_of_the_frames_is_an_error() {
    let good = write(0);
    for len in (0..good.len()).step_by(61) {
        assert!(decode_vm(&good[..len]).is_err(), "prefix of {len}");
        assert!(mapped(&good[..len]).is_err(), "prefix of {len}, mapped");
    }
    // Flips anywhere outside the image bytes themselves (which the mapping path never reads).
    let images = mapped(&good).unwrap();
    let in_image = |i: usize| {
        images
            .iter()
            .any(|im| (im.offset..im.offset + im.len).contains(&(i as u64)))
    };
    let mut b = good.clone();
    for i in (0..good.len()).filter(|i| !in_image(*i)) {
        b[i] ^= 0x01;
        assert!(decode_vm(&b).is_err(), "byte {i}");
        assert!(mapped(&b).is_err(), "byte {i}, mapped");
        b[i] ^= 0x01;
    }
}

#[test]
fn memi_in_a_version_3_stream_is_refused() {
    let mut b = write(0);
    b[8..12].copy_from_slice(&3u32.to_le_bytes());
    let err = decode_vm(&b).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotInVersion {
                tag: Tag::MEMI,
                version: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn extents_outside_the_regions_are_not_written() {
    let data = vec![1u8; PAGE];
    let mut c = Cursor::new(Vec::new());
    let err = write_vm_image(&mut c, &vm(), &REGIONS, &[(20 * PAGE as u64, &data)]).unwrap_err();
    assert!(
        err.to_string().contains("not inside one RAM region"),
        "{err}"
    );
    let mut c = Cursor::new(Vec::new());
    let too_big = [(0, 32 * PAGE as u64)];
    assert!(write_vm_image(&mut c, &vm(), &too_big, &[]).is_err());
}
