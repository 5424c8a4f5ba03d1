//! What the benchmark commands share: statistics, host facts, BENCHMARKS.md sections.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The release `ferry` next to this benchmark binary.
pub fn ferry_binary() -> Result<PathBuf> {
    let ferry = std::env::current_exe()?.with_file_name("ferry");
    if !ferry.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --workspace`",
            ferry.display()
        );
    }
    Ok(ferry)
}

/// QEMU's version line (and a clear error where it is not installed).
pub fn qemu_version() -> Result<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .context("qemu-system-x86_64 not found: apt-get install qemu-system-x86")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("?")
        .to_string())
}

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
        "- CPU: {model} ({}, family {} model {}), {cores} cores\n- Host kernel: {kernel}\n- KVM: {kvm}\n- Memory: {}\n- QEMU: {qemu}\n",
        family("vendor_id"),
        family("cpu family"),
        family("model\t"),
        page_reporting(),
    )
}

/// Whether this host, itself a virtual machine, hands free memory back to the host under
/// it (free page reporting): then RAM a process touches for the first time is sometimes
/// memory the outer host must back again, at a cost that varies from run to run.
pub fn page_reporting() -> String {
    let param = |p: &str| {
        std::fs::read_to_string(format!("/sys/module/page_reporting/parameters/{p}"))
            .map(|s| s.trim().to_string())
            .ok()
    };
    match param("page_reporting_order") {
        Some(order) => format!(
            "free page reporting to the outer host is on (blocks of order {order}{}): fresh \
             RAM is sometimes backed anew by the outer host on first touch",
            param("min_free_ms")
                .map(|ms| format!(", reported after {ms} ms free"))
                .unwrap_or_default()
        ),
        None => "no free page reporting".into(),
    }
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
