//! The CPUID table a guest ran with on the host that saved it (as that host's KVM held it)
//! against the table this host's KVM holds for the same profile: what the guest could
//! notice, and what is only an emulating KVM's doing.
//!
//! ```text
//! identity (vendor string, leaf 1 signature) differs             -> refused
//! feature the profile offers: gone here                          -> refused (the guest saw it)
//! feature the profile hides, forced by the saving host's KVM: gone here -> reported
//! feature the profile hides, forced by this host's KVM          -> reported
//! feature the profile offers, withheld by the saving host's KVM, here -> reported (a
//!   feature that appears cannot break a guest that never saw it)
//! other register bits                                            -> reported
//! ```
//! A KVM that emulates guest ring 0 (kvm_pvm) ORs its host's feature bits into leaves 1, 7
//! and 0xD after KVM_SET_CPUID2: two such hosts of different models or vendors force
//! different sets. A guest that honours its profile does not use what the profile hides.

use crate::features::CATALOGUE;
use crate::leaf::{decode_signature, CpuidDump, Leaf, Reg};

/// The differences between two effective tables of one profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Comparison {
    /// What the guest could notice, one phrase each: refuse the guest.
    pub refused: Vec<String>,
    /// Features the saving host's KVM forced into the table (not in the profile) that this
    /// host's KVM does not.
    pub gone_forced: Vec<&'static str>,
    /// Features this host's KVM forces (not in the profile) that the saving host's did not.
    pub new_forced: Vec<&'static str>,
    /// Features the profile offers that the saving host's KVM withheld and this one gives.
    pub regained: Vec<&'static str>,
    /// Other bits that differ: (function, index, register).
    pub registers: Vec<(u32, u32, Reg)>,
}

impl Comparison {
    /// Whether the two tables are the same.
    pub fn is_empty(&self) -> bool {
        *self == Comparison::default()
    }

    /// The reported (not refused) differences in one line; None if there are none.
    pub fn report(&self) -> Option<String> {
        let mut parts = Vec::new();
        if !self.gone_forced.is_empty() {
            parts.push(format!(
                "forced by the saving host's KVM, not here: {}",
                self.gone_forced.join(" ")
            ));
        }
        if !self.new_forced.is_empty() {
            parts.push(format!(
                "forced by this host's KVM: {}",
                self.new_forced.join(" ")
            ));
        }
        if !self.regained.is_empty() {
            parts.push(format!(
                "offered by the profile, withheld by the saving host's KVM, given here: {}",
                self.regained.join(" ")
            ));
        }
        if !self.registers.is_empty() {
            let regs: Vec<String> = self
                .registers
                .iter()
                .map(|(f, i, r)| format!("{f:#x}.{i}.{r:?}"))
                .collect();
            parts.push(format!("other bits in {}", regs.join(" ")));
        }
        (!parts.is_empty()).then(|| {
            format!(
                "the guest's CPUID differs from the saving host's only where a KVM changed the profile's table (nothing the guest saw is gone): {}",
                parts.join("; ")
            )
        })
    }
}

fn get(t: &[Leaf], function: u32, index: u32) -> Leaf {
    t.iter()
        .find(|l| l.function == function && l.index == index)
        .copied()
        .unwrap_or(Leaf {
            function,
            index,
            ..Default::default()
        })
}

/// Compares `saved` (the table the guest ran with) with `here` (this host's KVM's table for
/// the same profile); `requested` is the profile's own table for vCPU 0, as both hosts
/// asked their KVM for it.
pub fn compare(requested: &[Leaf], saved: &[Leaf], here: &[Leaf]) -> Comparison {
    let mut c = Comparison::default();
    let (s, h) = (
        CpuidDump::new("saved", saved.to_vec()),
        CpuidDump::new("here", here.to_vec()),
    );
    if s.vendor_string() != h.vendor_string() {
        c.refused.push(format!(
            "vendor {} -> {}",
            s.vendor_string(),
            h.vendor_string()
        ));
    }
    let (ss, hs) = (get(saved, 1, 0).eax, get(here, 1, 0).eax);
    if ss != hs {
        let (sf, sm, st) = decode_signature(ss);
        let (hf, hm, ht) = decode_signature(hs);
        c.refused.push(format!(
            "family/model/stepping {sf:#x}/{sm:#x}/{st} -> {hf:#x}/{hm:#x}/{ht}"
        ));
    }
    let r = CpuidDump::new("requested", requested.to_vec());
    for f in CATALOGUE {
        match (f.is_set(&s), f.is_set(&h), f.is_set(&r)) {
            (true, false, true) => c.refused.push(format!(
                "-{} (the profile offers it and the guest saw it; this host's KVM does not give it)",
                f.name
            )),
            (true, false, false) => c.gone_forced.push(f.name),
            (false, true, false) => c.new_forced.push(f.name),
            (false, true, true) => c.regained.push(f.name),
            _ => {}
        }
    }
    c.registers = other_bits(saved, here);
    c
}

/// Registers that differ in bits no catalogued feature names and that are not the identity
/// (leaf 0 EBX/ECX/EDX, leaf 1 EAX: compared above).
fn other_bits(saved: &[Leaf], here: &[Leaf]) -> Vec<(u32, u32, Reg)> {
    let mut keys: Vec<(u32, u32)> = saved
        .iter()
        .chain(here)
        .map(|l| (l.function, l.index))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out = Vec::new();
    for (function, index) in keys {
        let (ls, lh) = (get(saved, function, index), get(here, function, index));
        for reg in [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx] {
            let identity = match (function, index, reg) {
                (0, 0, r) => r != Reg::Eax,
                (1, 0, r) => r == Reg::Eax,
                _ => false,
            };
            let mut bits = ls.reg(reg) ^ lh.reg(reg);
            for f in CATALOGUE
                .iter()
                .filter(|f| f.function == function && f.index == index && f.reg == reg)
            {
                bits &= !(1 << f.bit);
            }
            if bits != 0 && !identity {
                out.push((function, index, reg));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::by_name;

    fn leaf(function: u32, index: u32, r: [u32; 4]) -> Leaf {
        Leaf {
            function,
            index,
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
        }
    }

    /// A small table: GenuineIntel, max leaf 7, family 6 model 0x17, `features` set.
    fn table(vendor: &[u8; 12], features: &[&str]) -> Vec<Leaf> {
        let w = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        let mut t = vec![
            leaf(0, 0, [7, w(0), w(8), w(4)]),
            leaf(1, 0, [0x1_0676, 0, 0, 0]),
            leaf(7, 0, [0; 4]),
        ];
        for name in features {
            let f = by_name(name).unwrap();
            let l = t
                .iter_mut()
                .find(|l| l.function == f.function && l.index == f.index)
                .unwrap();
            *l.reg_mut(f.reg) |= 1 << f.bit;
        }
        t
    }

    const INTEL: &[u8; 12] = b"GenuineIntel";

    #[test]
    fn identical_tables_compare_empty() {
        let t = table(INTEL, &["sse2", "ssse3"]);
        let c = compare(&t, &t, &t);
        assert!(c.is_empty(), "{c:?}");
        assert_eq!(c.report(), None);
    }

    #[test]
    fn a_forced_bit_that_goes_or_comes_is_reported_not_refused() {
        let req = table(INTEL, &["sse2"]);
        // An AMD host's KVM forced avx2; this Intel host's forces rtm instead.
        let saved = table(INTEL, &["sse2", "avx2"]);
        let here = table(INTEL, &["sse2", "rtm"]);
        let c = compare(&req, &saved, &here);
        assert!(c.refused.is_empty(), "{c:?}");
        assert_eq!(c.gone_forced, ["avx2"]);
        assert_eq!(c.new_forced, ["rtm"]);
        let r = c.report().unwrap();
        assert!(r.contains("saving host's KVM, not here: avx2"), "{r}");
        assert!(r.contains("this host's KVM: rtm"), "{r}");
    }

    #[test]
    fn a_feature_the_profile_offers_that_appears_here_is_reported() {
        let req = table(INTEL, &["sse2", "ssse3"]);
        let saved = table(INTEL, &["sse2"]);
        let c = compare(&req, &saved, &req);
        assert!(c.refused.is_empty(), "{c:?}");
        assert_eq!(c.regained, ["ssse3"]);
        assert!(c.report().unwrap().contains("given here: ssse3"));
    }

    #[test]
    fn a_feature_the_profile_offers_that_is_gone_here_is_refused() {
        let req = table(INTEL, &["sse2", "ssse3"]);
        let here = table(INTEL, &["sse2"]);
        let c = compare(&req, &req, &here);
        assert_eq!(c.refused.len(), 1, "{c:?}");
        assert!(c.refused[0].starts_with("-ssse3"), "{c:?}");
    }

    #[test]
    fn another_identity_is_refused() {
        let req = table(INTEL, &["sse2"]);
        let amd = table(b"AuthenticAMD", &["sse2"]);
        let mut other_model = req.clone();
        other_model[1].eax = 0xa1_0f11;
        let c = compare(&req, &req, &amd);
        assert!(c
            .refused
            .iter()
            .any(|r| r.contains("GenuineIntel -> AuthenticAMD")));
        let c = compare(&req, &req, &other_model);
        assert!(
            c.refused
                .iter()
                .any(|r| r.contains("0x6/0x17/6 -> 0x19/0x11/1")),
            "{c:?}"
        );
        assert!(c.registers.is_empty(), "identity is not reported twice");
    }

    #[test]
    fn bits_no_feature_names_are_reported_by_register() {
        let req = table(INTEL, &["sse2"]);
        let mut here = req.clone();
        here[2].eax = 1; // leaf 7.0 EAX: the highest subleaf
        let c = compare(&req, &req, &here);
        assert_eq!(c.registers, [(7, 0, Reg::Eax)]);
        assert!(c.refused.is_empty());
    }
}
