//! Control messages' payloads (docs/migration-format.md, section 14): written for a
//! message, and read, bounded, for a tag whose head has been read.

use std::io::Read;

use super::*;
use crate::codec::{Decoder, Encoder};
use crate::limits::{FORMAT_VERSION, MAX_PROFILE_JSON};
use crate::records::{dec_backends, dec_guest_cpu, enc_backends, enc_guest_cpu};

fn too_large(tag: &str, len: usize) -> Error {
    Error::TooLarge {
        tag: tag.into(),
        len: len.try_into().unwrap_or(u32::MAX),
    }
}

/// Writes `m`'s payload.
pub(super) fn encode(e: &mut Encoder, m: &Message) -> Result<(), Error> {
    match m {
        Message::Hello(h) => encode_hello(e, h)?,
        Message::Refuse(r) | Message::Failed(r) | Message::Cancel(r) => {
            let r: String = r.chars().take(MAX_REASON as usize / 4).collect();
            e.str_u32("reason", &r, MAX_REASON)?;
        }
        Message::Accept
        | Message::Restored
        | Message::Commit
        | Message::Running
        | Message::State
        | Message::Sync
        | Message::Synced
        | Message::PostcopyDone => {}
        Message::Missing { first_page, words } => {
            if words.len() > MAX_MISSING_WORDS || first_page % 64 != 0 {
                return Err(too_large("MISS", 12 + 8 * words.len()));
            }
            e.u64(*first_page);
            e.u32(words.len() as u32);
            words.iter().for_each(|w| e.u64(*w));
        }
        Message::PageRequest(ranges) => {
            if !request_fits(ranges) {
                return Err(too_large("PREQ", 4 + 12 * ranges.len()));
            }
            e.u32(ranges.len() as u32);
            for (gpa, pages) in ranges {
                e.u64(*gpa);
                e.u32(*pages);
            }
        }
        Message::Touched(words) => {
            if words.len() > MAX_TOUCHED_WORDS {
                return Err(too_large("TUCH", 4 + 8 * words.len()));
            }
            e.u32(words.len() as u32);
            words.iter().for_each(|w| e.u64(*w));
        }
        Message::AuthChallenge(n) | Message::AuthProof(n) => e.bytes(n),
        Message::AuthResponse(n, p) => {
            e.bytes(n);
            e.bytes(p);
        }
    }
    Ok(())
}

/// A Hello's payload: the version 1 fields, then (version 2 on) the guest CPU record, then
/// (version 3 on) the device list.
fn encode_hello(e: &mut Encoder, h: &Hello) -> Result<(), Error> {
    e.u32(h.format_version);
    e.u64(h.memory);
    e.u32(h.vcpus);
    e.str_u32("Hello profile", &h.cpu_profile, MAX_PROFILE_JSON)?;
    if h.format_version >= 2 {
        e.u8(u8::from(h.guest_cpu.is_some()));
        if let Some(g) = &h.guest_cpu {
            enc_guest_cpu(e, g)?;
        }
    }
    if h.format_version >= 3 {
        enc_backends(e, &h.devices)?;
    }
    Ok(())
}

/// Reads the payload of a control message whose head has been read.
pub(super) fn message(r: &mut impl Read, tag: [u8; 4], len: u32) -> Result<Message, Error> {
    let tag_s = printable(&String::from_utf8_lossy(&tag));
    if len > MAX_MESSAGE {
        return Err(Error::TooLarge { tag: tag_s, len });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    let mut d = Decoder::new(&payload);
    let m = match &tag {
        b"HELO" => Message::Hello(hello(&mut d)?),
        b"ACPT" => Message::Accept,
        b"RFSE" => Message::Refuse(printable(&d.str_u32("reason", MAX_REASON)?)),
        b"RSTD" => Message::Restored,
        b"FAIL" => Message::Failed(printable(&d.str_u32("reason", MAX_REASON)?)),
        b"CMIT" => Message::Commit,
        b"RUNG" => Message::Running,
        b"CNCL" => Message::Cancel(printable(&d.str_u32("reason", MAX_REASON)?)),
        b"VMST" => Message::State,
        b"SYNC" => Message::Sync,
        b"SYND" => Message::Synced,
        b"TUCH" => {
            let n = d.u32("Touched words")?;
            if n as usize > MAX_TOUCHED_WORDS {
                return Err(Error::TooLarge { tag: tag_s, len });
            }
            Message::Touched(
                (0..n)
                    .map(|_| d.u64("Touched word"))
                    .collect::<Result<_, _>>()?,
            )
        }
        b"AUT1" => Message::AuthChallenge(d.array("auth nonce")?),
        b"AUT2" => Message::AuthResponse(d.array("auth nonce")?, d.array("auth proof")?),
        b"AUT3" => Message::AuthProof(d.array("auth proof")?),
        b"MISS" => {
            let first_page = d.u64("Missing first page")?;
            let n = d.u32("Missing words")?;
            if n as usize > MAX_MISSING_WORDS || first_page % 64 != 0 {
                return Err(Error::TooLarge { tag: tag_s, len });
            }
            let words = (0..n)
                .map(|_| d.u64("Missing word"))
                .collect::<Result<_, _>>()?;
            Message::Missing { first_page, words }
        }
        b"PREQ" => {
            let n = d.u32("PageRequest ranges")?;
            if n as usize > MAX_REQUEST_RANGES {
                return Err(Error::TooLarge { tag: tag_s, len });
            }
            let ranges: Vec<(u64, u32)> = (0..n)
                .map(|_| Ok((d.u64("PageRequest address")?, d.u32("PageRequest pages")?)))
                .collect::<Result<_, crate::codec::Error>>()?;
            if !request_fits(&ranges) {
                return Err(Error::TooLarge { tag: tag_s, len });
            }
            Message::PageRequest(ranges)
        }
        b"PDON" => Message::PostcopyDone,
        _ => {
            return Err(Error::Unexpected {
                expected: "a migration message",
                found: tag_s,
            })
        }
    };
    d.finish("message payload")?;
    Ok(m)
}

/// Whether a PageRequest keeps to the caps: at most [`MAX_REQUEST_RANGES`] ranges, each
/// of at least one page, [`MAX_REQUEST_PAGES`] pages in all.
fn request_fits(ranges: &[(u64, u32)]) -> bool {
    let pages: u64 = ranges.iter().map(|&(_, n)| u64::from(n)).sum();
    ranges.len() <= MAX_REQUEST_RANGES
        && ranges.iter().all(|&(_, n)| n > 0)
        && pages <= u64::from(MAX_REQUEST_PAGES)
}

/// A Hello's payload: the version 1 fields, then (version 2 on) the guest CPU record, then
/// (version 3 on) the device list.
fn hello(d: &mut Decoder) -> Result<Hello, Error> {
    let format_version = d.u32("Hello version")?;
    let memory = d.u64("Hello memory")?;
    let vcpus = d.u32("Hello vcpus")?;
    let cpu_profile = d.str_u32("Hello profile", MAX_PROFILE_JSON)?;
    // A later version's fields are not this ferry's to read: the version alone is
    // refused, by name (the receiver checks it first).
    if format_version > FORMAT_VERSION {
        d.take("Hello fields of a later version", d.remaining())?;
    }
    let guest_cpu = match format_version {
        0 | 1 => None,
        v if v > FORMAT_VERSION => None,
        _ => match d.u8("Hello guest CPU present")? {
            0 => None,
            1 => Some(dec_guest_cpu(d)?),
            other => {
                return Err(Error::Unexpected {
                    expected: "0 or 1 for the Hello's guest CPU presence byte",
                    found: other.to_string(),
                })
            }
        },
    };
    let devices = match format_version {
        3..=FORMAT_VERSION => dec_backends(d)?,
        _ => Vec::new(),
    };
    Ok(Hello {
        format_version,
        memory,
        vcpus,
        cpu_profile,
        guest_cpu,
        devices,
    })
}
