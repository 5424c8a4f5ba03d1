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

/// Connects to `addr`; with `own_user`, a Unix socket must be listened on by a process of
/// this user or root (SO_PEERCRED; root may read this process's memory anyway, and a
/// destination started as root that becomes `--user` listened as root), or the connection
/// is closed and refused.
pub(super) fn connect(
    addr: &Address,
    timeout: Duration,
    own_user: bool,
) -> Result<Box<dyn Socket>, Error> {
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
            if own_user {
                let uid = peer_uid(&s).map_err(err)?;
                if uid != own_uid() && uid != 0 {
                    return Err(Error::Plaintext(format!(
                        "{}, a socket of uid {uid}, not this user's",
                        p.display()
                    )));
                }
            }
            s.set_timeout(timeout).map_err(err)?;
            Box::new(s)
        }
    })
}

/// Whether every address `addr` names is on this host: a Unix socket, or a TCP address
/// that resolves to loopback only.
pub fn is_local(addr: &Address) -> Result<bool, Error> {
    let Address::Tcp(hp) = addr else {
        return Ok(true);
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
    Ok(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()))
}

/// Refuses an address other hosts can reach: without a key anyone who can connect could
/// hand this ferry a VM to run.
pub fn check_local(addr: &Address) -> Result<(), Error> {
    match (is_local(addr)?, addr) {
        (false, Address::Tcp(hp)) => Err(Error::Unauthenticated(hp.clone())),
        _ => Ok(()),
    }
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
}

/// A connection accepted: the socket, its [`Closer`], and the peer's name for log lines.
pub(super) type Accepted = (Box<dyn Socket>, Closer, String);

/// Shuts a connection down from another thread (its reads and writes then fail at once).
#[derive(Debug)]
pub(super) enum Closer {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Closer {
    pub(super) fn close(&self) {
        let _ = match self {
            Closer::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Closer::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Listener {
    /// Waits for one peer, at most `wait`, or until `wake` is written (then it is read
    /// back): None if nobody connected by then. Reads and writes on the connection give up
    /// after `timeout`; without a key, a peer on a Unix socket must be of this process's
    /// user (SO_PEERCRED: another is refused here, None). Also returns a [`Closer`] of the
    /// connection and the peer's name for log lines (its address; on a Unix socket, its
    /// uid and pid).
    pub(super) fn accept_within(
        &self,
        timeout: Duration,
        keyed: bool,
        wait: Duration,
        wake: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<Option<Accepted>, Error> {
        use std::os::fd::AsRawFd;
        let (fd, shown) = match self {
            Listener::Tcp(l, hp) => (l.as_raw_fd(), hp.clone()),
            Listener::Unix(l, p) => (l.as_raw_fd(), p.display().to_string()),
        };
        let mut pfd = [fd, wake.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is an array of two valid pollfds for the call; the listener and
        // `wake` keep their fds open.
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(Error::Connect {
                what: "accepting on",
                addr: shown,
                source: e,
            });
        }
        if pfd[1].revents != 0 {
            let _ = wake.read();
        }
        if pfd[0].revents == 0 {
            return Ok(None);
        }
        let err = |source| Error::Connect {
            what: "accepting on",
            addr: shown.clone(),
            source,
        };
        match self {
            Listener::Tcp(l, _) => {
                let (s, peer) = l.accept().map_err(err)?;
                s.set_nodelay(true)
                    .and_then(|()| s.set_timeout(timeout))
                    .map_err(err)?;
                let closer = Closer::Tcp(s.try_clone().map_err(err)?);
                Ok(Some((Box::new(s), closer, peer.to_string())))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().map_err(err)?;
                let (uid, pid) = peer_cred(&s).map_err(err)?;
                if !keyed && uid != own_uid() {
                    log::warn!("{shown}: refused a peer of uid {uid}: without a key only this user's processes may connect");
                    return Ok(None);
                }
                s.set_timeout(timeout).map_err(err)?;
                let closer = Closer::Unix(s.try_clone().map_err(err)?);
                Ok(Some((Box::new(s), closer, format!("uid {uid} pid {pid}"))))
            }
        }
    }
}

/// A socket whose reads and writes all end by `deadline`, however a peer trickles: each
/// gives up after the peer timeout or at the deadline, whichever comes first.
pub(super) struct Bounded {
    sock: Box<dyn Socket>,
    deadline: std::time::Instant,
    timeout: Duration,
    /// Whether the socket's timeout is cut short for the deadline now.
    short: std::cell::Cell<bool>,
    /// Set once the guest is handed over: the deadline no longer applies.
    lifted: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Bounded {
    pub(super) fn new(
        sock: Box<dyn Socket>,
        deadline: std::time::Instant,
        timeout: Duration,
        lifted: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Bounded {
        Bounded {
            sock,
            deadline,
            timeout,
            short: std::cell::Cell::new(false),
            lifted,
        }
    }

    /// Arms the socket for the next call: a system call only when the deadline is nearer
    /// than the peer timeout.
    fn arm(&mut self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.lifted.load(Ordering::Relaxed) {
            if self.short.get() {
                self.set_timeout(self.timeout)?;
            }
            return Ok(());
        }
        let left = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(deadline_passed());
        }
        if left < self.timeout {
            self.sock.set_timeout(left)?;
            self.short.set(true);
        }
        Ok(())
    }

    /// A timeout at the deadline is named as such.
    fn named<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        use std::io::ErrorKind::{TimedOut, WouldBlock};
        match r {
            Err(e) if matches!(e.kind(), TimedOut | WouldBlock) && self.short.get() => {
                Err(deadline_passed())
            }
            other => other,
        }
    }
}

fn deadline_passed() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the migration's deadline (--deadline) passed",
    )
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        let r = self.sock.read(buf);
        self.named(r)
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        let r = self.sock.write(buf);
        self.named(r)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.arm()?;
        let r = self.sock.write_vectored(bufs);
        self.named(r)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

impl Socket for Bounded {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.short.set(false);
        self.sock.set_timeout(t)
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
    peer_cred(s).map(|(uid, _)| uid)
}

/// The user and process IDs of the process at the other end of `s` (SO_PEERCRED).
fn peer_cred(s: &UnixStream) -> std::io::Result<(u32, i32)> {
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
    Ok((cred.uid, cred.pid))
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
