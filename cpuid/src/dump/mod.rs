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

mod json;
mod text;

use std::io::Read;
use std::path::Path;

use crate::leaf::{CpuidDump, Leaf};

use json::{ferry_from_value, firecracker_from_value, json};
pub use json::{parse_firecracker_fingerprint, parse_json};
use text::{instlatx64_register_line, is_cpuid_raw_leaf_line};
pub use text::{parse_cpuid_raw, parse_instlatx64, parse_libcpuid, parse_libvirt_xml};

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
    use super::json::bitmap;
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
