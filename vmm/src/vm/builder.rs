//! Building a machine: the one way a [`Vm`] comes to be, whatever it boots from.
//!
//! ```text
//! VmBuilder::new(memory, vcpus).console(..).cpu(..)[.ram(..)][.device(..)].build(boot)
//!   /dev/kvm opened once; memory and vCPU count checked once
//!   the CPU profile resolved once (CpuChoice: default, a name or file, a profile, a saved one)
//!   KVM VM, TSS, irqchip, PIT; RAM as memslots (manual dirty-log protection where KVM has it)
//!   devices (devices::manager), vCPU fds
//!   the guest CPUID table built once; KVM_SET_CPUID2 on every vCPU (guest_cpu::model::set_cpuid,
//!   its one call site); the effective table read back (KVM_GET_CPUID2)
//!   boot: Linux kernel | raw image  -> loaded, entry registers set
//!         Restored (saved CPU)      -> admitted (crate::guest_cpu::admission: refused, or its TSC rate set)
//!   vCPU threads spawned, paused: Vm::start runs them (a restored one after restore_state)
//! ```

use std::io::Write;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use cpuid::profile::CpuProfile;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use migration::GuestCpu;

use super::{Error, Vm};
use crate::boot::{self, layout, EntryPoint};
use crate::config::{self, VmConfig};
use crate::config::{DiskConfig, NetConfig};
use crate::devices::manager::{BusKind, Devices};
use crate::devices::virtio::backends::Backends;
use crate::devices::virtio::net::{default_mac, Net};
use crate::devices::virtio::{block::Block, tap::Tap};
use crate::devices::SharedDevice;
use crate::guest_cpu::{self, admission};
use crate::memory::GuestRam;
use crate::vcpu::{self, setup};

/// The guest CPU profile a machine gets.
#[derive(Debug, Clone, Default)]
pub enum CpuChoice {
    /// x86-64-v2 in this host vendor's identity (guest_cpu::model::default_profile).
    #[default]
    Default,
    /// A built-in name (`harpertown-shanghai`, `x86-64-v2,vendor=amd`) or a profile file.
    Named(String),
    /// A profile already made.
    Profile(CpuProfile),
    /// A saved guest's: its profile's JSON text and the guest CPU as the saving host ran it
    /// (None: a format version 1 state, which does not say).
    Saved {
        profile_json: String,
        guest_cpu: Option<GuestCpu>,
    },
}

/// What the machine starts from.
#[derive(Debug, Clone, Copy)]
pub enum Boot<'a> {
    /// A Linux kernel (ELF vmlinux with a PVH note, or a bzImage), initrd and command line.
    Linux(&'a VmConfig),
    /// A raw machine-code image copied to `addr`, every vCPU entering at `entry`.
    Raw {
        image: &'a [u8],
        addr: u64,
        entry: EntryPoint,
    },
    /// Nothing yet: a saved state comes next ([`Vm::restore_state`]).
    Restored,
}

/// Builds a [`Vm`]; see the module doc.
pub struct VmBuilder {
    memory: u64,
    vcpus: u32,
    cpu: CpuChoice,
    console: Box<dyn Write + Send>,
    ram: Option<GuestRam>,
    devices: Vec<(BusKind, u64, u64, SharedDevice, &'static str)>,
    disks: Vec<DiskConfig>,
    nets: Vec<NetConfig>,
    /// Disks and taps opened already (a restored or received guest's).
    opened: Backends,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("memory", &self.memory)
            .field("vcpus", &self.vcpus)
            .field("cpu", &self.cpu)
            .finish()
    }
}

impl VmBuilder {
    /// A machine of `memory` bytes of RAM and `vcpus` vCPUs, its console discarded.
    pub fn new(memory: u64, vcpus: u32) -> Self {
        VmBuilder {
            memory,
            vcpus,
            cpu: CpuChoice::Default,
            console: Box::new(std::io::sink()),
            ram: None,
            devices: Vec::new(),
            disks: Vec::new(),
            nets: Vec::new(),
            opened: Backends::default(),
        }
    }

    /// A virtio-blk disk (devices go on the bus disks first, in the order given).
    pub fn disk(mut self, d: DiskConfig) -> Self {
        self.disks.push(d);
        self
    }

    /// A virtio-net device on a tap.
    pub fn net(mut self, n: NetConfig) -> Self {
        self.nets.push(n);
        self
    }

    /// Disks and taps opened already, matched to a saved guest's devices (these go on the
    /// bus before any of [`VmBuilder::disk`] and [`VmBuilder::net`]).
    pub fn backends(mut self, b: Backends) -> Self {
        self.opened = b;
        self
    }

    /// Where the guest's console (COM1) output goes.
    pub fn console(mut self, console: Box<dyn Write + Send>) -> Self {
        self.console = console;
        self
    }

    /// The guest CPU profile.
    pub fn cpu(mut self, cpu: CpuChoice) -> Self {
        self.cpu = cpu;
        self
    }

    /// RAM allocated already (a migration destination fills it while the rest is built:
    /// registering a large memslot takes milliseconds). Its size is the machine's.
    pub fn ram(mut self, ram: GuestRam) -> Self {
        self.memory = ram.size();
        self.ram = Some(ram);
        self
    }

    /// One more device on a bus, before the vCPUs can reach it.
    pub fn device(
        mut self,
        bus: BusKind,
        base: u64,
        len: u64,
        dev: SharedDevice,
        name: &'static str,
    ) -> Self {
        self.devices.push((bus, base, len, dev, name));
        self
    }

    /// Builds the machine and readies its vCPUs (paused).
    pub fn build(self, boot: Boot) -> Result<Vm, Error> {
        let kvm = super::open_kvm()?;
        crate::timeline::mark("kvm");
        config::validate_memory(self.memory)?;
        config::validate_vcpus(self.vcpus, super::max_vcpus(&kvm))?;
        if let Boot::Linux(cfg) = boot {
            cfg.check_files()?;
        }
        check_caps(&kvm)?;
        let (fd, ram, host_cpu) = machine_and_host(&kvm, self.ram, self.memory)?;
        let (profile, saved) = resolve(self.cpu, &host_cpu)?;
        admission::runs_here(&profile, &host_cpu).map_err(admission::Refusal::from)?;
        super::check_address_width(&profile, self.memory)?;
        let table = cpuid::table::guest_table(&profile, self.vcpus);
        crate::timeline::mark("cpu model");
        let (events_tx, events_rx) = channel();
        let mut devices = Devices::new(&fd, events_tx.clone(), self.console)?;
        for (bus, base, len, dev, name) in self.devices {
            devices.add(bus, base, len, dev, name)?;
        }
        let mem = ram.memory();
        add_virtio(&mut devices, &fd, mem, self.opened, &self.disks, &self.nets)?;
        crate::timeline::mark("devices");
        let unstarted = (0..self.vcpus)
            .map(|id| {
                fd.create_vcpu(u64::from(id))
                    .map_err(super::kvm_op("KVM_CREATE_VCPU"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let effective = guest_cpu::model::set_cpuid(&unstarted, &table)?;
        crate::timeline::mark("vcpus");
        let mut vm = Vm {
            kvm,
            fd,
            ram,
            devices,
            host_cpu,
            profile,
            table,
            effective,
            tsc_khz: 0,
            num_vcpus: self.vcpus,
            unstarted,
            vcpus: Vec::new(),
            events_tx,
            events_rx: Mutex::new(events_rx),
            lifecycle: Mutex::new(()),
            moved: Default::default(),
        };
        vm.boot(boot, saved.as_ref())?;
        // A restored machine's vCPU threads start once its state is in (restore_state).
        if !matches!(boot, Boot::Restored) {
            crate::timeline::mark("kernel");
            vm.spawn_vcpus()?;
        }
        Ok(vm)
    }
}

/// Reads this host's CPUID while the VM and its memslots are created: each CPUID
/// instruction may exit to an outer hypervisor and KVM takes its own time, so the two
/// overlap; only the profile's checks need the first, and nothing of the guest is loaded
/// before them.
fn machine_and_host(
    kvm: &Kvm,
    ram: Option<GuestRam>,
    memory: u64,
) -> Result<(Arc<VmFd>, GuestRam, cpuid::CpuidDump), Error> {
    let (host_cpu, made) = std::thread::scope(|s| {
        let host = std::thread::Builder::new()
            .name("host-cpuid".into())
            .spawn_scoped(s, || guest_cpu::model::host_dump(kvm));
        let made = create_machine(kvm, ram, memory);
        let host = match host {
            Ok(h) => h.join().unwrap_or(Err(guest_cpu::model::Error::HostReader)),
            Err(_) => guest_cpu::model::host_dump(kvm),
        };
        (host, made)
    });
    let (fd, ram) = made?;
    Ok((fd, ram, host_cpu?))
}

/// The virtio devices, in bus order: the disks and cards opened already (a restored or
/// received guest's), then those the configuration names; then their event loop starts.
fn add_virtio(
    devices: &mut Devices,
    fd: &Arc<VmFd>,
    mem: &crate::memory::GuestMemoryMmap,
    opened: Backends,
    disks: &[DiskConfig],
    nets: &[NetConfig],
) -> Result<(), Error> {
    let mut blocks: Vec<Block> = opened.disks;
    for d in disks {
        blocks.push(Block::open(d)?);
    }
    for block in blocks {
        devices.add_virtio(fd, Box::new(block), mem.clone())?;
    }
    let mut cards = opened.nets;
    for n in nets {
        let mac = n.mac.unwrap_or_else(|| default_mac(cards.len()));
        cards.push((Tap::open(&n.tap)?, mac));
    }
    for (tap, mac) in cards {
        devices.add_virtio(fd, Box::new(Net::new(tap, mac)), mem.clone())?;
    }
    devices.start_virtio()?;
    Ok(())
}

/// A new VM with its in-kernel irqchip and PIT, and `ram` (or new RAM of `memory` bytes)
/// registered as its memslots.
fn create_machine(
    kvm: &Kvm,
    ram: Option<GuestRam>,
    memory: u64,
) -> Result<(Arc<VmFd>, GuestRam), Error> {
    vcpu::install_kick_handler().map_err(Error::KickHandler)?;
    let fd = Arc::new(kvm.create_vm().map_err(super::kvm_op("KVM_CREATE_VM"))?);
    fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(super::kvm_op("KVM_SET_TSS_ADDR"))?;
    if kvm.check_extension(Cap::SetIdentityMapAddr) {
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(super::kvm_op("KVM_SET_IDENTITY_MAP_ADDR"))?;
    }
    fd.create_irq_chip()
        .map_err(super::kvm_op("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit)
        .map_err(super::kvm_op("KVM_CREATE_PIT2"))?;
    crate::timeline::mark("vm");
    let mut ram = match ram {
        Some(ram) => ram,
        None => GuestRam::new(memory)?,
    };
    ram.attach(fd.clone())?;
    crate::timeline::mark("ram");
    Ok((fd, ram))
}

/// The KVM capabilities ferry cannot do without.
fn check_caps(kvm: &Kvm) -> Result<(), Error> {
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
    Ok(())
}

/// The profile a choice names, and for a saved guest how it ran.
fn resolve(
    choice: CpuChoice,
    host: &cpuid::CpuidDump,
) -> Result<(CpuProfile, Option<GuestCpu>), Error> {
    Ok(match choice {
        CpuChoice::Default => (guest_cpu::model::default_profile(host)?, None),
        CpuChoice::Named(spec) => (guest_cpu::model::load_profile(&spec, host)?, None),
        CpuChoice::Profile(p) => (p, None),
        CpuChoice::Saved {
            profile_json,
            guest_cpu,
        } => (
            CpuProfile::from_json("the saved VM", &profile_json).map_err(Error::SavedProfile)?,
            guest_cpu,
        ),
    })
}

impl Vm {
    /// Loads what the machine starts from into its RAM and vCPUs (not yet running).
    fn boot(&mut self, boot: Boot, saved: Option<&GuestCpu>) -> Result<(), Error> {
        let fd0 = self.unstarted.first().ok_or(Error::NoSuchVcpu(0))?;
        let host_tsc = admission::tsc_host(&self.kvm, fd0);
        let entry = match boot {
            Boot::Linux(cfg) => {
                // The virtio devices are on the kernel command line (virtio_mmio.device=).
                let mut cfg = cfg.clone();
                cfg.cmdline.push_str(&self.devices().virtio_cmdline());
                boot::load_linux(self.ram.memory(), &cfg)?
            }
            Boot::Raw { image, addr, entry } => {
                boot::load_raw(self.ram.memory(), image, addr)?;
                entry
            }
            Boot::Restored => {
                let here = admission::HostView {
                    effective: self.effective.clone(),
                    tsc: host_tsc,
                };
                let a = admission::admit(saved, &self.profile, self.num_vcpus, &here)?;
                self.tsc_khz = a.apply(&self.unstarted, host_tsc.khz)?;
                return Ok(());
            }
        };
        self.tsc_khz = host_tsc.khz;
        for (id, fd) in self.unstarted.iter().enumerate() {
            setup::setup_vcpu(fd, id as u32, &entry, self.ram.memory())?;
        }
        let forced = self.cpuid_forced();
        if matches!(boot, Boot::Linux(_)) && !forced.is_empty() {
            log::warn!(
                "this host's KVM changed the guest CPUID after KVM_SET_CPUID2: features {}; other registers {:?}",
                forced.features.join(" "),
                forced.registers
            );
        }
        Ok(())
    }
}

/// Builds a VM for `cfg` and boots its kernel: the `ferry run --kernel` path.
pub fn build(cfg: &VmConfig, console: Box<dyn Write + Send>) -> Result<Vm, Error> {
    let cpu = match &cfg.cpu {
        Some(spec) => CpuChoice::Named(spec.clone()),
        None => CpuChoice::Default,
    };
    let mut b = VmBuilder::new(cfg.memory, cfg.vcpus)
        .console(console)
        .cpu(cpu);
    for d in &cfg.disks {
        b = b.disk(d.clone());
    }
    for n in &cfg.nets {
        b = b.net(n.clone());
    }
    b.build(Boot::Linux(cfg))
}
