//! Where the guest's serial console goes (`--serial`): this terminal (stdout and stdin), a
//! file (output only), a pseudo-terminal whose name ferry prints, a Unix socket that one
//! client at a time attaches to, or nowhere. Everything is opened by the command line
//! (before ferry gives up root); a pty's or a socket's output never blocks the vCPU that
//! writes it: what nobody reads is dropped.
//!
//! ```text
//! Serial::open -> Console { output: the UART's writer, input: Stdin | Pty(fd) | Socket(listener) | None }
//! Console::input -> thread "console": read -> Vm::serial_input
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::serial::FlushingWriter;

/// The serial console's end on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    Tty,
    File(PathBuf),
    Pty,
    Socket(PathBuf),
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--serial {0:?}: expected tty, file=PATH, pty, socket=PATH or off")]
    Syntax(String),
    #[error("serial console {what}: {source}")]
    Open {
        what: String,
        source: std::io::Error,
    },
}

impl std::str::FromStr for Serial {
    type Err = Error;

    fn from_str(s: &str) -> Result<Serial, Error> {
        Ok(match s.split_once('=') {
            None if s == "tty" => Serial::Tty,
            None if s == "pty" => Serial::Pty,
            None if s == "off" => Serial::Off,
            Some(("file", p)) if !p.is_empty() => Serial::File(p.into()),
            Some(("socket", p)) if !p.is_empty() => Serial::Socket(p.into()),
            _ => return Err(Error::Syntax(s.into())),
        })
    }
}

/// Where input for the guest comes from.
#[derive(Debug)]
pub enum Input {
    Stdin,
    Pty(File),
    Socket(UnixListener, Attached),
}

/// The client a console socket has now, if any (its output goes there).
pub type Attached = Arc<Mutex<Option<UnixStream>>>;

/// The console opened: the UART's writer, and where its input comes from.
pub struct Console {
    pub output: Box<dyn Write + Send>,
    pub input: Option<Input>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("input", &self.input)
            .finish()
    }
}

fn open_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Open { what, source }
}

impl Serial {
    /// Opens this end (a pty's name and a socket's path are printed on stderr).
    pub fn open(&self) -> Result<Console, Error> {
        Ok(match self {
            Serial::Tty => Console {
                output: Box::new(FlushingWriter(std::io::stdout())),
                input: Some(Input::Stdin),
            },
            Serial::Off => Console {
                output: Box::new(std::io::sink()),
                input: None,
            },
            Serial::File(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(open_err(format!("file {}", path.display())))?;
                Console {
                    output: Box::new(file),
                    input: None,
                }
            }
            Serial::Pty => open_pty()?,
            Serial::Socket(path) => open_socket(path)?,
        })
    }
}

fn open_pty() -> Result<Console, Error> {
    let err = open_err("pty");
    // SAFETY: posix_openpt returns a new descriptor (or -1) that nothing else owns.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is the open descriptor just returned; the File becomes its owner.
    let master = unsafe { File::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt on the master pty; ptsname_r writes at most name.len()
    // bytes; cfmakeraw/tcsetattr on an initialized termios of this pty.
    let ok = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::grantpt(fd) == 0
            && libc::unlockpt(fd) == 0
            && libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) == 0
            && libc::tcgetattr(fd, &mut t) == 0
            && {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(fd, libc::TCSANOW, &t) == 0
            }
    };
    if !ok {
        return Err(open_err("pty")(std::io::Error::last_os_error()));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated name into the buffer.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    eprintln!("ferry: serial console on {}", name.to_string_lossy());
    let output = master.try_clone().map_err(open_err("pty"))?;
    Ok(Console {
        output: Box::new(Dropping(output)),
        input: Some(Input::Pty(master)),
    })
}

fn open_socket(path: &std::path::Path) -> Result<Console, Error> {
    let what = format!("socket {}", path.display());
    if std::fs::symlink_metadata(path).is_ok() {
        let e = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists");
        return Err(open_err(what)(e));
    }
    let listener = UnixListener::bind(path).map_err(open_err(what.clone()))?;
    use std::os::unix::fs::PermissionsExt;
    let private = std::fs::Permissions::from_mode(0o600);
    std::fs::set_permissions(path, private).map_err(open_err(what))?;
    crate::sandbox::hand_over(path).map_err(|e| Error::Open {
        what: format!("socket {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    eprintln!("ferry: serial console on socket {}", path.display());
    let attached: Attached = Arc::default();
    Ok(Console {
        output: Box::new(ToClient(attached.clone())),
        input: Some(Input::Socket(listener, attached)),
    })
}

/// A pty's output: written only when the pty has room (the UART writes a byte at a time),
/// else dropped: nobody may have the pty open.
struct Dropping(File);

impl Write for Dropping {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: polls one descriptor this File owns, without waiting.
        let ready = unsafe { libc::poll(&mut p, 1, 0) };
        if ready == 1 && p.revents & libc::POLLOUT != 0 {
            self.0.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A console socket's output: to the client attached, without blocking; dropped when none
/// is (or it reads too slowly).
struct ToClient(Attached);

impl Write for ToClient {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut client = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = client.as_ref() {
            // SAFETY: a non-blocking send of buf's bytes on the client's socket.
            let n = unsafe {
                libc::send(
                    c.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                *client = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Input {
    /// Reads input for the guest until it ends, handing each piece to `feed` (on the
    /// calling thread: ferry runs it on a thread of its own).
    pub fn run(self, feed: &mut dyn FnMut(&[u8])) {
        let mut buf = [0u8; 256];
        match self {
            Input::Stdin => pump(&mut std::io::stdin(), &mut buf, feed),
            Input::Pty(mut f) => pump(&mut f, &mut buf, feed),
            Input::Socket(listener, attached) => {
                for conn in listener.incoming() {
                    let Ok(mut c) = conn else { continue };
                    let Ok(out) = c.try_clone() else { continue };
                    *attached.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
                    pump(&mut c, &mut buf, feed);
                    *attached.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            }
        }
    }
}

/// Feeds what `r` gives until it ends.
fn pump(r: &mut impl Read, buf: &mut [u8], feed: &mut dyn FnMut(&[u8])) {
    while let Ok(n @ 1..) = r.read(buf) {
        feed(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_parse_and_bad_ones_are_named() {
        assert_eq!("tty".parse::<Serial>().unwrap(), Serial::Tty);
        assert_eq!("pty".parse::<Serial>().unwrap(), Serial::Pty);
        assert_eq!("off".parse::<Serial>().unwrap(), Serial::Off);
        assert_eq!(
            "file=/tmp/c".parse::<Serial>().unwrap(),
            Serial::File("/tmp/c".into())
        );
        assert_eq!(
            "socket=/tmp/c.sock".parse::<Serial>().unwrap(),
            Serial::Socket("/tmp/c.sock".into())
        );
        for bad in ["file=", "socket", "tcp=1", "TTY"] {
            let e = bad.parse::<Serial>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("socket=PATH"), "{e}");
        }
    }

    #[test]
    fn a_socket_client_gets_the_output_and_gives_the_input_and_none_drops_it() {
        let path = std::env::temp_dir().join(format!("ferry-console-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let Console { mut output, input } = Serial::Socket(path.clone()).open().unwrap();
        output.write_all(b"nobody reads this\n").unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let fed = got.clone();
        std::thread::spawn(move || {
            input
                .unwrap()
                .run(&mut |b| fed.lock().unwrap().extend_from_slice(b));
        });
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"ls\n").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while got.lock().unwrap().as_slice() != b"ls\n" {
            assert!(std::time::Instant::now() < deadline, "input did not arrive");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        output.write_all(b"hello\n").unwrap();
        let mut line = [0u8; 6];
        client.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"hello\n");
        let _ = std::fs::remove_file(&path);
    }
}
