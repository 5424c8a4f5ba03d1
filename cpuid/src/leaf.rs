//! CPUID leaves and a CPU's whole CPUID in one neutral form.

use serde::{Deserialize, Serialize};

/// One CPUID answer: inputs (function = EAX in, index = ECX in) and the four outputs.
/// For functions without subleaves the index is 0.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Leaf {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl Leaf {
    /// The value of one output register.
    pub fn reg(&self, r: Reg) -> u32 {
        match r {
            Reg::Eax => self.eax,
            Reg::Ebx => self.ebx,
            Reg::Ecx => self.ecx,
            Reg::Edx => self.edx,
        }
    }

    /// A mutable output register.
    pub fn reg_mut(&mut self, r: Reg) -> &mut u32 {
        match r {
            Reg::Eax => &mut self.eax,
            Reg::Ebx => &mut self.ebx,
            Reg::Ecx => &mut self.ecx,
            Reg::Edx => &mut self.edx,
        }
    }
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// The two x86 vendors ferry moves guests between.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    Intel,
    Amd,
}

impl Vendor {
    /// The 12-byte vendor string of leaf 0 (EBX, EDX, ECX).
    pub fn id_string(self) -> &'static str {
        match self {
            Vendor::Intel => "GenuineIntel",
            Vendor::Amd => "AuthenticAMD",
        }
    }

    /// The vendor named by a leaf-0 vendor string, if it is one of ours.
    pub fn from_id_string(s: &str) -> Option<Vendor> {
        match s {
            "GenuineIntel" => Some(Vendor::Intel),
            "AuthenticAMD" => Some(Vendor::Amd),
            _ => None,
        }
    }
}

/// A CPU's CPUID: every leaf and subleaf a dump or the live host gave, sorted by
/// (function, index), no duplicates. `source` says where it came from (a file name, "host").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidDump {
    pub source: String,
    pub leaves: Vec<Leaf>,
}

impl CpuidDump {
    /// Builds a dump from leaves in any order; a later duplicate of (function, index)
    /// replaces an earlier one.
    pub fn new(source: impl Into<String>, mut leaves: Vec<Leaf>) -> Self {
        leaves.reverse();
        leaves.sort_by_key(|l| (l.function, l.index));
        leaves.dedup_by_key(|l| (l.function, l.index));
        CpuidDump {
            source: source.into(),
            leaves,
        }
    }

    /// The leaf for (function, index), if present.
    pub fn get(&self, function: u32, index: u32) -> Option<&Leaf> {
        self.leaves
            .binary_search_by_key(&(function, index), |l| (l.function, l.index))
            .ok()
            .map(|i| &self.leaves[i])
    }

    /// The leaf-0 vendor string.
    pub fn vendor_string(&self) -> String {
        let Some(l) = self.get(0, 0) else {
            return String::new();
        };
        let mut b = Vec::with_capacity(12);
        for r in [l.ebx, l.edx, l.ecx] {
            b.extend_from_slice(&r.to_le_bytes());
        }
        String::from_utf8_lossy(&b).into_owned()
    }

    /// The vendor, if Intel or AMD.
    pub fn vendor(&self) -> Option<Vendor> {
        Vendor::from_id_string(&self.vendor_string())
    }

    /// (family, model, stepping) from leaf 1 EAX, decoded with the extended fields
    /// (family 0xF adds the extended family; family 6 or 0xF adds the extended model).
    pub fn family_model_stepping(&self) -> Option<(u32, u32, u32)> {
        Some(decode_signature(self.get(1, 0)?.eax))
    }
}

/// Decodes a leaf-1 EAX signature into (family, model, stepping).
pub fn decode_signature(eax: u32) -> (u32, u32, u32) {
    let stepping = eax & 0xf;
    let base_model = (eax >> 4) & 0xf;
    let base_family = (eax >> 8) & 0xf;
    let ext_model = (eax >> 16) & 0xf;
    let ext_family = (eax >> 20) & 0xff;
    let family = if base_family == 0xf {
        base_family + ext_family
    } else {
        base_family
    };
    let model = if base_family == 0x6 || base_family == 0xf {
        (ext_model << 4) | base_model
    } else {
        base_model
    };
    (family, model, stepping)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_decode() {
        assert_eq!(decode_signature(0x0001_0676), (6, 0x17, 6)); // Xeon E5420
        assert_eq!(decode_signature(0x0010_0F42), (0x10, 4, 2)); // Opteron 2378
        assert_eq!(decode_signature(0x00B0_0F21), (0x1A, 2, 1)); // Turin
    }

    #[test]
    fn dump_lookup_and_vendor() {
        let d = CpuidDump::new(
            "t",
            vec![
                Leaf {
                    function: 1,
                    eax: 0x10676,
                    ..Default::default()
                },
                Leaf {
                    function: 0,
                    eax: 0xa,
                    ebx: 0x756e_6547,
                    ecx: 0x6c65_746e,
                    edx: 0x4965_6e69,
                    ..Default::default()
                },
            ],
        );
        assert_eq!(d.vendor(), Some(Vendor::Intel));
        assert_eq!(d.family_model_stepping(), Some((6, 0x17, 6)));
        assert!(d.get(7, 0).is_none());
    }
}
