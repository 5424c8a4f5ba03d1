//! The stream format against hostile input: every truncation and single-byte flip of the
//! golden streams, huge claimed lengths, order, duplicates, trailing bytes, frame fields,
//! memory ranges outside the guest, and one-line errors.

use std::io;

use migration::stream::{self, Error, Tag, MAX_RANGE_BYTES};
use migration::*;

#[allow(dead_code)] // rich_vm is for the other stream tests
mod fixtures;
mod golden_bytes;
use fixtures::golden_vm;
use golden_bytes::*;

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
