//! A tap device (an existing one, by name) opened for a virtio-net device: non-blocking,
//! without packet info, with the 12-byte virtio-net header on every frame.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

/// TUNSETIFF = _IOW('T', 202, int); TUNSETVNETHDRSZ = _IOW('T', 216, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// TUNSETOFFLOAD = _IOW('T', 208, unsigned int).
pub(crate) const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// What the tap may hand us unfinished (linux/if_tun.h): a checksum left to the guest,
/// TCP segments of up to 64 KiB (IPv4, IPv6, with ECN).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
/// The virtio-net header of virtio 1.x (num_buffers included).
pub const VNET_HDR: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tap {0:?}: a tap name has 1 to 15 characters")]
    Name(String),
    #[error("tap {0}: no such tap device (create it first, e.g. `ip tuntap add {0} mode tap`)")]
    NoSuchTap(String),
    #[error("tap {name}: /dev/net/tun: {source}")]
    Open {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tap {name}: in use (by another device, or another process)")]
    Busy { name: String },
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// An open tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the existing tap `name`.
    pub fn open(name: &str) -> Result<Tap, Error> {
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(Error::Name(name.into()));
        }
        let sys = std::path::Path::new("/sys/class/net").join(name);
        if !sys.join("tun_flags").exists() {
            return Err(Error::NoSuchTap(name.into()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| Error::Open {
                name: name.into(),
                source,
            })?;
        // struct ifreq: the name (16 bytes), then the flags (a short) in the union.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // SAFETY: TUNSETIFF reads a struct ifreq (40 bytes on x86-64) from the pointer,
        // which points at `ifr`, 40 bytes that outlive the call; the fd is ours.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::EBUSY) {
                return Err(Error::Busy { name: name.into() });
            }
            return Err(Error::Ioctl {
                name: name.into(),
                what: "TUNSETIFF",
                source,
            });
        }
        let size: libc::c_int = VNET_HDR as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points at `size`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size) };
        if rc < 0 {
            return Err(Error::Ioctl {
                name: name.into(),
                what: "TUNSETVNETHDRSZ",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    /// A "tap" over `file`, which must read and write one frame per call as a tap does
    /// (a non-blocking datagram socket does): the stand-in for /dev/net/tun of the fuzz
    /// targets and tests.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which unfinished frames (`TUN_F_*`) the tap may send us, as the guest accepts them.
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long); the fd is
        // this tap's, open for the life of `self`.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// One frame (header first) into `buf`; WouldBlock when there is none.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// One frame (header first).
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
