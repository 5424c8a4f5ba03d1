//! The reading side of the stream: one frame at a time, each checked (tag, order, version,
//! reserved field, cap, CRC) before its payload is read or decoded.

use std::io::{self, Read};

use super::error::{too_large, Error};
use super::rules::{check_config, check_irqchip, check_serial, check_vcpu, check_virtio, MemCheck};
use super::{Image, Tag};
use crate::codec::{self, Decoder};
use crate::limits::*;
use crate::records::dec_virtio;
use crate::records::{dec_config, dec_guest_cpu, dec_irqchip, dec_serial, dec_vcpu, memr_ranges};
use crate::state::*;

/// Where memory ranges go as they are read: (gpa, bytes); an error is why that range cannot
/// be taken.
pub(super) type MemorySink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), &'static str> + 'a;

/// What to do with a MEMI image: read it and hand its extents to the sink, or give it to
/// `map` and skip its bytes with `skip` (a seekable input).
pub(super) enum Images<'a, R> {
    Read,
    Map {
        map: &'a mut dyn FnMut(&Image) -> Result<(), &'static str>,
        skip: fn(&mut R, u64) -> io::Result<()>,
    },
}

/// A frame header as read: where it starts and its 16 raw bytes (covered by the CRC).
pub(super) struct Frame {
    pub(super) tag: Tag,
    version: u16,
    reserved: u16,
    pub(super) len: u64,
    pub(super) offset: u64,
    pub(super) raw: [u8; 16],
}

/// The reading side: a reader, the stream offset of its next byte, and the stream's format
/// version once its header is read.
/// What a migration's Hello announced of the machine its stream carries: a destination
/// reads the stream with `read_head_as`, so that nothing the Hello did not announce (and
/// admission did not check) is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced<'a> {
    pub memory: u64,
    pub vcpus: u32,
    pub cpu_profile: &'a str,
    pub devices: usize,
}

pub(super) struct Input<'r, R: Read> {
    pub(super) r: &'r mut R,
    pub(super) offset: u64,
    pub(super) version: u32,
}

impl<R: Read> Input<'_, R> {
    pub(super) fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), Error> {
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
        if !(OLDEST_FORMAT_VERSION..=NEWEST_FORMAT_VERSION).contains(&version) {
            return Err(Error::Version { found: version });
        }
        self.exact(&mut word, "stream flags")?;
        match u32::from_le_bytes(word) {
            0 => {
                self.version = version;
                Ok(version)
            }
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
        self.frame_fields(f)?;
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
        // A fuzzer cannot forge CRCs: built for fuzzing, a wrong one is let through so that
        // mutated payloads reach the decoders behind it.
        if stored != computed && !cfg!(fuzzing) {
            return Err(Error::Crc {
                tag: f.tag,
                offset: f.offset,
                stored,
                computed,
            });
        }
        Ok(payload)
    }

    /// Checks a frame's section version and reserved field.
    pub(super) fn frame_fields(&self, f: &Frame) -> Result<(), Error> {
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
        Ok(())
    }

    /// Reads `len` (already checked against a cap) bytes, growing the buffer at most to
    /// twice what has arrived (or 1 MiB) ahead of the data.
    pub(super) fn payload(&mut self, len: u64, what: &'static str) -> Result<Vec<u8>, Error> {
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

    /// The VCPU sections, exactly `count` (ids 0, 1, ...), the first in `first`; returns
    /// them and the frame after them.
    fn vcpus(&mut self, count: u32, first: Frame) -> Result<(Vec<VcpuState>, Frame), Error> {
        let mut pending = Some(first);
        let mut vcpus = Vec::with_capacity(count as usize);
        for id in 0..count {
            let f = match pending.take() {
                Some(f) => f,
                None => self.frame()?,
            };
            if f.tag == Tag::IRQC {
                return Err(Error::VcpuCount {
                    expected: count,
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
                expected: count,
                found: count.saturating_add(1),
            });
        }
        Ok((vcpus, f))
    }

    /// The stream from its header through the last section before memory: the state with
    /// no memory ranges, and the frame after it (MEMR or END, not yet read).
    pub(super) fn head(
        &mut self,
        announced: Option<&Announced<'_>>,
    ) -> Result<(VmState, Frame), Error> {
        let version = self.header()?;
        let f = self.expect(&[Tag::CONF], "CONF")?;
        let config = self.section(&f, dec_config)?;
        check_config(&config)?;
        if let Some(a) = announced {
            as_announced("guest RAM (bytes)", config.memory, a.memory)?;
            as_announced("vCPU count", config.vcpus.into(), a.vcpus.into())?;
        }
        let f = self.expect(&[Tag::CPUP], "CPUP")?;
        let cpu_profile = self.section(&f, |d| d.str_u32("cpu profile", MAX_PROFILE_JSON))?;
        if announced.is_some_and(|a| a.cpu_profile != cpu_profile) {
            return Err(Error::ProfileNotAnnounced);
        }
        let most_devices = announced.map_or(MAX_VIRTIO_DEVICES as usize, |a| a.devices);
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
        let (vcpus, f) = self.vcpus(config.vcpus, next)?;
        order(&f, &[Tag::IRQC], "IRQC")?;
        let irqchip = self.section(&f, dec_irqchip)?;
        check_irqchip(&irqchip)?;
        let f = self.expect(&[Tag::SERL], "SERL")?;
        let serial = self.section(&f, dec_serial)?;
        check_serial(&serial)?;
        let (devices, next) = self.devices(version, most_devices)?;
        let vm = VmState {
            config,
            cpu_profile,
            guest_cpu,
            vcpus,
            irqchip,
            serial,
            devices,
            memory: Vec::new(),
        };
        Ok((vm, next))
    }

    /// VIRT sections (format version 3 on): the virtio devices; and the frame after them.
    fn devices(&mut self, version: u32, most: usize) -> Result<(Vec<VirtioState>, Frame), Error> {
        let mut devices = Vec::new();
        loop {
            let f = self.expect(
                &[Tag::VIRT, Tag::MEMR, Tag::MEMI, Tag::END],
                "VIRT, MEMR, MEMI or END",
            )?;
            if f.tag != Tag::VIRT {
                return Ok((devices, f));
            }
            if version < 3 {
                return Err(Error::NotInVersion {
                    tag: f.tag,
                    offset: f.offset,
                    version,
                });
            }
            if devices.len() >= MAX_VIRTIO_DEVICES as usize {
                let n = devices.len() as u64 + 1;
                return Err(too_large("VIRT sections", n, MAX_VIRTIO_DEVICES.into()));
            }
            if devices.len() >= most {
                let n = devices.len() as u64 + 1;
                as_announced("device count", n, most as u64)?;
            }
            let device = self.section(&f, dec_virtio)?;
            check_virtio(&device, devices.len())?;
            devices.push(device);
        }
    }

    /// MEMR and MEMI sections until END (`first` read already, END's body read here): each
    /// MEMR range handed to `sink` in order, and only once its whole section has arrived
    /// with a good CRC and every range in it has passed the checks; each MEMI image as
    /// `images` says (super::image). Holds one section (at most MEMR's cap) or one MEMI
    /// extent at a time. Returns the bytes of memory handed over or mapped.
    pub(super) fn memory(
        &mut self,
        config: &MachineConfig,
        first: Frame,
        images: &mut Images<'_, R>,
        sink: &mut MemorySink<'_>,
    ) -> Result<u64, Error> {
        const ALLOWED: [Tag; 3] = [Tag::MEMR, Tag::MEMI, Tag::END];
        let mut mem = MemCheck::new(config);
        let mut pending = Some(first);
        let mut total = 0u64;
        loop {
            let f = match pending.take() {
                Some(f) => f,
                None => self.expect(&ALLOWED, "MEMR, MEMI or END")?,
            };
            order(&f, &ALLOWED, "MEMR, MEMI or END")?;
            if f.tag == Tag::END {
                self.body(&f)?;
                return Ok(total);
            }
            if f.tag == Tag::MEMI {
                if self.version < IMAGE_FORMAT_VERSION {
                    let (tag, offset, version) = (f.tag, f.offset, self.version);
                    return Err(Error::NotInVersion {
                        tag,
                        offset,
                        version,
                    });
                }
                total += self.image(&f, &mut mem, images, sink)?;
                continue;
            }
            let payload = self.body(&f)?;
            let mut d = Decoder::with_base(&payload, f.offset + FRAME_HEADER_SIZE);
            let codec = |source| Error::Codec { tag: f.tag, source };
            let ranges = memr_ranges(&mut d).map_err(codec)?;
            d.finish(f.tag.payload_name()).map_err(codec)?;
            if ranges.is_empty() {
                let offset = f.offset;
                return Err(Error::NoRanges { offset });
            }
            for (gpa, data) in &ranges {
                mem.range(*gpa, data.len() as u64)?;
            }
            for (gpa, data) in ranges {
                let len = data.len() as u64;
                sink(gpa, data).map_err(|why| Error::Memory { gpa, len, why })?;
                total += len;
            }
        }
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

/// A value of the stream against what the Hello announced.
fn as_announced(what: &'static str, found: u64, announced: u64) -> Result<(), Error> {
    if found == announced {
        return Ok(());
    }
    Err(Error::NotAnnounced {
        what,
        found,
        announced,
    })
}
