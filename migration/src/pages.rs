//! Guest pages in flight: the `PAGS` frame of a precopy round (docs/migration-format.md,
//! "Pages").
//!
//! ```text
//! frame:   "PAGS" | payload length u32 | payload
//! payload: round u32 | runs u32 | runs x (gpa_flags u64, pages u32) | data | CRC32 u32
//! ```
//! A run is `pages` consecutive guest pages from the page-aligned address in `gpa_flags`;
//! bit 0 of `gpa_flags` is [`ZERO`]: the run's pages are all zero and carry no bytes. `data`
//! holds the pages of the other runs, in run order, 4096 bytes each. The CRC covers the
//! payload before it. The run table comes first so that a receiver can check every run
//! against its memory map before it reads any page, and then read the pages straight into
//! guest RAM ([`read_head`]); a sender gathers the head, the table and the pages with one
//! vectored write ([`Frame`]), the pages copied into the frame ([`BatchWriter::page_slot`])
//! or, where nothing can change them meanwhile, taken where they lie
//! ([`BatchWriter::commit_in_place`]).
//!
//! Invariants of a decoded head: every run is page aligned, has 1 or more pages, does not
//! wrap; the payload length is exactly the head, the table, the data runs' pages and the CRC;
//! at most [`MAX_RUNS`] runs, [`MAX_DATA_PAGES`] data pages and [`MAX_PAGES`] pages in all
//! (so a tiny frame cannot ask the receiver to zero more than 32 MiB). Whether the runs lie
//! in guest RAM is for the receiver to check against its memory map.

use std::io::{IoSlice, Read, Write};

use crate::codec::Decoder;

/// The frame tag.
pub const TAG: [u8; 4] = *b"PAGS";
/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// The ZERO flag in a run's `gpa_flags`.
pub const ZERO: u64 = 1;
/// Most pages with data in one frame (2 MiB).
pub const MAX_DATA_PAGES: usize = 512;
/// Most pages, data and zero, in one frame (32 MiB of guest RAM).
pub const MAX_PAGES: usize = 8192;
/// Most runs in one frame.
pub const MAX_RUNS: usize = 4096;
/// Run table entry: gpa_flags u64, pages u32.
const RUN_SIZE: usize = 12;
/// The largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 8 + MAX_RUNS * RUN_SIZE + MAX_DATA_PAGES * PAGE_SIZE + 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("page frame of {0} bytes is over the cap of {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error("page frame: CRC32 {stored:#010x} stored, {computed:#010x} computed")]
    Crc { stored: u32, computed: u32 },
    #[error("page frame: {0}")]
    Layout(String),
    #[error("page frame: {0}")]
    Codec(#[from] crate::codec::Error),
    #[error("page frame: {0}")]
    Io(#[from] std::io::Error),
}

/// One run of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunHead {
    pub gpa: u64,
    pub pages: u32,
    /// A ZERO run: no bytes in the frame.
    pub zero: bool,
}

impl RunHead {
    /// Bytes of guest RAM the run covers.
    pub fn len(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE as u64
    }

    /// Never true for a decoded run (every run has a page); for clippy's len/is_empty pair.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// A frame's head as read from a stream: the round and the checked run table. The data
/// runs' bytes follow in the stream, in run order; feed each to [`FrameHead::crc_update`]
/// once read, then [`FrameHead::check_crc`].
#[derive(Debug)]
pub struct FrameHead {
    pub round: u32,
    pub runs: Vec<RunHead>,
    /// Bytes of page data that follow the table.
    pub data_len: usize,
    crc: crc32fast::Hasher,
}

impl FrameHead {
    /// Adds page bytes read from the stream to the CRC.
    pub fn crc_update(&mut self, bytes: &[u8]) {
        self.crc.update(bytes);
    }

    /// Reads the stored CRC and compares it with the one computed over everything read.
    pub fn check_crc(self, r: &mut impl Read) -> Result<(), Error> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        let stored = u32::from_le_bytes(b);
        let computed = self.crc.finalize();
        if stored != computed {
            return Err(Error::Crc { stored, computed });
        }
        Ok(())
    }
}

/// Reads and checks a frame's head (round, run table) for a payload of `payload_len` bytes
/// whose frame head has been read; the reader is left at the first byte of page data.
pub fn read_head(r: &mut impl Read, payload_len: usize) -> Result<FrameHead, Error> {
    let layout = |s: String| Error::Layout(s);
    if payload_len > MAX_PAYLOAD {
        return Err(Error::TooLarge(payload_len));
    }
    if payload_len < 12 {
        return Err(layout(format!("{payload_len} bytes is too short")));
    }
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    let mut d = Decoder::new(&head);
    let round = d.u32("page frame round")?;
    let runs = d.u32("page frame runs")? as usize;
    if runs > MAX_RUNS {
        return Err(layout(format!("{runs} runs, over the cap of {MAX_RUNS}")));
    }
    let table_len = runs * RUN_SIZE;
    let Some(data_len) = payload_len.checked_sub(8 + table_len + 4) else {
        return Err(layout(format!("too short for its {runs} runs")));
    };
    let mut table = vec![0u8; table_len];
    r.read_exact(&mut table)?;
    crc.update(&table);
    let mut t = Decoder::new(&table);
    let (mut data_pages, mut pages_total) = (0usize, 0usize);
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs {
        let gpa_flags = t.u64("run address")?;
        let pages = t.u32("run pages")?;
        let zero = gpa_flags & ZERO != 0;
        let gpa = gpa_flags & !(PAGE_SIZE as u64 - 1);
        if gpa_flags & (PAGE_SIZE as u64 - 1) & !ZERO != 0 {
            return Err(layout(format!(
                "run {i}: address {gpa_flags:#x} has undefined flag bits"
            )));
        }
        if pages == 0 {
            return Err(layout(format!("run {i} at {gpa:#x} has no pages")));
        }
        let len = u64::from(pages) * PAGE_SIZE as u64;
        if gpa.checked_add(len).is_none() {
            return Err(layout(format!(
                "run {i} at {gpa:#x} wraps the address space"
            )));
        }
        pages_total = pages_total.saturating_add(pages as usize);
        if pages_total > MAX_PAGES {
            return Err(layout(format!("more than {MAX_PAGES} pages")));
        }
        if !zero {
            data_pages += pages as usize;
            if data_pages > MAX_DATA_PAGES {
                return Err(layout(format!(
                    "more than {MAX_DATA_PAGES} pages with data"
                )));
            }
        }
        out.push(RunHead { gpa, pages, zero });
    }
    if data_pages * PAGE_SIZE != data_len {
        return Err(layout(format!(
            "{data_len} bytes of data for {data_pages} pages"
        )));
    }
    Ok(FrameHead {
        round,
        runs: out,
        data_len,
        crc,
    })
}

/// One run of a frame decoded in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run<'a> {
    pub gpa: u64,
    pub pages: u32,
    /// The pages' bytes; None for a ZERO run.
    pub data: Option<&'a [u8]>,
}

/// A frame decoded in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch<'a> {
    pub round: u32,
    pub runs: Vec<Run<'a>>,
}

/// Whether `bytes` are all zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    // Whole 256-byte blocks OR-folded (vectorizes), stopping at the first non-zero block.
    let mut blocks = bytes.chunks_exact(256);
    for b in &mut blocks {
        if b.iter().fold(0u8, |a, x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|x| *x == 0)
}

/// Decodes a whole payload held in memory (without the 8-byte frame head), with the same
/// checks as [`read_head`] and the CRC.
pub fn decode(payload: &[u8]) -> Result<Batch<'_>, Error> {
    let mut r = payload;
    let mut head = read_head(&mut r, payload.len())?;
    let (data, mut rest) = r.split_at(head.data_len.min(r.len()));
    head.crc_update(data);
    let round = head.round;
    let heads = std::mem::take(&mut head.runs);
    head.check_crc(&mut rest)?;
    let mut at = 0;
    let runs = heads
        .iter()
        .map(|h| Run {
            gpa: h.gpa,
            pages: h.pages,
            data: (!h.zero).then(|| {
                let n = h.len() as usize;
                at += n;
                &data[at - n..at]
            }),
        })
        .collect();
    Ok(Batch { round, runs })
}

/// Builds frames in reused buffers: page bytes are copied once, into the data buffer; the
/// head and run table are built at [`BatchWriter::finish`].
#[derive(Debug)]
pub struct BatchWriter {
    /// Room for a frame's pages, allocated (and zeroed) once; `filled` bytes are in use.
    data: Vec<u8>,
    filled: usize,
    /// The CRC of the data so far, each page added just after it was copied (while it is
    /// in cache); joined to the head's at [`BatchWriter::finish`].
    data_crc: crc32fast::Hasher,
    head: Vec<u8>,
    /// (gpa, pages, zero)
    runs: Vec<(u64, u32, bool)>,
    data_pages: usize,
    pages: usize,
    round: u32,
    /// Bytes of pages taken in place (not copied), which the caller writes.
    in_place: usize,
}

/// A finished frame: head (frame head, round, run table), page data and CRC, to be written
/// in that order ([`Frame::write_to`], or [`Frame::write_with`] for pages taken in place).
#[derive(Debug)]
pub struct Frame<'a> {
    pub head: &'a [u8],
    /// The copied pages.
    pub data: &'a [u8],
    /// Bytes of pages taken in place, which the writer supplies.
    pub in_place: usize,
    pub crc: [u8; 4],
}

impl Frame<'_> {
    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.data.len() + self.in_place + 4
    }

    /// Never true: a frame has a head.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes a frame of copied pages with vectored writes (no copy into one buffer).
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        self.write_with(w, &[])
    }

    /// Writes the frame, the bytes of the pages taken in place being `pages`, in run order,
    /// with vectored writes. `pages` must hold exactly those bytes (at most 1000 slices: a
    /// writer joins the pages that lie next to each other).
    pub fn write_with(&self, w: &mut impl Write, pages: &[&[u8]]) -> std::io::Result<()> {
        let n: usize = pages.iter().map(|p| p.len()).sum();
        if n != self.in_place || pages.len() > 1000 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{n} bytes in {} slices for a frame with {} bytes of pages in place",
                    pages.len(),
                    self.in_place
                ),
            ));
        }
        let mut bufs = Vec::with_capacity(pages.len() + 3);
        bufs.push(IoSlice::new(self.head));
        bufs.push(IoSlice::new(self.data));
        bufs.extend(pages.iter().map(|p| IoSlice::new(p)));
        bufs.push(IoSlice::new(&self.crc));
        let mut bufs = &mut bufs[..];
        while !bufs.is_empty() {
            match w.write_vectored(bufs) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A frame of copied pages as one byte vector.
    pub fn to_vec(&self) -> Vec<u8> {
        [self.head, self.data, &self.crc].concat()
    }
}

impl Default for BatchWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchWriter {
    pub fn new() -> Self {
        BatchWriter {
            data: vec![0; MAX_DATA_PAGES * PAGE_SIZE],
            filled: 0,
            data_crc: crc32fast::Hasher::new(),
            head: Vec::with_capacity(16 + MAX_RUNS * RUN_SIZE),
            runs: Vec::new(),
            data_pages: 0,
            pages: 0,
            round: 0,
            in_place: 0,
        }
    }

    /// The round the next frames belong to.
    pub fn set_round(&mut self, round: u32) {
        self.round = round;
    }

    /// No pages yet.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// No room for another page (of either kind): finish the frame first.
    pub fn is_full(&self) -> bool {
        self.data_pages >= MAX_DATA_PAGES || self.pages >= MAX_PAGES || self.runs.len() >= MAX_RUNS
    }

    /// Pages with data so far.
    pub fn data_pages(&self) -> usize {
        self.data_pages
    }

    /// A page-sized slot at the end of the frame's data for the caller to fill, then
    /// [`BatchWriter::commit_page`]. Must not be full. The slot holds stale bytes (it is not
    /// cleared: the caller overwrites all of it).
    pub fn page_slot(&mut self) -> &mut [u8] {
        assert!(!self.is_full(), "page_slot on a full frame");
        assert_eq!(self.in_place, 0, "page_slot on a frame of pages in place");
        let at = self.filled;
        self.filled += PAGE_SIZE;
        &mut self.data[at..at + PAGE_SIZE]
    }

    /// Takes the page just written into the slot as guest page `gpa`. A zero page is kept as
    /// a ZERO flag, or dropped when `skip_zero` (the receiver already holds zeros there).
    /// Returns whether the page was zero.
    pub fn commit_page(&mut self, gpa: u64, skip_zero: bool) -> bool {
        let at = self.filled - PAGE_SIZE;
        if is_zero(&self.data[at..self.filled]) {
            self.filled = at;
            if !skip_zero {
                self.push(gpa, true);
            }
            return true;
        }
        self.data_crc.update(&self.data[at..self.filled]);
        self.data_pages += 1;
        self.push(gpa, false);
        false
    }

    /// Takes guest page `gpa` where it lies, without copying it: `page` is its bytes, which
    /// must not change until the frame is written ([`Frame::write_with`], given the data
    /// pages in the order they were taken). Zero pages as in [`BatchWriter::commit_page`];
    /// returns whether the page was zero. Must not be full; a frame holds copied pages or
    /// pages in place, not both.
    pub fn commit_in_place(&mut self, gpa: u64, page: &[u8], skip_zero: bool) -> bool {
        assert!(!self.is_full(), "commit_in_place on a full frame");
        assert_eq!(self.filled, 0, "commit_in_place on a frame of copied pages");
        assert_eq!(page.len(), PAGE_SIZE, "commit_in_place of a partial page");
        if is_zero(page) {
            if !skip_zero {
                self.push(gpa, true);
            }
            return true;
        }
        self.data_crc.update(page);
        self.data_pages += 1;
        self.in_place += PAGE_SIZE;
        self.push(gpa, false);
        false
    }

    /// Adds one zero page without bytes.
    pub fn push_zero(&mut self, gpa: u64) {
        self.push(gpa, true);
    }

    fn push(&mut self, gpa: u64, zero: bool) {
        self.pages += 1;
        if let Some((start, n, z)) = self.runs.last_mut() {
            if *z == zero && *start + u64::from(*n) * PAGE_SIZE as u64 == gpa {
                *n += 1;
                return;
            }
        }
        self.runs.push((gpa, 1, zero));
    }

    /// Completes the frame (head, run table, CRC); write it, then [`BatchWriter::reset`].
    pub fn finish(&mut self) -> Frame<'_> {
        self.head.clear();
        let payload_len = 8 + self.runs.len() * RUN_SIZE + self.filled + self.in_place + 4;
        self.head.extend_from_slice(&TAG);
        self.head
            .extend_from_slice(&(payload_len as u32).to_le_bytes());
        self.head.extend_from_slice(&self.round.to_le_bytes());
        self.head
            .extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for &(gpa, pages, zero) in &self.runs {
            let flags = if zero { ZERO } else { 0 };
            self.head.extend_from_slice(&(gpa | flags).to_le_bytes());
            self.head.extend_from_slice(&pages.to_le_bytes());
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.head[8..]);
        crc.combine(&self.data_crc);
        Frame {
            head: &self.head,
            data: &self.data[..self.filled],
            in_place: self.in_place,
            crc: crc.finalize().to_le_bytes(),
        }
    }

    /// Starts the next frame.
    pub fn reset(&mut self) {
        self.filled = 0;
        self.data_crc.reset();
        self.runs.clear();
        self.data_pages = 0;
        self.pages = 0;
        self.in_place = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u8) -> Vec<u8> {
        vec![v; PAGE_SIZE]
    }

    fn build(pages: &[(u64, Option<u8>)], skip_zero: bool) -> Vec<u8> {
        let mut w = BatchWriter::new();
        w.set_round(7);
        for &(gpa, v) in pages {
            match v {
                Some(v) => {
                    w.page_slot().copy_from_slice(&page(v));
                    w.commit_page(gpa, skip_zero);
                }
                None => w.push_zero(gpa),
            }
        }
        w.finish().to_vec()
    }

    #[test]
    fn pages_round_trip_as_runs() {
        let f = build(
            &[
                (0x1000, Some(1)),
                (0x2000, Some(2)),
                (0x3000, Some(0)),
                (0x4000, None),
                (0x9000, Some(3)),
            ],
            false,
        );
        assert_eq!(&f[..4], b"PAGS");
        assert_eq!(
            u32::from_le_bytes(f[4..8].try_into().unwrap()) as usize,
            f.len() - 8
        );
        let b = decode(&f[8..]).unwrap();
        assert_eq!(b.round, 7);
        let summary: Vec<(u64, u32, bool)> = b
            .runs
            .iter()
            .map(|r| (r.gpa, r.pages, r.data.is_none()))
            .collect();
        assert_eq!(
            summary,
            vec![(0x1000, 2, false), (0x3000, 2, true), (0x9000, 1, false)]
        );
        assert_eq!(b.runs[0].data.unwrap()[..PAGE_SIZE], page(1)[..]);
        assert_eq!(b.runs[0].data.unwrap()[PAGE_SIZE..], page(2)[..]);
        assert_eq!(b.runs[2].data.unwrap(), &page(3)[..]);
    }

    #[test]
    fn zero_pages_can_be_skipped() {
        let f = build(&[(0x1000, Some(0)), (0x2000, Some(5))], true);
        let b = decode(&f[8..]).unwrap();
        assert_eq!(b.runs.len(), 1);
        assert_eq!(b.runs[0].gpa, 0x2000);
    }

    #[test]
    fn the_writer_is_reusable_and_fills_up() {
        let mut w = BatchWriter::new();
        let mut n = 0u64;
        while !w.is_full() {
            w.page_slot()[0] = 1;
            w.commit_page(n * 2 * PAGE_SIZE as u64, false);
            n += 1;
        }
        assert_eq!(n as usize, MAX_DATA_PAGES);
        let f = w.finish().to_vec();
        assert!(f.len() - 8 <= MAX_PAYLOAD);
        assert_eq!(decode(&f[8..]).unwrap().runs.len(), MAX_DATA_PAGES);
        w.reset();
        assert!(w.is_empty());
        let g = build(&[(0, Some(9))], false);
        w.set_round(7);
        w.page_slot().copy_from_slice(&page(9));
        w.commit_page(0, false);
        let frame = w.finish();
        assert_eq!(frame.to_vec(), g);
        let mut written = Vec::new();
        frame.write_to(&mut written).unwrap();
        assert_eq!(written, g);
    }

    #[test]
    fn pages_in_place_make_the_same_frame_as_copied_ones() {
        let pages = [(0x1000, 1u8), (0x2000, 0), (0x3000, 2), (0x8000, 3)];
        let copied = build(&pages.map(|(g, v)| (g, Some(v))), true);
        let mut w = BatchWriter::new();
        w.set_round(7);
        let bytes: Vec<Vec<u8>> = pages.iter().map(|(_, v)| page(*v)).collect();
        let mut data: Vec<&[u8]> = Vec::new();
        for ((gpa, _), b) in pages.iter().zip(&bytes) {
            if !w.commit_in_place(*gpa, b, true) {
                data.push(b);
            }
        }
        assert_eq!(data.len(), 3);
        let frame = w.finish();
        assert_eq!(frame.len(), copied.len());
        let mut written = Vec::new();
        frame.write_with(&mut written, &data).unwrap();
        assert_eq!(written, copied);
        // Page bytes that are not the frame's are refused before anything is written.
        let mut out = Vec::new();
        assert!(frame.write_with(&mut out, &data[..2]).is_err());
        assert!(frame.write_to(&mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn every_damaged_frame_is_an_error() {
        let f = build(&[(0x1000, Some(1)), (0x5000, None)], false);
        let payload = &f[8..];
        for cut in 0..payload.len() {
            assert!(decode(&payload[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..payload.len() {
            let mut p = payload.to_vec();
            p[i] ^= 0x01;
            assert!(decode(&p).is_err(), "flip at {i}");
        }
    }

    /// Re-seals a payload with a correct CRC, to reach the checks behind it.
    fn seal(mut body: Vec<u8>) -> Vec<u8> {
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        body
    }

    fn frame(runs: &[(u64, u32)], data: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        for (g, p) in runs {
            b.extend_from_slice(&g.to_le_bytes());
            b.extend_from_slice(&p.to_le_bytes());
        }
        b.resize(b.len() + data, 0xab);
        seal(b)
    }

    #[test]
    fn hostile_run_tables_are_refused() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no pages", frame(&[(0x1000, 0)], 0)),
            ("unaligned", frame(&[(0x1008, 1)], PAGE_SIZE)),
            ("wraps", frame(&[(!0xfff | ZERO, 2)], 0)),
            ("data short", frame(&[(0x1000, 2)], PAGE_SIZE)),
            ("data left over", frame(&[(0x1000, 1)], 2 * PAGE_SIZE)),
            (
                "too many zero pages",
                frame(&[(ZERO, MAX_PAGES as u32), (0x1000_0000 | ZERO, 1)], 0),
            ),
            ("huge zero run", frame(&[(ZERO, u32::MAX)], 0)),
            (
                "too many data pages",
                frame(&[(0, MAX_DATA_PAGES as u32 + 1)], 0),
            ),
        ];
        for (what, f) in cases {
            assert!(decode(&f).is_err(), "{what}");
        }
        let mut many = Vec::new();
        many.extend_from_slice(&0u32.to_le_bytes());
        many.extend_from_slice(&(MAX_RUNS as u32 + 1).to_le_bytes());
        assert!(decode(&seal(many)).is_err(), "too many runs");
        assert!(matches!(
            decode(&vec![0u8; MAX_PAYLOAD + 1]),
            Err(Error::TooLarge(_))
        ));
        // A good ZERO run decodes.
        assert_eq!(
            decode(&frame(&[(0x2000 | ZERO, 3)], 0)).unwrap().runs[0],
            Run {
                gpa: 0x2000,
                pages: 3,
                data: None
            }
        );
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        for i in [0, 255, 256, 4095] {
            let mut p = [0u8; 4096];
            p[i] = 1;
            assert!(!is_zero(&p), "{i}");
        }
        assert!(is_zero(&[]));
        assert!(!is_zero(&[0, 0, 3]));
    }
}
