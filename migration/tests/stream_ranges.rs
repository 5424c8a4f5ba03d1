//! Memory that is not in the state: written from borrowed ranges (`write_vm_ranges`, as a
//! snapshot writes guest RAM from where it lies) and read range by range into a sink
//! (`read_head` and `Rest::memory`, as a restore writes it into guest RAM).

use migration::stream::{Error, RANGES_SECTION_BYTES};
use migration::*;

mod fixtures;
use fixtures::rich_vm;

/// The rich VM without its memory, and its memory as owned ranges.
fn split() -> (VmState, Vec<MemoryRange>) {
    let mut vm = rich_vm();
    let memory = std::mem::take(&mut vm.memory);
    (vm, memory)
}

fn borrowed(memory: &[MemoryRange]) -> Vec<(u64, &[u8])> {
    memory.iter().map(|r| (r.gpa, &r.data[..])).collect()
}

/// Reads `bytes` with a sink that records each range, returning the ranges seen and the
/// result.
fn read_into_sink(bytes: &[u8]) -> (Vec<(u64, usize)>, Result<u64, Error>) {
    let mut r = bytes;
    let (_, rest) = read_head(&mut r).expect("the head reads");
    let mut seen = Vec::new();
    let result = rest.memory(|gpa, data| {
        seen.push((gpa, data.len()));
        Ok(())
    });
    (seen, result)
}

#[test]
fn ranges_written_in_place_read_back_as_the_state_with_them() {
    let (vm, memory) = split();
    let mut bytes = Vec::new();
    let n = write_vm_ranges(&mut bytes, &vm, &borrowed(&memory)).unwrap();
    assert_eq!(n, bytes.len() as u64);
    let mut want = vm.clone();
    want.memory = memory.clone();
    assert_eq!(decode_vm(&bytes).unwrap(), want);
    // The same through the sink: every range, in order, and the byte count.
    let (seen, result) = read_into_sink(&bytes);
    let total: u64 = memory.iter().map(|r| r.data.len() as u64).sum();
    assert_eq!(result.unwrap(), total);
    let want: Vec<(u64, usize)> = memory.iter().map(|r| (r.gpa, r.data.len())).collect();
    assert_eq!(seen, want);
}

#[test]
fn a_long_range_is_written_in_sections_of_the_stated_size() {
    let (vm, _) = split();
    let big = vec![0x5au8; (RANGES_SECTION_BYTES as usize) * 2 + 4096];
    let mut bytes = Vec::new();
    write_vm_ranges(&mut bytes, &vm, &[(0, &big)]).unwrap();
    let (seen, result) = read_into_sink(&bytes);
    result.unwrap();
    let s = RANGES_SECTION_BYTES;
    let want = [(0, s as usize), (s, s as usize), (2 * s, 4096)];
    assert_eq!(seen, want);
}

#[test]
fn write_vm_ranges_refuses_bad_ranges_and_a_state_with_memory_writing_nothing() {
    let (vm, memory) = split();
    let page = [1u8; 4096];
    for (what, ranges) in [
        (
            "beyond guest memory",
            vec![(vm.config.memory + (8 << 30), &page[..])],
        ),
        ("not page aligned", vec![(12, &page[..])]),
        ("descending", vec![(8192, &page[..]), (0, &page[..])]),
    ] {
        let mut out = Vec::new();
        let err = write_vm_ranges(&mut out, &vm, &ranges).unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::InvalidInput,
            "{what}: {err}"
        );
        assert!(out.is_empty(), "{what}: {} bytes written", out.len());
    }
    let mut with = vm.clone();
    with.memory = memory;
    let mut out = Vec::new();
    let err = write_vm_ranges(&mut out, &with, &[]).unwrap_err();
    assert!(
        err.to_string().contains("memory ranges of its own"),
        "{err}"
    );
    assert!(out.is_empty());
}

#[test]
fn a_sink_sees_nothing_of_a_section_whose_crc_fails() {
    let (vm, _) = split();
    let a = vec![1u8; RANGES_SECTION_BYTES as usize];
    let b = vec![2u8; 8192];
    let mut bytes = Vec::new();
    write_vm_ranges(&mut bytes, &vm, &[(0, &a), (RANGES_SECTION_BYTES, &b)]).unwrap();
    // The second (last) MEMR section: its data ends 4 (CRC) + 20 (END frame) + 4 before the
    // end of the stream. Flip a byte of it.
    let at = bytes.len() - 4 - 20 - 4 - 100;
    bytes[at] ^= 0x01;
    let (seen, result) = read_into_sink(&bytes);
    assert!(matches!(result, Err(Error::Crc { .. })), "{result:?}");
    assert_eq!(seen, [(0, a.len())], "only the first, whole section");
}

#[test]
fn a_sink_error_ends_the_read_naming_the_range() {
    let (vm, memory) = split();
    let mut bytes = Vec::new();
    write_vm_ranges(&mut bytes, &vm, &borrowed(&memory)).unwrap();
    let mut r = &bytes[..];
    let (_, rest) = read_head(&mut r).unwrap();
    let refused = memory[1].gpa;
    let err = rest
        .memory(|gpa, _| {
            if gpa == refused {
                Err("is not guest RAM")
            } else {
                Ok(())
            }
        })
        .unwrap_err();
    match &err {
        Error::Memory { gpa, why, .. } => {
            assert_eq!((*gpa, *why), (refused, "is not guest RAM"));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("is not guest RAM"), "{err}");
}

#[test]
fn the_head_of_a_stream_has_no_memory_and_the_rest_refuses_trailing_bytes() {
    let (vm, memory) = split();
    let mut bytes = Vec::new();
    write_vm_ranges(&mut bytes, &vm, &borrowed(&memory)).unwrap();
    let mut r = &bytes[..];
    let (head, _) = read_head(&mut r).unwrap();
    assert_eq!(head, vm, "everything but memory");
    bytes.push(0);
    let (_, result) = read_into_sink(&bytes);
    assert!(matches!(result, Err(Error::Trailing { .. })), "{result:?}");
    let mut r = &bytes[..];
    let (_, rest) = read_head(&mut r).unwrap();
    rest.memory_until_end(|_, _| Ok(())).unwrap();
    assert_eq!(r, [0], "memory_until_end leaves what follows END");
}
