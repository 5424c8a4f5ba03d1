//! Saving a paused VM into the vendor-neutral [`VmState`] and building a new VM from one.
//!
//! Restore order (why): the machine (memory slots, irqchip, PIT) exists first; the CPU
//! profile is checked against this host and every vCPU's CPUID is set (in
//! [`Vm::for_restore`]) before any other vCPU state (KVM validates XSAVE, MSRs and more against it); memory is written before vCPUs can
//! run; vCPU state in the order of [`vcpu_state::restore`]; then PIC, IOAPIC and PIT; then the
//! kvmclock (before any vCPU runs; KVM's flags are not echoed back); then devices. vCPU
//! threads start paused.

use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use cpuid::profile::CpuProfile;
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use migration::{GuestCpu, IrqchipState, MachineConfig, MemoryRange, VmState};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::admit;
use crate::cpu_model;
use crate::memory::PAGE_SIZE;
use crate::vcpu::{RunState, SaveRequest, VcpuCmd};
use crate::vcpu_state;
use crate::vm::{Error as VmError, Vm};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the VM must be paused to save it (it is {0:?})")]
    NotPaused(RunState),
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
    #[error("the saved CPU profile is invalid: {0}")]
    Profile(#[from] cpuid::profile::Error),
    #[error("memory range at {gpa:#x} ({len} bytes) is outside guest RAM")]
    MemoryRange { gpa: u64, len: usize },
    #[error("the saved VM has {found} bytes of RAM, this machine {want}")]
    MemorySize { found: u64, want: u64 },
    #[error("the saved VM has {found} vCPU states for {want} vCPUs")]
    VcpuCount { found: usize, want: u32 },
    #[error("saved {what} is {len} bytes, KVM's is {want}")]
    Size {
        what: &'static str,
        len: usize,
        want: usize,
    },
    #[error("serial state: {0}")]
    Serial(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Admit(#[from] admit::Error),
}

/// Why a snapshot file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Open(#[source] std::io::Error),
    #[error("zstd: {0}")]
    Zstd(String),
    #[error(transparent)]
    Stream(#[from] migration::stream::Error),
    #[error(transparent)]
    Save(#[from] Error),
    #[error("{path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Saves the paused `vm` and writes it to `<path>.partial` (a new file, never through an
/// existing one or a link), syncs it, renames it over `path` and syncs the directory;
/// removes the partial file on failure. Returns the bytes written and the memory ranges.
pub fn write_file(vm: &Vm, path: &std::path::Path) -> Result<(u64, usize), FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let state = vm.save_state()?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".partial");
    let tmp = std::path::PathBuf::from(tmp_name);
    let at = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| FileError::Write { path, source }
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .map_err(at(&tmp))?;
    let written = (|| -> Result<u64, FileError> {
        let mut w = std::io::BufWriter::new(file);
        let bytes = migration::stream::write_vm(&mut w, &state).map_err(at(&tmp))?;
        let file = w.into_inner().map_err(|e| at(&tmp)(e.into_error()))?;
        file.sync_all().map_err(at(&tmp))?;
        std::fs::rename(&tmp, path).map_err(at(path))?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(at(dir))?;
        Ok(bytes)
    })();
    match written {
        Ok(bytes) => Ok((bytes, state.memory.len())),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The first bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Reads a snapshot file: a VM stream as `ferry ctl snapshot` writes it, or the same
/// compressed with zstd (told by its first bytes, whatever its name). Decompression is
/// streaming, its window capped at 100 MiB by the decoder; the stream reader's caps apply
/// to what comes out.
pub fn read_file(path: &std::path::Path) -> Result<VmState, FileError> {
    use std::io::{BufReader, Read, Seek};
    let mut file = std::fs::File::open(path).map_err(FileError::Open)?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(FileError::Open)?;
    file.rewind().map_err(FileError::Open)?;
    let file = BufReader::new(file);
    if n == magic.len() && magic == ZSTD_MAGIC {
        let mut z = ruzstd::decoding::StreamingDecoder::new(file)
            .map_err(|e| FileError::Zstd(e.to_string()))?;
        return Ok(migration::stream::read_vm(&mut BufReader::new(&mut z))?);
    }
    Ok(migration::stream::read_vm(&mut { file })?)
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

/// Every page of guest RAM that is not zero, as ranges of consecutive pages. Pages never
/// touched (pagemap) are not read at all.
pub fn save_memory(vm: &Vm) -> Vec<MemoryRange> {
    let mem = vm.memory();
    let mut out: Vec<MemoryRange> = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for (region, touched) in mem.iter().zip(vm.touched_pages()) {
        let start = region.start_addr().0;
        for index in 0..region.len() / PAGE_SIZE {
            let i = index as usize;
            if touched.get(i / 64).is_none_or(|w| w >> (i % 64) & 1 == 0) {
                continue;
            }
            let gpa = start + index * PAGE_SIZE;
            if mem.read_slice(&mut page, GuestAddress(gpa)).is_err()
                || migration::pages::is_zero(&page)
            {
                continue;
            }
            match out.last_mut() {
                Some(r) if r.gpa + r.data.len() as u64 == gpa => r.data.extend_from_slice(&page),
                _ => out.push(MemoryRange {
                    gpa,
                    data: page.clone(),
                }),
            }
        }
    }
    out
}

impl Vm {
    /// The whole VM's state; every vCPU must be paused.
    pub fn save_state(&self) -> Result<VmState, Error> {
        self.save_state_with(true)
    }

    /// The VM's state with or without its memory (a migration sends memory apart).
    pub fn save_state_with(&self, memory: bool) -> Result<VmState, Error> {
        let state = self.state();
        if state != RunState::Paused {
            return Err(Error::NotPaused(state));
        }
        let host = Arc::new(self.host_cpu.clone());
        let msrs = Arc::new(crate::msrs::allowlist(&self.profile));
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
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state();
        Ok(VmState {
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
            serial,
            memory: if memory {
                save_memory(self)
            } else {
                Vec::new()
            },
        })
    }

    /// Builds a new VM from a saved state, paused: `start` continues the guest.
    pub fn restore(state: &VmState, console: Box<dyn std::io::Write + Send>) -> Result<Vm, Error> {
        let cfg = &state.config;
        let saved = state.guest_cpu.as_ref();
        let mut vm = Vm::for_restore(cfg.memory, cfg.vcpus, &state.cpu_profile, saved, console)?;
        vm.load_state(state)?;
        Ok(vm)
    }

    /// An empty machine shaped as a saved one (RAM, vCPUs, CPU profile as its JSON text),
    /// to receive memory into and then [`Vm::load_state`]. `saved` is the guest CPU as the
    /// saving host ran it (None: not known); one this host would change is refused, and its
    /// TSC rate set where this host can (see [`admit`]).
    pub fn for_restore(
        memory: u64,
        vcpus: u32,
        profile_json: &str,
        saved: Option<&GuestCpu>,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Vm, Error> {
        crate::config::validate_memory(memory).map_err(VmError::from)?;
        let ram = crate::memory::GuestRam::new(memory).map_err(VmError::from)?;
        Self::for_restore_with_ram(ram, vcpus, profile_json, saved, console)
    }

    /// [`Vm::for_restore`] around RAM allocated already.
    pub fn for_restore_with_ram(
        ram: crate::memory::GuestRam,
        vcpus: u32,
        profile_json: &str,
        saved: Option<&GuestCpu>,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Vm, Error> {
        let profile = CpuProfile::from_json("the saved VM", profile_json)?;
        let mut vm = Vm::with_ram(ram, vcpus, console)?;
        vm.set_cpu_profile(profile)?;
        // CPUID depends only on the profile: set it now, outside a migration's downtime.
        for (id, fd) in vm.unstarted.iter().enumerate() {
            let table = cpu_model::to_kvm(&cpuid::table::for_vcpu(&vm.table, id as u32))
                .map_err(VmError::from)?;
            fd.set_cpuid2(&table).map_err(kvm("KVM_SET_CPUID2"))?;
        }
        let fd0 = vm.unstarted.first().ok_or(VmError::AlreadyBooted)?;
        let here = admit::HostView {
            effective: admit::effective_table(fd0)?,
            tsc: admit::tsc_host(&vm.kvm, fd0),
        };
        let a = admit::admit(saved, &vm.profile, vcpus, &here).map_err(Error::Refused)?;
        vm.tsc_khz = a.apply(&vm.unstarted, here.tsc.khz)?;
        vm.effective = here.effective;
        Ok(vm)
    }

    /// Loads a saved state into a machine made by [`Vm::for_restore`] for it: the state's
    /// memory ranges (pages not in them keep what they hold), every vCPU, the irqchip,
    /// clock and devices; then starts the vCPU threads, paused.
    pub fn load_state(&mut self, state: &VmState) -> Result<(), Error> {
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
        let started = std::time::Instant::now();
        let guest_xsave = vcpu_state::guest_xsave_mask(&vm.profile);
        for (id, fd) in vm.unstarted.iter().enumerate() {
            vcpu_state::restore(fd, &state.vcpus[id], &vm.host_cpu, guest_xsave)?;
        }
        let vcpus_done = started.elapsed();
        let irq = &state.irqchip;
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
            vm.fd.set_irqchip(&c).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        let pit: kvm_pit_state2 = from_bytes("PIT state", &irq.pit)?;
        vm.fd.set_pit2(&pit).map_err(kvm("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: irq.clock_ns,
            ..Default::default()
        };
        vm.fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        vm.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&state.serial)
            .map_err(Error::Serial)?;
        let devices_done = started.elapsed();
        vm.spawn_restored()?;
        log::debug!(
            "load_state: vCPUs {vcpus_done:?}, devices {:?}, threads {:?}",
            devices_done - vcpus_done,
            started.elapsed() - devices_done
        );
        Ok(())
    }
}
