//! docs/cpuid.md, generated from the catalogue and the profile rules so that it cannot drift
//! from the code (a test compares them; `FERRY_UPDATE_DOCS=1 cargo test -p ferry-cpuid`
//! rewrites the file).

use std::fmt::Write as _;

use crate::features::{Vendors, CATALOGUE};
use crate::profile::{EMULATOR_UNSAFE, HIDDEN, KVM_PV_FEATURES};

fn reg_name(r: crate::Reg) -> &'static str {
    match r {
        crate::Reg::Eax => "EAX",
        crate::Reg::Ebx => "EBX",
        crate::Reg::Ecx => "ECX",
        crate::Reg::Edx => "EDX",
    }
}

/// The text of docs/cpuid.md.
pub fn markdown() -> String {
    let mut s = String::new();
    s.push_str(
        "# The guest CPU model: CPUID leaves and features\n\n\
         Generated from `cpuid/src/features.rs` and `cpuid/src/profile.rs` by `cpuid/src/docs.rs`;\n\
         do not edit by hand (`FERRY_UPDATE_DOCS=1 cargo test -p ferry-cpuid` rewrites it).\n\n\
         ## What a guest sees\n\n\
         A CPU profile (`ferry cpu show NAME`) names an identity and an exact feature set. The guest\n\
         table is computed from the profile and the vCPU count alone, so every host gives the same\n\
         bits:\n\n\
         - leaf 0 and 0x80000000: the profile's max leaves and its vendor string;\n\
         - leaf 1: the profile's signature, CLFLUSH size 64, logical count, initial APIC ID per vCPU,\n  \
           `hypervisor` always, `ht` when there is more than one vCPU;\n\
         - leaves 2 and 4 (Intel identity): a synthesized L1d/L1i 32 KiB 8-way, L2 1 MiB 16-way,\n  \
           L3 16 MiB 16-way shared by all vCPUs; 0x80000005/6 likewise (AMD style for an AMD\n  \
           identity);\n\
         - leaf 6: ARAT only; leaves 5, 8, 9, 0xA (no vPMU) and every other unlisted leaf: zero;\n\
         - leaf 0xB: one thread per core, N cores, x2APIC ID per vCPU; 0x80000008: the profile's\n  \
           address sizes and (AMD identity) the core count;\n\
         - leaf 0xD: exactly the profile's XSAVE components, with the sizes and offsets recorded in\n  \
           the profile (a host whose layout differs cannot run it);\n\
         - 0x40000000/1: the KVM signature and the profile's paravirtual features;\n\
         - 0x80000002-4: the profile's brand string; 0x80000007: invariant TSC only by policy.\n\n\
         A feature is **kept** in a baseline when every host has it, its meaning is the same on every\n\
         host's vendor and on the identity's vendor (the Vendor column), and it is not hidden below.\n\n",
    );
    s.push_str("## Hidden features\n\n| feature | why it never reaches a guest |\n|---|---|\n");
    for (n, why) in HIDDEN {
        let _ = writeln!(s, "| {n} | {why} |");
    }
    s.push_str(
        "\n## Not in guest ring 0 on emulating KVM hosts\n\n\
         On hosts whose KVM emulates guest ring 0 (kvm_pvm), a guest kernel stops with an emulation\n\
         failure on these; ferry's default profile leaves them out there and `ferry cpu check` says so:\n",
    );
    let _ = writeln!(s, "{}.\n", EMULATOR_UNSAFE.join(", "));
    s.push_str("## KVM paravirtual features a profile may name (leaf 0x40000001 EAX)\n\n| name | bit |\n|---|---|\n");
    for (n, b) in KVM_PV_FEATURES {
        let _ = writeln!(s, "| {n} | {b} |");
    }
    s.push_str(
        "\nThe hypercall-based ones (pv_unhalt 7, pv_send_ipi 11, pv_sched_yield 13) are never\n\
         offered: the hypercall instruction is vendor-specific, and on emulating KVM hosts it never\n\
         completes.\n\n",
    );
    s.push_str("## The catalogue\n\nNames as Linux prints them in /proc/cpuinfo.\n\n| feature | leaf | subleaf | register | bit | vendor |\n|---|---|---|---|---|---|\n");
    for f in CATALOGUE {
        let v = match f.vendors {
            Vendors::Both => "both",
            Vendors::Intel => "Intel",
            Vendors::Amd => "AMD",
        };
        let _ = writeln!(
            s,
            "| {} | {:#x} | {} | {} | {} | {v} |",
            f.name,
            f.function,
            f.index,
            reg_name(f.reg),
            f.bit
        );
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn docs_cpuid_md_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cpuid.md");
        let want = super::markdown();
        if std::env::var_os("FERRY_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/cpuid.md is stale: run FERRY_UPDATE_DOCS=1 cargo test -p ferry-cpuid"
        );
    }

    #[test]
    fn hidden_and_unsafe_names_are_in_the_catalogue() {
        for (n, _) in crate::profile::HIDDEN {
            assert!(crate::features::by_name(n).is_some(), "{n}");
        }
        for n in crate::profile::EMULATOR_UNSAFE {
            assert!(crate::features::by_name(n).is_some(), "{n}");
        }
    }
}
