//! Which MSRs travel with a guest: every MSR whose state the guest can observe, derived from
//! the features of its CPU profile. Vendor-only MSRs of features a cross-vendor profile
//! hides never enter the list (docs/design.md section 3).
//!
//! ```text
//! ALWAYS (architectural, every x86-64 guest)  IA32_TSC first ... TSC_DEADLINE last
//! FEATURE_MSRS: feature kept by the profile -> the MSRs that hold its state
//! ```
//! Kept out on purpose: machine-check banks (MCi_CTL/STATUS/ADDR/MISC: their count is
//! the KVM's, and ferry injects no machine checks), PMU counters (profiles offer no vPMU),
//! write-only command MSRs (PRED_CMD, FLUSH_CMD: no state), read-only capability MSRs
//! (ARCH_CAPABILITIES, PERF_CAPABILITIES: hidden, host-specific).

use cpuid::profile::CpuProfile;

const TSC: u32 = 0x10;
const TSC_DEADLINE: u32 = 0x6e0;

/// MSRs every guest has, in restore order after IA32_TSC: SYSENTER_CS/ESP/EIP, PAT,
/// MISC_ENABLE, the MTRR default type, capability-independent variable and fixed MTRRs.
fn always() -> Vec<u32> {
    let mut l = vec![TSC, 0x174, 0x175, 0x176, 0x277, 0x1a0, 0x2ff];
    l.extend(0x200..0x210); // variable MTRRs
    l.extend([0x250, 0x258, 0x259]);
    l.extend(0x268..0x270); // fixed MTRRs
    l
}

const SYSCALL_MSRS: &[u32] = &[
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
];
const TSC_AUX: &[u32] = &[0xc000_0103];
const SPEC_CTRL: &[u32] = &[0x48];
/// IA32_U_CET, IA32_S_CET.
const CET: &[u32] = &[0x6a0, 0x6a2];
/// IA32_U_CET, IA32_S_CET, IA32_PL0..3_SSP, IA32_INTERRUPT_SSP_TABLE_ADDR.
const CET_SHSTK: &[u32] = &[0x6a0, 0x6a2, 0x6a4, 0x6a5, 0x6a6, 0x6a7, 0x6a8];
/// IA32_FRED_RSP0..3, STKLVLS, SSP1..3, CONFIG.
const FRED: &[u32] = &[
    0x1cc, 0x1cd, 0x1ce, 0x1cf, 0x1d0, 0x1d1, 0x1d2, 0x1d3, 0x1d4,
];

/// Profile features whose state lives in MSRs, and those MSRs.
pub const FEATURE_MSRS: &[(&str, &[u32])] = &[
    ("syscall", SYSCALL_MSRS),
    ("lm", SYSCALL_MSRS),
    ("rdtscp", TSC_AUX),
    ("rdpid", TSC_AUX),
    ("tsc_adjust", &[0x3b]),
    ("xsaves", &[0xda0]),
    ("xfd", &[0x1c4, 0x1c5]),
    // Speculation control: Linux caches the value it wrote and skips unchanged writes, so a
    // restore that dropped it would leave mitigations silently off.
    ("spec_ctrl", SPEC_CTRL),
    ("spec_ctrl_ssbd", SPEC_CTRL),
    ("intel_stibp", SPEC_CTRL),
    ("amd_ibrs", SPEC_CTRL),
    ("amd_stibp", SPEC_CTRL),
    ("amd_ssbd", SPEC_CTRL),
    ("virt_ssbd", &[0xc001_011f]),
    ("shstk", CET_SHSTK),
    ("ibt", CET),
    ("pks", &[0x6e1]),
    // Bus-lock detection is enabled in DEBUGCTL.
    ("bus_lock_detect", &[0x1d9]),
    ("fred", FRED),
    ("waitpkg", &[0xe1]),
    ("mce", &[0x17a]),
    ("mca", &[0x17b]),
];

/// KVM paravirtual features (profile `kvm_pv`) and their MSRs.
const KVM_PV_MSRS: &[(&str, &[u32])] = &[
    ("clocksource", &[0x11, 0x12]),
    ("clocksource2", &[0x4b56_4d00, 0x4b56_4d01]),
    ("async_pf", &[0x4b56_4d02, 0x4b56_4d06, 0x4b56_4d07]),
    ("steal_time", &[0x4b56_4d03]),
    ("pv_eoi", &[0x4b56_4d04]),
];

/// The MSRs a guest of `profile` can observe, in restore order (IA32_TSC first,
/// TSC_DEADLINE last: it is armed against the TSC), each once.
pub fn allowlist(profile: &CpuProfile) -> Vec<u32> {
    let mut l = always();
    let features = FEATURE_MSRS.iter().filter(|(f, _)| profile.has(f));
    let pv = KVM_PV_MSRS
        .iter()
        .filter(|(f, _)| profile.kvm_pv.contains(*f));
    for &msr in features.chain(pv).flat_map(|(_, m)| m.iter()) {
        if !l.contains(&msr) {
            l.push(msr);
        }
    }
    // KVM emulates the TSC deadline timer for every guest with an in-kernel LAPIC, whether
    // or not CPUID advertises it.
    l.push(TSC_DEADLINE);
    l
}

/// The architectural name of an MSR ferry carries, for error messages.
pub fn name(msr: u32) -> Option<&'static str> {
    Some(match msr {
        0x10 => "IA32_TSC",
        0x3b => "IA32_TSC_ADJUST",
        0x48 => "IA32_SPEC_CTRL",
        0xe1 => "IA32_UMWAIT_CONTROL",
        0x174..=0x176 => "IA32_SYSENTER",
        0x17a => "IA32_MCG_STATUS",
        0x17b => "IA32_MCG_CTL",
        0x1a0 => "IA32_MISC_ENABLE",
        0x1c4 => "IA32_XFD",
        0x1c5 => "IA32_XFD_ERR",
        0x1cc..=0x1d4 => "IA32_FRED",
        0x1d9 => "IA32_DEBUGCTL",
        0x277 => "IA32_PAT",
        0x200..=0x2ff => "IA32_MTRR",
        0x6a0 => "IA32_U_CET",
        0x6a2 => "IA32_S_CET",
        0x6a4..=0x6a7 => "IA32_PLn_SSP",
        0x6a8 => "IA32_INTERRUPT_SSP_TABLE_ADDR",
        0x6e0 => "IA32_TSC_DEADLINE",
        0x6e1 => "IA32_PKRS",
        0xda0 => "IA32_XSS",
        0xc000_0081..=0xc000_0084 => "STAR/LSTAR/CSTAR/SFMASK",
        0xc000_0102 => "KERNEL_GS_BASE",
        0xc000_0103 => "TSC_AUX",
        0xc001_011f => "VIRT_SPEC_CTRL",
        0x11 | 0x12 | 0x4b56_4d00..=0x4b56_4dff => "KVM paravirtual",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpuid::profile::HIDDEN;

    /// The architecture's facts, written apart from FEATURE_MSRS: each feature a profile
    /// may keep whose state lives in MSRs, and those MSRs (Intel SDM vol. 4, AMD APM vol. 2).
    const SPEC: &[(&str, &[u32])] = &[
        ("tsc", &[0x10]),
        ("sep", &[0x174, 0x175, 0x176]),
        ("pat", &[0x277]),
        (
            "mtrr",
            &[0x2ff, 0x200, 0x20f, 0x250, 0x258, 0x259, 0x268, 0x26f],
        ),
        ("tsc_deadline_timer", &[0x6e0]),
        (
            "syscall",
            &[0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084],
        ),
        ("lm", &[0xc000_0081, 0xc000_0082, 0xc000_0102]),
        ("rdtscp", &[0xc000_0103]),
        ("rdpid", &[0xc000_0103]),
        ("tsc_adjust", &[0x3b]),
        ("xsaves", &[0xda0]),
        ("xfd", &[0x1c4, 0x1c5]),
        ("spec_ctrl", &[0x48]),
        ("spec_ctrl_ssbd", &[0x48]),
        ("intel_stibp", &[0x48]),
        ("amd_ibrs", &[0x48]),
        ("amd_stibp", &[0x48]),
        ("amd_ssbd", &[0x48]),
        ("virt_ssbd", &[0xc001_011f]),
        ("shstk", &[0x6a0, 0x6a2, 0x6a4, 0x6a5, 0x6a6, 0x6a7, 0x6a8]),
        ("ibt", &[0x6a0, 0x6a2]),
        ("pks", &[0x6e1]),
        ("fred", &[0x1cc, 0x1d0, 0x1d4]),
        ("waitpkg", &[0xe1]),
        ("mce", &[0x17a]),
        ("mca", &[0x17b]),
        ("bus_lock_detect", &[0x1d9]),
    ];

    /// Features a profile may keep that hold no MSR state of their own: instructions, state
    /// carried elsewhere (XSAVE components, control registers and EFER in SREGS, the LAPIC
    /// page), or capability bits. Each new catalogue feature must land in SPEC or here.
    const NO_MSR_STATE: &[&str] = &[
        // Instructions and capability bits.
        "fpu",
        "cx8",
        "cmov",
        "pse36",
        "clflush",
        "mmx",
        "fxsr",
        "sse",
        "sse2",
        "ss",
        "pni",
        "pclmulqdq",
        "ssse3",
        "fma",
        "cx16",
        "sse4_1",
        "sse4_2",
        "movbe",
        "popcnt",
        "aes",
        "f16c",
        "rdrand",
        "bmi1",
        "bmi2",
        "erms",
        "invpcid",
        "adx",
        "rdseed",
        "clflushopt",
        "clwb",
        "sha_ni",
        "gfni",
        "vaes",
        "vpclmulqdq",
        "cldemote",
        "movdiri",
        "movdir64b",
        "enqcmd",
        "fsrm",
        "serialize",
        "md_clear",
        "fdp_excptn_only",
        "zero_fcs_fds",
        "avx_vnni",
        "cmpccxadd",
        "fzrm",
        "fsrs",
        "fsrc",
        "wrmsrns",
        "avx_ifma",
        "lahf_lm",
        "cmp_legacy",
        "cr8_legacy",
        "abm",
        "sse4a",
        "misalignsse",
        "3dnowprefetch",
        "xop",
        "fma4",
        "tbm",
        "mp",
        "mmxext",
        "pdpe1gb",
        "3dnowext",
        "3dnow",
        "clzero",
        "xsaveerptr",
        "invlpgb",
        "rdpru",
        "mcommit",
        "wbnoinvd",
        "int_wbinvd",
        "lkgs",
        "amd_ibpb",
        "amd_stibp_always_on",
        "amd_ibrs_preferred",
        "amd_ibrs_same_mode",
        "efer_lmsle_mbz",
        "invlpgb_nested",
        "amd_ssb_no",
        "amd_psfd",
        "btc_no",
        "amd_ibpb_ret",
        "flush_l1d",
        "monitor",
        "hybrid_cpu",
        "addr_mask_ext",
        "msr",
        "avx512_4vnniw",
        "avx512_4fmaps",
        "avx512_vp2intersect",
        "avx512pf",
        "avx512er",
        "srbds_ctrl",
        "rtm_always_abort",
        "tsx_force_abort",
        "cid",
        "pn",
        "ia64",
        "tsxldtrk",
        // State in XSAVE components (and XCR0).
        "xsave",
        "osxsave",
        "avx",
        "avx2",
        "avx512f",
        "avx512dq",
        "avx512ifma",
        "avx512cd",
        "avx512bw",
        "avx512vl",
        "avx512vbmi",
        "avx512_vbmi2",
        "avx512_vnni",
        "avx512_bitalg",
        "avx512_vpopcntdq",
        "avx512_fp16",
        "avx512_bf16",
        "amx_bf16",
        "amx_tile",
        "amx_int8",
        "amx_fp16",
        "pku",
        "xsaveopt",
        "xsavec",
        "xgetbv1",
        // State in control registers, EFER, segment bases (SREGS) or the LAPIC page.
        "vme",
        "de",
        "pse",
        "pae",
        "pge",
        "apic",
        "x2apic",
        "nx",
        "fxsr_opt",
        "tce",
        "pcid",
        "smep",
        "smap",
        "umip",
        "la57",
        "fsgsbase",
        "lam",
        // KVM gives guests none of these (hidden where the hardware has them).
        "arch_lbr",
        "arch_perfmon_ext",
        "sgx_keys",
        "amd_ppin",
        "cppc",
        "irperf",
        "mba",
        "brs",
        // SGX launch control (SGXLEPUBKEYHASH) means nothing without sgx, which is hidden.
        "sgx_lc",
    ];

    fn keepable() -> Vec<&'static str> {
        cpuid::features::CATALOGUE
            .iter()
            .map(|f| f.name)
            .filter(|n| !HIDDEN.iter().any(|(h, _)| h == n))
            .collect()
    }

    fn profile_with(features: &[&str]) -> CpuProfile {
        let host = cpuid::CpuidDump::new("none", vec![]);
        let mut p = cpuid::builtin::builtin("x86-64-v2", &host)
            .unwrap()
            .unwrap();
        p.features = features.iter().map(|s| s.to_string()).collect();
        p
    }

    #[test]
    fn every_feature_a_profile_can_keep_is_classified() {
        let unclassified: Vec<&str> = keepable()
            .into_iter()
            .filter(|n| !SPEC.iter().any(|(f, _)| f == n) && !NO_MSR_STATE.contains(n))
            .collect();
        assert!(
            unclassified.is_empty(),
            "say whether these features keep state in MSRs (SPEC) or not (NO_MSR_STATE): {unclassified:?}"
        );
    }

    #[test]
    fn a_kept_features_msrs_are_carried() {
        for (feature, msrs) in SPEC {
            let list = allowlist(&profile_with(&[feature]));
            let missing: Vec<String> = msrs
                .iter()
                .filter(|m| !list.contains(m))
                .map(|m| format!("{m:#x}"))
                .collect();
            assert!(
                missing.is_empty(),
                "a profile keeping {feature} does not carry MSRs {missing:?}"
            );
        }
    }

    #[test]
    fn modern_baselines_carry_what_they_keep() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cpuid/testdata");
        let load = |n: &str| cpuid::dump::load(&dir.join(n)).unwrap();
        let hosts = [
            load("intel-xeon-w7-2475x-sapphirerapids-instlatx64.txt"),
            load("intel-xeon-silver-4514y-emeraldrapids-instlatx64.txt"),
        ];
        let amd = [
            load("amd-epyc-9124-genoa-instlatx64.txt"),
            load("amd-epyc-9655-turin-instlatx64.txt"),
        ];
        let mut checked = 0;
        for (name, set) in [("intel", &hosts[..]), ("amd", &amd[..])] {
            let p = cpuid::profile::baseline(name, set, None).unwrap();
            let list = allowlist(&p);
            for (feature, msrs) in SPEC.iter().filter(|(f, _)| p.has(f)) {
                for m in msrs.iter() {
                    assert!(
                        list.contains(m),
                        "{name}: {feature} kept, MSR {m:#x} not carried"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 20, "only {checked} MSRs checked");
    }

    #[test]
    fn the_tsc_comes_first_and_the_deadline_last_each_once() {
        let all: Vec<&str> = SPEC.iter().map(|(f, _)| *f).collect();
        let list = allowlist(&profile_with(&all));
        assert_eq!(list.first(), Some(&0x10));
        assert_eq!(list.last(), Some(&0x6e0));
        let mut sorted = list.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), list.len(), "an MSR listed twice");
        assert_eq!(name(0x6a4), Some("IA32_PLn_SSP"));
        assert_eq!(name(0x277), Some("IA32_PAT"));
    }
}
