//! The rules a stream's content keeps: the reader checks each record as it arrives, and the
//! writer checks a whole state with the same rules first ([`validate`]), so it never writes
//! what the reader refuses.

use super::error::{too_large, Error};
use crate::limits::*;
use crate::state::*;

/// Checks `vm` against every rule the reader applies: counts, caps, exact sizes, vCPU ids,
/// XSAVE components, duplicate MSR/XCR indices, memory ranges.
pub fn validate(vm: &VmState) -> Result<(), Error> {
    check_config(&vm.config)?;
    let profile_len = vm.cpu_profile.len() as u64;
    if profile_len > u64::from(MAX_PROFILE_JSON) {
        return Err(too_large(
            "cpu profile",
            profile_len,
            MAX_PROFILE_JSON.into(),
        ));
    }
    if let Some(g) = &vm.guest_cpu {
        check_guest_cpu(g)?;
    }
    let found = u32::try_from(vm.vcpus.len()).unwrap_or(u32::MAX);
    if found != vm.config.vcpus {
        return Err(Error::VcpuCount {
            expected: vm.config.vcpus,
            found,
        });
    }
    for (i, vcpu) in (0u32..).zip(&vm.vcpus) {
        check_vcpu(vcpu, i)?;
    }
    check_irqchip(&vm.irqchip)?;
    check_serial(&vm.serial)?;
    let n = vm.devices.len() as u64;
    if n > u64::from(MAX_VIRTIO_DEVICES) {
        return Err(too_large("VIRT sections", n, MAX_VIRTIO_DEVICES.into()));
    }
    for (i, d) in vm.devices.iter().enumerate() {
        check_virtio(d, i)?;
    }
    let mut mem = MemCheck::new(&vm.config);
    for r in &vm.memory {
        mem.range(r.gpa, r.data.len() as u64)?;
    }
    Ok(())
}

/// The rules for a machine config: 1..=MAX_VCPUS vCPUs, at most MAX_MEMORY of RAM.
pub(super) fn check_config(c: &MachineConfig) -> Result<(), Error> {
    if c.vcpus == 0 || c.vcpus > MAX_VCPUS {
        let v = c.vcpus;
        return Err(Error::VcpuRange(v));
    }
    if c.memory > MAX_MEMORY {
        return Err(too_large("config.memory", c.memory, MAX_MEMORY));
    }
    let len = c.cmdline.len() as u64;
    if len > u64::from(MAX_CMDLINE) {
        return Err(too_large("config.cmdline", len, MAX_CMDLINE.into()));
    }
    Ok(())
}

/// The rules for a GCPU record: a vendor string of at most 12 bytes, at most
/// [`MAX_CPUID_ENTRIES`] entries.
pub(super) fn check_guest_cpu(g: &GuestCpu) -> Result<(), Error> {
    let len = g.host_vendor.len() as u64;
    if len > u64::from(MAX_VENDOR) {
        return Err(too_large("GuestCpu.host_vendor", len, MAX_VENDOR.into()));
    }
    let n = g.cpuid.len() as u64;
    if n > u64::from(MAX_CPUID_ENTRIES) {
        return Err(too_large("GuestCpu.cpuid", n, MAX_CPUID_ENTRIES.into()));
    }
    Ok(())
}

/// The rules for one vCPU: its id, exact sizes, XSAVE components, unique XCR/MSR indices.
pub(super) fn check_vcpu(v: &VcpuState, expected: u32) -> Result<(), Error> {
    let id = v.id;
    if id != expected {
        return Err(Error::VcpuId {
            expected,
            found: id,
        });
    }
    exact_len(&v.lapic, LAPIC_SIZE, "lapic", Some(id))?;
    check_xsave(&v.xsave, id)?;
    check_pairs(&v.xcrs, MAX_XCRS, "XCR", "vCPU XCRs", id)?;
    check_pairs(&v.msrs, MAX_MSRS, "MSR", "vCPU MSRs", id)
}

/// Components ascend by index below 64; 0 (160 bytes) and 1 (256 bytes) are always there,
/// others hold 1..=cap bytes; every component XSTATE_BV marks as holding state is carried.
fn check_xsave(x: &Xsave, id: u32) -> Result<(), Error> {
    let n = x.components.len() as u64;
    if n > u64::from(MAX_XSAVE_COMPONENTS) {
        return Err(too_large(
            "vCPU XSAVE component count",
            n,
            MAX_XSAVE_COMPONENTS.into(),
        ));
    }
    let mut carried = 0u64;
    for c in &x.components {
        let (index, len) = (c.index, c.bytes.len());
        let bit = 1u64
            .checked_shl(index)
            .filter(|_| index < MAX_XSAVE_COMPONENTS);
        let Some(bit) = bit.filter(|b| *b > carried) else {
            return Err(Error::XsaveOrder { vcpu: id, index });
        };
        carried |= bit;
        let ok = match index {
            0 => len == XSAVE_X87_SIZE,
            1 => len == XSAVE_SSE_SIZE,
            _ => len > 0 && len as u64 <= u64::from(MAX_XSAVE_COMPONENT),
        };
        if !ok {
            return Err(Error::XsaveSize {
                vcpu: id,
                index,
                len,
            });
        }
    }
    if carried & 0b11 != 0b11 {
        return Err(Error::XsaveBase { vcpu: id });
    }
    let missing = x.xstate_bv & !carried;
    if missing != 0 {
        return Err(Error::XstateBv {
            vcpu: id,
            bv: x.xstate_bv,
            missing,
        });
    }
    Ok(())
}

/// At most `cap` (index, value) pairs, no index twice.
fn check_pairs(
    pairs: &[(u32, u64)],
    cap: u32,
    kind: &'static str,
    what: &'static str,
    id: u32,
) -> Result<(), Error> {
    let n = pairs.len() as u64;
    if n > u64::from(cap) {
        return Err(too_large(what, n, cap.into()));
    }
    let mut indices: Vec<u32> = pairs.iter().map(|p| p.0).collect();
    indices.sort_unstable();
    match indices.windows(2).find(|w| w.first() == w.get(1)) {
        Some(w) => Err(Error::Twice {
            vcpu: id,
            kind,
            index: w.first().copied().unwrap_or_default(),
        }),
        None => Ok(()),
    }
}

pub(super) fn check_irqchip(s: &IrqchipState) -> Result<(), Error> {
    exact_len(&s.pic_master, IRQCHIP_SIZE, "PIC master state", None)?;
    exact_len(&s.pic_slave, IRQCHIP_SIZE, "PIC slave state", None)?;
    exact_len(&s.ioapic, IRQCHIP_SIZE, "IOAPIC state", None)?;
    let len = s.pit.len() as u64;
    if len > u64::from(MAX_PIT) {
        return Err(too_large("PIT state", len, MAX_PIT.into()));
    }
    Ok(())
}

pub(super) fn check_serial(s: &SerialState) -> Result<(), Error> {
    let len = s.in_buffer.len() as u64;
    if len > u64::from(MAX_SERIAL_INPUT) {
        return Err(too_large(
            "serial input buffer",
            len,
            MAX_SERIAL_INPUT.into(),
        ));
    }
    Ok(())
}

/// The rules for a virtio device: at most [`MAX_VIRTIO_QUEUES`] queues, a disk path and a
/// tap name within their caps, a queue size no larger than its maximum.
pub(super) fn check_virtio(v: &VirtioState, index: usize) -> Result<(), Error> {
    let n = v.queues.len() as u64;
    if n > u64::from(MAX_VIRTIO_QUEUES) {
        return Err(too_large("virtio queues", n, MAX_VIRTIO_QUEUES.into()));
    }
    match &v.backend {
        DeviceBackend::Disk { path, .. } if path.len() as u64 > u64::from(MAX_DISK_PATH) => {
            return Err(too_large(
                "disk path",
                path.len() as u64,
                MAX_DISK_PATH.into(),
            ));
        }
        DeviceBackend::Net { tap, .. } if tap.len() as u64 > u64::from(MAX_TAP_NAME) => {
            return Err(too_large("tap name", tap.len() as u64, MAX_TAP_NAME.into()));
        }
        _ => {}
    }
    match v.queues.iter().position(|q| q.size > q.max_size) {
        Some(queue) => Err(Error::QueueSize {
            device: index,
            queue,
        }),
        None => Ok(()),
    }
}

fn exact_len(b: &[u8], want: usize, what: &'static str, vcpu: Option<u32>) -> Result<(), Error> {
    if b.len() == want {
        return Ok(());
    }
    Err(Error::Length {
        what,
        vcpu,
        len: b.len(),
        want,
    })
}

/// Running checks over the memory ranges of one stream, in order.
pub(super) struct MemCheck {
    memory: u64,
    bound: u64,
    total: u64,
    next_gpa: u64,
}

impl MemCheck {
    pub(super) fn new(config: &MachineConfig) -> Self {
        Self {
            memory: config.memory,
            bound: config.memory.saturating_add(MMIO_GAP_ALLOWANCE),
            total: 0,
            next_gpa: 0,
        }
    }

    pub(super) fn range(&mut self, gpa: u64, len: u64) -> Result<(), Error> {
        let err = |why| Err(Error::Memory { gpa, len, why });
        if len == 0 {
            return err("empty range");
        }
        if gpa % PAGE_SIZE != 0 {
            return err("gpa is not page aligned");
        }
        if len % PAGE_SIZE != 0 {
            return err("length is not a multiple of 4096");
        }
        if gpa < self.next_gpa {
            return err("overlaps or precedes the previous range (ranges must ascend)");
        }
        match gpa.checked_add(len) {
            Some(end) if end <= self.bound => self.next_gpa = end,
            _ => return err("ends beyond guest memory (config.memory + 4 GiB)"),
        }
        self.total = self.total.saturating_add(len);
        if self.total > self.memory {
            return err("ranges carry more bytes than config.memory");
        }
        Ok(())
    }
}
