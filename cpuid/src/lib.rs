//! The guest CPU model: CPUID leaves and named feature bits as data, parsers for CPU dumps,
//! CPU profiles, baselines across hosts and vendors, and the guest CPUID table.
//!
//! Pure: no /dev/kvm and no I/O besides reading dump files. The vmm crate applies what this
//! crate computes. (The model arrives with the CPU profile work; today ferry passes the
//! host's supported CPUID with per-vCPU identity, see vmm/src/cpu.rs.)
#![forbid(unsafe_code)]
