//! ferry's virtual machine monitor: everything that touches KVM, threads, signals and sockets.
//!
//! ```text
//! cli (main.rs) -> VmConfig::validate -> vm::build
//!     Kvm + caps -> memory (mmap, memslots) -> boot (kernel, initrd, cmdline, e820, MP table)
//!     -> cpu (CPUID, LAPIC, registers) -> vcpu threads (paused) -> devices on the buses
//! vcpu thread i: loop { KVM_RUN -> one match on the exit -> bus }, commands via channel + kick
//! main thread:   waits for VM events (reset, poweroff, stop, guest failure); api thread
//!                serves the control socket
//! ```
//! This is the only crate of the workspace with `unsafe`; each block says why it is sound.

pub mod admit;
pub mod api;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod cpu_model;
pub mod devices;
pub mod event;
pub mod files;
pub mod memory;
pub mod migrate;
pub mod msrs;
pub mod sandbox;
pub mod snapshot;
pub mod timeline;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;

pub use config::VmConfig;
pub use event::VmEvent;
pub use vcpu::RunState;
pub use vm::Vm;
