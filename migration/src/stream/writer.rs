//! Writing the stream: the header and every section before memory, then memory as MEMR
//! sections (borrowed from wherever it lies) or as MEMI images in a snapshot file, then END.
//! The state is checked with the reader's rules first, so nothing is written that the
//! reader refuses.

use std::io::{self, Seek, Write};

use super::error::too_large;
use super::{image, invalid_input, rules, validate, Error, Tag};
use crate::codec::{self, Encoder};
use crate::limits::*;
use crate::records::{enc_config, enc_guest_cpu, enc_irqchip, enc_serial, enc_vcpu, enc_virtio};
use crate::state::*;

/// Writes `vm` as a stream: header, sections, END. Memory ranges longer than
/// [`MAX_RANGE_BYTES`] are split into several ranges (so they read back split). Returns the
/// bytes written. A state the reader would refuse (see [`validate`]) is an `InvalidInput`
/// error wrapping [`Error`], and nothing is written. Writes are many and small: give it a
/// `BufWriter` around a file or socket.
pub fn write_vm(w: &mut impl Write, vm: &VmState) -> io::Result<u64> {
    let memory: Vec<(u64, &[u8])> = vm.memory.iter().map(|r| (r.gpa, &r.data[..])).collect();
    write_parts(w, vm, &memory, MAX_RANGE_BYTES as usize)
}

/// The most memory bytes in one MEMR section [`write_vm_ranges`] writes: what a reader
/// holds at a time when it reads that stream back ([`Rest::memory`]).
pub const RANGES_SECTION_BYTES: u64 = 4 << 20;

/// Writes `vm` as [`write_vm`] does, with `memory` as its memory ranges: borrowed from
/// wherever they lie (guest RAM, for a snapshot), so that nothing copies them first.
/// `vm.memory` must be empty; the ranges are checked as [`validate`] checks `vm.memory`,
/// and nothing is written when they fail. MEMR sections hold at most
/// [`RANGES_SECTION_BYTES`] each.
pub fn write_vm_ranges(
    w: &mut impl Write,
    vm: &VmState,
    memory: &[(u64, &[u8])],
) -> io::Result<u64> {
    if !vm.memory.is_empty() {
        return Err(invalid_input(Error::MemoryInState("write_vm_ranges")));
    }
    write_parts(w, vm, memory, RANGES_SECTION_BYTES as usize)
}

/// The writer behind [`write_vm`] and [`write_vm_ranges`]: ranges split into pieces of at
/// most `section` bytes, sections of at most `section` bytes.
fn write_parts(
    w: &mut impl Write,
    vm: &VmState,
    memory: &[(u64, &[u8])],
    section: usize,
) -> io::Result<u64> {
    validate(vm).map_err(invalid_input)?;
    let mut check = rules::MemCheck::new(&vm.config);
    for (gpa, data) in memory {
        check
            .range(*gpa, data.len() as u64)
            .map_err(invalid_input)?;
    }
    let mut n = write_head(w, vm, FORMAT_VERSION)?;
    for pieces in memr_sections(memory, section, MAX_MEMR_RANGES as usize) {
        let count = encode(|e| e.count_u32("MEMR count", pieces.len(), MAX_MEMR_RANGES))?;
        let heads: Vec<[u8; 16]> = pieces
            .iter()
            .map(|(gpa, data)| range_head(*gpa, data))
            .collect();
        let mut parts: Vec<&[u8]> = vec![&count];
        for (head, (_, data)) in heads.iter().zip(&pieces) {
            parts.push(head);
            parts.push(data);
        }
        n += write_section(w, Tag::MEMR, &parts)?;
    }
    n += write_section(w, Tag::END, &[])?;
    Ok(n)
}

/// Writes `vm` (no memory ranges of its own) as a snapshot file in format version 4: its
/// memory as one MEMI image per RAM region of `regions` (gpa, length: ascending, together
/// config.memory), each page aligned in the file so that a restore can map it, the pages
/// outside `memory` (the non-zero extents, ascending, each inside one region) left as
/// holes, which take no disk. `w` is positioned where the stream starts; the file must not
/// hold data past it (holes read as zero). Returns the stream's length.
pub fn write_vm_image<W: Write + Seek>(
    w: &mut W,
    vm: &VmState,
    regions: &[(u64, u64)],
    memory: &[(u64, &[u8])],
) -> io::Result<u64> {
    if !vm.memory.is_empty() {
        return Err(invalid_input(Error::MemoryInState("write_vm_image")));
    }
    validate(vm).map_err(invalid_input)?;
    let mut check = rules::MemCheck::new(&vm.config);
    for (gpa, len) in regions {
        check.range(*gpa, *len).map_err(invalid_input)?;
    }
    let pieces = memr_sections(memory, RANGES_SECTION_BYTES as usize, 1)
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    let mut rest = &pieces[..];
    let mut per_region = Vec::new();
    for &(gpa, len) in regions {
        let inside = rest
            .iter()
            .take_while(|(at, d)| *at >= gpa && at + d.len() as u64 <= gpa + len)
            .count();
        per_region.push(&rest[..inside]);
        rest = &rest[inside..];
    }
    if let Some((gpa, data)) = rest.first() {
        let why = "is not inside one RAM region, or the extents do not ascend";
        return Err(invalid_input(Error::Memory {
            gpa: *gpa,
            len: data.len() as u64,
            why,
        }));
    }
    let base = w.stream_position()?;
    let mut n = write_head(w, vm, IMAGE_FORMAT_VERSION)?;
    for (region, extents) in regions.iter().zip(per_region) {
        n += image::write_image(w, base, n, *region, extents)?;
    }
    n += write_section(w, Tag::END, &[])?;
    Ok(n)
}

/// Writes the stream header (format `version`) and every section before memory; returns
/// the bytes written.
fn write_head(w: &mut impl Write, vm: &VmState, version: u32) -> io::Result<u64> {
    let mut head = Encoder::new();
    head.bytes(&MAGIC);
    head.u32(version);
    head.u32(0);
    w.write_all(head.as_slice())?;
    let mut n = HEADER_SIZE;
    n += write_section(w, Tag::CONF, &[&encode(|e| enc_config(e, &vm.config))?])?;
    let profile = encode(|e| e.str_u32("cpu profile", &vm.cpu_profile, MAX_PROFILE_JSON))?;
    n += write_section(w, Tag::CPUP, &[&profile])?;
    if let Some(g) = &vm.guest_cpu {
        n += write_section(w, Tag::GCPU, &[&encode(|e| enc_guest_cpu(e, g))?])?;
    }
    for vcpu in &vm.vcpus {
        n += write_section(w, Tag::VCPU, &[&encode(|e| enc_vcpu(e, vcpu))?])?;
    }
    n += write_section(w, Tag::IRQC, &[&encode(|e| enc_irqchip(e, &vm.irqchip))?])?;
    n += write_section(w, Tag::SERL, &[&encode(|e| enc_serial(e, &vm.serial))?])?;
    for device in &vm.devices {
        n += write_section(w, Tag::VIRT, &[&encode(|e| enc_virtio(e, device))?])?;
    }
    Ok(n)
}

/// Runs an encoder function into a fresh buffer.
fn encode(f: impl FnOnce(&mut Encoder) -> Result<(), codec::Error>) -> io::Result<Vec<u8>> {
    let mut e = Encoder::new();
    f(&mut e).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(e.into_inner())
}

/// Writes one section whose payload is `parts` concatenated; returns the bytes written.
fn write_section(w: &mut impl Write, tag: Tag, parts: &[&[u8]]) -> io::Result<u64> {
    let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let cap = tag.payload_cap().unwrap_or(0);
    if len > cap {
        return Err(invalid_input(too_large(tag.payload_name(), len, cap)));
    }
    let mut head = Encoder::new();
    head.bytes(&tag.0);
    head.u16(SECTION_VERSION);
    head.u16(0);
    head.u64(len);
    let mut crc = crc32fast::Hasher::new();
    crc.update(head.as_slice());
    w.write_all(head.as_slice())?;
    for part in parts {
        crc.update(part);
        w.write_all(part)?;
    }
    w.write_all(&crc.finalize().to_le_bytes())?;
    Ok(FRAME_HEADER_SIZE + len + CRC_SIZE)
}

/// A memory range's (gpa, length) as written before its bytes.
fn range_head(gpa: u64, data: &[u8]) -> [u8; 16] {
    let mut e = Encoder::new();
    e.u64(gpa);
    e.u64(data.len() as u64);
    let mut out = [0u8; 16];
    out.copy_from_slice(e.as_slice());
    out
}

/// Splits `ranges` into pieces of at most `max_range` bytes and groups the pieces into
/// sections of at most `max_range` bytes and `max_count` pieces, in order.
fn memr_sections<'a>(
    ranges: &[(u64, &'a [u8])],
    max_range: usize,
    max_count: usize,
) -> Vec<Vec<(u64, &'a [u8])>> {
    let mut sections = Vec::new();
    let mut cur: Vec<(u64, &'a [u8])> = Vec::new();
    let mut cur_bytes = 0usize;
    for &(mut gpa, data) in ranges {
        for chunk in data.chunks(max_range.max(1)) {
            if !cur.is_empty() && (cur_bytes + chunk.len() > max_range || cur.len() >= max_count) {
                sections.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
            cur.push((gpa, chunk));
            cur_bytes += chunk.len();
            gpa = gpa.saturating_add(chunk.len() as u64);
        }
    }
    if !cur.is_empty() {
        sections.push(cur);
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memr_sections_split_ranges_and_group_pieces() {
        let ranges: [(u64, &[u8]); 3] = [(0, &[1; 5]), (100, &[2; 2]), (200, &[3; 1])];
        let s = memr_sections(&ranges, 2, 2);
        let got: Vec<Vec<(u64, usize)>> = s
            .iter()
            .map(|sec| sec.iter().map(|(g, d)| (*g, d.len())).collect())
            .collect();
        assert_eq!(
            got,
            vec![
                vec![(0, 2)],
                vec![(2, 2)],
                vec![(4, 1)],
                vec![(100, 2)],
                vec![(200, 1)]
            ]
        );
        let s = memr_sections(&ranges, 4, 2);
        let got: Vec<usize> = s.iter().map(|sec| sec.len()).collect();
        assert_eq!(got, vec![1, 2, 1], "[0..4] [4..5, 100..102] [200..201]");
        assert!(memr_sections(&[], 4, 2).is_empty());
    }
}
