//! The guest CPU model: CPUID leaves and named feature bits as data, parsers for CPU dumps,
//! CPU profiles, baselines across hosts and vendors, and the guest CPUID table.
//!
//! ```text
//! dump files / live host --parse--> CpuidDump (leaves) --features--> named feature set
//! CpuidDump x N --baseline--> CpuProfile (identity + features + policies) --check(host)--> ok | missing
//! CpuProfile + host + vCPU count --guest_table--> the CPUID table KVM gets
//! saved effective table + this host's --effective::compare--> refused | reported
//! guest TSC rate + this host's --tsc::plan--> keep | scale | unscaled | refused
//! ```
//! Pure: no /dev/kvm and no I/O besides reading dump files. The vmm crate applies what this
//! crate computes.
#![forbid(unsafe_code)]

pub mod builtin;
pub mod docs;
pub mod dump;
pub mod effective;
pub mod features;
pub mod leaf;
pub mod profile;
pub mod table;
pub mod tsc;

pub use leaf::{CpuidDump, Leaf, Reg, Vendor};
