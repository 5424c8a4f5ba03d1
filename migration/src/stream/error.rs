//! Why a stream was refused, one line each.

use std::io;

use super::Tag;
use crate::codec;
use crate::limits::{NEWEST_FORMAT_VERSION, OLDEST_FORMAT_VERSION};

/// Why a stream was refused (reading) or a state could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error at stream offset {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("stream truncated at offset {offset}: {what} is incomplete")]
    Truncated { offset: u64, what: &'static str },
    #[error("bad magic {found:02x?}: not a ferry VM stream")]
    BadMagic { found: [u8; 8] },
    #[error("stream format version {found}, this ferry reads versions {OLDEST_FORMAT_VERSION} to {NEWEST_FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("section {tag} at offset {offset} is not part of stream format version {version}")]
    NotInVersion { tag: Tag, offset: u64, version: u32 },
    #[error("stream header flags {0:#x}: no flags are defined, must be 0")]
    Flags(u32),
    #[error("unknown section tag {tag} at offset {offset}")]
    UnknownTag { tag: Tag, offset: u64 },
    #[error("section {found} at offset {offset} is out of order: expected {expected}")]
    Order {
        expected: &'static str,
        found: Tag,
        offset: u64,
    },
    #[error("duplicate section {tag} at offset {offset}")]
    Duplicate { tag: Tag, offset: u64 },
    #[error("the VM state is not the machine the Hello announced: its {what} is {found}, the Hello announced {announced}")]
    NotAnnounced {
        what: &'static str,
        found: u64,
        announced: u64,
    },
    #[error("the VM state is not the machine the Hello announced: the CPU profile differs from the Hello's")]
    ProfileNotAnnounced,
    #[error("{found} VCPU sections where the config says {expected} vCPUs")]
    VcpuCount { expected: u32, found: u32 },
    #[error("VCPU section {expected} carries vCPU id {found}; ids must be 0..n in order")]
    VcpuId { expected: u32, found: u32 },
    #[error("section {tag} version {found}, this ferry reads version {supported}")]
    SectionVersion {
        tag: Tag,
        found: u16,
        supported: u16,
    },
    #[error("section {tag} at offset {offset}: reserved field is {value:#x}, must be 0")]
    Reserved { tag: Tag, offset: u64, value: u16 },
    #[error(
        "section {tag} at offset {offset}: CRC32 {stored:#010x} stored, {computed:#010x} computed"
    )]
    Crc {
        tag: Tag,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("{what} is {len}, over the cap of {cap}")]
    TooLarge {
        what: &'static str,
        len: u64,
        cap: u64,
    },
    #[error("section {tag}: {source}")]
    Codec {
        tag: Tag,
        #[source]
        source: codec::Error,
    },
    #[error("invalid MEMR at offset {offset}: no ranges")]
    NoRanges { offset: u64 },
    #[error("invalid MEMI image: a byte outside every extent is not zero near stream offset {at}")]
    NonZeroOutsideExtents { at: u64 },
    #[error("invalid MEMI at offset {offset}: length {len} does not hold a {image}-byte image, {count} extents and {pad} bytes of padding (under 4096)")]
    ImageLength {
        offset: u64,
        len: u64,
        image: u64,
        count: u32,
        pad: u64,
    },
    #[error("invalid MEMI at offset {offset}: padding is not zero")]
    NonZeroPadding { offset: u64 },
    /// A writer was handed memory both in the state and beside it.
    #[error("invalid call of {0}: the state carries memory ranges of its own")]
    MemoryInState(&'static str),
    #[error("invalid config.vcpus {0}: must be 1..={max}", max = crate::limits::MAX_VCPUS)]
    VcpuRange(u32),
    #[error("invalid vCPU {vcpu} XSAVE component {index}: indices must ascend, below 64")]
    XsaveOrder { vcpu: u32, index: u32 },
    #[error("invalid vCPU {vcpu} XSAVE component {index}: {len} bytes (sizes are 0: 160, 1: 256, others 1..=65536)")]
    XsaveSize { vcpu: u32, index: u32, len: usize },
    #[error("invalid vCPU {vcpu} XSAVE: components 0 (x87) and 1 (SSE) are always carried")]
    XsaveBase { vcpu: u32 },
    #[error("invalid vCPU {vcpu} XSTATE_BV {bv:#x}: it marks components {missing:#x} that are not carried")]
    XstateBv { vcpu: u32, bv: u64, missing: u64 },
    #[error("invalid vCPU {vcpu}: {kind} {index:#x} appears more than once")]
    Twice {
        vcpu: u32,
        kind: &'static str,
        index: u32,
    },
    #[error("invalid virtio device {device}: queue {queue}'s size is above its maximum")]
    QueueSize { device: usize, queue: usize },
    /// A block of a fixed size (`vcpu` names whose, where it is a vCPU's).
    #[error("invalid {}{what}: {len} bytes, must be {want}", .vcpu.map(|v| format!("vCPU {v} ")).unwrap_or_default())]
    Length {
        what: &'static str,
        vcpu: Option<u32>,
        len: usize,
        want: usize,
    },
    #[error("memory range at gpa {gpa:#x}, length {len:#x}: {why}")]
    Memory {
        gpa: u64,
        len: u64,
        why: &'static str,
    },
    #[error("trailing bytes after END at offset {offset}")]
    Trailing { offset: u64 },
}

pub(crate) fn too_large(what: &'static str, len: u64, cap: u64) -> Error {
    Error::TooLarge { what, len, cap }
}
