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
use std::io::{self, Read, Seek};

mod error;
mod image;
mod reader;
mod rules;
mod writer;

use crate::records::{DEBUG_SIZE, EVENTS_SIZE, PAIR_SIZE, REGS_SIZE, SREGS_SIZE};
use crate::state::*;

pub use crate::limits::*;
pub use error::Error;
pub use image::Image;
pub use reader::Announced;
use reader::{Images, Input};
pub use rules::validate;
pub use writer::{write_vm, write_vm_image, write_vm_ranges, RANGES_SECTION_BYTES};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_display_escaped() {
        assert_eq!(Tag::END.to_string(), "END\\x00");
        assert_eq!(Tag(*b"AB\xffC").to_string(), "AB\\xffC");
    }
}
