use super::*;
use crate::leaf::Leaf;

#[test]
fn names_are_unique_and_well_formed() {
    let mut seen = BTreeSet::new();
    for f in CATALOGUE {
        assert!(seen.insert(f.name), "duplicate name {}", f.name);
        assert!(
            !f.name.is_empty()
                && f.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "bad name {:?}",
            f.name
        );
        assert!(f.bit < 32, "{}: bit {}", f.name, f.bit);
    }
}

#[test]
fn no_two_entries_share_a_bit() {
    let mut seen = BTreeSet::new();
    for f in CATALOGUE {
        assert!(
            seen.insert((f.function, f.index, f.reg, f.bit)),
            "{} reuses a bit",
            f.name
        );
    }
}

#[test]
fn by_name_round_trips() {
    for f in CATALOGUE {
        assert_eq!(by_name(f.name), Some(f));
    }
    assert!(
        by_name("constant_tsc").is_none(),
        "synthetic flags are not catalogued"
    );
    assert!(by_name("").is_none());
}

#[test]
fn amd_leaf_1_edx_aliases_are_not_listed() {
    for bit in [
        0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 23, 24,
    ] {
        assert!(
            !CATALOGUE
                .iter()
                .any(|f| f.function == 0x8000_0001 && f.reg == Edx && f.bit == bit),
            "0x80000001 EDX[{bit}] is an alias of leaf 1 EDX"
        );
    }
}

fn dump(leaves: Vec<Leaf>) -> CpuidDump {
    CpuidDump::new("t", leaves)
}

const INTEL0: Leaf = Leaf {
    function: 0,
    index: 0,
    eax: 7,
    ebx: 0x756e_6547,
    ecx: 0x6c65_746e,
    edx: 0x4965_6e69,
};

#[test]
fn is_set_respects_max_leaf() {
    let sse3 = by_name("pni").unwrap();
    let avx2 = by_name("avx2").unwrap();
    let lahf = by_name("lahf_lm").unwrap();
    let l1 = Leaf {
        function: 1,
        ecx: 1,
        ..Default::default()
    };
    let l7 = Leaf {
        function: 7,
        ebx: 1 << 5,
        ..Default::default()
    };
    let e1 = Leaf {
        function: 0x8000_0001,
        ecx: 1,
        ..Default::default()
    };
    // Leaf 7 beyond max leaf 5: not set, though the (garbage) leaf is there.
    let d = dump(vec![Leaf { eax: 5, ..INTEL0 }, l1, l7, e1]);
    assert!(sse3.is_set(&d));
    assert!(!avx2.is_set(&d));
    // No 0x8000_0000 leaf: no extended features.
    assert!(!lahf.is_set(&d));
    let d = dump(vec![
        INTEL0,
        l1,
        l7,
        e1,
        Leaf {
            function: 0x8000_0000,
            eax: 0x8000_0001,
            ..Default::default()
        },
    ]);
    assert!(avx2.is_set(&d) && lahf.is_set(&d));
    assert_eq!(
        present(&d),
        ["avx2", "lahf_lm", "pni"].into_iter().collect()
    );
    // Missing leaves: nothing, and no panic.
    assert!(present(&CpuidDump::default()).is_empty());
}

#[test]
fn syscall_on_intel_follows_long_mode() {
    let ext0 = Leaf {
        function: 0x8000_0000,
        eax: 0x8000_0008,
        ..Default::default()
    };
    let lm_only = Leaf {
        function: 0x8000_0001,
        edx: 1 << 29,
        ..Default::default()
    };
    let intel = dump(vec![INTEL0, ext0, lm_only]);
    assert!(SYSCALL.is_set(&intel));
    let amd0 = Leaf {
        ebx: 0x6874_7541,
        ecx: 0x444d_4163,
        edx: 0x6974_6e65,
        ..INTEL0
    };
    let amd = dump(vec![amd0, ext0, lm_only]);
    assert!(!SYSCALL.is_set(&amd), "AMD reports SYSCALL in every mode");
    let no_lm = dump(vec![
        INTEL0,
        ext0,
        Leaf {
            function: 0x8000_0001,
            ..Default::default()
        },
    ]);
    assert!(!SYSCALL.is_set(&no_lm));
}
