//! The stream format end to end: round trips, the golden byte file, and hostile input (every
//! truncation and single-byte flip of the golden stream, huge claimed lengths, versions,
//! order, duplicates, trailing bytes, memory ranges outside the guest).
//!
//! `FERRY_UPDATE_GOLDEN=1 cargo test -p ferry-migration --test stream` rewrites the golden
//! file of the current format version from `golden_vm()`; review the diff of
//! docs/migration-format.md with it. The golden files of earlier versions are never
//! rewritten: they are what ferry of that version wrote, and must keep reading.

use std::io::{self, Read};

use migration::stream::{self, Error, Tag, FORMAT_VERSION, MAX_RANGE_BYTES};
use migration::*;

mod fixtures;
use fixtures::{golden_vm, rich_vm};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/v3-small.bin");
/// Written by format version 2 (no VIRT sections), from `golden_vm()` without `devices`.
const GOLDEN_V2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/v2-small.bin");
/// Written by format version 1 (no GCPU section), from `golden_vm()` without `guest_cpu`.
const GOLDEN_V1: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/v1-small.bin");

fn encode(vm: &VmState) -> Vec<u8> {
    let mut out = Vec::new();
    let n = write_vm(&mut out, vm).expect("write_vm");
    assert_eq!(n, out.len() as u64, "write_vm returns the bytes written");
    out
}

fn golden_bytes() -> Vec<u8> {
    std::fs::read(GOLDEN).expect("golden file (FERRY_UPDATE_GOLDEN=1 to create it)")
}

/// Every golden file: the current version's, version 2's and version 1's.
fn goldens() -> [Vec<u8>; 3] {
    [
        golden_bytes(),
        std::fs::read(GOLDEN_V2).expect("the version 2 golden file"),
        std::fs::read(GOLDEN_V1).expect("the version 1 golden file"),
    ]
}

/// A section of a stream: its tag and its byte range, frame header to CRC.
struct Sec {
    tag: [u8; 4],
    start: usize,
    end: usize,
}

/// Walks the section frames of a well-formed stream.
fn sections(bytes: &[u8]) -> Vec<Sec> {
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

fn sec<'a>(secs: &'a [Sec], tag: &[u8; 4]) -> &'a Sec {
    secs.iter()
        .find(|s| &s.tag == tag)
        .expect("section present")
}

/// A section frame built by hand from the documented layout.
fn frame(tag: &[u8; 4], version: u16, payload: &[u8]) -> Vec<u8> {
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
fn golden_with_tail(tail: &[Vec<u8>]) -> Vec<u8> {
    let bytes = golden_bytes();
    let secs = sections(&bytes);
    let memr = sec(&secs, b"MEMR");
    let mut out = bytes[..memr.start].to_vec();
    tail.iter().for_each(|f| out.extend(f));
    out
}

fn memr_payload(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut p = (ranges.len() as u32).to_le_bytes().to_vec();
    for &(gpa, len) in ranges {
        p.extend(gpa.to_le_bytes());
        p.extend(len.to_le_bytes());
        p.extend(vec![0xa5; len as usize]);
    }
    p
}

#[test]
fn rich_vm_round_trips_exactly() {
    let vm = rich_vm();
    let bytes = encode(&vm);
    assert_eq!(decode_vm(&bytes).unwrap(), vm);
}

/// A reader that hands out at most 7 bytes per call.
struct Trickle<'a>(&'a [u8]);

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.0.len()).min(7);
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn read_vm_handles_short_reads_and_until_end_leaves_the_rest() {
    let vm = rich_vm();
    let bytes = encode(&vm);
    assert_eq!(read_vm(&mut Trickle(&bytes)).unwrap(), vm);
    let mut more = bytes.clone();
    more.extend(b"NEXT");
    let mut r = &more[..];
    assert_eq!(read_vm_until_end(&mut r).unwrap(), vm);
    assert_eq!(r, b"NEXT", "nothing after END is read");
}

#[test]
fn golden_file_matches_write_vm_byte_for_byte() {
    let bytes = encode(&golden_vm());
    if std::env::var_os("FERRY_UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::write(GOLDEN, &bytes).unwrap();
    }
    let golden = golden_bytes();
    assert!(golden.len() < 16 * 1024, "golden is {} bytes", golden.len());
    assert!(golden == bytes, "write_vm output differs from {GOLDEN}");
    assert_eq!(decode_vm(&golden).unwrap(), golden_vm());
    let tags: Vec<[u8; 4]> = sections(&golden).iter().map(|s| s.tag).collect();
    let want = [
        b"CONF", b"CPUP", b"GCPU", b"VCPU", b"VCPU", b"IRQC", b"SERL", b"VIRT", b"VIRT", b"MEMR",
        b"END\0",
    ];
    assert_eq!(tags, want.map(|t| *t));
    assert_eq!(golden[8..12], FORMAT_VERSION.to_le_bytes());
}

#[test]
fn a_version_2_stream_still_reads_without_devices() {
    let [_, v2, _] = goldens();
    assert_eq!(v2[8..12], 2u32.to_le_bytes(), "the file is version 2");
    let mut want = golden_vm();
    want.devices.clear();
    assert_eq!(decode_vm(&v2).unwrap(), want);
    // The same state written today differs only by the version.
    let now = encode(&want);
    assert_eq!(now[8..12], FORMAT_VERSION.to_le_bytes());
    assert_eq!(
        now[12..],
        v2[12..],
        "no devices: every section as version 2 wrote it"
    );
}

#[test]
fn a_virt_section_in_a_version_2_stream_is_refused() {
    let mut bytes = golden_bytes();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let err = decode_vm(&bytes).unwrap_err();
    assert!(
        matches!(err, Error::NotInVersion { version: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("VIRT"), "{err}");
}

#[test]
fn a_device_with_more_queues_than_the_cap_or_a_bad_flag_is_refused() {
    let mut vm = golden_vm();
    vm.devices[0].queues = vec![QueueState::default(); 17];
    let err = write_vm(&mut Vec::new(), &vm).unwrap_err();
    assert!(err.to_string().contains("virtio queues"), "{err}");
    // The broken flag of the network card (its byte just before the queue count) as 2.
    let bytes = golden_bytes();
    let secs = sections(&bytes);
    let net = secs.iter().filter(|s| &s.tag == b"VIRT").nth(1).unwrap();
    let mut payload = bytes[net.start + 16..net.end - 4].to_vec();
    let flag = payload.len() - 4 - 2 * 35 - 1;
    assert_eq!(payload[flag], 1, "the broken flag");
    payload[flag] = 2;
    let mut forged = bytes[..net.start].to_vec();
    forged.extend(frame(b"VIRT", 1, &payload));
    forged.extend(&bytes[net.end..]);
    let err = decode_vm(&forged).unwrap_err();
    assert!(err.to_string().contains("not a flag"), "{err}");
}

#[test]
fn a_version_1_stream_still_reads_without_a_guest_cpu() {
    let [_, _, v1] = goldens();
    assert_eq!(v1[8..12], 1u32.to_le_bytes(), "the file is version 1");
    let mut want = golden_vm();
    want.guest_cpu = None;
    want.devices.clear();
    assert_eq!(decode_vm(&v1).unwrap(), want);
    // The same state written today differs only by the version and the GCPU section.
    let now = encode(&want);
    assert_eq!(now[8..12], FORMAT_VERSION.to_le_bytes());
    assert_eq!(
        now[12..],
        v1[12..],
        "no GCPU: every section as version 1 wrote it"
    );
}

#[test]
fn a_gcpu_section_in_a_version_1_stream_is_refused() {
    let mut bytes = golden_bytes();
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let err = decode_vm(&bytes).unwrap_err();
    assert!(
        matches!(err, Error::NotInVersion { version: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("GCPU"), "{err}");
}

#[test]
fn every_truncation_is_an_error() {
    for golden in goldens() {
        for len in 0..golden.len() {
            match decode_vm(&golden[..len]) {
                Err(Error::Truncated { .. }) => {}
                other => panic!("prefix of {len} bytes: {other:?}"),
            }
        }
    }
}

#[test]
fn every_single_byte_flip_is_an_error() {
    for golden in goldens() {
        let mut bytes = golden.clone();
        for i in 0..golden.len() {
            for x in [0x01, 0xff] {
                bytes[i] ^= x;
                // A version flipped to another readable version is refused by what follows,
                // except a later one that only added sections this stream does not use
                // (version 2 read as 3: no VIRT sections, nothing else differs).
                let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
                let file_version = u32::from_le_bytes(golden[8..12].try_into().unwrap());
                if (8..12).contains(&i)
                    && version > file_version
                    && version <= stream::NEWEST_FORMAT_VERSION
                {
                    assert!(decode_vm(&bytes).is_ok(), "byte {i} ^ {x:#x}");
                    bytes[i] ^= x;
                    continue;
                }
                assert!(decode_vm(&bytes).is_err(), "byte {i} ^ {x:#x} decoded");
                bytes[i] ^= x;
            }
        }
    }
}

#[test]
fn huge_claimed_lengths_fail_fast_with_too_large() {
    let golden = golden_bytes();
    for s in sections(&golden) {
        let mut bytes = golden.clone();
        bytes[s.start + 8..s.start + 16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        match decode_vm(&bytes) {
            Err(Error::TooLarge { len, .. }) => assert_eq!(len, 1 << 60),
            other => panic!("{}: {other:?}", String::from_utf8_lossy(&s.tag)),
        }
    }
    // A claimed 2^60-byte MEMR range inside a well-framed section: refused by the decoder's
    // cap before allocating.
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend(0x1000u64.to_le_bytes());
    p.extend((1u64 << 60).to_le_bytes());
    let bytes = golden_with_tail(&[frame(b"MEMR", 1, &p)]);
    let err = decode_vm(&bytes).unwrap_err();
    assert!(
        matches!(&err, Error::Codec { tag, source: migration::codec::Error::TooLarge { len, cap, .. } }
            if *tag == Tag::MEMR && *len == 1 << 60 && *cap == MAX_RANGE_BYTES),
        "{err}"
    );
}

#[test]
fn other_format_versions_are_refused_naming_both() {
    let mut bytes = golden_bytes();
    bytes[8..12].copy_from_slice(&5u32.to_le_bytes());
    let err = decode_vm(&bytes).unwrap_err();
    assert!(matches!(err, Error::Version { found: 5 }));
    assert_eq!(
        err.to_string(),
        "stream format version 5, this ferry reads versions 1 to 4"
    );
    assert_eq!(FORMAT_VERSION, 3);
    assert_eq!(stream::NEWEST_FORMAT_VERSION, 4);
    for v in [0u32, 7, u32::MAX] {
        bytes[8..12].copy_from_slice(&v.to_le_bytes());
        let err = decode_vm(&bytes).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("stream format version {v}, this ferry reads versions 1 to 4")
        );
    }
    // Version 4 only added MEMI: the version 3 golden stream read as version 4 is the same.
    bytes[8..12].copy_from_slice(&4u32.to_le_bytes());
    assert_eq!(decode_vm(&bytes).unwrap(), golden_vm());
}

#[test]
fn header_magic_and_flags_are_checked() {
    let mut bytes = golden_bytes();
    bytes[0] = b'X';
    assert!(matches!(decode_vm(&bytes), Err(Error::BadMagic { .. })));
    let mut bytes = golden_bytes();
    bytes[12] = 1;
    assert!(matches!(decode_vm(&bytes), Err(Error::Flags(1))));
}

#[test]
fn trailing_bytes_after_end_are_refused() {
    let mut bytes = golden_bytes();
    let len = bytes.len() as u64;
    bytes.push(0);
    assert!(matches!(decode_vm(&bytes), Err(Error::Trailing { offset }) if offset == len));
}

#[test]
fn duplicate_and_out_of_order_sections_are_refused() {
    let golden = golden_bytes();
    let secs = sections(&golden);
    let cpup = sec(&secs, b"CPUP");
    let mut dup = golden[..cpup.end].to_vec();
    dup.extend(&golden[cpup.start..]);
    let err = decode_vm(&dup).unwrap_err();
    assert!(
        matches!(err, Error::Duplicate { tag, .. } if tag == Tag::CPUP),
        "{err}"
    );

    let (irqc, serl) = (sec(&secs, b"IRQC"), sec(&secs, b"SERL"));
    let mut swapped = golden[..irqc.start].to_vec();
    swapped.extend(&golden[serl.start..serl.end]);
    swapped.extend(&golden[irqc.start..irqc.end]);
    swapped.extend(&golden[serl.end..]);
    let err = decode_vm(&swapped).unwrap_err();
    assert!(
        matches!(err, Error::Order { expected: "IRQC", found, .. } if found == Tag::SERL),
        "{err}"
    );

    // CONF missing: the stream opens with CPUP.
    let mut missing = golden[..16].to_vec();
    missing.extend(&golden[cpup.start..]);
    let err = decode_vm(&missing).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Order {
                expected: "CONF",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn vcpu_sections_must_match_config_in_count_and_id_order() {
    let golden = golden_bytes();
    let secs = sections(&golden);
    let vcpus: Vec<&Sec> = secs.iter().filter(|s| &s.tag == b"VCPU").collect();
    let (v0, v1) = (vcpus[0], vcpus[1]);
    let mut one = golden[..v1.start].to_vec();
    one.extend(&golden[v1.end..]);
    let err = decode_vm(&one).unwrap_err();
    assert!(
        matches!(
            err,
            Error::VcpuCount {
                expected: 2,
                found: 1
            }
        ),
        "{err}"
    );

    let mut three = golden[..v1.end].to_vec();
    three.extend(&golden[v1.start..]);
    let err = decode_vm(&three).unwrap_err();
    assert!(
        matches!(
            err,
            Error::VcpuCount {
                expected: 2,
                found: 3
            }
        ),
        "{err}"
    );

    let mut swapped = golden[..v0.start].to_vec();
    swapped.extend(&golden[v1.start..v1.end]);
    swapped.extend(&golden[v0.start..v0.end]);
    swapped.extend(&golden[v1.end..]);
    let err = decode_vm(&swapped).unwrap_err();
    assert!(
        matches!(
            err,
            Error::VcpuId {
                expected: 0,
                found: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn frame_fields_are_checked() {
    let golden = golden_bytes();
    let conf = sections(&golden)[0].start;
    let refuse = |patch: &dyn Fn(&mut Vec<u8>)| {
        let mut b = golden.clone();
        patch(&mut b);
        decode_vm(&b).unwrap_err()
    };
    let err = refuse(&|b| b[conf..conf + 4].copy_from_slice(b"WHAT"));
    assert!(matches!(err, Error::UnknownTag { offset: 16, .. }), "{err}");
    assert_eq!(err.to_string(), "unknown section tag WHAT at offset 16");
    let err = refuse(&|b| b[conf + 4] = 2);
    assert!(
        matches!(
            err,
            Error::SectionVersion {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = refuse(&|b| b[conf + 6] = 1);
    assert!(matches!(err, Error::Reserved { value: 1, .. }), "{err}");
    let err = refuse(&|b| b[conf + 16] ^= 0x80);
    assert!(
        matches!(err, Error::Crc { tag, .. } if tag == Tag::CONF),
        "{err}"
    );
    // A frame with a valid CRC but a payload longer than its fields: trailing payload bytes.
    let secs = sections(&golden);
    let end = sec(&secs, b"END\0");
    let mut b = golden[..end.start].to_vec();
    b.extend(frame(b"END\0", 1, b"x"));
    assert!(matches!(
        decode_vm(&b),
        Err(Error::TooLarge { len: 1, cap: 0, .. })
    ));
}

#[test]
fn memory_ranges_outside_the_rules_are_refused() {
    let end = frame(b"END\0", 1, &[]);
    let memory = 64u64 << 20;
    let cases: [(&[(u64, u64)], &str); 5] = [
        (&[(memory + (4 << 30), 4096)], "ends beyond guest memory"),
        (&[(0x1800, 4096)], "not page aligned"),
        (&[(0x2000, 4096), (0x1000, 4096)], "must ascend"),
        (&[(0x2000, 8192), (0x3000, 4096)], "must ascend"),
        (&[], "no ranges"),
    ];
    for (ranges, why) in cases {
        let bytes = golden_with_tail(&[frame(b"MEMR", 1, &memr_payload(ranges)), end.clone()]);
        let err = decode_vm(&bytes).unwrap_err().to_string();
        assert!(err.contains(why), "{ranges:x?}: {err}");
    }
    // Each range fine, together more than config.memory.
    let big = (memory / 2 + 4096, 0);
    let p = memr_payload(&[(0, big.0)]);
    let q = memr_payload(&[(big.0, big.0)]);
    let bytes = golden_with_tail(&[frame(b"MEMR", 1, &p), frame(b"MEMR", 1, &q), end.clone()]);
    let err = decode_vm(&bytes).unwrap_err().to_string();
    assert!(err.contains("more bytes than config.memory"), "{err}");
    // The writer refuses the same state.
    let mut vm = golden_vm();
    vm.memory[0].gpa = memory + (4 << 30);
    let err = write_vm(&mut Vec::new(), &vm).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(
        err.to_string().contains("ends beyond guest memory"),
        "{err}"
    );
}

#[test]
fn writer_refuses_states_the_reader_would_refuse() {
    let refuse = |f: &dyn Fn(&mut VmState), why: &str| {
        let mut vm = golden_vm();
        f(&mut vm);
        let mut out = Vec::new();
        let err = write_vm(&mut out, &vm).unwrap_err();
        assert!(out.is_empty(), "nothing written for {why}");
        assert!(err.to_string().contains(why), "{why}: {err}");
        assert!(stream::validate(&vm).is_err());
    };
    refuse(&|vm| *vm = VmState::default(), "config.vcpus 0");
    refuse(
        &|vm| {
            vm.vcpus.pop();
        },
        "1 VCPU sections",
    );
    refuse(&|vm| vm.vcpus[1].id = 5, "carries vCPU id 5");
    refuse(&|vm| vm.vcpus[0].lapic.push(0), "lapic: 1025 bytes");
    refuse(&|vm| vm.irqchip.ioapic.clear(), "IOAPIC state: 0 bytes");
    refuse(
        &|vm| vm.vcpus[0].msrs.push((0x10, 1)),
        "MSR 0x10 appears more than once",
    );
    refuse(&|vm| vm.vcpus[0].xsave.xstate_bv |= 1 << 5, "not carried");
    refuse(
        &|vm| vm.vcpus[0].xsave.components.swap(0, 1),
        "indices must ascend",
    );
    refuse(
        &|vm| {
            vm.vcpus[0].xsave.components[1].bytes.pop();
        },
        "255 bytes",
    );
    refuse(
        &|vm| {
            vm.vcpus[1].xsave.components.remove(1);
        },
        "components 0 (x87) and 1 (SSE) are always carried",
    );
    refuse(&|vm| vm.config.memory = (1 << 40) + 1, "config.memory");
    refuse(
        &|vm| vm.serial.in_buffer = vec![0; 65537],
        "serial input buffer",
    );
}

#[test]
fn error_messages_are_one_line() {
    let golden = golden_bytes();
    let mut errors = Vec::new();
    for len in [0, 10, 20, 100, 3000] {
        errors.push(decode_vm(&golden[..len]).unwrap_err());
    }
    for i in (0..golden.len()).step_by(97) {
        let mut b = golden.clone();
        b[i] ^= 0xff;
        errors.push(decode_vm(&b).unwrap_err());
    }
    for e in errors {
        let s = e.to_string();
        assert!(!s.is_empty() && !s.contains('\n'), "{s:?}");
    }
}
