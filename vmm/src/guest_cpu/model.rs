//! Applying the guest CPU model (cpuid crate) on this host: this host's CPUID as KVM offers
//! it, profile names and files, the profile's table as KVM's `CpuId`, and what the host's KVM
//! did to the table (some KVMs OR host bits into leaves 1, 7 and 0xD after KVM_SET_CPUID2).

use std::path::Path;

use cpuid::profile::{self, CpuProfile, EMULATOR_UNSAFE};
use cpuid::{CpuidDump, Leaf};
use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::Kvm;

/// The profile `ferry run` uses when none is given: x86-64-v2 in this host's vendor's
/// identity, without what an emulating KVM cannot run in guest ring 0 on such hosts.
pub const DEFAULT_PROFILE: &str = "x86-64-v2";

/// Why this host does not run a CPU profile at all (the profile's name as it gives it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("CPU profile {name}: this host cannot run it: {missing}")]
    CannotRun {
        name: String,
        missing: profile::Missing,
    },
    #[error(
        "CPU profile {0} describes one host and is not migratable to a host of another vendor"
    )]
    OtherVendor(String),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
    #[error("the thread reading this host's CPUID ended without an answer")]
    HostReader,
    #[error("CPU profile {0:?}: no built-in profile of that name ({names}) and no profile file to read: {1}", names = cpuid::builtin::NAMES.join(", "))]
    NoProfile(String, std::io::Error),
    #[error(transparent)]
    Profile(#[from] profile::Error),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the CPU table has {0} entries, more than KVM accepts ({KVM_MAX_CPUID_ENTRIES})")]
    TooManyLeaves(usize),
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// Gives every vCPU its CPUID table (the one KVM_SET_CPUID2 of ferry: KVM checks the state
/// set later against it) and returns vCPU 0's as KVM holds it.
pub fn set_cpuid(vcpus: &[kvm_ioctls::VcpuFd], table: &[Leaf]) -> Result<Vec<Leaf>, Error> {
    for (id, fd) in vcpus.iter().enumerate() {
        let t = to_kvm(&cpuid::table::for_vcpu(table, id as u32))?;
        fd.set_cpuid2(&t)
            .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
    }
    match vcpus.first() {
        Some(fd) => effective_table(fd),
        None => Ok(Vec::new()),
    }
}

/// vCPU `fd`'s table as KVM holds it (KVM_GET_CPUID2).
pub fn effective_table(fd: &kvm_ioctls::VcpuFd) -> Result<Vec<Leaf>, Error> {
    let back = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("KVM_GET_CPUID2", e))?;
    Ok(from_kvm("KVM_GET_CPUID2", &back).leaves)
}

/// Functions whose subleaf (ECX in) selects the answer.
fn index_significant(function: u32) -> bool {
    matches!(
        function,
        4 | 7
            | 0xb
            | 0xd
            | 0xf
            | 0x10
            | 0x12
            | 0x14
            | 0x17
            | 0x18
            | 0x1d
            | 0x1e
            | 0x1f
            | 0x20
            | 0x23
            | 0x24
            | 0x8000_001d
            | 0x8000_0020
            | 0x8000_0026
    )
}

/// Whether this host's KVM emulates guest ring 0 (the PVM module in native mode): there
/// the guest cannot use [`EMULATOR_UNSAFE`] features in its kernel.
pub fn emulating_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// KVM's `CpuId` as neutral leaves.
pub fn from_kvm(source: &str, c: &CpuId) -> CpuidDump {
    let leaves = c
        .as_slice()
        .iter()
        .map(|e| Leaf {
            function: e.function,
            index: e.index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect();
    CpuidDump::new(source, leaves)
}

/// Neutral leaves as KVM's `CpuId`.
pub fn to_kvm(leaves: &[Leaf]) -> Result<CpuId, Error> {
    let entries: Vec<kvm_cpuid_entry2> = leaves
        .iter()
        .map(|l| kvm_cpuid_entry2 {
            function: l.function,
            index: l.index,
            flags: if index_significant(l.function) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: l.eax,
            ebx: l.ebx,
            ecx: l.ecx,
            edx: l.edx,
            ..Default::default()
        })
        .collect();
    CpuId::from_entries(&entries).map_err(|_| Error::TooManyLeaves(entries.len()))
}

/// This host's CPUID as KVM offers it to guests.
///
/// On hardware KVM that is KVM_GET_SUPPORTED_CPUID. A KVM that emulates guest ring 0
/// (kvm_pvm) reports almost nothing there (leaf 1 ECX: only cx16, x2apic, tsc_deadline_timer)
/// yet ORs the real host bits into every guest's leaves 1, 7 and 0xD and runs guest ring 3
/// natively, so what a guest can use is the host's own CPUID: on such a host the feature
/// leaves come from CPUID executed here, and KVM's own leaves (0x40000000..) from KVM.
pub fn host_dump(kvm: &Kvm) -> Result<CpuidDump, Error> {
    // The host's CPU does not change while ferry runs, and reading it is not free (each
    // CPUID may exit to an outer hypervisor): once per process.
    static HOST: std::sync::OnceLock<CpuidDump> = std::sync::OnceLock::new();
    if let Some(d) = HOST.get() {
        return Ok(d.clone());
    }
    let d = read_host_dump(kvm)?;
    Ok(HOST.get_or_init(|| d).clone())
}

fn read_host_dump(kvm: &Kvm) -> Result<CpuidDump, Error> {
    let c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::Supported)?;
    let supported = from_kvm("host (KVM_GET_SUPPORTED_CPUID)", &c);
    if !emulating_host() {
        return Ok(supported);
    }
    let mut leaves = raw_host_leaves();
    leaves.extend(
        supported
            .leaves
            .iter()
            .filter(|l| (0x4000_0000..0x5000_0000).contains(&l.function)),
    );
    Ok(CpuidDump::new(
        "host (CPUID of this emulating-KVM host)",
        leaves,
    ))
}

fn cpuid(function: u32, index: u32) -> Leaf {
    let r = std::arch::x86_64::__cpuid_count(function, index);
    Leaf {
        function,
        index,
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// Every leaf and subleaf of this CPU's own CPUID (basic and extended ranges).
pub fn raw_host_leaves() -> Vec<Leaf> {
    let mut out = Vec::new();
    for base in [0u32, 0x8000_0000] {
        let max = cpuid(base, 0).eax.clamp(base, base + 0xff);
        for f in base..=max {
            match f {
                4 | 0x8000_001d => {
                    for i in 0..16 {
                        let l = cpuid(f, i);
                        out.push(l);
                        if l.eax & 0x1f == 0 {
                            break;
                        }
                    }
                }
                7 | 0x14 | 0x1d | 0x24 => {
                    let n = cpuid(f, 0).eax.min(8);
                    out.extend((0..=n).map(|i| cpuid(f, i)));
                }
                0xb | 0x1f => {
                    for i in 0..8 {
                        let l = cpuid(f, i);
                        out.push(l);
                        if (l.ecx >> 8) & 0xff == 0 {
                            break;
                        }
                    }
                }
                0xd => {
                    let l0 = cpuid(f, 0);
                    let l1 = cpuid(f, 1);
                    let mask = u64::from(l0.eax)
                        | (u64::from(l0.edx) << 32)
                        | u64::from(l1.ecx)
                        | (u64::from(l1.edx) << 32);
                    out.push(l0);
                    out.push(l1);
                    out.extend(
                        (2..64)
                            .filter(|i| mask & (1 << i) != 0)
                            .map(|i| cpuid(f, i)),
                    );
                }
                _ => out.push(cpuid(f, 0)),
            }
        }
    }
    out
}

/// The largest CPU profile file read (a real one is a few KiB).
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// A profile by built-in name or file path.
pub fn load_profile(spec: &str, host: &CpuidDump) -> Result<CpuProfile, Error> {
    if let Some(p) = cpuid::builtin::builtin(spec, host) {
        return Ok(p?);
    }
    let bytes = crate::files::read_capped(std::path::Path::new(spec), MAX_PROFILE_BYTES)
        .map_err(|e| Error::NoProfile(spec.into(), e))?;
    Ok(CpuProfile::from_json(
        spec,
        &String::from_utf8_lossy(&bytes),
    )?)
}

/// The default profile for this host.
pub fn default_profile(host: &CpuidDump) -> Result<CpuProfile, Error> {
    let mut p = load_profile(DEFAULT_PROFILE, host)?;
    if emulating_host() {
        for f in EMULATOR_UNSAFE {
            p.features.remove(*f);
        }
        profile::drop_features_without_state(&mut p.features, &p.xsave);
        if !p.features.contains("xsave") {
            p.xsave.clear();
        }
        p.name = format!(
            "{DEFAULT_PROFILE} (without {} on this emulating KVM)",
            EMULATOR_UNSAFE.join(", ")
        );
    }
    Ok(p)
}

/// Why some features cannot run here even though KVM offers them (for `ferry cpu check`).
pub fn emulator_notes(p: &CpuProfile) -> Vec<String> {
    if !emulating_host() {
        return vec![];
    }
    EMULATOR_UNSAFE
        .iter()
        .filter(|f| p.has(f))
        .map(|f| format!("{f}: this host's KVM emulates guest ring 0 (kvm_pvm) and cannot run it there; a guest kernel using it stops with an emulation failure"))
        .collect()
}
