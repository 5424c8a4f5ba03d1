//! MEMI sections (format version 4): a RAM region as a page-aligned image in a snapshot
//! file, so that a restore can map it (private, pages read on demand) instead of copying
//! it. Pages outside the image's extents are zero and the writer leaves them as holes.
//!
//! ```text
//! frame   "MEMI" | version u16 | reserved u16 | length u64 = 28 + 20e + p + n
//! payload gpa u64 | n u64 | e u32 | p u32 | extent x e | table CRC u32 | zero x p | image (n)
//! extent  offset u64 | length u64 | CRC-32 of its bytes u32
//! ```
//! The table CRC covers the frame header and the payload up to it; there is no CRC after
//! the image (each extent has its own). `p` (under 4096) puts the image at an offset of the
//! file the stream was written to that is a multiple of 4096.

use std::io::{self, Read, Seek, SeekFrom, Write};

use super::error::{too_large, Error};
use super::reader::{Frame, Images, Input, MemorySink};
use super::rules::MemCheck;
use super::{invalid_input, Tag};
use crate::codec::{Decoder, Encoder};
use crate::limits::*;

/// A memory image as a reader met it: where it lies in guest RAM and in the stream, and the
/// extents that hold data (guest addresses, ascending); every other page of it is zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub gpa: u64,
    pub len: u64,
    /// Stream offset of the image's first byte: a multiple of 4096 in the file the stream
    /// was written to (the writer pads for that), so in a stream that starts a file.
    pub offset: u64,
    /// (gpa, length) of each extent.
    pub extents: Vec<(u64, u64)>,
}

/// Skips `n` bytes of a seekable input.
pub(super) fn seek_over<R: Seek>(r: &mut R, n: u64) -> io::Result<()> {
    let n = i64::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    r.seek(SeekFrom::Current(n)).map(|_| ())
}

/// Zero bytes that put `at` (a stream position) on a 4096-byte boundary.
fn pad_to_page(at: u64) -> u64 {
    (PAGE_SIZE - at % PAGE_SIZE) % PAGE_SIZE
}

/// Writes one MEMI section at stream position `at` (its frame's first byte; `base` is
/// where the stream began in `w`, so that the image is aligned in the file): RAM region
/// `(gpa, len)` and its extents `memory` (each within the region, ascending, at most
/// [`MAX_RANGE_BYTES`]). Holes are seeked over, never written. Returns the bytes of stream
/// it covers.
pub(super) fn write_image<W: Write + Seek>(
    w: &mut W,
    base: u64,
    at: u64,
    (gpa, len): (u64, u64),
    memory: &[(u64, &[u8])],
) -> io::Result<u64> {
    if memory.len() > MAX_IMAGE_EXTENTS as usize {
        let e = too_large(
            "MEMI extents",
            memory.len() as u64,
            MAX_IMAGE_EXTENTS.into(),
        );
        return Err(invalid_input(e));
    }
    let table = IMAGE_EXTENT_SIZE * memory.len() as u64;
    let before = FRAME_HEADER_SIZE + IMAGE_HEAD_SIZE + table + CRC_SIZE;
    let pad = pad_to_page(base + at + before);
    let mut e = Encoder::new();
    e.bytes(&Tag::MEMI.0);
    e.u16(SECTION_VERSION);
    e.u16(0);
    e.u64(IMAGE_HEAD_SIZE + table + CRC_SIZE + pad + len);
    e.u64(gpa);
    e.u64(len);
    e.u32(memory.len() as u32);
    e.u32(pad as u32);
    for (at, data) in memory {
        e.u64(at - gpa);
        e.u64(data.len() as u64);
        e.u32(crc32fast::hash(data));
    }
    let crc = crc32fast::hash(e.as_slice());
    e.u32(crc);
    e.bytes(&vec![0u8; pad as usize]);
    w.write_all(e.as_slice())?;
    let mut pos = 0u64;
    for (at, data) in memory {
        seek_over(w, at - gpa - pos)?;
        w.write_all(data)?;
        pos = at - gpa + data.len() as u64;
    }
    seek_over(w, len - pos)?;
    Ok(before + pad + len)
}

impl<R: Read> Input<'_, R> {
    /// One MEMI section (frame read): its table checked, then its extents handed to `sink`
    /// one at a time (each after its CRC matched), holes read and required to be zero; or
    /// the image given to `map` and its bytes skipped. Returns the bytes of data it holds.
    pub(super) fn image(
        &mut self,
        f: &Frame,
        mem: &mut MemCheck,
        images: &mut Images<'_, R>,
        sink: &mut MemorySink<'_>,
    ) -> Result<u64, Error> {
        let image = self.image_table(f, mem)?;
        if let Images::Map { map, skip } = images {
            let (gpa, len) = (image.gpa, image.len);
            map(&image.image).map_err(|why| Error::Memory { gpa, len, why })?;
            skip(self.r, image.len).map_err(|source| Error::Io {
                offset: self.offset,
                source,
            })?;
            self.offset += image.len;
            return Ok(image.extents.iter().map(|e| e.1).sum());
        }
        let mut pos = image.gpa;
        let mut total = 0;
        for (&(gpa, len), crc) in image.extents.iter().zip(&image.crcs) {
            self.zeros(gpa - pos)?;
            let data = self.payload(len, "MEMI extent")?;
            let computed = crc32fast::hash(&data);
            if computed != *crc && !cfg!(fuzzing) {
                let why = "CRC-32 of the extent does not match the MEMI table";
                return Err(Error::Memory { gpa, len, why });
            }
            sink(gpa, &data).map_err(|why| Error::Memory { gpa, len, why })?;
            pos = gpa + len;
            total += len;
        }
        self.zeros(image.gpa + image.len - pos)?;
        Ok(total)
    }

    /// Reads `n` bytes that must all be zero (a hole of an image), 1 MiB at a time.
    fn zeros(&mut self, mut n: u64) -> Result<(), Error> {
        let mut buf = vec![0u8; n.min(1 << 20) as usize];
        while n > 0 {
            let at = self.offset;
            let chunk = &mut buf[..n.min(1 << 20) as usize];
            self.exact(chunk, "MEMI image")?;
            if chunk.iter().any(|b| *b != 0) {
                return Err(Error::NonZeroOutsideExtents { at });
            }
            n -= chunk.len() as u64;
        }
        Ok(())
    }

    /// The MEMI frame's fixed fields, extent table, table CRC and padding, checked.
    fn image_table(&mut self, f: &Frame, mem: &mut MemCheck) -> Result<Table, Error> {
        self.frame_fields(f)?;
        let mut head = [0u8; IMAGE_HEAD_SIZE as usize];
        self.exact(&mut head, "MEMI header")?;
        let mut d = Decoder::with_base(&head, f.offset + FRAME_HEADER_SIZE);
        let codec = |source| Error::Codec { tag: f.tag, source };
        let gpa = d.u64("MEMI gpa").map_err(codec)?;
        let len = d.u64("MEMI length").map_err(codec)?;
        let count = d.u32("MEMI extent count").map_err(codec)?;
        let pad = d.u32("MEMI pad").map_err(codec)?;
        mem.range(gpa, len)?;
        if u64::from(count) > (len / PAGE_SIZE).min(MAX_IMAGE_EXTENTS.into()) {
            let cap = (len / PAGE_SIZE).min(MAX_IMAGE_EXTENTS.into());
            return Err(too_large("MEMI extent count", count.into(), cap));
        }
        let table_len = IMAGE_EXTENT_SIZE * u64::from(count);
        let body = IMAGE_HEAD_SIZE + table_len + CRC_SIZE + u64::from(pad) + len;
        let image_at = f.offset + FRAME_HEADER_SIZE + body - len;
        if f.len != body || u64::from(pad) >= PAGE_SIZE {
            return Err(Error::ImageLength {
                offset: f.offset,
                len: f.len,
                image: len,
                count,
                pad: pad.into(),
            });
        }
        let table = self.payload(table_len, "MEMI extent table")?;
        let mut crc = [0u8; 4];
        self.exact(&mut crc, "MEMI table CRC")?;
        let mut h = crc32fast::Hasher::new();
        h.update(&f.raw);
        h.update(&head);
        h.update(&table);
        let (stored, computed) = (u32::from_le_bytes(crc), h.finalize());
        if stored != computed && !cfg!(fuzzing) {
            let (tag, offset) = (f.tag, f.offset);
            return Err(Error::Crc {
                tag,
                offset,
                stored,
                computed,
            });
        }
        let mut d = Decoder::with_base(&table, f.offset + FRAME_HEADER_SIZE + IMAGE_HEAD_SIZE);
        let (extents, crcs) = extents(&mut d, gpa, len, count).map_err(codec)?;
        let mut zero = vec![0u8; pad as usize];
        self.exact(&mut zero, "MEMI padding")?;
        if zero.iter().any(|b| *b != 0) {
            return Err(Error::NonZeroPadding { offset: f.offset });
        }
        Ok(Table {
            image: Image {
                gpa,
                len,
                offset: image_at,
                extents,
            },
            crcs,
        })
    }
}

/// A MEMI section's image and the CRC of each extent.
struct Table {
    image: Image,
    crcs: Vec<u32>,
}

impl std::ops::Deref for Table {
    type Target = Image;
    fn deref(&self) -> &Image {
        &self.image
    }
}

/// Extents as (gpa, length), and the CRC of each.
type Extents = (Vec<(u64, u64)>, Vec<u32>);

/// Decodes `count` extents of the image at (gpa, len): each nonzero, page aligned, at most
/// [`MAX_RANGE_BYTES`], inside the image, after the previous one.
fn extents(
    d: &mut Decoder,
    gpa: u64,
    len: u64,
    count: u32,
) -> Result<Extents, crate::codec::Error> {
    let mut extents = Vec::with_capacity(count as usize);
    let mut crcs = Vec::with_capacity(count as usize);
    let mut next = 0u64;
    for _ in 0..count {
        let at = d.offset();
        let off = d.u64("MEMI extent offset")?;
        let n = d.u64("MEMI extent length")?;
        crcs.push(d.u32("MEMI extent CRC")?);
        let end = off.checked_add(n).filter(|e| *e <= len);
        if n == 0
            || n > MAX_RANGE_BYTES
            || (off | n) % PAGE_SIZE != 0
            || off < next
            || end.is_none()
        {
            return Err(crate::codec::Error::BadExtent {
                offset: at,
                start: off,
                len: n,
            });
        }
        next = off + n;
        extents.push((gpa + off, n));
    }
    d.finish("MEMI extent table")?;
    Ok((extents, crcs))
}
