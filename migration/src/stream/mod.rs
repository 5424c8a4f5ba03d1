//! The snapshot / migration stream: a header, then tagged, versioned, length-framed and
//! CRC-checked sections carrying a whole [`VmState`]. Byte tables: docs/migration-format.md.
//!
//! ```text
//! "FERRYVM\0" | version u32 | flags u32
//! CONF | CPUP | [GCPU] | VCPU x config.vcpus (id 0..n) | IRQC | SERL | VIRT x 0.. | MEMR x 0..
//!   | END
//! each section: tag [4] | version u16 | reserved u16 | length u64 | payload | CRC32 u32
//! ```
//!
//! Invariants:
//! - the reader reads one section at a time; a payload is read only after its length has
//!   been checked against that section's cap, and nothing is allocated ahead of the bytes
//!   that actually arrive by more than 1 MiB or the bytes already read;
//! - anything unexpected (tag, order, count, version, reserved field, CRC, cap, range,
//!   trailing byte) is an [`Error`] naming it; nothing panics on input;
//! - every format version from [`OLDEST_FORMAT_VERSION`] to [`FORMAT_VERSION`] reads (GCPU
//!   exists from version 2 on, VIRT from version 3 on); any other version is refused by the
//!   header alone;
//! - the writer validates the state with the same rules first ([`validate`]), so it never
//!   writes a stream the reader refuses.

use std::fmt;
use std::io::{self, Read, Seek, Write};

mod error;
mod image;
mod reader;
mod rules;

use crate::codec::{self, Encoder};
use crate::records::{enc_config, enc_guest_cpu, enc_irqchip, enc_serial, enc_vcpu, enc_virtio};
use crate::records::{DEBUG_SIZE, EVENTS_SIZE, PAIR_SIZE, REGS_SIZE, SREGS_SIZE};
use crate::state::*;

pub use crate::limits::*;
use error::too_large;
pub use error::Error;
pub use image::Image;
pub use reader::Announced;
use reader::{Images, Input};
pub use rules::validate;

/// Payload caps per section: the largest payload the field caps allow.
const CONF_CAP: u64 = 8 + 4 + 4 + MAX_CMDLINE as u64;
const CPUP_CAP: u64 = 4 + MAX_PROFILE_JSON as u64;
const XSAVE_CAP: u64 = 8 + 4 + MAX_XSAVE_COMPONENTS as u64 * (8 + MAX_XSAVE_COMPONENT as u64);
const VCPU_CAP: u64 = 4
    + REGS_SIZE
    + SREGS_SIZE
    + XSAVE_CAP
    + 4
    + MAX_XCRS as u64 * PAIR_SIZE
    + DEBUG_SIZE
    + 4
    + LAPIC_SIZE as u64
    + 4
    + EVENTS_SIZE
    + 4
    + MAX_MSRS as u64 * PAIR_SIZE;
const IRQC_CAP: u64 = 3 * (4 + IRQCHIP_SIZE as u64) + 4 + MAX_PIT as u64 + 8 + 4;
const SERL_CAP: u64 = 9 + 4 + MAX_SERIAL_INPUT as u64;
const MEMR_CAP: u64 = 4 + MAX_MEMR_RANGES as u64 * 16 + MAX_RANGE_BYTES;

/// A section tag: four ASCII bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub [u8; 4]);

impl Tag {
    pub const CONF: Tag = Tag(*b"CONF");
    pub const CPUP: Tag = Tag(*b"CPUP");
    pub const GCPU: Tag = Tag(*b"GCPU");
    pub const VCPU: Tag = Tag(*b"VCPU");
    pub const IRQC: Tag = Tag(*b"IRQC");
    pub const SERL: Tag = Tag(*b"SERL");
    pub const VIRT: Tag = Tag(*b"VIRT");
    pub const MEMR: Tag = Tag(*b"MEMR");
    pub const MEMI: Tag = Tag(*b"MEMI");
    pub const END: Tag = Tag(*b"END\0");

    /// The position of this tag in the required order; None for an unknown tag.
    pub(crate) fn rank(self) -> Option<u8> {
        const ORDER: [Tag; 10] = [
            Tag::CONF,
            Tag::CPUP,
            Tag::GCPU,
            Tag::VCPU,
            Tag::IRQC,
            Tag::SERL,
            Tag::VIRT,
            Tag::MEMR,
            Tag::MEMI,
            Tag::END,
        ];
        ORDER.iter().position(|t| *t == self).map(|i| i as u8)
    }

    /// The most payload bytes a section with this tag may hold; None for an unknown tag.
    pub fn payload_cap(self) -> Option<u64> {
        Some(match self {
            Tag::CONF => CONF_CAP,
            Tag::CPUP => CPUP_CAP,
            Tag::GCPU => MAX_GUEST_CPU,
            Tag::VCPU => VCPU_CAP,
            Tag::IRQC => IRQC_CAP,
            Tag::SERL => SERL_CAP,
            Tag::VIRT => MAX_VIRTIO_STATE,
            Tag::MEMR => MEMR_CAP,
            Tag::END => 0,
            _ => return None,
        })
    }

    pub(crate) fn payload_name(self) -> &'static str {
        match self {
            Tag::CONF => "CONF payload",
            Tag::CPUP => "CPUP payload",
            Tag::GCPU => "GCPU payload",
            Tag::VCPU => "VCPU payload",
            Tag::IRQC => "IRQC payload",
            Tag::SERL => "SERL payload",
            Tag::VIRT => "VIRT payload",
            Tag::MEMR => "MEMR payload",
            Tag::MEMI => "MEMI payload",
            Tag::END => "END payload",
            _ => "section payload",
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            if b.is_ascii_graphic() {
                write!(f, "{}", char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({self})")
    }
}

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
        let why = "write_vm_ranges: the state carries memory ranges of its own";
        return Err(invalid_input(Error::Invalid(why.into())));
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
        let why = "write_vm_image: the state carries memory ranges of its own";
        return Err(invalid_input(Error::Invalid(why.into())));
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

/// Reads a whole stream from `r` and requires that it ends right after END.
pub fn read_vm(r: &mut impl Read) -> Result<VmState, Error> {
    let (mut vm, rest) = read_head(r)?;
    rest.memory(collect(&mut vm.memory))?;
    Ok(vm)
}

/// Reads a stream from `r` up to and including END, and reads nothing after it (for a
/// stream embedded in a connection that carries more after it).
pub fn read_vm_until_end(r: &mut impl Read) -> Result<VmState, Error> {
    let (mut vm, rest) = read_head(r)?;
    rest.memory_until_end(collect(&mut vm.memory))?;
    Ok(vm)
}

/// A sink for [`Rest::memory`] that keeps every range.
fn collect(
    memory: &mut Vec<MemoryRange>,
) -> impl FnMut(u64, &[u8]) -> Result<(), &'static str> + '_ {
    |gpa, data| {
        memory.push(MemoryRange {
            gpa,
            data: data.to_vec(),
        });
        Ok(())
    }
}

/// Reads a stream's header and every section before its memory: the state with no memory
/// ranges, and the rest of the stream, whose memory [`Rest::memory`] hands over range by
/// range, so that a restore writes it into guest RAM without holding it all on the heap.
pub fn read_head<R: Read>(r: &mut R) -> Result<(VmState, Rest<'_, R>), Error> {
    read_head_of(r, None)
}

/// [`read_head`] of a stream that must carry the machine `announced` describes: its config,
/// CPU profile and device count are compared as each section arrives, before any vCPU or
/// device section is read, so a stream can never make the reader hold more than the
/// announced machine's state.
pub fn read_head_as<'r, R: Read>(
    r: &'r mut R,
    announced: &Announced<'_>,
) -> Result<(VmState, Rest<'r, R>), Error> {
    read_head_of(r, Some(announced))
}

fn read_head_of<'r, R: Read>(
    r: &'r mut R,
    announced: Option<&Announced<'_>>,
) -> Result<(VmState, Rest<'r, R>), Error> {
    let mut input = Input {
        r,
        offset: 0,
        version: 0,
    };
    let (vm, next) = input.head(announced)?;
    let config = vm.config.clone();
    Ok((
        vm,
        Rest {
            input,
            config,
            next,
        },
    ))
}

/// The memory sections of a stream after [`read_head`], and its END.
pub struct Rest<'r, R: Read> {
    input: Input<'r, R>,
    config: MachineConfig,
    next: reader::Frame,
}

impl<R: Read> fmt::Debug for Rest<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rest")
            .field("offset", &self.input.offset)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Rest<'_, R> {
    /// Hands every memory range to `sink`, in stream order, through END; then requires
    /// that nothing follows END. A range reaches `sink` only once its whole MEMR section
    /// has arrived, its CRC matches and every range in it passed the checks of
    /// [`validate`]; one section (at most 64 MiB plus its table) is held at a time. An
    /// error from `sink` ends the read as [`Error::Memory`] naming the range. Returns the
    /// bytes of memory handed over.
    pub fn memory(
        mut self,
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), &'static str>,
    ) -> Result<u64, Error> {
        let n = self
            .input
            .memory(&self.config, self.next, &mut Images::Read, &mut sink)?;
        Self::end(self.input, n)
    }

    /// Requires that nothing follows END in `input`; returns `n`.
    fn end(input: Input<'_, R>, n: u64) -> Result<u64, Error> {
        let mut byte = [0u8; 1];
        loop {
            return match input.r.read(&mut byte) {
                Ok(0) => Ok(n),
                Ok(_) => Err(Error::Trailing {
                    offset: input.offset,
                }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => Err(Error::Io {
                    offset: input.offset,
                    source,
                }),
            };
        }
    }

    /// As [`Rest::memory`], but reads nothing after END.
    pub fn memory_until_end(
        mut self,
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), &'static str>,
    ) -> Result<u64, Error> {
        self.input
            .memory(&self.config, self.next, &mut Images::Read, &mut sink)
    }
}

impl<R: Read + Seek> Rest<'_, R> {
    /// As [`Rest::memory`], but each MEMI image (a version 4 snapshot's memory) goes to
    /// `map` once its table passed every check, and its bytes are skipped, never read: the
    /// caller maps them from the file at [`Image::offset`] (the stream must start at
    /// offset 0 of the file for that to be the file offset). The image's bytes are not
    /// checked against the extents' CRCs. MEMR ranges still go to `sink`. Returns the
    /// bytes of memory handed over or mapped.
    pub fn memory_mapped(
        mut self,
        mut map: impl FnMut(&Image) -> Result<(), &'static str>,
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), &'static str>,
    ) -> Result<u64, Error> {
        let mut images = Images::Map {
            map: &mut map,
            skip: image::seek_over::<R>,
        };
        let n = self
            .input
            .memory(&self.config, self.next, &mut images, &mut sink)?;
        Self::end(self.input, n)
    }
}

/// Decodes a whole stream held in memory, as [`read_vm`].
pub fn decode_vm(bytes: &[u8]) -> Result<VmState, Error> {
    let mut r = bytes;
    read_vm(&mut r)
}

fn invalid_input(e: Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
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

    #[test]
    fn tags_display_escaped() {
        assert_eq!(Tag::END.to_string(), "END\\x00");
        assert_eq!(Tag(*b"AB\xffC").to_string(), "AB\\xffC");
    }
}
