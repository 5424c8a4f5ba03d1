//! Migration endpoints: addresses, connecting with the peer timeout, listening.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::Error;

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
pub(super) trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

pub(super) fn connect(addr: &Address, timeout: Duration) -> Result<Box<dyn Conn>, Error> {
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
            s.set_read_timeout(Some(timeout)).map_err(err)?;
            s.set_write_timeout(Some(timeout)).map_err(err)?;
            Box::new(s)
        }
        Address::Unix(p) => {
            let s = UnixStream::connect(p).map_err(err)?;
            s.set_read_timeout(Some(timeout)).map_err(err)?;
            s.set_write_timeout(Some(timeout)).map_err(err)?;
            Box::new(s)
        }
    })
}

/// Refuses an address other hosts can reach: without a key anyone who can connect could
/// hand this ferry a VM to run.
pub fn check_local(addr: &Address) -> Result<(), Error> {
    let Address::Tcp(hp) = addr else {
        return Ok(());
    };
    use std::net::ToSocketAddrs;
    let addrs: Vec<std::net::SocketAddr> = hp
        .to_socket_addrs()
        .map_err(|e| Error::Connect {
            what: "resolving",
            addr: hp.clone(),
            source: e,
        })?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(Error::Unauthenticated(hp.clone()));
    }
    Ok(())
}

/// A bound migration listener: the destination says it is waiting only once this exists,
/// so a source that connects then always finds it.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener, String),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`: a Unix socket gets mode 0600; only a stale Unix socket is replaced, never
    /// one another process still listens on, nor another kind of file.
    pub fn bind(addr: &Address) -> Result<Listener, Error> {
        let err = |source| Error::Connect {
            what: "listening on",
            addr: format!("{addr:?}"),
            source,
        };
        Ok(match addr {
            Address::Tcp(hp) => Listener::Tcp(TcpListener::bind(hp).map_err(err)?, hp.clone()),
            Address::Unix(p) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                    // Another process that still listens there keeps its socket.
                    if listening(p) {
                        return Err(Error::AddressInUse(p.display().to_string()));
                    }
                    let _ = std::fs::remove_file(p);
                }
                let l = UnixListener::bind(p).map_err(err)?;
                // Only this user may connect (and hand this ferry a VM).
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
                Listener::Unix(l, p.clone())
            }
        })
    }

    /// Waits for one peer; reads and writes on the connection give up after `timeout`.
    pub(super) fn accept(self, timeout: Duration) -> Result<Box<dyn Conn>, Error> {
        let err = |addr: String, source| Error::Connect {
            what: "accepting on",
            addr,
            source,
        };
        Ok(match self {
            Listener::Tcp(l, hp) => {
                let (s, _) = l.accept().map_err(|e| err(hp.clone(), e))?;
                s.set_nodelay(true).map_err(|e| err(hp.clone(), e))?;
                s.set_read_timeout(Some(timeout))
                    .and_then(|()| s.set_write_timeout(Some(timeout)))
                    .map_err(|e| err(hp.clone(), e))?;
                Box::new(s)
            }
            Listener::Unix(l, p) => {
                let shown = p.display().to_string();
                let (s, _) = l.accept().map_err(|e| err(shown.clone(), e))?;
                let _ = std::fs::remove_file(&p);
                s.set_read_timeout(Some(timeout))
                    .and_then(|()| s.set_write_timeout(Some(timeout)))
                    .map_err(|e| err(shown, e))?;
                Box::new(s)
            }
        })
    }
}

/// Whether a socket bound at `path` is listening, from /proc/net/unix (connecting to find
/// out would be taken by that listener as its peer).
fn listening(path: &std::path::Path) -> bool {
    const ACCEPTING: u32 = 0x0001_0000; // __SO_ACCEPTCON
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let canonical = std::fs::canonicalize(path).ok();
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(flags), Some(bound)) = (f.get(3), f.get(7)) else {
            return false;
        };
        let flags = u32::from_str_radix(flags, 16).unwrap_or(0);
        let bound = std::path::Path::new(bound);
        flags & ACCEPTING != 0 && (bound == path || Some(bound) == canonical.as_deref())
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
