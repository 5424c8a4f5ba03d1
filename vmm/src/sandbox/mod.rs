//! Seccomp filters per thread kind (rust-vmm's seccompiler).
//!
//! The process that holds /dev/kvm, guest RAM, disk images and taps also decodes what a
//! migration peer sends: once a thread's setup is done it calls [`enter`] with its
//! [`Kind`], and from then on a system call outside that kind's list ([`rules`]) is not
//! made. Filters stack: a thread started by a filtered thread inherits the filter and may
//! narrow it further, never widen it, so a kind that starts others (the control socket,
//! a destination's receiving thread) allows what those need.
//!
//! [`Mode`]: `On` traps a forbidden call; the SIGSYS handler writes one line naming the
//! thread kind and the call and ends the process (exit status 159, as a death by SIGSYS).
//! `Log` lets it through and the kernel logs it (audit type 1326 `SECCOMP`, `syscall=NR`
//! in the kernel log), to find a missing call. `Off` installs nothing: the default for the
//! library (in-process tests, benches); the `ferry` command sets `On` unless told
//! otherwise.

mod rules;
mod spawner;
mod user;

pub use spawner::{spawn, spawn_soon, start_spawner, Spawning};
pub use user::{drop_privileges, hand_over, user, User};

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// What a forbidden call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// No filter.
    Off,
    /// Allowed, and logged by the kernel.
    Log,
    /// Stopped: one line naming it, then ferry exits.
    On,
}

/// The kinds of thread ferry runs, each with its own list of system calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The main thread once the VM runs.
    Main,
    /// A vCPU.
    Vcpu,
    /// The virtio devices' event loop.
    Virtio,
    /// The control socket, its connections and what they run (snapshot, migration source).
    Api,
    /// Console input.
    Stdin,
    /// A destination's receiving thread (and, inherited, the VM's threads it starts).
    Receiver,
    /// A destination's readahead of guest RAM.
    Prefault,
    /// A source's throttle of the guest's vCPUs.
    Throttle,
    /// `ferry restore`'s main thread while it reads a snapshot and builds its VM (and,
    /// inherited, the VM's threads it starts), once it has given up root.
    Loader,
    /// `ferry receive`'s main thread once it has given up root: it accepts connections,
    /// starts the handshakes, the receiving thread and (through the spawner) the VM's
    /// threads, then serves the VM; every thread of the destination starts from it.
    Launcher,
    /// A destination's handshake with a would-be source (TLS, the key's proofs).
    Handshake,
    /// The thread that takes SIGTERM and SIGINT (crate::signals).
    Signals,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 12] = [
        Kind::Main,
        Kind::Vcpu,
        Kind::Virtio,
        Kind::Api,
        Kind::Stdin,
        Kind::Receiver,
        Kind::Prefault,
        Kind::Throttle,
        Kind::Loader,
        Kind::Launcher,
        Kind::Handshake,
        Kind::Signals,
    ];

    /// The name a report gives the thread.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Main => "main",
            Kind::Vcpu => "vcpu",
            Kind::Virtio => "virtio",
            Kind::Api => "control socket",
            Kind::Stdin => "console input",
            Kind::Receiver => "migration receiver",
            Kind::Prefault => "migration readahead",
            Kind::Throttle => "migration throttle",
            Kind::Loader => "snapshot loader",
            Kind::Launcher => "migration destination",
            Kind::Handshake => "migration handshake",
            Kind::Signals => "signals",
        }
    }
}

/// Why the filters could not be set up or installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp filter for the {kind} thread: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("installing the seccomp filter of the {kind} thread: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("giving {} to user {uid}: {source}", .path.display())]
    HandOver {
        path: std::path::PathBuf,
        uid: u32,
        source: std::io::Error,
    },
    #[error("{call} (--user {uid}:{gid}): {source}")]
    Drop {
        call: &'static str,
        uid: u32,
        gid: u32,
        source: std::io::Error,
    },
}

static MODE: AtomicU8 = AtomicU8::new(0);
/// The compiled filter of each kind, in `Kind::ALL` order, built once by [`set_mode`].
static FILTERS: OnceLock<Vec<BpfProgram>> = OnceLock::new();

thread_local! {
    /// The kind of this thread's latest filter, for the SIGSYS report.
    static KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

/// The process's mode, and the user it will become ([`drop_privileges`]). Compiles every
/// kind's filter (an error here is one of the lists'), and with `On` installs the SIGSYS
/// handler. Call once, before any thread enters a kind.
pub fn set_mode(mode: Mode, user: Option<User>) -> Result<(), Error> {
    if let Some(u) = user {
        user::set(u);
    }
    if mode != Mode::Off {
        let mismatch = match mode {
            Mode::Log => SeccompAction::Log,
            _ => SeccompAction::Trap,
        };
        let mut built = Vec::new();
        for kind in Kind::ALL {
            built.push(compile(kind, mismatch.clone())?);
        }
        let _ = FILTERS.set(built);
        if mode == Mode::On {
            install_sigsys_handler()?;
        }
    }
    MODE.store(mode as u8, Ordering::SeqCst);
    Ok(())
}

/// The process's mode.
pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        1 => Mode::Log,
        2 => Mode::On,
        _ => Mode::Off,
    }
}

fn compile(kind: Kind, mismatch: SeccompAction) -> Result<BpfProgram, Error> {
    let build = |source| Error::Build {
        kind: kind.name(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = rules::rules(kind).map_err(build)?;
    rules.extend(user::credential_rules().map_err(build)?);
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Puts this thread under `kind`'s filter (nothing in mode `Off`). Call it where the
/// thread's setup ends.
pub fn enter(kind: Kind) -> Result<(), Error> {
    if mode() == Mode::Off {
        return Ok(());
    }
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let index = Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
    let Some(program) = filters.get(index) else {
        return Ok(());
    };
    KIND.with(|k| k.set(kind.name()));
    seccompiler::apply_filter(program).map_err(|source| Error::Install {
        kind: kind.name(),
        source,
    })
}

/// [`enter`] for a thread that cannot return the error: one line, and ferry ends (a
/// thread left unfiltered is not an option).
pub fn enter_or_exit(kind: Kind) {
    if let Err(e) = enter(kind) {
        eprintln!("ferry: {e}");
        std::process::exit(1);
    }
}

/// Calls the sandbox's tests make to show that a filter stops them (each is outside every
/// kind's filter); with no filter they are harmless.
pub mod probe {
    /// An ioctl no thread makes: FIONREAD on stdin (how many bytes wait to be read).
    pub fn ioctl() -> i32 {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which points at `n`.
        unsafe { libc::ioctl(0, libc::FIONREAD, &mut n) }
    }

    /// An executable mapping (mmap with PROT_EXEC), unmapped again.
    pub fn exec_mapping() -> bool {
        // SAFETY: a new private anonymous mapping of one page, touched by nothing, and
        // unmapped here if it was made.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return false;
            }
            libc::munmap(p, 4096);
            true
        }
    }
}

/// The exit status after a forbidden call: what a death by SIGSYS reports.
pub const SIGSYS_EXIT: i32 = 128 + libc::SIGSYS;

/// Where the system call number sits in a SIGSYS siginfo (in i32s): signo, errno, code,
/// padding, the call's address (two), then the number (linux: `_sigsys._syscall`).
const SI_SYSCALL_OFFSET: usize = 6;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo for SIGSYS, whose `_sigsys._syscall` field
    // lies SI_SYSCALL_OFFSET i32s in (include/uapi/asm-generic/siginfo.h, x86_64).
    let nr = unsafe { *(info as *const i32).add(SI_SYSCALL_OFFSET) };
    let name = syscalls::Sysno::new(nr as usize).map_or("unknown", |s| s.name());
    let kind = KIND.with(|k| k.get());
    let mut line = Line::default();
    line.push("ferry: seccomp: the ");
    line.push(kind);
    line.push(" thread made a system call outside its filter: ");
    line.push(name);
    line.push(" (");
    line.number(nr);
    line.push("); ferry stops (--seccomp=log lets it through and logs it)\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe, allowed in every filter, and
    // `line` is a valid buffer of `line.len` bytes.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(SIGSYS_EXIT);
    }
}

/// A line built without allocating (in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, s: &str) {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
    }

    fn number(&mut self, v: i32) {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let mut v = i64::from(v);
        let negative = v < 0;
        v = v.abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if negative {
            self.push("-");
        }
        self.push(std::str::from_utf8(&digits[i..]).unwrap_or("?"));
    }
}

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C" fn of the
    // SA_SIGINFO signature that only reads its siginfo, writes and exits.
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(Error::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_and_the_threads_that_start_others_allow_what_they_do() {
        for parent in [Kind::Launcher, Kind::Loader] {
            let wide = rules::rules(parent).unwrap();
            for kind in Kind::ALL {
                compile(kind, SeccompAction::Trap).unwrap();
                // Started by the main thread before any filter (crate::signals).
                if kind == Kind::Signals {
                    continue;
                }
                for nr in rules::rules(kind).unwrap().keys() {
                    assert!(wide.contains_key(nr), "{} needs {nr}", kind.name());
                }
            }
        }
    }

    #[test]
    fn the_receiver_starts_no_thread_and_binds_connects_or_renames_nothing() {
        let receiver = rules::rules(Kind::Receiver).unwrap();
        for nr in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_open,
            libc::SYS_socket,
            libc::SYS_bind,
            libc::SYS_connect,
            libc::SYS_unlink,
            libc::SYS_rename,
            libc::SYS_chmod,
            libc::SYS_execve,
        ] {
            assert!(!receiver.contains_key(&nr), "{nr}");
        }
    }

    #[test]
    fn a_report_line_names_the_number() {
        let mut l = Line::default();
        l.push("x ");
        l.number(-231);
        l.number(0);
        assert_eq!(&l.buf[..l.len], b"x -2310");
    }
}
