//! The virtio device records: a device's backend (in VIRT sections and in the Hello's device
//! list) and its transport state (a VIRT payload). Byte tables: docs/migration-format.md,
//! section 8.1.

use super::Wire;
use crate::codec::{Decoder, Encoder, Error};
use crate::limits::{MAX_DEVICE_BACKEND, VIRTQUEUE_SIZE};
use crate::limits::{MAX_DISK_PATH, MAX_TAP_NAME, MAX_VIRTIO_DEVICES, MAX_VIRTIO_QUEUES};
use crate::state::{DeviceBackend, QueueState, VirtioState};

/// A flag byte: exactly 0 or 1.
impl Wire for bool {
    fn put(&self, e: &mut Encoder) {
        e.u8(u8::from(*self));
    }
    fn get(d: &mut Decoder, what: &'static str) -> Result<Self, Error> {
        let offset = d.offset();
        match d.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(Error::Invalid {
                what,
                offset,
                value: value.into(),
                allowed: "a flag (0 or 1)",
            }),
        }
    }
}

wire_record!(QueueState: max_size, size, ready, desc_table, avail_ring, used_ring, next_avail,
    next_used, event_idx, size_refused);

/// kind u32 (the virtio device ID), then a disk's path, size and read-only flag, or a
/// network card's MAC and tap name.
pub(crate) fn enc_backend(e: &mut Encoder, b: &DeviceBackend) -> Result<(), Error> {
    e.u32(b.device_type());
    match b {
        DeviceBackend::Disk {
            path,
            size,
            read_only,
        } => {
            e.str_u32("Disk.path", path, MAX_DISK_PATH)?;
            e.u64(*size);
            read_only.put(e);
        }
        DeviceBackend::Net { mac, tap } => {
            e.bytes(mac);
            e.str_u32("Net.tap", tap, MAX_TAP_NAME)?;
        }
    }
    Ok(())
}

pub(crate) fn dec_backend(d: &mut Decoder) -> Result<DeviceBackend, Error> {
    let offset = d.offset();
    match d.u32("device kind")? {
        2 => Ok(DeviceBackend::Disk {
            path: d.str_u32("Disk.path", MAX_DISK_PATH)?,
            size: d.u64("Disk.size")?,
            read_only: Wire::get(d, "Disk.read_only")?,
        }),
        1 => Ok(DeviceBackend::Net {
            mac: d.array("Net.mac")?,
            tap: d.str_u32("Net.tap", MAX_TAP_NAME)?,
        }),
        kind => Err(Error::Invalid {
            what: "device kind",
            offset,
            value: kind.into(),
            allowed: "1 (network) or 2 (block)",
        }),
    }
}

/// A device list (the Hello's): a count, then each backend.
pub(crate) fn enc_backends(e: &mut Encoder, list: &[DeviceBackend]) -> Result<(), Error> {
    e.count_u32("devices", list.len(), MAX_VIRTIO_DEVICES)?;
    list.iter().try_for_each(|b| enc_backend(e, b))
}

pub(crate) fn dec_backends(d: &mut Decoder) -> Result<Vec<DeviceBackend>, Error> {
    // The smallest backend is a network card's: kind, MAC, an empty tap name.
    let n = d.count_u32("devices", MAX_VIRTIO_DEVICES, 4 + 6 + 4)?;
    (0..n).map(|_| dec_backend(d)).collect()
}

/// VIRT: the backend, the transport's registers, the queues.
pub(crate) fn enc_virtio(e: &mut Encoder, v: &VirtioState) -> Result<(), Error> {
    enc_backend(e, &v.backend)?;
    e.u32(v.device_features_select);
    e.u32(v.driver_features_select);
    e.u64(v.driver_features);
    e.u32(v.status);
    e.u32(v.interrupt_status);
    e.u32(v.queue_select);
    v.broken.put(e);
    e.count_u32("VirtioState.queues", v.queues.len(), MAX_VIRTIO_QUEUES)?;
    v.queues.iter().for_each(|q| q.put(e));
    Ok(())
}

pub(crate) fn dec_virtio(d: &mut Decoder) -> Result<VirtioState, Error> {
    let backend = dec_backend(d)?;
    let device_features_select = d.u32("VirtioState.device_features_select")?;
    let driver_features_select = d.u32("VirtioState.driver_features_select")?;
    let driver_features = d.u64("VirtioState.driver_features")?;
    let status = d.u32("VirtioState.status")?;
    let interrupt_status = d.u32("VirtioState.interrupt_status")?;
    let queue_select = d.u32("VirtioState.queue_select")?;
    let broken = Wire::get(d, "VirtioState.broken")?;
    let n = d.count_u32(
        "VirtioState.queues",
        MAX_VIRTIO_QUEUES,
        VIRTQUEUE_SIZE as usize,
    )?;
    let queues = (0..n)
        .map(|_| Wire::get(d, "QueueState"))
        .collect::<Result<_, _>>()?;
    Ok(VirtioState {
        backend,
        device_features_select,
        driver_features_select,
        driver_features,
        status,
        interrupt_status,
        queue_select,
        broken,
        queues,
    })
}

/// The most bytes [`enc_backends`] writes.
pub(crate) const MAX_BACKENDS: u64 = 4 + MAX_VIRTIO_DEVICES as u64 * MAX_DEVICE_BACKEND;
