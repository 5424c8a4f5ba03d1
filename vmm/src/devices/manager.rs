//! The machine's devices, in one place: where each sits on the port I/O and MMIO buses, and
//! the list of those whose state travels, which drives save and restore (as Firecracker's
//! device manager and its `Persist` trait do). A new device is registered here once.
//!
//! ```text
//! Devices::new: COM1 (0x3f8, irqfd GSI 4) | i8042 (0x60..0x64) | POST port 0x80 | debug 0xe9
//!               persistent: [COM1]
//! add_virtio:   virtio-mmio device i at 0xd1000000 + i x 4 KiB, GSI 5, 6, 7, 9, 10, 11; an
//!               ioeventfd per queue; start_virtio: the event loop thread that serves them
//! save_state(&mut VmState) / restore_state(&VmState): every persistent device, in order,
//!               then every virtio device (VmState::devices, in bus order)
//! pause_virtio / resume_virtio: with the vCPUs (Vm::pause, Vm::resume): a paused device
//!               finishes the request in hand and takes no new one, so that nothing is written
//!               to guest RAM, a disk or a tap while the VM is paused (or not yet started)
//! ```

use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use migration::VmState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::i8042::{I8042, I8042_BASE};
use super::serial::{SerialDevice, COM1_BASE, COM1_IRQ};
use super::virtio::event_loop::{EventLoop, Handler};
use super::virtio::mmio::Transport;
use super::virtio::{Backend, IRQS, MMIO_BASE, MMIO_SIZE};
use super::{Bus, DebugOutput, DebugPort, IoBuses, SharedDevice, Sink, DEBUG_PORT};
use crate::event::VmEvent;
use crate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{device}: {source}")]
    EventFd {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{device}: KVM_IRQFD failed: {source}")]
    Irqfd {
        device: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{device}: {source}")]
    Place {
        device: &'static str,
        #[source]
        source: super::Error,
    },
    #[error("{device} state: {source}")]
    Restore {
        device: &'static str,
        #[source]
        source: RestoreError,
    },
    #[error("the saved VM has {saved} virtio device(s), this machine {here}")]
    VirtioCount { saved: usize, here: usize },
    #[error("at most {} virtio devices", IRQS.len())]
    TooManyVirtio,
    #[error("{device}: KVM_IOEVENTFD failed: {source}")]
    Ioevent {
        device: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the virtio event loop: {0}")]
    EventLoop(#[source] std::io::Error),
}

impl Error {
    /// What kind of failure this is (docs/api.md, "Error codes").
    pub fn code(&self) -> crate::codes::Code {
        use crate::codes::Code;
        match self {
            Error::EventFd { .. } | Error::EventLoop(_) => Code::Internal,
            Error::Irqfd { .. } | Error::Ioevent { .. } | Error::Place { .. } => Code::Kvm,
            Error::TooManyVirtio => Code::BadRequest,
            Error::Restore { .. } | Error::VirtioCount { .. } => Code::BadFile,
        }
    }
}

/// Why a device does not take a saved state back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Serial(#[from] vm_superio::serial::Error<std::io::Error>),
    #[error(transparent)]
    Virtio(Box<super::virtio::Error>),
}

/// A device whose state a snapshot or a migration carries: it fills its own part of the VM
/// state, and takes it back.
pub trait Persist: Send {
    fn save_state(&self, into: &mut VmState);
    fn restore_state(&mut self, from: &VmState) -> Result<(), RestoreError>;
}

impl Persist for SerialDevice {
    fn save_state(&self, into: &mut VmState) {
        into.serial = self.registers();
    }
    fn restore_state(&mut self, from: &VmState) -> Result<(), RestoreError> {
        Ok(self.load_registers(&from.serial)?)
    }
}

fn lock(t: &Mutex<Transport>) -> std::sync::MutexGuard<'_, Transport> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which bus a device sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    Pio,
    Mmio,
}

/// The machine's devices and buses.
pub struct Devices {
    buses: Arc<IoBuses>,
    serial: Arc<Mutex<SerialDevice>>,
    debug_output: DebugOutput,
    persistent: Vec<(&'static str, Arc<Mutex<dyn Persist>>)>,
    virtio: Vec<Arc<Mutex<Transport>>>,
    /// The virtio devices' events, until the loop starts.
    handlers: Vec<Handler>,
    event_loop: Option<EventLoop>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("buses", &self.buses)
            .field(
                "persistent",
                &self.persistent.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Devices {
    /// The PC devices every ferry machine has, on `vm` (which owns the irqchip their lines
    /// go to); the guest's console output goes to `console`, a reset to `events`.
    pub fn new(
        vm: &VmFd,
        events: Sender<VmEvent>,
        console: Box<dyn Write + Send>,
    ) -> Result<Devices, Error> {
        let place = |device| move |source| Error::Place { device, source };
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
            device: "COM1",
            source,
        })?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(|source| Error::Irqfd {
                device: "COM1",
                source,
            })?;
        let serial = SerialDevice::new(irq, console).map_err(|source| Error::EventFd {
            device: "COM1",
            source,
        })?;
        let serial = Arc::new(Mutex::new(serial));
        let buses = Arc::new(IoBuses::default());
        buses
            .pio
            .insert(COM1_BASE, 8, serial.clone())
            .map_err(place("COM1"))?;
        let i8042 = Arc::new(Mutex::new(I8042::new(events)));
        buses
            .pio
            .insert(I8042_BASE, 5, i8042)
            .map_err(place("i8042"))?;
        buses
            .pio
            .insert(0x80, 1, Arc::new(Mutex::new(Sink)))
            .map_err(place("port 0x80"))?;
        let debug_output: DebugOutput = Arc::new(Mutex::new(None));
        let debug = Arc::new(Mutex::new(DebugPort(debug_output.clone())));
        buses
            .pio
            .insert(DEBUG_PORT, 1, debug)
            .map_err(place("debug port"))?;
        let persistent: Vec<(&'static str, Arc<Mutex<dyn Persist>>)> =
            vec![("COM1", serial.clone())];
        Ok(Devices {
            buses,
            serial,
            debug_output,
            persistent,
            virtio: Vec::new(),
            handlers: Vec::new(),
            event_loop: None,
        })
    }

    /// Places a virtio-mmio device serving `backend` on guest RAM `mem`: the next register
    /// window and IRQ line, its interrupt as an irqfd, an ioeventfd per queue.
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        backend: Box<dyn Backend>,
        mem: GuestMemoryMmap,
    ) -> Result<(), Error> {
        let n = self.virtio.len();
        let irq_line = *IRQS.get(n).ok_or(Error::TooManyVirtio)?;
        let base = MMIO_BASE + n as u64 * MMIO_SIZE;
        let name = backend.describe();
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
            device: "virtio",
            source,
        })?;
        vm.register_irqfd(&irq, irq_line)
            .map_err(|source| Error::Irqfd {
                device: "virtio",
                source,
            })?;
        let transport = Arc::new(Mutex::new(Transport::new(backend, mem, irq)));
        let queues = transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .num_queues();
        let mut notifiers = Vec::new();
        for q in 0..queues {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                device: "virtio",
                source,
            })?;
            let notify = kvm_ioctls::IoEventAddress::Mmio(base + 0x50);
            vm.register_ioevent(&evt, &notify, q as u32)
                .map_err(|source| Error::Ioevent {
                    device: name.clone(),
                    source,
                })?;
            notifiers.push(evt);
        }
        self.add(BusKind::Mmio, base, MMIO_SIZE, transport.clone(), "virtio")?;
        self.handlers
            .push(Handler::new(transport.clone(), notifiers));
        self.virtio.push(transport);
        Ok(())
    }

    /// Starts the thread that serves the virtio devices (if there are any).
    pub fn start_virtio(&mut self) -> Result<(), Error> {
        if self.handlers.is_empty() || self.event_loop.is_some() {
            return Ok(());
        }
        let handlers = std::mem::take(&mut self.handlers);
        self.event_loop = Some(EventLoop::start(handlers).map_err(Error::EventLoop)?);
        Ok(())
    }

    /// What a Linux guest's command line needs to find the virtio devices
    /// (`virtio_mmio.device=4K@ADDR:IRQ` each), empty without any.
    pub fn virtio_cmdline(&self) -> String {
        (0..self.virtio.len())
            .map(|i| {
                format!(
                    " virtio_mmio.device=4K@{:#x}:{}",
                    MMIO_BASE + i as u64 * MMIO_SIZE,
                    IRQS[i]
                )
            })
            .collect()
    }

    /// The virtio devices, in order.
    pub fn virtio(&self) -> &[Arc<Mutex<Transport>>] {
        &self.virtio
    }

    /// Places one more device (tests' recorders, for one).
    pub fn add(
        &self,
        bus: BusKind,
        base: u64,
        len: u64,
        dev: SharedDevice,
        device: &'static str,
    ) -> Result<(), Error> {
        let bus: &Bus = match bus {
            BusKind::Pio => &self.buses.pio,
            BusKind::Mmio => &self.buses.mmio,
        };
        bus.insert(base, len, dev)
            .map_err(|source| Error::Place { device, source })
    }

    /// The buses, for the vCPU threads.
    pub fn buses(&self) -> &Arc<IoBuses> {
        &self.buses
    }

    /// Every persistent device's state into `into`, then every virtio device's.
    pub fn save_state(&self, into: &mut VmState) {
        for (_, d) in &self.persistent {
            d.lock().unwrap_or_else(|e| e.into_inner()).save_state(into);
        }
        into.devices = self.virtio.iter().map(|t| lock(t).save_state()).collect();
    }

    /// Every persistent device's state from `from`, then every virtio device's (the machine
    /// was built with the same devices, see crate::devices::virtio::backends).
    pub fn restore_state(&self, from: &VmState) -> Result<(), Error> {
        for (device, d) in &self.persistent {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_state(from)
                .map_err(|source| Error::Restore { device, source })?;
        }
        if from.devices.len() != self.virtio.len() {
            return Err(Error::VirtioCount {
                saved: from.devices.len(),
                here: self.virtio.len(),
            });
        }
        for (saved, t) in from.devices.iter().zip(&self.virtio) {
            lock(t).restore_state(saved).map_err(|e| Error::Restore {
                device: "virtio",
                source: RestoreError::Virtio(Box::new(e)),
            })?;
        }
        Ok(())
    }

    /// What backs each virtio device, in bus order.
    pub fn virtio_backends(&self) -> Vec<migration::DeviceBackend> {
        self.virtio.iter().map(|t| lock(t).backend()).collect()
    }

    /// Stops every virtio device once the request each has in hand is done (its lock is
    /// taken, so it is): from here on none writes guest RAM, a disk or a tap.
    pub fn pause_virtio(&self) {
        self.virtio.iter().for_each(|t| lock(t).pause());
    }

    /// Lets every virtio device serve again (and catch up on what came while paused).
    pub fn resume_virtio(&self) {
        self.virtio.iter().for_each(|t| lock(t).resume());
    }

    /// The guest has just moved here: its network cards announce it.
    pub fn announce(&self) {
        self.virtio.iter().for_each(|t| lock(t).announce());
    }

    /// Queues console input for COM1; returns how many bytes fit.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .input(bytes)
    }

    /// Sends the bytes the guest writes to the debug port to `w` from now on.
    pub fn set_debug_console(&self, w: Box<dyn Write + Send>) {
        *self.debug_output.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
    }
}
