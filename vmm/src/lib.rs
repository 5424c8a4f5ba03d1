//! ferry's virtual machine monitor: everything that touches KVM, threads, signals and sockets.
//!
//! ```text
//! cli (main.rs) -> VmConfig::validate -> vm::build
//!     Kvm + caps -> memory (mmap, memslots) -> boot (kernel, initrd, cmdline, e820, MP table)
//!     -> guest_cpu (the profile's CPUID, admitted on this host) -> vcpu (setup: LAPIC,
//!     registers; threads, paused) -> devices on the buses
//! vcpu thread i: loop { KVM_RUN -> one match on the exit -> bus }, commands via channel + kick
//! main thread:   waits for VM events (reset, poweroff, stop, guest failure); api thread
//!                serves the control socket
//! ```
//! This is the only crate of the workspace with `unsafe`; each block says why it is sound.

pub mod api;
pub mod boot;
pub mod codes;
pub mod config;
pub mod devices;
pub mod event;
pub mod files;
pub mod guest_cpu;
pub mod memory;
pub mod migrate;
pub mod monitor;
pub mod sandbox;
pub mod signals;
pub mod snapshot;
pub mod timeline;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use event::VmEvent;
pub use vcpu::RunState;
pub use vm::Vm;
