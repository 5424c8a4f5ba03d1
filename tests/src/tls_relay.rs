//! An attacker on the path of an encrypted migration: a TCP hop between source and
//! destination that forwards TLS records (5-byte header: type, version, length; then the
//! body) and tampers with one of them, chosen by direction and index: flips a bit of it,
//! drops it, swaps it with the next, or sends it twice. It cannot read them; what it does
//! is what anyone on the network path can do to bytes it cannot decrypt.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What is done to the chosen record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// One bit of its body flipped.
    Flip,
    /// Not forwarded (the connection stays open).
    Drop,
    /// Forwarded after the record that follows it.
    Reorder,
    /// Forwarded twice.
    Replay,
}

/// Which way the chosen record travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ToDestination,
    ToSource,
}

/// The record to tamper with: the `index`-th (from 1) going `dir`.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub dir: Dir,
    pub index: usize,
    pub tamper: Tamper,
}

/// A relay for one connection; counts the records it forwarded each way.
#[derive(Debug)]
pub struct TlsRelay {
    pub port: u16,
    counts: Arc<[AtomicUsize; 2]>,
}

/// The largest record a peer may send (RFC 8446: 2^14 + 256 bytes of body).
const MAX_RECORD: usize = (1 << 14) + 256;

fn read_record(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut rec = vec![0u8; 5];
    r.read_exact(&mut rec)?;
    let len = u16::from_be_bytes([rec[3], rec[4]]) as usize;
    if len > MAX_RECORD {
        return Err(std::io::Error::other(format!("a record of {len} bytes")));
    }
    rec.resize(5 + len, 0);
    r.read_exact(&mut rec[5..])?;
    Ok(rec)
}

/// Forwards records from `from` to `to`, tampering with record `target` (if any), counting
/// into `count`; at the end shuts `to` down for writing (and `from` for reading).
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    target: Option<(usize, Tamper)>,
    count: &AtomicUsize,
) {
    let mut held: Option<Vec<u8>> = None;
    while let Ok(mut rec) = read_record(&mut from) {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        let mut out: Vec<Vec<u8>> = Vec::new();
        match target {
            Some((i, t)) if i == n => match t {
                Tamper::Flip => {
                    let at = (5 + (rec.len() - 5) / 2).min(rec.len() - 1);
                    rec[at] ^= 0x20;
                    out.push(rec);
                }
                Tamper::Drop => {}
                Tamper::Reorder => held = Some(rec),
                Tamper::Replay => {
                    out.push(rec.clone());
                    out.push(rec);
                }
            },
            _ => {
                out.push(rec);
                out.extend(held.take());
            }
        }
        if out.iter().any(|r| to.write_all(r).is_err()) {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

impl TlsRelay {
    /// Listens on a loopback port for the source; on its connection, connects to the
    /// destination at `to_port` and forwards both ways, doing `target` if given.
    pub fn start(to_port: u16, target: Option<Target>) -> TlsRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let port = listener.local_addr().unwrap().port();
        let counts: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let c = counts.clone();
        std::thread::spawn(move || {
            let Ok((src, _)) = listener.accept() else {
                return;
            };
            let Ok(dst) = TcpStream::connect(("127.0.0.1", to_port)) else {
                return;
            };
            let pick = move |d: Dir| target.filter(|t| t.dir == d).map(|t| (t.index, t.tamper));
            let (s2, d2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            let c2 = c.clone();
            let back = std::thread::spawn(move || pump(d2, s2, pick(Dir::ToSource), &c2[1]));
            pump(src, dst, pick(Dir::ToDestination), &c[0]);
            let _ = back.join();
        });
        TlsRelay { port, counts }
    }

    pub fn url(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.port)
    }

    /// Records forwarded so far: (to the destination, to the source).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.counts[0].load(Ordering::SeqCst),
            self.counts[1].load(Ordering::SeqCst),
        )
    }
}
