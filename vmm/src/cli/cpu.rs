//! `ferry cpu ...`: the guest CPU model from the command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use cpuid::profile::{self, CpuProfile};
use cpuid::{CpuidDump, Vendor};
use vmm::guest_cpu;

#[derive(Subcommand, Debug)]
pub enum CpuCmd {
    /// Print this host's CPUID as KVM offers it, as ferry's JSON dump.
    Dump,
    /// The common profile of hosts (dump files of any supported format, or `host`).
    Baseline {
        /// Host dumps (InstLatx64 text, libcpuid raw, libvirt XML, cpuid -r, ferry JSON).
        #[arg(required = true)]
        hosts: Vec<String>,
        /// Take the identity from the first host of this vendor.
        #[arg(long, value_parser = ["intel", "amd"])]
        vendor: Option<String>,
        /// Profile name.
        #[arg(long, default_value = "baseline")]
        name: String,
        /// Write the profile here instead of stdout.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Can this host (or a recorded one) run a profile? Exit 0, or 1 listing what is missing.
    Check {
        /// A built-in profile name or a profile file.
        profile: String,
        /// A recorded host (dump file) instead of this one.
        #[arg(long)]
        host: Option<PathBuf>,
    },
    /// A profile's features, one per line, then its identity.
    Show {
        /// A built-in profile name or a profile file.
        profile: String,
    },
}

fn live_host() -> anyhow::Result<CpuidDump> {
    let kvm = vmm::vm::open_kvm()?;
    Ok(guest_cpu::model::host_dump(&kvm)?)
}

fn load_host(spec: &str) -> anyhow::Result<CpuidDump> {
    if spec == "host" {
        return live_host();
    }
    cpuid::dump::load(Path::new(spec)).with_context(|| format!("host {spec}"))
}

/// The host a built-in profile's identity depends on: this one if KVM is there, else none.
fn host_for_builtins() -> CpuidDump {
    live_host().unwrap_or_default()
}

fn resolve(spec: &str, host: &CpuidDump) -> anyhow::Result<CpuProfile> {
    if spec == "default" {
        return Ok(guest_cpu::model::default_profile(host)?);
    }
    Ok(guest_cpu::model::load_profile(spec, host)?)
}

pub fn run(cmd: CpuCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CpuCmd::Dump => {
            println!("{}", serde_json::to_string_pretty(&live_host()?)?);
        }
        CpuCmd::Baseline {
            hosts,
            vendor,
            name,
            output,
        } => {
            let dumps = hosts
                .iter()
                .map(|h| load_host(h))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let vendor = vendor.map(|v| {
                if v == "intel" {
                    Vendor::Intel
                } else {
                    Vendor::Amd
                }
            });
            let p = profile::baseline(&name, &dumps, vendor)?;
            match output {
                Some(path) => std::fs::write(&path, p.to_json() + "\n")
                    .with_context(|| format!("writing {}", path.display()))?,
                None => println!("{}", p.to_json()),
            }
        }
        CpuCmd::Check { profile, host } => return check(&profile, host.as_deref()),
        CpuCmd::Show { profile } => show(&resolve(&profile, &host_for_builtins())?),
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry cpu check`: whether this host (or a recorded one) runs `profile`, and what this
/// host's KVM would change in its table.
fn check(profile: &str, host: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (host_dump, recorded) = match host {
        Some(p) => (load_host(&p.display().to_string())?, true),
        None => (live_host()?, false),
    };
    let p = resolve(profile, &host_dump)?;
    let notes = if recorded {
        vec![]
    } else {
        forced_note(&p)?;
        guest_cpu::model::emulator_notes(&p)
    };
    match profile::check(&p, &host_dump) {
        Ok(()) if notes.is_empty() => println!("{}: this host can run it", p.name),
        Ok(()) => {
            println!(
                "{}: KVM offers every feature, but the guest kernel must not use these here:",
                p.name
            );
            for n in &notes {
                println!("  {n}");
            }
        }
        Err(m) => {
            println!("{}: {} cannot run it", p.name, host_dump.source);
            if !m.features.is_empty() {
                println!("missing features: {}", m.features.join(" "));
            }
            for o in &m.other {
                println!("{o}");
            }
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What this host's KVM changes in `p`'s table, read from a scratch vCPU.
fn forced_note(p: &CpuProfile) -> anyhow::Result<()> {
    let kvm = vmm::vm::open_kvm()?;
    let requested = cpuid::table::for_vcpu(&cpuid::table::guest_table(p, 1), 0);
    let here = vmm::guest_cpu::admission::probe(&kvm, p, 1)?;
    let cpuid::table::TableDiff {
        features: forced,
        registers: other,
    } = cpuid::table::diff(&requested, &here.effective);
    if !forced.is_empty() || !other.is_empty() {
        println!(
            "note: this host's KVM changes the table after KVM_SET_CPUID2; the guest \
             sees (and ferry checks and migrates) the changed one:"
        );
        println!("  features: {}", forced.join(" "));
        for (f, i, r) in other {
            println!("  register {r:?} of leaf {f:#x}.{i}");
        }
    }
    Ok(())
}

/// `ferry cpu show`: the features, then the identity.
fn show(p: &CpuProfile) {
    for f in &p.features {
        println!("{f}");
    }
    let id = &p.identity;
    println!(
        "identity: {} family {:#x} model {:#x} stepping {} \"{}\"",
        id.vendor.id_string(),
        id.family,
        id.model,
        id.stepping,
        id.brand
    );
    println!(
        "leaves: max {:#x}, extended max {:#x}; address bits: {} physical, {} linear; xsave components: {}; migratable: {}",
        p.max_leaf,
        p.max_ext_leaf,
        p.phys_bits,
        p.virt_bits,
        p.xsave.iter().map(|c| c.index.to_string()).collect::<Vec<_>>().join(","),
        p.migratable
    );
}
