//! A saved or migrating guest's devices against what this side was given: the disks and
//! network cards a restored or received machine is built with, checked before any memory
//! moves. Both sides must name the same disk image (shared storage: the same canonical path
//! and size, read-only or not alike); a network card keeps its MAC and may sit on another
//! tap. Given nothing, this side takes the saved list as it is.

use migration::DeviceBackend;

use super::block::DiskConfig;
use super::net::NetConfig;

/// What this side was given (`--disk`, `--net`), and the saved devices they must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
}

impl Devices {
    /// The devices to build for a guest saved with `saved` (in bus order: disks, then network
    /// cards); one line naming the first mismatch if this side's cannot take it.
    pub fn resolve(&self, saved: &[DeviceBackend]) -> Result<Devices, String> {
        let disks: Vec<_> = saved.iter().filter_map(as_disk).collect();
        let nets: Vec<_> = saved.iter().filter_map(as_net).collect();
        let in_order = saved
            .iter()
            .map(|b| matches!(b, DeviceBackend::Disk { .. }))
            .is_sorted_by(|a, b| a >= b);
        if !in_order {
            return Err("the saved devices are not disks first, then network cards".into());
        }
        Ok(Devices {
            disks: self.disks(&disks)?,
            nets: self.nets(&nets)?,
        })
    }

    fn disks(&self, saved: &[(&str, u64, bool)]) -> Result<Vec<DiskConfig>, String> {
        if self.disks.is_empty() {
            return Ok(saved
                .iter()
                .map(|&(path, _, read_only)| DiskConfig {
                    path: path.into(),
                    read_only,
                })
                .collect());
        }
        count("disk", self.disks.len(), saved.len())?;
        for (i, (d, &(path, size, read_only))) in self.disks.iter().zip(saved).enumerate() {
            let here = std::fs::canonicalize(&d.path)
                .map_err(|e| format!("disk {i}: {}: {e}", d.path.display()))?;
            let len = std::fs::metadata(&here)
                .map_err(|e| format!("disk {i}: {}: {e}", here.display()))?
                .len();
            if here.to_string_lossy() != path || len != size {
                return Err(format!(
                    "disk {i}: this side was given {} ({len} bytes), the guest's disk is {} ({size} bytes): both sides must name the same image",
                    here.display(),
                    migration::protocol::printable(path)
                ));
            }
            if d.read_only != read_only {
                let ro = |r: bool| if r { "read-only" } else { "writable" };
                return Err(format!(
                    "disk {i}: {} here, {} for the guest",
                    ro(d.read_only),
                    ro(read_only)
                ));
            }
        }
        Ok(self.disks.clone())
    }

    fn nets(&self, saved: &[([u8; 6], &str)]) -> Result<Vec<NetConfig>, String> {
        if self.nets.is_empty() {
            return Ok(saved
                .iter()
                .map(|&(mac, tap)| NetConfig {
                    tap: tap.into(),
                    mac: Some(mac),
                })
                .collect());
        }
        count("network card", self.nets.len(), saved.len())?;
        self.nets
            .iter()
            .zip(saved)
            .enumerate()
            .map(|(i, (n, &(mac, _)))| match n.mac {
                Some(m) if m != mac => Err(format!(
                    "network card {i}: mac={} here, the guest's card has {}",
                    super::net::format_mac(m),
                    super::net::format_mac(mac)
                )),
                _ => Ok(NetConfig {
                    tap: n.tap.clone(),
                    mac: Some(mac),
                }),
            })
            .collect()
    }
}

fn count(what: &str, here: usize, saved: usize) -> Result<(), String> {
    if here == saved {
        return Ok(());
    }
    Err(format!(
        "this side was given {here} {what}(s), the guest has {saved}"
    ))
}

fn as_disk(b: &DeviceBackend) -> Option<(&str, u64, bool)> {
    match b {
        DeviceBackend::Disk {
            path,
            size,
            read_only,
        } => Some((path, *size, *read_only)),
        DeviceBackend::Net { .. } => None,
    }
}

fn as_net(b: &DeviceBackend) -> Option<([u8; 6], &str)> {
    match b {
        DeviceBackend::Net { mac, tap } => Some((*mac, tap)),
        DeviceBackend::Disk { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image file of `len` bytes, removed when the guard drops.
    struct Image(std::path::PathBuf);

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn image(len: u64) -> (Image, std::path::PathBuf) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("ferry-backends-{}-{n}.img", std::process::id()));
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        let p = std::fs::canonicalize(p).unwrap();
        (Image(p.clone()), p)
    }

    fn saved(path: &std::path::Path, size: u64) -> Vec<DeviceBackend> {
        vec![
            DeviceBackend::Disk {
                path: path.to_string_lossy().into(),
                size,
                read_only: false,
            },
            DeviceBackend::Net {
                mac: [2, 0, 0, 0, 0, 7],
                tap: "tapA".into(),
            },
        ]
    }

    #[test]
    fn given_nothing_the_saved_devices_are_taken_as_they_are() {
        let (_d, p) = image(4096);
        let got = Devices::default().resolve(&saved(&p, 4096)).unwrap();
        assert_eq!(
            got.disks,
            vec![DiskConfig {
                path: p,
                read_only: false
            }]
        );
        assert_eq!(got.nets[0].tap, "tapA");
        assert_eq!(got.nets[0].mac, Some([2, 0, 0, 0, 0, 7]));
    }

    #[test]
    fn another_tap_keeps_the_mac_and_the_same_image_is_accepted() {
        let (_d, p) = image(4096);
        let here = Devices {
            disks: vec![DiskConfig {
                path: p.clone(),
                read_only: false,
            }],
            nets: vec![NetConfig {
                tap: "tapB".into(),
                mac: None,
            }],
        };
        let got = here.resolve(&saved(&p, 4096)).unwrap();
        assert_eq!(got.nets[0].tap, "tapB");
        assert_eq!(got.nets[0].mac, Some([2, 0, 0, 0, 0, 7]));
    }

    #[test]
    fn another_image_size_count_mac_or_mode_is_one_line() {
        let (_d, p) = image(4096);
        let (_e, other) = image(4096);
        let disk = |path: &std::path::Path, read_only| Devices {
            disks: vec![DiskConfig {
                path: path.into(),
                read_only,
            }],
            nets: vec![],
        };
        let err = disk(&other, false).resolve(&saved(&p, 4096)).unwrap_err();
        assert!(err.contains("both sides must name the same image"), "{err}");
        let err = disk(&p, false).resolve(&saved(&p, 8192)).unwrap_err();
        assert!(
            err.contains("(4096 bytes)") && err.contains("(8192 bytes)"),
            "{err}"
        );
        let err = disk(&p, true).resolve(&saved(&p, 4096)).unwrap_err();
        assert_eq!(err, "disk 0: read-only here, writable for the guest");
        let two = Devices {
            disks: vec![],
            nets: vec![
                NetConfig {
                    tap: "a".into(),
                    mac: None
                };
                2
            ],
        };
        let err = two.resolve(&saved(&p, 4096)).unwrap_err();
        assert_eq!(
            err,
            "this side was given 2 network card(s), the guest has 1"
        );
        let mac = Devices {
            disks: vec![],
            nets: vec![NetConfig {
                tap: "a".into(),
                mac: Some([2; 6]),
            }],
        };
        let err = mac.resolve(&saved(&p, 4096)).unwrap_err();
        assert!(
            err.contains("02:02:02:02:02:02") && err.contains("02:00:00:00:00:07"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }
}
