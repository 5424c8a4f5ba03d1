//! The state records of crate::state inside section payloads, field by field in declaration
//! order (byte tables: docs/migration-format.md), on crate::codec's encoder and decoder.
//! Crate-private: the stream module frames them, the protocol's Hello carries GCPU.

use crate::codec::{Decoder, Encoder, Error};
use crate::limits::{
    CPUID_ENTRY_SIZE, IRQCHIP_SIZE, LAPIC_SIZE, MAX_CMDLINE, MAX_CPUID_ENTRIES, MAX_MEMR_RANGES,
    MAX_MSRS, MAX_PIT, MAX_RANGE_BYTES, MAX_SERIAL_INPUT, MAX_VENDOR, MAX_XCRS,
    MAX_XSAVE_COMPONENT, MAX_XSAVE_COMPONENTS,
};
use crate::state::*;

#[macro_use]
mod macros {
    macro_rules! wire_record {
        ($ty:ident: $($field:ident),* $(,)?) => {
            impl Wire for $ty {
                fn put(&self, e: &mut Encoder) {
                    $( self.$field.put(e); )*
                }
                fn get(d: &mut Decoder, _what: &'static str) -> Result<Self, Error> {
                    Ok(Self { $( $field: Wire::get(d, concat!(stringify!($ty), ".", stringify!($field)))?, )* })
                }
            }
        };
    }
}

mod virtio;
pub(crate) use virtio::{dec_backends, dec_virtio, enc_backends, enc_virtio, MAX_BACKENDS};

// Field by field in declaration order (the byte tables
// are in docs/migration-format.md). Fixed-size records implement `Wire` through
// `wire_record!`, whose field list must name every field (the decoder builds the struct
// literal), so encoder and decoder cannot disagree on order or miss a field.

/// Encoded sizes of the fixed-size records.
pub(crate) const SEGMENT_SIZE: u64 = 8 + 4 + 2 + 9;
pub(crate) const DTABLE_SIZE: u64 = 8 + 2;
pub(crate) const REGS_SIZE: u64 = 18 * 8;
pub(crate) const SREGS_SIZE: u64 = 8 * SEGMENT_SIZE + 2 * DTABLE_SIZE + 7 * 8 + 4 * 8;
pub(crate) const DEBUG_SIZE: u64 = 6 * 8;
pub(crate) const EVENTS_SIZE: u64 = 4 + 4 + 1 + 8 + 7 + 4 + 5 + 4;
/// An (index u32, value u64) pair: an XCR or an MSR.
pub(crate) const PAIR_SIZE: u64 = 12;

/// A value with a fixed-size little-endian encoding.
pub(crate) trait Wire: Sized {
    fn put(&self, e: &mut Encoder);
    fn get(d: &mut Decoder, what: &'static str) -> Result<Self, Error>;
}

macro_rules! wire_int {
    ($($t:ident),*) => {$(
        impl Wire for $t {
            fn put(&self, e: &mut Encoder) {
                e.$t(*self)
            }
            fn get(d: &mut Decoder, what: &'static str) -> Result<Self, Error> {
                d.$t(what)
            }
        }
    )*};
}
wire_int!(u8, u16, u32, u64);

impl<T: Wire + Copy + Default, const N: usize> Wire for [T; N] {
    fn put(&self, e: &mut Encoder) {
        self.iter().for_each(|x| x.put(e));
    }
    fn get(d: &mut Decoder, what: &'static str) -> Result<Self, Error> {
        let mut out = [T::default(); N];
        for x in &mut out {
            *x = T::get(d, what)?;
        }
        Ok(out)
    }
}

wire_record!(Segment: base, limit, selector, type_, present, dpl, db, s, l, g, avl, unusable);
wire_record!(DescriptorTable: base, limit);
wire_record!(Regs: gpr, rip, rflags);
wire_record!(Sregs: segments, gdt, idt, cr0, cr2, cr3, cr4, cr8, efer, apic_base,
    interrupt_bitmap);
wire_record!(DebugRegs: db, dr6, dr7);
wire_record!(VcpuEvents: exception_injected, exception_nr, exception_has_error_code,
    exception_pending, exception_error_code, exception_has_payload, exception_payload,
    interrupt_injected, interrupt_nr, interrupt_soft, interrupt_shadow, nmi_injected,
    nmi_pending, nmi_masked, sipi_vector, smi_smm, smi_pending, smi_inside_nmi,
    smi_latched_init, triple_fault_pending, flags);

wire_record!(Leaf: function, index, eax, ebx, ecx, edx);

/// GCPU (and the Hello from format version 2): host vendor and signature, TSC kHz, then
/// the CPUID entries.
pub(crate) fn enc_guest_cpu(e: &mut Encoder, g: &GuestCpu) -> Result<(), Error> {
    e.str_u32("GuestCpu.host_vendor", &g.host_vendor, MAX_VENDOR)?;
    e.u32(g.host_signature);
    e.u32(g.tsc_khz);
    e.count_u32("GuestCpu.cpuid", g.cpuid.len(), MAX_CPUID_ENTRIES)?;
    g.cpuid.iter().for_each(|c| c.put(e));
    Ok(())
}

pub(crate) fn dec_guest_cpu(d: &mut Decoder) -> Result<GuestCpu, Error> {
    let host_vendor = d.str_u32("GuestCpu.host_vendor", MAX_VENDOR)?;
    let host_signature = d.u32("GuestCpu.host_signature")?;
    let tsc_khz = d.u32("GuestCpu.tsc_khz")?;
    let n = d.count_u32(
        "GuestCpu.cpuid",
        MAX_CPUID_ENTRIES,
        CPUID_ENTRY_SIZE as usize,
    )?;
    let mut cpuid = Vec::with_capacity(n);
    for _ in 0..n {
        cpuid.push(Wire::get(d, "Leaf")?);
    }
    Ok(GuestCpu {
        host_vendor,
        host_signature,
        tsc_khz,
        cpuid,
    })
}

/// CONF: memory, vcpus, cmdline.
pub(crate) fn enc_config(e: &mut Encoder, c: &MachineConfig) -> Result<(), Error> {
    e.u64(c.memory);
    e.u32(c.vcpus);
    e.str_u32("MachineConfig.cmdline", &c.cmdline, MAX_CMDLINE)
}

pub(crate) fn dec_config(d: &mut Decoder) -> Result<MachineConfig, Error> {
    Ok(MachineConfig {
        memory: d.u64("MachineConfig.memory")?,
        vcpus: d.u32("MachineConfig.vcpus")?,
        cmdline: d.str_u32("MachineConfig.cmdline", MAX_CMDLINE)?,
    })
}

/// VCPU: every field of `VcpuState` in order; XSAVE as (index, bytes) records.
pub(crate) fn enc_vcpu(e: &mut Encoder, v: &VcpuState) -> Result<(), Error> {
    e.u32(v.id);
    v.regs.put(e);
    v.sregs.put(e);
    e.u64(v.xsave.xstate_bv);
    let n = v.xsave.components.len();
    e.count_u32("Xsave.components", n, MAX_XSAVE_COMPONENTS)?;
    for c in &v.xsave.components {
        e.u32(c.index);
        e.bytes_u32("XsaveComponent.bytes", &c.bytes, MAX_XSAVE_COMPONENT)?;
    }
    enc_pairs(e, "VcpuState.xcrs", &v.xcrs, MAX_XCRS)?;
    v.debug.put(e);
    e.bytes_u32("VcpuState.lapic", &v.lapic, LAPIC_SIZE as u32)?;
    e.u32(v.mp_state);
    v.events.put(e);
    enc_pairs(e, "VcpuState.msrs", &v.msrs, MAX_MSRS)
}

pub(crate) fn dec_vcpu(d: &mut Decoder) -> Result<VcpuState, Error> {
    Ok(VcpuState {
        id: d.u32("VcpuState.id")?,
        regs: Wire::get(d, "Regs")?,
        sregs: Wire::get(d, "Sregs")?,
        xsave: dec_xsave(d)?,
        xcrs: dec_pairs(d, "VcpuState.xcrs", MAX_XCRS)?,
        debug: Wire::get(d, "DebugRegs")?,
        lapic: d.bytes_u32("VcpuState.lapic", LAPIC_SIZE as u32)?,
        mp_state: d.u32("VcpuState.mp_state")?,
        events: Wire::get(d, "VcpuEvents")?,
        msrs: dec_pairs(d, "VcpuState.msrs", MAX_MSRS)?,
    })
}

fn dec_xsave(d: &mut Decoder) -> Result<Xsave, Error> {
    let xstate_bv = d.u64("Xsave.xstate_bv")?;
    let n = d.count_u32("Xsave.components", MAX_XSAVE_COMPONENTS, 8)?;
    let mut components = Vec::with_capacity(n);
    for _ in 0..n {
        components.push(XsaveComponent {
            index: d.u32("XsaveComponent.index")?,
            bytes: d.bytes_u32("XsaveComponent.bytes", MAX_XSAVE_COMPONENT)?,
        });
    }
    Ok(Xsave {
        xstate_bv,
        components,
    })
}

fn enc_pairs(e: &mut Encoder, what: &'static str, v: &[(u32, u64)], cap: u32) -> Result<(), Error> {
    e.count_u32(what, v.len(), cap)?;
    for (index, value) in v {
        e.u32(*index);
        e.u64(*value);
    }
    Ok(())
}

fn dec_pairs(d: &mut Decoder, what: &'static str, cap: u32) -> Result<Vec<(u32, u64)>, Error> {
    let n = d.count_u32(what, cap, PAIR_SIZE as usize)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push((d.u32(what)?, d.u64(what)?));
    }
    Ok(out)
}

/// IRQC: PIC master, PIC slave, IOAPIC, PIT, kvmclock.
pub(crate) fn enc_irqchip(e: &mut Encoder, s: &IrqchipState) -> Result<(), Error> {
    let exact = IRQCHIP_SIZE as u32;
    e.bytes_u32("IrqchipState.pic_master", &s.pic_master, exact)?;
    e.bytes_u32("IrqchipState.pic_slave", &s.pic_slave, exact)?;
    e.bytes_u32("IrqchipState.ioapic", &s.ioapic, exact)?;
    e.bytes_u32("IrqchipState.pit", &s.pit, MAX_PIT)?;
    e.u64(s.clock_ns);
    e.u32(s.clock_flags);
    Ok(())
}

pub(crate) fn dec_irqchip(d: &mut Decoder) -> Result<IrqchipState, Error> {
    let exact = IRQCHIP_SIZE as u32;
    Ok(IrqchipState {
        pic_master: d.bytes_u32("IrqchipState.pic_master", exact)?,
        pic_slave: d.bytes_u32("IrqchipState.pic_slave", exact)?,
        ioapic: d.bytes_u32("IrqchipState.ioapic", exact)?,
        pit: d.bytes_u32("IrqchipState.pit", MAX_PIT)?,
        clock_ns: d.u64("IrqchipState.clock_ns")?,
        clock_flags: d.u32("IrqchipState.clock_flags")?,
    })
}

/// SERL: the nine UART registers, then the unread input.
pub(crate) fn enc_serial(e: &mut Encoder, s: &SerialState) -> Result<(), Error> {
    for r in [
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ] {
        e.u8(r);
    }
    e.bytes_u32("SerialState.in_buffer", &s.in_buffer, MAX_SERIAL_INPUT)
}

pub(crate) fn dec_serial(d: &mut Decoder) -> Result<SerialState, Error> {
    Ok(SerialState {
        baud_divisor_low: d.u8("SerialState.baud_divisor_low")?,
        baud_divisor_high: d.u8("SerialState.baud_divisor_high")?,
        interrupt_enable: d.u8("SerialState.interrupt_enable")?,
        interrupt_identification: d.u8("SerialState.interrupt_identification")?,
        line_control: d.u8("SerialState.line_control")?,
        line_status: d.u8("SerialState.line_status")?,
        modem_control: d.u8("SerialState.modem_control")?,
        modem_status: d.u8("SerialState.modem_status")?,
        scratch: d.u8("SerialState.scratch")?,
        in_buffer: d.bytes_u32("SerialState.in_buffer", MAX_SERIAL_INPUT)?,
    })
}

/// MEMR: count, then (gpa, length, bytes) per range. (The writer streams these itself.)
pub(crate) fn memr_ranges<'a>(d: &mut Decoder<'a>) -> Result<Vec<(u64, &'a [u8])>, Error> {
    let n = d.count_u32("MEMR range count", MAX_MEMR_RANGES, 16)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let gpa = d.u64("MemoryRange.gpa")?;
        out.push((gpa, d.slice_u64("MemoryRange.data", MAX_RANGE_BYTES)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_sizes_match_the_constants() {
        let size = |f: &dyn Fn(&mut Encoder)| {
            let mut e = Encoder::new();
            f(&mut e);
            e.len() as u64
        };
        assert_eq!(size(&|e| Segment::default().put(e)), SEGMENT_SIZE);
        assert_eq!(size(&|e| Regs::default().put(e)), REGS_SIZE);
        assert_eq!(size(&|e| Sregs::default().put(e)), SREGS_SIZE);
        assert_eq!(size(&|e| DebugRegs::default().put(e)), DEBUG_SIZE);
        assert_eq!(size(&|e| Leaf::default().put(e)), CPUID_ENTRY_SIZE);
        assert_eq!(size(&|e| VcpuEvents::default().put(e)), EVENTS_SIZE);
    }

    #[test]
    fn records_keep_field_order() {
        let seg = Segment {
            base: 0x1122_3344_5566_7788,
            limit: 0xaabb_ccdd,
            selector: 0x0102,
            type_: 3,
            present: 4,
            dpl: 5,
            db: 6,
            s: 7,
            l: 8,
            g: 9,
            avl: 10,
            unusable: 11,
        };
        let mut e = Encoder::new();
        seg.put(&mut e);
        let bytes = e.into_inner();
        assert_eq!(&bytes[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&bytes[8..14], &[0xdd, 0xcc, 0xbb, 0xaa, 0x02, 0x01]);
        assert_eq!(&bytes[14..], &[3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(Segment::get(&mut Decoder::new(&bytes), "s").unwrap(), seg);
    }
}
