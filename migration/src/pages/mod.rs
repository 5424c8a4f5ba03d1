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

use std::io::Read;

use crate::codec::Decoder;

/// The frame tag.
pub const TAG: [u8; 4] = *b"PAGS";
/// Guest page size ([`crate::limits::PAGE_SIZE`]) as a length.
pub const PAGE_SIZE: usize = crate::limits::PAGE_SIZE as usize;
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
    #[error("page frame: run {run}: address {gpa_flags:#x} has undefined flag bits")]
    UndefinedFlags { run: usize, gpa_flags: u64 },
    #[error("page frame: run {run} at {gpa:#x} has no pages")]
    NoPages { run: usize, gpa: u64 },
    #[error("page frame: run {run} at {gpa:#x} wraps the address space")]
    Wraps { run: usize, gpa: u64 },
    #[error("page frame: {0} bytes is too short")]
    TooShort(usize),
    #[error("page frame: {0} runs, over the cap of {MAX_RUNS}")]
    TooManyRuns(usize),
    #[error("page frame: too short for its {0} runs")]
    ShortForRuns(usize),
    #[error("page frame: more than {MAX_PAGES} pages")]
    TooManyPages,
    #[error("page frame: more than {MAX_DATA_PAGES} pages with data")]
    TooManyDataPages,
    #[error("page frame: {data_len} bytes of data for {data_pages} pages")]
    DataLength { data_len: usize, data_pages: usize },
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
        // As the stream reader's: built for fuzzing, past a wrong CRC to what follows.
        if stored != computed && !cfg!(fuzzing) {
            return Err(Error::Crc { stored, computed });
        }
        Ok(())
    }
}

/// Run `i` of a frame's table: its address and flag, checked (no undefined flag bits, at
/// least one page, no wrap).
fn read_run(t: &mut Decoder, i: usize) -> Result<RunHead, Error> {
    let gpa_flags = t.u64("run address")?;
    let pages = t.u32("run pages")?;
    let zero = gpa_flags & ZERO != 0;
    let gpa = gpa_flags & !(PAGE_SIZE as u64 - 1);
    if gpa_flags & (PAGE_SIZE as u64 - 1) & !ZERO != 0 {
        return Err(Error::UndefinedFlags { run: i, gpa_flags });
    }
    if pages == 0 {
        return Err(Error::NoPages { run: i, gpa });
    }
    let len = u64::from(pages) * PAGE_SIZE as u64;
    if gpa.checked_add(len).is_none() {
        return Err(Error::Wraps { run: i, gpa });
    }
    Ok(RunHead { gpa, pages, zero })
}

/// Reads and checks a frame's head (round, run table) for a payload of `payload_len` bytes
/// whose frame head has been read; the reader is left at the first byte of page data.
pub fn read_head(r: &mut impl Read, payload_len: usize) -> Result<FrameHead, Error> {
    if payload_len > MAX_PAYLOAD {
        return Err(Error::TooLarge(payload_len));
    }
    if payload_len < 12 {
        return Err(Error::TooShort(payload_len));
    }
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    let mut d = Decoder::new(&head);
    let round = d.u32("page frame round")?;
    let runs = d.u32("page frame runs")? as usize;
    if runs > MAX_RUNS {
        return Err(Error::TooManyRuns(runs));
    }
    let table_len = runs * RUN_SIZE;
    let Some(data_len) = payload_len.checked_sub(8 + table_len + 4) else {
        return Err(Error::ShortForRuns(runs));
    };
    let mut table = vec![0u8; table_len];
    r.read_exact(&mut table)?;
    crc.update(&table);
    let mut t = Decoder::new(&table);
    let (mut data_pages, mut pages_total) = (0usize, 0usize);
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs {
        let RunHead { gpa, pages, zero } = read_run(&mut t, i)?;
        pages_total = pages_total.saturating_add(pages as usize);
        if pages_total > MAX_PAGES {
            return Err(Error::TooManyPages);
        }
        if !zero {
            data_pages += pages as usize;
            if data_pages > MAX_DATA_PAGES {
                return Err(Error::TooManyDataPages);
            }
        }
        out.push(RunHead { gpa, pages, zero });
    }
    if data_pages * PAGE_SIZE != data_len {
        return Err(Error::DataLength {
            data_len,
            data_pages,
        });
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

mod writer;
pub use writer::{BatchWriter, Frame};

#[cfg(test)]
mod tests;
