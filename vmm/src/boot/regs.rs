//! The boot vCPU's first registers for each [`EntryPoint`]: GDT, identity page tables,
//! segment and control registers. Pure functions of the entry point, written to guest memory
//! by [`write_tables`] and applied by the vCPU code.

use super::layout::*;
use super::EntryPoint;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is always set.
const RFLAGS_FIXED: u64 = 0x2;

/// GDT selectors.
pub const SEL_CODE64: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_CODE32: u16 = 0x18;
pub const SEL_TSS: u16 = 0x20;

/// GDT entries: null, 64-bit code, data, 32-bit code, TSS (all flat, ring 0).
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_9b00_0000_ffff,
    0x008f_8b00_0000_ffff,
];

fn segment(sel: u16, entry: u64) -> kvm_segment {
    let flags = (entry >> 40) as u16;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: (flags & 0xf) as u8,
        s: ((flags >> 4) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        present: ((flags >> 7) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        db: ((flags >> 14) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and (for 64-bit entries) identity page tables covering the
/// first 4 GiB (RAM below the gap and the MMIO gap) with 2 MiB pages, user-accessible so that
/// ring-3 test code can run on them.
pub fn write_tables<M: GuestMemoryBackend>(
    mem: &M,
    entry: &EntryPoint,
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    if matches!(
        entry,
        EntryPoint::Linux64 { .. } | EntryPoint::Long64 { .. }
    ) {
        const PRESENT_RW_USER: u64 = 0x7;
        const HUGE: u64 = 0x80;
        mem.write_obj(PDPT_START | PRESENT_RW_USER, GuestAddress(PML4_START))?;
        for gib in 0..PD_COUNT {
            let pd = PD_START + gib * 0x1000;
            mem.write_obj(pd | PRESENT_RW_USER, GuestAddress(PDPT_START + 8 * gib))?;
            for i in 0..512u64 {
                let addr = (gib << 30) | (i << 21);
                mem.write_obj(addr | PRESENT_RW_USER | HUGE, GuestAddress(pd + 8 * i))?;
            }
        }
    }
    Ok(())
}

/// Applies the entry point's segment and control registers to `sregs` (as read from a fresh
/// vCPU, so that fields we do not set keep KVM's reset values).
pub fn setup_sregs(sregs: &mut kvm_sregs, entry: &EntryPoint) {
    match entry {
        EntryPoint::Real { .. } => {
            for s in [
                &mut sregs.cs,
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.fs,
                &mut sregs.gs,
                &mut sregs.ss,
            ] {
                s.base = 0;
                s.selector = 0;
            }
        }
        EntryPoint::Pvh { .. } => {
            protected_mode_segments(sregs, SEL_CODE32, GDT[3]);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryPoint::Linux64 { .. } | EntryPoint::Long64 { .. } => {
            protected_mode_segments(sregs, SEL_CODE64, GDT[1]);
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
}

fn protected_mode_segments(sregs: &mut kvm_sregs, code_sel: u16, code: u64) {
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment(code_sel, code);
    let data = segment(SEL_DATA, GDT[2]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    let mut tss = segment(SEL_TSS, GDT[4]);
    tss.limit = 0xfffff;
    sregs.tr = tss;
}

/// The general registers for the entry point.
pub fn setup_regs(entry: &EntryPoint) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_FIXED,
        ..Default::default()
    };
    match *entry {
        EntryPoint::Pvh { rip, start_info } => {
            regs.rip = rip;
            regs.rbx = start_info;
        }
        EntryPoint::Linux64 { rip, zero_page } => {
            regs.rip = rip;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
        }
        EntryPoint::Real { rip } => regs.rip = rip,
        EntryPoint::Long64 { rip, rsp } => {
            regs.rip = rip;
            regs.rsp = rsp;
        }
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_decodes() {
        let s = segment(SEL_CODE64, GDT[1]);
        assert_eq!(
            (s.l, s.db, s.present, s.s, s.type_, s.g),
            (1, 0, 1, 1, 0xb, 1)
        );
        let s = segment(SEL_CODE32, GDT[3]);
        assert_eq!((s.l, s.db), (0, 1));
    }

    #[test]
    fn long_mode_sets_paging() {
        let mut s = kvm_sregs::default();
        setup_sregs(
            &mut s,
            &EntryPoint::Long64 {
                rip: 0x1000,
                rsp: 0x8000,
            },
        );
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
    }
}
