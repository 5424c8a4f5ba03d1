//! The virtio-mmio transport (virtio 1.x, version 2 registers): feature negotiation, queue
//! setup, device status and interrupts for one [`Backend`]. Registers are served on the vCPU
//! thread that touched them; queue notifications come through ioeventfds to the event loop,
//! which calls [`Transport::notify`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use migration::{DeviceBackend, QueueState, VirtioState};

use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{check_queues, new_queue, Backend, Error, EVENT_IDX, VERSION_1};
use crate::devices::BusDevice;
use crate::memory::GuestMemoryMmap;

const MAGIC: u32 = 0x7472_6976;
const VENDOR: u32 = 0x4652_5259; // "FRRY"

/// One virtio-mmio device.
pub struct Transport {
    backend: Box<dyn Backend>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// Queues the driver gave a size the device cannot take (checked at DRIVER_OK).
    bad_size: Vec<bool>,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    interrupt_status: Arc<AtomicU32>,
    irq: EventFd,
    /// The device refused the guest's queues or buffers: nothing more until a reset.
    broken: bool,
    /// The VM is paused (or not started): no queue is served, nothing is written to guest
    /// RAM, a disk or a tap until it resumes.
    paused: bool,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("device", &self.backend.describe())
            .field("status", &self.status)
            .finish()
    }
}

impl Transport {
    /// A device of `backend` on guest RAM `mem`, interrupting through `irq` (an irqfd).
    pub fn new(backend: Box<dyn Backend>, mem: GuestMemoryMmap, irq: EventFd) -> Self {
        let queues: Vec<Queue> = backend
            .queue_sizes()
            .iter()
            .map(|&s| new_queue(s))
            .collect();
        Transport {
            bad_size: vec![false; queues.len()],
            queues,
            backend,
            mem,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            irq,
            broken: false,
            paused: true,
        }
    }

    fn device_features(&self) -> u64 {
        self.backend.features() | VERSION_1 | EVENT_IDX
    }

    fn active(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.broken && !self.paused
    }

    /// Stops serving: the request in progress (the caller holds this device's lock, so none
    /// is) has completed and its used buffer is in guest RAM; notifications that come
    /// meanwhile wait for [`Transport::resume`].
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Serves again: every queue and the io fd once (for what the guest queued or the tap
    /// received while paused), and the interrupt again if one is pending.
    pub fn resume(&mut self) {
        self.paused = false;
        if !self.active() {
            return;
        }
        for q in 0..self.queues.len() {
            self.notify(q);
        }
        if self.backend.io_fd().is_some() {
            self.io_ready();
        }
        if self.interrupt_status.load(Ordering::SeqCst) != 0 {
            self.interrupt(0);
        }
    }

    /// The guest has just moved here (see [`Backend::announce`]).
    pub fn announce(&mut self) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.backend.announce();
        }
    }

    /// What backs the device.
    pub fn backend(&self) -> migration::DeviceBackend {
        self.backend.backend()
    }

    /// The number of queues, for the event loop's notifiers.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The backend's io fd (a tap), if any.
    pub fn io_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.backend.io_fd()
    }

    /// Queue `index` was notified: serve it.
    pub fn notify(&mut self, index: usize) {
        if !self.active() || index >= self.queues.len() {
            return;
        }
        let r = self
            .backend
            .process_queue(index, &mut self.queues, &self.mem);
        self.after(r, index);
    }

    /// The backend's io fd is ready (it fills queue 0: a network device's receive queue).
    pub fn io_ready(&mut self) {
        if !self.active() {
            return;
        }
        let r = self.backend.process_io(&mut self.queues, &self.mem);
        self.after(r, 0);
    }

    /// Interrupts the driver if buffers of `queue` were used and it wants to hear of it
    /// (with EVENT_IDX, only past the index it asked for).
    fn after(&mut self, r: Result<bool, Error>, queue: usize) {
        match r {
            Ok(false) => {}
            Ok(true) => {
                let wanted = self
                    .queues
                    .get_mut(queue)
                    .is_none_or(|q| q.needs_notification(&self.mem).unwrap_or(true));
                if wanted {
                    self.interrupt(VIRTIO_MMIO_INT_VRING);
                }
            }
            Err(e) => self.fail(e),
        }
    }

    /// The guest broke the protocol: DEVICE_NEEDS_RESET, a configuration interrupt, and no
    /// more work until the driver resets the device.
    fn fail(&mut self, e: Error) {
        if !self.broken {
            log::warn!("{}: {e}; the device needs a reset", self.backend.describe());
        }
        self.broken = true;
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt(VIRTIO_MMIO_INT_CONFIG);
    }

    fn interrupt(&self, bits: u32) {
        self.interrupt_status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            log::warn!("{}: raising its interrupt: {e}", self.backend.describe());
        }
    }

    fn reset(&mut self) {
        self.backend.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.bad_size.iter_mut().for_each(|b| *b = false);
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
        self.broken = false;
        self.interrupt_status.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            return self.reset();
        }
        let mut v = v;
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            let ok = self.driver_features & !self.device_features() == 0
                && self.driver_features & VERSION_1 != 0;
            if !ok {
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        let starting = v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.active();
        self.status = v | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
        if starting {
            self.activate();
        }
    }

    /// DRIVER_OK: every ready queue must be valid in guest RAM.
    fn activate(&mut self) {
        let event_idx = self.driver_features & EVENT_IDX != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        if let Some(i) = self.bad_size.iter().position(|b| *b) {
            return self.fail(Error::InvalidQueue(i));
        }
        if let Err(e) = check_queues(&self.queues, &self.mem) {
            return self.fail(e);
        }
        self.backend.activate(self.driver_features);
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_register(&self, offset: u32) -> u32 {
        let q = self.queues.get(self.queue_select as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.backend.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, v: u32) {
        let setup = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = v,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_select {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = v,
            VIRTIO_MMIO_QUEUE_NUM if setup => {
                let i = self.queue_select as usize;
                if let Some(q) = self.queues.get_mut(i) {
                    let bad = u16::try_from(v).map_or(true, |s| q.try_set_size(s).is_err());
                    self.bad_size[i] = bad;
                }
            }
            VIRTIO_MMIO_QUEUE_READY if setup => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1)
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW..=VIRTIO_MMIO_QUEUE_USED_HIGH if setup => {
                if let Some((set, high)) = address_register(offset) {
                    if let Some(q) = self.queue() {
                        let (low, high) = if high {
                            (None, Some(v))
                        } else {
                            (Some(v), None)
                        };
                        set(q, low, high);
                    }
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.set_status(v),
            // QueueNotify comes through an ioeventfd; a write that reaches here (no
            // ioeventfd, or another width) is served at once.
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v as usize),
            _ => {}
        }
    }

    /// The transport's state, for a snapshot or a migration.
    pub fn save_state(&self) -> VirtioState {
        VirtioState {
            backend: self.backend.backend(),
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            queue_select: self.queue_select,
            broken: self.broken,
            queues: self
                .queues
                .iter()
                .zip(&self.bad_size)
                .map(|(q, bad)| queue_state(q.state(), *bad))
                .collect(),
        }
    }

    /// Takes a saved state of a device with the same backend back; a driver that had
    /// finished its setup finds the device active, as it left it (offloads in the tap
    /// included). The device stays paused until the VM runs.
    pub fn restore_state(&mut self, s: &VirtioState) -> Result<(), Error> {
        let mine = self.backend.backend();
        if !same_backend(&s.backend, &mine) || s.queues.len() != self.queues.len() {
            return Err(Error::OtherDevice {
                saved: s.backend.clone(),
                saved_queues: s.queues.len(),
                here: mine,
                here_queues: self.queues.len(),
            });
        }
        for (i, qs) in s.queues.iter().enumerate() {
            self.queues[i] = Queue::try_from(queue_from(qs)).map_err(|e| Error::Queue(i, e))?;
            self.bad_size[i] = qs.size_refused;
        }
        self.device_features_select = s.device_features_select;
        self.driver_features_select = s.driver_features_select;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.queue_select = s.queue_select;
        self.broken = s.broken;
        self.interrupt_status
            .store(s.interrupt_status, Ordering::SeqCst);
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.broken {
            self.backend.activate(self.driver_features);
        }
        Ok(())
    }
}

/// Whether a saved backend is this one: the same disk image, or a network card with the
/// same MAC (on whichever tap).
fn same_backend(saved: &DeviceBackend, mine: &DeviceBackend) -> bool {
    match (saved, mine) {
        (DeviceBackend::Net { mac: a, .. }, DeviceBackend::Net { mac: b, .. }) => a == b,
        (a, b) => a == b,
    }
}

fn queue_state(q: virtio_queue::QueueState, size_refused: bool) -> QueueState {
    QueueState {
        max_size: q.max_size,
        size: q.size,
        ready: q.ready,
        desc_table: q.desc_table,
        avail_ring: q.avail_ring,
        used_ring: q.used_ring,
        next_avail: q.next_avail,
        next_used: q.next_used,
        event_idx: q.event_idx_enabled,
        size_refused,
    }
}

fn queue_from(q: &QueueState) -> virtio_queue::QueueState {
    virtio_queue::QueueState {
        max_size: q.max_size,
        next_avail: q.next_avail,
        next_used: q.next_used,
        event_idx_enabled: q.event_idx,
        size: q.size,
        ready: q.ready,
        desc_table: q.desc_table,
        avail_ring: q.avail_ring,
        used_ring: q.used_ring,
    }
}

impl BusDevice for Transport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            return self
                .backend
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
        }
        let v = if data.len() == 4 && offset % 4 == 0 {
            self.read_register(offset as u32)
        } else {
            0
        };
        for (d, b) in data.iter_mut().zip(v.to_le_bytes()) {
            *d = b;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) || data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset as u32, v);
    }
}

/// Sets half of one ring address of a queue.
type AddressSetter = fn(&mut Queue, Option<u32>, Option<u32>);

/// The queue address a register writes, and whether it is the high half.
fn address_register(offset: u32) -> Option<(AddressSetter, bool)> {
    let set: AddressSetter = match offset {
        VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => Queue::set_desc_table_address,
        VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => Queue::set_avail_ring_address,
        VIRTIO_MMIO_QUEUE_USED_LOW | VIRTIO_MMIO_QUEUE_USED_HIGH => Queue::set_used_ring_address,
        _ => return None,
    };
    let high = matches!(
        offset,
        VIRTIO_MMIO_QUEUE_DESC_HIGH | VIRTIO_MMIO_QUEUE_AVAIL_HIGH | VIRTIO_MMIO_QUEUE_USED_HIGH
    );
    Some((set, high))
}
