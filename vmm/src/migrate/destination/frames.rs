//! Page frames into guest RAM on the destination: every run checked against RAM before any
//! page is read, the pages read straight into place, the CRC checked, ZERO runs dropped.

use std::io::Read;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use migration::pages::FrameHead;

use crate::memory::GuestMemoryMmap;
use crate::migrate::{io, proto, Error, Phase, CRC_PIECE};

/// Receives a page frame whose head has been read: checks that every run lies inside one
/// RAM region before reading any page, reads the pages straight into guest RAM, checks the
/// CRC, then zeroes the ZERO runs. The destination's vCPUs have not run yet.
pub(super) fn receive_pages(
    mem: &GuestMemoryMmap,
    regions: &[(u64, u64)],
    mut head: FrameHead,
    conn: &mut impl Read,
    phase: Phase,
) -> Result<(), Error> {
    for run in &head.runs {
        let inside = regions
            .iter()
            .any(|&(start, len)| run.gpa >= start && run.gpa + run.len() <= start + len);
        if !inside {
            return Err(Error::PagesOutsideRam {
                gpa: run.gpa,
                len: run.len(),
            });
        }
    }
    let runs = std::mem::take(&mut head.runs);
    // Round 0 fills fresh RAM, which reads as zero already: its ZERO runs need nothing.
    let round = head.round;
    for run in runs.iter().filter(|r| !r.zero) {
        let len = run.len() as usize;
        let host =
            mem.get_host_address(GuestAddress(run.gpa))
                .map_err(|_| Error::PagesOutsideRam {
                    gpa: run.gpa,
                    len: run.len(),
                })?;
        // SAFETY: the run lies inside one RAM region (checked above), so [host, host + len)
        // is within that region's mapping, which `mem` keeps alive for longer than this
        // borrow. No vCPU of this VM has run yet and nothing else in ferry holds a reference
        // into this memory (the thread building the VM only registers it with KVM), so the
        // mutable slice is the only access while it lives.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host, len) };
        // In pieces that stay in cache between the copy from the socket and the CRC.
        for piece in bytes.chunks_mut(CRC_PIECE) {
            conn.read_exact(piece)
                .map_err(io(phase, "receiving memory"))?;
            head.crc_update(piece);
        }
    }
    head.check_crc(conn)
        .map_err(|e| proto(phase, "receiving memory")(e.into()))?;
    for run in runs.iter().filter(|r| r.zero && round > 0) {
        discard(mem, run.gpa, run.len()).map_err(|_| Error::PagesOutsideRam {
            gpa: run.gpa,
            len: run.len(),
        })?;
    }
    Ok(())
}

/// Makes `[gpa, gpa + len)` of guest RAM (inside one region: checked by the caller) read as
/// zero by giving its pages back to the kernel (MADV_DONTNEED on private anonymous memory),
/// so that a ZERO run never backs RAM, however much of it the source names.
fn discard(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<(), ()> {
    let host = mem.get_host_address(GuestAddress(gpa)).map_err(|_| ())?;
    // SAFETY: the range lies inside one RAM region's private anonymous mapping (the caller
    // checked every run against the regions), which `mem` keeps mapped; MADV_DONTNEED only
    // drops its pages, which then read as zero. No vCPU of this VM runs yet and nothing
    // holds a reference into these pages.
    let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::Code;
    use crate::memory::GuestRam;
    use migration::pages::BatchWriter;
    use migration::protocol::{self, Precopy};
    use vm_memory::Bytes;

    const PAGE: u64 = crate::memory::PAGE_SIZE;

    /// A frame of round `round` carrying each `(gpa, byte)` as a page full of that byte, as
    /// a source writes it; and its head, read as the destination reads it.
    fn frame(round: u32, pages: &[(u64, u8)]) -> (std::io::Cursor<Vec<u8>>, FrameHead) {
        let mut w = BatchWriter::new();
        w.set_round(round);
        for &(gpa, byte) in pages {
            w.page_slot().fill(byte);
            w.commit_page(gpa, round == 0);
        }
        on_the_wire(w.finish().to_vec())
    }

    /// A frame's bytes as the destination meets them: its head read, its pages next.
    fn on_the_wire(bytes: Vec<u8>) -> (std::io::Cursor<Vec<u8>>, FrameHead) {
        let mut wire = std::io::Cursor::new(bytes);
        let Precopy::Pages(head) = protocol::recv_precopy(&mut wire).unwrap() else {
            panic!("not a page frame");
        };
        (wire, head)
    }

    /// Receives a frame whose head has been read into `ram`, as the driver does.
    fn receive(
        ram: &GuestRam,
        wire: &mut std::io::Cursor<Vec<u8>>,
        head: FrameHead,
        round: u32,
    ) -> Result<(), Error> {
        let phase = Phase::Memory { round };
        receive_pages(ram.memory(), &ram.regions(), head, wire, phase)
    }

    fn byte_at(ram: &GuestRam, gpa: u64) -> u8 {
        ram.memory().read_obj(GuestAddress(gpa)).unwrap()
    }

    #[test]
    fn pages_land_in_ram_and_zero_pages_of_a_later_round_are_dropped() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let (mut wire, head) = frame(0, &[(0x1000, 0xaa), (0x3000, 0x55)]);
        receive(&ram, &mut wire, head, 0).unwrap();
        let end = wire.get_ref().len() as u64;
        assert_eq!(wire.position(), end, "the frame read whole");
        assert_eq!((byte_at(&ram, 0x1000), byte_at(&ram, 0x1fff)), (0xaa, 0xaa));
        assert_eq!((byte_at(&ram, 0x2000), byte_at(&ram, 0x3000)), (0, 0x55));
        // Round 1 rewrites 0x3000 as a zero page: it reads as zero again.
        let (mut wire, head) = frame(1, &[(0x3000, 0)]);
        receive(&ram, &mut wire, head, 1).unwrap();
        assert_eq!(byte_at(&ram, 0x3000), 0);
        assert_eq!(byte_at(&ram, 0x1000), 0xaa);
    }

    #[test]
    fn a_flipped_byte_fails_the_crc_as_a_protocol_error() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let (wire, _) = frame(0, &[(0x1000, 0xaa)]);
        let mut bytes = wire.into_inner();
        let last_data = bytes.len() - 5;
        bytes[last_data] ^= 1;
        let (mut wire, head) = on_the_wire(bytes);
        let e = receive(&ram, &mut wire, head, 0).unwrap_err();
        assert_eq!(e.code(), Code::Protocol, "{e}");
    }

    #[test]
    fn a_run_outside_ram_is_refused_before_any_page_is_read() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let outside = 2 << 20;
        let (mut wire, head) = frame(0, &[(0x1000, 1), (outside, 2)]);
        let at = wire.position();
        let e = receive(&ram, &mut wire, head, 0).unwrap_err();
        assert!(
            matches!(e, Error::PagesOutsideRam { gpa, len } if gpa == outside && len == PAGE),
            "{e}"
        );
        assert_eq!(e.code(), Code::Protocol);
        assert_eq!(wire.position(), at, "no page was read");
        assert_eq!(byte_at(&ram, 0x1000), 0, "no page was written");
    }
}
