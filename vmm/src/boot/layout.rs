//! Where boot structures live in guest physical memory (all below 1 MiB but the kernel).
//!
//! ```text
//! 0x0500  GDT (64-bit code, data, 32-bit code, TSS)
//! 0x0600  IDT (empty; the kernel installs its own)
//! 0x6000  PVH hvm_start_info, memory map at 0x6040, module list at 0x6800
//! 0x7000  Linux zero page (struct boot_params)
//! 0x8ff0  initial stack top for raw long-mode guests
//! 0x9000  PML4, 0xa000 PDPT, 0xb000-0xefff four PDs: identity map of the first 4 GiB
//!         with 2 MiB pages
//! 0x20000 kernel command line (up to 64 KiB)
//! 0x9fc00 MP table (start of the EBDA; Linux scans the last KiB of base memory)
//! 0x100000 kernel (bzImage protected-mode part; an ELF loads at its own physical address)
//! ```

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x600;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const PVH_MODLIST_START: u64 = 0x6800;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Page directories after PD_START, one per GiB mapped.
pub const PD_COUNT: u64 = 4;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x100000;

/// Local APIC base as the guest sees it.
pub const APIC_BASE: u64 = 0xfee0_0000;
/// IOAPIC base.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// KVM's TSS and identity map pages (needed on Intel, harmless elsewhere), at the top of
/// the MMIO gap below the BIOS area.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
