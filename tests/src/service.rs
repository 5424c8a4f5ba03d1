//! The test guest's network service (tests/guest/ferry_service.c) from the host side: a
//! client for its line protocol, and a reader of the request log it keeps on its disk.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Where a guest's log records start, and their size: one per 512-byte sector.
pub const RECORD: usize = 512;
const MAGIC: &[u8; 8] = b"FERRYLOG";

/// CRC-32 (IEEE 802.3, as zlib computes it).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// One record of the guest's request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub request: u64,
}

/// What a disk image holds: the valid records from sector 0 on, and why the log ends where it
/// does (`None`: a zero sector or the end of the image, the clean ends).
#[derive(Debug)]
pub struct Log {
    pub records: Vec<Record>,
    pub bad_end: Option<String>,
}

fn u64_at(s: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Reads the log of a disk image.
pub fn read_log(image: &[u8]) -> Log {
    let mut records = Vec::new();
    for (i, s) in image.chunks_exact(RECORD).enumerate() {
        let seq = i as u64 + 1;
        if s.iter().all(|&b| b == 0) {
            return Log {
                records,
                bad_end: None,
            };
        }
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&s[24..28]);
        let why = if &s[..8] != MAGIC {
            Some("no magic")
        } else if u64_at(s, 8) != seq {
            Some("wrong sequence number")
        } else if u32::from_le_bytes(crc) != crc32(&s[..24]) {
            Some("bad checksum")
        } else {
            None
        };
        if let Some(why) = why {
            return Log {
                records,
                bad_end: Some(format!("sector {i}: {why}")),
            };
        }
        records.push(Record {
            seq,
            request: u64_at(s, 16),
        });
    }
    Log {
        records,
        bad_end: None,
    }
}

/// A connection to the service.
#[derive(Debug)]
pub struct Client {
    out: TcpStream,
    inp: BufReader<TcpStream>,
}

impl Client {
    /// Connects to `addr`, retrying for up to `limit` (the card may still be coming up).
    pub fn connect(addr: SocketAddr, limit: Duration) -> std::io::Result<Client> {
        let start = Instant::now();
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > limit => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Client {
            inp: BufReader::new(stream.try_clone()?),
            out: stream,
        })
    }

    /// Sends one request line and returns the answer line.
    pub fn call(&mut self, line: &str) -> std::io::Result<String> {
        self.out.write_all(format!("{line}\n").as_bytes())?;
        self.answer()
    }

    fn answer(&mut self) -> std::io::Result<String> {
        let mut s = String::new();
        if self.inp.read_line(&mut s)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(s.trim_end().to_string())
    }

    /// `REQ n`: the seq the service logged it under, or the answer that was not an ACK of n.
    pub fn request(&mut self, n: u64) -> std::io::Result<Result<u64, String>> {
        let a = self.call(&format!("REQ {n}"))?;
        let seq = a
            .strip_prefix(&format!("ACK {n} "))
            .and_then(|s| s.parse().ok());
        Ok(seq.ok_or(a))
    }

    /// `SINK bytes`: sends `bytes` bytes after the request line.
    pub fn sink(&mut self, bytes: u64) -> std::io::Result<String> {
        self.out.write_all(format!("SINK {bytes}\n").as_bytes())?;
        let chunk = vec![b'y'; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            self.out.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        self.answer()
    }

    /// `SOURCE bytes`: reads the `bytes` bytes the service sends, then its answer.
    pub fn source(&mut self, bytes: u64) -> std::io::Result<String> {
        self.out.write_all(format!("SOURCE {bytes}\n").as_bytes())?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.inp.read_exact(&mut buf[..n])?;
            left -= n as u64;
        }
        // The data ends with "\nSENT <bytes>".
        let blank = self.answer()?;
        if !blank.is_empty() {
            return Ok(blank);
        }
        self.answer()
    }
}

/// The command line of a service client (`ADDR COMMAND ARGS`, see tests/src/bin/service-client.rs):
/// the lines it reports, or what went wrong.
pub fn client_command(args: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let [addr, cmd, rest @ ..] = args else {
        return Err("usage: service-client ADDR COMMAND ARGS".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    let num = |i: usize| -> Result<u64, String> {
        let s = rest.get(i).ok_or(format!("{cmd}: missing a number"))?;
        s.parse().map_err(|e| format!("{cmd} {s}: {e}"))
    };
    let io = |e: std::io::Error| format!("{addr}: {e}");
    if cmd == "probe" {
        let stop = rest.get(1).ok_or("probe: missing the stop file")?;
        return probe(addr, Duration::from_micros(num(0)?), Path::new(stop));
    }
    let mut c = Client::connect(addr, Duration::from_secs(60)).map_err(io)?;
    let start = Instant::now();
    let expect = |got: String, want: String| {
        if got == want {
            Ok(())
        } else {
            Err(format!("answer {got:?}, expected {want:?}"))
        }
    };
    match cmd.as_str() {
        "requests" => {
            let first = num(0)?;
            for n in first..first + num(1)? {
                let seq = c
                    .request(n)
                    .map_err(io)?
                    .map_err(|a| format!("REQ {n}: answer {a:?}"))?;
                out.push(format!("ACK {n} {seq}"));
            }
            return Ok(out);
        }
        "ping" => {
            for n in 0..num(0)? {
                let t = Instant::now();
                expect(
                    c.call(&format!("PING {n}")).map_err(io)?,
                    format!("PONG {n}"),
                )?;
                out.push(format!("rtt_us {:.1}", t.elapsed().as_secs_f64() * 1e6));
            }
            return Ok(out);
        }
        "stream" => {
            let stop = rest.get(1).ok_or("stream: missing the stop file")?;
            let report = match rest.get(2) {
                Some(_) => Duration::from_millis(num(2)?),
                None => GAP_REPORTED,
            };
            return stream(&mut c, num(0)?, Path::new(stop), report)
                .map_err(|e| format!("{addr}: {e}"));
        }
        "sink" => expect(c.sink(num(0)?).map_err(io)?, format!("GOT {}", num(0)?))?,
        "source" => expect(c.source(num(0)?).map_err(io)?, format!("SENT {}", num(0)?))?,
        "diskw" | "diskr" => {
            let line = format!("{} {}", cmd.to_uppercase(), num(0)?);
            expect(c.call(&line).map_err(io)?, format!("DISK {}", num(0)?))?;
        }
        other => return Err(format!("unknown command {other}")),
    }
    out.push(format!("seconds {:.6}", start.elapsed().as_secs_f64()));
    Ok(out)
}

/// Gaps between answers longer than this are listed by [`stream`] unless it is told another.
const GAP_REPORTED: Duration = Duration::from_millis(100);
/// How long [`stream`] goes on at most (a bounded loop, whatever happens to the stop file).
const STREAM_LIMIT: Duration = Duration::from_secs(600);

/// `REQ first`, `REQ first+1`, ... back to back on one connection until `stop` exists (or
/// [`STREAM_LIMIT`]): each answer must acknowledge its request under the next sequence
/// number. Reports the first request and sequence number, how many were answered, the
/// longest gap between two answers, and each gap over `report` with the request it
/// preceded and when it ended (Unix time, ms). Any other answer, a reset or a closed
/// connection ends it with an error.
fn stream(
    c: &mut Client,
    first: u64,
    stop: &Path,
    report: Duration,
) -> Result<Vec<String>, String> {
    let start = Instant::now();
    let mut last = Instant::now();
    let mut longest = Duration::ZERO;
    let mut gaps = Vec::new();
    let mut first_seq = None;
    let mut n = first;
    while !stop.exists() && start.elapsed() < STREAM_LIMIT {
        let seq = c
            .request(n)
            .map_err(|e| format!("REQ {n}: {e}"))?
            .map_err(|a| format!("REQ {n}: answer {a:?}"))?;
        if first_seq.is_none() {
            // For whoever waits for the stream to flow before doing something to the guest.
            eprintln!("streaming: REQ {n} answered");
        }
        let want = *first_seq.get_or_insert(seq) + (n - first);
        if seq != want {
            return Err(format!("REQ {n}: logged as {seq}, expected {want}"));
        }
        let gap = last.elapsed();
        last = Instant::now();
        longest = longest.max(gap);
        if gap > report {
            gaps.push(format!(
                "gap_ms {:.1} before {n} at_unix_ms {}",
                gap.as_secs_f64() * 1e3,
                unix_ms()
            ));
        }
        n += 1;
    }
    let mut out = vec![
        format!("first_request {first}"),
        format!("first_seq {}", first_seq.unwrap_or(0)),
        format!("answered {}", n - first),
        format!("longest_gap_ms {:.1}", longest.as_secs_f64() * 1e3),
        format!("seconds {:.3}", start.elapsed().as_secs_f64()),
    ];
    out.extend(gaps);
    Ok(out)
}

/// Now, in ms since the Unix epoch (comparable across processes).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// UDP probes to the service's echo (the same port, UDP) every `interval` until `stop`
/// exists (or [`STREAM_LIMIT`]): each carries its number; the answers are counted as they
/// come back. Reports how many were sent and answered, and each run of consecutive lost
/// probes with its length and when its first was sent (Unix time, ms).
pub fn probe(addr: SocketAddr, interval: Duration, stop: &Path) -> Result<Vec<String>, String> {
    use std::net::UdpSocket;
    use std::sync::{Arc, Mutex};
    let io = |e: std::io::Error| format!("udp {addr}: {e}");
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(io)?;
    sock.connect(addr).map_err(io)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(io)?;
    let answered = Arc::new(Mutex::new(Vec::<bool>::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rx = sock.try_clone().map_err(io)?;
    let (a, d) = (answered.clone(), done.clone());
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !d.load(std::sync::atomic::Ordering::SeqCst) {
            if let Ok(8) = rx.recv(&mut buf) {
                let n = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default()) as usize;
                let mut a = a.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(slot) = a.get_mut(n) {
                    *slot = true;
                }
            }
        }
    });
    let start = Instant::now();
    let mut sent_at = Vec::new();
    while !stop.exists() && start.elapsed() < STREAM_LIMIT {
        let n = sent_at.len() as u64;
        answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(false);
        sent_at.push(unix_ms());
        // A full socket buffer loses the probe like the network would.
        let _ = sock.send(&n.to_le_bytes());
        let next = start + interval * (n as u32 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = receiver.join();
    let answered = answered.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut out = vec![
        format!("probes_sent {}", sent_at.len()),
        format!(
            "probes_answered {}",
            answered.iter().filter(|a| **a).count()
        ),
    ];
    let mut i = 0;
    while i < answered.len() {
        let len = answered[i..].iter().take_while(|a| !**a).count();
        if len > 0 {
            out.push(format!("lost {len} at_unix_ms {}", sent_at[i]));
        }
        i += len.max(1);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, request: u64) -> Vec<u8> {
        let mut s = vec![0u8; RECORD];
        s[..8].copy_from_slice(MAGIC);
        s[8..16].copy_from_slice(&seq.to_le_bytes());
        s[16..24].copy_from_slice(&request.to_le_bytes());
        let c = crc32(&s[..24]);
        s[24..28].copy_from_slice(&c.to_le_bytes());
        s
    }

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn the_log_ends_at_a_zero_sector_or_names_what_is_wrong() {
        let mut img = [record(1, 7), record(2, 9), vec![0; RECORD]].concat();
        let log = read_log(&img);
        assert_eq!(
            log.records,
            [Record { seq: 1, request: 7 }, Record { seq: 2, request: 9 }]
        );
        assert!(log.bad_end.is_none());
        img[RECORD + 20] ^= 1;
        let log = read_log(&img);
        assert_eq!(log.records.len(), 1);
        assert_eq!(log.bad_end.as_deref(), Some("sector 1: bad checksum"));
        let img = [record(1, 7), record(3, 9)].concat();
        assert_eq!(
            read_log(&img).bad_end.as_deref(),
            Some("sector 1: wrong sequence number")
        );
    }
}
