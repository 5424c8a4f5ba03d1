//! XSAVE state between KVM's standard-format area and the migration crate's components: 0 =
//! bytes 0..160 of the legacy area (x87 control, MXCSR, ST0-7), 1 = bytes 160..416
//! (XMM0-15), and every other component the bytes at the offset and size this host's CPUID
//! leaf 0xD gives. Restore lays them out at this host's offsets, which may differ from the
//! saving host's (AVX-512 and PKRU differ between vendors).

use cpuid::CpuidDump;
use kvm_bindings::kvm_xsave;
use migration::{Xsave, XsaveComponent};

/// A saved component that does not fit this host's layout.
#[derive(Debug, thiserror::Error)]
#[error("XSAVE component {index} ({len} bytes) does not fit this host's layout: {why}")]
pub struct Misfit {
    pub index: u32,
    pub len: usize,
    pub why: String,
}

/// (offset, size) of XSAVE component `i` in this host's standard-format XSAVE area.
fn layout(host: &CpuidDump, i: u32) -> Option<(usize, usize)> {
    match i {
        0 => Some((0, 160)),
        1 => Some((160, 256)),
        // A supervisor component (ECX bit 0) has no standard-format offset (EBX is 0): it
        // lives only in the compacted format, which ferry does not carry.
        _ => host
            .get(0xd, i)
            .filter(|l| l.eax != 0 && l.ecx & 1 == 0)
            .map(|l| (l.ebx as usize, l.eax as usize)),
    }
}

fn xsave_bytes(x: &kvm_xsave) -> Vec<u8> {
    x.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

pub fn xsave_out(x: &kvm_xsave, host: &CpuidDump) -> Xsave {
    let b = xsave_bytes(x);
    let xstate_bv = u64::from_le_bytes(b[512..520].try_into().expect("8 bytes"));
    let mut components = Vec::new();
    for i in 0..64u32 {
        if i >= 2 && xstate_bv & (1 << i) == 0 {
            continue;
        }
        if let Some((off, size)) = layout(host, i) {
            if off + size <= b.len() {
                components.push(XsaveComponent {
                    index: i,
                    bytes: b[off..off + size].to_vec(),
                });
            }
        }
    }
    Xsave {
        xstate_bv,
        components,
    }
}

/// The XSAVE components a guest of `profile` can hold state in: x87, SSE, the profile's
/// components, and PKRU where it offers `pku` (RDPKRU/WRPKRU need CR4.PKE, which KVM lets a
/// guest set only then).
pub fn guest_xsave_mask(profile: &cpuid::profile::CpuProfile) -> u64 {
    let mut m = 0b11 | profile.xsave.iter().fold(0u64, |m, c| m | (1 << c.index));
    if profile.has("pku") {
        m |= 1 << 9;
    }
    m
}

/// Lays the neutral XSAVE state out at this host's offsets. A component outside `guest`
/// (see [`guest_xsave_mask`]) that this host lacks is dropped and marked initial: the saving
/// host's KVM hands out state the guest cannot use (PKRU, on every host with PKU), and it
/// must not keep the guest from a host without it. One inside `guest` is an error.
pub fn xsave_in(vcpu: u32, x: &Xsave, host: &CpuidDump, guest: u64) -> Result<kvm_xsave, Misfit> {
    let mut b = vec![0u8; 4096];
    let mut xstate_bv = x.xstate_bv;
    for c in &x.components {
        let bad = |why: String| Misfit {
            index: c.index,
            len: c.bytes.len(),
            why,
        };
        let usable = guest & 1u64.checked_shl(c.index).unwrap_or(0) != 0;
        let Some((off, size)) = layout(host, c.index) else {
            if usable {
                return Err(bad("not supported".into()));
            }
            log::debug!("vcpu{vcpu}: XSAVE component {} dropped: the guest cannot use it and this host lacks it", c.index);
            xstate_bv &= !1u64.checked_shl(c.index).unwrap_or(0);
            continue;
        };
        if c.bytes.len() != size || off + size > b.len() {
            return Err(bad(format!(
                "this host's component is {size} bytes at offset {off}"
            )));
        }
        b[off..off + size].copy_from_slice(&c.bytes);
    }
    b[512..520].copy_from_slice(&xstate_bv.to_le_bytes());
    let mut k = kvm_xsave::default();
    for (w, chunk) in k.region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(name: &str) -> CpuidDump {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../cpuid/testdata")
            .join(name);
        cpuid::dump::load(&p).unwrap()
    }

    /// An XSAVE area in `host`'s layout with a distinct byte pattern in each component.
    fn area(host: &CpuidDump, comps: &[u32]) -> kvm_xsave {
        let mut b = vec![0u8; 4096];
        for &i in comps {
            let (off, size) = layout(host, i).unwrap();
            for (k, x) in b[off..off + size].iter_mut().enumerate() {
                *x = (i as u8).wrapping_mul(37).wrapping_add(k as u8) | 1;
            }
        }
        let bv: u64 = comps.iter().fold(0, |m, i| m | (1 << i));
        b[512..520].copy_from_slice(&bv.to_le_bytes());
        let mut k = kvm_xsave::default();
        for (w, c) in k.region.iter_mut().zip(b.chunks_exact(4)) {
            *w = u32::from_le_bytes(c.try_into().unwrap());
        }
        k
    }

    #[test]
    fn xsave_moves_from_sapphire_rapids_layout_to_genoa_and_back_unchanged() {
        let spr = dump("intel-xeon-w7-2475x-sapphirerapids-instlatx64.txt");
        let genoa = dump("amd-epyc-9124-genoa-instlatx64.txt");
        // x87, SSE, AVX, AVX-512 opmask/ZMM_Hi256/Hi16_ZMM, PKRU: the last four sit at other
        // offsets on the two hosts.
        let comps = [0, 1, 2, 5, 6, 7, 9];
        assert_ne!(
            layout(&spr, 5),
            layout(&genoa, 5),
            "the test needs layouts that differ"
        );
        assert_ne!(layout(&spr, 9), layout(&genoa, 9));
        let original = area(&spr, &comps);
        let neutral = xsave_out(&original, &spr);
        assert_eq!(
            neutral
                .components
                .iter()
                .map(|c| c.index)
                .collect::<Vec<_>>(),
            comps
        );

        let on_genoa = xsave_in(0, &neutral, &genoa, !0).unwrap();
        assert_eq!(
            xsave_bytes(&on_genoa),
            xsave_bytes(&area(&genoa, &comps)),
            "Genoa's layout"
        );
        let back = xsave_in(0, &xsave_out(&on_genoa, &genoa), &spr, !0).unwrap();
        assert_eq!(
            xsave_bytes(&back),
            xsave_bytes(&original),
            "back on Sapphire Rapids"
        );
    }

    #[test]
    fn a_component_the_destination_lacks_is_an_error() {
        let spr = dump("intel-xeon-w7-2475x-sapphirerapids-instlatx64.txt");
        let milan = dump("amd-epyc-7763-milan-instlatx64.txt"); // no AVX-512
        let neutral = xsave_out(&area(&spr, &[0, 1, 2, 5]), &spr);
        let e = xsave_in(3, &neutral, &milan, !0).unwrap_err().to_string();
        assert!(
            e.contains("component 5") && e.contains("not supported"),
            "{e}"
        );
    }

    #[test]
    fn state_the_guest_cannot_use_does_not_keep_it_from_a_host_without_it() {
        // Saved on a host with PKU (KVM hands out PKRU whatever the guest's CPUID), restored
        // on one without any XSAVE leaf: PKRU is dropped for a guest without pku.
        let spr = dump("intel-xeon-w7-2475x-sapphirerapids-instlatx64.txt");
        let old = dump("intel-xeon-e5462-harpertown-instlatx64.txt");
        let neutral = xsave_out(&area(&spr, &[0, 1, 9]), &spr);
        assert_eq!(neutral.xstate_bv, 0b10_0000_0011);
        let k = xsave_in(0, &neutral, &old, 0b11).unwrap();
        let b = xsave_bytes(&k);
        assert_eq!(b[512..520], 0b11u64.to_le_bytes(), "PKRU marked initial");
        assert_eq!(
            b[..416],
            xsave_bytes(&area(&spr, &[0, 1]))[..416],
            "x87 and SSE kept"
        );
        let e = xsave_in(0, &neutral, &old, 0b10_0000_0011)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("component 9") && e.contains("not supported"),
            "{e}"
        );
    }
}
