//! Saving a paused VM into the vendor-neutral [`VmState`] and restoring one into a machine
//! built for it ([`Boot::Restored`]).
//!
//! Restore order (why): the machine (memory slots, irqchip, PIT) exists first; the CPU
//! profile is checked against this host and every vCPU's CPUID is set (by the builder)
//! before any other vCPU state (KVM validates XSAVE, MSRs and more against it); memory is
//! written before vCPUs can run; vCPU state in the order of [`vcpu_state::restore_state`]; then
//! PIC, IOAPIC and PIT; then the kvmclock (before any vCPU runs; KVM's flags are not echoed
//! back); then devices (their list, crate::devices::manager). vCPU threads start paused.

use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use migration::{IrqchipState, MachineConfig, MemoryRange, VmState};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{Boot, CpuChoice, Error as VmError, Vm, VmBuilder};
use crate::devices::virtio::backends::Opened;
use crate::memory::PAGE_SIZE;
use crate::vcpu::state as vcpu_state;
use crate::vcpu::{RunState, SaveRequest, VcpuCmd};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the VM must be paused to save it (it is {0:?})")]
    NotPaused(RunState),
    #[error(transparent)]
    Devices(crate::devices::virtio::backends::Mismatch),
    #[error("vcpu{0} did not answer the save request")]
    NoAnswer(u32),
    #[error(transparent)]
    Vcpu(#[from] vcpu_state::Error),
    #[error("{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("memory range at {gpa:#x} ({len} bytes) is outside guest RAM")]
    MemoryRange { gpa: u64, len: usize },
    #[error("the saved VM has {found} bytes of RAM, this machine {want}")]
    MemorySize { found: u64, want: u64 },
    #[error("the saved VM has {found} vCPU states for {want} vCPUs")]
    VcpuCount { found: usize, want: u32 },
    #[error("vcpu{vcpu}: the saved state sets MSR {msr:#x}{}, which a guest of this CPU profile cannot have (ferry carries only its profile's MSRs)", crate::vcpu::msrs::name(*.msr).map(|n| format!(" ({n})")).unwrap_or_default())]
    MsrNotCarried { vcpu: u32, msr: u32 },
    #[error("saved {what} is {len} bytes, KVM's is {want}")]
    Size {
        what: &'static str,
        len: usize,
        want: usize,
    },
}

impl Error {
    /// What kind of failure this is (docs/api.md, "Error codes").
    pub fn code(&self) -> crate::codes::Code {
        use crate::codes::Code;
        match self {
            Error::NotPaused(_) => Code::WrongState,
            Error::Devices(_) => Code::RefusedPolicy,
            Error::NoAnswer(_) => Code::Internal,
            Error::Vcpu(e) => e.code(),
            Error::Kvm { .. } => Code::Kvm,
            Error::Vm(e) => e.code(),
            Error::MemoryRange { .. }
            | Error::MemorySize { .. }
            | Error::VcpuCount { .. }
            | Error::MsrNotCarried { .. }
            | Error::Size { .. } => Code::BadFile,
        }
    }
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// KVM state blobs carried as raw bytes. Implemented only for types that have no padding
/// and no pointers, so that all their bytes are initialized and any bytes are a valid value.
///
/// # Safety
/// Implement only for such types.
unsafe trait KvmBlob: Copy + Default {}

// SAFETY: the irqchip union is 512 bytes and has a `dummy: [c_char; 512]` member covering
// every byte; KVM_GET_IRQCHIP writes all of them into a zeroed struct.
unsafe impl KvmBlob for kvm_bindings::kvm_irqchip__bindgen_ty_1 {}
// SAFETY: kvm_pit_state2 is 3 x 24-byte channel states (u32, u16, ten u8, i64: no gaps),
// a u32 and nine u32: 112 bytes, no padding, no pointers.
unsafe impl KvmBlob for kvm_pit_state2 {}

fn bytes_of<T: KvmBlob>(v: &T) -> Vec<u8> {
    // SAFETY: T: KvmBlob has no padding, so all size_of::<T>() bytes are initialized.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
        .to_vec()
}

fn from_bytes<T: KvmBlob>(what: &'static str, b: &[u8]) -> Result<T, Error> {
    let want = std::mem::size_of::<T>();
    if b.len() != want {
        return Err(Error::Size {
            what,
            len: b.len(),
            want,
        });
    }
    let mut v = T::default();
    // SAFETY: `b` has exactly size_of::<T>() bytes and every bit pattern is a valid T
    // (KvmBlob); KVM validates the contents when the state is set.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), &mut v as *mut T as *mut u8, want) };
    Ok(v)
}

fn chip_bytes(c: &kvm_irqchip) -> Vec<u8> {
    bytes_of(&c.chip)
}

/// Every page of guest RAM that is not zero, as (gpa, length) extents of consecutive pages,
/// none across two RAM regions. Pages never touched (pagemap) are not read at all.
pub fn memory_extents(vm: &Vm) -> Vec<(u64, u64)> {
    let mem = vm.memory();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let touched = vm.ram().touched_pages();
    for (region, touched) in mem.iter().zip(touched.regions()) {
        let start = region.start_addr().0;
        let pages = region.len() / PAGE_SIZE;
        let first = out.len();
        for index in crate::memory::set_pages(touched, 0).take_while(|p| *p < pages) {
            let gpa = start + index * PAGE_SIZE;
            if mem.read_slice(&mut page, GuestAddress(gpa)).is_err()
                || migration::pages::is_zero(&page)
            {
                continue;
            }
            match out[first..].last_mut() {
                Some((at, len)) if *at + *len == gpa => *len += PAGE_SIZE,
                _ => out.push((gpa, PAGE_SIZE)),
            }
        }
    }
    out
}

/// Every page of guest RAM that is not zero, copied, as ranges of consecutive pages.
pub fn save_memory(vm: &Vm) -> Vec<MemoryRange> {
    let mem = vm.memory();
    memory_extents(vm)
        .into_iter()
        .filter_map(|(gpa, len)| {
            let mut data = vec![0u8; len as usize];
            mem.read_slice(&mut data, GuestAddress(gpa)).ok()?;
            Some(MemoryRange { gpa, data })
        })
        .collect()
}

impl Vm {
    /// What backs each virtio device, in bus order: what a Hello carries.
    pub fn device_backends(&self) -> Vec<migration::DeviceBackend> {
        self.devices().virtio_backends()
    }

    /// The whole VM's state; every vCPU must be paused.
    pub fn save_state(&self) -> Result<VmState, Error> {
        self.save_state_with(true)
    }

    /// Saves the paused VM and hands `write` its state without memory and the guest's
    /// non-zero RAM as ranges read in place ([`memory_extents`]): nothing copies guest RAM
    /// (a snapshot of a 16 GiB guest does not need 16 GiB more). `lifecycle` is the guard
    /// of [`Vm::lifecycle`], held by the caller so that nothing resumes the VM meanwhile.
    pub fn save_in_place<T>(
        &self,
        lifecycle: &std::sync::MutexGuard<'_, ()>,
        write: impl FnOnce(&VmState, &[(u64, &[u8])]) -> T,
    ) -> Result<T, Error> {
        let _ = lifecycle;
        let state = self.save_state_with(false)?;
        let mut ranges = Vec::new();
        for (gpa, len) in memory_extents(self) {
            // SAFETY: the VM is paused (save_state_with checked it) and stays paused while
            // the slices live: they are dropped when `write` returns, and until then the
            // caller holds the lifecycle lock, without which nothing resumes a vCPU; paused
            // virtio devices do not write guest RAM (crate::devices::manager).
            let bytes = unsafe { crate::memory::ram_bytes(self.memory(), gpa, len) };
            ranges.push((
                gpa,
                bytes.ok_or(Error::MemoryRange {
                    gpa,
                    len: len as usize,
                })?,
            ));
        }
        Ok(write(&state, &ranges))
    }

    /// The VM's state with or without its memory (a migration sends memory apart).
    pub fn save_state_with(&self, memory: bool) -> Result<VmState, Error> {
        let state = self.state();
        if state != RunState::Paused {
            return Err(Error::NotPaused(state));
        }
        let host = Arc::new(self.host_cpu.clone());
        let msrs = Arc::new(crate::vcpu::msrs::allowlist(&self.profile));
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            let (tx, rx) = channel();
            v.send(VcpuCmd::Save(SaveRequest {
                host: host.clone(),
                msrs: msrs.clone(),
                reply: tx,
            }));
            vcpus.push(
                rx.recv_timeout(Duration::from_secs(10))
                    .map_err(|_| Error::NoAnswer(v.id))??,
            );
        }
        let mut chips = Vec::new();
        for chip_id in 0..3 {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(kvm("KVM_GET_IRQCHIP"))?;
            chips.push(chip_bytes(&c));
        }
        let pit = self.fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        let clock = self.fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        let mut state = VmState {
            config: MachineConfig {
                memory: self.memory_size(),
                vcpus: self.num_vcpus,
                cmdline: String::new(),
            },
            cpu_profile: self.profile.to_json(),
            guest_cpu: Some(self.guest_cpu()),
            vcpus,
            irqchip: IrqchipState {
                ioapic: chips.pop().unwrap_or_default(),
                pic_slave: chips.pop().unwrap_or_default(),
                pic_master: chips.pop().unwrap_or_default(),
                pit: bytes_of(&pit),
                clock_ns: clock.clock,
                clock_flags: clock.flags,
            },
            serial: Default::default(),
            devices: Vec::new(),
            memory: if memory {
                save_memory(self)
            } else {
                Vec::new()
            },
        };
        self.devices().save_state(&mut state);
        Ok(state)
    }

    /// Builds a new VM from a saved state, paused: `start` continues the guest. Its disks
    /// and network cards are those this side opened (`devices`, checked against the saved
    /// ones first, crate::devices::virtio::backends); a guest with devices needs them.
    pub fn restore(
        state: &VmState,
        devices: &mut Opened,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Vm, Error> {
        let mut vm = Vm::build_for(state, devices, console, None)?;
        vm.restore_state(state)?;
        Ok(vm)
    }

    /// The machine [`Vm::restore`] loads `state` into: its memory size, vCPUs, CPU and
    /// devices, nothing of its state loaded yet; its RAM `ram` where given (of the state's
    /// size, not attached to a VM: a snapshot's images mapped into it), else new.
    pub fn build_for(
        state: &VmState,
        devices: &mut Opened,
        console: Box<dyn std::io::Write + Send>,
        ram: Option<crate::memory::GuestRam>,
    ) -> Result<Vm, Error> {
        let cfg = &state.config;
        let saved: Vec<_> = state.devices.iter().map(|d| d.backend.clone()).collect();
        let devices = devices.resolve(&saved).map_err(Error::Devices)?;
        let mut builder = VmBuilder::new(cfg.memory, cfg.vcpus);
        if let Some(ram) = ram {
            builder = builder.ram(ram);
        }
        let vm = builder
            .console(console)
            .backends(devices)
            .cpu(CpuChoice::Saved {
                profile_json: state.cpu_profile.clone(),
                guest_cpu: state.guest_cpu.clone(),
            })
            .build(Boot::Restored)?;
        Ok(vm)
    }

    /// Loads a saved state into a machine built with [`Boot::Restored`] for it: the state's
    /// memory ranges (pages not in them keep what they hold), every vCPU, the irqchip,
    /// clock and devices; then starts the vCPU threads, paused.
    pub fn restore_state(&mut self, state: &VmState) -> Result<(), Error> {
        let vm = self;
        let cfg = &state.config;
        if state.vcpus.len() != cfg.vcpus as usize || cfg.vcpus != vm.num_vcpus {
            return Err(Error::VcpuCount {
                found: state.vcpus.len(),
                want: vm.num_vcpus,
            });
        }
        if cfg.memory != vm.memory_size() {
            return Err(Error::MemorySize {
                found: cfg.memory,
                want: vm.memory_size(),
            });
        }
        if vm.unstarted.is_empty() {
            return Err(VmError::AlreadyBooted.into());
        }
        for r in &state.memory {
            vm.memory()
                .write_slice(&r.data, GuestAddress(r.gpa))
                .map_err(|_| Error::MemoryRange {
                    gpa: r.gpa,
                    len: r.data.len(),
                })?;
        }
        // Only the MSRs ferry would have saved for this profile: a file or a peer cannot set
        // another (a hypervisor or debug MSR KVM happens to take) on the guest.
        let allowed = crate::vcpu::msrs::allowlist(&vm.profile);
        for v in &state.vcpus {
            if let Some(&(msr, _)) = v.msrs.iter().find(|(m, _)| !allowed.contains(m)) {
                return Err(Error::MsrNotCarried { vcpu: v.id, msr });
            }
        }
        let started = std::time::Instant::now();
        let guest_xsave = crate::vcpu::xsave::guest_xsave_mask(&vm.profile);
        for (id, fd) in vm.unstarted.iter().enumerate() {
            vcpu_state::restore_state(fd, &state.vcpus[id], &vm.host_cpu, guest_xsave)?;
        }
        let vcpus_done = started.elapsed();
        vm.restore_irqchip(&state.irqchip)?;
        vm.devices().restore_state(state).map_err(VmError::from)?;
        vm.moved.store(true, std::sync::atomic::Ordering::SeqCst);
        let devices_done = started.elapsed();
        vm.spawn_vcpus()?;
        log::debug!(
            "load_state: vCPUs {vcpus_done:?}, devices {:?}, threads {:?}",
            devices_done - vcpus_done,
            started.elapsed() - devices_done
        );
        Ok(())
    }

    /// The in-kernel irqchip (both PICs, the IOAPIC), the PIT and the clock.
    fn restore_irqchip(&self, irq: &migration::IrqchipState) -> Result<(), Error> {
        for (chip_id, bytes) in [
            (0u32, &irq.pic_master),
            (1, &irq.pic_slave),
            (2, &irq.ioapic),
        ] {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            c.chip = from_bytes("irqchip", bytes)?;
            self.fd.set_irqchip(&c).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        let pit: kvm_pit_state2 = from_bytes("PIT state", &irq.pit)?;
        self.fd.set_pit2(&pit).map_err(kvm("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: irq.clock_ns,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
