//! The stream format end to end: round trips, the golden byte files of every format version
//! (each must keep reading), and versions (hostile input: tests/stream_hostile.rs).
//!
//! `FERRY_UPDATE_GOLDEN=1 cargo test -p ferry-migration --test stream` rewrites the golden
//! file of the current format version from `golden_vm()`; review the diff of
//! docs/migration-format.md with it. The golden files of earlier versions are never
//! rewritten: they are what ferry of that version wrote, and must keep reading.

use std::io::{self, Read};

use migration::stream::{self, Error, FORMAT_VERSION};
use migration::*;

mod fixtures;
mod golden_bytes;
use fixtures::{golden_vm, rich_vm};
use golden_bytes::*;

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
