//! The system calls each kind of ferry thread may make (x86_64), by what the thread does,
//! and for some calls the arguments too: `ioctl` by request (KVM's, userfaultfd's, one of
//! TUN's, PAGEMAP_SCAN), `openat` by flags (read only, or also a brand-new file), `socket`
//! by family and type (stream sockets of AF_UNIX, AF_INET, AF_INET6), `mmap` and
//! `mprotect` never with PROT_EXEC. Found by tracing the whole test suite (`strace -f`,
//! thread names from PR_SET_NAME) and reasoned per call; docs/design.md lists them with the
//! reasons.

use std::collections::BTreeMap;

use libc::*;
use seccompiler::{
    BackendError, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompRule,
};

use super::Kind;

/// What every thread needs: the allocator (mmap, madvise, brk), threads' own stacks and
/// signals, futexes behind locks and channels, clocks and sleeps, writing its log lines to
/// stderr, ending itself, the SIGSYS report (write, exit_group), stacking a further filter
/// (seccomp, prctl), and closing what it owns. mmap and mprotect are allowed without
/// PROT_EXEC only, fcntl at least for F_GETFD ([`rules`]).
const COMMON: &[c_long] = &[
    SYS_brk,
    SYS_munmap,
    SYS_mremap,
    SYS_madvise,
    SYS_futex,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_sched_getaffinity,
    SYS_sched_yield,
    SYS_gettid,
    SYS_getpid,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_getrandom,
    SYS_write,
    SYS_writev,
    SYS_close,
    SYS_exit,
    SYS_exit_group,
    SYS_seccomp,
    SYS_prctl,
    SYS_rseq,
    SYS_set_robust_list,
];

/// A thread that starts threads (std: clone3, glibc's fallback clone).
const SPAWN: &[c_long] = &[SYS_clone3, SYS_clone];

/// A vCPU: KVM_RUN and the state ioctls on its fd (and TUNSETOFFLOAD when the guest's
/// virtio-net driver sets its features through an MMIO write), eventfd writes that raise
/// interrupts and wake devices, the console's output, fd flags; the CPU time for
/// `--timeline` at the first entry; the serial console's output to a pty (polled first: it
/// never waits) or a console socket's client (a send that never waits).
const VCPU: &[c_long] = &[
    SYS_read,
    SYS_fcntl,
    SYS_tgkill,
    SYS_getrusage,
    SYS_poll,
    SYS_ppoll,
    SYS_sendto,
];

/// The virtio event loop: epoll, the queues' eventfds, disk images (pread/pwrite, fdatasync
/// for a flush), the tap (read/write, vectored).
const VIRTIO: &[c_long] = &[
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_read,
    SYS_readv,
    SYS_pread64,
    SYS_preadv,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_fdatasync,
    SYS_fsync,
    SYS_lseek,
];

/// Console input: reads stdin, a pty, or the client of a console socket (accepted here,
/// its descriptor duplicated for the output).
const STDIN: &[c_long] = &[SYS_read, SYS_recvfrom, SYS_accept, SYS_accept4, SYS_fcntl];

/// A migration's throttle: kicks vCPUs out of KVM_RUN (a signal to a thread).
const THROTTLE: &[c_long] = &[SYS_tgkill];

/// A connection's I/O: a migration peer's or a control client's, with timeouts.
const CONN: &[c_long] = &[
    SYS_read,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendto,
    SYS_sendmsg,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_poll,
    SYS_ppoll,
];

/// The control socket, its connections and what they run: snapshots (files: stat, write,
/// sync, rename, remove), a migration's source side (a socket to the destination, TLS
/// files and key files read, /proc/self/pagemap, the dirty log ioctls), pause and resume
/// (kicks); a keyless source's check that a Unix-socket destination is its own user's
/// (getuid).
const API: &[c_long] = &[
    SYS_accept4,
    SYS_accept,
    SYS_connect,
    SYS_getsockname,
    SYS_getpeername,
    SYS_shutdown,
    SYS_fcntl,
    SYS_newfstatat,
    SYS_fstat,
    SYS_statx,
    SYS_lseek,
    SYS_pread64,
    SYS_fsync,
    SYS_fdatasync,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_unlink,
    SYS_unlinkat,
    SYS_getdents64,
    SYS_mincore,
    SYS_setpriority,
    SYS_tgkill,
    SYS_getuid,
];

/// The main thread once the VM runs: waits for the VM's events, stops it (kicks, joins),
/// removes its control socket, prints how it ended.
const MAIN: &[c_long] = &[SYS_tgkill, SYS_unlink, SYS_unlinkat, SYS_read];

/// Building a VM (a destination builds one while it receives, `ferry restore` after it has
/// given up root): the VM's ioctls on /dev/kvm opened before, guest RAM, eventfds and the
/// device thread's epoll, the vCPU kick signal's handler; its control socket bound.
const BUILD: &[c_long] = &[
    SYS_access,
    SYS_readlink,
    SYS_newfstatat,
    SYS_fstat,
    SYS_statx,
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_fcntl,
    SYS_rt_sigaction,
    SYS_prlimit64,
    SYS_lseek,
    SYS_flock,
    SYS_bind,
    SYS_listen,
    SYS_chmod,
    SYS_fchmod,
    SYS_getuid,
];

/// A destination's receiving thread, which parses the source's stream: its connection,
/// guest RAM (written, pages given back), the state ioctls of the VM it loads, postcopy's
/// userfaultfd (opened, its ioctls, polled), kicks and eventfd writes when the guest starts.
/// It starts no thread (crate::sandbox::spawn asks the spawner), and opens files only to
/// read them (/proc/meminfo for the default memory limit).
const RECEIVER: &[c_long] = &[
    SYS_tgkill,
    SYS_userfaultfd,
    SYS_fcntl,
    SYS_newfstatat,
    SYS_fstat,
    SYS_statx,
    SYS_lseek,
];

/// A handshake with a would-be source: TLS and the key's proofs over its connection.
const HANDSHAKE: &[c_long] = &[];

/// The signal thread: waits for SIGTERM or SIGINT (sigwait), then cancels a migration
/// (atomics), asks the VM to stop (a channel) or exits.
const SIGNALS: &[c_long] = &[SYS_rt_sigtimedwait];

/// Which ioctl requests a kind may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ioctl {
    /// Any of KVM's (type 0xAE): /dev/kvm, the VM's and the vCPUs' fds.
    Kvm,
    /// Any of userfaultfd's (type 0xAA).
    Uffd,
    /// TUNSETOFFLOAD: a tap's offloads, as the guest's driver negotiates them.
    TunOffload,
    /// PAGEMAP_SCAN on /proc/self/pagemap: the pages a guest has touched.
    PagemapScan,
}

/// How a kind may open files (openat's flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Never,
    /// Without O_WRONLY, O_RDWR, O_CREAT or O_TRUNC.
    ReadOnly,
    /// Read only, or a file that must not exist yet (O_CREAT with O_EXCL, never O_TRUNC).
    ReadOrNew,
}

/// A kind's list: plain calls, and the calls allowed only with some arguments.
struct Args {
    calls: &'static [&'static [c_long]],
    ioctls: &'static [Ioctl],
    open: Open,
    /// socket(2): stream sockets of AF_UNIX, AF_INET or AF_INET6.
    sockets: bool,
}

fn args(kind: Kind) -> Args {
    use crate::sandbox::rules::Ioctl::{Kvm, PagemapScan, TunOffload, Uffd};
    let (calls, ioctls, open, sockets): (&'static [&'static [c_long]], &'static [Ioctl], _, _) =
        match kind {
            Kind::Vcpu => (&[COMMON, VCPU], &[Kvm, TunOffload], Open::Never, false),
            Kind::Virtio => (&[COMMON, VIRTIO], &[TunOffload], Open::Never, false),
            Kind::Stdin => (&[COMMON, STDIN], &[], Open::Never, false),
            Kind::Prefault => (&[COMMON], &[], Open::Never, false),
            Kind::Throttle => (&[COMMON, THROTTLE], &[], Open::Never, false),
            Kind::Api => (
                &[COMMON, SPAWN, CONN, API, THROTTLE],
                &[Kvm, PagemapScan],
                Open::ReadOrNew,
                true,
            ),
            Kind::Main => (&[COMMON, MAIN], &[Kvm], Open::Never, false),
            Kind::Handshake => (&[COMMON, CONN, HANDSHAKE], &[], Open::Never, false),
            Kind::Signals => (&[COMMON, SIGNALS], &[], Open::Never, false),
            Kind::Receiver => (
                &[COMMON, CONN, RECEIVER],
                &[Kvm, Uffd, TunOffload],
                Open::ReadOnly,
                false,
            ),
            // The threads that start every other kind allow what those need.
            Kind::Loader | Kind::Launcher => (
                &[
                    COMMON, SPAWN, CONN, BUILD, API, VCPU, VIRTIO, STDIN, THROTTLE, MAIN, RECEIVER,
                ],
                &[Kvm, Uffd, TunOffload, PagemapScan],
                Open::ReadOrNew,
                true,
            ),
        };
    Args {
        calls,
        ioctls,
        open,
        sockets,
    }
}

/// The system calls `kind` may make without looking at their arguments.
pub(super) fn allowed(kind: Kind) -> Vec<c_long> {
    let mut out: Vec<c_long> = args(kind).calls.concat();
    out.sort_unstable();
    out.dedup();
    out
}

/// Every call `kind` may make, each with the rules its arguments must meet (none: any).
pub(super) fn rules(kind: Kind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let a = args(kind);
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    let no_exec = || rule(vec![cond(2, Op::MaskedEq(PROT_EXEC as u64), 0)?]);
    map.insert(SYS_mmap, vec![no_exec()?]);
    map.insert(SYS_mprotect, vec![no_exec()?]);
    // std checks that a descriptor is open before it closes it (F_GETFD, debug builds).
    if let std::collections::btree_map::Entry::Vacant(e) = map.entry(SYS_fcntl) {
        e.insert(vec![rule(vec![cond(1, Op::Eq, F_GETFD as u64)?])?]);
    }
    if !a.ioctls.is_empty() {
        let ioctls = a
            .ioctls
            .iter()
            .map(|i| ioctl_rule(*i))
            .collect::<Result<_, _>>()?;
        map.insert(SYS_ioctl, ioctls);
    }
    let write = (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC) as u64;
    let new = (O_CREAT | O_EXCL | O_TRUNC) as u64;
    let read_only = || rule(vec![cond(2, Op::MaskedEq(write), 0)?]);
    match a.open {
        Open::Never => {}
        Open::ReadOnly => {
            map.insert(SYS_openat, vec![read_only()?]);
        }
        Open::ReadOrNew => {
            let fresh = rule(vec![cond(2, Op::MaskedEq(new), (O_CREAT | O_EXCL) as u64)?])?;
            map.insert(SYS_openat, vec![read_only()?, fresh]);
        }
    }
    if a.sockets {
        let stream = |family: c_int| {
            rule(vec![
                cond(0, Op::Eq, family as u64)?,
                cond(1, Op::MaskedEq(0xf), SOCK_STREAM as u64)?,
            ])
        };
        map.insert(
            SYS_socket,
            vec![stream(AF_UNIX)?, stream(AF_INET)?, stream(AF_INET6)?],
        );
    }
    Ok(map)
}

fn cond(arg: u8, op: Op, value: u64) -> Result<Cond, BackendError> {
    Cond::new(arg, Len::Dword, op, value)
}

fn rule(conds: Vec<Cond>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conds)
}

/// The rule that lets `ioctl`'s request (argument 1) be one of `i`.
fn ioctl_rule(i: Ioctl) -> Result<SeccompRule, BackendError> {
    const TYPE: u64 = 0xff00;
    rule(vec![match i {
        Ioctl::Kvm => cond(1, Op::MaskedEq(TYPE), 0xae00)?,
        Ioctl::Uffd => cond(1, Op::MaskedEq(TYPE), 0xaa00)?,
        Ioctl::TunOffload => cond(1, Op::Eq, crate::devices::virtio::tap::TUNSETOFFLOAD)?,
        Ioctl::PagemapScan => cond(1, Op::Eq, crate::memory::PAGEMAP_SCAN)?,
    }])
}
