//! What a destination takes: the limits it was given (`--max-memory`, `--max-vcpus`, by
//! default what this host can hold) and a Hello checked against this host (format version,
//! machine size, CPU profile, the guest CPU as run), all before anything is allocated.

use cpuid::profile::CpuProfile;
use cpuid::CpuidDump;
use migration::protocol::Hello;

use super::error::ReceiveError as Error;
use crate::guest_cpu::admission::Refusal;

/// What this host can hold: its available memory less an eighth (and at least 256 MiB)
/// for itself, as /proc/meminfo says now; no limit where it cannot tell (the machine's own
/// checks still apply).
pub fn host_memory_limit() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    match available.map(|kib| kib * 1024) {
        Some(bytes) => bytes.saturating_sub((bytes / 8).max(256 << 20)),
        None => u64::MAX,
    }
}

/// The default vCPU limit: four per host CPU.
pub fn host_vcpu_limit() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32) * 4
}

/// Whether the Hello asks for no more than this side takes (`--max-memory`, `--max-vcpus`),
/// checked before anything is allocated.
pub(super) fn within_limits(h: &Hello, max_memory: u64, max_vcpus: u32) -> Result<(), Error> {
    if h.memory > max_memory {
        return Err(Error::TooMuchMemory {
            asked: h.memory,
            max: max_memory,
        });
    }
    if h.vcpus > max_vcpus {
        return Err(Error::TooManyVcpus {
            asked: h.vcpus,
            max: max_vcpus,
        });
    }
    Ok(())
}

/// Whether this host can take the VM a Hello describes; why not if not.
pub(super) fn acceptable(h: &Hello, host: Option<&CpuidDump>) -> Result<(), Error> {
    use migration::limits::{FORMAT_VERSION, OLDEST_FORMAT_VERSION};
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&h.format_version) {
        return Err(Error::FormatVersion(h.format_version));
    }
    // The machine's size, checked here so that a Hello this host cannot build is refused
    // before Accept (the machine is built while pages arrive).
    let kvm = crate::vm::open_kvm().map_err(Error::Machine)?;
    crate::config::validate_memory(h.memory)
        .and_then(|()| crate::config::validate_vcpus(h.vcpus, crate::vm::max_vcpus(&kvm)))
        .map_err(|e| Error::Machine(e.into()))?;
    let profile = CpuProfile::from_json("the source's CPU profile", &h.cpu_profile)?;
    let live;
    let host = match host {
        Some(h) => h,
        None => {
            live =
                crate::guest_cpu::model::host_dump(&kvm).map_err(|e| Error::Machine(e.into()))?;
            &live
        }
    };
    crate::guest_cpu::admission::runs_here(&profile, host).map_err(Refusal::from)?;
    // The guest CPU as the source runs it against what this host's KVM makes of the
    // profile: refused here, before Accept, rather than by the machine built after it.
    let here = crate::guest_cpu::admission::probe(&kvm, &profile, h.vcpus)?;
    crate::guest_cpu::admission::admit(h.guest_cpu.as_ref(), &profile, h.vcpus, &here)?;
    Ok(())
}
