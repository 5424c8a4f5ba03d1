//! The bodies that give a `ferry serve` its VM: vm.create (Cloud Hypervisor's VmConfig, the
//! part ferry has), vm.restore (`source_url`) and vm.receive-migration (`receiver_url`, and
//! ferry's options of `ferry receive`). A field ferry does not take is refused naming it
//! (serde's deny_unknown_fields); a value it does not do is refused naming the field.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, NetConfig, VmConfig, DEFAULT_CMDLINE, DEFAULT_MEMORY};

/// vm.create's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Cpus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    pub payload: Payload,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<Net>,
    /// `{"mode":"Tty"}`: where `ferry serve --serial` puts the console (the one serial port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<Console>,
    /// `{"mode":"Off"}`: ferry has no virtio-console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<Console>,
    /// ferry's own: the guest CPU profile, a built-in name or a profile file (docs/cpuid.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_profile: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cpus {
    pub boot_vcpus: u32,
    /// Equal to boot_vcpus: ferry plugs no vCPUs later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// Bytes.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Net {
    pub tap: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Console {
    pub mode: String,
}

impl CreateRequest {
    /// The VM this asks for, or the one-line reason it is not one ferry builds.
    pub fn to_config(&self) -> Result<VmConfig, String> {
        let vcpus = match &self.cpus {
            None => 1,
            Some(Cpus {
                boot_vcpus,
                max_vcpus,
            }) => {
                if max_vcpus.is_some_and(|m| m != *boot_vcpus) {
                    return Err(format!("cpus.max_vcpus must equal cpus.boot_vcpus ({boot_vcpus}): ferry plugs no vCPUs later"));
                }
                *boot_vcpus
            }
        };
        for (field, console, allowed) in [
            ("serial", &self.serial, "Tty"),
            ("console", &self.console, "Off"),
        ] {
            if let Some(c) = console.as_ref().filter(|c| c.mode != allowed) {
                return Err(format!(
                    "{field}.mode {:?}: ferry takes {allowed:?} only ({})",
                    c.mode,
                    match field {
                        "serial" => "the serial console goes where ferry serve --serial says",
                        _ => "ferry has no virtio-console",
                    }
                ));
            }
        }
        let nets = self.net.iter().map(|n| {
            let mac = match &n.mac {
                None => None,
                Some(m) => Some(
                    crate::devices::virtio::net::parse_mac(m)
                        .ok_or_else(|| format!("net.mac {m:?}: expected aa:bb:cc:dd:ee:ff"))?,
                ),
            };
            Ok::<_, String>(NetConfig {
                tap: n.tap.clone(),
                mac,
            })
        });
        Ok(VmConfig {
            memory: self.memory.as_ref().map_or(DEFAULT_MEMORY, |m| m.size),
            vcpus,
            kernel: self.payload.kernel.clone(),
            initrd: self.payload.initramfs.clone(),
            cmdline: (self.payload.cmdline.clone()).unwrap_or_else(|| DEFAULT_CMDLINE.into()),
            cpu: self.cpu_profile.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| DiskConfig {
                    path: d.path.clone(),
                    read_only: d.readonly,
                })
                .collect(),
            nets: nets.collect::<Result<_, _>>()?,
        })
    }
}

/// vm.restore's body: Cloud Hypervisor's `source_url` (`file:///PATH`: a snapshot file, or
/// a directory holding ferry.snap) and `prefault` (false only: ferry maps the file's memory
/// as the guest touches it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub source_url: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prefault: bool,
    /// ferry's own: keep the guest paused until vm.resume.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// vm.receive-migration's body: Cloud Hypervisor's `receiver_url` (where to listen:
/// tcp:ADDR:PORT or unix:PATH) and the options of `ferry receive`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    pub receiver_url: String,
    /// A shared key file the source must prove (send it absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// TLS certificates (ca-cert.pem, server-cert.pem, server-key.pem; send it absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// Names a source's certificate must carry (any the CA signed when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls_allow: Vec<String>,
    /// The most guest RAM to take, bytes (default: this host's available memory less an
    /// eighth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<u64>,
    /// The most vCPUs to take (default: four per host CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// Give up on a source silent this long (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_timeout_ms: Option<u64>,
    /// Cloud Hypervisor's `Precopy` or `Postcopy`: a ferry destination takes either, as
    /// the source chooses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mode: Option<String>,
    /// Cloud Hypervisor's VFIO, iommufd and memory-zone substitutions: none only (ferry
    /// has no VFIO devices or memory zones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_fds: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommufd_fd: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zone_updates: Vec<serde_json::Value>,
}

impl ReceiveRequest {
    /// Refuses, naming the field, what of Cloud Hypervisor's ferry does not do.
    pub fn check(&self) -> Result<(), String> {
        if let Some(m) = self.memory_mode.as_deref() {
            if m != "Precopy" && m != "Postcopy" {
                return Err(format!("memory_mode {m:?}: Precopy or Postcopy"));
            }
        }
        if self.vfio_fds.as_ref().is_some_and(|v| !v.is_empty()) || self.iommufd_fd.is_some() {
            return Err("vfio_fds, iommufd_fd: ferry has no VFIO devices".into());
        }
        if !self.zone_updates.is_empty() {
            return Err("zone_updates: ferry has no memory zones".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_hypervisors_config_becomes_ferrys_and_what_ferry_lacks_is_named() {
        let body = r#"{"cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":268435456},
            "payload":{"kernel":"/k","cmdline":"console=ttyS0","initramfs":"/i"},
            "disks":[{"path":"/d.img","readonly":true}],"net":[{"tap":"t0","mac":"52:54:00:00:00:01"}],
            "serial":{"mode":"Tty"},"console":{"mode":"Off"}}"#;
        let c: CreateRequest = serde_json::from_str(body).unwrap();
        let cfg = c.to_config().unwrap();
        assert_eq!((cfg.vcpus, cfg.memory), (2, 256 << 20));
        assert_eq!(cfg.initrd, Some("/i".into()));
        assert!(cfg.disks[0].read_only);
        assert_eq!(cfg.nets[0].mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        let minimal: CreateRequest =
            serde_json::from_str(r#"{"payload":{"kernel":"/k"}}"#).unwrap();
        let cfg = minimal.to_config().unwrap();
        assert_eq!((cfg.vcpus, cfg.memory), (1, DEFAULT_MEMORY));
        for (bad, named) in [
            (
                r#"{"payload":{"kernel":"/k"},"rng":{"src":"/dev/urandom"}}"#,
                "rng",
            ),
            (r#"{"payload":{"kernel":"/k","firmware":"/f"}}"#, "firmware"),
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1,"topology":{}}}"#,
                "topology",
            ),
        ] {
            let e = serde_json::from_str::<CreateRequest>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{e}");
        }
        for (bad, named) in [
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1,"max_vcpus":4}}"#,
                "max_vcpus",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"console":{"mode":"Tty"}}"#,
                "console.mode",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"net":[{"tap":"t","mac":"nope"}]}"#,
                "net.mac",
            ),
        ] {
            let c: CreateRequest = serde_json::from_str(bad).unwrap();
            let e = c.to_config().unwrap_err();
            assert!(e.contains(named), "{e}");
        }
    }

    #[test]
    fn cloud_hypervisors_receive_body_is_taken_and_what_ferry_lacks_is_named() {
        let ch = r#"{"receiver_url":"unix:/x","tls_dir":null,"memory_mode":"Precopy","vfio_fds":null,"zone_updates":[]}"#;
        let r: ReceiveRequest = serde_json::from_str(ch).unwrap();
        assert_eq!(r.check(), Ok(()));
        for (bad, named) in [
            (
                r#"{"receiver_url":"u","zone_updates":[{}]}"#,
                "zone_updates",
            ),
            (r#"{"receiver_url":"u","vfio_fds":[{}]}"#, "vfio_fds"),
            (
                r#"{"receiver_url":"u","memory_mode":"Both"}"#,
                "memory_mode",
            ),
        ] {
            let r: ReceiveRequest = serde_json::from_str(bad).unwrap();
            assert!(r.check().unwrap_err().contains(named), "{bad}");
        }
    }
}
