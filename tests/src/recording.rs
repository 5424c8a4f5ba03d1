//! The source's side of a live migration, recorded and played back (docs/cross-vendor.md,
//! "Streams"): a relay between a real source and a real destination keeps every byte the
//! source sent, in order, and each answer of the destination the source heard, at the point
//! where it heard it; a player sends those bytes into another `ferry receive`, on another
//! host, and checks that it answers as the recording says.
//!
//! A recording file is `FERRYREC`, a u32 version (1), then entries, each a kind byte:
//! `S` u32 length and that many bytes the source sent; `A` a 4-byte frame tag, u32 length
//! and that many payload bytes: a frame the destination sent (docs/migration-format.md,
//! section 14); `E`: the end. Numbers are little-endian. The player sends an `S` entry's
//! bytes, and at an `A` entry reads the destination's next frame, which must carry that tag.
//! An answer is logged after every source byte that reached the destination before it was
//! made, so a player that waits where the log says never waits for an answer the
//! destination cannot give yet.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MAGIC: &[u8; 8] = b"FERRYREC";
const VERSION: u32 = 1;
/// The largest entry a reader accepts: a page frame is about 2 MiB, a VM stream's bytes are
/// logged in the relay's chunks.
const MAX_ENTRY: usize = 64 << 20;
/// The most a recording may hold in all (a 256 MiB guest's stream is far less).
const MAX_TOTAL: usize = 4 << 30;

/// One entry of a recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Bytes the source sent.
    Sent(Vec<u8>),
    /// A frame the destination sent, which the source heard here.
    Answer { tag: [u8; 4], payload: Vec<u8> },
}

/// A recorded source side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recording {
    pub entries: Vec<Entry>,
}

fn u32_of(r: &mut impl Read, what: &str) -> Result<u32, String> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(|e| format!("{what}: {e}"))?;
    Ok(u32::from_le_bytes(b))
}

fn bytes_of(r: &mut impl Read, what: &str, total: &mut usize) -> Result<Vec<u8>, String> {
    let len = u32_of(r, what)? as usize;
    *total += len;
    if len > MAX_ENTRY || *total > MAX_TOTAL {
        return Err(format!(
            "{what}: {len} bytes is more than a recording holds"
        ));
    }
    let mut v = vec![0u8; len];
    r.read_exact(&mut v).map_err(|e| format!("{what}: {e}"))?;
    Ok(v)
}

impl Recording {
    /// Reads a recording, plain or zstd-compressed (by its name's `.zst`).
    pub fn read_file(path: &Path) -> Result<Recording, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = std::io::BufReader::new(file);
        let r = if path.extension().is_some_and(|x| x == "zst") {
            let z = ruzstd::decoding::StreamingDecoder::new(file)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Recording::read(&mut std::io::BufReader::new(z))
        } else {
            Recording::read(&mut { file })
        };
        r.map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads a recording from `r`, bounded: a malformed one is an error, never a panic or an
    /// unbounded allocation.
    pub fn read(r: &mut impl Read) -> Result<Recording, String> {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)
            .map_err(|e| format!("magic: {e}"))?;
        if &magic != MAGIC {
            return Err("not a ferry stream recording".into());
        }
        let v = u32_of(r, "version")?;
        if v != VERSION {
            return Err(format!(
                "recording version {v}; this reader reads {VERSION}"
            ));
        }
        let (mut entries, mut total) = (Vec::new(), 0usize);
        loop {
            let mut kind = [0u8; 1];
            r.read_exact(&mut kind).map_err(|e| format!("entry: {e}"))?;
            match &kind {
                b"S" => entries.push(Entry::Sent(bytes_of(r, "sent bytes", &mut total)?)),
                b"A" => {
                    let mut tag = [0u8; 4];
                    r.read_exact(&mut tag).map_err(|e| format!("answer: {e}"))?;
                    let payload = bytes_of(r, "answer", &mut total)?;
                    entries.push(Entry::Answer { tag, payload });
                }
                b"E" => return Ok(Recording { entries }),
                k => return Err(format!("unknown entry kind {:#04x}", k[0])),
            }
        }
    }

    /// Writes the recording (uncompressed).
    pub fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        for e in &self.entries {
            match e {
                Entry::Sent(b) => {
                    w.write_all(b"S")?;
                    w.write_all(&(b.len() as u32).to_le_bytes())?;
                    w.write_all(b)?;
                }
                Entry::Answer { tag, payload } => {
                    w.write_all(b"A")?;
                    w.write_all(tag)?;
                    w.write_all(&(payload.len() as u32).to_le_bytes())?;
                    w.write_all(payload)?;
                }
            }
        }
        w.write_all(b"E")
    }

    /// Appends bytes the source sent (joined to the last entry if that was a send too).
    fn sent(&mut self, b: &[u8]) {
        match self.entries.last_mut() {
            Some(Entry::Sent(v)) => v.extend_from_slice(b),
            _ => self.entries.push(Entry::Sent(b.to_vec())),
        }
    }

    /// The Hello that opens the stream.
    pub fn hello(&self) -> Result<migration::protocol::Hello, String> {
        let Some(Entry::Sent(first)) = self.entries.first() else {
            return Err("the recording does not start with the source's bytes".into());
        };
        match migration::protocol::recv(&mut &first[..]) {
            Ok(migration::protocol::Message::Hello(h)) => Ok(h),
            Ok(m) => Err(format!("the stream opens with {}, not Hello", m.name())),
            Err(e) => Err(format!("the stream's Hello: {e}")),
        }
    }

    /// The same recording with its Hello claiming format `version` (for the test of a newer
    /// stream than this ferry reads).
    pub fn with_hello_version(&self, version: u32) -> Recording {
        let mut r = self.clone();
        if let Some(Entry::Sent(first)) = r.entries.first_mut() {
            if first.len() >= 12 && &first[..4] == b"HELO" {
                first[8..12].copy_from_slice(&version.to_le_bytes());
            }
        }
        r
    }

    /// The tags of the answers, in order.
    pub fn answers(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                Entry::Answer { tag, .. } => Some(String::from_utf8_lossy(tag).into_owned()),
                Entry::Sent(_) => None,
            })
            .collect()
    }

    /// Bytes the source sent in all.
    pub fn sent_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| match e {
                Entry::Sent(b) => b.len(),
                Entry::Answer { .. } => 0,
            })
            .sum()
    }
}

/// A destination's frame: tag and payload.
fn read_answer(r: &mut impl Read) -> std::io::Result<([u8; 4], Vec<u8>)> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    let len = u32::from_le_bytes(head[4..].try_into().unwrap());
    if len > migration::protocol::MAX_MESSAGE {
        return Err(std::io::Error::other(format!("an answer of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok((head[..4].try_into().unwrap(), payload))
}

/// A reason string of a Refuse or Failed frame (u32 length, UTF-8).
fn reason(payload: &[u8]) -> String {
    let text = payload.get(4..).unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

/// How a played stream went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlayError {
    /// The destination refused or failed it, in its own words (`RFSE`, `FAIL`).
    Refused { tag: String, reason: String },
    /// It answered something the recording does not have there.
    Unexpected { want: String, got: String },
    /// The connection failed.
    Io(String),
}

impl std::fmt::Display for PlayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlayError::Refused { tag, reason } => {
                write!(f, "the destination answered {tag}: {reason}")
            }
            PlayError::Unexpected { want, got } => {
                write!(
                    f,
                    "the destination answered {got} where the recording has {want}"
                )
            }
            PlayError::Io(e) => write!(f, "{e}"),
        }
    }
}

fn answer_error(tag: [u8; 4], payload: &[u8], want: &[u8; 4]) -> PlayError {
    let got = String::from_utf8_lossy(&tag).into_owned();
    if &tag == b"RFSE" || &tag == b"FAIL" {
        return PlayError::Refused {
            tag: got,
            reason: reason(payload),
        };
    }
    PlayError::Unexpected {
        want: String::from_utf8_lossy(want).into_owned(),
        got,
    }
}

/// Plays `rec` into the destination listening on the Unix socket `to`: sends each run of the
/// source's bytes, checks each answer's tag where the recording has it. Returns the answers'
/// tags. Every read and write is bounded by `limit`.
pub fn play(rec: &Recording, to: &Path, limit: Duration) -> Result<Vec<String>, PlayError> {
    let io = |what: &str, e: std::io::Error| PlayError::Io(format!("{what}: {e}"));
    let mut s = UnixStream::connect(to).map_err(|e| io("connecting", e))?;
    s.set_read_timeout(Some(limit))
        .map_err(|e| io("socket", e))?;
    s.set_write_timeout(Some(limit))
        .map_err(|e| io("socket", e))?;
    let mut heard = Vec::new();
    for e in &rec.entries {
        match e {
            Entry::Sent(b) => {
                if let Err(w) = s.write_all(b) {
                    // A destination that gave up says why before it closes.
                    return Err(match read_answer(&mut s) {
                        Ok((tag, payload)) => answer_error(tag, &payload, b"????"),
                        Err(_) => io("sending", w),
                    });
                }
            }
            Entry::Answer { tag, .. } => {
                let (got, payload) = read_answer(&mut s)
                    .map_err(|e| io(&format!("waiting for {}", String::from_utf8_lossy(tag)), e))?;
                if &got != tag {
                    return Err(answer_error(got, &payload, tag));
                }
                heard.push(String::from_utf8_lossy(&got).into_owned());
            }
        }
    }
    Ok(heard)
}

/// Called with each answer's tag before the relay passes it on to the source.
pub type OnAnswer = Box<dyn FnMut(&[u8; 4]) + Send>;

/// A recording relay: a Unix socket for the source, each connection relayed to the
/// destination's socket and recorded.
#[derive(Debug)]
pub struct Recorder {
    log: Arc<Mutex<Recording>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Recorder {
    /// Listens on `at`; relays the first connection to `to`, calling `on_answer` with each
    /// answer before forwarding it.
    pub fn start(at: &Path, to: &Path, mut on_answer: OnAnswer) -> Recorder {
        let _ = std::fs::remove_file(at);
        let listener = UnixListener::bind(at).unwrap_or_else(|e| panic!("{}: {e}", at.display()));
        let to = to.to_path_buf();
        let log = Arc::new(Mutex::new(Recording::default()));
        let l2 = log.clone();
        let thread = std::thread::spawn(move || {
            let (src, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            let dst = UnixStream::connect(&to).map_err(|e| format!("{}: {e}", to.display()))?;
            let (mut src_r, mut dst_w) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            let l3 = l2.clone();
            let up = std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    let n = match src_r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    l3.lock().unwrap().sent(&buf[..n]);
                    if dst_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = dst_w.shutdown(std::net::Shutdown::Write);
            });
            let (mut dst_r, mut src_w) = (dst, src);
            while let Ok((tag, payload)) = read_answer(&mut dst_r) {
                on_answer(&tag);
                l2.lock().unwrap().entries.push(Entry::Answer {
                    tag,
                    payload: payload.clone(),
                });
                let mut frame = tag.to_vec();
                frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                frame.extend_from_slice(&payload);
                if src_w.write_all(&frame).is_err() {
                    break;
                }
            }
            let _ = src_w.shutdown(std::net::Shutdown::Both);
            up.join()
                .map_err(|_| "the relay's sending thread panicked".to_string())
        });
        Recorder {
            log,
            thread: Some(thread),
        }
    }

    /// Waits for both directions to end and returns what was recorded.
    pub fn finish(mut self) -> Result<Recording, String> {
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| "the relay panicked".to_string())??;
        }
        Ok(std::mem::take(&mut *self.log.lock().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Recording {
        Recording {
            entries: vec![
                Entry::Sent(b"HELO\x04\0\0\0\x03\0\0\0".to_vec()),
                Entry::Answer {
                    tag: *b"ACPT",
                    payload: vec![],
                },
                Entry::Sent(vec![7; 100]),
            ],
        }
    }

    #[test]
    fn a_recording_reads_back_as_written() {
        let mut buf = Vec::new();
        sample().write(&mut buf).unwrap();
        assert_eq!(Recording::read(&mut &buf[..]).unwrap(), sample());
        // Cut anywhere, it is an error, never a panic.
        for cut in 0..buf.len() {
            assert!(Recording::read(&mut &buf[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_huge_entry_is_refused_before_it_is_allocated() {
        let mut buf = MAGIC.to_vec();
        buf.extend(VERSION.to_le_bytes());
        buf.push(b'S');
        buf.extend(u32::MAX.to_le_bytes());
        let err = Recording::read(&mut &buf[..]).unwrap_err();
        assert!(err.contains("more than a recording holds"), "{err}");
    }

    #[test]
    fn the_hello_version_is_patched_in_place() {
        let r = sample().with_hello_version(9);
        let Entry::Sent(b) = &r.entries[0] else {
            panic!()
        };
        assert_eq!(&b[8..12], &9u32.to_le_bytes());
        assert_eq!(r.answers(), vec!["ACPT".to_string()]);
        assert_eq!(r.sent_bytes(), 112);
    }
}
