//! Profiles, baselines, checks and guest tables on the real CPU dumps in testdata/.

use std::collections::BTreeSet;
use std::path::Path;

use cpuid::builtin::builtin;
use cpuid::profile::{baseline, check, CpuProfile};
use cpuid::table::guest_table;
use cpuid::{CpuidDump, Vendor};

fn dump(name: &str) -> CpuidDump {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name);
    cpuid::dump::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

const E5420: &str = "intel-xeon-e5420-harpertown-libcpuid.txt";
const OPTERON: &str = "amd-opteron-2378-shanghai-instlatx64.txt";
const CASCADE: &str = "intel-xeon-gold-5215-cascadelake-sp-instlatx64.txt";
const MILAN: &str = "amd-epyc-7763-milan-instlatx64.txt";
const SAPPHIRE: &str = "intel-xeon-w7-2475x-sapphirerapids-instlatx64.txt";
const GENOA: &str = "amd-epyc-9124-genoa-instlatx64.txt";

#[test]
fn harpertown_shanghai_is_the_2008_demo_baseline() {
    let p = builtin("harpertown-shanghai", &CpuidDump::default())
        .unwrap()
        .unwrap();
    for f in ["pni", "cx16", "lahf_lm", "sse2", "cmov", "lm", "nx"] {
        assert!(p.has(f), "missing {f}");
    }
    for f in [
        "ssse3", "sse4_1", "sse4a", "popcnt", "3dnow", "rdtscp", "xsave", "monitor", "vmx", "svm",
    ] {
        assert!(!p.has(f), "has {f}");
    }
    assert_eq!(p.identity.vendor, Vendor::Intel);
    assert_eq!(
        (p.identity.family, p.identity.model, p.identity.stepping),
        (6, 0x17, 6)
    );
    assert!(p.identity.brand.contains("E5420"), "{}", p.identity.brand);
    // It runs on both CPUs it came from.
    check(&p, &dump(E5420)).unwrap();
    check(&p, &dump(OPTERON)).unwrap();
}

#[test]
fn cascade_lake_and_milan_reach_x86_64_v3() {
    let p = baseline("clx-milan", &[dump(CASCADE), dump(MILAN)], None).unwrap();
    let v3 = builtin("x86-64-v3", &dump(CASCADE)).unwrap().unwrap();
    let missing: Vec<_> = v3.features.difference(&p.features).collect();
    assert!(missing.is_empty(), "baseline lacks {missing:?}");
    assert!(!p.has("avx512f"), "Milan has no AVX-512");
    // The AVX component is laid out identically on both; nothing with a vendor layout.
    assert_eq!(p.xsave.iter().map(|c| c.index).collect::<Vec<_>>(), vec![2]);
    check(&v3, &dump(CASCADE)).unwrap();
    check(&v3, &dump(MILAN)).unwrap();
}

#[test]
fn guest_tables_are_bit_identical_whichever_host_builds_them() {
    for (intel, amd) in [(CASCADE, MILAN), (SAPPHIRE, GENOA), (E5420, OPTERON)] {
        let hosts = [dump(intel), dump(amd)];
        let p = baseline("pair", &hosts, None).unwrap();
        // Each host receives the profile as a file, checks it against itself and builds
        // the table for a 4-vCPU guest.
        let tables: Vec<_> = hosts
            .iter()
            .map(|h| {
                let received = CpuProfile::from_json("wire", &p.to_json()).unwrap();
                check(&received, h).unwrap_or_else(|m| panic!("{}: {m}", h.source));
                guest_table(&received, 4)
            })
            .collect();
        assert_eq!(tables[0], tables[1], "{intel} vs {amd}");
        // The identity is the first host's vendor on both.
        let t = &tables[0];
        assert_eq!(&t[0].ebx.to_le_bytes(), b"Genu");
    }
}

#[test]
fn a_profile_with_avx512f_fails_on_the_opteron_naming_exactly_what_is_missing() {
    let mut p = builtin("harpertown-shanghai", &CpuidDump::default())
        .unwrap()
        .unwrap();
    p.features.insert("avx512f".into());
    p.features.insert("ssse3".into());
    let m = check(&p, &dump(OPTERON)).unwrap_err();
    assert_eq!(m.features, vec!["avx512f".to_string(), "ssse3".to_string()]);
    // On the Skylake server only the features it lacks are named (it has both of these).
    let sky = dump("intel-xeon-gold-6154-skylake-sp-instlatx64.txt");
    let p2 = baseline("sky", std::slice::from_ref(&sky), None).unwrap();
    assert!(check(&p2, &dump(OPTERON))
        .unwrap_err()
        .features
        .contains(&"avx512f".to_string()));
}

#[test]
fn every_baseline_runs_on_each_host_it_came_from() {
    let names = [E5420, OPTERON, CASCADE, MILAN, SAPPHIRE, GENOA];
    for a in names {
        for b in names {
            let hosts = [dump(a), dump(b)];
            let p = baseline("x", &hosts, None).unwrap();
            for h in &hosts {
                check(&p, h).unwrap_or_else(|m| panic!("baseline({a}, {b}) on {}: {m}", h.source));
            }
        }
    }
}

#[test]
fn profiles_round_trip_and_unknown_features_are_refused() {
    let p = builtin("x86-64-v2", &dump(MILAN)).unwrap().unwrap();
    assert_eq!(p.identity.vendor, Vendor::Amd);
    let back = CpuProfile::from_json("t", &p.to_json()).unwrap();
    assert_eq!(back, p);
    let bad = p.to_json().replace("\"sse4_2\"", "\"sse9\"");
    let e = CpuProfile::from_json("bad.json", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sse9") && e.contains("bad.json"), "{e}");
    let mut nested = p.clone();
    nested.features.insert("vmx".into());
    let e = CpuProfile::from_json("nested.json", &nested.to_json())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vmx") && e.contains("never given to a guest"),
        "{e}"
    );
    let future = p.to_json().replace("\"version\": 1", "\"version\": 7");
    assert!(CpuProfile::from_json("f", &future)
        .unwrap_err()
        .to_string()
        .contains("version 7"));
}

#[test]
fn guest_table_identity_and_topology() {
    let p = builtin("harpertown-shanghai", &CpuidDump::default())
        .unwrap()
        .unwrap();
    let t = guest_table(&p, 2);
    let get = |f: u32, i: u32| *t.iter().find(|l| l.function == f && l.index == i).unwrap();
    let d = CpuidDump::new("table", t.clone());
    assert_eq!(d.vendor(), Some(Vendor::Intel));
    assert_eq!(d.family_model_stepping(), Some((6, 0x17, 6)));
    assert_ne!(get(1, 0).ecx & (1 << 31), 0, "hypervisor bit");
    assert_ne!(get(1, 0).edx & (1 << 28), 0, "HTT with 2 vCPUs");
    assert_eq!(get(0xb, 1).ebx, 2, "two logical processors at core level");
    assert_eq!(get(4, 0).eax & 0x1f, 1, "L1 data cache first");
    // Exactly the profile's features are set, plus the synthesized ones.
    let present: BTreeSet<String> = cpuid::features::present(&d)
        .into_iter()
        .map(String::from)
        .collect();
    let mut want = p.features.clone();
    want.extend(["hypervisor".to_string(), "ht".to_string()]);
    assert_eq!(present, want);
    // vCPU 1's table differs only in its APIC IDs.
    let t1 = cpuid::table::for_vcpu(&t, 1);
    let diff: Vec<_> = t
        .iter()
        .zip(&t1)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.function)
        .collect();
    assert_eq!(diff, vec![1, 0xb, 0xb, 0xb]);
}

#[test]
fn a_builtin_takes_the_other_vendors_identity_on_request() {
    let intel_host = dump(CASCADE);
    let v2 = builtin("x86-64-v2", &intel_host).unwrap().unwrap();
    let amd = builtin("x86-64-v2,vendor=amd", &intel_host)
        .unwrap()
        .unwrap();
    assert_eq!(v2.identity.vendor, Vendor::Intel);
    assert_eq!(amd.identity.vendor, Vendor::Amd);
    assert_eq!((amd.identity.family, amd.identity.model), (0x15, 0x01));
    assert_eq!(amd.features, v2.features, "the same features");
    assert_eq!(amd.name, "x86-64-v2,vendor=amd");
    let ht = builtin("harpertown-shanghai", &intel_host)
        .unwrap()
        .unwrap();
    let sh = builtin("harpertown-shanghai,vendor=amd", &intel_host)
        .unwrap()
        .unwrap();
    assert_eq!(sh.identity.vendor, Vendor::Amd);
    assert_eq!(
        (sh.identity.family, sh.identity.model),
        (0x10, 0x04),
        "Opteron 2378"
    );
    assert_eq!(sh.features, ht.features);
    let same = builtin("harpertown-shanghai,vendor=intel", &intel_host)
        .unwrap()
        .unwrap();
    assert_eq!(same.identity, ht.identity);
    for bad in ["host,vendor=amd", "x86-64-v2,vendor=via", "x86-64-v3,fast"] {
        let e = builtin(bad, &intel_host).unwrap().unwrap_err().to_string();
        assert!(e.starts_with(&format!("CPU profile {bad:?}")), "{e}");
    }
    assert!(builtin("penryn,vendor=amd", &intel_host).is_none());
}
