//! The line-based dump formats: InstLatx64 / AIDA64 / EVEREST text, libcpuid raw dumps,
//! libvirt cputestdata XML and `cpuid -r` output.

use std::collections::{BTreeMap, BTreeSet};

use super::{hex, invalid, leaf, lines, syntax, Error, Leaves, SUBLEAF_FUNCTIONS};
use crate::leaf::CpuidDump;

/// A header that starts a logical CPU's block (or another section).
pub(super) fn is_block_header(line: &str) -> bool {
    line.starts_with("------[") || (line.starts_with("CPU#") && line.contains("AffMask"))
}

/// `(function, rest)` if `line` is a register line (`CPUID LLLLLLLL:` + rest); other lines
/// starting with `CPUID` (`CPUID Manufacturer : ...`) are not.
pub(super) fn instlatx64_register_line(line: &str) -> Option<(u32, &str)> {
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

pub(super) fn is_cpuid_raw_header(line: &str) -> bool {
    line.strip_prefix("CPU")
        .and_then(|r| r.strip_suffix(':'))
        .is_some_and(|n| {
            n.is_empty()
                || (n.starts_with(' ') && n[1..].bytes().all(|b| b.is_ascii_digit()) && n.len() > 1)
        })
}

/// `0x00000001 0x00: eax=...` of `cpuid -r`.
pub(super) fn is_cpuid_raw_leaf_line(line: &str) -> bool {
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
