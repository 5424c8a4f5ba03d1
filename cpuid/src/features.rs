//! The feature catalogue: named CPUID feature bits as data.
//!
//! Each [`Feature`] is one bit of one register of one (function, index) leaf, with the name
//! Linux gives it and the vendor(s) whose manuals define the bit with that meaning.
//!
//! Naming rules, in order:
//! 1. The name Linux prints in `/proc/cpuinfo` (the quoted string of
//!    `arch/x86/include/asm/cpufeatures.h`, e.g. `pni` for SSE3, `dts` for DS, `pdpe1gb`).
//! 2. For bits Linux defines but does not print, the `X86_FEATURE_*` macro name in lower case
//!    (`osxsave`, `fdp_excptn_only`, `spec_ctrl`, `spec_ctrl_ssbd`, `amd_ibpb`, ...). Note that
//!    Linux's printed `ssbd`, `ibrs`, `ibpb` and `stibp` are synthetic flags built from either
//!    vendor's bits, so they are not catalogue names; the CPUID bits are `spec_ctrl_ssbd` /
//!    `amd_ssbd`, `spec_ctrl` / `amd_ibpb` + `amd_ibrs`, `intel_stibp` / `amd_stibp`.
//! 3. For bits Linux has no `X86_FEATURE_*` for, the vendor manual's mnemonic in lower case;
//!    such entries say "no Linux name" beside them. `invtsc` (0x8000_0007 EDX bit 8) is QEMU's
//!    name: Linux shows that bit as the synthetic `constant_tsc` + `nonstop_tsc`.
//!
//! The 0x8000_0001 EDX bits that AMD mirrors from leaf 1 EDX (fpu, mmx, fxsr, ...) are not
//! listed twice: the leaf-1 entry is the canonical one.
//!
//! [`Feature::is_set`] reads a dump with one correction, from the dumps' caveats: Intel CPUs
//! report SYSCALL (0x8000_0001 EDX bit 11) only to 64-bit code, so a dump taken by a 32-bit tool
//! lacks it; on an Intel CPU with long mode, `syscall` counts as set.

use std::collections::BTreeSet;

use crate::leaf::{CpuidDump, Reg, Vendor};

/// Which vendor(s) define a bit with the catalogue's meaning. (KVM may offer a guest bits of
/// the other vendor, e.g. `amd_ibpb` on Intel hosts; that does not change this.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Vendors {
    Both,
    Intel,
    Amd,
}

impl Vendors {
    /// Whether CPUs of `v` define this bit.
    pub fn includes(self, v: Vendor) -> bool {
        match self {
            Vendors::Both => true,
            Vendors::Intel => v == Vendor::Intel,
            Vendors::Amd => v == Vendor::Amd,
        }
    }
}

/// One named feature bit: bit `bit` of register `reg` of CPUID leaf (`function`, `index`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Feature {
    pub name: &'static str,
    pub function: u32,
    pub index: u32,
    pub reg: Reg,
    pub bit: u8,
    pub vendors: Vendors,
}

const fn f(
    name: &'static str,
    function: u32,
    index: u32,
    reg: Reg,
    bit: u8,
    vendors: Vendors,
) -> Feature {
    Feature {
        name,
        function,
        index,
        reg,
        bit,
        vendors,
    }
}

use Reg::{Eax, Ebx, Ecx, Edx};
use Vendors::{Amd, Both, Intel};

const SYSCALL: Feature = f("syscall", 0x8000_0001, 0, Edx, 11, Both);
const LM: Feature = f("lm", 0x8000_0001, 0, Edx, 29, Both);

/// Every catalogued feature, grouped by leaf and register, in bit order.
pub static CATALOGUE: &[Feature] = &[
    // Leaf 1 EDX.
    f("fpu", 1, 0, Edx, 0, Both),
    f("vme", 1, 0, Edx, 1, Both),
    f("de", 1, 0, Edx, 2, Both),
    f("pse", 1, 0, Edx, 3, Both),
    f("tsc", 1, 0, Edx, 4, Both),
    f("msr", 1, 0, Edx, 5, Both),
    f("pae", 1, 0, Edx, 6, Both),
    f("mce", 1, 0, Edx, 7, Both),
    f("cx8", 1, 0, Edx, 8, Both),
    f("apic", 1, 0, Edx, 9, Both),
    f("sep", 1, 0, Edx, 11, Both),
    f("mtrr", 1, 0, Edx, 12, Both),
    f("pge", 1, 0, Edx, 13, Both),
    f("mca", 1, 0, Edx, 14, Both),
    f("cmov", 1, 0, Edx, 15, Both),
    f("pat", 1, 0, Edx, 16, Both),
    f("pse36", 1, 0, Edx, 17, Both),
    f("pn", 1, 0, Edx, 18, Intel),
    f("clflush", 1, 0, Edx, 19, Both),
    f("dts", 1, 0, Edx, 21, Intel), // X86_FEATURE_DS
    f("acpi", 1, 0, Edx, 22, Intel),
    f("mmx", 1, 0, Edx, 23, Both),
    f("fxsr", 1, 0, Edx, 24, Both),
    f("sse", 1, 0, Edx, 25, Both),
    f("sse2", 1, 0, Edx, 26, Both),
    f("ss", 1, 0, Edx, 27, Intel), // self snoop
    f("ht", 1, 0, Edx, 28, Both),
    f("tm", 1, 0, Edx, 29, Intel),
    f("ia64", 1, 0, Edx, 30, Intel),
    f("pbe", 1, 0, Edx, 31, Intel),
    // Leaf 1 ECX.
    f("pni", 1, 0, Ecx, 0, Both), // SSE3
    f("pclmulqdq", 1, 0, Ecx, 1, Both),
    f("dtes64", 1, 0, Ecx, 2, Intel),
    f("monitor", 1, 0, Ecx, 3, Both),
    f("ds_cpl", 1, 0, Ecx, 4, Intel),
    f("vmx", 1, 0, Ecx, 5, Intel),
    f("smx", 1, 0, Ecx, 6, Intel),
    f("est", 1, 0, Ecx, 7, Intel),
    f("tm2", 1, 0, Ecx, 8, Intel),
    f("ssse3", 1, 0, Ecx, 9, Both),
    f("cid", 1, 0, Ecx, 10, Intel),
    f("sdbg", 1, 0, Ecx, 11, Intel),
    f("fma", 1, 0, Ecx, 12, Both),
    f("cx16", 1, 0, Ecx, 13, Both),
    f("xtpr", 1, 0, Ecx, 14, Intel),
    f("pdcm", 1, 0, Ecx, 15, Intel),
    f("pcid", 1, 0, Ecx, 17, Both),
    f("dca", 1, 0, Ecx, 18, Intel),
    f("sse4_1", 1, 0, Ecx, 19, Both),
    f("sse4_2", 1, 0, Ecx, 20, Both),
    f("x2apic", 1, 0, Ecx, 21, Both),
    f("movbe", 1, 0, Ecx, 22, Both),
    f("popcnt", 1, 0, Ecx, 23, Both),
    // Reserved in AMD's manual; KVM emulates the timer for guests of either vendor.
    f("tsc_deadline_timer", 1, 0, Ecx, 24, Intel),
    f("aes", 1, 0, Ecx, 25, Both),
    f("xsave", 1, 0, Ecx, 26, Both),
    f("osxsave", 1, 0, Ecx, 27, Both),
    f("avx", 1, 0, Ecx, 28, Both),
    f("f16c", 1, 0, Ecx, 29, Both),
    f("rdrand", 1, 0, Ecx, 30, Both),
    f("hypervisor", 1, 0, Ecx, 31, Both),
    // Leaf 7.0 EBX.
    f("fsgsbase", 7, 0, Ebx, 0, Both),
    f("tsc_adjust", 7, 0, Ebx, 1, Both),
    f("sgx", 7, 0, Ebx, 2, Intel),
    f("bmi1", 7, 0, Ebx, 3, Both),
    f("hle", 7, 0, Ebx, 4, Intel),
    f("avx2", 7, 0, Ebx, 5, Both),
    f("fdp_excptn_only", 7, 0, Ebx, 6, Intel),
    f("smep", 7, 0, Ebx, 7, Both),
    f("bmi2", 7, 0, Ebx, 8, Both),
    f("erms", 7, 0, Ebx, 9, Both),
    f("invpcid", 7, 0, Ebx, 10, Both),
    f("rtm", 7, 0, Ebx, 11, Intel),
    f("cqm", 7, 0, Ebx, 12, Both), // PQM
    f("zero_fcs_fds", 7, 0, Ebx, 13, Intel),
    f("mpx", 7, 0, Ebx, 14, Intel),
    f("rdt_a", 7, 0, Ebx, 15, Both), // PQE
    f("avx512f", 7, 0, Ebx, 16, Both),
    f("avx512dq", 7, 0, Ebx, 17, Both),
    f("rdseed", 7, 0, Ebx, 18, Both),
    f("adx", 7, 0, Ebx, 19, Both),
    f("smap", 7, 0, Ebx, 20, Both),
    f("avx512ifma", 7, 0, Ebx, 21, Both),
    f("clflushopt", 7, 0, Ebx, 23, Both),
    f("clwb", 7, 0, Ebx, 24, Both),
    f("intel_pt", 7, 0, Ebx, 25, Intel),
    f("avx512pf", 7, 0, Ebx, 26, Intel),
    f("avx512er", 7, 0, Ebx, 27, Intel),
    f("avx512cd", 7, 0, Ebx, 28, Both),
    f("sha_ni", 7, 0, Ebx, 29, Both),
    f("avx512bw", 7, 0, Ebx, 30, Both),
    f("avx512vl", 7, 0, Ebx, 31, Both),
    // Leaf 7.0 ECX.
    f("avx512vbmi", 7, 0, Ecx, 1, Both),
    f("umip", 7, 0, Ecx, 2, Both),
    f("pku", 7, 0, Ecx, 3, Both),
    f("ospke", 7, 0, Ecx, 4, Both),
    f("waitpkg", 7, 0, Ecx, 5, Intel),
    f("avx512_vbmi2", 7, 0, Ecx, 6, Both),
    f("shstk", 7, 0, Ecx, 7, Both), // CET shadow stack
    f("gfni", 7, 0, Ecx, 8, Both),
    f("vaes", 7, 0, Ecx, 9, Both),
    f("vpclmulqdq", 7, 0, Ecx, 10, Both),
    f("avx512_vnni", 7, 0, Ecx, 11, Both),
    f("avx512_bitalg", 7, 0, Ecx, 12, Both),
    f("tme", 7, 0, Ecx, 13, Intel),
    f("avx512_vpopcntdq", 7, 0, Ecx, 14, Both),
    f("la57", 7, 0, Ecx, 16, Both),
    f("rdpid", 7, 0, Ecx, 22, Both),
    f("bus_lock_detect", 7, 0, Ecx, 24, Both),
    f("cldemote", 7, 0, Ecx, 25, Intel),
    f("movdiri", 7, 0, Ecx, 27, Both),
    f("movdir64b", 7, 0, Ecx, 28, Both),
    f("enqcmd", 7, 0, Ecx, 29, Intel),
    f("sgx_lc", 7, 0, Ecx, 30, Intel),
    f("pks", 7, 0, Ecx, 31, Intel), // no Linux name (SDM: PKS)
    // Leaf 7.0 EDX.
    f("sgx_keys", 7, 0, Edx, 1, Intel), // no Linux name (SDM: SGX-KEYS)
    f("avx512_4vnniw", 7, 0, Edx, 2, Intel),
    f("avx512_4fmaps", 7, 0, Edx, 3, Intel),
    f("fsrm", 7, 0, Edx, 4, Both),
    f("uintr", 7, 0, Edx, 5, Intel), // no Linux name (SDM: UINTR)
    f("avx512_vp2intersect", 7, 0, Edx, 8, Both),
    f("srbds_ctrl", 7, 0, Edx, 9, Intel),
    f("md_clear", 7, 0, Edx, 10, Intel),
    f("rtm_always_abort", 7, 0, Edx, 11, Intel),
    f("tsx_force_abort", 7, 0, Edx, 13, Intel),
    f("serialize", 7, 0, Edx, 14, Intel),
    f("hybrid_cpu", 7, 0, Edx, 15, Intel),
    f("tsxldtrk", 7, 0, Edx, 16, Intel),
    f("pconfig", 7, 0, Edx, 18, Intel),
    f("arch_lbr", 7, 0, Edx, 19, Intel),
    f("ibt", 7, 0, Edx, 20, Intel),
    f("amx_bf16", 7, 0, Edx, 22, Intel),
    f("avx512_fp16", 7, 0, Edx, 23, Intel),
    f("amx_tile", 7, 0, Edx, 24, Intel),
    f("amx_int8", 7, 0, Edx, 25, Intel),
    f("spec_ctrl", 7, 0, Edx, 26, Intel), // IBRS + IBPB (AMD: amd_ibrs, amd_ibpb)
    f("intel_stibp", 7, 0, Edx, 27, Intel),
    f("flush_l1d", 7, 0, Edx, 28, Both), // Intel-defined; Genoa and Turin set it too
    f("arch_capabilities", 7, 0, Edx, 29, Intel),
    f("core_capabilities", 7, 0, Edx, 30, Intel),
    f("spec_ctrl_ssbd", 7, 0, Edx, 31, Intel), // AMD: amd_ssbd, virt_ssbd
    // Leaf 7.1 EAX.
    f("avx_vnni", 7, 1, Eax, 4, Both),
    f("avx512_bf16", 7, 1, Eax, 5, Both),
    f("cmpccxadd", 7, 1, Eax, 7, Intel),
    f("arch_perfmon_ext", 7, 1, Eax, 8, Intel),
    f("fzrm", 7, 1, Eax, 10, Intel),
    f("fsrs", 7, 1, Eax, 11, Intel),
    f("fsrc", 7, 1, Eax, 12, Intel),
    f("fred", 7, 1, Eax, 17, Intel),
    f("lkgs", 7, 1, Eax, 18, Intel),
    f("wrmsrns", 7, 1, Eax, 19, Intel),
    f("amx_fp16", 7, 1, Eax, 21, Intel),
    f("avx_ifma", 7, 1, Eax, 23, Intel),
    f("lam", 7, 1, Eax, 26, Intel),
    // Leaf 0xD.1 EAX.
    f("xsaveopt", 0xD, 1, Eax, 0, Both),
    f("xsavec", 0xD, 1, Eax, 1, Both),
    f("xgetbv1", 0xD, 1, Eax, 2, Both),
    f("xsaves", 0xD, 1, Eax, 3, Both),
    f("xfd", 0xD, 1, Eax, 4, Intel),
    // Leaf 0x8000_0001 ECX.
    f("lahf_lm", 0x8000_0001, 0, Ecx, 0, Both),
    f("cmp_legacy", 0x8000_0001, 0, Ecx, 1, Amd),
    f("svm", 0x8000_0001, 0, Ecx, 2, Amd),
    f("extapic", 0x8000_0001, 0, Ecx, 3, Amd),
    f("cr8_legacy", 0x8000_0001, 0, Ecx, 4, Amd),
    f("abm", 0x8000_0001, 0, Ecx, 5, Both), // LZCNT
    f("sse4a", 0x8000_0001, 0, Ecx, 6, Amd),
    f("misalignsse", 0x8000_0001, 0, Ecx, 7, Amd),
    f("3dnowprefetch", 0x8000_0001, 0, Ecx, 8, Both), // PREFETCHW
    f("osvw", 0x8000_0001, 0, Ecx, 9, Amd),
    f("ibs", 0x8000_0001, 0, Ecx, 10, Amd),
    f("xop", 0x8000_0001, 0, Ecx, 11, Amd),
    f("skinit", 0x8000_0001, 0, Ecx, 12, Amd),
    f("wdt", 0x8000_0001, 0, Ecx, 13, Amd),
    f("lwp", 0x8000_0001, 0, Ecx, 15, Amd),
    f("fma4", 0x8000_0001, 0, Ecx, 16, Amd),
    f("tce", 0x8000_0001, 0, Ecx, 17, Amd),
    f("nodeid_msr", 0x8000_0001, 0, Ecx, 19, Amd),
    f("tbm", 0x8000_0001, 0, Ecx, 21, Amd),
    f("topoext", 0x8000_0001, 0, Ecx, 22, Amd),
    f("perfctr_core", 0x8000_0001, 0, Ecx, 23, Amd),
    f("perfctr_nb", 0x8000_0001, 0, Ecx, 24, Amd),
    f("bpext", 0x8000_0001, 0, Ecx, 26, Amd),
    f("ptsc", 0x8000_0001, 0, Ecx, 27, Amd),
    f("perfctr_llc", 0x8000_0001, 0, Ecx, 28, Amd),
    f("mwaitx", 0x8000_0001, 0, Ecx, 29, Amd),
    f("addr_mask_ext", 0x8000_0001, 0, Ecx, 30, Amd), // no Linux name (APM: AddrMaskExt)
    // Leaf 0x8000_0001 EDX (without the bits AMD mirrors from leaf 1 EDX).
    SYSCALL,
    f("mp", 0x8000_0001, 0, Edx, 19, Amd),
    f("nx", 0x8000_0001, 0, Edx, 20, Both),
    f("mmxext", 0x8000_0001, 0, Edx, 22, Amd),
    f("fxsr_opt", 0x8000_0001, 0, Edx, 25, Amd),
    f("pdpe1gb", 0x8000_0001, 0, Edx, 26, Both),
    f("rdtscp", 0x8000_0001, 0, Edx, 27, Both),
    LM,
    f("3dnowext", 0x8000_0001, 0, Edx, 30, Amd),
    f("3dnow", 0x8000_0001, 0, Edx, 31, Amd),
    // Leaf 0x8000_0007 EDX: invariant TSC (QEMU's name; see the module docs).
    f("invtsc", 0x8000_0007, 0, Edx, 8, Both),
    // Leaf 0x8000_0008 EBX.
    f("clzero", 0x8000_0008, 0, Ebx, 0, Amd),
    f("irperf", 0x8000_0008, 0, Ebx, 1, Amd),
    f("xsaveerptr", 0x8000_0008, 0, Ebx, 2, Amd),
    f("invlpgb", 0x8000_0008, 0, Ebx, 3, Amd),
    f("rdpru", 0x8000_0008, 0, Ebx, 4, Amd),
    f("mba", 0x8000_0008, 0, Ebx, 6, Amd), // Linux sets the synthetic "mba" from this bit on AMD
    f("mcommit", 0x8000_0008, 0, Ebx, 8, Amd), // no Linux name (APM: MCOMMIT)
    f("wbnoinvd", 0x8000_0008, 0, Ebx, 9, Both),
    f("amd_ibpb", 0x8000_0008, 0, Ebx, 12, Amd),
    f("int_wbinvd", 0x8000_0008, 0, Ebx, 13, Amd), // no Linux name (APM: INT_WBINVD)
    f("amd_ibrs", 0x8000_0008, 0, Ebx, 14, Amd),
    f("amd_stibp", 0x8000_0008, 0, Ebx, 15, Amd),
    f("amd_stibp_always_on", 0x8000_0008, 0, Ebx, 17, Amd),
    f("amd_ibrs_preferred", 0x8000_0008, 0, Ebx, 18, Amd), // no Linux name (APM: IbrsPreferred)
    f("amd_ibrs_same_mode", 0x8000_0008, 0, Ebx, 19, Amd),
    f("efer_lmsle_mbz", 0x8000_0008, 0, Ebx, 20, Amd),
    f("invlpgb_nested", 0x8000_0008, 0, Ebx, 21, Amd), // no Linux name (APM: INVLPGBnestedPages)
    f("amd_ppin", 0x8000_0008, 0, Ebx, 23, Amd),
    f("amd_ssbd", 0x8000_0008, 0, Ebx, 24, Amd),
    f("virt_ssbd", 0x8000_0008, 0, Ebx, 25, Amd),
    f("amd_ssb_no", 0x8000_0008, 0, Ebx, 26, Amd),
    f("cppc", 0x8000_0008, 0, Ebx, 27, Amd),
    f("amd_psfd", 0x8000_0008, 0, Ebx, 28, Amd),
    f("btc_no", 0x8000_0008, 0, Ebx, 29, Amd),
    f("amd_ibpb_ret", 0x8000_0008, 0, Ebx, 30, Amd),
    f("brs", 0x8000_0008, 0, Ebx, 31, Amd),
];

/// The catalogue entry called `name`.
pub fn by_name(name: &str) -> Option<&'static Feature> {
    CATALOGUE.iter().find(|f| f.name == name)
}

impl Feature {
    /// Whether `dump` has this feature: its leaf is present, within the dump's range (the max
    /// leaf in EAX of leaf 0, 0x4000_0000 or 0x8000_0000, whichever range the leaf is in) and
    /// the bit is 1. On Intel, `syscall` also counts as set when `lm` is (see the module docs).
    pub fn is_set(&self, dump: &CpuidDump) -> bool {
        if self.bit_is_one(dump) {
            return true;
        }
        *self == SYSCALL && dump.vendor() == Some(Vendor::Intel) && LM.bit_is_one(dump)
    }

    fn bit_is_one(&self, dump: &CpuidDump) -> bool {
        let range = self.function & 0xF000_0000;
        let Some(max) = dump.get(range, 0).map(|l| l.eax) else {
            return false;
        };
        if self.function > max {
            return false;
        }
        dump.get(self.function, self.index).is_some_and(|l| {
            l.reg(self.reg)
                .checked_shr(u32::from(self.bit))
                .unwrap_or(0)
                & 1
                == 1
        })
    }
}

/// The names of every catalogued feature `dump` has.
pub fn present(dump: &CpuidDump) -> BTreeSet<&'static str> {
    CATALOGUE
        .iter()
        .filter(|f| f.is_set(dump))
        .map(|f| f.name)
        .collect()
}

#[cfg(test)]
mod tests;
