//! Emulated devices and the buses that route port I/O and MMIO exits to them.
//!
//! A [`Bus`] maps non-overlapping address ranges to devices. A vCPU thread looks the address
//! up on every I/O exit; an access no device claims reads as all ones and is otherwise
//! ignored, as on a real machine with nothing decoding the address.

pub mod console;
pub mod i8042;
pub mod manager;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the base the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "device range {base:#x}+{len:#x} overlaps a device already at {other:#x}+{other_len:#x}"
    )]
    Overlap {
        base: u64,
        len: u64,
        other: u64,
        other_len: u64,
    },
    #[error("device range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

struct Range {
    base: u64,
    len: u64,
    dev: SharedDevice,
}

/// An address space (port I/O or MMIO) of devices.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<Vec<Range>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        f.debug_list()
            .entries(ranges.iter().map(|r| (r.base, r.len)))
            .finish()
    }
}

impl Bus {
    /// Places `dev` at [base, base + len).
    pub fn insert(&self, base: u64, len: u64, dev: SharedDevice) -> Result<(), Error> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(Error::BadRange { base, len });
        }
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = ranges
            .iter()
            .find(|r| base < r.base + r.len && r.base < base + len)
        {
            return Err(Error::Overlap {
                base,
                len,
                other: r.base,
                other_len: r.len,
            });
        }
        let at = ranges.partition_point(|r| r.base < base);
        ranges.insert(at, Range { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let i = ranges.partition_point(|r| r.base <= addr).checked_sub(1)?;
        let r = &ranges[i];
        (addr - r.base < r.len).then(|| (addr - r.base, r.dev.clone()))
    }

    /// Reads from the device at `addr`; returns false (and all ones) if there is none.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false if there is none.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// The two buses a vCPU dispatches to.
#[derive(Debug, Default)]
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// A device that accepts and discards every access and reads as zero: for ports a guest
/// pokes that need no model (the POST port 0x80, for instance).
#[derive(Debug, Default)]
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// The debug console port (as Bochs, QEMU's isa-debugcon and Cloud Hypervisor have it):
/// each byte the guest writes goes to the writer, if one is attached; reads give 0xe9 (the
/// conventional "present" answer).
pub const DEBUG_PORT: u64 = 0xe9;

/// Where the debug port's bytes go; attach a writer any time.
pub type DebugOutput = Arc<Mutex<Option<Box<dyn std::io::Write + Send>>>>;

/// The device at [`DEBUG_PORT`].
pub struct DebugPort(pub DebugOutput);

impl std::fmt::Debug for DebugPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DebugPort")
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xe9);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = out.as_mut() {
            if w.write_all(data).and_then(|()| w.flush()).is_err() {
                // A reader that went away ends the output, not the VM.
                *out = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Mem([u8; 4]);
    impl BusDevice for Mem {
        fn read(&mut self, o: u64, d: &mut [u8]) {
            d[0] = self.0[o as usize];
        }
        fn write(&mut self, o: u64, d: &[u8]) {
            self.0[o as usize] = d[0];
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlaps() {
        let bus = Bus::default();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Mem::default())))
            .unwrap();
        bus.insert(0x20, 4, Arc::new(Mutex::new(Mem::default())))
            .unwrap();
        assert!(bus.insert(0x13, 2, Arc::new(Mutex::new(Sink))).is_err());
        assert!(bus.insert(0, 0, Arc::new(Mutex::new(Sink))).is_err());
        assert!(bus.write(0x12, &[7]));
        let mut b = [0u8];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 7);
        assert!(bus.read(0x22, &mut b));
        assert_eq!(b[0], 0);
        assert!(!bus.read(0x14, &mut b));
        assert_eq!(b[0], 0xff);
    }
}
