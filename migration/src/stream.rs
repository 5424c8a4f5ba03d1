//! The snapshot / migration stream: a header, then tagged, versioned, length-framed and
//! CRC-checked sections carrying a whole [`VmState`]. Byte tables: docs/migration-format.md.
//!
//! ```text
//! "FERRYVM\0" | version u32 | flags u32
//! CONF | CPUP | [GCPU] | VCPU x config.vcpus (id 0..n) | IRQC | SERL | MEMR x 0.. | END
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
//!   exists from version 2 on); any other version is refused by the header alone;
//! - the writer validates the state with the same rules first ([`validate`]), so it never
//!   writes a stream the reader refuses.

use std::fmt;
use std::io::{self, Read, Write};

use crate::codec::{self, Decoder, Encoder};
use crate::codec::{dec_config, dec_guest_cpu, dec_irqchip, dec_memr, dec_serial, dec_vcpu};
use crate::codec::{enc_config, enc_guest_cpu, enc_irqchip, enc_serial, enc_vcpu};
use crate::codec::{DEBUG_SIZE, EVENTS_SIZE, PAIR_SIZE, REGS_SIZE, SREGS_SIZE};
use crate::state::*;

pub use crate::limits::*;

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
    pub const MEMR: Tag = Tag(*b"MEMR");
    pub const END: Tag = Tag(*b"END\0");

    /// The position of this tag in the required order; None for an unknown tag.
    fn rank(self) -> Option<u8> {
        const ORDER: [Tag; 8] = [
            Tag::CONF,
            Tag::CPUP,
            Tag::GCPU,
            Tag::VCPU,
            Tag::IRQC,
            Tag::SERL,
            Tag::MEMR,
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
            Tag::MEMR => MEMR_CAP,
            Tag::END => 0,
            _ => return None,
        })
    }

    fn payload_name(self) -> &'static str {
        match self {
            Tag::CONF => "CONF payload",
            Tag::CPUP => "CPUP payload",
            Tag::GCPU => "GCPU payload",
            Tag::VCPU => "VCPU payload",
            Tag::IRQC => "IRQC payload",
            Tag::SERL => "SERL payload",
            Tag::MEMR => "MEMR payload",
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

/// Why a stream was refused (reading) or a state could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error at stream offset {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("stream truncated at offset {offset}: {what} is incomplete")]
    Truncated { offset: u64, what: &'static str },
    #[error("bad magic {found:02x?}: not a ferry VM stream")]
    BadMagic { found: [u8; 8] },
    #[error("stream format version {found}, this ferry reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("section {tag} at offset {offset} is not part of stream format version {version}")]
    NotInVersion { tag: Tag, offset: u64, version: u32 },
    #[error("stream header flags {0:#x}: no flags are defined, must be 0")]
    Flags(u32),
    #[error("unknown section tag {tag} at offset {offset}")]
    UnknownTag { tag: Tag, offset: u64 },
    #[error("section {found} at offset {offset} is out of order: expected {expected}")]
    Order {
        expected: &'static str,
        found: Tag,
        offset: u64,
    },
    #[error("duplicate section {tag} at offset {offset}")]
    Duplicate { tag: Tag, offset: u64 },
    #[error("{found} VCPU sections where the config says {expected} vCPUs")]
    VcpuCount { expected: u32, found: u32 },
    #[error("VCPU section {expected} carries vCPU id {found}; ids must be 0..n in order")]
    VcpuId { expected: u32, found: u32 },
    #[error("section {tag} version {found}, this ferry reads version {supported}")]
    SectionVersion {
        tag: Tag,
        found: u16,
        supported: u16,
    },
    #[error("section {tag} at offset {offset}: reserved field is {value:#x}, must be 0")]
    Reserved { tag: Tag, offset: u64, value: u16 },
    #[error(
        "section {tag} at offset {offset}: CRC32 {stored:#010x} stored, {computed:#010x} computed"
    )]
    Crc {
        tag: Tag,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("{what} is {len}, over the cap of {cap}")]
    TooLarge {
        what: &'static str,
        len: u64,
        cap: u64,
    },
    #[error("section {tag}: {source}")]
    Codec {
        tag: Tag,
        #[source]
        source: codec::Error,
    },
    #[error("invalid {0}")]
    Invalid(String),
    #[error("memory range at gpa {gpa:#x}, length {len:#x}: {why}")]
    Memory {
        gpa: u64,
        len: u64,
        why: &'static str,
    },
    #[error("trailing bytes after END at offset {offset}")]
    Trailing { offset: u64 },
}

/// Writes `vm` as a stream: header, sections, END. Memory ranges longer than
/// [`MAX_RANGE_BYTES`] are split into several ranges (so they read back split). Returns the
/// bytes written. A state the reader would refuse (see [`validate`]) is an `InvalidInput`
/// error wrapping [`Error`], and nothing is written. Writes are many and small: give it a
/// `BufWriter` around a file or socket.
pub fn write_vm(w: &mut impl Write, vm: &VmState) -> io::Result<u64> {
    validate(vm).map_err(invalid_input)?;
    let mut head = Encoder::new();
    head.bytes(&MAGIC);
    head.u32(FORMAT_VERSION);
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
    let max_range = MAX_RANGE_BYTES as usize;
    for pieces in memr_sections(&vm.memory, max_range, MAX_MEMR_RANGES as usize) {
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

/// Reads a whole stream from `r` and requires that it ends right after END.
pub fn read_vm(r: &mut impl Read) -> Result<VmState, Error> {
    let mut input = Input { r, offset: 0 };
    let vm = input.vm()?;
    let mut byte = [0u8; 1];
    loop {
        return match input.r.read(&mut byte) {
            Ok(0) => Ok(vm),
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

/// Reads a stream from `r` up to and including END, and reads nothing after it (for a
/// stream embedded in a connection that carries more after it).
pub fn read_vm_until_end(r: &mut impl Read) -> Result<VmState, Error> {
    Input { r, offset: 0 }.vm()
}

/// Decodes a whole stream held in memory, as [`read_vm`].
pub fn decode_vm(bytes: &[u8]) -> Result<VmState, Error> {
    let mut r = bytes;
    read_vm(&mut r)
}

/// Checks `vm` against every rule the reader applies: counts, caps, exact sizes, vCPU ids,
/// XSAVE components, duplicate MSR/XCR indices, memory ranges.
pub fn validate(vm: &VmState) -> Result<(), Error> {
    check_config(&vm.config)?;
    let profile_len = vm.cpu_profile.len() as u64;
    if profile_len > u64::from(MAX_PROFILE_JSON) {
        return Err(too_large(
            "cpu profile",
            profile_len,
            MAX_PROFILE_JSON.into(),
        ));
    }
    if let Some(g) = &vm.guest_cpu {
        check_guest_cpu(g)?;
    }
    let found = u32::try_from(vm.vcpus.len()).unwrap_or(u32::MAX);
    if found != vm.config.vcpus {
        return Err(Error::VcpuCount {
            expected: vm.config.vcpus,
            found,
        });
    }
    for (i, vcpu) in (0u32..).zip(&vm.vcpus) {
        check_vcpu(vcpu, i)?;
    }
    check_irqchip(&vm.irqchip)?;
    check_serial(&vm.serial)?;
    let mut mem = MemCheck::new(&vm.config);
    for r in &vm.memory {
        mem.range(r.gpa, r.data.len() as u64)?;
    }
    Ok(())
}

fn invalid_input(e: Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

fn too_large(what: &'static str, len: u64, cap: u64) -> Error {
    Error::TooLarge { what, len, cap }
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
fn memr_sections(
    ranges: &[MemoryRange],
    max_range: usize,
    max_count: usize,
) -> Vec<Vec<(u64, &[u8])>> {
    let mut sections = Vec::new();
    let mut cur: Vec<(u64, &[u8])> = Vec::new();
    let mut cur_bytes = 0usize;
    for r in ranges {
        let mut gpa = r.gpa;
        for chunk in r.data.chunks(max_range.max(1)) {
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

/// A frame header as read: where it starts and its 16 raw bytes (covered by the CRC).
struct Frame {
    tag: Tag,
    version: u16,
    reserved: u16,
    len: u64,
    offset: u64,
    raw: [u8; 16],
}

/// The reading side: a reader and the stream offset of its next byte.
struct Input<'r, R: Read> {
    r: &'r mut R,
    offset: u64,
}

impl<R: Read> Input<'_, R> {
    fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), Error> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.offset += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::Truncated {
                offset: self.offset,
                what,
            }),
            Err(source) => Err(Error::Io {
                offset: self.offset,
                source,
            }),
        }
    }

    /// Magic, then version (so a stream of another version is named as such even when
    /// truncated after it), then flags. Returns the version.
    fn header(&mut self) -> Result<u32, Error> {
        let mut magic = [0u8; 8];
        self.exact(&mut magic, "stream magic")?;
        if magic != MAGIC {
            return Err(Error::BadMagic { found: magic });
        }
        let mut word = [0u8; 4];
        self.exact(&mut word, "stream format version")?;
        let version = u32::from_le_bytes(word);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(Error::Version { found: version });
        }
        self.exact(&mut word, "stream flags")?;
        match u32::from_le_bytes(word) {
            0 => Ok(version),
            flags => Err(Error::Flags(flags)),
        }
    }

    /// Reads the next frame header; refuses an unknown tag.
    fn frame(&mut self) -> Result<Frame, Error> {
        let offset = self.offset;
        let mut raw = [0u8; 16];
        self.exact(&mut raw, "section header")?;
        let [t0, t1, t2, t3, v0, v1, r0, r1, l0, l1, l2, l3, l4, l5, l6, l7] = raw;
        let tag = Tag([t0, t1, t2, t3]);
        if tag.rank().is_none() {
            return Err(Error::UnknownTag { tag, offset });
        }
        Ok(Frame {
            tag,
            version: u16::from_le_bytes([v0, v1]),
            reserved: u16::from_le_bytes([r0, r1]),
            len: u64::from_le_bytes([l0, l1, l2, l3, l4, l5, l6, l7]),
            offset,
            raw,
        })
    }

    /// Reads the next frame header and requires one of `allowed`; `expected` names them.
    fn expect(&mut self, allowed: &[Tag], expected: &'static str) -> Result<Frame, Error> {
        let f = self.frame()?;
        order(&f, allowed, expected)?;
        Ok(f)
    }

    /// Checks a frame's version, reserved field and length cap, then reads its payload and
    /// CRC and checks the CRC.
    fn body(&mut self, f: &Frame) -> Result<Vec<u8>, Error> {
        if f.version != SECTION_VERSION {
            return Err(Error::SectionVersion {
                tag: f.tag,
                found: f.version,
                supported: SECTION_VERSION,
            });
        }
        if f.reserved != 0 {
            return Err(Error::Reserved {
                tag: f.tag,
                offset: f.offset + 6,
                value: f.reserved,
            });
        }
        let cap = f.tag.payload_cap().unwrap_or(0);
        if f.len > cap {
            return Err(too_large(f.tag.payload_name(), f.len, cap));
        }
        let payload = self.payload(f.len, f.tag.payload_name())?;
        let mut crc = [0u8; 4];
        self.exact(&mut crc, "section CRC")?;
        let stored = u32::from_le_bytes(crc);
        let mut h = crc32fast::Hasher::new();
        h.update(&f.raw);
        h.update(&payload);
        let computed = h.finalize();
        if stored != computed {
            return Err(Error::Crc {
                tag: f.tag,
                offset: f.offset,
                stored,
                computed,
            });
        }
        Ok(payload)
    }

    /// Reads `len` (already checked against a cap) bytes, growing the buffer at most to
    /// twice what has arrived (or 1 MiB) ahead of the data.
    fn payload(&mut self, len: u64, what: &'static str) -> Result<Vec<u8>, Error> {
        const CHUNK: usize = 1 << 20;
        let len = usize::try_from(len).map_err(|_| too_large(what, len, usize::MAX as u64))?;
        let mut buf = Vec::new();
        while buf.len() < len {
            let have = buf.len();
            let target = len.min(have.saturating_mul(2).max(CHUNK));
            buf.reserve_exact(target - have);
            buf.resize(target, 0);
            let chunk = buf.get_mut(have..).unwrap_or_default();
            self.exact(chunk, what)?;
        }
        Ok(buf)
    }

    /// Reads one section (frame already read) and decodes its payload with `f`.
    fn section<T>(
        &mut self,
        frame: &Frame,
        f: impl FnOnce(&mut Decoder) -> Result<T, codec::Error>,
    ) -> Result<T, Error> {
        let payload = self.body(frame)?;
        let mut d = Decoder::with_base(&payload, frame.offset + FRAME_HEADER_SIZE);
        let codec = |source| Error::Codec {
            tag: frame.tag,
            source,
        };
        let value = f(&mut d).map_err(codec)?;
        d.finish(frame.tag.payload_name()).map_err(codec)?;
        Ok(value)
    }

    /// The whole stream after the header's offset 0, through END.
    fn vm(&mut self) -> Result<VmState, Error> {
        let version = self.header()?;
        let f = self.expect(&[Tag::CONF], "CONF")?;
        let config = self.section(&f, dec_config)?;
        check_config(&config)?;
        let f = self.expect(&[Tag::CPUP], "CPUP")?;
        let cpu_profile = self.section(&f, |d| d.str_u32("cpu profile", MAX_PROFILE_JSON))?;
        let mut next = self.frame()?;
        let mut guest_cpu = None;
        if next.tag == Tag::GCPU {
            if version < 2 {
                return Err(Error::NotInVersion {
                    tag: next.tag,
                    offset: next.offset,
                    version,
                });
            }
            guest_cpu = Some(self.section(&next, dec_guest_cpu)?);
            next = self.frame()?;
        }
        let mut pending = Some(next);
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let f = match pending.take() {
                Some(f) => f,
                None => self.frame()?,
            };
            if f.tag == Tag::IRQC {
                return Err(Error::VcpuCount {
                    expected: config.vcpus,
                    found: id,
                });
            }
            order(&f, &[Tag::VCPU], "VCPU")?;
            let vcpu = self.section(&f, dec_vcpu)?;
            check_vcpu(&vcpu, id)?;
            vcpus.push(vcpu);
        }
        let f = match pending.take() {
            Some(f) => f,
            None => self.frame()?,
        };
        if f.tag == Tag::VCPU {
            return Err(Error::VcpuCount {
                expected: config.vcpus,
                found: config.vcpus.saturating_add(1),
            });
        }
        order(&f, &[Tag::IRQC], "IRQC")?;
        let irqchip = self.section(&f, dec_irqchip)?;
        check_irqchip(&irqchip)?;
        let f = self.expect(&[Tag::SERL], "SERL")?;
        let serial = self.section(&f, dec_serial)?;
        check_serial(&serial)?;
        let mut memory = Vec::new();
        let mut mem = MemCheck::new(&config);
        loop {
            let f = self.expect(&[Tag::MEMR, Tag::END], "MEMR or END")?;
            if f.tag == Tag::END {
                self.body(&f)?;
                break;
            }
            let ranges = self.section(&f, dec_memr)?;
            if ranges.is_empty() {
                let offset = f.offset;
                return Err(Error::Invalid(format!(
                    "MEMR at offset {offset}: no ranges"
                )));
            }
            for r in &ranges {
                mem.range(r.gpa, r.data.len() as u64)?;
            }
            memory.extend(ranges);
        }
        Ok(VmState {
            config,
            cpu_profile,
            guest_cpu,
            vcpus,
            irqchip,
            serial,
            memory,
        })
    }
}

/// Requires `f`'s tag to be one of `allowed` (whose first tag is the current stage): an
/// earlier stage's tag is a duplicate, a later one means `expected` is missing.
fn order(f: &Frame, allowed: &[Tag], expected: &'static str) -> Result<(), Error> {
    if allowed.contains(&f.tag) {
        return Ok(());
    }
    let stage = allowed.first().and_then(|t| t.rank());
    match (f.tag.rank(), stage) {
        (Some(found), Some(stage)) if found < stage => Err(Error::Duplicate {
            tag: f.tag,
            offset: f.offset,
        }),
        _ => Err(Error::Order {
            expected,
            found: f.tag,
            offset: f.offset,
        }),
    }
}

/// The rules for a machine config: 1..=MAX_VCPUS vCPUs, at most MAX_MEMORY of RAM.
fn check_config(c: &MachineConfig) -> Result<(), Error> {
    if c.vcpus == 0 || c.vcpus > MAX_VCPUS {
        let v = c.vcpus;
        return Err(Error::Invalid(format!(
            "config.vcpus {v}: must be 1..={MAX_VCPUS}"
        )));
    }
    if c.memory > MAX_MEMORY {
        return Err(too_large("config.memory", c.memory, MAX_MEMORY));
    }
    let len = c.cmdline.len() as u64;
    if len > u64::from(MAX_CMDLINE) {
        return Err(too_large("config.cmdline", len, MAX_CMDLINE.into()));
    }
    Ok(())
}

/// The rules for a GCPU record: a vendor string of at most 12 bytes, at most
/// [`MAX_CPUID_ENTRIES`] entries.
fn check_guest_cpu(g: &GuestCpu) -> Result<(), Error> {
    let len = g.host_vendor.len() as u64;
    if len > u64::from(MAX_VENDOR) {
        return Err(too_large("GuestCpu.host_vendor", len, MAX_VENDOR.into()));
    }
    let n = g.cpuid.len() as u64;
    if n > u64::from(MAX_CPUID_ENTRIES) {
        return Err(too_large("GuestCpu.cpuid", n, MAX_CPUID_ENTRIES.into()));
    }
    Ok(())
}

/// The rules for one vCPU: its id, exact sizes, XSAVE components, unique XCR/MSR indices.
fn check_vcpu(v: &VcpuState, expected: u32) -> Result<(), Error> {
    let id = v.id;
    if id != expected {
        return Err(Error::VcpuId {
            expected,
            found: id,
        });
    }
    exact_len(&v.lapic, LAPIC_SIZE, || format!("vCPU {id} lapic"))?;
    check_xsave(&v.xsave, id)?;
    check_pairs(&v.xcrs, MAX_XCRS, "XCR", "vCPU XCRs", id)?;
    check_pairs(&v.msrs, MAX_MSRS, "MSR", "vCPU MSRs", id)
}

/// Components ascend by index below 64; 0 (160 bytes) and 1 (256 bytes) are always there,
/// others hold 1..=cap bytes; every component XSTATE_BV marks as holding state is carried.
fn check_xsave(x: &Xsave, id: u32) -> Result<(), Error> {
    let n = x.components.len() as u64;
    if n > u64::from(MAX_XSAVE_COMPONENTS) {
        return Err(too_large(
            "vCPU XSAVE component count",
            n,
            MAX_XSAVE_COMPONENTS.into(),
        ));
    }
    let mut carried = 0u64;
    for c in &x.components {
        let (index, len) = (c.index, c.bytes.len());
        let bit = 1u64
            .checked_shl(index)
            .filter(|_| index < MAX_XSAVE_COMPONENTS);
        let Some(bit) = bit.filter(|b| *b > carried) else {
            let why = "indices must ascend, below 64";
            return Err(Error::Invalid(format!(
                "vCPU {id} XSAVE component {index}: {why}"
            )));
        };
        carried |= bit;
        let ok = match index {
            0 => len == XSAVE_X87_SIZE,
            1 => len == XSAVE_SSE_SIZE,
            _ => len > 0 && len as u64 <= u64::from(MAX_XSAVE_COMPONENT),
        };
        if !ok {
            let want = "0: 160, 1: 256, others 1..=65536";
            return Err(Error::Invalid(format!(
                "vCPU {id} XSAVE component {index}: {len} bytes (sizes are {want})"
            )));
        }
    }
    if carried & 0b11 != 0b11 {
        let why = "components 0 (x87) and 1 (SSE) are always carried";
        return Err(Error::Invalid(format!("vCPU {id} XSAVE: {why}")));
    }
    let missing = x.xstate_bv & !carried;
    if missing != 0 {
        return Err(Error::Invalid(format!(
            "vCPU {id} XSTATE_BV {:#x} marks components {missing:#x} that are not carried",
            x.xstate_bv
        )));
    }
    Ok(())
}

/// At most `cap` (index, value) pairs, no index twice.
fn check_pairs(
    pairs: &[(u32, u64)],
    cap: u32,
    kind: &str,
    what: &'static str,
    id: u32,
) -> Result<(), Error> {
    let n = pairs.len() as u64;
    if n > u64::from(cap) {
        return Err(too_large(what, n, cap.into()));
    }
    let mut indices: Vec<u32> = pairs.iter().map(|p| p.0).collect();
    indices.sort_unstable();
    match indices.windows(2).find(|w| w.first() == w.get(1)) {
        Some(w) => Err(Error::Invalid(format!(
            "vCPU {id} {kind} {:#x} appears more than once",
            w.first().copied().unwrap_or_default()
        ))),
        None => Ok(()),
    }
}

fn check_irqchip(s: &IrqchipState) -> Result<(), Error> {
    exact_len(&s.pic_master, IRQCHIP_SIZE, || "PIC master state".into())?;
    exact_len(&s.pic_slave, IRQCHIP_SIZE, || "PIC slave state".into())?;
    exact_len(&s.ioapic, IRQCHIP_SIZE, || "IOAPIC state".into())?;
    let len = s.pit.len() as u64;
    if len > u64::from(MAX_PIT) {
        return Err(too_large("PIT state", len, MAX_PIT.into()));
    }
    Ok(())
}

fn check_serial(s: &SerialState) -> Result<(), Error> {
    let len = s.in_buffer.len() as u64;
    if len > u64::from(MAX_SERIAL_INPUT) {
        return Err(too_large(
            "serial input buffer",
            len,
            MAX_SERIAL_INPUT.into(),
        ));
    }
    Ok(())
}

fn exact_len(b: &[u8], want: usize, what: impl FnOnce() -> String) -> Result<(), Error> {
    if b.len() == want {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{}: {} bytes, must be {want}",
        what(),
        b.len()
    )))
}

/// Running checks over the memory ranges of one stream, in order.
struct MemCheck {
    memory: u64,
    bound: u64,
    total: u64,
    next_gpa: u64,
}

impl MemCheck {
    fn new(config: &MachineConfig) -> Self {
        Self {
            memory: config.memory,
            bound: config.memory.saturating_add(MMIO_GAP_ALLOWANCE),
            total: 0,
            next_gpa: 0,
        }
    }

    fn range(&mut self, gpa: u64, len: u64) -> Result<(), Error> {
        let err = |why| Err(Error::Memory { gpa, len, why });
        if len == 0 {
            return err("empty range");
        }
        if gpa % PAGE_SIZE != 0 {
            return err("gpa is not page aligned");
        }
        if len % PAGE_SIZE != 0 {
            return err("length is not a multiple of 4096");
        }
        if gpa < self.next_gpa {
            return err("overlaps or precedes the previous range (ranges must ascend)");
        }
        match gpa.checked_add(len) {
            Some(end) if end <= self.bound => self.next_gpa = end,
            _ => return err("ends beyond guest memory (config.memory + 4 GiB)"),
        }
        self.total = self.total.saturating_add(len);
        if self.total > self.memory {
            return err("ranges carry more bytes than config.memory");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memr_sections_split_ranges_and_group_pieces() {
        let ranges = [
            MemoryRange {
                gpa: 0,
                data: vec![1; 5],
            },
            MemoryRange {
                gpa: 100,
                data: vec![2; 2],
            },
            MemoryRange {
                gpa: 200,
                data: vec![3; 1],
            },
        ];
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
