//! The guest CPUID table: everything a guest sees, computed from the profile and the vCPU
//! count alone, so that the same profile gives bit-identical tables on every host. Topology
//! and cache leaves are synthesized in the style of the profile's vendor; nothing is copied
//! from a host.
//!
//! Per-vCPU fields (initial APIC ID in leaf 1 EBX[31:24], x2APIC ID in leaf 0xB EDX) are 0
//! here and set by [`for_vcpu`].

use crate::features;
use crate::leaf::{Leaf, Reg, Vendor};
use crate::profile::{CpuProfile, KVM_PV_FEATURES};

/// The synthesized cache hierarchy: (level, type, size in KiB, ways), 64-byte lines.
/// Type: 1 data, 2 instruction, 3 unified.
const CACHES: &[(u32, u32, u32, u32)] = &[
    (1, 1, 32, 8),
    (1, 2, 32, 8),
    (2, 3, 1024, 16),
    (3, 3, 16 * 1024, 16),
];
const LINE: u32 = 64;

/// Encodes family/model/stepping into a leaf-1 EAX signature (inverse of decoding).
pub fn encode_signature(family: u32, model: u32, stepping: u32) -> u32 {
    let (base_family, ext_family) = if family > 0xf {
        (0xf, family - 0xf)
    } else {
        (family, 0)
    };
    let (base_model, ext_model) = if base_family == 0x6 || base_family == 0xf {
        (model & 0xf, (model >> 4) & 0xf)
    } else {
        (model & 0xf, 0)
    };
    (ext_family << 20)
        | (ext_model << 16)
        | (base_family << 8)
        | (base_model << 4)
        | (stepping & 0xf)
}

fn bits_for(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> Leaf {
    Leaf {
        function,
        index,
        eax,
        ebx,
        ecx,
        edx,
    }
}

fn str_regs(s: &[u8; 12]) -> (u32, u32, u32) {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    (w(0), w(4), w(8))
}

/// Sets every profile feature's bit in the table (its leaf must exist).
fn set_features(table: &mut [Leaf], p: &CpuProfile) {
    for name in &p.features {
        let Some(f) = features::by_name(name) else {
            continue;
        };
        if let Some(l) = table
            .iter_mut()
            .find(|l| l.function == f.function && l.index == f.index)
        {
            *l.reg_mut(f.reg) |= 1 << f.bit;
        }
    }
}

/// The guest CPUID table for `vcpus` vCPUs, sorted by (function, index).
pub fn guest_table(p: &CpuProfile, vcpus: u32) -> Vec<Leaf> {
    let vcpus = vcpus.max(1);
    let mut t = Vec::new();
    basic_leaves(p, vcpus, &mut t);
    let pv = p
        .kvm_pv
        .iter()
        .filter_map(|n| KVM_PV_FEATURES.iter().find(|(k, _)| k == n))
        .fold(0u32, |a, (_, b)| a | (1 << b));
    let (k_ebx, k_ecx, k_edx) = str_regs(b"KVMKVMKVM\0\0\0");
    t.push(leaf(0x4000_0000, 0, 0x4000_0001, k_ebx, k_ecx, k_edx));
    t.push(leaf(0x4000_0001, 0, pv, 0, 0, 0));
    for function in 0x8000_0000..=p.max_ext_leaf {
        t.push(extended_leaf(p, vcpus, function));
    }
    set_features(&mut t, p);
    t.sort_by_key(|l| (l.function, l.index));
    t
}

/// The identity's vendor string as (EBX, EDX, ECX).
fn vendor_regs(p: &CpuProfile) -> (u32, u32, u32) {
    str_regs(match p.identity.vendor {
        Vendor::Intel => b"GenuineIntel",
        Vendor::Amd => b"AuthenticAMD",
    })
}

/// Leaves 0 to the profile's max: identity, topology, caches, XSAVE; features come later.
fn basic_leaves(p: &CpuProfile, vcpus: u32, t: &mut Vec<Leaf>) {
    let intel = p.identity.vendor == Vendor::Intel;
    let (v_ebx, v_edx, v_ecx) = vendor_regs(p);
    let sig = encode_signature(p.identity.family, p.identity.model, p.identity.stepping);
    let logical = 1u32 << bits_for(vcpus);
    for function in 0..=p.max_leaf {
        match function {
            0 => t.push(leaf(0, 0, p.max_leaf, v_ebx, v_ecx, v_edx)),
            1 => {
                let htt = if vcpus > 1 { 1 << 28 } else { 0 };
                let ebx = (logical.min(255) << 16) | ((LINE / 8) << 8);
                t.push(leaf(1, 0, sig, ebx, 1 << 31, htt));
            }
            // Descriptor 0xFF: "no cache descriptors here, use leaf 4".
            2 if intel => t.push(leaf(2, 0, 0x0000_ff01, 0, 0, 0)),
            4 if intel => cache_leaves(logical, t),
            // ARAT: the APIC timer keeps running in deep C-states (KVM always emulates it).
            6 => t.push(leaf(6, 0, 1 << 2, 0, 0, 0)),
            7 => {
                let has_sub1 = p
                    .features
                    .iter()
                    .any(|n| features::by_name(n).is_some_and(|f| f.function == 7 && f.index == 1));
                t.push(leaf(7, 0, u32::from(has_sub1), 0, 0, 0));
                if has_sub1 {
                    t.push(leaf(7, 1, 0, 0, 0, 0));
                }
            }
            0xb => {
                let shift = bits_for(vcpus);
                t.push(leaf(0xb, 0, 0, 1, 1 << 8, 0));
                t.push(leaf(0xb, 1, shift, vcpus, (2 << 8) | 1, 0));
                t.push(leaf(0xb, 2, 0, 0, 2, 0));
            }
            0xd => xsave_leaves(p, t),
            f => t.push(leaf(f, 0, 0, 0, 0, 0)),
        }
    }
}

/// Leaf 4 (Intel): the synthesized caches, the L3 shared by all `logical` vCPUs.
fn cache_leaves(logical: u32, t: &mut Vec<Leaf>) {
    for (i, (level, kind, kib, ways)) in CACHES.iter().enumerate() {
        let sets = kib * 1024 / (ways * LINE);
        let sharing = if *level == 3 { logical } else { 1 };
        let eax = ((logical - 1) << 26) | ((sharing - 1) << 14) | (1 << 8) | (level << 5) | kind;
        t.push(leaf(
            4,
            i as u32,
            eax,
            ((ways - 1) << 22) | (LINE - 1),
            sets - 1,
            0,
        ));
    }
    t.push(leaf(4, CACHES.len() as u32, 0, 0, 0, 0));
}

/// One extended leaf (0x8000_0000 on): vendor, brand, AMD caches, invariant TSC, address
/// sizes.
fn extended_leaf(p: &CpuProfile, vcpus: u32, function: u32) -> Leaf {
    let intel = p.identity.vendor == Vendor::Intel;
    let (v_ebx, v_edx, v_ecx) = vendor_regs(p);
    let sig = encode_signature(p.identity.family, p.identity.model, p.identity.stepping);
    match function {
        0x8000_0000 if intel => leaf(function, 0, p.max_ext_leaf, 0, 0, 0),
        0x8000_0000 => leaf(function, 0, p.max_ext_leaf, v_ebx, v_ecx, v_edx),
        0x8000_0001 => leaf(function, 0, if intel { 0 } else { sig }, 0, 0, 0),
        0x8000_0002..=0x8000_0004 => {
            let brand = brand_regs(&p.identity.brand);
            let i = (function - 0x8000_0002) as usize * 4;
            leaf(
                function,
                0,
                brand[i],
                brand[i + 1],
                brand[i + 2],
                brand[i + 3],
            )
        }
        // AMD L1 caches: size KiB << 24 | ways << 16 | lines per tag << 8 | line size.
        0x8000_0005 if !intel => {
            let l1 = (32 << 24) | (8 << 16) | (1 << 8) | LINE;
            leaf(function, 0, 0, 0, l1, l1)
        }
        // L2: size KiB << 16 | associativity code (0x8: 16-way) << 12 | line size; AMD
        // also L3 in EDX: size / 512 KiB << 18 | code << 12 | line size.
        0x8000_0006 => {
            let l2 = (1024 << 16) | (0x8 << 12) | (1 << 8) | LINE;
            let l3 = if intel {
                0
            } else {
                ((16 * 1024 / 512) << 18) | (0x8 << 12) | (1 << 8) | LINE
            };
            leaf(function, 0, 0, 0, l2, l3)
        }
        0x8000_0007 => leaf(function, 0, 0, 0, 0, if p.invtsc { 1 << 8 } else { 0 }),
        0x8000_0008 => {
            let ecx = if intel {
                0
            } else {
                (bits_for(vcpus) << 12) | (vcpus - 1)
            };
            leaf(function, 0, p.phys_bits | (p.virt_bits << 8), 0, ecx, 0)
        }
        f => leaf(f, 0, 0, 0, 0, 0),
    }
}

fn xsave_leaves(p: &CpuProfile, t: &mut Vec<Leaf>) {
    if !p.has("xsave") {
        t.push(leaf(0xd, 0, 0, 0, 0, 0));
        t.push(leaf(0xd, 1, 0, 0, 0, 0));
        return;
    }
    let mask = p.xsave.iter().fold(0x3u64, |m, c| m | (1 << c.index));
    let size = p
        .xsave
        .iter()
        .map(|c| c.offset + c.size)
        .max()
        .unwrap_or(512 + 64)
        .max(512 + 64);
    t.push(leaf(0xd, 0, mask as u32, size, size, (mask >> 32) as u32));
    t.push(leaf(0xd, 1, 0, 0, 0, 0));
    for c in &p.xsave {
        t.push(leaf(0xd, c.index, c.size, c.offset, 0, 0));
    }
}

fn brand_regs(brand: &str) -> [u32; 12] {
    let mut b = [0u8; 48];
    for (i, c) in brand.bytes().take(47).enumerate() {
        b[i] = c;
    }
    let mut r = [0u32; 12];
    for (i, w) in r.iter_mut().enumerate() {
        *w = u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    }
    r
}

/// The table of vCPU `id`: its APIC IDs filled in.
pub fn for_vcpu(table: &[Leaf], id: u32) -> Vec<Leaf> {
    let mut t = table.to_vec();
    for l in &mut t {
        match l.function {
            1 => l.ebx = (l.ebx & 0x00ff_ffff) | ((id & 0xff) << 24),
            0xb | 0x1f => l.edx = id,
            _ => {}
        }
    }
    t
}

/// How two tables differ: feature names (`+name` set only in the second, `-name` only in the
/// first) and the (function, index, register) of every other differing register.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableDiff {
    pub features: Vec<String>,
    pub registers: Vec<(u32, u32, Reg)>,
}

impl TableDiff {
    pub fn is_empty(&self) -> bool {
        self.features.is_empty() && self.registers.is_empty()
    }
}

/// How table `b` differs from table `a`.
pub fn diff(a: &[Leaf], b: &[Leaf]) -> TableDiff {
    let get = |t: &[Leaf], f: u32, i: u32| {
        t.iter()
            .find(|l| l.function == f && l.index == i)
            .copied()
            .unwrap_or_default()
    };
    let mut names = Vec::new();
    let mut regs = Vec::new();
    let mut keys: Vec<(u32, u32)> = a.iter().chain(b).map(|l| (l.function, l.index)).collect();
    keys.sort();
    keys.dedup();
    for (f, i) in keys {
        let (la, lb) = (get(a, f, i), get(b, f, i));
        for r in [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx] {
            let (va, vb) = (la.reg(r), lb.reg(r));
            if va == vb {
                continue;
            }
            let mut rest = va ^ vb;
            for feat in features::CATALOGUE
                .iter()
                .filter(|x| x.function == f && x.index == i && x.reg == r)
            {
                let bit = 1u32 << feat.bit;
                if rest & bit != 0 {
                    names.push(format!(
                        "{}{}",
                        if vb & bit != 0 { '+' } else { '-' },
                        feat.name
                    ));
                    rest &= !bit;
                }
            }
            if rest != 0 {
                regs.push((f, i, r));
            }
        }
    }
    TableDiff {
        features: names,
        registers: regs,
    }
}
