//! The stream's constants: its magic and versions, and the caps on every length and count
//! a reader accepts. The codec and the stream framing both take them from here.

/// The first 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"FERRYVM\0";
/// The stream format version this ferry writes for a state and its memory ranges, and
/// names in a migration's Hello. Version 2 added the GCPU section (the guest CPU as the
/// saving host ran it: TSC rate, effective CPUID); version 3 the VIRT sections (virtio
/// devices) and the device list in the Hello.
pub const FORMAT_VERSION: u32 = 3;
/// The version of a snapshot whose memory is a file-mappable image (MEMI sections, which
/// version 4 added): the lowest version that holds what a stream carries is what it says.
pub const IMAGE_FORMAT_VERSION: u32 = 4;
/// The newest stream format version this ferry reads.
pub const NEWEST_FORMAT_VERSION: u32 = IMAGE_FORMAT_VERSION;
/// The oldest stream format version this ferry reads: every version from this one to
/// [`NEWEST_FORMAT_VERSION`] restores (docs/migration-format.md, "Compatibility").
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// The version of every section this ferry writes and reads.
pub const SECTION_VERSION: u16 = 1;
/// The stream header: magic, version, flags.
pub const HEADER_SIZE: u64 = 16;
/// A section's frame before its payload: tag, version, reserved, length.
pub const FRAME_HEADER_SIZE: u64 = 16;
/// The CRC32 after each payload.
pub const CRC_SIZE: u64 = 4;

/// Most vCPUs in a VM.
pub const MAX_VCPUS: u32 = 256;
/// Most guest RAM (config.memory), 1 TiB.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Room above config.memory for RAM relocated above an MMIO hole: a range must end at or
/// below config.memory + this. The vmm checks ranges against its real memory map.
pub const MMIO_GAP_ALLOWANCE: u64 = 1 << 32;
/// Longest kernel command line, bytes.
pub const MAX_CMDLINE: u32 = 64 * 1024;
/// Longest CPU profile JSON text, bytes.
pub const MAX_PROFILE_JSON: u32 = 1 << 20;
/// Most XSAVE components per vCPU, and the exclusive bound of their indices.
pub const MAX_XSAVE_COMPONENTS: u32 = 64;
/// Largest XSAVE component, bytes.
pub const MAX_XSAVE_COMPONENT: u32 = 64 * 1024;
/// XSAVE component 0 (x87): bytes 0..160 of the legacy region, MXCSR and MXCSR_MASK (bytes
/// 24..32) included.
pub const XSAVE_X87_SIZE: usize = 160;
/// XSAVE component 1 (SSE): bytes 160..416 of the legacy region, XMM0-15 (MXCSR travels in
/// component 0).
pub const XSAVE_SSE_SIZE: usize = 256;
/// Most CPUID entries in a GCPU section (KVM takes at most 256).
pub const MAX_CPUID_ENTRIES: u32 = 256;
/// The longest CPU vendor string (CPUID leaf 0's twelve characters).
pub const MAX_VENDOR: u32 = 12;
/// An encoded CPUID entry: function, index, EAX, EBX, ECX, EDX.
pub const CPUID_ENTRY_SIZE: u64 = 6 * 4;
/// The largest encoded GuestCpu record (the GCPU payload).
pub const MAX_GUEST_CPU: u64 =
    4 + MAX_VENDOR as u64 + 4 + 4 + 4 + MAX_CPUID_ENTRIES as u64 * CPUID_ENTRY_SIZE;
/// Most MSRs per vCPU.
pub const MAX_MSRS: u32 = 1024;
/// Most XCRs per vCPU.
pub const MAX_XCRS: u32 = 16;
/// The local APIC page, exactly.
pub const LAPIC_SIZE: usize = 1024;
/// Each KVM irqchip payload (PIC master, PIC slave, IOAPIC), exactly.
pub const IRQCHIP_SIZE: usize = 512;
/// Largest PIT state, bytes.
pub const MAX_PIT: u32 = 4096;
/// Most unread serial input, bytes.
pub const MAX_SERIAL_INPUT: u32 = 64 * 1024;
/// Guest page size: memory ranges are aligned to and sized in pages.
pub const PAGE_SIZE: u64 = 4096;
/// Largest memory range in the stream, and most range bytes in one MEMR section (64 MiB).
pub const MAX_RANGE_BYTES: u64 = 64 << 20;
/// Most ranges in one MEMR section.
pub const MAX_MEMR_RANGES: u32 = (MAX_RANGE_BYTES / PAGE_SIZE) as u32;
/// Most virtio devices in a VM (VIRT sections, devices in a Hello).
pub const MAX_VIRTIO_DEVICES: u32 = 16;
/// Most queues of one virtio device.
pub const MAX_VIRTIO_QUEUES: u32 = 16;
/// Longest disk image path, bytes (PATH_MAX).
pub const MAX_DISK_PATH: u32 = 4096;
/// Longest tap name, bytes (IFNAMSIZ without its NUL).
pub const MAX_TAP_NAME: u32 = 15;
/// An encoded virtqueue: max_size, size, ready, three ring addresses, next_avail,
/// next_used, event_idx, size_refused.
pub const VIRTQUEUE_SIZE: u64 = 2 + 2 + 1 + 3 * 8 + 2 + 2 + 1 + 1;
/// The largest encoded device backend: kind, then a disk's path, size and read-only flag
/// (a network card's MAC and tap name are shorter).
pub const MAX_DEVICE_BACKEND: u64 = 4 + 4 + MAX_DISK_PATH as u64 + 8 + 1;
/// The largest encoded virtio device (a VIRT payload).
pub const MAX_VIRTIO_STATE: u64 =
    MAX_DEVICE_BACKEND + 4 + 4 + 8 + 4 + 4 + 4 + 1 + 4 + MAX_VIRTIO_QUEUES as u64 * VIRTQUEUE_SIZE;
/// Most extents (runs of pages holding data) in one MEMI image.
pub const MAX_IMAGE_EXTENTS: u32 = 1 << 20;
/// An encoded MEMI extent: offset, length, CRC-32.
pub const IMAGE_EXTENT_SIZE: u64 = 8 + 8 + 4;
/// The fixed fields of a MEMI payload before its extents: gpa, length, extent count, pad.
pub const IMAGE_HEAD_SIZE: u64 = 8 + 8 + 4 + 4;
