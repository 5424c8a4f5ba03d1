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

/// A connected socket, whose reads and writes give up after a timeout.
pub(super) trait Socket: Conn {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()>;
}

impl Socket for TcpStream {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Socket for UnixStream {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl<S: Socket + ?Sized> Socket for Box<S> {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        (**self).set_timeout(t)
    }
}

pub(super) fn connect(addr: &Address, timeout: Duration) -> Result<Box<dyn Socket>, Error> {
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
            s.set_timeout(timeout).map_err(err)?;
            Box::new(s)
        }
        Address::Unix(p) => {
            let s = UnixStream::connect(p).map_err(err)?;
            s.set_timeout(timeout).map_err(err)?;
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
    /// Without a key, a peer on a Unix socket must be of this process's user (SO_PEERCRED):
    /// another is refused here, and the listener goes on waiting.
    pub(super) fn accept(&self, timeout: Duration, keyed: bool) -> Result<Box<dyn Socket>, Error> {
        let err = |addr: String, source| Error::Connect {
            what: "accepting on",
            addr,
            source,
        };
        match self {
            Listener::Tcp(l, hp) => {
                let (s, _) = l.accept().map_err(|e| err(hp.clone(), e))?;
                s.set_nodelay(true)
                    .and_then(|()| s.set_timeout(timeout))
                    .map_err(|e| err(hp.clone(), e))?;
                Ok(Box::new(s))
            }
            Listener::Unix(l, p) => loop {
                let shown = p.display().to_string();
                let (s, _) = l.accept().map_err(|e| err(shown.clone(), e))?;
                if !keyed {
                    match peer_uid(&s) {
                        Ok(uid) if uid == own_uid() => {}
                        Ok(uid) => {
                            log::warn!("{shown}: refused a peer of uid {uid}: without a key only this user's processes may connect");
                            continue;
                        }
                        Err(e) => return Err(err(shown, e)),
                    }
                }
                s.set_timeout(timeout).map_err(|e| err(shown, e))?;
                return Ok(Box::new(s));
            },
        }
    }
}

impl Drop for Listener {
    /// A Unix listener's path goes with it.
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn own_uid() -> u32 {
    // SAFETY: getuid has no arguments and cannot fail.
    unsafe { libc::getuid() }
}

/// The user ID of the process at the other end of `s` (SO_PEERCRED: as it was when it
/// connected).
fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of a ucred and its size, which is what
    // SO_PEERCRED writes on a connected Unix socket that `s` keeps open for the call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
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
