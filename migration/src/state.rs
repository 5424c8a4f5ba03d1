//! The state of a whole VM in a vendor-neutral form: what a snapshot file or a migration
//! stream carries. Plain data; the vmm crate fills it from KVM and restores it.
//!
//! Vendor-neutral means: no KVM struct layouts (every field is named), XSAVE as a list of
//! (component, bytes) records rather than one host-laid-out area, MSRs as (index, value) pairs
//! from an allowlist derived from the CPU profile.

/// A segment register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

/// A descriptor table register (GDTR, IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// General-purpose registers, RIP and RFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15 in that order.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
}

/// Segment, control and system registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sregs {
    /// cs, ds, es, fs, gs, ss, tr, ldt in that order.
    pub segments: [Segment; 8],
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    /// Pending external interrupt bitmap (256 bits).
    pub interrupt_bitmap: [u64; 4],
}

/// One XSAVE state component in the standard (non-compacted) format's bytes for that
/// component: index 0 is bytes 0..160 of the legacy area (x87 control and ST0-7, and MXCSR
/// with MXCSR_MASK at 24..32), 1 is bytes 160..416 (XMM0-15), 2 AVX, and so on. Restored at
/// the destination host's offsets (its CPUID leaf 0xD).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XsaveComponent {
    pub index: u32,
    pub bytes: Vec<u8>,
}

/// XSAVE state: XSTATE_BV (which components hold non-init state) and the components.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Xsave {
    pub xstate_bv: u64,
    pub components: Vec<XsaveComponent>,
}

/// Debug registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

/// Pending exceptions, interrupts, NMI and SIPI (KVM_GET_VCPU_EVENTS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuEvents {
    pub exception_injected: u8,
    pub exception_nr: u8,
    pub exception_has_error_code: u8,
    pub exception_pending: u8,
    pub exception_error_code: u32,
    pub exception_has_payload: u8,
    pub exception_payload: u64,
    pub interrupt_injected: u8,
    pub interrupt_nr: u8,
    pub interrupt_soft: u8,
    pub interrupt_shadow: u8,
    pub nmi_injected: u8,
    pub nmi_pending: u8,
    pub nmi_masked: u8,
    pub sipi_vector: u32,
    pub smi_smm: u8,
    pub smi_pending: u8,
    pub smi_inside_nmi: u8,
    pub smi_latched_init: u8,
    pub triple_fault_pending: u8,
    /// KVM_VCPUEVENT_VALID_* flags of the fields above that are meaningful.
    pub flags: u32,
}

/// Everything of one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    pub id: u32,
    pub regs: Regs,
    pub sregs: Sregs,
    pub xsave: Xsave,
    /// (XCR index, value): XCR0 and any others.
    pub xcrs: Vec<(u32, u64)>,
    pub debug: DebugRegs,
    /// The local APIC register page (1 KiB).
    pub lapic: Vec<u8>,
    pub mp_state: u32,
    pub events: VcpuEvents,
    /// (MSR index, value), from the profile's allowlist.
    pub msrs: Vec<(u32, u64)>,
}

/// The in-kernel irqchip and timers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IrqchipState {
    /// Raw KVM_GET_IRQCHIP payloads (512 bytes each): PIC master, PIC slave, IOAPIC. These
    /// layouts are KVM's own and identical on every x86 host.
    pub pic_master: Vec<u8>,
    pub pic_slave: Vec<u8>,
    pub ioapic: Vec<u8>,
    /// KVM_GET_PIT2: the three channels and flags, as KVM lays them out (vendor-independent).
    pub pit: Vec<u8>,
    /// kvmclock: the guest's clock in ns when saved, and KVM's flags (not echoed on restore).
    pub clock_ns: u64,
    pub clock_flags: u32,
}

/// The 16550A UART's registers and unread input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// What the guest was booted with (the destination rebuilds the machine from it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineConfig {
    pub memory: u64,
    pub vcpus: u32,
    pub cmdline: String,
}

/// A range of guest RAM carried in the stream; pages not covered are zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryRange {
    pub gpa: u64,
    pub data: Vec<u8>,
}

/// One CPUID entry, the answer to (function, index): the cpuid crate's type, one for the CPU
/// model and the stream alike.
pub use cpuid::Leaf;

/// The guest CPU as the host that saved it ran it (format version 2 on): what a restoring
/// or receiving host compares with its own before it takes the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestCpu {
    /// The saving host's CPU vendor string (`GenuineIntel`, `AuthenticAMD`) and CPUID leaf 1
    /// EAX (family, model, stepping): where the state was made.
    pub host_vendor: String,
    pub host_signature: u32,
    /// The guest's TSC rate in kHz (KVM_GET_TSC_KHZ), 0 if the host could not say.
    pub tsc_khz: u32,
    /// vCPU 0's CPUID table as the saving host's KVM held it (KVM_GET_CPUID2): the profile's
    /// table plus whatever that KVM forced into it.
    pub cpuid: Vec<Leaf>,
}

/// What backs a virtio device: what the side that takes the guest must have too (format
/// version 3 on; the Hello carries the list before any memory moves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceBackend {
    /// virtio-blk on a raw image: its canonical path, its size in bytes, read-only or not.
    /// Both sides must name the same image (shared storage).
    Disk {
        path: String,
        size: u64,
        read_only: bool,
    },
    /// virtio-net: the MAC the guest knows, and the tap it was on (the other side may put
    /// it on another tap).
    Net { mac: [u8; 6], tap: String },
}

impl DeviceBackend {
    /// The virtio device ID of this backend's device (1: network, 2: block).
    pub fn device_type(&self) -> u32 {
        match self {
            DeviceBackend::Net { .. } => 1,
            DeviceBackend::Disk { .. } => 2,
        }
    }
}

/// One split virtqueue as the device last left it (virtio-queue's QueueState, plus whether
/// the driver gave it a size the device refused).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub size_refused: bool,
}

/// One virtio-mmio device: its backend and its transport's registers and queues (format
/// version 3 on). Where it sits on the bus and its IRQ line follow from its place in the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioState {
    pub backend: DeviceBackend,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    pub status: u32,
    pub interrupt_status: u32,
    pub queue_select: u32,
    /// The device refused the driver's rings (DEVICE_NEEDS_RESET): no work until a reset.
    pub broken: bool,
    pub queues: Vec<QueueState>,
}

/// A whole VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmState {
    pub config: MachineConfig,
    /// The guest CPU profile as its JSON file text (cpuid crate).
    pub cpu_profile: String,
    /// The guest CPU as the saving host ran it; None in a format version 1 stream.
    pub guest_cpu: Option<GuestCpu>,
    pub vcpus: Vec<VcpuState>,
    pub irqchip: IrqchipState,
    pub serial: SerialState,
    /// The virtio devices in bus order (format version 3 on; none in older streams).
    pub devices: Vec<VirtioState>,
    /// Guest RAM, sparse: only pages that are not zero.
    pub memory: Vec<MemoryRange>,
}
