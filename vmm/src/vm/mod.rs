//! A virtual machine: KVM, guest RAM, devices and vCPU threads. Built one way
//! ([`builder::VmBuilder`]); saved and restored in [`state`].
//!
//! ```text
//! VmBuilder::new(..).build(boot)    the machine, vCPU threads paused (a restored one's
//!                                   spawn in restore_state, once its state is in)
//!   .start()                        resume every vCPU
//!   .pause() / .resume()            all vCPUs, bounded in time
//!   .next_event(timeout)            reset, poweroff, stop request, guest failure
//!   .save_state() / .restore_state(&VmState)
//! ```
//! Invariant: `pause` returns only once every vCPU thread is out of KVM_RUN (or an error
//! names those that are not).

pub mod builder;
pub mod state;

pub use builder::{build, Boot, CpuChoice, VmBuilder};

use std::io::Write;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpuid::profile::CpuProfile;
use cpuid::{CpuidDump, Leaf};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::devices::manager::Devices;
use crate::event::VmEvent;
use crate::guest_cpu::{self, admission};
use crate::memory::{self, GuestMemoryMmap, GuestRam};
use crate::vcpu::setup;
use crate::vcpu::{ExitCounts, RunState, Vcpu, VcpuCmd, VcpuHandle, VcpuRegs, VcpuShared};
use crate::{boot, config};

/// How long pause waits for every vCPU to leave the guest.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvmFile(std::io::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    KvmApiVersion(i32),
    #[error("this host's KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Cpu(#[from] setup::Error),
    #[error(transparent)]
    CpuModel(#[from] guest_cpu::model::Error),
    #[error(transparent)]
    Devices(#[from] crate::devices::manager::Error),
    #[error("the vCPU kick signal handler: {0}")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    #[error("the saved CPU profile is invalid: {0}")]
    SavedProfile(#[source] cpuid::profile::Error),
    #[error(transparent)]
    Refused(#[from] admission::Refusal),
    #[error(transparent)]
    Admit(#[from] admission::Error),
    #[error("cannot start a vCPU thread: {0}")]
    SpawnVcpu(#[source] std::io::Error),
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::OpenError),
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::tap::Error),
    #[error("guest RAM ends at {top:#x}, beyond what the CPU profile's {bits} physical address bits reach")]
    RamBeyondAddressWidth { top: u64, bits: u32 },
    #[error("the VM is already booted")]
    AlreadyBooted,
    #[error("the VM has not been booted")]
    NotBooted,
    #[error("vCPU(s) {0:?} did not leave the guest within {PAUSE_TIMEOUT:?}")]
    PauseTimeout(Vec<u32>),
    #[error("vCPU(s) {0:?} did not resume within {PAUSE_TIMEOUT:?}")]
    ResumeTimeout(Vec<u32>),
    #[error("vcpu{0} does not exist or did not answer")]
    NoSuchVcpu(u32),
}

impl Error {
    /// What kind of failure this is (docs/api.md, "Error codes").
    pub fn code(&self) -> crate::codes::Code {
        use crate::codes::Code;
        match self {
            Error::OpenKvm(_)
            | Error::OpenKvmFile(_)
            | Error::KvmApiVersion(_)
            | Error::MissingCap(_)
            | Error::Kvm { .. }
            | Error::Memory(_)
            | Error::Cpu(_)
            | Error::KickHandler(_) => Code::Kvm,
            Error::Config(_) | Error::SavedProfile(_) | Error::RamBeyondAddressWidth { .. } => {
                Code::BadRequest
            }
            Error::CpuModel(_) | Error::Refused(_) | Error::Admit(_) => Code::RefusedCpu,
            Error::Boot(_) | Error::Disk(_) | Error::Tap(_) => Code::Io,
            Error::AlreadyBooted | Error::NotBooted => Code::WrongState,
            Error::PauseTimeout(_) | Error::ResumeTimeout(_) => Code::TimedOut,
            Error::Devices(e) => e.code(),
            Error::SpawnVcpu(_) | Error::NoSuchVcpu(_) => Code::Internal,
        }
    }
}

fn kvm_op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// A virtual machine.
pub struct Vm {
    pub(crate) kvm: Kvm,
    pub(crate) fd: Arc<VmFd>,
    pub(crate) ram: GuestRam,
    devices: Devices,
    pub(crate) host_cpu: CpuidDump,
    pub(crate) profile: CpuProfile,
    /// The profile's guest table (APIC IDs 0), as requested from KVM.
    pub(crate) table: Vec<Leaf>,
    /// vCPU 0's table as KVM holds it.
    pub(crate) effective: Vec<Leaf>,
    /// The guest's TSC rate in kHz (0: unknown).
    pub(crate) tsc_khz: u32,
    pub(crate) num_vcpus: u32,
    /// vCPU fds whose threads do not run yet (a restored machine's, until its state is in).
    pub(crate) unstarted: Vec<VcpuFd>,
    pub(crate) vcpus: Vec<VcpuHandle>,
    events_tx: Sender<VmEvent>,
    events_rx: Mutex<Receiver<VmEvent>>,
    /// Held across multi-step lifecycle changes (pause, save, resume) by their callers.
    lifecycle: Mutex<()>,
    /// The guest state was restored into this machine and has not run here yet: its
    /// network cards announce it when it starts.
    pub(crate) moved: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("memory", &self.ram.size())
            .field("vcpus", &self.num_vcpus)
            .finish()
    }
}

/// Refuses guest RAM whose top (after the MMIO gap) the profile's physical address bits
/// cannot reach: the guest could not address it.
fn check_address_width(profile: &CpuProfile, memory: u64) -> Result<(), Error> {
    let top = crate::memory::ram_ranges(memory)
        .last()
        .map(|(start, len)| start.0 + len)
        .unwrap_or(0);
    if profile.phys_bits < 64 && top > 1u64 << profile.phys_bits {
        return Err(Error::RamBeyondAddressWidth {
            top,
            bits: profile.phys_bits,
        });
    }
    Ok(())
}

/// The largest vCPU count this host's KVM allows.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    (kvm.get_max_vcpus() as u32).min(boot::mptable::MAX_CPUS)
}

/// /dev/kvm, opened before ferry gave up root ([`keep_kvm_open`]).
static KVM: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Opens /dev/kvm now and keeps it, so that [`open_kvm`] works after ferry has become a
/// user who may not open it.
pub fn keep_kvm_open() -> Result<(), Error> {
    if KVM.get().is_some() {
        return Ok(());
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(Error::OpenKvmFile)?;
    let _ = KVM.set(dev);
    Ok(())
}

/// Opens /dev/kvm (a duplicate of the kept one, if any) with a clear error.
pub fn open_kvm() -> Result<Kvm, Error> {
    let kvm = match KVM.get() {
        Some(dev) => {
            let fd = dev.try_clone().map_err(Error::OpenKvmFile)?;
            // SAFETY: `fd` is a fresh duplicate of an open /dev/kvm, owned by nothing else;
            // Kvm takes it over and closes it.
            unsafe {
                <Kvm as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
                    fd,
                ))
            }
        }
        None => Kvm::new().map_err(Error::OpenKvm)?,
    };
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(Error::KvmApiVersion(v));
    }
    Ok(kvm)
}

impl Vm {
    /// Spawns the thread of every vCPU not yet running one (paused): all asked for first,
    /// then each waited for (through a spawner, one wake-up for them all).
    fn spawn_vcpus(&mut self) -> Result<(), Error> {
        let mut starting = Vec::new();
        for (id, fd) in std::mem::take(&mut self.unstarted).into_iter().enumerate() {
            let (tx, rx) = channel();
            let vcpu = Vcpu {
                id: id as u32,
                fd,
                io: self.devices.buses().clone(),
                events: self.events_tx.clone(),
                cmds: rx,
                shared: Arc::new(VcpuShared::new()),
            };
            starting.push(VcpuHandle::start(vcpu, tx));
        }
        for s in starting {
            self.vcpus.push(s.handle().map_err(Error::SpawnVcpu)?);
        }
        Ok(())
    }

    /// The guest CPU as this host runs it: what a snapshot or a migration carries for the
    /// host that takes the guest in (crate::guest_cpu::admission).
    pub fn guest_cpu(&self) -> migration::GuestCpu {
        crate::guest_cpu::admission::record(&self.host_cpu, self.tsc_khz, &self.effective)
    }

    /// Lets every vCPU run (and the devices serve). A guest restored or received here
    /// announces itself on its network cards first.
    pub fn start(&self) -> Result<(), Error> {
        if self.moved.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.devices.announce();
        }
        self.resume()
    }

    /// Stops every vCPU at its next exit and returns once all of them are out of the guest,
    /// then the virtio devices once the requests in hand are done: from here on nothing
    /// writes guest RAM.
    pub fn pause(&self) -> Result<(), Error> {
        let stuck = self.command_all(|| VcpuCmd::Pause, RunState::Running)?;
        self.devices.pause_virtio();
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(Error::PauseTimeout(stuck))
        }
    }

    /// Lets the devices serve again and every paused vCPU run; returns once all of them
    /// have left Paused.
    pub fn resume(&self) -> Result<(), Error> {
        self.devices.resume_virtio();
        let stuck = self.command_all(|| VcpuCmd::Resume, RunState::Paused)?;
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(Error::ResumeTimeout(stuck))
        }
    }

    /// Sends `cmd()` to every vCPU and waits, up to [`PAUSE_TIMEOUT`], for each to leave
    /// state `from`. Returns the vCPUs still in it.
    fn command_all(&self, cmd: fn() -> VcpuCmd, from: RunState) -> Result<Vec<u32>, Error> {
        if self.vcpus.is_empty() {
            return Err(Error::NotBooted);
        }
        for v in &self.vcpus {
            v.send(cmd());
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        Ok(self
            .vcpus
            .iter()
            .filter(|v| v.shared.wait_until(deadline, |s| s != from) == from)
            .map(|v| v.id)
            .collect())
    }

    /// Serializes lifecycle changes made of several steps (pause, save, resume): hold the
    /// guard across them so that another controller cannot interleave.
    pub fn lifecycle(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lifecycle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM's state: Running if any vCPU runs, Stopped if all have stopped, else Paused.
    pub fn state(&self) -> RunState {
        let states: Vec<RunState> = self.vcpus.iter().map(|v| v.state()).collect();
        if states.contains(&RunState::Running) {
            RunState::Running
        } else if !states.is_empty() && states.iter().all(|s| *s == RunState::Stopped) {
            RunState::Stopped
        } else {
            RunState::Paused
        }
    }

    /// Each vCPU's state.
    pub fn vcpu_states(&self) -> Vec<RunState> {
        self.vcpus.iter().map(|v| v.state()).collect()
    }

    /// Asks the main loop to end the VM (as the control socket's `stop` does).
    pub fn request_stop(&self, by: &'static str) {
        let _ = self.events_tx.send(VmEvent::StopRequested { by });
    }

    /// Waits up to `timeout` for the next VM event.
    pub fn next_event(&self, timeout: Duration) -> Option<VmEvent> {
        let rx = self.events_rx.lock().unwrap_or_else(|e| e.into_inner());
        match rx.recv_timeout(timeout) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Stops every vCPU thread and waits for them.
    pub fn shutdown(&self) {
        for v in &self.vcpus {
            v.join();
        }
    }

    /// Registers and MP state of a paused vCPU.
    pub fn vcpu_regs(&self, id: u32) -> Result<VcpuRegs, Error> {
        let v = self.vcpus.get(id as usize).ok_or(Error::NoSuchVcpu(id))?;
        match v.regs(PAUSE_TIMEOUT) {
            Some(Ok(r)) => Ok(r),
            Some(Err(source)) => Err(Error::Kvm {
                op: "reading vCPU registers",
                source,
            }),
            None => Err(Error::NoSuchVcpu(id)),
        }
    }

    /// Exit counts of vCPU `id`.
    pub fn exit_counts(&self, id: u32) -> Option<ExitCounts> {
        self.vcpus
            .get(id as usize)
            .map(|v| v.shared.exits.snapshot())
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// Guest RAM with its memslots: dirty logging, pagemap, resident blocks.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The machine's devices.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// Keeps every running vCPU out of the guest for `d` (migration throttling).
    pub fn throttle_vcpus(&self, d: Duration) {
        for v in &self.vcpus {
            v.send(VcpuCmd::Throttle(d));
        }
    }

    /// Sends the bytes the guest writes to the debug port (0xe9) to `w` from now on.
    pub fn set_debug_console(&self, w: Box<dyn Write + Send>) {
        self.devices.set_debug_console(w);
    }

    /// Feeds console input to the guest's COM1.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.devices.serial_input(bytes)
    }

    /// Number of vCPUs.
    pub fn num_vcpus(&self) -> u32 {
        self.num_vcpus
    }

    /// Guest RAM size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.ram.size()
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The guest CPU profile.
    pub fn cpu_profile(&self) -> &CpuProfile {
        &self.profile
    }

    /// This host's CPUID as KVM offers it.
    pub fn host_cpu(&self) -> &CpuidDump {
        &self.host_cpu
    }

    /// vCPU 0's CPUID table as requested from KVM.
    pub fn cpuid_requested(&self) -> Vec<Leaf> {
        cpuid::table::for_vcpu(&self.table, 0)
    }

    /// vCPU 0's CPUID table as KVM holds it (KVM_GET_CPUID2 after KVM_SET_CPUID2); empty
    /// before boot. Checks and migration use this one.
    pub fn cpuid_effective(&self) -> &[Leaf] {
        &self.effective
    }

    /// How KVM changed vCPU 0's table from the request (`+name`: a feature forced on).
    pub fn cpuid_forced(&self) -> cpuid::table::TableDiff {
        cpuid::table::diff(&self.cpuid_requested(), &self.effective)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
