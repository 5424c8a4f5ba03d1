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
    #[error("the VM state is not the machine the Hello announced: {0}")]
    NotAnnounced(String),
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
    #[error("invalid {0}")]
    Invalid(String),
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
