//! The migration handshake around the VM stream (docs/migration-format.md, "Protocol"):
//!
//! ```text
//! source                                   destination
//! Hello {version, memory, vcpus, profile,  ->
//!        guest CPU (TSC rate, CPUID as run),
//!        devices (disk paths and sizes, MACs)}
//!                                          <- Accept | Refuse {reason}   (before any memory)
//! Touched {2 MiB blocks in use}           ->   a hint: backs that RAM ahead of the pages
//! Pages {round, runs} x n (precopy)       ->   written into the new VM's RAM
//! Sync (after each round)                 ->
//!                                          <- Synced   (every page so far is in RAM)
//! [Cancel {reason}                         ->   the destination gives up; the end]
//! State, then the VM stream (no memory)   ->
//!                                          <- Restored | Failed {reason}
//! Commit                                  ->   the destination runs the guest
//!                                          <- Running | Failed {reason}   (the source ends
//!                                             its copy on Running, resumes it on Failed)
//! ```
//! Postcopy: before State the source sends Missing {pages} (the pages the destination lacks
//! or holds stale; no last round), and after Running the destination asks for them:
//!
//! ```text
//!                                          <- PageRequest {ranges}   (faulted pages first)
//! Pages (exactly the pages asked for)     ->
//!                                          <- PostcopyDone   (every missing page is here;
//!                                             the source ends its copy)
//! ```
//! Every message is a frame: tag [4] | payload length u32 | payload. Payloads are capped; a
//! frame that is not the one expected at that point is an error.

use std::io::{Read, Write};

use crate::codec::Encoder;
use crate::limits::{FORMAT_VERSION, MAX_GUEST_CPU, MAX_PROFILE_JSON};
use crate::records::MAX_BACKENDS;
use crate::state::{DeviceBackend, GuestCpu};

/// Largest control payload (the Hello carries the CPU profile, the guest CPU record and the
/// device list).
pub const MAX_MESSAGE: u32 = MAX_PROFILE_JSON + 64 + MAX_GUEST_CPU as u32 + MAX_BACKENDS as u32;
/// The Touched map's unit: bit b of word w stands for guest addresses
/// [(64 w + b) x TOUCHED_BLOCK, (64 w + b + 1) x TOUCHED_BLOCK).
pub const TOUCHED_BLOCK: u64 = 2 << 20;
/// Most words in a Touched map: that of the largest guest-physical range a Hello can
/// describe (stream::MAX_MEMORY plus the room above an MMIO hole).
pub const MAX_TOUCHED_WORDS: usize =
    touched_words(crate::stream::MAX_MEMORY + crate::stream::MMIO_GAP_ALLOWANCE);

/// The words of the Touched map of RAM that ends at guest address `ram_end`.
pub const fn touched_words(ram_end: u64) -> usize {
    ram_end.div_ceil(TOUCHED_BLOCK).div_ceil(64) as usize
}
/// Largest reason string in Refuse/Failed.
pub const MAX_REASON: u32 = 4096;
/// Most words in one Missing message (64 pages each: 2 GiB of guest RAM).
pub const MAX_MISSING_WORDS: usize = 8192;
/// Most ranges in one PageRequest, and most pages in all of them together (one page frame
/// answers a request: at most its data pages).
pub const MAX_REQUEST_RANGES: usize = 64;
pub const MAX_REQUEST_PAGES: u32 = crate::pages::MAX_DATA_PAGES as u32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A failed read or write, in words (its OS error text included where it adds to them).
    #[error("{}", connection_error(.0))]
    Io(std::io::Error),
    #[error("{0}")]
    Codec(#[from] crate::codec::Error),
    #[error("expected {expected}, the peer sent {found:?}")]
    Unexpected {
        expected: &'static str,
        found: String,
    },
    #[error("message {tag:?} of {len} bytes exceeds the cap of {MAX_MESSAGE}")]
    TooLarge { tag: String, len: u32 },
    #[error("{0}")]
    Pages(#[from] crate::pages::Error),
    #[error("the peer speaks TLS (it was given --key-file or --tls-dir): give this side the same")]
    Tls,
    #[error("the peer asked for {pages} pages at {gpa:#x}, which are not guest RAM")]
    NotRam { gpa: u64, pages: u32 },
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

/// A connection failure in words: a peer that closed the connection or fell silent past
/// the socket's timeout says so, rather than as an OS error code.
fn connection_error(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof => "the peer closed the connection".into(),
        ConnectionReset | ConnectionAborted | BrokenPipe => {
            format!("the peer closed the connection ({e})")
        }
        // A socket's own timeout; a timeout with words of its own (a deadline) says them.
        WouldBlock | TimedOut if e.get_ref().is_none() => {
            "the peer sent or took nothing within the peer timeout".into()
        }
        WouldBlock | TimedOut => e.to_string(),
        _ => format!("connection: {e}"),
    }
}

/// The source's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub format_version: u32,
    pub memory: u64,
    pub vcpus: u32,
    /// The guest CPU profile, as its JSON file text.
    pub cpu_profile: String,
    /// The guest CPU as the source runs it (format version 2 on; None from a version 1
    /// source).
    pub guest_cpu: Option<GuestCpu>,
    /// What backs each virtio device, in bus order (format version 3 on; none before): the
    /// destination checks its own against these before any memory moves.
    pub devices: Vec<DeviceBackend>,
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Accept,
    Refuse(String),
    Restored,
    Failed(String),
    Commit,
    /// The destination has taken the guest after Commit (the source ends its copy).
    Running,
    /// The source gives up (cancelled, timed out); the guest stays with it.
    Cancel(String),
    /// The VM stream (stream::write_vm) follows this frame.
    State,
    /// Answer Synced once every page sent before this is in guest RAM.
    Sync,
    /// Before round 0: which blocks of guest-physical memory hold a page the source has
    /// touched ([`TOUCHED_BLOCK`], [`touched_words`] of them). A hint for the
    /// destination to back that RAM ahead of the pages; round 0 itself decides what is sent.
    Touched(Vec<u64>),
    /// The answer to Sync.
    Synced,
    /// Authentication (crate::auth): the source's nonce.
    AuthChallenge([u8; 32]),
    /// The destination's nonce and proof.
    AuthResponse([u8; 32], [u8; 32]),
    /// The source's proof.
    AuthProof([u8; 32]),
    /// Postcopy, before State: pages the destination must fetch after Running, as a bitmap
    /// of 4 KiB pages (bit b of word w: page `first_page + 64 w + b`; `first_page` a
    /// multiple of 64).
    Missing {
        first_page: u64,
        words: Vec<u64>,
    },
    /// Postcopy, from the destination: send these (guest address, pages) now.
    PageRequest(Vec<(u64, u32)>),
    /// Postcopy, from the destination: every missing page has arrived.
    PostcopyDone,
}

/// What the destination reads during precopy.
#[derive(Debug)]
pub enum Precopy {
    /// A page frame's checked head; its page data and CRC follow in the stream.
    Pages(crate::pages::FrameHead),
    Cancel(String),
    State,
    Sync,
    Touched(Vec<u64>),
    Missing {
        first_page: u64,
        words: Vec<u64>,
    },
}

impl Message {
    fn tag(&self) -> &'static [u8; 4] {
        match self {
            Message::Hello(_) => b"HELO",
            Message::Accept => b"ACPT",
            Message::Refuse(_) => b"RFSE",
            Message::Restored => b"RSTD",
            Message::Failed(_) => b"FAIL",
            Message::Commit => b"CMIT",
            Message::Running => b"RUNG",
            Message::Cancel(_) => b"CNCL",
            Message::State => b"VMST",
            Message::Sync => b"SYNC",
            Message::Touched(_) => b"TUCH",
            Message::Synced => b"SYND",
            Message::AuthChallenge(_) => b"AUT1",
            Message::AuthResponse(..) => b"AUT2",
            Message::AuthProof(_) => b"AUT3",
            Message::Missing { .. } => b"MISS",
            Message::PageRequest(_) => b"PREQ",
            Message::PostcopyDone => b"PDON",
        }
    }

    /// A short name for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Accept => "Accept",
            Message::Refuse(_) => "Refuse",
            Message::Restored => "Restored",
            Message::Failed(_) => "Failed",
            Message::Commit => "Commit",
            Message::Running => "Running",
            Message::Cancel(_) => "Cancel",
            Message::State => "State",
            Message::Sync => "Sync",
            Message::Touched(_) => "Touched",
            Message::Synced => "Synced",
            Message::AuthChallenge(_) => "AuthChallenge",
            Message::AuthResponse(..) => "AuthResponse",
            Message::AuthProof(_) => "AuthProof",
            Message::Missing { .. } => "Missing",
            Message::PageRequest(_) => "PageRequest",
            Message::PostcopyDone => "PostcopyDone",
        }
    }
}

impl Hello {
    pub fn new(memory: u64, vcpus: u32, cpu_profile: String, guest_cpu: Option<GuestCpu>) -> Self {
        Hello {
            format_version: FORMAT_VERSION,
            memory,
            vcpus,
            cpu_profile,
            guest_cpu,
            devices: Vec::new(),
        }
    }

    /// The same Hello, with the VM's virtio devices.
    pub fn with_devices(mut self, devices: Vec<DeviceBackend>) -> Self {
        self.devices = devices;
        self
    }
}

/// Writes one message and flushes; returns the bytes written.
pub fn send(w: &mut impl Write, m: &Message) -> Result<u64, Error> {
    let mut e = Encoder::new();
    payload::encode(&mut e, m)?;
    let payload = e.into_inner();
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(m.tag());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(frame.len() as u64)
}

/// Reads a frame head: tag and payload length.
fn read_head(r: &mut impl Read) -> Result<([u8; 4], u32), Error> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    // A TLS record (handshake, alert) where a frame should begin: no tag starts so.
    if (0x14..=0x17).contains(&head[0]) && head[1] == 0x03 {
        return Err(Error::Tls);
    }
    let tag: [u8; 4] = head[..4].try_into().expect("4 bytes");
    Ok((
        tag,
        u32::from_le_bytes(head[4..].try_into().expect("4 bytes")),
    ))
}

/// Reads one message (its payload only after the length is checked against the cap).
pub fn recv(r: &mut impl Read) -> Result<Message, Error> {
    let (tag, len) = read_head(r)?;
    payload::message(r, tag, len)
}

/// Reads what comes during precopy: a page frame's head (checked; the caller reads its
/// pages and CRC, see [`crate::pages::FrameHead`]), Sync, Cancel or State. Anything else is
/// an error.
pub fn recv_precopy(r: &mut impl Read) -> Result<Precopy, Error> {
    let (tag, len) = read_head(r)?;
    if tag == crate::pages::TAG {
        return Ok(Precopy::Pages(crate::pages::read_head(r, len as usize)?));
    }
    match payload::message(r, tag, len)? {
        Message::Cancel(reason) => Ok(Precopy::Cancel(reason)),
        Message::State => Ok(Precopy::State),
        Message::Sync => Ok(Precopy::Sync),
        Message::Touched(words) => Ok(Precopy::Touched(words)),
        Message::Missing { first_page, words } => Ok(Precopy::Missing { first_page, words }),
        other => Err(Error::Unexpected {
            expected: "Pages, Sync, Touched, Missing, Cancel or State",
            found: other.name().into(),
        }),
    }
}

/// A peer's text as it may appear in an error line: control characters (a newline, a
/// terminal escape) written as escapes, so that a peer cannot add lines to a log or steer
/// a terminal; everything else as it is.
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Checks a PageRequest's ranges against guest RAM (`regions`: start and length of each):
/// every range page-aligned and inside one region, its end computed without overflow, so
/// that the source reads only guest RAM for it. One line naming the first that is not.
pub fn check_request(ranges: &[(u64, u32)], regions: &[(u64, u64)]) -> Result<(), Error> {
    const PAGE: u64 = crate::limits::PAGE_SIZE;
    for &(gpa, n) in ranges {
        let end = gpa.checked_add(u64::from(n) * PAGE);
        let inside = regions.iter().any(|&(start, len)| {
            gpa >= start && end.is_some_and(|e| start.checked_add(len).is_some_and(|r| e <= r))
        });
        if gpa % PAGE != 0 || !inside {
            return Err(Error::NotRam { gpa, pages: n });
        }
    }
    Ok(())
}

/// Reads a message and requires it to be `expected` (by name); Refuse and Failed come back
/// as they are, for the caller to report.
pub fn expect(r: &mut impl Read, expected: &'static str) -> Result<Message, Error> {
    let m = recv(r)?;
    match &m {
        m if m.name() == expected => Ok(m.clone()),
        Message::Refuse(_) | Message::Failed(_) => Ok(m),
        other => Err(Error::Unexpected {
            expected,
            found: other.name().into(),
        }),
    }
}

mod payload;
#[cfg(test)]
mod tests;
