//! Per-vCPU setup before the first KVM_RUN of a booted (not restored) machine, after the
//! builder has set its CPUID: FPU, the local APIC's LINT pins, and the boot vCPU's registers.

use kvm_bindings::{kvm_fpu, kvm_mp_state, KVM_MP_STATE_RUNNABLE};
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

/// Sets up vCPU `id`: FPU, LINT0 = ExtINT and LINT1 = NMI (the PC wiring the MP table
/// describes), and, for the boot vCPU or a raw image, the entry registers.
pub fn setup_vcpu<M: GuestMemoryBackend>(
    fd: &VcpuFd,
    id: u32,
    entry: &EntryPoint,
    mem: &M,
) -> Result<(), Error> {
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
