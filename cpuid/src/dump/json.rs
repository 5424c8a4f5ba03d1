//! The JSON dump formats: Firecracker's CPU fingerprint / template, and ferry's own.

use serde_json::Value;

use super::{hex, invalid, leaf, syntax, Error, Leaves};
use crate::leaf::{CpuidDump, Reg};

pub(super) fn json(source: &str, text: &str) -> Result<Value, Error> {
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
pub(super) fn bitmap(s: &str) -> Option<u32> {
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

pub(super) fn firecracker_from_value(source: &str, v: &Value) -> Result<CpuidDump, Error> {
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

pub(super) fn ferry_from_value(source: &str, v: Value) -> Result<CpuidDump, Error> {
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
