//! The migration wire format and protocol: a bounds-checked little-endian codec, section
//! framing, the vendor-neutral VM, vCPU and device state, the receiver as a state machine
//! without I/O, and the convergence policy as a pure function of measured numbers.
//!
//! Pure: `std::io::{Read, Write}` only. The byte format is written by hand and documented in
//! docs/migration-format.md; no serializer defines it.
#![forbid(unsafe_code)]

pub mod auth;
pub mod codec;
pub mod converge;
pub mod limits;
pub mod pages;
pub mod protocol;
pub mod receiver;
mod records;
pub mod state;
pub mod stream;

pub use state::*;
pub use stream::{decode_vm, read_vm, read_vm_until_end, validate, write_vm, FORMAT_VERSION};
pub use stream::{read_head, read_head_as, write_vm_image, write_vm_ranges, Announced, Image};
