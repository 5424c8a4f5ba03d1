//! The guest's CPU on this host: which profile a guest gets and whether this host can run it.
//!
//! ```text
//! model.rs      this host's CPUID as KVM offers it, profile names and files, the profile's
//!               table as KVM's CpuId, what this host's KVM did to it
//! admission.rs  the one place that decides whether this host runs a profile (ferry run,
//!               restore and receive alike), and for a guest saved elsewhere whether its CPU
//!               as that host ran it (TSC rate, effective CPUID) can go on here
//! ```
//! The vCPUs themselves (threads, state, MSRs, setup) are in crate::vcpu.

pub mod admission;
pub mod model;
