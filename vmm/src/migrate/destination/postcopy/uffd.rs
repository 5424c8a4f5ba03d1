//! userfaultfd(2) on guest RAM: missing-page faults reported to a thread of ours, which
//! places the page (UFFDIO_COPY) or a zero page (UFFDIO_ZEROPAGE) and so wakes the faulting
//! thread (a vCPU in KVM_RUN, a device reading a queue). The kernel's ABI
//! (include/uapi/linux/userfaultfd.h) is six ioctls and two structures; written out here
//! rather than taken from the `userfaultfd` crate, whose bindings are generated with
//! bindgen (libclang) at build time.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
// _IOWR(0xaa, nr, size) / _IOR(0xaa, nr, size).
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;

#[repr(C)]
#[derive(Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct ZeroPage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// struct uffd_msg: 32 bytes; for a page fault, the address is at offset 16.
#[repr(C)]
#[derive(Clone, Copy)]
struct Msg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

/// One opened before the process gives up its privileges (`--user`): without
/// CAP_SYS_PTRACE a userfaultfd may only report faults of user mode, and KVM's are not.
static KEPT: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// A userfaultfd, its API agreed.
#[derive(Debug)]
pub struct Uffd(OwnedFd);

fn last_error(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Opens a userfaultfd now and keeps it for the next [`Uffd::take`].
pub fn keep_open() -> std::io::Result<()> {
    let fd = open()?;
    *KEPT.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
    Ok(())
}

fn open() -> std::io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes flags only and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(last_error("userfaultfd"));
    }
    // SAFETY: fd is a descriptor just returned to us and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = Api {
        api: UFFD_API,
        ..Default::default()
    };
    // SAFETY: UFFDIO_API reads and writes one struct uffdio_api, which `api` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        return Err(last_error("UFFDIO_API"));
    }
    Ok(fd)
}

impl Uffd {
    /// The one kept by [`keep_open`], or a new one.
    pub fn take() -> std::io::Result<Uffd> {
        let kept = KEPT.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(Uffd(match kept {
            Some(fd) => fd,
            None => open()?,
        }))
    }

    pub fn fd(&self) -> i32 {
        self.0.as_raw_fd()
    }

    /// Reports missing-page faults in `[host, host + len)` (page aligned, mapped, private
    /// anonymous memory of this process).
    pub fn register(&self, host: *mut u8, len: usize) -> std::io::Result<()> {
        let mut r = Register {
            range: Range {
                start: host as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one struct uffdio_register; the kernel
        // checks the range against this process's mappings.
        if unsafe { libc::ioctl(self.fd(), UFFDIO_REGISTER, &mut r) } != 0 {
            return Err(last_error("UFFDIO_REGISTER"));
        }
        Ok(())
    }

    /// Faults in `[host, host + len)` are no longer reported (missing pages read as zero).
    pub fn unregister(&self, host: *mut u8, len: usize) -> std::io::Result<()> {
        let r = Range {
            start: host as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one struct uffdio_range.
        if unsafe { libc::ioctl(self.fd(), UFFDIO_UNREGISTER, &r) } != 0 {
            return Err(last_error("UFFDIO_UNREGISTER"));
        }
        Ok(())
    }

    /// Places `data` (whole pages) at `host`, where no page is yet, and wakes whoever
    /// waits on them. A page there already is left as it is (false).
    pub fn copy(&self, host: *mut u8, data: &[u8]) -> std::io::Result<bool> {
        let mut c = Copy {
            dst: host as u64,
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            ..Default::default()
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes from `src` (our slice, alive for the call)
        // and installs them as new pages at `dst`, a registered range: it never writes over
        // a present page (EEXIST) and touches no other memory of ours.
        self.placed(
            unsafe { libc::ioctl(self.fd(), UFFDIO_COPY, &mut c) },
            "UFFDIO_COPY",
        )
    }

    /// Places zero pages at `[host, host + len)` where none is yet, and wakes waiters.
    pub fn zero(&self, host: *mut u8, len: usize) -> std::io::Result<bool> {
        let mut z = ZeroPage {
            range: Range {
                start: host as u64,
                len: len as u64,
            },
            ..Default::default()
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one struct uffdio_zeropage and maps the
        // zero page into a registered range where no page is present.
        let rc = unsafe { libc::ioctl(self.fd(), UFFDIO_ZEROPAGE, &mut z) };
        self.placed(rc, "UFFDIO_ZEROPAGE")
    }

    fn placed(&self, rc: i32, what: &str) -> std::io::Result<bool> {
        if rc == 0 {
            return Ok(true);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EEXIST) => Ok(false),
            _ => Err(last_error(what)),
        }
    }

    /// The addresses of the page faults waiting now (none: an empty list), waiting at most
    /// `timeout_ms` (-1: until one comes) for the first.
    pub fn faults(&self, timeout_ms: i32) -> std::io::Result<Vec<u64>> {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, ours, for the call's duration.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::Interrupted => Ok(Vec::new()),
                _ => Err(last_error("poll on the userfaultfd")),
            };
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut msgs = [Msg {
            event: 0,
            _reserved: [0; 7],
            flags: 0,
            address: 0,
            _feat: 0,
        }; 32];
        // SAFETY: reads at most the array's size into it; the kernel writes whole
        // struct uffd_msg records of 32 bytes, which Msg is laid out as.
        let got = unsafe {
            libc::read(
                self.fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(Vec::new()),
                _ => Err(last_error("reading the userfaultfd")),
            };
        }
        let n = got as usize / std::mem::size_of::<Msg>();
        Ok(msgs[..n]
            .iter()
            .filter(|m| m.event == UFFD_EVENT_PAGEFAULT)
            .map(|m| m.address)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_structures_have_the_kernels_sizes() {
        use std::mem::size_of;
        assert_eq!(size_of::<Api>(), 24);
        assert_eq!(size_of::<Register>(), 32);
        assert_eq!(size_of::<Copy>(), 40);
        assert_eq!(size_of::<ZeroPage>(), 32);
        assert_eq!(size_of::<Msg>(), 32);
        // The size in each request number is the structure's.
        for (req, size) in [
            (UFFDIO_API, 24),
            (UFFDIO_REGISTER, 32),
            (UFFDIO_UNREGISTER, 16),
            (UFFDIO_COPY, 40),
            (UFFDIO_ZEROPAGE, 32),
        ] {
            assert_eq!((req >> 16) & 0x3fff, size, "{req:#x}");
        }
    }
}
