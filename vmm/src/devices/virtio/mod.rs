//! virtio devices on the virtio-mmio transport (virtio 1.x, the modern interface), their
//! queues from rust-vmm's `virtio-queue`, the constants from `virtio-bindings`.
//!
//! ```text
//! guest driver --MMIO registers (vCPU exit)--> mmio::Transport --features, queues, status-->
//!   QueueNotify: a KVM ioeventfd per queue (no exit to ferry) --> event loop thread
//!     (event_loop.rs, event-manager) --> Backend::process_queue (block.rs, net.rs)
//!   used buffers --> interrupt status |= VRING, irqfd --> the guest's IRQ line
//! a descriptor outside guest RAM, a chain that loops or is too long, a length that
//! overflows, an invalid queue: DEVICE_NEEDS_RESET and a config interrupt; the VMM and the
//! other devices go on
//! ```
//! Every byte a device writes into guest RAM goes through the guest memory's dirty bitmap
//! (vm-memory's `AtomicBitmap`), so a migration's next round sends it.

pub mod backends;
pub mod block;
pub mod event_loop;
pub mod mmio;
pub mod net;
pub mod tap;

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::memory::GuestMemoryMmap;

/// Where virtio-mmio devices sit: device i at `MMIO_BASE + i * MMIO_SIZE`.
pub const MMIO_BASE: u64 = 0xd100_0000;
/// One device's register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC lines of devices 0, 1, ...: ISA lines no PC device uses here.
pub const IRQS: [u32; 6] = [5, 6, 7, 9, 10, 11];

/// VIRTIO_F_VERSION_1: the modern interface, which the transport always offers.
pub const VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// VIRTIO_RING_F_EVENT_IDX.
pub const EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// What a guest did that a device refuses to go on with (it then needs a reset).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("queue {0}: {1}")]
    Queue(usize, virtio_queue::Error),
    #[error("queue {0} is not valid (size, alignment or addresses outside guest RAM)")]
    InvalidQueue(usize),
    #[error("a descriptor chain that loops, is longer than its queue or points outside the table")]
    BrokenChain,
    #[error("a descriptor chain longer than 4 GiB")]
    ChainTooLong,
    #[error("a buffer outside guest RAM: {0}")]
    Buffer(#[source] virtio_queue::Error),
    #[error("a buffer the device could not read or write: {0}")]
    BufferIo(#[source] std::io::Error),
    #[error("a receive buffer of {0} bytes, too small for a frame's header")]
    SmallBuffer(usize),
    #[error("a request too short for its header")]
    ShortRequest,
    #[error("a saved device ({saved:?}, {saved_queues} queues) is not this one ({here:?}, {here_queues} queues)")]
    OtherDevice {
        saved: migration::DeviceBackend,
        saved_queues: usize,
        here: migration::DeviceBackend,
        here_queues: usize,
    },
}

/// A device model behind the transport: what it offers and how it serves its queues.
pub trait Backend: Send {
    /// The virtio device ID (1: network, 2: block).
    fn device_type(&self) -> u32;
    /// Device feature bits (the transport adds VERSION_1 and EVENT_IDX).
    fn features(&self) -> u64;
    /// The maximum size of each queue.
    fn queue_sizes(&self) -> &'static [u16];
    /// The device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Serves the available buffers of queue `index`; Ok(true) if it used any.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, Error>;
    /// A file the event loop watches for the device once it is active (a tap), and serves
    /// with [`Backend::process_io`].
    fn io_fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
    /// The io fd is ready; Ok(true) if any buffer was used.
    fn process_io(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> Result<bool, Error> {
        Ok(false)
    }
    /// The driver set DRIVER_OK having accepted `features` (the backend's and the transport's).
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// A line naming the device and its backend, for logs.
    fn describe(&self) -> String;
    /// What backs the device, as a snapshot or a migration carries it (the other side must
    /// have the same).
    fn backend(&self) -> migration::DeviceBackend;
    /// The guest has just moved here: tell the network where it is now (a network card
    /// sends a frame from the guest's MAC). Nothing for other devices.
    fn announce(&mut self) {}
}

/// The descriptors of one chain, checked: Err where it loops, runs past its queue or the
/// table, or adds up to more than 4 GiB (virtio-queue's iterator just stops there).
pub fn descriptors<M>(
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<Vec<virtio_queue::desc::split::Descriptor>, Error>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut total: u32 = 0;
    let descs: Vec<_> = chain.collect();
    for d in &descs {
        total = total.checked_add(d.len()).ok_or(Error::ChainTooLong)?;
    }
    match descs.last() {
        None => Err(Error::BrokenChain),
        Some(last) if last.has_next() => Err(Error::BrokenChain),
        Some(_) => Ok(descs),
    }
}

/// The next chain the driver made available in `q` (queue `index`), or None where there is
/// none; an error where the queue cannot be served (its available index more than a queue
/// ahead of the device's, its available ring at address 0). virtio-queue's
/// `pop_descriptor_chain` answers None to those while `enable_notification` answers that
/// buffers are there: a device that pops until both agree would spin for ever.
pub fn pop<'m>(
    q: &mut Queue,
    index: usize,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>>, Error> {
    let mut chains = q.iter(mem).map_err(|e| Error::Queue(index, e))?;
    Ok(chains.next())
}

/// A new queue of `size` entries at most.
pub fn new_queue(size: u16) -> Queue {
    Queue::new(size).unwrap_or_else(|_| Queue::new(256).expect("256 is a valid queue size"))
}

/// Whether every queue the driver made ready is valid in `mem`.
pub fn check_queues(queues: &[Queue], mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (i, q) in queues.iter().enumerate() {
        if q.ready() && !q.is_valid(mem) {
            return Err(Error::InvalidQueue(i));
        }
    }
    Ok(())
}
