//! The sending side of page frames: [`BatchWriter`] gathers a round's pages (copied, or taken
//! in place) and [`Frame`] writes one frame with a vectored write.

use std::io::{IoSlice, Write};

use super::*;

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
