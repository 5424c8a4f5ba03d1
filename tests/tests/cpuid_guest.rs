//! The guest sees the CPUID table ferry built: a tiny guest executes CPUID in ring 0 for
//! every leaf and subleaf of its table, and the answers equal the table KVM holds
//! (KVM_GET_CPUID2). That table equals the requested one bit for bit, except on KVM hosts
//! that OR host bits into leaves 1, 7 and 0xD (kvm_pvm): there ferry must report each
//! changed bit, and nothing outside those leaves may differ.

use std::time::Duration;

use cpuid::Leaf;
use ferry_tests::tiny::*;
use vmm::guest_cpu;

const LIMIT: Duration = Duration::from_secs(60);

/// The (function, index) of every leaf that differs between two tables, or is in one only.
fn differing(requested: &[Leaf], effective: &[Leaf]) -> Vec<(u32, u32)> {
    let get =
        |t: &[Leaf], f: u32, i: u32| t.iter().find(|l| l.function == f && l.index == i).copied();
    let mut keys: Vec<(u32, u32)> = requested
        .iter()
        .chain(effective)
        .map(|l| (l.function, l.index))
        .collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|(f, i)| get(requested, *f, *i) != get(effective, *f, *i))
        .collect()
}

fn run_table(profile: Option<cpuid::profile::CpuProfile>) {
    let t = TinyVm::with_cpu(&LONG_CPUID, 1, profile);
    let effective: Vec<Leaf> = t.vm.cpuid_effective().to_vec();
    let requested = t.vm.cpuid_requested();
    let name = t.vm.cpu_profile().name.clone();
    assert!(!effective.is_empty());
    {
        let mut dev = t.mmio.lock().unwrap();
        dev.script = effective
            .iter()
            .map(|l| u64::from(l.function) | (u64::from(l.index) << 32))
            .collect();
        dev.reply = u64::MAX;
    }
    t.vm.start().unwrap();
    assert!(
        matches!(t.wait_event(LIMIT), vmm::VmEvent::Reset { .. }),
        "{name}"
    );
    let writes: Vec<u64> = t
        .mmio_accesses()
        .iter()
        .filter(|a| a.write)
        .map(|a| u64::from_le_bytes(a.data[..8].try_into().unwrap()))
        .collect();
    assert_eq!(writes.len(), 2 * effective.len(), "{name}");
    for (l, w) in effective.iter().zip(writes.chunks(2)) {
        let seen = Leaf {
            function: l.function,
            index: l.index,
            eax: w[0] as u32,
            ebx: (w[0] >> 32) as u32,
            ecx: w[1] as u32,
            edx: (w[1] >> 32) as u32,
        };
        assert_eq!(
            &seen, l,
            "{name}: ring-0 CPUID {:#x}.{} differs from KVM_GET_CPUID2",
            l.function, l.index
        );
    }

    let cpuid::table::TableDiff {
        features: forced,
        registers: other,
    } = t.vm.cpuid_forced();
    let differing = differing(&requested, &effective);
    if guest_cpu::model::emulating_host() {
        // Only the leaves this kind of KVM is known to rewrite (or add), and every change
        // is reported by name or register.
        for (f, i) in &differing {
            assert!(
                matches!((f, i), (1, 0) | (7, 0) | (7, 1) | (0xd, _)),
                "{name}: unexpected change in {f:#x}.{i}"
            );
        }
        assert_eq!(
            differing.is_empty(),
            forced.is_empty() && other.is_empty(),
            "{name}: {forced:?} {other:?}"
        );
        eprintln!("{name}: this host's KVM changed {differing:x?}: features {forced:?}, other registers {other:x?}");
    } else {
        assert_eq!(requested, effective, "{name}: KVM changed the table");
        assert!(forced.is_empty() && other.is_empty());
    }
}

#[test]
fn default_profile_table_is_what_the_guest_sees() {
    run_table(None);
}

#[test]
fn harpertown_shanghai_table_is_what_the_guest_sees() {
    let p = cpuid::builtin::builtin("harpertown-shanghai", &cpuid::CpuidDump::default())
        .unwrap()
        .unwrap();
    run_table(Some(p));
}
