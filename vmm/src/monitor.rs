//! The event monitor (`--event-monitor path=FILE|fd=N`): one JSON object per line for each
//! thing that happens to the VMM and its VM, in Cloud Hypervisor's shape:
//!
//! ```text
//! {"timestamp":{"secs":0,"nanos":912345},"source":"vm","event":"booted","properties":null}
//! ```
//!
//! The timestamp counts from the monitor's start. The file is opened by the command line
//! (before ferry gives up root) and set non-blocking: a reader that falls behind loses
//! events (a warning says so once) instead of stalling the thread that emits them, a vCPU
//! pause or a migration's switch-over among them. Events: docs/api.md, "Events".

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Where events go: the file and the time they count from.
struct Monitor {
    file: Mutex<File>,
    start: Instant,
    lost: AtomicBool,
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();

/// Where `--event-monitor` sends events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path(PathBuf),
    Fd(i32),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--event-monitor {0:?}: expected path=FILE or fd=N")]
    Syntax(String),
    #[error("--event-monitor path={path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--event-monitor fd={0}: not an open file descriptor of this process")]
    BadFd(i32),
    #[error("--event-monitor: {0}")]
    Io(std::io::Error),
    #[error("--event-monitor given twice")]
    Twice,
}

impl std::str::FromStr for Target {
    type Err = Error;

    fn from_str(s: &str) -> Result<Target, Error> {
        match s.split_once('=') {
            Some(("path", p)) if !p.is_empty() => Ok(Target::Path(p.into())),
            Some(("fd", n)) => n
                .parse()
                .ok()
                .filter(|n| *n >= 0)
                .map(Target::Fd)
                .ok_or_else(|| Error::Syntax(s.into())),
            _ => Err(Error::Syntax(s.into())),
        }
    }
}

/// Opens the monitor's file (appended to; created mode 0600) or takes the descriptor;
/// every [`emit`] from now on writes to it.
pub fn start(target: &Target) -> Result<(), Error> {
    let file = match target {
        Target::Path(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| Error::Open {
                    path: path.clone(),
                    source,
                })?
        }
        Target::Fd(fd) => take_fd(*fd)?,
    };
    set_nonblocking(&file).map_err(Error::Io)?;
    let monitor = Monitor {
        file: Mutex::new(file),
        start: Instant::now(),
        lost: AtomicBool::new(false),
    };
    MONITOR.set(monitor).map_err(|_| Error::Twice)
}

fn take_fd(fd: i32) -> Result<File, Error> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only reads the descriptor's flags; it fails on a closed one.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 || fd <= 2 {
        return Err(Error::BadFd(fd));
    }
    // SAFETY: the descriptor is open (checked above), not stdin/out/err, and named by the
    // command line for this use alone: the File becomes its one owner.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn set_nonblocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor the File owns, reading and then setting its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Serialize)]
struct Event<'a> {
    timestamp: Duration,
    source: &'a str,
    event: &'a str,
    properties: Option<serde_json::Value>,
}

/// Writes one event, if a monitor was started: `source` is `vmm` or `vm`, `properties` a
/// JSON object or nothing.
pub fn emit(source: &str, event: &str, properties: Option<serde_json::Value>) {
    let Some(m) = MONITOR.get() else {
        return;
    };
    let e = Event {
        timestamp: m.start.elapsed(),
        source,
        event,
        properties,
    };
    let Ok(mut line) = serde_json::to_vec(&e) else {
        return;
    };
    line.push(b'\n');
    let mut file = m.file.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = file.write_all(&line) {
        if !m.lost.swap(true, Ordering::Relaxed) {
            log::warn!("event monitor: an event was lost ({e}); later ones may be too");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_are_named() {
        assert_eq!(
            "path=/tmp/e".parse::<Target>().unwrap(),
            Target::Path("/tmp/e".into())
        );
        assert_eq!("fd=3".parse::<Target>().unwrap(), Target::Fd(3));
        for bad in ["fd=-1", "fd=x", "path=", "file=/x", "/tmp/e"] {
            let e = bad.parse::<Target>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("path=FILE"), "{e}");
        }
        assert!(matches!(take_fd(1), Err(Error::BadFd(1))));
        assert!(matches!(take_fd(99999), Err(Error::BadFd(99999))));
    }

    #[test]
    fn an_event_is_one_line_in_cloud_hypervisors_shape() {
        let e = Event {
            timestamp: Duration::new(1, 5),
            source: "vm",
            event: "booted",
            properties: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"timestamp":{"secs":1,"nanos":5},"source":"vm","event":"booted","properties":null}"#
        );
    }
}
