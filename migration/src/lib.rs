//! The migration wire format and protocol: a bounds-checked little-endian codec, section
//! framing, the vendor-neutral VM, vCPU and device state, the receiver as a state machine
//! without I/O, and the convergence policy as a pure function of measured numbers.
//!
//! Pure: `std::io::{Read, Write}` only. (The format arrives with the snapshot work.)
#![forbid(unsafe_code)]
