//! A fault relay: a TCP hop between a migrating source and its destination that forwards
//! the protocol frame by frame (docs/migration-format.md, "Protocol") until a chosen point,
//! then freezes both directions so that the test can inject a fault there: kill a side,
//! close the connection, or leave it stalled. It reads the frames only to know where the
//! migration is; the bytes it forwards are the peers' own.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Where the relay freezes the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The source's Hello is held: the source waits for Accept, the destination for Hello.
    Hello,
    /// The source's n-th page frame (from 1) is held: precopy is under way.
    Pages(u32),
    /// The source's State frame is forwarded and the VM stream behind it held: the guest is
    /// paused at the source, the destination reads its state.
    State,
    /// The destination's Restored is held: it has the guest, paused, and waits for Commit.
    Restored,
    /// Commit is forwarded and the destination's answer (Running) held: the guest runs at
    /// the destination, the source has not heard so.
    Running,
    /// Postcopy: the destination's n-th PageRequest (from 1) is held: the guest runs at the
    /// destination, which waits for pages only the source has.
    PageRequest(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Frozen,
    Closed,
}

#[derive(Debug)]
struct Shared {
    mode: Mutex<Mode>,
    changed: Condvar,
    sockets: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn set(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
        self.changed.notify_all();
    }

    /// Parks until the relay is closed (a frozen relay neither forwards nor reads).
    fn park_unless_forwarding(&self) -> bool {
        let mut m = self.mode.lock().unwrap();
        while *m == Mode::Frozen {
            m = self.changed.wait(m).unwrap();
        }
        *m == Mode::Forward
    }

    fn close(&self) {
        self.set(Mode::Closed);
        for s in self.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// What the relay reports to the test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Frozen at the chosen point.
    Frozen,
    /// A side closed its connection before that point.
    Ended(String),
}

/// A relay for one migration.
#[derive(Debug)]
pub struct Relay {
    pub port: u16,
    shared: Arc<Shared>,
    events: Receiver<Event>,
}

/// One unit the relay reads: a protocol frame (tag, whole bytes) or, inside the VM stream,
/// a chunk of raw bytes.
struct Unit {
    tag: [u8; 4],
    bytes: Vec<u8>,
}

/// The largest frame the relay reads whole (a page frame is about 2 MiB).
const MAX_FRAME: usize = 64 << 20;

fn read_frame(r: &mut impl Read) -> std::io::Result<Unit> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    let len = u32::from_le_bytes(head[4..].try_into().unwrap()) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut bytes = head.to_vec();
    bytes.resize(8 + len, 0);
    r.read_exact(&mut bytes[8..])?;
    Ok(Unit {
        tag: head[..4].try_into().unwrap(),
        bytes,
    })
}

fn read_raw(r: &mut impl Read) -> std::io::Result<Unit> {
    let mut bytes = vec![0u8; 64 << 10];
    let n = r.read(&mut bytes)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    bytes.truncate(n);
    Ok(Unit {
        tag: *b"raw ",
        bytes,
    })
}

impl Relay {
    /// Listens on a loopback port for the source; on its connection, connects to the
    /// destination at `to_port` and relays until `at`.
    pub fn start(at: At, to_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Forward),
            changed: Condvar::new(),
            sockets: Mutex::new(Vec::new()),
        });
        let (tx, events) = channel();
        let sh = shared.clone();
        std::thread::spawn(move || {
            let Ok((src, _)) = listener.accept() else {
                return;
            };
            let dst = match TcpStream::connect(("127.0.0.1", to_port)) {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(Event::Ended(format!("connecting to the destination: {e}")));
                    return;
                }
            };
            let _ = src.set_nodelay(true);
            let _ = dst.set_nodelay(true);
            sh.sockets
                .lock()
                .unwrap()
                .extend([src.try_clone().unwrap(), dst.try_clone().unwrap()]);
            let (s2, d2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            let (sh2, tx2) = (sh.clone(), tx.clone());
            std::thread::spawn(move || pump_to_source(d2, s2, at, &sh2, &tx2));
            pump_to_destination(src, dst, at, &sh, &tx);
        });
        Relay {
            port,
            shared,
            events,
        }
    }

    /// The address to give the source.
    pub fn url(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.port)
    }

    /// Waits until the relay froze at its point; panics if a side ended first or `limit`
    /// passed.
    pub fn wait_frozen(&self, limit: Duration) {
        match self.events.recv_timeout(limit) {
            Ok(Event::Frozen) => {}
            Ok(Event::Ended(why)) => panic!("the migration ended before the fault point: {why}"),
            Err(_) => panic!("the migration did not reach the fault point within {limit:?}"),
        }
    }

    /// Closes both connections, as a network that drops them (a killed process's kernel
    /// closes its side too: the relay then closes the other).
    pub fn close(&self) {
        self.shared.close();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// What a pump does with a unit: forward it, forward it and then freeze, or freeze holding it.
#[derive(PartialEq)]
enum Step {
    Forward,
    ForwardThenFreeze,
    Hold,
}

fn freeze(sh: &Shared, tx: &Sender<Event>) {
    let mut m = sh.mode.lock().unwrap();
    if *m == Mode::Forward {
        *m = Mode::Frozen;
        let _ = tx.send(Event::Frozen);
    }
}

/// Moves units from `from` to `to`, deciding per unit with `step`; `next` reads the next unit.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    sh: &Shared,
    tx: &Sender<Event>,
    mut next: impl FnMut(&mut TcpStream) -> std::io::Result<Unit>,
    mut step: impl FnMut(&Unit) -> Step,
) {
    loop {
        let unit = match next(&mut from) {
            Ok(u) => u,
            Err(e) => {
                // A side closed (or the relay was closed): pass it on, unless frozen, where
                // the test decides what the network does.
                if sh.park_unless_forwarding() {
                    let _ = tx.send(Event::Ended(format!("{e}")));
                    sh.close();
                }
                return;
            }
        };
        if !sh.park_unless_forwarding() {
            return;
        }
        let s = step(&unit);
        if s == Step::Hold {
            freeze(sh, tx);
            sh.park_unless_forwarding();
            return;
        }
        if to.write_all(&unit.bytes).is_err() {
            if sh.park_unless_forwarding() {
                sh.close();
            }
            return;
        }
        if s == Step::ForwardThenFreeze {
            freeze(sh, tx);
            sh.park_unless_forwarding();
            return;
        }
    }
}

/// Source to destination: frames until State, then the VM stream and Commit as raw bytes.
fn pump_to_destination(from: TcpStream, to: TcpStream, at: At, sh: &Shared, tx: &Sender<Event>) {
    let raw = std::cell::Cell::new(false);
    let mut pages = 0;
    pump(
        from,
        to,
        sh,
        tx,
        |r| {
            if raw.get() {
                read_raw(r)
            } else {
                read_frame(r)
            }
        },
        |u| match &u.tag {
            b"HELO" if at == At::Hello => Step::Hold,
            b"PAGS" => {
                pages += 1;
                if at == At::Pages(pages) {
                    Step::Hold
                } else {
                    Step::Forward
                }
            }
            b"VMST" => {
                raw.set(true);
                if at == At::State {
                    Step::ForwardThenFreeze
                } else {
                    Step::Forward
                }
            }
            _ => Step::Forward,
        },
    );
}

/// Destination to source: every message is a frame.
fn pump_to_source(from: TcpStream, to: TcpStream, at: At, sh: &Shared, tx: &Sender<Event>) {
    let mut requests = 0;
    pump(from, to, sh, tx, read_frame, |u| match &u.tag {
        b"RSTD" if at == At::Restored => Step::Hold,
        b"RUNG" if at == At::Running => Step::Hold,
        b"PREQ" => {
            requests += 1;
            if at == At::PageRequest(requests) {
                Step::Hold
            } else {
                Step::Forward
            }
        }
        _ => Step::Forward,
    });
}
