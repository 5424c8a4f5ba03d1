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
    moving_between_hosts(&mut s);
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

/// The policies of crate::effective and crate::tsc.
fn moving_between_hosts(s: &mut String) {
    s.push_str(
        "## Moving between hosts\n\n\
         A snapshot or a migration carries the guest CPU as the saving host ran it (format version 2,\n\
         GCPU): that host's vendor and signature, the guest's TSC rate, and vCPU 0's CPUID table as\n\
         that host's KVM held it. The host that takes the guest in builds a vCPU of the same profile,\n\
         reads back what its own KVM holds, and decides before any of the guest's memory is written\n\
         (a migration: before it accepts the Hello). A snapshot of format version 1 carries none of\n\
         this: only the profile is checked, and the guest's TSC runs at the new host's rate.\n\n\
         ### The effective CPUID table\n\n\
         | difference between the saved table and this host's | decision |\n|---|---|\n\
         | vendor string or leaf 1 signature | refused: the guest would see another CPU |\n\
         | a feature the profile offers, gone here | refused: the guest saw it at boot |\n\
         | a feature the profile offers, withheld by the saving host's KVM, given here | reported: the guest never saw it, and a feature that appears breaks nothing |\n\
         | a feature the profile hides, forced by the saving host's KVM, gone here | reported, naming it |\n\
         | a feature the profile hides, forced by this host's KVM | reported, naming it |\n\
         | other bits (leaf 0xD sizes, max subleaves) | reported, naming leaf and register |\n\n\
         Forced bits come from a KVM that emulates guest ring 0 (kvm_pvm): it ORs its host's feature\n\
         bits into leaves 1, 7 and 0xD after KVM_SET_CPUID2, so an AMD EPYC host and an Intel Xeon\n\
         host force different sets into the same profile. The profile hides them; a guest that uses\n\
         what its CPUID offers must also be kept from using them (the test guest's command line\n\
         clears what the emulator cannot run).\n\n\
         ### TSC rate\n\n",
    );
    let _ = write!(
        s,
        "Two rates within {} parts per million are one rate (KVM's own tolerance). Otherwise:\n\n",
        crate::tsc::TOLERANCE_PPM
    );
    s.push_str(
        "| this host | the profile | decision |\n|---|---|---|\n\
         | can scale (KVM_CAP_TSC_CONTROL) | any | KVM_SET_TSC_KHZ to the guest's rate on every vCPU |\n\
         | cannot scale | promises an invariant TSC (`invtsc`) | refused: the promise would break |\n\
         | cannot scale | offers no kvmclock | refused: nothing would keep the guest's time |\n\
         | cannot scale | offers kvmclock, no `invtsc` | taken: the guest's TSC runs at this host's rate; kvmclock, whose parameters KVM computes for this host, keeps its time (said in the log) |\n\n\
         Built-in profiles advertise `invtsc` only when every host of a baseline has it (never for\n\
         the x86-64 levels), and every built-in offers kvmclock.\n\n",
    );
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
