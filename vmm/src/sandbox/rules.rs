//! The system calls each kind of ferry thread may make (x86_64), by what the thread does.
//! Found by tracing the whole test suite (`strace -f`, thread names from PR_SET_NAME) and
//! reasoned per call; docs/design.md lists them with the reasons.

use libc::*;

use super::Kind;

/// What every thread needs: the allocator (mmap, madvise, brk), threads' own stacks and
/// signals, futexes behind locks and channels, clocks and sleeps, writing its log lines to
/// stderr, ending itself, the SIGSYS report (write, exit_group), stacking a further filter
/// (seccomp, prctl), and closing what it owns.
const COMMON: &[c_long] = &[
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
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
/// `--timeline` at the first entry.
const VCPU: &[c_long] = &[SYS_ioctl, SYS_read, SYS_fcntl, SYS_tgkill, SYS_getrusage];

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

/// Console input: reads stdin.
const STDIN: &[c_long] = &[SYS_read];

/// A migration's throttle: kicks vCPUs out of KVM_RUN (a signal to a thread).
const THROTTLE: &[c_long] = &[SYS_tgkill];

/// The control socket, its connections and what they run: snapshots (files: open, stat,
/// write, sync, rename, remove), a migration's source side (a socket to the destination,
/// TLS files and key files read, /proc/self/pagemap, the dirty log ioctls), pause and
/// resume (kicks).
const API: &[c_long] = &[
    SYS_accept4,
    SYS_accept,
    SYS_socket,
    SYS_connect,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_shutdown,
    SYS_read,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendto,
    SYS_sendmsg,
    SYS_poll,
    SYS_ppoll,
    SYS_fcntl,
    SYS_ioctl,
    SYS_openat,
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
];

/// The main thread once the VM runs: waits for the VM's events, stops it (kicks, joins),
/// removes its control socket, prints how it ended.
const MAIN: &[c_long] = &[SYS_tgkill, SYS_ioctl, SYS_unlink, SYS_unlinkat, SYS_read];

/// Building a VM (a destination builds one while it receives): /dev/kvm and the VM's
/// ioctls, guest RAM, eventfds and the device thread's epoll, disk images and the tap
/// opened, the vCPU kick signal's handler.
const BUILD: &[c_long] = &[
    SYS_openat,
    SYS_open,
    SYS_access,
    SYS_readlink,
    SYS_newfstatat,
    SYS_fstat,
    SYS_statx,
    SYS_ioctl,
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_fcntl,
    SYS_rt_sigaction,
    SYS_prlimit64,
    SYS_lseek,
    SYS_flock,
];

/// A destination while it receives, beyond what the control socket's kind allows (its
/// socket calls, files, TLS): binding its listener and making it private, checking a
/// peer's uid, postcopy's userfaultfd (its ioctls and poll are the control socket's). Every thread the VM will run is started from it and inherits its filter, so
/// [`allowed`] gives it the union of all kinds too.
const RECEIVER: &[c_long] = &[
    SYS_bind,
    SYS_listen,
    SYS_unlink,
    SYS_chmod,
    SYS_fchmod,
    SYS_mkdir,
    SYS_getuid,
    SYS_userfaultfd,
];

/// The system calls `kind` may make.
pub(super) fn allowed(kind: Kind) -> Vec<c_long> {
    let parts: &[&[c_long]] = match kind {
        Kind::Vcpu => &[COMMON, VCPU],
        Kind::Virtio => &[COMMON, VIRTIO],
        Kind::Stdin => &[COMMON, STDIN],
        Kind::Prefault => &[COMMON],
        Kind::Throttle => &[COMMON, THROTTLE],
        Kind::Api => &[COMMON, SPAWN, API, THROTTLE],
        Kind::Main => &[COMMON, MAIN],
        Kind::Receiver => &[
            COMMON, SPAWN, RECEIVER, BUILD, API, VCPU, VIRTIO, STDIN, THROTTLE, MAIN,
        ],
    };
    let mut out: Vec<c_long> = parts.concat();
    out.sort_unstable();
    out.dedup();
    out
}
