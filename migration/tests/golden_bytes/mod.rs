//! The golden stream files and what the stream tests read and forge them with: sections
//! walked, frames built by hand from the documented layout.
// Each test file that includes this uses a part of it.
#![allow(dead_code)]

use migration::*;

pub const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/v3-small.bin");
/// Written by format version 2 (no VIRT sections), from `golden_vm()` without `devices`.
pub const GOLDEN_V2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/v2-small.bin");
/// Written by format version 1 (no GCPU section), from `golden_vm()` without `guest_cpu`.
pub const GOLDEN_V1: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/v1-small.bin");

pub fn encode(vm: &VmState) -> Vec<u8> {
    let mut out = Vec::new();
    let n = write_vm(&mut out, vm).expect("write_vm");
    assert_eq!(n, out.len() as u64, "write_vm returns the bytes written");
    out
}

pub fn golden_bytes() -> Vec<u8> {
    std::fs::read(GOLDEN).expect("golden file (FERRY_UPDATE_GOLDEN=1 to create it)")
}

/// Every golden file: the current version's, version 2's and version 1's.
pub fn goldens() -> [Vec<u8>; 3] {
    [
        golden_bytes(),
        std::fs::read(GOLDEN_V2).expect("the version 2 golden file"),
        std::fs::read(GOLDEN_V1).expect("the version 1 golden file"),
    ]
}

/// A section of a stream: its tag and its byte range, frame header to CRC.
pub struct Sec {
    pub tag: [u8; 4],
    pub start: usize,
    pub end: usize,
}

/// Walks the section frames of a well-formed stream.
pub fn sections(bytes: &[u8]) -> Vec<Sec> {
    let mut out = Vec::new();
    let mut pos = 16;
    while pos < bytes.len() {
        let tag: [u8; 4] = bytes[pos..pos + 4].try_into().unwrap();
        let len = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().unwrap()) as usize;
        let end = pos + 16 + len + 4;
        out.push(Sec {
            tag,
            start: pos,
            end,
        });
        pos = end;
    }
    out
}

pub fn sec<'a>(secs: &'a [Sec], tag: &[u8; 4]) -> &'a Sec {
    secs.iter()
        .find(|s| &s.tag == tag)
        .expect("section present")
}

/// A section frame built by hand from the documented layout.
pub fn frame(tag: &[u8; 4], version: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = tag.to_vec();
    f.extend(version.to_le_bytes());
    f.extend(0u16.to_le_bytes());
    f.extend((payload.len() as u64).to_le_bytes());
    f.extend(payload);
    let crc = crc32fast::hash(&f);
    f.extend(crc.to_le_bytes());
    f
}

/// The golden stream with its MEMR and END sections replaced by `tail` frames.
pub fn golden_with_tail(tail: &[Vec<u8>]) -> Vec<u8> {
    let bytes = golden_bytes();
    let secs = sections(&bytes);
    let memr = sec(&secs, b"MEMR");
    let mut out = bytes[..memr.start].to_vec();
    tail.iter().for_each(|f| out.extend(f));
    out
}

pub fn memr_payload(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut p = (ranges.len() as u32).to_le_bytes().to_vec();
    for &(gpa, len) in ranges {
        p.extend(gpa.to_le_bytes());
        p.extend(len.to_le_bytes());
        p.extend(vec![0xa5; len as usize]);
    }
    p
}
