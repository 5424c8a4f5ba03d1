//! What the API shows of the VMM and its VM: vmm.ping, vm.info, vm.counters and
//! ferry.metrics (Prometheus' text format).

use super::wire;
use crate::guest_cpu::model;
use crate::vm::Vm;

/// vmm.ping's answer: this ferry's version and what it can do beyond Cloud Hypervisor's API.
pub fn ping() -> wire::Ping {
    let version = env!("CARGO_PKG_VERSION").to_string();
    wire::Ping {
        build_version: format!("ferry {version}"),
        version,
        pid: std::process::id(),
        features: [
            "cpu-profiles",
            "cross-vendor",
            "postcopy",
            "migration-tls",
            "migration-key",
        ]
        .map(String::from)
        .to_vec(),
    }
}

/// vm.info's answer for the VM there is.
pub fn info(vm: &Vm) -> wire::VmInfo {
    let mut disks = Vec::new();
    let mut net = Vec::new();
    for b in vm.devices().virtio_backends() {
        match b {
            migration::DeviceBackend::Disk {
                path, read_only, ..
            } => disks.push(wire::DiskConfig {
                path,
                readonly: read_only,
            }),
            migration::DeviceBackend::Net { mac, tap } => net.push(wire::NetConfig {
                tap,
                mac: mac.map(|b| format!("{b:02x}")).join(":"),
            }),
        }
    }
    wire::VmInfo {
        config: wire::VmInfoConfig {
            cpus: wire::CpusConfig {
                boot_vcpus: vm.num_vcpus(),
                max_vcpus: vm.num_vcpus(),
            },
            memory: wire::MemoryConfig {
                size: vm.memory_size(),
            },
            disks,
            net,
            cpu_profile: vm.cpu_profile().name.clone(),
        },
        state: match vm.state() {
            crate::vcpu::RunState::Running => "Running",
            crate::vcpu::RunState::Paused => "Paused",
            crate::vcpu::RunState::Stopped => "Shutdown",
        }
        .into(),
        memory_actual_size: vm.memory_size(),
    }
}

/// vm.counters' answer: each vCPU's exits, and the outgoing migrations (`migration`).
pub fn counters(vm: &Vm, migration: &[(&str, u64)]) -> wire::Counters {
    let mut all = wire::Counters::new();
    for id in 0..vm.num_vcpus() {
        if let Some(c) = vm.exit_counts(id) {
            all.insert(
                format!("vcpu{id}"),
                [
                    ("io_in", c.io_in),
                    ("io_out", c.io_out),
                    ("mmio_read", c.mmio_read),
                    ("mmio_write", c.mmio_write),
                    ("hlt", c.hlt),
                    ("interrupted", c.interrupted),
                    ("system_event", c.system_event),
                ]
                .map(|(k, v)| (k.to_string(), v))
                .into(),
            );
        }
    }
    let migration = migration.iter().map(|(k, v)| (k.to_string(), *v));
    all.insert("migration".into(), migration.collect());
    all
}

/// ferry.metrics: the counters in Prometheus' text format (version 0.0.4), with the VM's
/// memory and state as gauges.
pub fn metrics(vm: &Vm, counters: &wire::Counters) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family("ferry_vm_memory_bytes", "gauge", "Guest RAM.");
    family("ferry_vm_vcpus", "gauge", "vCPUs.");
    family("ferry_vm_running", "gauge", "1 while any vCPU runs.");
    let running = u8::from(vm.state() == crate::vcpu::RunState::Running);
    let _ = writeln!(out, "ferry_vm_memory_bytes {}", vm.memory_size());
    let _ = writeln!(out, "ferry_vm_vcpus {}", vm.num_vcpus());
    let _ = writeln!(out, "ferry_vm_running {running}");
    let _ = writeln!(
        out,
        "# HELP ferry_vcpu_exits_total vCPU exits by reason.\n# TYPE ferry_vcpu_exits_total counter"
    );
    for (device, values) in counters {
        if let Some(id) = device.strip_prefix("vcpu") {
            for (reason, n) in values {
                let _ = writeln!(
                    out,
                    "ferry_vcpu_exits_total{{vcpu=\"{id}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP ferry_migrations_total Outgoing migrations, by how far they got.\n# TYPE ferry_migrations_total counter"
    );
    let _ = writeln!(
        out,
        "# HELP ferry_migration_bytes_sent_total Bytes on the wire of outgoing migrations.\n# TYPE ferry_migration_bytes_sent_total counter"
    );
    for (name, n) in counters.get("migration").into_iter().flatten() {
        match name.as_str() {
            "bytes_sent" => {
                let _ = writeln!(out, "ferry_migration_bytes_sent_total {n}");
            }
            outcome => {
                let _ = writeln!(out, "ferry_migrations_total{{outcome=\"{outcome}\"}} {n}");
            }
        }
    }
    out
}

/// ferry.cpu-check: whether `host` runs the profile `spec` (a built-in name, `default`, or
/// a profile file), or why the profile is not one.
pub fn cpu_check(
    spec: &str,
    host: &cpuid::CpuidDump,
) -> Result<wire::CpuCheck, (wire::Code, String)> {
    let p = match spec {
        "default" => model::default_profile(host),
        _ => model::load_profile(spec, host),
    }
    .map_err(|e| {
        let code = match e {
            model::Error::NoProfile(..) => wire::Code::NotFound,
            model::Error::Profile(_) => wire::Code::BadFile,
            _ => wire::Code::Internal,
        };
        (code, e.to_string())
    })?;
    let (missing, other) = match cpuid::profile::check(&p, host) {
        Ok(()) => (Vec::new(), Vec::new()),
        Err(m) => (m.features, m.other),
    };
    Ok(wire::CpuCheck {
        notes: model::emulator_notes(&p),
        profile: p.name,
        host: host.source.clone(),
        runs: missing.is_empty() && other.is_empty(),
        missing,
        other,
    })
}

/// ferry.cpu-check's answer against `host` (a failure when the profile is not one).
pub fn cpu_check_answer(profile: &str, host: &cpuid::CpuidDump) -> wire::Answer {
    match cpu_check(profile, host) {
        Ok(c) => wire::Answer::CpuCheck(Box::new(c)),
        Err((code, e)) => wire::Answer::Failure(wire::Failure::new(code, e)),
    }
}
