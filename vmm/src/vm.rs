//! A running virtual machine: KVM, guest RAM, devices and vCPU threads.
//!
//! ```text
//! Vm::new(memory, vcpus, console)   KVM fd, irqchip + PIT, RAM as memslots, COM1, i8042,
//!                                   vCPU fds (not yet running)
//!   .boot_linux(cfg) | .boot_raw()  load the guest, set up every vCPU, spawn threads (paused)
//!   .start()                        resume every vCPU
//!   .pause() / .resume()            all vCPUs, bounded in time
//!   .next_event(timeout)            reset, poweroff, stop request, guest failure
//! ```
//! Invariant: vCPU threads exist only after a successful boot_*; `pause` returns only once
//! every vCPU thread is out of KVM_RUN (or an error names those that are not).

use std::io::Write;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpuid::profile::CpuProfile;
use cpuid::{CpuidDump, Leaf};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, layout, EntryPoint};
use crate::config::{self, VmConfig};
use crate::cpu;
use crate::cpu_model;
use crate::devices::{
    i8042::I8042, serial, Bus, DebugOutput, DebugPort, IoBuses, Sink, DEBUG_PORT,
};
use crate::event::VmEvent;
use crate::memory::{self, GuestMemoryMmap, GuestRam};
use crate::vcpu::{self, ExitCounts, RunState, Vcpu, VcpuCmd, VcpuHandle, VcpuRegs, VcpuShared};

/// How long pause waits for every vCPU to leave the guest.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    KvmApiVersion(i32),
    #[error("this host's KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Cpu(#[from] cpu::Error),
    #[error(transparent)]
    CpuModel(#[from] cpu_model::Error),
    #[error("device setup failed: {0}")]
    Device(String),
    #[error("cannot start a vCPU thread: {0}")]
    SpawnVcpu(std::io::Error),
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

fn kvm_op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// A virtual machine.
pub struct Vm {
    pub(crate) kvm: Kvm,
    pub(crate) fd: VmFd,
    pub(crate) ram: GuestRam,
    io: Arc<IoBuses>,
    pub(crate) serial: Arc<Mutex<serial::SerialDevice>>,
    pub(crate) host_cpu: CpuidDump,
    pub(crate) profile: CpuProfile,
    /// The profile's guest table (APIC IDs 0) as requested, and as KVM holds it for vCPU 0.
    pub(crate) table: Vec<Leaf>,
    pub(crate) effective: Vec<Leaf>,
    /// The guest's TSC rate in kHz (0: unknown).
    pub(crate) tsc_khz: u32,
    pub(crate) num_vcpus: u32,
    pub(crate) unstarted: Vec<VcpuFd>,
    pub(crate) vcpus: Vec<VcpuHandle>,
    events_tx: Sender<VmEvent>,
    events_rx: Mutex<Receiver<VmEvent>>,
    /// Held across multi-step lifecycle changes (pause, save, resume) by their callers.
    lifecycle: Mutex<()>,
    /// Where the debug port's bytes go.
    debug_output: DebugOutput,
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

/// Opens /dev/kvm with a clear error.
pub fn open_kvm() -> Result<Kvm, Error> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(Error::KvmApiVersion(v));
    }
    Ok(kvm)
}

impl Vm {
    /// Creates the machine: `memory` bytes of RAM, `vcpus` vCPUs, console output to `console`.
    pub fn new(memory: u64, vcpus: u32, console: Box<dyn Write + Send>) -> Result<Vm, Error> {
        config::validate_memory(memory)?;
        Self::with_ram(GuestRam::new(memory)?, vcpus, console)
    }

    /// Creates the machine around RAM allocated already (a migration destination fills it
    /// while this runs on another thread: registering a large memslot takes milliseconds).
    pub fn with_ram(
        mut ram: GuestRam,
        vcpus: u32,
        console: Box<dyn Write + Send>,
    ) -> Result<Vm, Error> {
        let memory = ram.size();
        config::validate_memory(memory)?;
        let kvm = open_kvm()?;
        config::validate_vcpus(vcpus, max_vcpus(&kvm))?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCap(name));
            }
        }
        vcpu::install_kick_handler()
            .map_err(|e| Error::Device(format!("kick signal handler: {e}")))?;
        let fd = kvm.create_vm().map_err(kvm_op("KVM_CREATE_VM"))?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm_op("KVM_SET_TSS_ADDR"))?;
        if kvm.check_extension(Cap::SetIdentityMapAddr) {
            fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
                .map_err(kvm_op("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        fd.create_irq_chip().map_err(kvm_op("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_op("KVM_CREATE_PIT2"))?;

        ram.enable_manual_protect(&fd);
        ram.register(&fd)?;

        let (events_tx, events_rx) = channel();
        let io = Arc::new(IoBuses::default());
        let irq = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| Error::Device(format!("serial eventfd: {e}")))?;
        fd.register_irqfd(&irq, serial::COM1_IRQ)
            .map_err(kvm_op("KVM_IRQFD"))?;
        let serial = serial::SerialDevice::new(irq, console)
            .map_err(|e| Error::Device(format!("serial: {e}")))?;
        let serial = Arc::new(Mutex::new(serial));
        let dev_err = |e: crate::devices::Error| Error::Device(e.to_string());
        io.pio
            .insert(serial::COM1_BASE, 8, serial.clone())
            .map_err(dev_err)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(events_tx.clone())));
        io.pio
            .insert(crate::devices::i8042::I8042_BASE, 5, i8042)
            .map_err(dev_err)?;
        io.pio
            .insert(0x80, 1, Arc::new(Mutex::new(Sink)))
            .map_err(dev_err)?;
        let debug_output: DebugOutput = Arc::new(Mutex::new(None));
        io.pio
            .insert(
                DEBUG_PORT,
                1,
                Arc::new(Mutex::new(DebugPort(debug_output.clone()))),
            )
            .map_err(dev_err)?;

        let host_cpu = cpu_model::host_dump(&kvm)?;
        let profile = cpu_model::default_profile(&host_cpu)?;
        check_address_width(&profile, memory)?;
        let table = cpuid::table::guest_table(&profile, vcpus);
        let unstarted = (0..vcpus)
            .map(|id| {
                fd.create_vcpu(u64::from(id))
                    .map_err(kvm_op("KVM_CREATE_VCPU"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Vm {
            kvm,
            fd,
            ram,
            io,
            serial,
            host_cpu,
            profile,
            table,
            effective: Vec::new(),
            tsc_khz: 0,
            num_vcpus: vcpus,
            unstarted,
            vcpus: Vec::new(),
            events_tx,
            events_rx: Mutex::new(events_rx),
            lifecycle: Mutex::new(()),
            debug_output,
        })
    }

    /// Loads a Linux kernel as `cfg` describes and readies every vCPU (paused).
    pub fn boot_linux(&mut self, cfg: &VmConfig) -> Result<(), Error> {
        if self.unstarted.is_empty() {
            return Err(Error::AlreadyBooted);
        }
        let entry = boot::load_linux(self.ram.memory(), cfg)?;
        self.ready_vcpus(&entry)
    }

    /// Copies a raw image to `addr` and readies every vCPU to start at `entry` (paused).
    pub fn boot_raw(&mut self, image: &[u8], addr: u64, entry: EntryPoint) -> Result<(), Error> {
        if self.unstarted.is_empty() {
            return Err(Error::AlreadyBooted);
        }
        boot::load_raw(self.ram.memory(), image, addr)?;
        self.ready_vcpus(&entry)
    }

    /// Sets the guest CPU model (before boot), refusing one this host cannot run.
    pub fn set_cpu_profile(&mut self, profile: CpuProfile) -> Result<(), Error> {
        if self.unstarted.is_empty() {
            return Err(Error::AlreadyBooted);
        }
        cpu_model::check_host(&profile, &self.host_cpu)?;
        check_address_width(&profile, self.ram.size())?;
        self.table = cpuid::table::guest_table(&profile, self.num_vcpus);
        self.profile = profile;
        Ok(())
    }

    /// Spawns the threads of vCPUs whose state was restored (paused).
    pub(crate) fn spawn_restored(&mut self) -> Result<(), Error> {
        if let Some(fd) = self.unstarted.first() {
            let back = fd
                .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm_op("KVM_GET_CPUID2"))?;
            self.effective = cpu_model::from_kvm("KVM_GET_CPUID2", &back).leaves;
        }
        self.spawn_vcpus()
    }

    fn spawn_vcpus(&mut self) -> Result<(), Error> {
        for (id, fd) in std::mem::take(&mut self.unstarted).into_iter().enumerate() {
            let (tx, rx) = channel();
            let vcpu = Vcpu {
                id: id as u32,
                fd,
                io: self.io.clone(),
                events: self.events_tx.clone(),
                cmds: rx,
                shared: Arc::new(VcpuShared::new()),
            };
            self.vcpus
                .push(VcpuHandle::spawn(vcpu, tx).map_err(Error::SpawnVcpu)?);
        }
        Ok(())
    }

    pub(crate) fn ready_vcpus(&mut self, entry: &EntryPoint) -> Result<(), Error> {
        for (id, fd) in self.unstarted.iter().enumerate() {
            let id = id as u32;
            let table = cpu_model::to_kvm(&cpuid::table::for_vcpu(&self.table, id))?;
            cpu::setup_vcpu(fd, id, &table, entry, self.ram.memory())?;
            if id == 0 {
                let back = fd
                    .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm_op("KVM_GET_CPUID2"))?;
                self.effective = cpu_model::from_kvm("KVM_GET_CPUID2", &back).leaves;
                self.tsc_khz = crate::admit::tsc_host(&self.kvm, fd).khz;
            }
        }
        self.spawn_vcpus()
    }

    /// The guest CPU as this host runs it: what a snapshot or a migration carries for the
    /// host that takes the guest in (crate::admit).
    pub fn guest_cpu(&self) -> migration::GuestCpu {
        crate::admit::record(&self.host_cpu, self.tsc_khz, &self.effective)
    }

    /// Lets every vCPU run.
    pub fn start(&self) -> Result<(), Error> {
        self.resume()
    }

    /// Stops every vCPU at its next exit and returns once all of them are out of the guest.
    pub fn pause(&self) -> Result<(), Error> {
        let stuck = self.command_all(|| VcpuCmd::Pause, RunState::Running)?;
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(Error::PauseTimeout(stuck))
        }
    }

    /// Lets every paused vCPU run again; returns once all of them have left Paused.
    pub fn resume(&self) -> Result<(), Error> {
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

    /// Guest RAM with its memslots (dirty logging).
    pub fn ram_mut(&mut self) -> (&mut GuestRam, &VmFd) {
        (&mut self.ram, &self.fd)
    }

    /// Switches dirty tracking on (KVM's log of every slot, and ferry's own bitmap, both
    /// starting empty) or off. Callers hold the lifecycle lock.
    pub fn set_dirty_tracking(&self, on: bool) -> Result<(), Error> {
        self.ram.set_dirty_logging(&self.fd, on)?;
        if on {
            // Classic: clear what logging found so far. Manual: every page reads as dirty
            // until a migration clears it, chunk by chunk.
            if !self.ram.manual_protect() {
                self.ram.take_dirty_log(&self.fd)?;
            }
            self.ram.take_vmm_dirty();
        }
        Ok(())
    }

    /// Pages written since the last call (or since tracking started), by the guest (KVM's
    /// log) or by ferry: one bitmap per RAM region, bit i of word w = page 64 * w + i. With
    /// manual protection ([`GuestRam::enable_manual_protect`]) KVM's part stays set until
    /// [`Vm::clear_dirty`] clears it: at the start every page is dirty.
    pub fn take_dirty(&self) -> Result<Vec<Vec<u64>>, Error> {
        let mut bits = self.ram.peek_dirty_log(&self.fd)?;
        for (k, v) in bits.iter_mut().zip(self.ram.take_vmm_dirty()) {
            for (a, b) in k.iter_mut().zip(v) {
                *a |= b;
            }
        }
        Ok(bits)
    }

    /// Whether KVM's dirty log is protected manually: then clear each chunk with
    /// [`Vm::clear_dirty`] just before reading its pages.
    pub fn manual_dirty_protect(&self) -> bool {
        self.ram.manual_protect()
    }

    /// Clears KVM's dirty bits `bits` of RAM region `region` from page `first_page` (a
    /// multiple of 64), write-protecting those pages again (manual protection only).
    pub fn clear_dirty(&self, region: usize, first_page: u64, bits: &[u64]) -> Result<(), Error> {
        Ok(self
            .ram
            .clear_dirty_log(&self.fd, region as u32, first_page, bits)?)
    }

    /// The blocks of `block` bytes of RAM the guest has touched (see
    /// [`GuestRam::resident_blocks`]).
    pub fn resident_blocks(&self, block: u64) -> Vec<u64> {
        self.ram.resident_blocks(block)
    }

    /// Pages ever touched, per RAM region (see [`GuestRam::touched_pages`]).
    pub fn touched_pages(&self) -> Vec<Vec<u64>> {
        self.ram.touched_pages()
    }

    /// Pages ever touched in `words` 64-page words of RAM region `region` from page
    /// `first_page` (see [`GuestRam::touched_range`]).
    pub fn touched_range(
        &self,
        pagemap: &memory::Pagemap,
        region: usize,
        first_page: u64,
        words: usize,
    ) -> Vec<u64> {
        self.ram.touched_range(pagemap, region, first_page, words)
    }

    /// Each RAM region's guest address and length, in the order of the bitmaps above.
    pub fn ram_regions(&self) -> Vec<(u64, u64)> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.memory()
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }

    /// Keeps every running vCPU out of the guest for `d` (migration throttling).
    pub fn throttle_vcpus(&self, d: Duration) {
        for v in &self.vcpus {
            v.send(VcpuCmd::Throttle(d));
        }
    }

    /// The port I/O bus, to attach extra devices before `start`.
    pub fn pio_bus(&self) -> &Bus {
        &self.io.pio
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Bus {
        &self.io.mmio
    }

    /// Sends the bytes the guest writes to the debug port (0xe9) to `w` from now on.
    pub fn set_debug_console(&self, w: Box<dyn Write + Send>) {
        *self.debug_output.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
    }

    /// Feeds console input to the guest's COM1.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .input(bytes)
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

/// Builds a VM for `cfg` and boots its kernel: the `ferry run` path.
pub fn build(cfg: &VmConfig, console: Box<dyn Write + Send>) -> Result<Vm, Error> {
    let kvm = open_kvm()?;
    cfg.validate(max_vcpus(&kvm))?;
    drop(kvm);
    let mut vm = Vm::new(cfg.memory, cfg.vcpus, console)?;
    if let Some(spec) = &cfg.cpu {
        let p = cpu_model::load_profile(spec, vm.host_cpu())?;
        vm.set_cpu_profile(p)?;
    }
    vm.boot_linux(cfg)?;
    let cpuid::table::TableDiff {
        features: forced,
        registers: other,
    } = vm.cpuid_forced();
    if !forced.is_empty() || !other.is_empty() {
        log::warn!(
            "this host's KVM changed the guest CPUID after KVM_SET_CPUID2: features {}; other registers {:?}",
            forced.join(" "),
            other
        );
    }
    Ok(vm)
}
