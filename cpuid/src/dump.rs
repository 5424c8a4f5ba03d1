//! Parsers for CPUID dump files. Each reads one file's text and returns the [`CpuidDump`] of
//! the first logical CPU in it (the formats are described in `testdata/SOURCES.md`):
//!
//! | parser | format |
//! |---|---|
//! | [`parse_instlatx64`] | InstLatx64 / AIDA64 / EVEREST text: `CPUID 00000001: A-B-C-D [SL xx]` |
//! | [`parse_libcpuid`] | libcpuid raw dump: `basic_cpuid[1]=a b c d`, `intel_fn4[0]=...` |
//! | [`parse_libvirt_xml`] | libvirt cputestdata: `<cpuid eax_in='..' ecx_in='..' eax='..' .../>` |
//! | [`parse_cpuid_raw`] | `cpuid -r`: `   0x00000001 0x00: eax=0x... ebx=... ecx=... edx=...` |
//! | [`parse_firecracker_fingerprint`] | Firecracker `cpu-template-helper fingerprint dump` JSON |
//! | [`parse_json`] | ferry's own form: the JSON of a [`CpuidDump`] |
//!
//! [`parse_any`] picks the parser from the content; [`load`] reads a file and calls it.
//! Parsers never panic; they refuse files over 16 MiB, lines over 4 KiB (in the line-based
//! formats) and dumps of more than 4096 leaves. Every dump's `source` is the given source
//! name (for [`parse_json`] too, whatever source the JSON names).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use serde_json::Value;

use crate::leaf::{CpuidDump, Leaf, Reg};

/// The most leaves a dump may have.
pub const MAX_LEAVES: usize = 4096;
/// The longest line the line-based formats accept, in bytes.
pub const MAX_LINE: usize = 4096;
/// The largest file [`load`] reads, in bytes.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Functions whose ECX input selects a subleaf. In InstLatx64 text, repeated untagged lines of
/// one of these are subleaves 0, 1, 2... in order (EVEREST writes leaf 4 that way).
#[rustfmt::skip]
const SUBLEAF_FUNCTIONS: &[u32] = &[
    4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1F, 0x20, 0x23, 0x24,
    0x8000_001D, 0x8000_0020, 0x8000_0026,
];

/// Why a dump could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot read: {err}")]
    Io {
        path: String,
        #[source]
        err: std::io::Error,
    },
    #[error("{path}: larger than the {max}-byte limit for dump files")]
    TooLarge { path: String, max: u64 },
    #[error("{file}:{line}: line longer than the {max}-byte limit")]
    LineTooLong {
        file: String,
        line: usize,
        max: usize,
    },
    #[error("{file}:{line}: {msg}")]
    Syntax {
        file: String,
        line: usize,
        msg: String,
    },
    #[error("{file}: {msg}")]
    Invalid { file: String, msg: String },
    #[error("{file}: more than {max} CPUID leaves")]
    TooManyLeaves { file: String, max: usize },
    #[error("{file}: no CPUID leaves found (read as {format})")]
    NoLeaves { file: String, format: &'static str },
    #[error(
        "{file}: not a CPUID dump format ferry reads (InstLatx64/AIDA64 text, libcpuid raw dump, \
         libvirt cputestdata XML, `cpuid -r` output, Firecracker fingerprint JSON, ferry JSON)"
    )]
    UnknownFormat { file: String },
}

fn syntax(file: &str, line: usize, msg: impl Into<String>) -> Error {
    Error::Syntax {
        file: file.into(),
        line,
        msg: msg.into(),
    }
}

fn invalid(file: &str, msg: impl Into<String>) -> Error {
    Error::Invalid {
        file: file.into(),
        msg: msg.into(),
    }
}

/// Leaves being collected: at most [`MAX_LEAVES`].
struct Leaves<'a> {
    file: &'a str,
    v: Vec<Leaf>,
}

impl<'a> Leaves<'a> {
    fn new(file: &'a str) -> Self {
        Leaves {
            file,
            v: Vec::new(),
        }
    }

    fn push(&mut self, l: Leaf) -> Result<(), Error> {
        if self.v.len() >= MAX_LEAVES {
            return Err(Error::TooManyLeaves {
                file: self.file.into(),
                max: MAX_LEAVES,
            });
        }
        self.v.push(l);
        Ok(())
    }

    fn finish(self, format: &'static str) -> Result<CpuidDump, Error> {
        if self.v.is_empty() {
            return Err(Error::NoLeaves {
                file: self.file.into(),
                format,
            });
        }
        Ok(CpuidDump::new(self.file, self.v))
    }
}

/// The lines of `text`, numbered from 1, each checked against [`MAX_LINE`].
fn lines<'t>(
    file: &'t str,
    text: &'t str,
) -> impl Iterator<Item = Result<(usize, &'t str), Error>> + 't {
    text.lines().enumerate().map(move |(i, l)| {
        if l.len() > MAX_LINE {
            Err(Error::LineTooLong {
                file: file.into(),
                line: i + 1,
                max: MAX_LINE,
            })
        } else {
            Ok((i + 1, l))
        }
    })
}

/// A hex number of 1 to 8 digits, with or without `0x`.
fn hex(s: &str) -> Option<u32> {
    let d = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if d.is_empty() || d.len() > 8 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(d, 16).ok()
}

fn leaf(function: u32, index: u32, r: [u32; 4]) -> Leaf {
    Leaf {
        function,
        index,
        eax: r[0],
        ebx: r[1],
        ecx: r[2],
        edx: r[3],
    }
}

// ---- InstLatx64 / AIDA64 / EVEREST ----

/// A header that starts a logical CPU's block (or another section).
fn is_block_header(line: &str) -> bool {
    line.starts_with("------[") || (line.starts_with("CPU#") && line.contains("AffMask"))
}

/// `(function, rest)` if `line` is a register line (`CPUID LLLLLLLL:` + rest); other lines
/// starting with `CPUID` (`CPUID Manufacturer : ...`) are not.
fn instlatx64_register_line(line: &str) -> Option<(u32, &str)> {
    let rest = line.strip_prefix("CPUID ")?;
    let f = rest.get(..8)?;
    let tail = rest.get(8..)?.strip_prefix(':')?;
    f.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| (hex(f).unwrap_or(0), tail))
}

/// InstLatx64 / AIDA64 / EVEREST text; the first logical CPU's block.
pub fn parse_instlatx64(source: &str, text: &str) -> Result<CpuidDump, Error> {
    let mut out = Leaves::new(source);
    let mut seen = BTreeSet::new();
    let mut next_index: BTreeMap<u32, u32> = BTreeMap::new();
    for l in lines(source, text) {
        let (n, line) = l?;
        let line = line.trim_end();
        if is_block_header(line) {
            if out.v.is_empty() {
                continue;
            }
            break;
        }
        let Some((function, tail)) = instlatx64_register_line(line) else {
            continue;
        };
        let tail = tail.trim_start();
        let mut regs = [0u32; 4];
        let mut parts = tail.get(..35).unwrap_or(tail).split('-');
        for r in &mut regs {
            *r = parts.next().and_then(hex).ok_or_else(|| {
                syntax(
                    source,
                    n,
                    format!("expected EAX-EBX-ECX-EDX in hex after CPUID {function:08X}:"),
                )
            })?;
        }
        let rest = tail.get(35..).unwrap_or("");
        let tag = match rest.find("[SL ") {
            None => None,
            Some(i) => {
                let t = &rest[i + 4..];
                let v = t.find(']').and_then(|j| hex(t[..j].trim()));
                Some(
                    v.ok_or_else(|| syntax(source, n, "malformed subleaf tag (expected [SL xx])"))?,
                )
            }
        };
        if function == 0x8FFF_FFFF {
            continue; // AMD's easter-egg leaf
        }
        let index = match tag {
            Some(i) => i,
            None if SUBLEAF_FUNCTIONS.contains(&function) => {
                next_index.get(&function).copied().unwrap_or(0)
            }
            None => 0,
        };
        if !seen.insert((function, index)) {
            if function == 0 {
                break; // leaf 0 again: the next CPU, in a file without block headers
            }
            continue;
        }
        next_index.insert(function, index.saturating_add(1));
        out.push(leaf(function, index, regs))?;
    }
    out.finish("InstLatx64/AIDA64 text")
}

// ---- libcpuid ----

/// libcpuid raw dump; the first logical CPU, clipped to the max basic and extended leaves.
pub fn parse_libcpuid(source: &str, text: &str) -> Result<CpuidDump, Error> {
    let mut out = Leaves::new(source);
    for l in lines(source, text) {
        let (n, line) = l?;
        let line = line.trim();
        if line.len() >= 16 && line.bytes().all(|b| b == b'-') {
            break; // libcpuid's expected decoded values follow
        }
        if line.starts_with('_') && line.contains("Logical CPU #") {
            if out.v.is_empty() {
                continue;
            }
            break;
        }
        let Some((key, values)) = line.split_once('=') else {
            continue;
        };
        let Some((name, idx)) = key.trim().split_once('[') else {
            continue;
        };
        let base: fn(u32) -> Option<(u32, u32)> = match name {
            "basic_cpuid" => |i| (i < 0x4000_0000).then_some((i, 0)),
            "ext_cpuid" => |i| (i < 0x1000_0000).then_some((0x8000_0000 | i, 0)),
            "intel_fn4" => |i| Some((4, i)),
            "intel_fn11" => |i| Some((0xB, i)),
            "intel_fn12h" => |i| Some((0x12, i)),
            "intel_fn14h" => |i| Some((0x14, i)),
            "amd_fn8000001dh" => |i| Some((0x8000_001D, i)),
            _ => continue,
        };
        let i = idx.strip_suffix(']').and_then(|s| s.parse::<u32>().ok());
        let Some((function, index)) = i.and_then(base) else {
            return Err(syntax(
                source,
                n,
                format!("bad or out-of-range index in {name}[{idx}"),
            ));
        };
        let v: Vec<Option<u32>> = values.split_whitespace().take(5).map(hex).collect();
        let [Some(a), Some(b), Some(c), Some(d)] = v[..] else {
            return Err(syntax(
                source,
                n,
                format!("{key}: expected four hex registers"),
            ));
        };
        out.push(leaf(function, index, [a, b, c, d]))?;
    }
    let find = |f: u32| {
        out.v
            .iter()
            .rev()
            .find(|l| l.function == f && l.index == 0)
            .map(|l| l.eax)
    };
    let max_basic =
        find(0).ok_or_else(|| invalid(source, "no basic_cpuid[0] (max leaf and vendor)"))?;
    let max_ext = find(0x8000_0000);
    out.v.retain(|l| match l.function {
        f if f < 0x8000_0000 => f <= max_basic,
        0x8000_0000 => true,
        f => max_ext.is_some_and(|m| f <= m),
    });
    out.finish("libcpuid raw dump")
}

// ---- libvirt cputestdata XML ----

/// The attributes of an element's text (after the tag name), in order.
fn xml_attrs(mut s: &str) -> Result<Vec<(&str, &str)>, String> {
    let mut out = Vec::new();
    s = s.trim();
    while !s.is_empty() {
        if out.len() >= 16 {
            return Err("too many attributes".into());
        }
        let eq = s.find('=').ok_or("attribute without a value")?;
        let name = s[..eq].trim();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b':')
        {
            return Err(format!("bad attribute name {name:?}"));
        }
        let v = s[eq + 1..].trim_start();
        let q = match v.bytes().next() {
            Some(q @ (b'\'' | b'"')) => q as char,
            _ => return Err(format!("attribute {name}: value is not quoted")),
        };
        let close = v[1..]
            .find(q)
            .ok_or_else(|| format!("attribute {name}: unterminated value"))?;
        out.push((name, &v[1..1 + close]));
        s = v[close + 2..].trim_start();
    }
    Ok(out)
}

/// libvirt cputestdata XML (`cpu-gather.py` output): its `<cpuid .../>` elements.
pub fn parse_libvirt_xml(source: &str, text: &str) -> Result<CpuidDump, Error> {
    let mut out = Leaves::new(source);
    let (mut pos, mut line, mut counted) = (0usize, 1usize, 0usize);
    while let Some(i) = text[pos..].find('<') {
        let start = pos + i;
        line += text.as_bytes()[counted..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        counted = start;
        let rest = &text[start..];
        if rest.starts_with("<!--") {
            let Some(end) = rest.find("-->") else {
                return Err(syntax(source, line, "unterminated comment"));
            };
            pos = start + end + 3;
            continue;
        }
        pos = start + 1;
        let Some(body) = rest.strip_prefix("<cpuid") else {
            continue;
        };
        if !body.starts_with(|c: char| c.is_ascii_whitespace()) {
            continue; // <cpuidfoo>, or <cpuid> without attributes
        }
        let end = match body.find('>') {
            Some(e) if e <= 1024 => e,
            _ => {
                return Err(syntax(
                    source,
                    line,
                    "unterminated or over-long <cpuid> element",
                ))
            }
        };
        pos = start + "<cpuid".len() + end + 1;
        let attrs = xml_attrs(body[..end].trim_end().trim_end_matches('/'))
            .map_err(|m| syntax(source, line, m))?;
        let get = |name: &str, default: Option<u32>| -> Result<u32, Error> {
            match attrs.iter().find(|(k, _)| *k == name) {
                Some((_, v)) => hex(v).ok_or_else(|| {
                    syntax(
                        source,
                        line,
                        format!("{name}='{v}' is not a 32-bit hex value"),
                    )
                }),
                None => {
                    default.ok_or_else(|| syntax(source, line, format!("<cpuid> without {name}")))
                }
            }
        };
        let l = leaf(
            get("eax_in", None)?,
            get("ecx_in", Some(0))?,
            [
                get("eax", None)?,
                get("ebx", None)?,
                get("ecx", None)?,
                get("edx", None)?,
            ],
        );
        out.push(l)?;
    }
    out.finish("libvirt cputestdata XML")
}

// ---- cpuid -r ----

fn is_cpuid_raw_header(line: &str) -> bool {
    line.strip_prefix("CPU")
        .and_then(|r| r.strip_suffix(':'))
        .is_some_and(|n| {
            n.is_empty()
                || (n.starts_with(' ') && n[1..].bytes().all(|b| b.is_ascii_digit()) && n.len() > 1)
        })
}

/// `0x00000001 0x00: eax=...` of `cpuid -r`.
fn is_cpuid_raw_leaf_line(line: &str) -> bool {
    line.starts_with("0x") && line.contains(": eax=")
}

/// `cpuid -r` / `cpuid -1r` output (Todd Allen's cpuid); the first `CPU n:` block.
pub fn parse_cpuid_raw(source: &str, text: &str) -> Result<CpuidDump, Error> {
    let mut out = Leaves::new(source);
    for l in lines(source, text) {
        let (n, line) = l?;
        let line = line.trim();
        if is_cpuid_raw_header(line) {
            if out.v.is_empty() {
                continue;
            }
            break;
        }
        if !line.starts_with("0x") {
            continue;
        }
        let bad = |what: &str| {
            syntax(
                source,
                n,
                format!("{what} (expected `0xLEAF 0xSUB: eax=0x.. ebx=0x.. ecx=0x.. edx=0x..`)"),
            )
        };
        let (head, regs) = line.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let mut h = head.split_whitespace();
        let (Some(function), Some(index), None) =
            (h.next().and_then(hex), h.next().and_then(hex), h.next())
        else {
            return Err(bad("bad leaf or subleaf"));
        };
        let mut r: [Option<u32>; 4] = [None; 4];
        for part in regs.split_whitespace().take(8) {
            let (name, v) = part
                .split_once('=')
                .ok_or_else(|| bad("register without '='"))?;
            let slot = match name {
                "eax" => 0,
                "ebx" => 1,
                "ecx" => 2,
                "edx" => 3,
                _ => return Err(bad("unknown register")),
            };
            r[slot] = Some(hex(v).ok_or_else(|| bad("bad register value"))?);
        }
        let [Some(a), Some(b), Some(c), Some(d)] = r else {
            return Err(bad("missing register"));
        };
        out.push(leaf(function, index, [a, b, c, d]))?;
    }
    out.finish("`cpuid -r` output")
}

// ---- JSON: Firecracker fingerprints and ferry's own form ----

fn json(source: &str, text: &str) -> Result<Value, Error> {
    serde_json::from_str(text).map_err(|e| syntax(source, e.line(), format!("invalid JSON: {e}")))
}

/// A 32-bit number written as a JSON number, "0x..." or a decimal string.
fn json_u32(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
        Value::String(s) if s.starts_with("0x") || s.starts_with("0X") => hex(s),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A Firecracker register bitmap `0b` + up to 32 of `0`, `1`, `x` (don't care, read as 0).
fn bitmap(s: &str) -> Option<u32> {
    let d = s.strip_prefix("0b")?;
    if d.is_empty() || d.len() > 32 {
        return None;
    }
    d.bytes().try_fold(0u32, |acc, b| match b {
        b'0' | b'x' | b'X' => Some(acc << 1),
        b'1' => Some(acc << 1 | 1),
        _ => None,
    })
}

fn firecracker_from_value(source: &str, v: &Value) -> Result<CpuidDump, Error> {
    let mods = v
        .pointer("/guest_cpu_config/cpuid_modifiers")
        .or_else(|| v.get("cpuid_modifiers"))
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(source, "no guest_cpu_config.cpuid_modifiers array"))?;
    let mut out = Leaves::new(source);
    for (i, m) in mods.iter().enumerate() {
        let at = format!("cpuid_modifiers[{i}]");
        let function = m
            .get("leaf")
            .and_then(json_u32)
            .ok_or_else(|| invalid(source, format!("{at}: missing or bad leaf")))?;
        let index = match m.get("subleaf") {
            None => 0,
            Some(s) => json_u32(s).ok_or_else(|| invalid(source, format!("{at}: bad subleaf")))?,
        };
        let mut l = leaf(function, index, [0; 4]);
        let regs = m
            .get("modifiers")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(source, format!("{at}: no modifiers array")))?;
        for (j, r) in regs.iter().enumerate() {
            let reg = match r.get("register").and_then(Value::as_str) {
                Some("eax") => Reg::Eax,
                Some("ebx") => Reg::Ebx,
                Some("ecx") => Reg::Ecx,
                Some("edx") => Reg::Edx,
                _ => {
                    return Err(invalid(
                        source,
                        format!("{at}.modifiers[{j}]: register is not eax, ebx, ecx or edx"),
                    ))
                }
            };
            let b = r.get("bitmap").and_then(Value::as_str).and_then(bitmap);
            *l.reg_mut(reg) = b.ok_or_else(|| {
                invalid(
                    source,
                    format!("{at}.modifiers[{j}]: bitmap is not 0b + up to 32 of 0/1/x"),
                )
            })?;
        }
        out.push(l)?;
    }
    out.finish("Firecracker fingerprint")
}

fn ferry_from_value(source: &str, v: Value) -> Result<CpuidDump, Error> {
    let d: CpuidDump = serde_json::from_value(v)
        .map_err(|e| invalid(source, format!("not a ferry CPUID dump: {e}")))?;
    let mut out = Leaves::new(source);
    for l in d.leaves {
        out.push(l)?;
    }
    out.finish("ferry JSON")
}

/// Firecracker's `cpu-template-helper fingerprint dump` JSON (or a custom CPU template):
/// `guest_cpu_config.cpuid_modifiers`, each register's bitmap read with `x` as 0.
pub fn parse_firecracker_fingerprint(source: &str, text: &str) -> Result<CpuidDump, Error> {
    firecracker_from_value(source, &json(source, text)?)
}

/// ferry's own form: the JSON of a [`CpuidDump`] (sorted and deduplicated on reading).
pub fn parse_json(source: &str, text: &str) -> Result<CpuidDump, Error> {
    ferry_from_value(source, json(source, text)?)
}

// ---- dispatch ----

/// Reads `text` in whichever supported format it is in.
pub fn parse_any(source: &str, text: &str) -> Result<CpuidDump, Error> {
    let t = text.trim_start_matches('\u{feff}').trim_start();
    if t.starts_with('{') {
        let v = json(source, t)?;
        if v.get("leaves").is_some() {
            return ferry_from_value(source, v);
        }
        if v.pointer("/guest_cpu_config/cpuid_modifiers").is_some()
            || v.get("cpuid_modifiers").is_some()
        {
            return firecracker_from_value(source, &v);
        }
    } else if t.starts_with('<') && t.contains("<cpuid") {
        return parse_libvirt_xml(source, text);
    } else {
        for line in text.lines() {
            let l = line.trim();
            if l.starts_with("basic_cpuid[") {
                return parse_libcpuid(source, text);
            }
            if instlatx64_register_line(l).is_some() {
                return parse_instlatx64(source, text);
            }
            if is_cpuid_raw_leaf_line(l) {
                return parse_cpuid_raw(source, text);
            }
        }
    }
    Err(Error::UnknownFormat {
        file: source.into(),
    })
}

/// Reads the dump file at `path` (at most [`MAX_FILE_BYTES`]); its file name is the source.
pub fn load(path: &Path) -> Result<CpuidDump, Error> {
    let shown = path.display().to_string();
    let io = |err| Error::Io {
        path: shown.clone(),
        err,
    };
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::TooLarge {
            path: shown,
            max: MAX_FILE_BYTES,
        });
    }
    let name = path
        .file_name()
        .map_or_else(|| shown.clone(), |n| n.to_string_lossy().into_owned());
    parse_any(&name, &String::from_utf8_lossy(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSTLAT: &str = "------[ Versions ]------\n\
CPUID Manufacturer : GenuineIntel\n\
------[ Logical CPU #0 ]------\n\
\n\
CPUID 00000000: 0000000D-756E6547-6C65746E-49656E69 [GenuineIntel]\n\
CPUID 00000001: 00010676-00040800-000CE3BD-BFEBFBFF \n\
CPUID 00000004: 0C000121-01C0003F-0000003F-00000001\n\
CPUID 00000004: 0C000122-01C0003F-0000003F-00000001\n\
CPUID 0000000D: 00000207-00000340-00000988-00000000 [SL 00] [x87]\n\
CPUID 0000000D: 00000008-00000980-00000000-00000000 [SL 09] [PKRU]\n\
CPUID 80000000: 80000008-00000000-00000000-00000000\n\
CPUID 8FFFFFFF: 00000000-00000000-00000000-00000000\n\
\n\
------[ Logical CPU #1 ]------\n\
CPUID 00000000: 0000000A-756E6547-6C65746E-49656E69\n\
CPUID 00000001: 00010676-01040800-000CE3BD-BFEBFBFF\n";

    const LIBCPUID: &str = "version=0.6.0\n\
basic_cpuid[0]=00000001 756e6547 6c65746e 49656e69\n\
basic_cpuid[1]=00010676 05040800 000ce3bd bfebfbff\n\
basic_cpuid[2]=00010676 05040800 000ce3bd bfebfbff\n\
ext_cpuid[0]=80000001 00000000 00000000 00000000\n\
ext_cpuid[1]=00000000 00000000 00000001 20100000\n\
ext_cpuid[2]=00000001 00000000 00000000 00000000\n\
intel_fn4[1]=0c000122 01c0003f 0000003f 00000001\n\
--------------------------------------------------------------------------------\n\
basic_cpuid[3]=zz\n";

    const XML: &str = "<!-- Some CPU <cpuid> in a comment -->\n<cpudata arch='x86'>\n  \
<cpuid eax_in='0x00000000' ecx_in='0x00' eax='0x00000010' ebx='0x68747541' ecx='0x444d4163' edx='0x69746e65'/>\n  \
<cpuid eax_in='0x0000000d' ecx_in=\"0x09\" eax='0x00000008' ebx='0x00000980' ecx='0x00000000' edx='0x00000000'/>\n  \
<msr index='0x10a' edx='0x00000000' eax='0x00000069'/>\n</cpudata>\n";

    const RAW: &str = "CPU 0:\n   0x00000000 0x00: eax=0x0000001c ebx=0x68747541 ecx=0x444d4163 edx=0x69746e65\n   \
0x0000000b 0x01: eax=0x00000005 ebx=0x00000002 ecx=0x00000201 edx=0x00000000\nCPU 1:\n   \
0x00000000 0x00: eax=0x00000001 ebx=0x68747541 ecx=0x444d4163 edx=0x69746e65\n";

    const FC: &str = r#"{"kernel_version": "6.18", "guest_cpu_config": {"cpuid_modifiers": [
        {"leaf": "0x7", "subleaf": "0x1", "flags": 1, "modifiers": [
            {"register": "eax", "bitmap": "0b00000000000000000000000000110000"},
            {"register": "edx", "bitmap": "0b1x1"}]},
        {"leaf": "0x0", "subleaf": "0x0", "flags": 0, "modifiers": [{"register": "eax", "bitmap": "0b111"}]}
    ], "msr_modifiers": []}}"#;

    fn get(d: &CpuidDump, f: u32, i: u32) -> Leaf {
        *d.get(f, i).unwrap_or_else(|| panic!("no leaf {f:#x}.{i}"))
    }

    #[test]
    fn instlatx64_first_cpu_and_subleaves() {
        let d = parse_instlatx64("t.txt", INSTLAT).unwrap();
        assert_eq!(d.source, "t.txt");
        assert_eq!(get(&d, 0, 0).eax, 0xD);
        assert_eq!(
            get(&d, 1, 0).ebx,
            0x0004_0800,
            "CPU #0's APIC ID, not CPU #1's"
        );
        assert_eq!(get(&d, 4, 0).eax, 0x0C00_0121);
        assert_eq!(
            get(&d, 4, 1).eax,
            0x0C00_0122,
            "repeated untagged leaf 4 is subleaf 1"
        );
        assert_eq!(get(&d, 0xD, 9).ebx, 0x980);
        assert!(d.get(0x8FFF_FFFF, 0).is_none());
        assert_eq!(d.leaves.len(), 7);
        // Without block headers, a second leaf 0 starts the next CPU.
        let bare: String = INSTLAT
            .lines()
            .filter(|l| l.starts_with("CPUID 0"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_instlatx64("b", &bare).unwrap().leaves.len(), 6);
        assert!(matches!(
            parse_instlatx64("t", "CPUID 00000001: 1-2-3\n"),
            Err(Error::Syntax { line: 1, .. })
        ));
        assert!(parse_instlatx64("t", "CPUID 00000001: 1-2-3-4 [SL zz]").is_err());
    }

    #[test]
    fn libcpuid_clips_to_max_leaves() {
        let d = parse_libcpuid("e.txt", LIBCPUID).unwrap();
        let fns: Vec<_> = d.leaves.iter().map(|l| (l.function, l.index)).collect();
        assert_eq!(
            fns,
            [(0, 0), (1, 0), (0x8000_0000, 0), (0x8000_0001, 0)],
            "leaf 2, 4 and ext 2 are beyond the max"
        );
        assert_eq!(get(&d, 0x8000_0001, 0).edx, 0x2010_0000);
        assert!(
            parse_libcpuid("e", "basic_cpuid[1]=1 2 3 4\n").is_err(),
            "no leaf 0"
        );
        assert!(matches!(
            parse_libcpuid("e", "basic_cpuid[0]=1 2 3\n"),
            Err(Error::Syntax { line: 1, .. })
        ));
        assert!(parse_libcpuid("e", "ext_cpuid[4294967295]=1 2 3 4\n").is_err());
    }

    #[test]
    fn libvirt_xml_elements() {
        let d = parse_libvirt_xml("m.xml", XML).unwrap();
        assert_eq!(d.leaves.len(), 2);
        assert_eq!(d.vendor_string(), "AuthenticAMD");
        assert_eq!(get(&d, 0xD, 9).ebx, 0x980);
        let e = parse_libvirt_xml(
            "m.xml",
            "<cpudata>\n<cpuid eax_in='0x1' ecx_in='0x0' eax='0xzz' ebx='0' ecx='0' edx='0'/>",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("m.xml:2: eax='0xzz'"), "{e}");
        assert!(
            parse_libvirt_xml("m", "<cpuid eax_in='0x1' eax='1' ebx='2' ecx='3'/>").is_err(),
            "no edx"
        );
        assert!(parse_libvirt_xml("m", "<cpuid eax_in='0x1").is_err());
    }

    #[test]
    fn cpuid_raw_first_block() {
        let d = parse_cpuid_raw("r.txt", RAW).unwrap();
        assert_eq!(d.leaves.len(), 2);
        assert_eq!(get(&d, 0, 0).eax, 0x1c);
        assert_eq!(get(&d, 0xB, 1).ecx, 0x201);
        assert!(parse_cpuid_raw("r", "   0x00000001 0x00: eax=0x1 ebx=0x2 ecx=0x3\n").is_err());
        assert!(parse_cpuid_raw(
            "r",
            "   0x00000001 0x00: eax=0x1 ebx=0x2 ecx=0x3 edx=0x4 foo=0x5\n"
        )
        .is_err());
    }

    #[test]
    fn firecracker_bitmaps() {
        let d = parse_firecracker_fingerprint("fc.json", FC).unwrap();
        assert_eq!(get(&d, 7, 1).eax, 0x30);
        assert_eq!(get(&d, 7, 1).edx, 0b101, "x reads as 0");
        assert_eq!(get(&d, 0, 0).eax, 7);
        assert_eq!(bitmap(&format!("0b{}", "1".repeat(32))), Some(u32::MAX));
        assert_eq!(bitmap(&format!("0b{}", "1".repeat(33))), None);
        assert_eq!(bitmap("0b012"), None);
        let bad = FC.replace("\"edx\"", "\"esp\"");
        assert!(parse_firecracker_fingerprint("fc", &bad)
            .unwrap_err()
            .to_string()
            .contains("modifiers[1]"));
    }

    #[test]
    fn ferry_json_round_trips() {
        let d = parse_instlatx64("x", INSTLAT).unwrap();
        let text = serde_json::to_string(&d).unwrap();
        let back = parse_json("x", &text).unwrap();
        assert_eq!(back, d);
        assert_eq!(parse_any("x", &text).unwrap(), d);
        assert!(parse_json("x", "{\"source\": \"x\", \"leaves\": []}").is_err());
    }

    #[test]
    fn parse_any_detects_each_format() {
        for (text, leaves) in [(INSTLAT, 7), (LIBCPUID, 4), (XML, 2), (RAW, 2), (FC, 2)] {
            assert_eq!(parse_any("s", text).unwrap().leaves.len(), leaves, "{text}");
        }
        let e =
            parse_any("cpuinfo.txt", "processor\t: 0\nvendor_id\t: AuthenticAMD\n").unwrap_err();
        assert!(matches!(e, Error::UnknownFormat { .. }));
        assert!(e.to_string().starts_with("cpuinfo.txt: "), "{e}");
        assert!(matches!(
            parse_any("j", "{\"a\": 1}"),
            Err(Error::UnknownFormat { .. })
        ));
        assert!(matches!(
            parse_any("j", "{\"a\": "),
            Err(Error::Syntax { .. })
        ));
    }

    #[test]
    fn limits() {
        let many: String = (0..=MAX_LEAVES)
            .map(|i| format!("CPUID {i:08X}: 00000000-00000000-00000000-00000000\n"))
            .collect();
        assert!(matches!(
            parse_instlatx64("m", &many),
            Err(Error::TooManyLeaves { .. })
        ));
        let long = format!("CPUID 00000000: {}\n", "0".repeat(MAX_LINE));
        assert!(matches!(
            parse_instlatx64("l", &long),
            Err(Error::LineTooLong { line: 1, .. })
        ));
        let e = load(Path::new("/nonexistent/ferry-dump")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/ferry-dump: cannot read"),
            "{e}"
        );
    }

    type Parser = fn(&str, &str) -> Result<CpuidDump, Error>;

    /// Every prefix and many one-byte corruptions of each sample: errors, never panics.
    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let parsers: [Parser; 7] = [
            parse_instlatx64,
            parse_libcpuid,
            parse_libvirt_xml,
            parse_cpuid_raw,
            parse_firecracker_fingerprint,
            parse_json,
            parse_any,
        ];
        for p in parsers {
            for junk in [
                "",
                "\0\0\0",
                "CPUID",
                "<cpuid",
                "<cpuid ",
                "{",
                "[]",
                "null",
                "\u{feff}{}",
                "0x",
                "basic_cpuid[",
                "é<cpuid é='",
            ] {
                assert!(p("junk", junk).is_err(), "{junk:?}");
            }
        }
        for sample in [INSTLAT, LIBCPUID, XML, RAW, FC] {
            for cut in (0..sample.len()).filter(|&i| sample.is_char_boundary(i)) {
                for p in parsers {
                    let _ = p("cut", &sample[..cut]);
                }
            }
            let bytes = sample.as_bytes();
            for i in (0..bytes.len()).step_by(3) {
                for b in [b'-', b'\'', b':', b'[', b'<', b'x', b' ', b'\n', 0xC3] {
                    let mut m = bytes.to_vec();
                    m[i] = b;
                    let text = String::from_utf8_lossy(&m);
                    for p in parsers {
                        let _ = p("mutated", &text);
                    }
                }
            }
        }
    }
}
