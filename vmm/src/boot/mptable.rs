//! The Intel MultiProcessor Specification 1.4 table, so that a guest without ACPI finds every
//! vCPU, the IOAPIC and the ISA interrupt routing. Written by hand: a floating pointer
//! structure at [`EBDA_START`] followed by the configuration table.
//!
//! ```text
//! floating pointer (16 B) | header (44 B) | processor x N (20 B) | bus (8 B) | IOAPIC (8 B)
//!                         | I/O interrupt x 16 (8 B) | local interrupt x 2 (8 B)
//! ```

use super::layout::{APIC_BASE, EBDA_START, IOAPIC_BASE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// MP table entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
/// Number of ISA interrupts routed to the IOAPIC.
const ISA_IRQS: u8 = 16;
/// The IOAPIC's ID: after the vCPUs' APIC IDs.
const APIC_VERSION: u8 = 0x14;
/// Largest vCPU count whose APIC IDs (0..n) leave room for the IOAPIC ID in 8 bits.
pub const MAX_CPUS: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the MP table supports at most {MAX_CPUS} vCPUs, not {0}")]
    TooManyCpus(u32),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the table for `num_cpus` vCPUs with APIC IDs 0..num_cpus, as placed at `base`.
pub fn build(num_cpus: u32, base: u64) -> Result<Vec<u8>, Error> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus as u8;
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        entries.push(MP_PROCESSOR);
        entries.push(cpu as u8); // local APIC ID
        entries.push(APIC_VERSION);
        entries.push(0x01 | if cpu == 0 { 0x02 } else { 0 }); // enabled, bootstrap
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, 0x01]);
    entries.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    for irq in 0..ISA_IRQS {
        // type INT, polarity/trigger conforming to the bus, source bus 0, source IRQ,
        // destination IOAPIC and pin.
        entries.extend_from_slice(&[MP_INTSRC, 0, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // ExtINT on LINT0 and NMI on LINT1 of every local APIC (0xff).
    entries.extend_from_slice(&[MP_LINTSRC, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, 1, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = num_cpus as u16 + 1 + 1 + u16::from(ISA_IRQS) + 2;

    let header_len = 44usize;
    let table_len = (header_len + entries.len()) as u16;
    let mut table = Vec::with_capacity(table_len as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"FERRY   ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_BASE as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), header_len);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&((base + 16) as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4); // spec revision 1.4
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    Ok(mpf)
}

/// Writes the table for `num_cpus` vCPUs at [`EBDA_START`].
pub fn write<M: GuestMemoryBackend>(mem: &M, num_cpus: u32) -> Result<(), Error> {
    let bytes = build(num_cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        let t = build(2, EBDA_START).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let cfg = &t[16..];
        assert_eq!(&cfg[..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(sum(cfg), 0);
        assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 2 + 2 + 16 + 2);
        // Two processor entries, the first one the bootstrap processor.
        assert_eq!(cfg[44], MP_PROCESSOR);
        assert_eq!(cfg[47], 3);
        assert_eq!(cfg[64], MP_PROCESSOR);
        assert_eq!((cfg[65], cfg[67]), (1, 1));
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert!(build(0, 0).is_err());
        assert!(build(MAX_CPUS + 1, 0).is_err());
    }
}
