//! Every real CPU dump in testdata/ parses, has the identity SOURCES.md gives it, and has the
//! features the CPU is known to have; the catalogue names every feature bit the dumps set.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cpuid::dump::{self, Error};
use cpuid::features::{self, present, CATALOGUE};
use cpuid::{CpuidDump, Reg, Vendor};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn load(name: &str) -> CpuidDump {
    dump::load(&testdata().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

use Vendor::{Amd, Intel};

/// One dump file: vendor, (family, model, stepping), (max basic leaf, max extended leaf).
struct Expect {
    file: &'static str,
    vendor: Vendor,
    fms: (u32, u32, u32),
    max: (u32, u32),
}

const fn e(file: &'static str, vendor: Vendor, fms: (u32, u32, u32), max: (u32, u32)) -> Expect {
    Expect {
        file,
        vendor,
        fms,
        max,
    }
}

/// The table of testdata/SOURCES.md (identities) and cpu-facts.md §A1 (max leaves). The
/// Firecracker fingerprints are not in that table; their rows come from their own leaf 1 EAX
/// and hardware generation in the file name (Granite Rapids is 6/0xAD/1).
#[rustfmt::skip]
const DUMPS: &[Expect] = &[
    e("intel-xeon-e5420-harpertown-libcpuid.txt",
      Intel, (6, 0x17, 6), (0xA, 0x8000_0008)),
    e("intel-xeon-e5462-harpertown-instlatx64.txt",
      Intel, (6, 0x17, 6), (0xA, 0x8000_0008)),
    e("amd-opteron-2378-shanghai-instlatx64.txt",
      Amd, (0x10, 4, 2), (5, 0x8000_001B)),
    e("amd-opteron-2347he-barcelona-instlatx64.txt",
      Amd, (0x10, 2, 1), (5, 0x8000_001A)),
    e("intel-xeon-gold-6154-skylake-sp-instlatx64.txt",
      Intel, (6, 0x55, 4), (0x16, 0x8000_0008)),
    e("intel-xeon-gold-5215-cascadelake-sp-instlatx64.txt",
      Intel, (6, 0x55, 7), (0x16, 0x8000_0008)),
    e("intel-xeon-platinum-8268-cascadelake-libvirt.xml",
      Intel, (6, 0x55, 6), (0x16, 0x8000_0008)),
    e("intel-xeon-gold-6330-icelake-sp-instlatx64.txt",
      Intel, (6, 0x6A, 6), (0x1B, 0x8000_0008)),
    e("intel-xeon-w7-2475x-sapphirerapids-instlatx64.txt",
      Intel, (6, 0x8F, 8), (0x20, 0x8000_0008)),
    e("intel-xeon-silver-4514y-emeraldrapids-instlatx64.txt",
      Intel, (6, 0xCF, 2), (0x20, 0x8000_0008)),
    e("amd-epyc-7402p-rome-instlatx64.txt",
      Amd, (0x17, 0x31, 0), (0x10, 0x8000_0020)),
    e("amd-epyc-7763-milan-instlatx64.txt",
      Amd, (0x19, 0x01, 1), (0x10, 0x8000_0023)),
    e("amd-epyc-7713-milan-libvirt.xml",
      Amd, (0x19, 0x01, 1), (0x10, 0x8000_0023)),
    e("amd-epyc-9124-genoa-instlatx64.txt",
      Amd, (0x19, 0x11, 1), (0x10, 0x8000_0028)),
    e("amd-epyc-9655-turin-instlatx64.txt",
      Amd, (0x1A, 0x02, 1), (0x10, 0x8000_0028)),
    e("this-host-vm-amd-epyc-raw.txt",
      Amd, (0x1A, 0x02, 1), (0x1C, 0x8000_0021)),
    e("kvm-fingerprints/firecracker-fingerprint_INTEL_CASCADELAKE_6.18host.json",
      Intel, (6, 0x55, 7), (0x16, 0x8000_0008)),
    e("kvm-fingerprints/firecracker-fingerprint_INTEL_ICELAKE_6.18host.json",
      Intel, (6, 0x6A, 6), (0x1B, 0x8000_0008)),
    e("kvm-fingerprints/firecracker-fingerprint_INTEL_SAPPHIRE_RAPIDS_6.18host.json",
      Intel, (6, 0x8F, 8), (0x20, 0x8000_0008)),
    e("kvm-fingerprints/firecracker-fingerprint_INTEL_GRANITE_RAPIDS_6.18host.json",
      Intel, (6, 0xAD, 1), (0x24, 0x8000_0008)),
    e("kvm-fingerprints/firecracker-fingerprint_AMD_MILAN_6.18host.json",
      Amd, (0x19, 0x01, 1), (0x10, 0x8000_0022)),
    e("kvm-fingerprints/firecracker-fingerprint_AMD_GENOA_6.18host.json",
      Amd, (0x19, 0x11, 1), (0x10, 0x8000_0022)),
];

const E5420: &str = "intel-xeon-e5420-harpertown-libcpuid.txt";
const E5462: &str = "intel-xeon-e5462-harpertown-instlatx64.txt";
const OPTERON_2378: &str = "amd-opteron-2378-shanghai-instlatx64.txt";
const CASCADE: &str = "intel-xeon-gold-5215-cascadelake-sp-instlatx64.txt";
const CASCADE_LIBVIRT: &str = "intel-xeon-platinum-8268-cascadelake-libvirt.xml";
const MILAN: &str = "amd-epyc-7763-milan-instlatx64.txt";
const MILAN_LIBVIRT: &str = "amd-epyc-7713-milan-libvirt.xml";
const VM: &str = "this-host-vm-amd-epyc-raw.txt";

fn has(d: &CpuidDump, name: &str) -> bool {
    features::by_name(name)
        .unwrap_or_else(|| panic!("{name} is not catalogued"))
        .is_set(d)
}

fn assert_has(d: &CpuidDump, names: &[&str]) {
    let missing: Vec<_> = names.iter().filter(|n| !has(d, n)).collect();
    assert!(missing.is_empty(), "{} lacks {missing:?}", d.source);
}

fn assert_lacks(d: &CpuidDump, names: &[&str]) {
    let extra: Vec<_> = names.iter().filter(|n| has(d, n)).collect();
    assert!(extra.is_empty(), "{} has {extra:?}", d.source);
}

#[test]
fn every_dump_has_its_documented_identity() {
    for x in DUMPS {
        let d = load(x.file);
        let name = Path::new(x.file).file_name().unwrap().to_str().unwrap();
        assert_eq!(d.source, name);
        assert_eq!(d.vendor(), Some(x.vendor), "{}", x.file);
        assert_eq!(d.family_model_stepping(), Some(x.fms), "{}", x.file);
        let max = (d.get(0, 0).unwrap().eax, d.get(0x8000_0000, 0).unwrap().eax);
        assert_eq!(max, x.max, "{}: max leaves", x.file);
    }
}

/// Every dump file in testdata/ is in [`DUMPS`]: a new file must be added to the table.
#[test]
fn the_table_lists_every_dump_file() {
    let mut found = BTreeSet::new();
    for dir in [testdata(), testdata().join("kvm-fingerprints")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(testdata())
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let dump = match path.extension().and_then(|e| e.to_str()) {
                Some("txt") => !rel.contains("proc-cpuinfo"),
                Some("xml") => true,
                Some("json") => rel.starts_with("kvm-fingerprints/"),
                _ => false,
            };
            if dump {
                found.insert(rel);
            }
        }
    }
    let listed: BTreeSet<String> = DUMPS.iter().map(|x| x.file.to_string()).collect();
    assert_eq!(found, listed);
}

#[test]
fn proc_cpuinfo_is_not_a_dump() {
    let path = testdata().join("this-host-vm-amd-epyc-proc-cpuinfo.txt");
    let e = dump::load(&path).unwrap_err();
    assert!(matches!(e, Error::UnknownFormat { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("this-host-vm-amd-epyc-proc-cpuinfo.txt: "),
        "{e}"
    );
}

/// InstLatx64 files hold many logical CPUs; the parser keeps the first (APIC ID 0).
#[test]
fn instlatx64_dumps_are_logical_cpu_0() {
    for x in DUMPS.iter().filter(|x| x.file.ends_with("instlatx64.txt")) {
        let d = load(x.file);
        assert_eq!(
            d.get(1, 0).unwrap().ebx >> 24,
            0,
            "{}: initial APIC ID",
            x.file
        );
        assert!(
            d.get(0x8FFF_FFFF, 0).is_none(),
            "{}: easter-egg leaf kept",
            x.file
        );
        assert!(
            d.leaves.len() < 100,
            "{}: {} leaves: more than one CPU?",
            x.file,
            d.leaves.len()
        );
    }
}

#[test]
fn subleaves_in_each_form() {
    // EVEREST: leaf 4 printed three times without tags.
    let d = load(E5462);
    let eax4: Vec<u32> = (0..3).map(|i| d.get(4, i).unwrap().eax).collect();
    assert_eq!(eax4, [0x0C00_0121, 0x0C00_0122, 0x0C00_4143]);
    assert!(
        d.get(4, 3).is_none(),
        "EVEREST does not print the terminating subleaf"
    );
    // AIDA64 [SL xx] tags; Rome tags 0xD but not 7.
    let d = load("amd-epyc-7402p-rome-instlatx64.txt");
    assert_eq!(d.get(7, 0).unwrap().ebx, 0x219C_91A9);
    assert_eq!(d.get(0xD, 9).unwrap().eax, 0x40);
    assert_eq!(d.get(0x8000_001D, 3).unwrap().eax, 0x0001_4163);
    let d = load("intel-xeon-silver-4514y-emeraldrapids-instlatx64.txt");
    assert!(d.get(0xD, 0x12).is_some() && d.get(0x1F, 1).is_some() && d.get(7, 2).is_some());
    // libcpuid: intel_fn4 rows, clipped at max leaf 0xA (rows 11.. repeat leaf 0xA).
    let d = load(E5420);
    assert_eq!(d.get(4, 2).unwrap().eax, 0x0C00_4143);
    assert_eq!(
        d.get(4, 3).unwrap().eax,
        0,
        "libcpuid keeps the terminating subleaf"
    );
    assert!(d.get(0xB, 0).is_none() && d.get(0x1F, 0).is_none() && d.get(0x8000_0009, 0).is_none());
    assert_eq!(
        d.leaves.iter().filter(|l| l.function < 0x8000_0000).count(),
        11 + 3
    );
    // libvirt and cpuid -r give (leaf, subleaf) explicitly.
    assert_eq!(load(MILAN_LIBVIRT).get(0xD, 0xB).unwrap().ecx, 1);
    assert_eq!(load(VM).get(0xB, 1).unwrap().ebx, 2, "2 vCPUs");
}

/// The same die and stepping, read from two formats by two tools.
#[test]
fn harpertown_libcpuid_and_instlatx64_agree() {
    assert_eq!(present(&load(E5420)), present(&load(E5462)));
}

#[test]
fn demo_cpus_have_their_features() {
    let e5420 = load(E5420);
    assert_has(
        &e5420,
        &[
            "pni", "ssse3", "sse4_1", "cx16", "lahf_lm", "lm", "nx", "vmx", "est",
        ],
    );
    assert_lacks(
        &e5420,
        &[
            "sse4_2", "popcnt", "rdtscp", "xsave", "invtsc", "sse4a", "3dnow",
        ],
    );
    // Written by a 32-bit tool: SYSCALL is missing from the dump, but an Intel CPU with
    // long mode has it.
    assert_eq!(e5420.get(0x8000_0001, 0).unwrap().edx & (1 << 11), 0);
    assert!(has(&e5420, "syscall"));
    let opteron = load(OPTERON_2378);
    assert_has(
        &opteron,
        &[
            "pni", "cx16", "lahf_lm", "sse4a", "popcnt", "abm", "3dnow", "3dnowext",
        ],
    );
    assert_has(
        &opteron,
        &[
            "syscall",
            "rdtscp",
            "svm",
            "misalignsse",
            "invtsc",
            "pdpe1gb",
        ],
    );
    assert_lacks(&opteron, &["ssse3", "sse4_1", "sse4_2", "xsave", "avx"]);
}

#[test]
fn demo_pair_intersection() {
    let both: BTreeSet<_> = present(&load(E5420))
        .intersection(&present(&load(OPTERON_2378)))
        .copied()
        .collect();
    for f in [
        "pni", "cx16", "lahf_lm", "sse2", "lm", "nx", "syscall", "monitor",
    ] {
        assert!(both.contains(f), "lacks {f}");
    }
    for f in [
        "ssse3", "sse4_1", "sse4a", "popcnt", "3dnow", "rdtscp", "xsave", "invtsc", "pdpe1gb",
    ] {
        assert!(!both.contains(f), "has {f}");
    }
}

#[test]
fn modern_pair_features() {
    let cascade = load(CASCADE);
    let milan = load(MILAN);
    assert_has(
        &cascade,
        &[
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512_vnni",
            "avx2",
            "md_clear",
            "flush_l1d",
        ],
    );
    assert_has(
        &milan,
        &[
            "avx2", "sha_ni", "vaes", "clzero", "amd_ssbd", "topoext", "invtsc",
        ],
    );
    assert_lacks(&milan, &["avx512f", "avx512bw", "rtm", "hle"]);
    // Different SKUs of the same family/model, from different tools.
    let libvirt = load(CASCADE_LIBVIRT);
    for f in ["avx512f", "avx2", "sse4_2", "avx512_vnni", "pku"] {
        assert_eq!(has(&cascade, f), has(&libvirt, f), "{f}");
        assert!(has(&cascade, f), "{f}");
    }
}

/// Two Milan parts, two tools: they agree on every leaf-1 and leaf-7 feature except the
/// ones firmware and OS choose (x2APIC mode, CR4.PKE).
#[test]
fn milan_libvirt_and_instlatx64_agree() {
    let (a, b) = (load(MILAN), load(MILAN_LIBVIRT));
    let same = [
        "sse2",
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
        "xsave",
        "avx",
        "f16c",
        "rdrand",
        "fsgsbase",
        "bmi1",
        "avx2",
        "smep",
        "bmi2",
        "erms",
        "invpcid",
        "rdseed",
        "adx",
        "smap",
        "clflushopt",
        "clwb",
        "sha_ni",
        "umip",
        "pku",
        "vaes",
        "vpclmulqdq",
        "rdpid",
        "fsrm",
    ];
    assert_has(&a, &same);
    assert_has(&b, &same);
    let leaf_1_7 = |d: &CpuidDump| -> BTreeSet<&str> {
        present(d)
            .into_iter()
            .filter(|n| matches!(features::by_name(n).unwrap().function, 1 | 7))
            .collect()
    };
    let diff: Vec<_> = leaf_1_7(&a)
        .symmetric_difference(&leaf_1_7(&b))
        .copied()
        .collect();
    assert_eq!(diff, ["ospke", "x2apic"]);
}

/// Every bit a dump sets in the registers the catalogue covers has a name, except the
/// 0x8000_0001 EDX copies of leaf 1 EDX and 0x8000_0008 EBX[10] (undocumented; Rome and
/// Milan set it). 0x8000_0007 EDX is covered for invariant TSC only.
#[test]
fn the_catalogue_names_every_set_bit() {
    const ALIASES: u32 = 0x0183_F3FF;
    let regs: [(u32, u32, Reg, u32); 11] = [
        (1, 0, Reg::Ecx, 0),
        (1, 0, Reg::Edx, 0),
        (7, 0, Reg::Ebx, 0),
        (7, 0, Reg::Ecx, 0),
        (7, 0, Reg::Edx, 0),
        (7, 1, Reg::Eax, 0),
        (0xD, 1, Reg::Eax, 0),
        (0x8000_0001, 0, Reg::Ecx, 0),
        (0x8000_0001, 0, Reg::Edx, ALIASES),
        (0x8000_0007, 0, Reg::Edx, !(1 << 8)),
        (0x8000_0008, 0, Reg::Ebx, 1 << 10),
    ];
    for x in DUMPS {
        let d = load(x.file);
        for (function, index, reg, ignored) in regs {
            let Some(l) = d.get(function, index) else {
                continue;
            };
            let named = CATALOGUE
                .iter()
                .filter(|f| (f.function, f.index, f.reg) == (function, index, reg))
                .fold(0u32, |m, f| m | 1 << f.bit);
            let unnamed = l.reg(reg) & !named & !ignored;
            assert_eq!(
                unnamed, 0,
                "{}: {function:#x}.{index} {reg:?} bits {unnamed:#010x} have no name",
                x.file
            );
        }
    }
}

/// This VM's /proc/cpuinfo flags against its `cpuid -r` dump: every catalogued flag Linux
/// shows is set in the dump, and every set feature Linux does not show is one it hides.
#[test]
fn vm_dump_matches_its_proc_cpuinfo() {
    let text =
        std::fs::read_to_string(testdata().join("this-host-vm-amd-epyc-proc-cpuinfo.txt")).unwrap();
    let flags: BTreeSet<&str> = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("flags")
                .and_then(|r| r.trim_start().strip_prefix(':'))
        })
        .unwrap()
        .split_whitespace()
        .collect();
    let vm = present(&load(VM));
    let shown_not_set: Vec<_> = flags
        .iter()
        .filter(|f| features::by_name(f).is_some() && !vm.contains(*f))
        .collect();
    assert!(
        shown_not_set.is_empty(),
        "Linux shows {shown_not_set:?}, not set in the dump"
    );
    // Set but not shown: bits Linux defines without a /proc/cpuinfo name, invariant TSC
    // (shown as constant_tsc + nonstop_tsc) and RDSEED, which this 6.18 kernel clears on
    // Zen 5 (AMD's Zen 5 RDSEED erratum).
    let set_not_shown: Vec<_> = vm.iter().filter(|f| !flags.contains(*f)).copied().collect();
    let expected = [
        "amd_ibpb_ret",
        "amd_psfd",
        "amd_stibp_always_on",
        "invtsc",
        "osxsave",
        "rdseed",
        "shstk",
    ];
    assert_eq!(set_not_shown, expected);
    assert!(
        vm.contains("invtsc") && flags.contains("constant_tsc") && flags.contains("nonstop_tsc")
    );
}

#[test]
fn fingerprints_are_kvm_guests() {
    for x in DUMPS
        .iter()
        .filter(|x| x.file.starts_with("kvm-fingerprints/"))
    {
        let d = load(x.file);
        assert!(has(&d, "hypervisor"), "{}", x.file);
        let kvm = d.get(0x4000_0000, 0).unwrap();
        let sig: Vec<u8> = [kvm.ebx, kvm.ecx, kvm.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&sig[..9], b"KVMKVMKVM", "{}", x.file);
    }
    for x in DUMPS
        .iter()
        .filter(|x| !x.file.starts_with("kvm-fingerprints/") && x.file != VM)
    {
        assert!(!has(&load(x.file), "hypervisor"), "{}: bare metal", x.file);
    }
}
