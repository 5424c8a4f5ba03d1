//! What the user asked for: [`VmConfig`], checked by [`VmConfig::validate`] before anything
//! touches KVM, so that a bad request fails with one line naming the bad value.

use std::path::{Path, PathBuf};

pub use crate::devices::virtio::block::DiskConfig;
pub use crate::devices::virtio::net::NetConfig;

/// Default guest RAM: 512 MiB.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Smallest guest RAM we accept: the boot structures live in the first MiB and a kernel above.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest RAM we accept (1 TiB); beyond this is almost certainly a typo.
pub const MAX_MEMORY: u64 = 1 << 40;
/// The default guest kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Errors in a VM configuration, each naming the value that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid memory size {0:?}: expected a number with an optional K, M, G or T suffix, like 512M or 1G")]
    ParseSize(String),
    #[error(
        "memory size {0} bytes is too small: the guest needs at least {MIN_MEMORY} bytes (16M)"
    )]
    MemoryTooSmall(u64),
    #[error("memory size {0} bytes is too large: at most {MAX_MEMORY} bytes (1T)")]
    MemoryTooLarge(u64),
    #[error("memory size {0} bytes is not a multiple of 4 KiB")]
    MemoryUnaligned(u64),
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {requested} is more than this host's KVM allows ({max})")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path}: {source}")]
    Initrd {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The guest a user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The kernel: an ELF vmlinux (PVH entry note) or a bzImage.
    pub kernel: PathBuf,
    /// An optional initramfs.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// The guest CPU profile: a built-in name or a profile file (None: the default).
    pub cpu: Option<String>,
    /// virtio-blk disks, in order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, in order (after the disks on the bus).
    pub nets: Vec<NetConfig>,
}

impl VmConfig {
    /// A configuration with the defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            memory: DEFAULT_MEMORY,
            vcpus: 1,
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            cpu: None,
            disks: Vec::new(),
            nets: Vec::new(),
        }
    }

    /// Checks everything that can be checked without KVM, and the vCPU count against
    /// `max_vcpus` (what this host's KVM reports).
    pub fn validate(&self, max_vcpus: u32) -> Result<(), Error> {
        validate_memory(self.memory)?;
        validate_vcpus(self.vcpus, max_vcpus)?;
        self.check_files()
    }

    /// Checks that the kernel and the initrd are readable files.
    pub fn check_files(&self) -> Result<(), Error> {
        check_readable(&self.kernel).map_err(|source| Error::Kernel {
            path: self.kernel.clone(),
            source,
        })?;
        if let Some(initrd) = &self.initrd {
            check_readable(initrd).map_err(|source| Error::Initrd {
                path: initrd.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Checks a guest RAM size.
pub fn validate_memory(bytes: u64) -> Result<(), Error> {
    if bytes < MIN_MEMORY {
        return Err(Error::MemoryTooSmall(bytes));
    }
    if bytes > MAX_MEMORY {
        return Err(Error::MemoryTooLarge(bytes));
    }
    if bytes % crate::memory::PAGE_SIZE != 0 {
        return Err(Error::MemoryUnaligned(bytes));
    }
    Ok(())
}

/// Checks a vCPU count against this host's limit.
pub fn validate_vcpus(requested: u32, max: u32) -> Result<(), Error> {
    if requested == 0 {
        return Err(Error::NoVcpus);
    }
    if requested > max {
        return Err(Error::TooManyVcpus { requested, max });
    }
    Ok(())
}

fn check_readable(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    std::fs::File::open(path).map(drop)
}

/// Parses a size like `512M`, `1G`, `65536` or `4k` into bytes.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let err = || Error::ParseSize(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(err()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// `KEY=VALUE,KEY=VALUE` into pairs; a part without `=` is an error.
fn options<'a>(what: &str, s: &'a str) -> Result<Vec<(&'a str, &'a str)>, String> {
    s.split(',')
        .map(|part| {
            part.split_once('=')
                .ok_or_else(|| format!("{what} {s:?}: {part:?} is not KEY=VALUE"))
        })
        .collect()
}

/// Parses `--disk path=FILE[,readonly=on|off]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut path = None;
    let mut read_only = false;
    for (k, v) in options("--disk", s)? {
        match (k, v) {
            ("path", v) if !v.is_empty() => path = Some(PathBuf::from(v)),
            ("readonly", "on") => read_only = true,
            ("readonly", "off") => read_only = false,
            _ => {
                return Err(format!(
                    "--disk {s:?}: unknown option {k}={v} (path=FILE, readonly=on|off)"
                ))
            }
        }
    }
    let path = path.ok_or_else(|| format!("--disk {s:?}: give path=FILE"))?;
    Ok(DiskConfig { path, read_only })
}

/// Parses `--net tap=NAME[,mac=MAC]` (no MAC: the builder gives the card one of its own).
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    for (k, v) in options("--net", s)? {
        match k {
            "tap" if !v.is_empty() => tap = Some(v.to_string()),
            "mac" => {
                mac = Some(crate::devices::virtio::net::parse_mac(v).ok_or_else(|| {
                    format!("--net {s:?}: bad MAC {v:?} (like 52:54:00:12:34:56)")
                })?)
            }
            _ => {
                return Err(format!(
                    "--net {s:?}: unknown option {k}={v} (tap=NAME, mac=MAC)"
                ))
            }
        }
    }
    let tap = tap.ok_or_else(|| format!("--net {s:?}: give tap=NAME"))?;
    Ok(NetConfig { tap, mac })
}

/// Parses a duration like `5ms`, `1.5s`, `60s`, `2m` or `0`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected like 5ms, 1.5s or 2m"))?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "" if n == 0.0 => 0.0,
        _ => return Err(format!("bad duration {s:?}: expected like 5ms, 1.5s or 2m")),
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|_| format!("bad duration {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        use std::time::Duration;
        assert_eq!(parse_duration("5ms").unwrap(), Duration::from_millis(5));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "5", "ms", "5 parsecs", "-1s", "1e999s"] {
            assert!(parse_duration(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("65536").unwrap(), 65536);
        for bad in ["", "M", "12X", "-1G", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn bad_memory_and_vcpus_are_named() {
        assert!(matches!(validate_memory(0), Err(Error::MemoryTooSmall(0))));
        assert!(matches!(
            validate_memory(MIN_MEMORY + 1),
            Err(Error::MemoryUnaligned(_))
        ));
        assert!(validate_memory(MIN_MEMORY).is_ok());
        assert!(matches!(validate_vcpus(0, 8), Err(Error::NoVcpus)));
        let e = validate_vcpus(9, 8).unwrap_err().to_string();
        assert!(e.contains('9') && e.contains('8'), "{e}");
    }
}
