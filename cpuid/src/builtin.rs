//! Built-in profiles, by name:
//!
//! | name | what |
//! |---|---|
//! | `harpertown-shanghai` | baseline of the Xeon E5420 and Opteron 2378 (the 2008 cross-vendor demo's CPUs), Intel identity |
//! | `x86-64-v2` | the psABI level: SSE4.2, POPCNT, CMPXCHG16B, LAHF; identity of the host's vendor |
//! | `x86-64-v3` | v2 plus AVX2, BMI1/2, FMA, F16C, LZCNT, MOVBE, XSAVE (AVX state only) |
//! | `host` | this host as KVM offers it; never migrated to another vendor |
//!
//! `NAME,vendor=intel|amd` gives a migratable built-in the other vendor's identity: the
//! x86-64 levels that vendor's CPU of that level, `harpertown-shanghai` the Opteron 2378's
//! (the same features either way).

use crate::leaf::{CpuidDump, Vendor};
use crate::profile::{
    self, baseline, default_kvm_pv, CpuProfile, Error, Identity, XsaveComponent, FORMAT, HIDDEN,
    VERSION,
};

/// The built-in profile names.
pub const NAMES: &[&str] = &["harpertown-shanghai", "x86-64-v2", "x86-64-v3", "host"];

const E5420: &str = include_str!("../testdata/intel-xeon-e5420-harpertown-libcpuid.txt");
const OPTERON_2378: &str = include_str!("../testdata/amd-opteron-2378-shanghai-instlatx64.txt");

const X86_64_BASE: &[&str] = &[
    "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge",
    "mca", "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "syscall", "nx", "lm",
];
const V2: &[&str] = &[
    "pni", "ssse3", "cx16", "sse4_1", "sse4_2", "popcnt", "lahf_lm",
];
const V3: &[&str] = &[
    "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
];

/// The AVX state component: the same size and offset on every x86 CPU that has it.
pub const XSAVE_AVX: XsaveComponent = XsaveComponent {
    index: 2,
    size: 256,
    offset: 576,
};

/// The profile called `name`; `host` is this host's CPUID as KVM offers it (for `host` and
/// for the vendor identity of the x86-64 levels). None if there is no such built-in.
pub fn builtin(spec: &str, host: &CpuidDump) -> Option<Result<CpuProfile, Error>> {
    let (name, option) = match spec.split_once(',') {
        Some((n, o)) => (n, Some(o)),
        None => (spec, None),
    };
    if !NAMES.contains(&name) {
        return None;
    }
    let vendor = match option.map(|o| vendor_option(spec, o)).transpose() {
        Ok(v) => v,
        Err(e) => return Some(Err(e)),
    };
    let host_vendor = host.vendor().unwrap_or(Vendor::Intel);
    let mut p = match name {
        "harpertown-shanghai" => harpertown_shanghai(vendor.unwrap_or(Vendor::Intel)),
        "x86-64-v2" => level(name, vendor.unwrap_or(host_vendor), &[X86_64_BASE, V2]),
        "x86-64-v3" => level(name, vendor.unwrap_or(host_vendor), &[X86_64_BASE, V2, V3]),
        _ if vendor.is_some() => {
            let why = "`host` is this host's own identity; it takes no vendor";
            return Some(Err(Error::Option(spec.into(), why.into())));
        }
        _ => host_profile(host),
    };
    if let (Ok(p), Some(_)) = (&mut p, vendor) {
        p.name = spec.to_string();
    }
    Some(p)
}

/// The one option a built-in takes: `vendor=intel` or `vendor=amd`.
fn vendor_option(spec: &str, option: &str) -> Result<Vendor, Error> {
    match option {
        "vendor=intel" => Ok(Vendor::Intel),
        "vendor=amd" => Ok(Vendor::Amd),
        _ => Err(Error::Option(
            spec.into(),
            format!("unknown option {option:?} (built-ins take vendor=intel or vendor=amd)"),
        )),
    }
}

fn harpertown_shanghai(vendor: Vendor) -> Result<CpuProfile, Error> {
    let parse = |name: &str, text: &str| {
        crate::dump::parse_any(name, text).map_err(|e| Error::Parse(name.into(), e.to_string()))
    };
    let e5420 = parse("intel-xeon-e5420-harpertown-libcpuid.txt", E5420)?;
    let opteron = parse("amd-opteron-2378-shanghai-instlatx64.txt", OPTERON_2378)?;
    baseline("harpertown-shanghai", &[e5420, opteron], Some(vendor))
}

fn level(name: &str, vendor: Vendor, sets: &[&[&str]]) -> Result<CpuProfile, Error> {
    let v3 = sets.len() > 2;
    // A real CPU of each vendor at that level, so that the guest's model-specific code
    // paths see a plausible CPU: Nehalem-EP / Haswell-EP, Bulldozer / Zen.
    let (family, model, brand) = match (vendor, v3) {
        (Vendor::Intel, false) => (6, 0x1a, "ferry x86-64-v2 (Intel)"),
        (Vendor::Intel, true) => (6, 0x3f, "ferry x86-64-v3 (Intel)"),
        (Vendor::Amd, false) => (0x15, 0x01, "ferry x86-64-v2 (AMD)"),
        (Vendor::Amd, true) => (0x17, 0x01, "ferry x86-64-v3 (AMD)"),
    };
    let xsave = if v3 { vec![XSAVE_AVX] } else { vec![] };
    Ok(CpuProfile {
        format: FORMAT.into(),
        version: VERSION,
        name: name.into(),
        identity: Identity {
            vendor,
            family,
            model,
            stepping: 1,
            brand: brand.into(),
        },
        features: sets
            .iter()
            .flat_map(|s| s.iter())
            .map(|s| s.to_string())
            .collect(),
        max_leaf: profile::needed_max_leaf(7, vendor, v3),
        max_ext_leaf: 0x8000_0008,
        phys_bits: 40,
        virt_bits: 48,
        xsave,
        kvm_pv: default_kvm_pv(),
        invtsc: false,
        migratable: true,
    })
}

fn host_profile(host: &CpuidDump) -> Result<CpuProfile, Error> {
    let mut p = baseline("host", std::slice::from_ref(host), None)?;
    // The host profile is this host: keep what a one-host baseline keeps, but it is not
    // meant to move, so mark it.
    p.features.retain(|f| !HIDDEN.iter().any(|(h, _)| h == f));
    p.migratable = false;
    Ok(p)
}
