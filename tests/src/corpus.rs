//! What the cross-vendor corpora's tests share (docs/cross-vendor.md): the host a file was
//! made or played on, the guest's heartbeat and dirty passes, and the vCPU's identity as the
//! running guest sees it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::process::{heartbeat, Ferry};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A CPU as a corpus entry or /proc/cpuinfo names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    pub vendor: String,
    pub family: u32,
    pub model: u32,
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:#x}/{:#x}", self.vendor, self.family, self.model)
    }
}

impl Cpu {
    /// The host a sidecar names (`host_vendor`, `host_family`, `host_model`).
    pub fn of_sidecar(j: &Value) -> Option<Cpu> {
        Some(Cpu {
            vendor: j["host_vendor"].as_str()?.to_string(),
            family: u32::try_from(j["host_family"].as_u64()?).ok()?,
            model: u32::try_from(j["host_model"].as_u64()?).ok()?,
        })
    }
}

/// The sidecars (`*.json`) of a corpus folder under tests/data, sorted, each parsed, with
/// the name of its entry (the file's stem).
pub fn sidecars(folder: &str) -> Vec<(String, PathBuf, Value)> {
    let dir = repo().join("tests/data").join(folder);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let j: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            let name = p.file_stem().unwrap().to_str().unwrap().to_string();
            (name, p, j)
        })
        .collect()
}

/// This host, from /proc/cpuinfo.
pub fn this_host() -> Cpu {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("/proc/cpuinfo has no {name}"))
    };
    Cpu {
        vendor: field("vendor_id"),
        family: field("cpu family").parse().unwrap(),
        model: field("model").parse().unwrap(),
    }
}

/// Which KVM module this host has.
pub fn kvm_flavour() -> &'static str {
    if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm"
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd"
    } else {
        "kvm_intel"
    }
}

/// The printk time of a heartbeat line, in seconds.
pub fn printk_time(line: &str) -> Option<f64> {
    heartbeat(line)?;
    line.get(line.find('[')? + 1..line.find(']')?)?
        .trim()
        .parse()
        .ok()
}

/// The dirty workload's completed passes in a heartbeat line.
pub fn pass(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("pass=")?.parse().ok())
}

/// A vCPU's identity: the vendor string and the leaf-1 signature (family, model, stepping).
pub type Identity = (String, (u32, u32, u32));

/// The identity a CPU profile (JSON) gives its guest.
pub fn profile_identity(name: &str, profile_json: &str) -> Identity {
    let profile = cpuid::profile::CpuProfile::from_json(name, profile_json)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let id = &profile.identity;
    (
        id.vendor.id_string().to_string(),
        (id.family, id.model, id.stepping),
    )
}

/// The vendor string and leaf-1 signature of the running guest's vCPU 0, as KVM holds its
/// CPUID table (what CPUID returns in guest ring 0).
pub fn guest_cpu(f: &Ferry) -> Identity {
    let (ok, out) = f.ctl(&["--json", "cpuid"]);
    assert!(ok, "{out}");
    let j: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let leaf = |function: u64| {
        j["effective"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["function"] == function && l["index"] == 0)
            .unwrap_or_else(|| panic!("no leaf {function}: {out}"))
            .clone()
    };
    let (l0, l1) = (leaf(0), leaf(1));
    let mut vendor = Vec::new();
    for r in ["ebx", "edx", "ecx"] {
        vendor.extend((l0[r].as_u64().unwrap() as u32).to_le_bytes());
    }
    let sig = cpuid::leaf::decode_signature(l1["eax"].as_u64().unwrap() as u32);
    (String::from_utf8_lossy(&vendor).into_owned(), sig)
}

/// A line on the test's stderr as it is, not captured by the test harness: the suite's log
/// shows it for a passing test too.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Merges `rows` into the evidence table between the markers `(begin, end)` of the file at
/// `path`: one row per key (the cells at `key`), this run's replacing an older one with the
/// same key, other rows kept.
pub fn record_evidence(
    path: &Path,
    (begin, end): (&str, &str),
    head: &[&str],
    key: (usize, usize),
    rows: &[Vec<String>],
) {
    let text = std::fs::read_to_string(path).unwrap();
    let (Some(b), Some(e)) = (text.find(begin), text.find(end)) else {
        panic!("{} has no evidence markers", path.display());
    };
    let mut table: std::collections::BTreeMap<(String, String), Vec<String>> =
        std::collections::BTreeMap::new();
    let mut add = |cells: &Vec<String>| {
        table.insert((cells[key.0].clone(), cells[key.1].clone()), cells.clone());
    };
    for line in text[b + begin.len()..e]
        .lines()
        .filter(|l| l.starts_with("| `"))
    {
        let cells: Vec<String> = line
            .trim_matches('|')
            .split(" | ")
            .map(|c| c.trim().to_string())
            .collect();
        if cells.len() == head.len() {
            add(&cells);
        }
    }
    rows.iter().for_each(&mut add);
    let mut out = format!("{begin}\n\n| {} |\n", head.join(" | "));
    out.push_str(&format!("|{}\n", "---|".repeat(head.len())));
    for r in table.values() {
        out.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    std::fs::write(path, format!("{}{out}{}", &text[..b], &text[e..])).unwrap();
}
