//! The Linux test guest with the `harpertown-shanghai` profile: an Intel identity (the 2008
//! demo's Xeon E5420, family 6 model 0x17) whatever this host's vendor. The guest prints the
//! CPUID it reads in ring 0 (`ferry.cpuid`), which must equal the table KVM holds, and it
//! keeps heartbeating.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_tests::process::{run_guest, temp_path};
use ferry_tests::require_kvm;
use serde_json::Value;

const BOOT_LIMIT: Duration = Duration::from_secs(600);

/// `CPUID 00000001 00: 00010676 00020800 ...` after the printk timestamp.
fn parse_cpuid(line: &str) -> Option<((u32, u32), [u32; 4])> {
    let rest = &line[line.find("] CPUID ")? + 8..];
    let mut w = rest.split_whitespace();
    let f = u32::from_str_radix(w.next()?, 16).ok()?;
    let i = u32::from_str_radix(w.next()?.trim_end_matches(':'), 16).ok()?;
    let mut r = [0u32; 4];
    for x in &mut r {
        *x = u32::from_str_radix(w.next()?, 16).ok()?;
    }
    Some(((f, i), r))
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn harpertown_shanghai_guest_is_an_intel_e5420_and_sees_the_effective_table() {
    boot_with_profile(
        "harpertown-shanghai",
        "harpertown-shanghai",
        "intel.sock",
        ("GenuineIntel", "6", "23", "6"),
    );
}

/// The same two CPUs with the Opteron's identity: a guest of the other vendor than an Intel
/// host (and of the host's vendor on an AMD one).
#[test]
fn shanghai_harpertown_guest_is_an_amd_opteron_and_sees_the_effective_table() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cpuid/testdata");
    let hosts = [
        cpuid::dump::load(&dir.join("intel-xeon-e5420-harpertown-libcpuid.txt")).unwrap(),
        cpuid::dump::load(&dir.join("amd-opteron-2378-shanghai-instlatx64.txt")).unwrap(),
    ];
    let p =
        cpuid::profile::baseline("shanghai-harpertown", &hosts, Some(cpuid::Vendor::Amd)).unwrap();
    let file = temp_path("shanghai-harpertown.json");
    std::fs::write(&file, p.to_json()).unwrap();
    boot_with_profile(
        file.to_str().unwrap(),
        "shanghai-harpertown",
        "amd.sock",
        ("AuthenticAMD", "16", "4", "2"),
    );
}

/// The effective CPUID table of `ferry ctl --json cpuid`'s answer, by (function, index).
fn effective_table(resp: &Value) -> BTreeMap<(u32, u32), [u32; 4]> {
    resp["effective"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let g = |k: &str| l[k].as_u64().unwrap() as u32;
            (
                (g("function"), g("index")),
                [g("eax"), g("ebx"), g("ecx"), g("edx")],
            )
        })
        .collect()
}

/// Every leaf the guest read in ring 0 (`seen`) as KVM holds it (`effective`).
fn assert_same_leaves(
    seen: &BTreeMap<(u32, u32), [u32; 4]>,
    effective: &BTreeMap<(u32, u32), [u32; 4]>,
) {
    for ((func, idx), regs) in seen {
        // KVM answers zeros for a subleaf of an in-range function that has no entry (here:
        // 7.1 after this host's KVM raised 7.0 EAX, the max subleaf, to the host's value).
        let mut want = effective.get(&(*func, *idx)).copied().unwrap_or([0; 4]);
        let mut got = *regs;
        // The effective table is vCPU 0's; the guest may have read it on another vCPU,
        // whose APIC IDs (leaf 1 EBX[31:24], leaf 0xB EDX) differ.
        if *func == 1 {
            want[1] &= 0x00ff_ffff;
            got[1] &= 0x00ff_ffff;
        }
        if *func == 0xb {
            want[3] = 0;
            got[3] = 0;
        }
        assert_eq!(
            got, want,
            "leaf {func:#x}.{idx}: guest ring 0 vs KVM_GET_CPUID2"
        );
    }
}

/// Boots the test guest (2 vCPUs) with `profile`, checks the identity it reports and that
/// every CPUID leaf it read in ring 0 equals the table KVM holds, and that it keeps running.
fn boot_with_profile(
    profile: &str,
    name: &str,
    sock: &str,
    (vendor, family, model, stepping): (&str, &str, &str, &str),
) {
    require_kvm();
    let socket = temp_path(sock);
    let mut f = run_guest(
        None,
        2,
        "workload=idle hb_ms=50 ferry.cpuid",
        &["--cpu", profile],
        &socket,
    );
    let ready = f.wait_line(BOOT_LIMIT, |l| l.contains("GUEST-READY"));
    let fields = ["vendor", "family", "model", "stepping"].map(|k| field(&ready, k));
    assert_eq!(
        fields,
        [vendor, family, model, stepping].map(Some),
        "{ready}"
    );

    let seen: BTreeMap<(u32, u32), [u32; 4]> = f
        .seen
        .iter()
        .filter_map(|l| match l {
            ferry_tests::process::Line::Out(s) => parse_cpuid(s),
            _ => None,
        })
        .collect();
    assert!(
        seen.len() >= 15,
        "the guest printed {} CPUID leaves:\n{}",
        seen.len(),
        f.transcript()
    );

    let (ok, out) = f.ctl(&["--json", "cpuid"]);
    assert!(ok, "{out}");
    let resp: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(resp["profile"]["name"], name);
    let effective = effective_table(&resp);
    assert_same_leaves(&seen, &effective);

    // And it keeps running.
    let hb = |l: &str| l.contains("] HB ");
    for _ in 0..5 {
        f.wait_line(Duration::from_secs(120), hb);
    }
    assert!(f.ctl(&["stop"]).0);
    assert!(f.wait_exit(Duration::from_secs(120)).success());
}
