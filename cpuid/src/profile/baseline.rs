//! The common profile of several hosts ([`baseline`]): what every one of them can run.

use std::collections::BTreeSet;

use super::*;

/// The common profile of `hosts`: a feature is kept only if every host has it and it means
/// the same on every host's vendor and on the identity's vendor; the smallest address sizes;
/// the XSAVE components every host lays out identically; topology and caches are left to the
/// guest table (synthesized). The identity is the first host's, or the first host of
/// `vendor` when given.
pub fn baseline(
    name: &str,
    hosts: &[CpuidDump],
    vendor: Option<Vendor>,
) -> Result<CpuProfile, Error> {
    let first = hosts.first().ok_or(Error::NoHosts)?;
    let mut vendors = BTreeSet::new();
    for h in hosts {
        vendors.insert(vendor_of(h)?);
    }
    let id_host = match vendor {
        None => first,
        Some(v) => hosts
            .iter()
            .find(|h| h.vendor() == Some(v))
            .ok_or(Error::NoHostOfVendor(v))?,
    };
    let id_vendor = vendor_of(id_host)?;
    vendors.insert(id_vendor);
    let (family, model, stepping) = decode_signature(id_host.get(1, 0).map(|l| l.eax).unwrap_or(0));

    let mut features = common_features(hosts, &vendors);
    let xsave = if features.contains("xsave") {
        common_xsave(hosts, first)
    } else {
        Vec::new()
    };
    drop_features_without_state(&mut features, &xsave);

    let max_leaf = hosts.iter().map(|h| max_leaves(h).0).min().unwrap_or(0);
    let max_ext_leaf = hosts
        .iter()
        .map(|h| max_leaves(h).1)
        .min()
        .unwrap_or(0x8000_0000);
    let phys_bits = hosts.iter().map(|h| address_bits(h).0).min().unwrap_or(36);
    let virt_bits = hosts.iter().map(|h| address_bits(h).1).min().unwrap_or(48);
    Ok(CpuProfile {
        format: FORMAT.into(),
        version: VERSION,
        name: name.into(),
        identity: Identity {
            vendor: id_vendor,
            family,
            model,
            stepping,
            brand: brand_string(id_host),
        },
        features,
        // Leaves the guest table synthesizes must exist: Intel-style topology (0xB) and
        // cache (4) leaves, and 0xD when there is XSAVE state.
        max_leaf: needed_max_leaf(max_leaf, id_vendor, !xsave.is_empty()),
        max_ext_leaf: max_ext_leaf.max(0x8000_0008),
        phys_bits,
        virt_bits,
        xsave,
        kvm_pv: default_kvm_pv(),
        invtsc: hosts.iter().all(invtsc),
        migratable: true,
    })
}

/// The features every host has, not hidden, meaning the same on every vendor involved.
fn common_features(hosts: &[CpuidDump], vendors: &BTreeSet<Vendor>) -> BTreeSet<String> {
    let mut common: Option<BTreeSet<&'static str>> = None;
    for h in hosts {
        let p = features::present(h);
        common = Some(match common {
            None => p,
            Some(c) => c.intersection(&p).copied().collect(),
        });
    }
    common
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !HIDDEN.iter().any(|(h, _)| h == n))
        .filter(|n| {
            let f = features::by_name(n).expect("present() yields catalogue names");
            vendors.iter().all(|v| match f.vendors {
                Vendors::Both => true,
                Vendors::Intel => *v == Vendor::Intel,
                Vendors::Amd => *v == Vendor::Amd,
            })
        })
        .map(str::to_string)
        .collect()
}

/// The XSAVE components every host lays out as the first one does, within the area KVM
/// hands out.
fn common_xsave(hosts: &[CpuidDump], first: &CpuidDump) -> Vec<XsaveComponent> {
    xsave_components(first)
        .into_iter()
        .filter(|c| c.offset + c.size <= XSAVE_AREA_MAX)
        .filter(|c| hosts.iter().all(|h| xsave_components(h).contains(c)))
        .collect()
}

/// The max basic leaf a profile needs for the leaves the guest table synthesizes.
pub fn needed_max_leaf(common: u32, vendor: Vendor, xsave: bool) -> u32 {
    let mut m = common;
    if vendor == Vendor::Intel {
        m = m.max(0xb);
    }
    if xsave {
        m = m.max(0xd);
    }
    m
}

/// Features whose register state lives in an XSAVE component the profile does not allow.
pub fn drop_features_without_state(features: &mut BTreeSet<String>, xsave: &[XsaveComponent]) {
    let has = |i: u32| xsave.iter().any(|c| c.index == i);
    let needs: &[(&str, &[u32])] = &[
        ("avx", &[2]),
        ("avx2", &[2]),
        ("fma", &[2]),
        ("f16c", &[2]),
        ("vaes", &[2]),
        ("vpclmulqdq", &[2]),
        ("avx_vnni", &[2]),
        ("avx512f", &[5, 6, 7]),
        ("pku", &[9]),
        ("amx_tile", &[17, 18]),
        ("amx_int8", &[17, 18]),
        ("amx_bf16", &[17, 18]),
        ("amx_fp16", &[17, 18]),
    ];
    for (f, comps) in needs {
        if !comps.iter().all(|c| has(*c)) {
            features.remove(*f);
        }
    }
    if !features.contains("avx512f") {
        features.retain(|f| !f.starts_with("avx512"));
    }
    if !features.contains("xsave") {
        for f in ["xsaveopt", "xsavec", "xgetbv1", "xsaves"] {
            features.remove(f);
        }
    }
}
