//! The cases (guest, memory, dirtying) and the migration modes of each VMM.

use std::path::PathBuf;

use super::*;

/// A guest and what it does.
pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) memory: &'static str,
    pub(crate) guest: CaseGuest,
    pub(crate) vcpus: u32,
}

/// Which guest a case boots.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaseGuest {
    /// The Linux test guest with this workload option.
    Linux(&'static str),
    /// tests/tiny/pvh_storm.S: ring 3 rewriting 256 MiB at native speed (each vCPU its
    /// share), a 1 ms heartbeat from its local APIC timer.
    Storm,
}

/// The idle cases double as the growth curve (main.rs, `growth`): ferry's cost per GiB of
/// guest and per GiB sent from 256 MiB to 8 GiB.
pub(crate) const CASES: [Case; 10] = [
    Case {
        name: "256 MiB idle",
        memory: "256M",
        guest: CaseGuest::Linux("workload=idle"),
        vcpus: 1,
    },
    Case {
        name: "1 GiB idle",
        memory: "1G",
        guest: CaseGuest::Linux("workload=idle"),
        vcpus: 1,
    },
    Case {
        name: "2 GiB idle",
        memory: "2G",
        guest: CaseGuest::Linux("workload=idle"),
        vcpus: 1,
    },
    Case {
        name: "4 GiB idle",
        memory: "4G",
        guest: CaseGuest::Linux("workload=idle"),
        vcpus: 1,
    },
    Case {
        name: "8 GiB idle",
        memory: "8G",
        guest: CaseGuest::Linux("workload=idle"),
        vcpus: 1,
    },
    Case {
        name: "8 GiB, 1 GiB dirtied",
        memory: "8G",
        guest: CaseGuest::Linux("workload=dirty:1024"),
        vcpus: 1,
    },
    Case {
        name: "256 MiB, 16 MiB dirtied",
        memory: "256M",
        guest: CaseGuest::Linux("workload=dirty:16"),
        vcpus: 1,
    },
    Case {
        name: "1 GiB, 128 MiB dirtied",
        memory: "1G",
        guest: CaseGuest::Linux("workload=dirty:128"),
        vcpus: 1,
    },
    Case {
        name: "1 GiB, 256 MiB rewritten from ring 3 (the heaviest dirtying here)",
        memory: "1G",
        guest: CaseGuest::Storm,
        vcpus: 1,
    },
    Case {
        name: "1 GiB, 4 vCPUs rewriting 256 MiB from ring 3 (64 MiB each)",
        memory: "1G",
        guest: CaseGuest::Storm,
        vcpus: 4,
    },
];

/// The kernel (or PVH ELF), initrd and command line a case boots.
pub(crate) fn boot_files(case: &Case) -> (PathBuf, Option<PathBuf>, String) {
    match case.guest {
        CaseGuest::Linux(workload) => {
            let g = ferry_tests::guest::guest();
            (
                g.vmlinux.clone(),
                Some(g.initramfs.clone()),
                g.cmdline_with(&format!("{workload} hb_us=1000 hb_port hb_print=1000")),
            )
        }
        CaseGuest::Storm => {
            static ELF: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
            let elf = ELF.get_or_init(|| {
                // In this run's temporary directory, which main removes at the end.
                let path = temp("pvh_storm.elf");
                std::fs::write(&path, ferry_tests::tiny::PVH_STORM.elf).expect("write the ELF");
                path
            });
            (elf.clone(), None, String::new())
        }
    }
}

/// How one VMM migrates.
#[derive(Clone, Copy)]
pub(crate) enum Mode {
    /// `ferry ctl migrate` with these extra arguments.
    Ferry(&'static str, &'static [&'static str]),
    /// QEMU with these migration parameters and capabilities.
    Qemu {
        name: &'static str,
        unthrottled: bool,
        downtime_ms: Option<u64>,
        capability: Option<&'static str>,
        /// Over TLS (tls-creds-x509 on the certificates of [`tls_dir`]).
        tls: bool,
    },
}

impl Mode {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Mode::Ferry(n, _) | Mode::Qemu { name: n, .. } => n,
        }
    }
}

pub(crate) const FERRY_MODES: [Mode; 3] = [
    Mode::Ferry("ferry defaults (20 ms target)", &[]),
    Mode::Ferry("ferry --max-downtime 10ms", &["--max-downtime", "10ms"]),
    Mode::Ferry("ferry --max-downtime 1ms", &["--max-downtime", "1ms"]),
];

pub(crate) const QEMU_MODES: [Mode; 6] = [
    Mode::Qemu {
        name: "QEMU defaults",
        unthrottled: false,
        downtime_ms: None,
        capability: None,
        tls: false,
    },
    Mode::Qemu {
        name: "QEMU unthrottled",
        unthrottled: true,
        downtime_ms: None,
        capability: None,
        tls: false,
    },
    Mode::Qemu {
        name: "QEMU unthrottled, downtime-limit 10 ms",
        unthrottled: true,
        downtime_ms: Some(10),
        capability: None,
        tls: false,
    },
    Mode::Qemu {
        name: "QEMU unthrottled, downtime-limit 1 ms",
        unthrottled: true,
        downtime_ms: Some(1),
        capability: None,
        tls: false,
    },
    Mode::Qemu {
        name: "QEMU unthrottled, auto-converge",
        unthrottled: true,
        downtime_ms: None,
        capability: Some("auto-converge"),
        tls: false,
    },
    Mode::Qemu {
        name: "QEMU unthrottled, multifd (2 channels)",
        unthrottled: true,
        downtime_ms: None,
        capability: Some("multifd"),
        tls: false,
    },
];

/// The argument of `--tls-dir` that stands for this run's certificates ([`tls_dir`]).
pub(crate) const TLS_DIR: &str = "{tls-dir}";

/// This run's certificates, as `ferry tls generate` writes them (both VMMs read them).
pub(crate) fn tls_dir() -> PathBuf {
    temp("tls")
}

/// `--tls`: each VMM encrypted and, for reference, in plaintext, in the same run.
pub(crate) const FERRY_TLS_MODES: [Mode; 2] = [
    Mode::Ferry("ferry defaults, TLS", &["--tls-dir", TLS_DIR]),
    Mode::Ferry("ferry defaults, plaintext", &[]),
];

pub(crate) const QEMU_TLS_MODES: [Mode; 2] = [
    Mode::Qemu {
        name: "QEMU unthrottled, TLS",
        unthrottled: true,
        downtime_ms: None,
        capability: None,
        tls: true,
    },
    Mode::Qemu {
        name: "QEMU unthrottled, plaintext",
        unthrottled: true,
        downtime_ms: None,
        capability: None,
        tls: false,
    },
];

/// `--postcopy`: each VMM switching to postcopy after one full precopy pass and, for
/// reference, its precopy, in the same run.
pub(crate) const FERRY_POSTCOPY_MODES: [Mode; 2] = [
    Mode::Ferry("ferry --postcopy-after 1", &["--postcopy-after", "1"]),
    Mode::Ferry("ferry defaults (precopy)", &[]),
];

pub(crate) const QEMU_POSTCOPY_MODES: [Mode; 2] = [
    Mode::Qemu {
        name: "QEMU unthrottled, postcopy-ram after the first pass",
        unthrottled: true,
        downtime_ms: None,
        capability: Some("postcopy-ram"),
        tls: false,
    },
    Mode::Qemu {
        name: "QEMU unthrottled (precopy)",
        unthrottled: true,
        downtime_ms: None,
        capability: None,
        tls: false,
    },
];

/// One migration's numbers; None where it did not finish.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    pub(crate) total_ms: f64,
    pub(crate) downtime_ms: f64,
    pub(crate) blackout_ms: f64,
    pub(crate) bytes: f64,
    pub(crate) rounds: f64,
}
