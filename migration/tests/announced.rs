//! A destination reads the VM stream as the machine its Hello announced
//! (`read_head_as`): a stream whose config, CPU profile or device count differs is refused
//! as soon as the section that differs arrives, before any vCPU or device state beyond the
//! announced machine is read (so never held).

use std::io::{self, Read};

use migration::*;

mod fixtures;
use fixtures::rich_vm;

/// A reader that counts the bytes taken from it.
struct Counting<'a> {
    bytes: &'a [u8],
    taken: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (&self.bytes[self.taken..]).read(buf)?;
        self.taken += n;
        Ok(n)
    }
}

/// The offset of the first frame with `tag` in a well-formed stream.
fn first(bytes: &[u8], tag: &[u8; 4]) -> usize {
    let mut pos = 16;
    while &bytes[pos..pos + 4] != tag {
        let len = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().unwrap()) as usize;
        pos += 16 + len + 4;
    }
    pos
}

#[test]
fn a_stream_of_the_announced_machine_reads_and_any_other_stops_early() {
    let vm = rich_vm();
    let mut bytes = Vec::new();
    write_vm(&mut bytes, &vm).unwrap();
    let right = Announced {
        memory: vm.config.memory,
        vcpus: vm.config.vcpus,
        cpu_profile: &vm.cpu_profile,
        devices: vm.devices.len(),
    };
    let mut r = Counting {
        bytes: &bytes,
        taken: 0,
    };
    let (state, _) = read_head_as(&mut r, &right).unwrap();
    assert_eq!(state.vcpus.len(), vm.vcpus.len());

    let vcpu = first(&bytes, b"VCPU");
    let virt = first(&bytes, b"VIRT");
    let cases = [
        (Announced { vcpus: 1, ..right }, "vCPU count is 2", vcpu),
        (
            Announced {
                memory: 4096,
                ..right
            },
            "guest RAM",
            vcpu,
        ),
        (
            Announced {
                cpu_profile: "{}",
                ..right
            },
            "CPU profile",
            vcpu,
        ),
        (
            Announced {
                devices: 0,
                ..right
            },
            "device count is 1",
            virt + 16,
        ),
    ];
    for (announced, what, before) in cases {
        let mut r = Counting {
            bytes: &bytes,
            taken: 0,
        };
        let err = read_head_as(&mut r, &announced).unwrap_err().to_string();
        assert!(
            err.contains("the Hello announced") || err.contains("Hello's"),
            "{err}"
        );
        assert!(err.contains(what), "{what}: {err}");
        assert!(
            r.taken <= before,
            "{what}: read {} bytes, past {before}",
            r.taken
        );
    }
}
