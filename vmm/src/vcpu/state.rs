//! One vCPU's state between KVM and the vendor-neutral form of the migration crate.
//!
//! XSAVE travels as components laid out at each host's offsets (super::xsave).
//! MSRs travel as (index, value) from [`crate::vcpu::msrs::allowlist`], derived from the CPU profile.

use cpuid::CpuidDump;
use kvm_bindings::{
    kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events,
    kvm_xcr, kvm_xcrs, Msrs,
};
use kvm_ioctls::VcpuFd;
use migration::{DebugRegs, DescriptorTable, Regs, Segment, Sregs, VcpuEvents, VcpuState};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vcpu{vcpu}: {op} failed: {source}")]
    Ioctl {
        vcpu: u32,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vcpu{vcpu}: KVM_{op}_MSRS stopped at MSR {msr:#x}{} ({done} of {total} done): this host's KVM does not take it", crate::vcpu::msrs::name(*.msr).map(|n| format!(" ({n})")).unwrap_or_default())]
    MsrCount {
        vcpu: u32,
        op: &'static str,
        msr: u32,
        done: usize,
        total: usize,
    },
    #[error("vcpu{vcpu}: {source}")]
    Xsave {
        vcpu: u32,
        source: super::xsave::Misfit,
    },
    #[error("vcpu{vcpu}: {count} MSRs, more than KVM's list holds")]
    TooManyMsrs { vcpu: u32, count: usize },
    #[error("vcpu{vcpu}: {count} XCRs (at most 16)")]
    TooManyXcrs { vcpu: u32, count: usize },
    #[error("vcpu{vcpu}: LAPIC page of {len} bytes (not 1024)")]
    LapicSize { vcpu: u32, len: usize },
}

impl Error {
    /// What kind of failure this is (docs/api.md, "Error codes"): a state that does not fit
    /// this host's KVM is refused by its CPU; one that does not fit any vCPU is a bad file.
    pub fn code(&self) -> crate::codes::Code {
        use crate::codes::Code;
        match self {
            Error::Ioctl { .. } => Code::Kvm,
            Error::MsrCount { .. } | Error::Xsave { .. } => Code::RefusedCpu,
            Error::TooManyMsrs { .. } | Error::TooManyXcrs { .. } | Error::LapicSize { .. } => {
                Code::BadFile
            }
        }
    }
}

fn seg_out(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
    }
}

fn seg_in(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

fn regs_out(r: &kvm_regs) -> Regs {
    Regs {
        gpr: [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn regs_in(r: &Regs) -> kvm_regs {
    let g = &r.gpr;
    kvm_regs {
        rax: g[0],
        rbx: g[1],
        rcx: g[2],
        rdx: g[3],
        rsi: g[4],
        rdi: g[5],
        rsp: g[6],
        rbp: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn sregs_out(s: &kvm_sregs) -> Sregs {
    Sregs {
        segments: [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt].map(seg_out),
        gdt: DescriptorTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: DescriptorTable {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: s.interrupt_bitmap,
    }
}

fn sregs_in(s: &Sregs) -> kvm_sregs {
    let [cs, ds, es, fs, gs, ss, tr, ldt] = s.segments.each_ref().map(seg_in);
    let mut k = kvm_sregs {
        cs,
        ds,
        es,
        fs,
        gs,
        ss,
        tr,
        ldt,
        ..Default::default()
    };
    k.gdt.base = s.gdt.base;
    k.gdt.limit = s.gdt.limit;
    k.idt.base = s.idt.base;
    k.idt.limit = s.idt.limit;
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k.apic_base = s.apic_base;
    k.interrupt_bitmap = s.interrupt_bitmap;
    k
}

fn events_out(e: &kvm_vcpu_events) -> VcpuEvents {
    VcpuEvents {
        exception_injected: e.exception.injected,
        exception_nr: e.exception.nr,
        exception_has_error_code: e.exception.has_error_code,
        exception_pending: e.exception.pending,
        exception_error_code: e.exception.error_code,
        exception_has_payload: 0,
        exception_payload: 0,
        interrupt_injected: e.interrupt.injected,
        interrupt_nr: e.interrupt.nr,
        interrupt_soft: e.interrupt.soft,
        interrupt_shadow: e.interrupt.shadow,
        nmi_injected: e.nmi.injected,
        nmi_pending: e.nmi.pending,
        nmi_masked: e.nmi.masked,
        sipi_vector: e.sipi_vector,
        smi_smm: e.smi.smm,
        smi_pending: e.smi.pending,
        smi_inside_nmi: e.smi.smm_inside_nmi,
        smi_latched_init: e.smi.latched_init,
        triple_fault_pending: e.triple_fault.pending,
        flags: e.flags,
    }
}

fn events_in(e: &VcpuEvents) -> kvm_vcpu_events {
    let mut k = kvm_vcpu_events::default();
    k.exception.injected = e.exception_injected;
    k.exception.nr = e.exception_nr;
    k.exception.has_error_code = e.exception_has_error_code;
    k.exception.pending = e.exception_pending;
    k.exception.error_code = e.exception_error_code;
    k.interrupt.injected = e.interrupt_injected;
    k.interrupt.nr = e.interrupt_nr;
    k.interrupt.soft = e.interrupt_soft;
    k.interrupt.shadow = e.interrupt_shadow;
    k.nmi.injected = e.nmi_injected;
    k.nmi.pending = e.nmi_pending;
    k.nmi.masked = e.nmi_masked;
    k.sipi_vector = e.sipi_vector;
    k.smi.smm = e.smi_smm;
    k.smi.pending = e.smi_pending;
    k.smi.smm_inside_nmi = e.smi_inside_nmi;
    k.smi.latched_init = e.smi_latched_init;
    k.triple_fault.pending = e.triple_fault_pending;
    // Only the fields ferry carries; never the payload or triple-fault extensions, which need
    // capabilities ferry does not enable.
    k.flags = e.flags
        & (kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING
            | kvm_bindings::KVM_VCPUEVENT_VALID_SIPI_VECTOR
            | kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW
            | kvm_bindings::KVM_VCPUEVENT_VALID_SMM);
    k
}

/// The values of `msrs` (in that order); a KVM that stops short names the MSR it refused.
fn get_msrs(fd: &VcpuFd, id: u32, msrs: &[u32]) -> Result<Vec<(u32, u64)>, Error> {
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut m = Msrs::from_entries(&entries).map_err(|_| Error::TooManyMsrs {
        vcpu: id,
        count: entries.len(),
    })?;
    let n = fd.get_msrs(&mut m).map_err(|source| Error::Ioctl {
        vcpu: id,
        op: "KVM_GET_MSRS",
        source,
    })?;
    if n != entries.len() {
        return Err(Error::MsrCount {
            vcpu: id,
            op: "GET",
            msr: entries[n].index,
            done: n,
            total: entries.len(),
        });
    }
    Ok(m.as_slice().iter().map(|e| (e.index, e.data)).collect())
}

/// Saves vCPU `id` (paused, on its own thread). Order: MP state first (it can change
/// CS/RIP), then registers, XSAVE, XCRs, debug registers, LAPIC, MSRs, events last.
pub fn save_state(
    fd: &VcpuFd,
    id: u32,
    host: &CpuidDump,
    msrs: &[u32],
) -> Result<VcpuState, Error> {
    let op = |op: &'static str| {
        move |source| Error::Ioctl {
            vcpu: id,
            op,
            source,
        }
    };
    let mp_state = fd.get_mp_state().map_err(op("KVM_GET_MP_STATE"))?.mp_state;
    let regs = regs_out(&fd.get_regs().map_err(op("KVM_GET_REGS"))?);
    let sregs = sregs_out(&fd.get_sregs().map_err(op("KVM_GET_SREGS"))?);
    let xsave = super::xsave::xsave_out(&fd.get_xsave().map_err(op("KVM_GET_XSAVE"))?, host);
    let x = fd.get_xcrs().map_err(op("KVM_GET_XCRS"))?;
    let xcrs = x.xcrs[..(x.nr_xcrs as usize).min(x.xcrs.len())]
        .iter()
        .map(|c| (c.xcr, c.value))
        .collect();
    let d = fd.get_debug_regs().map_err(op("KVM_GET_DEBUGREGS"))?;
    let lapic = fd
        .get_lapic()
        .map_err(op("KVM_GET_LAPIC"))?
        .regs
        .iter()
        .map(|b| *b as u8)
        .collect();
    let msrs = get_msrs(fd, id, msrs)?;
    let events = events_out(&fd.get_vcpu_events().map_err(op("KVM_GET_VCPU_EVENTS"))?);
    Ok(VcpuState {
        id,
        regs,
        sregs,
        xsave,
        xcrs,
        debug: DebugRegs {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
        },
        lapic,
        mp_state,
        events,
        msrs,
    })
}

/// Restores a vCPU whose CPUID is already set (KVM_SET_CPUID2 must come before anything:
/// the other state is checked against it). The order, and why:
/// 1. MP state (it depends on the BSP flag, and is reset by nothing that follows);
/// 2. REGS, then SREGS (SREGS sets the mode REGS are interpreted in; both before the LAPIC,
///    whose base lives in SREGS' apic_base);
/// 3. XSAVE, then XCRs (XCR0 may only enable components whose state is loaded);
/// 4. debug registers;
/// 5. LAPIC: after SREGS (APIC base), before MSRs (TSC_DEADLINE is armed against it);
/// 6. MSRs in allowlist order: IA32_TSC before TSC_DEADLINE; every count checked;
/// 7. vCPU events last (setting REGS clears pending exceptions).
pub fn restore_state(
    fd: &VcpuFd,
    s: &VcpuState,
    host: &CpuidDump,
    guest_xsave: u64,
) -> Result<(), Error> {
    let id = s.id;
    let op = |op: &'static str| {
        move |source| Error::Ioctl {
            vcpu: id,
            op,
            source,
        }
    };
    fd.set_mp_state(kvm_mp_state {
        mp_state: s.mp_state,
    })
    .map_err(op("KVM_SET_MP_STATE"))?;
    fd.set_regs(&regs_in(&s.regs)).map_err(op("KVM_SET_REGS"))?;
    fd.set_sregs(&sregs_in(&s.sregs))
        .map_err(op("KVM_SET_SREGS"))?;
    let xsave = super::xsave::xsave_in(id, &s.xsave, host, guest_xsave)
        .map_err(|source| Error::Xsave { vcpu: id, source })?;
    // SAFETY: `xsave` is a complete 4096-byte kvm_xsave built above; KVM reads exactly that
    // much (ferry does not enable KVM_CAP_XSAVE2's larger areas).
    unsafe { fd.set_xsave(&xsave) }.map_err(op("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&xcrs_in(s)?).map_err(op("KVM_SET_XCRS"))?;
    let d = kvm_debugregs {
        db: s.debug.db,
        dr6: s.debug.dr6,
        dr7: s.debug.dr7,
        ..Default::default()
    };
    fd.set_debug_regs(&d).map_err(op("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&lapic_in(s)?).map_err(op("KVM_SET_LAPIC"))?;
    set_msrs(fd, s)?;
    fd.set_vcpu_events(&events_in(&s.events))
        .map_err(op("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn xcrs_in(s: &VcpuState) -> Result<kvm_xcrs, Error> {
    if s.xcrs.len() > 16 {
        return Err(Error::TooManyXcrs {
            vcpu: s.id,
            count: s.xcrs.len(),
        });
    }
    let mut xcrs = kvm_xcrs {
        nr_xcrs: s.xcrs.len() as u32,
        ..Default::default()
    };
    for (slot, (xcr, value)) in xcrs.xcrs.iter_mut().zip(&s.xcrs) {
        *slot = kvm_xcr {
            xcr: *xcr,
            reserved: 0,
            value: *value,
        };
    }
    Ok(xcrs)
}

fn lapic_in(s: &VcpuState) -> Result<kvm_bindings::kvm_lapic_state, Error> {
    if s.lapic.len() != 1024 {
        return Err(Error::LapicSize {
            vcpu: s.id,
            len: s.lapic.len(),
        });
    }
    let mut lapic = kvm_bindings::kvm_lapic_state::default();
    for (d, b) in lapic.regs.iter_mut().zip(&s.lapic) {
        *d = *b as libc::c_char;
    }
    Ok(lapic)
}

/// Sets every MSR of `s` in order; a short count is an error naming the MSR KVM refused.
fn set_msrs(fd: &VcpuFd, s: &VcpuState) -> Result<(), Error> {
    let id = s.id;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let m = Msrs::from_entries(&entries).map_err(|_| Error::TooManyMsrs {
        vcpu: id,
        count: entries.len(),
    })?;
    let n = fd.set_msrs(&m).map_err(|source| Error::Ioctl {
        vcpu: id,
        op: "KVM_SET_MSRS",
        source,
    })?;
    if n != entries.len() {
        return Err(Error::MsrCount {
            vcpu: id,
            op: "SET",
            msr: entries[n].index,
            done: n,
            total: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::Code;

    #[test]
    fn a_saved_vcpu_that_fits_no_vcpu_is_a_bad_file_naming_what() {
        let mut s = VcpuState {
            id: 3,
            lapic: vec![0; 1024],
            ..Default::default()
        };
        assert!(lapic_in(&s).is_ok());
        s.lapic.truncate(1000);
        let e = lapic_in(&s).unwrap_err();
        assert!(matches!(e, Error::LapicSize { vcpu: 3, len: 1000 }), "{e}");
        assert_eq!(e.code(), Code::BadFile);
        assert_eq!(e.to_string(), "vcpu3: LAPIC page of 1000 bytes (not 1024)");
        s.xcrs = vec![(0, 1); 17];
        let e = xcrs_in(&s).unwrap_err();
        assert!(
            matches!(e, Error::TooManyXcrs { vcpu: 3, count: 17 }),
            "{e}"
        );
        assert_eq!(e.code(), Code::BadFile);
        s.xcrs.truncate(16);
        assert_eq!(xcrs_in(&s).unwrap().nr_xcrs, 16);
    }
}
