//! What the benchmark commands share: statistics, host facts, BENCHMARKS.md sections.

use std::path::Path;

use anyhow::{Context, Result};

/// (min, median, max) of `v` (not empty).
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

pub fn host_facts(qemu: &str) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let family = |k: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_string()
    };
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        let native = std::fs::read_to_string("/sys/module/kvm_pvm/parameters/pvm_native")
            .unwrap_or_default();
        format!(
            "kvm_pvm (pvm_native={}): guest ring 0 is emulated",
            native.trim()
        )
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "kvm_intel (VMX)".into()
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd (SVM)".into()
    } else {
        "unknown".into()
    };
    format!(
        "- CPU: {model} ({}, family {} model {}), {cores} cores\n- Host kernel: {kernel}\n- KVM: {kvm}\n- QEMU: {qemu}\n",
        family("vendor_id"),
        family("cpu family"),
        family("model\t"),
    )
}

/// Replaces the text between `begin` and `end` markers in the file at `path` with `md`
/// (which holds both markers), or appends it.
pub fn replace_section(path: &Path, begin: &str, end: &str, md: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{}{}", &old[..b], md.trim_end(), &old[e + end.len()..])
        }
        _ => format!("{}\n\n{}", old.trim_end(), md),
    };
    std::fs::write(path, new).with_context(|| format!("write {}", path.display()))
}
