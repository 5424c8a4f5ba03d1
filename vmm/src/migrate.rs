//! Moving a VM to a peer ferry process (today by stop-and-copy: pause, send the whole state,
//! hand over), with the handshake of migration::protocol. The guest runs on exactly one
//! side: before Commit any failure leaves it running on the source; after Commit it belongs
//! to the destination.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cpuid::profile::CpuProfile;
use cpuid::CpuidDump;
use migration::protocol::{self, Hello, Message};

use crate::vm::Vm;

/// How long either side waits for the peer's next message.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad migration address {0:?}: expected tcp:HOST:PORT or unix:PATH")]
    Address(String),
    #[error("{what} {addr}: {source}")]
    Connect {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("{phase}: {source}")]
    Protocol {
        phase: &'static str,
        source: protocol::Error,
    },
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("the destination failed to restore the VM: {0}")]
    DestinationFailed(String),
    #[error("refused: {0}")]
    RefusedHere(String),
    #[error("restoring: {0}")]
    Restore(String),
    #[error("saving the VM: {0}")]
    Save(String),
    #[error("no Commit from the source ({0}): the guest stays with the source")]
    NoCommit(String),
}

/// A migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Address {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.split_once(':') {
            Some(("tcp", hp))
                if hp
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(Address::Tcp(hp.to_string()))
            }
            Some(("unix", p)) if !p.is_empty() => Ok(Address::Unix(PathBuf::from(p))),
            _ => Err(Error::Address(s.to_string())),
        }
    }
}

/// A connected peer: one stream, read and written.
trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

fn connect(addr: &Address) -> Result<Box<dyn Conn>, Error> {
    let err = |source| Error::Connect {
        what: "connecting to",
        addr: format!("{addr:?}"),
        source,
    };
    Ok(match addr {
        Address::Tcp(hp) => {
            let s = TcpStream::connect(hp).map_err(err)?;
            // Small protocol messages must not wait for Nagle.
            s.set_nodelay(true).map_err(err)?;
            s.set_read_timeout(Some(PEER_TIMEOUT)).map_err(err)?;
            Box::new(s)
        }
        Address::Unix(p) => {
            let s = UnixStream::connect(p).map_err(err)?;
            s.set_read_timeout(Some(PEER_TIMEOUT)).map_err(err)?;
            Box::new(s)
        }
    })
}

/// What a finished migration measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub bytes: u64,
    pub memory_ranges: usize,
}

fn proto(phase: &'static str) -> impl FnOnce(protocol::Error) -> Error {
    move |source| Error::Protocol { phase, source }
}

/// Source side: sends `vm` to the ferry listening at `addr`. On success the VM is paused and
/// belongs to the destination (the caller ends it); on failure it runs here as before.
pub fn send(vm: &Vm, addr: &Address) -> Result<Report, Error> {
    let started = Instant::now();
    let mut conn = connect(addr)?;
    let hello = Hello::new(vm.memory_size(), vm.num_vcpus(), vm.cpu_profile().to_json());
    protocol::send(&mut conn, &Message::Hello(hello)).map_err(proto("handshake"))?;
    match protocol::expect(&mut conn, "Accept").map_err(proto("handshake"))? {
        Message::Accept => {}
        Message::Refuse(r) => return Err(Error::Refused(r)),
        other => return Err(Error::Refused(format!("unexpected {}", other.name()))),
    }
    let _lifecycle = vm.lifecycle();
    let was_paused = vm.state() == crate::vcpu::RunState::Paused;
    let paused_at = Instant::now();
    let result = (|| {
        vm.pause().map_err(|e| Error::Save(e.to_string()))?;
        let state = vm.save_state().map_err(|e| Error::Save(e.to_string()))?;
        let mut w = BufWriter::new(&mut conn);
        let bytes = migration::stream::write_vm(&mut w, &state).map_err(|e| Error::Protocol {
            phase: "sending the VM",
            source: e.into(),
        })?;
        w.flush().map_err(|e| Error::Protocol {
            phase: "sending the VM",
            source: e.into(),
        })?;
        drop(w);
        match protocol::expect(&mut conn, "Restored").map_err(proto("waiting for Restored"))? {
            Message::Restored => {}
            Message::Failed(r) => return Err(Error::DestinationFailed(r)),
            other => {
                return Err(Error::DestinationFailed(format!(
                    "unexpected {}",
                    other.name()
                )))
            }
        }
        protocol::send(&mut conn, &Message::Commit).map_err(proto("sending Commit"))?;
        Ok((bytes, state.memory.len()))
    })();
    match result {
        Ok((bytes, memory_ranges)) => Ok(Report {
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            downtime_ms: paused_at.elapsed().as_secs_f64() * 1e3,
            bytes,
            memory_ranges,
        }),
        Err(e) => {
            if !was_paused {
                if let Err(r) = vm.resume() {
                    log::error!("resuming the VM after a failed migration: {r}");
                }
            }
            Err(e)
        }
    }
}

/// Destination side: waits at `addr` for one VM, checks its CPU profile against this host
/// (or `host`, a recorded one) before any memory is sent, restores it, and returns it once
/// the source has committed. The returned VM is paused; start it.
pub fn receive(
    addr: &Address,
    host: Option<&CpuidDump>,
    console: Box<dyn std::io::Write + Send>,
) -> Result<Vm, Error> {
    let mut conn = accept(addr)?;
    let hello = match protocol::recv(&mut conn).map_err(proto("handshake"))? {
        Message::Hello(h) => h,
        other => {
            return Err(Error::RefusedHere(format!(
                "expected Hello, got {}",
                other.name()
            )))
        }
    };
    if let Err(reason) = acceptable(&hello, host) {
        let _ = protocol::send(&mut conn, &Message::Refuse(reason.clone()));
        return Err(Error::RefusedHere(reason));
    }
    protocol::send(&mut conn, &Message::Accept).map_err(proto("handshake"))?;
    let state =
        migration::stream::read_vm_until_end(&mut BufReader::new(&mut conn)).map_err(|e| {
            Error::Protocol {
                phase: "receiving the VM",
                source: std::io::Error::other(e.to_string()).into(),
            }
        })?;
    let vm = match Vm::restore(&state, console) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = protocol::send(&mut conn, &Message::Failed(e.to_string()));
            return Err(Error::Restore(e.to_string()));
        }
    };
    protocol::send(&mut conn, &Message::Restored).map_err(proto("sending Restored"))?;
    match protocol::recv(&mut conn) {
        Ok(Message::Commit) => Ok(vm),
        Ok(other) => Err(Error::NoCommit(format!("got {}", other.name()))),
        Err(e) => Err(Error::NoCommit(e.to_string())),
    }
}

/// Whether this host can take the VM a Hello describes; the reason if not.
fn acceptable(h: &Hello, host: Option<&CpuidDump>) -> Result<(), String> {
    if h.format_version != migration::stream::FORMAT_VERSION {
        return Err(format!(
            "stream format version {}, this ferry reads version {}",
            h.format_version,
            migration::stream::FORMAT_VERSION
        ));
    }
    let profile = CpuProfile::from_json("the source's CPU profile", &h.cpu_profile)
        .map_err(|e| e.to_string())?;
    let live;
    let host = match host {
        Some(h) => h,
        None => {
            let kvm = crate::vm::open_kvm().map_err(|e| e.to_string())?;
            live = crate::cpu_model::host_dump(&kvm).map_err(|e| e.to_string())?;
            &live
        }
    };
    if !profile.migratable && host.vendor() != Some(profile.identity.vendor) {
        return Err(format!(
            "CPU profile {} describes one host and is not migratable to a host of another vendor",
            profile.name
        ));
    }
    cpuid::profile::check(&profile, host)
        .map_err(|m| format!("this host cannot run CPU profile {}: {m}", profile.name))
}

fn accept(addr: &Address) -> Result<Box<dyn Conn>, Error> {
    let err = |what, source| Error::Connect {
        what,
        addr: format!("{addr:?}"),
        source,
    };
    Ok(match addr {
        Address::Tcp(hp) => {
            let l = TcpListener::bind(hp).map_err(|e| err("listening on", e))?;
            let (s, _) = l.accept().map_err(|e| err("accepting on", e))?;
            s.set_nodelay(true).map_err(|e| err("accepting on", e))?;
            s.set_read_timeout(Some(PEER_TIMEOUT))
                .map_err(|e| err("accepting on", e))?;
            Box::new(s)
        }
        Address::Unix(p) => {
            use std::os::unix::fs::FileTypeExt;
            // Replace only a stale socket, never another kind of file.
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(p);
            }
            let l = UnixListener::bind(p).map_err(|e| err("listening on", e))?;
            let (s, _) = l.accept().map_err(|e| err("accepting on", e))?;
            let _ = std::fs::remove_file(p);
            s.set_read_timeout(Some(PEER_TIMEOUT))
                .map_err(|e| err("accepting on", e))?;
            Box::new(s)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Address>().unwrap(),
            Address::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "unix:/tmp/m.sock".parse::<Address>().unwrap(),
            Address::Unix("/tmp/m.sock".into())
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "udp:h:1",
            "unix:",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }
}
