//! Per-vCPU setup before the first KVM_RUN: CPUID (with this vCPU's APIC ID), FPU, the local
//! APIC's LINT pins, and the boot vCPU's registers.
//!
//! The CPUID table here is the host's supported set with per-vCPU identity filled in; the
//! normalized, migratable CPU model (cpuid crate) replaces it in a later step.

use kvm_bindings::{kvm_fpu, kvm_mp_state, CpuId, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryBackend;

use crate::boot::{regs, EntryPoint};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vcpu{vcpu}: {op} failed: {source}")]
    Ioctl {
        vcpu: u32,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot write the boot page tables: {0}")]
    Tables(vm_memory::GuestMemoryError),
}

fn ioctl(vcpu: u32, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Ioctl { vcpu, op, source }
}

/// KVM's paravirtual feature leaf (EAX: feature bits).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM paravirtual features that work by hypercall (VMCALL/VMMCALL): PV_UNHALT (bit 7,
/// kick a halted vCPU), PV_SEND_IPI (bit 11) and PV_SCHED_YIELD (bit 13). ferry hides them:
/// on KVM hosts that emulate guest ring 0 the hypercall never completes (a guest with two
/// vCPUs hangs in its first PV IPI), and the guest falls back to plain APIC IPIs and HLT,
/// which every host runs. The hypercall instruction is also vendor-specific, one more thing
/// that a guest moved to the other vendor would depend on.
pub const KVM_PV_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);

/// Leaf 1 EBX[31:24]: initial APIC ID. Leaf 0xB/0x1F EDX: x2APIC ID. Leaf 0x40000001:
/// without the hypercall-based PV features.
pub fn cpuid_for_vcpu(base: &CpuId, id: u32) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => e.edx = id,
            KVM_CPUID_FEATURES => e.eax &= !KVM_PV_HYPERCALL_FEATURES,
            _ => {}
        }
    }
    cpuid
}

/// LAPIC LVT registers (offsets in the APIC page) and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(regs: &mut [libc::c_char], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as libc::c_char;
    }
}

/// Sets up vCPU `id`: CPUID, FPU, LINT0 = ExtINT and LINT1 = NMI (the PC wiring the MP
/// table describes), and, for the boot vCPU or a raw image, the entry registers.
pub fn setup_vcpu<M: GuestMemoryBackend>(
    fd: &VcpuFd,
    id: u32,
    cpuid: &CpuId,
    entry: &EntryPoint,
    mem: &M,
) -> Result<(), Error> {
    fd.set_cpuid2(&cpuid_for_vcpu(cpuid, id))
        .map_err(ioctl(id, "KVM_SET_CPUID2"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(ioctl(id, "KVM_SET_FPU"))?;
    let mut lapic = fd.get_lapic().map_err(ioctl(id, "KVM_GET_LAPIC"))?;
    set_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic).map_err(ioctl(id, "KVM_SET_LAPIC"))?;

    // A Linux guest starts its other vCPUs itself (INIT/SIPI); a raw image runs on all.
    let raw = matches!(entry, EntryPoint::Real { .. } | EntryPoint::Long64 { .. });
    if id == 0 || raw {
        if id == 0 {
            regs::write_tables(mem, entry).map_err(Error::Tables)?;
        }
        let mut sregs = fd.get_sregs().map_err(ioctl(id, "KVM_GET_SREGS"))?;
        regs::setup_sregs(&mut sregs, entry);
        fd.set_sregs(&sregs).map_err(ioctl(id, "KVM_SET_SREGS"))?;
        let mut r = regs::setup_regs(entry);
        // Raw images learn which vCPU they are from rdi (also in CPUID leaf 1).
        r.rdi = u64::from(id);
        fd.set_regs(&r).map_err(ioctl(id, "KVM_SET_REGS"))?;
        if id != 0 {
            let mp = kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            };
            fd.set_mp_state(mp).map_err(ioctl(id, "KVM_SET_MP_STATE"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_ids_are_per_vcpu() {
        let base = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0012_3456,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 0,
                ..Default::default()
            },
        ])
        .unwrap();
        let c = cpuid_for_vcpu(&base, 3);
        assert_eq!(c.as_slice()[0].ebx, 0x0312_3456);
        assert_eq!(c.as_slice()[1].edx, 3);
        let pv = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: KVM_CPUID_FEATURES,
            eax: 0xffff_ffff,
            ..Default::default()
        }])
        .unwrap();
        let eax = cpuid_for_vcpu(&pv, 0).as_slice()[0].eax;
        assert_eq!(eax & KVM_PV_HYPERCALL_FEATURES, 0);
        assert_eq!(eax | KVM_PV_HYPERCALL_FEATURES, 0xffff_ffff);
    }

    #[test]
    fn lint_delivery_modes() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT0 + 1] = 0x07; // some other mode bits set
        set_delivery_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_delivery_mode(&mut regs, APIC_LVT1, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT1 + 1] as u8, 0x04);
    }
}
