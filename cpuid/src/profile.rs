//! CPU profiles: the CPU a guest sees, as a JSON file. A profile is an identity (vendor
//! string, family/model/stepping, brand), an exact feature set, the highest leaves, address
//! sizes, the XSAVE components the guest may enable (with their sizes and offsets, which
//! every host must match), and policies (KVM paravirtual features, invariant TSC; never a
//! vPMU).
//!
//! [`baseline`] computes the profile every given host can run; [`check`] tells whether a
//! host can run a profile and names every missing feature.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::features::{self, Vendors};
use crate::leaf::{decode_signature, CpuidDump, Vendor};

mod baseline;

pub use baseline::{baseline, drop_features_without_state, needed_max_leaf};

/// The format tag of profile files.
pub const FORMAT: &str = "ferry-cpu-profile";
/// The profile format version this code reads and writes.
pub const VERSION: u32 = 1;

/// The XSAVE area ferry saves and restores (KVM_GET/SET_XSAVE): components beyond it (AMX
/// tile data) are never offered, since they could not travel.
pub const XSAVE_AREA_MAX: u32 = 4096;

/// Features never passed to a guest, whatever the hosts have, and why.
pub const HIDDEN: &[(&str, &str)] = &[
    ("hypervisor", "synthesized: always set for a guest"),
    ("ht", "synthesized from the vCPU count"),
    (
        "osxsave",
        "reflects the guest OS's CR4.OSXSAVE; KVM sets it",
    ),
    ("ospke", "reflects the guest OS's CR4.PKE; KVM sets it"),
    (
        "monitor",
        "MONITOR/MWAIT would let a guest idle a host CPU; not migratable",
    ),
    ("mwaitx", "MONITORX/MWAITX, as monitor"),
    ("vmx", "no nested virtualization"),
    ("svm", "no nested virtualization"),
    ("smx", "no trusted execution in a guest"),
    ("skinit", "no trusted execution in a guest"),
    ("est", "host power management"),
    ("tm2", "host thermal management"),
    ("ds_cpl", "debug store: host PMU facility"),
    ("dtes64", "debug store: host PMU facility"),
    ("pdcm", "perfmon capabilities MSR: no vPMU"),
    ("perfctr_core", "no vPMU"),
    ("perfctr_nb", "no vPMU"),
    ("perfctr_llc", "no vPMU"),
    ("ibs", "no vPMU"),
    ("lwp", "lightweight profiling: no vPMU"),
    ("bpext", "breakpoint extensions tied to host debug MSRs"),
    ("ptsc", "no vPMU"),
    ("dca", "direct cache access: host chipset"),
    ("xtpr", "host interrupt routing"),
    ("wdt", "host watchdog"),
    ("osvw", "AMD errata MSRs of one host model"),
    ("nodeid_msr", "host topology MSR"),
    (
        "topoext",
        "topology is synthesized (leaves 0xB, 0x80000008)",
    ),
    ("cmp_legacy", "topology is synthesized"),
    ("extapic", "extended APIC space is not emulated"),
    (
        "hle",
        "TSX: disabled by microcode on many hosts, differs per host",
    ),
    (
        "rtm",
        "TSX: disabled by microcode on many hosts, differs per host",
    ),
    (
        "arch_capabilities",
        "IA32_ARCH_CAPABILITIES differs per host model (and cannot be set on some KVM hosts)",
    ),
    ("core_capabilities", "host model specific MSR"),
    ("sgx", "enclaves cannot migrate"),
    ("waitpkg", "UMWAIT/TPAUSE idle a host CPU"),
    (
        "invtsc",
        "policy: only when every host has it (see `invtsc`)",
    ),
    ("acpi", "thermal monitor and clock control MSRs of the host"),
    ("dts", "debug store: host PMU facility"),
    ("tm", "host thermal monitor"),
    ("pbe", "pending break enable: host power management"),
    ("cqm", "cache QoS monitoring: a host resource"),
    ("rdt_a", "cache allocation: a host resource"),
    ("intel_pt", "processor trace: not virtualized"),
    ("sdbg", "silicon debug interface"),
    (
        "mpx",
        "MPX is deprecated and its state differs across hosts",
    ),
    ("tme", "memory encryption: a host facility"),
    ("pconfig", "memory encryption keys: a host facility"),
    ("uintr", "user interrupts are not virtualized"),
];

/// Features that a KVM emulating guest ring 0 (as on PVM hosts) cannot execute there: a
/// guest kernel using them stops with an emulation failure (GUEST.md).
pub const EMULATOR_UNSAFE: &[&str] = &["cx16", "popcnt", "xsave", "smap", "fsgsbase"];

/// The guest's CPU identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub vendor: Vendor,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    pub brand: String,
}

/// One XSAVE state component the guest may enable: its index (bit in XCR0) and its
/// standard-format size and offset, which every host running the profile must share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct XsaveComponent {
    pub index: u32,
    pub size: u32,
    pub offset: u32,
}

/// A guest CPU model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuProfile {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub identity: Identity,
    /// Feature names from the catalogue, exactly the set the guest sees.
    pub features: BTreeSet<String>,
    /// Highest basic and extended leaf.
    pub max_leaf: u32,
    pub max_ext_leaf: u32,
    /// Physical and linear address bits.
    pub phys_bits: u32,
    pub virt_bits: u32,
    /// XSAVE components beyond x87 and SSE (indices >= 2), empty without `xsave`.
    pub xsave: Vec<XsaveComponent>,
    /// KVM paravirtual features (names in [`KVM_PV_FEATURES`]).
    pub kvm_pv: BTreeSet<String>,
    /// Whether the invariant TSC is advertised (only if every host has it).
    pub invtsc: bool,
    /// False for a profile that only describes one host (`host`): never migrated to
    /// another vendor.
    pub migratable: bool,
}

/// KVM paravirtual feature bits of leaf 0x40000001 EAX that a profile may name. The
/// hypercall-based ones (pv_unhalt, pv_send_ipi, pv_sched_yield) are not offered.
pub const KVM_PV_FEATURES: &[(&str, u32)] = &[
    ("clocksource", 0),
    ("nopiodelay", 1),
    ("clocksource2", 3),
    ("async_pf", 4),
    ("steal_time", 5),
    ("pv_eoi", 6),
    ("pv_tlb_flush", 9),
    ("async_pf_vmexit", 10),
    ("msi_ext_dest_id", 15),
    ("clocksource_stable_bit", 24),
];

/// The KVM paravirtual features ferry's baselines offer.
pub fn default_kvm_pv() -> BTreeSet<String> {
    [
        "clocksource",
        "nopiodelay",
        "clocksource2",
        "steal_time",
        "pv_eoi",
        "pv_tlb_flush",
        "clocksource_stable_bit",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: not a ferry CPU profile: {1}")]
    Parse(String, String),
    #[error("{0}: profile format {1:?} version {2} is not {FORMAT:?} version {VERSION}")]
    Version(String, String, u32),
    #[error("{0}: unknown feature {1:?} (not in the catalogue; see docs/cpuid.md)")]
    UnknownFeature(String, String),
    #[error("{0}: feature {1:?} is never given to a guest ({2})")]
    HiddenFeature(String, String, String),
    #[error("{0}: unknown KVM paravirtual feature {1:?}")]
    UnknownPv(String, String),
    #[error("baseline of no hosts")]
    NoHosts,
    #[error("host {0} is neither Intel nor AMD (vendor {1:?})")]
    UnknownVendor(String, String),
    #[error("no host of vendor {0:?} among the inputs")]
    NoHostOfVendor(Vendor),
    #[error("CPU profile {0:?}: {1}")]
    Option(String, String),
}

impl CpuProfile {
    /// Parses and validates a profile file's text.
    pub fn from_json(source: &str, text: &str) -> Result<CpuProfile, Error> {
        let p: CpuProfile =
            serde_json::from_str(text).map_err(|e| Error::Parse(source.into(), e.to_string()))?;
        if p.format != FORMAT || p.version != VERSION {
            return Err(Error::Version(source.into(), p.format, p.version));
        }
        if let Some(f) = p.features.iter().find(|f| features::by_name(f).is_none()) {
            return Err(Error::UnknownFeature(source.into(), f.clone()));
        }
        if let Some((f, why)) = HIDDEN.iter().find(|(h, _)| p.features.contains(*h)) {
            return Err(Error::HiddenFeature(
                source.into(),
                f.to_string(),
                why.to_string(),
            ));
        }
        if let Some(f) = p
            .kvm_pv
            .iter()
            .find(|f| !KVM_PV_FEATURES.iter().any(|(n, _)| n == f))
        {
            return Err(Error::UnknownPv(source.into(), f.clone()));
        }
        Ok(p)
    }

    /// The profile as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a profile always serializes")
    }

    /// Whether the profile advertises `name`.
    pub fn has(&self, name: &str) -> bool {
        self.features.contains(name)
    }
}

/// Max basic and extended leaf of a dump.
fn max_leaves(d: &CpuidDump) -> (u32, u32) {
    (
        d.get(0, 0).map(|l| l.eax).unwrap_or(0),
        d.get(0x8000_0000, 0).map(|l| l.eax).unwrap_or(0x8000_0000),
    )
}

/// The brand string of leaves 0x80000002..4, trimmed.
pub fn brand_string(d: &CpuidDump) -> String {
    let mut b = Vec::new();
    for f in 0x8000_0002..=0x8000_0004u32 {
        if let Some(l) = d.get(f, 0) {
            for r in [l.eax, l.ebx, l.ecx, l.edx] {
                b.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
    let s = String::from_utf8_lossy(&b).replace('\0', "");
    s.trim().to_string()
}

/// A host's XSAVE components (index >= 2) with their standard-format size and offset.
pub fn xsave_components(d: &CpuidDump) -> Vec<XsaveComponent> {
    let Some(l0) = d.get(0xd, 0) else {
        return vec![];
    };
    let mask = u64::from(l0.eax) | (u64::from(l0.edx) << 32);
    (2..64)
        .filter(|i| mask & (1 << i) != 0)
        .filter_map(|i| {
            let l = d.get(0xd, i)?;
            Some(XsaveComponent {
                index: i,
                size: l.eax,
                offset: l.ebx,
            })
        })
        .collect()
}

/// Physical and linear address bits of a host (36/48 when leaf 0x80000008 is missing).
fn address_bits(d: &CpuidDump) -> (u32, u32) {
    match d.get(0x8000_0008, 0) {
        Some(l) if l.eax & 0xff != 0 => (l.eax & 0xff, (l.eax >> 8) & 0xff),
        _ => (36, 48),
    }
}

fn invtsc(d: &CpuidDump) -> bool {
    d.get(0x8000_0007, 0).is_some_and(|l| l.edx & (1 << 8) != 0)
}

fn vendor_of(d: &CpuidDump) -> Result<Vendor, Error> {
    d.vendor()
        .ok_or_else(|| Error::UnknownVendor(d.source.clone(), d.vendor_string()))
}

/// Why a host cannot run a profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missing {
    /// Features the profile has and the host lacks, by name.
    pub features: Vec<String>,
    /// Anything else (address sizes, XSAVE layout), one sentence each.
    pub other: Vec<String>,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.features.is_empty() {
            parts.push(format!("missing features: {}", self.features.join(" ")));
        }
        parts.extend(self.other.iter().cloned());
        f.write_str(&parts.join("; "))
    }
}

/// Can `host` run `profile`? Ok, or everything it lacks.
pub fn check(profile: &CpuProfile, host: &CpuidDump) -> Result<(), Missing> {
    let present = features::present(host);
    let mut m = Missing::default();
    for f in &profile.features {
        if !present.contains(f.as_str()) {
            m.features.push(f.clone());
        }
    }
    let (phys, virt) = address_bits(host);
    if profile.phys_bits > phys {
        m.other.push(format!(
            "{} physical address bits needed, the host has {phys}",
            profile.phys_bits
        ));
    }
    if profile.virt_bits > virt {
        m.other.push(format!(
            "{} linear address bits needed, the host has {virt}",
            profile.virt_bits
        ));
    }
    let host_x = xsave_components(host);
    for c in &profile.xsave {
        match host_x.iter().find(|h| h.index == c.index) {
            None => m.other.push(format!("XSAVE component {} is not supported by the host", c.index)),
            Some(h) if h != c => m.other.push(format!(
                "XSAVE component {} is laid out differently (size {} offset {} here, {} {} in the profile)",
                c.index, h.size, h.offset, c.size, c.offset
            )),
            Some(_) => {}
        }
    }
    if profile.invtsc && !invtsc(host) {
        m.other
            .push("the profile advertises an invariant TSC and the host has none".into());
    }
    if m.features.is_empty() && m.other.is_empty() {
        Ok(())
    } else {
        Err(m)
    }
}
