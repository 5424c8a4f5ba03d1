//! The page frame: built, written, read back; hostile heads refused.

use super::*;

fn page(v: u8) -> Vec<u8> {
    vec![v; PAGE_SIZE]
}

fn build(pages: &[(u64, Option<u8>)], skip_zero: bool) -> Vec<u8> {
    let mut w = BatchWriter::new();
    w.set_round(7);
    for &(gpa, v) in pages {
        match v {
            Some(v) => {
                w.page_slot().copy_from_slice(&page(v));
                w.commit_page(gpa, skip_zero);
            }
            None => w.push_zero(gpa),
        }
    }
    w.finish().to_vec()
}

#[test]
fn pages_round_trip_as_runs() {
    let f = build(
        &[
            (0x1000, Some(1)),
            (0x2000, Some(2)),
            (0x3000, Some(0)),
            (0x4000, None),
            (0x9000, Some(3)),
        ],
        false,
    );
    assert_eq!(&f[..4], b"PAGS");
    assert_eq!(
        u32::from_le_bytes(f[4..8].try_into().unwrap()) as usize,
        f.len() - 8
    );
    let b = decode(&f[8..]).unwrap();
    assert_eq!(b.round, 7);
    let summary: Vec<(u64, u32, bool)> = b
        .runs
        .iter()
        .map(|r| (r.gpa, r.pages, r.data.is_none()))
        .collect();
    assert_eq!(
        summary,
        vec![(0x1000, 2, false), (0x3000, 2, true), (0x9000, 1, false)]
    );
    assert_eq!(b.runs[0].data.unwrap()[..PAGE_SIZE], page(1)[..]);
    assert_eq!(b.runs[0].data.unwrap()[PAGE_SIZE..], page(2)[..]);
    assert_eq!(b.runs[2].data.unwrap(), &page(3)[..]);
}

#[test]
fn zero_pages_can_be_skipped() {
    let f = build(&[(0x1000, Some(0)), (0x2000, Some(5))], true);
    let b = decode(&f[8..]).unwrap();
    assert_eq!(b.runs.len(), 1);
    assert_eq!(b.runs[0].gpa, 0x2000);
}

#[test]
fn the_writer_is_reusable_and_fills_up() {
    let mut w = BatchWriter::new();
    let mut n = 0u64;
    while !w.is_full() {
        w.page_slot()[0] = 1;
        w.commit_page(n * 2 * PAGE_SIZE as u64, false);
        n += 1;
    }
    assert_eq!(n as usize, MAX_DATA_PAGES);
    let f = w.finish().to_vec();
    assert!(f.len() - 8 <= MAX_PAYLOAD);
    assert_eq!(decode(&f[8..]).unwrap().runs.len(), MAX_DATA_PAGES);
    w.reset();
    assert!(w.is_empty());
    let g = build(&[(0, Some(9))], false);
    w.set_round(7);
    w.page_slot().copy_from_slice(&page(9));
    w.commit_page(0, false);
    let frame = w.finish();
    assert_eq!(frame.to_vec(), g);
    let mut written = Vec::new();
    frame.write_to(&mut written).unwrap();
    assert_eq!(written, g);
}

#[test]
fn pages_in_place_make_the_same_frame_as_copied_ones() {
    let pages = [(0x1000, 1u8), (0x2000, 0), (0x3000, 2), (0x8000, 3)];
    let copied = build(&pages.map(|(g, v)| (g, Some(v))), true);
    let mut w = BatchWriter::new();
    w.set_round(7);
    let bytes: Vec<Vec<u8>> = pages.iter().map(|(_, v)| page(*v)).collect();
    let mut data: Vec<&[u8]> = Vec::new();
    for ((gpa, _), b) in pages.iter().zip(&bytes) {
        if !w.commit_in_place(*gpa, b, true) {
            data.push(b);
        }
    }
    assert_eq!(data.len(), 3);
    let frame = w.finish();
    assert_eq!(frame.len(), copied.len());
    let mut written = Vec::new();
    frame.write_with(&mut written, &data).unwrap();
    assert_eq!(written, copied);
    // Page bytes that are not the frame's are refused before anything is written.
    let mut out = Vec::new();
    assert!(frame.write_with(&mut out, &data[..2]).is_err());
    assert!(frame.write_to(&mut out).is_err());
    assert!(out.is_empty());
}

#[test]
fn every_damaged_frame_is_an_error() {
    let f = build(&[(0x1000, Some(1)), (0x5000, None)], false);
    let payload = &f[8..];
    for cut in 0..payload.len() {
        assert!(decode(&payload[..cut]).is_err(), "cut at {cut}");
    }
    for i in 0..payload.len() {
        let mut p = payload.to_vec();
        p[i] ^= 0x01;
        assert!(decode(&p).is_err(), "flip at {i}");
    }
}

/// Re-seals a payload with a correct CRC, to reach the checks behind it.
fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

fn frame(runs: &[(u64, u32)], data: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for (g, p) in runs {
        b.extend_from_slice(&g.to_le_bytes());
        b.extend_from_slice(&p.to_le_bytes());
    }
    b.resize(b.len() + data, 0xab);
    seal(b)
}

#[test]
fn hostile_run_tables_are_refused() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no pages", frame(&[(0x1000, 0)], 0)),
        ("unaligned", frame(&[(0x1008, 1)], PAGE_SIZE)),
        ("wraps", frame(&[(!0xfff | ZERO, 2)], 0)),
        ("data short", frame(&[(0x1000, 2)], PAGE_SIZE)),
        ("data left over", frame(&[(0x1000, 1)], 2 * PAGE_SIZE)),
        (
            "too many zero pages",
            frame(&[(ZERO, MAX_PAGES as u32), (0x1000_0000 | ZERO, 1)], 0),
        ),
        ("huge zero run", frame(&[(ZERO, u32::MAX)], 0)),
        (
            "too many data pages",
            frame(&[(0, MAX_DATA_PAGES as u32 + 1)], 0),
        ),
    ];
    for (what, f) in cases {
        assert!(decode(&f).is_err(), "{what}");
    }
    let mut many = Vec::new();
    many.extend_from_slice(&0u32.to_le_bytes());
    many.extend_from_slice(&(MAX_RUNS as u32 + 1).to_le_bytes());
    assert!(decode(&seal(many)).is_err(), "too many runs");
    assert!(matches!(
        decode(&vec![0u8; MAX_PAYLOAD + 1]),
        Err(Error::TooLarge(_))
    ));
    // A good ZERO run decodes.
    assert_eq!(
        decode(&frame(&[(0x2000 | ZERO, 3)], 0)).unwrap().runs[0],
        Run {
            gpa: 0x2000,
            pages: 3,
            data: None
        }
    );
}

#[test]
fn zero_detection() {
    assert!(is_zero(&[0u8; 4096]));
    for i in [0, 255, 256, 4095] {
        let mut p = [0u8; 4096];
        p[i] = 1;
        assert!(!is_zero(&p), "{i}");
    }
    assert!(is_zero(&[]));
    assert!(!is_zero(&[0, 0, 3]));
}
