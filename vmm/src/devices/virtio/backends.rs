//! A saved or migrating guest's devices against what this side was given: the disks and
//! network cards a restored or received machine is built with. This side decides every
//! host resource: the images and taps its own command line (or API request) names are
//! opened here, before any peer byte or snapshot is read and before ferry gives up root
//! ([`Opened::open`]); a guest is then taken only onto those ([`Opened::resolve`], before
//! any memory moves). The paths and taps a source or a snapshot names are compared, never
//! opened. Both sides must name the same disk image (shared storage: the same canonical
//! path and size, read-only or not alike); a network card keeps its MAC and may sit on
//! another tap.

use migration::DeviceBackend;

use super::block::{Block, DiskConfig};
use super::net::NetConfig;
use super::tap::Tap;
use super::Backend;

/// What this side was given (`--disk`, `--net`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
}

impl Devices {
    /// Opens every disk image and tap named (the first that fails is the error).
    pub fn open(&self) -> Result<Opened, OpenError> {
        let disks = self
            .disks
            .iter()
            .map(Block::open)
            .collect::<Result<_, _>>()?;
        let nets = self
            .nets
            .iter()
            .map(|n| Ok((Tap::open(&n.tap)?, n.mac)))
            .collect::<Result<_, OpenError>>()?;
        Ok(Opened { disks, nets })
    }
}

/// A disk image or tap this side was given that did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Disk(#[from] super::block::OpenError),
    #[error(transparent)]
    Tap(#[from] super::tap::Error),
}

/// How a saved guest's devices differ from what this side was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("the saved devices are not disks first, then network cards")]
    Order,
    #[error("the guest has {}; this side opens only the images and taps its own command line names, never those the guest was saved with", flags_to_give(*.disks, *.nets))]
    NotGiven { disks: usize, nets: usize },
    #[error("this side was given {here} {what}(s), the guest has {saved}")]
    Count {
        what: &'static str,
        here: usize,
        saved: usize,
    },
    /// The saved path is the snapshot's or the source's, as it gave it.
    #[error("disk {index}: this side was given {here} ({here_size} bytes), the guest's disk is {} ({size} bytes): both sides must name the same image", migration::protocol::printable(.path))]
    OtherImage {
        index: usize,
        here: String,
        here_size: u64,
        path: String,
        size: u64,
    },
    #[error("disk {index}: {} here, {} for the guest", mode(*.read_only_here), mode(!*.read_only_here))]
    Mode { index: usize, read_only_here: bool },
    #[error("network card {index}: mac={} here, the guest's card has {}", super::net::format_mac(*.here), super::net::format_mac(*.guest))]
    Mac {
        index: usize,
        here: [u8; 6],
        guest: [u8; 6],
    },
}

fn mode(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "writable"
    }
}

/// The flags a side given no devices must give for a guest with `disks` and `nets`.
fn flags_to_give(disks: usize, nets: usize) -> String {
    let mut missing = Vec::new();
    if disks > 0 {
        missing.push(format!(
            "{disks} disk(s): give --disk path=IMAGE for each, the same image(s)"
        ));
    }
    if nets > 0 {
        missing.push(format!(
            "{nets} network card(s): give --net tap=NAME for each, a tap of this host"
        ));
    }
    missing.join(" and ")
}

/// The disks and taps this side opened for a guest to come, not yet matched to it.
#[derive(Debug, Default)]
pub struct Opened {
    disks: Vec<Block>,
    /// Each tap and the MAC this side asked for, if it did.
    nets: Vec<(Tap, Option<[u8; 6]>)>,
}

/// The backends a restored or received guest's devices are built on, matched to it.
#[derive(Debug, Default)]
pub struct Backends {
    pub disks: Vec<Block>,
    /// Each tap and the MAC of the guest's card on it.
    pub nets: Vec<(Tap, [u8; 6])>,
}

impl Opened {
    /// Nothing opened: for a guest without devices.
    pub fn none() -> Opened {
        Opened::default()
    }

    /// Takes what this side opened for a guest saved with `saved` (in bus order: disks,
    /// then network cards), or one line naming the first mismatch. A guest with devices
    /// where this side was given none is refused with the flags to give: this side never
    /// opens what a peer or a file names.
    pub fn resolve(&mut self, saved: &[DeviceBackend]) -> Result<Backends, Mismatch> {
        let disks: Vec<_> = saved.iter().filter_map(as_disk).collect();
        let nets: Vec<_> = saved.iter().filter_map(as_net).collect();
        let in_order = saved
            .iter()
            .map(|b| matches!(b, DeviceBackend::Disk { .. }))
            .is_sorted_by(|a, b| a >= b);
        if !in_order {
            return Err(Mismatch::Order);
        }
        self.check_given(disks.len(), nets.len())?;
        count("disk", self.disks.len(), disks.len())?;
        count("network card", self.nets.len(), nets.len())?;
        for (i, (d, &(path, size, read_only))) in self.disks.iter().zip(&disks).enumerate() {
            check_disk(i, d, path, size, read_only)?;
        }
        for (i, ((_, m), &(mac, _))) in self.nets.iter().zip(&nets).enumerate() {
            if let Some(here) = m.filter(|m| *m != mac) {
                return Err(Mismatch::Mac {
                    index: i,
                    here,
                    guest: mac,
                });
            }
        }
        let taken = std::mem::take(self);
        Ok(Backends {
            disks: taken.disks,
            nets: taken
                .nets
                .into_iter()
                .zip(nets)
                .map(|((tap, _), (mac, _))| (tap, mac))
                .collect(),
        })
    }

    /// A guest with disks or cards needs this side's own: given none, the flags to give.
    fn check_given(&self, disks: usize, nets: usize) -> Result<(), Mismatch> {
        let disks = if self.disks.is_empty() { disks } else { 0 };
        let nets = if self.nets.is_empty() { nets } else { 0 };
        if disks == 0 && nets == 0 {
            return Ok(());
        }
        Err(Mismatch::NotGiven { disks, nets })
    }
}

/// Disk `i` opened here against the guest's: the same canonical path, size and mode.
fn check_disk(i: usize, d: &Block, path: &str, size: u64, read_only: bool) -> Result<(), Mismatch> {
    let DeviceBackend::Disk {
        path: here,
        size: len,
        read_only: ro_here,
    } = d.backend()
    else {
        return Err(Mismatch::Order);
    };
    if here != path || len != size {
        return Err(Mismatch::OtherImage {
            index: i,
            here,
            here_size: len,
            path: path.to_string(),
            size,
        });
    }
    if ro_here != read_only {
        return Err(Mismatch::Mode {
            index: i,
            read_only_here: ro_here,
        });
    }
    Ok(())
}

fn count(what: &'static str, here: usize, saved: usize) -> Result<(), Mismatch> {
    if here == saved {
        return Ok(());
    }
    Err(Mismatch::Count { what, here, saved })
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

    fn disk_only(path: &std::path::Path, size: u64) -> Vec<DeviceBackend> {
        saved(path, size)[..1].to_vec()
    }

    fn given(path: &std::path::Path, read_only: bool) -> Opened {
        Devices {
            disks: vec![DiskConfig {
                path: path.into(),
                read_only,
            }],
            nets: vec![],
        }
        .open()
        .unwrap()
    }

    #[test]
    fn given_nothing_a_guest_with_devices_is_refused_with_the_flags_to_give() {
        let (_d, p) = image(4096);
        let err = Opened::none().resolve(&saved(&p, 4096)).unwrap_err();
        assert_eq!(err, Mismatch::NotGiven { disks: 1, nets: 1 });
        let err = err.to_string();
        assert!(
            err.contains("1 disk(s): give --disk path=IMAGE")
                && err.contains("1 network card(s): give --net tap=NAME"),
            "{err}"
        );
        assert!(!err.contains('\n'));
        // Given its disk but no tap, only the card is named.
        let err = given(&p, false).resolve(&saved(&p, 4096)).unwrap_err();
        assert_eq!(err, Mismatch::NotGiven { disks: 0, nets: 1 });
        let err = err.to_string();
        assert!(err.contains("--net") && !err.contains("--disk"), "{err}");
        // A guest without devices needs nothing.
        let got = Opened::none().resolve(&[]).unwrap();
        assert!(got.disks.is_empty() && got.nets.is_empty());
    }

    #[test]
    fn the_same_image_is_taken_once() {
        let (_d, p) = image(4096);
        let mut here = given(&p, false);
        let got = here.resolve(&disk_only(&p, 4096)).unwrap();
        assert_eq!(got.disks.len(), 1);
        assert_eq!(got.disks[0].path(), p.as_path());
        // Taken: nothing is left for a second guest.
        let err = here.resolve(&disk_only(&p, 4096)).unwrap_err().to_string();
        assert!(err.contains("give --disk"), "{err}");
    }

    #[test]
    fn another_image_size_count_or_mode_is_one_line() {
        let (_d, p) = image(4096);
        let (_e, other) = image(4096);
        let err = given(&other, false)
            .resolve(&disk_only(&p, 4096))
            .unwrap_err()
            .to_string();
        assert!(err.contains("both sides must name the same image"), "{err}");
        let err = given(&p, false)
            .resolve(&disk_only(&p, 8192))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("(4096 bytes)") && err.contains("(8192 bytes)"),
            "{err}"
        );
        let err = given(&p, true).resolve(&disk_only(&p, 4096)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "disk 0: read-only here, writable for the guest"
        );
        let two = Devices {
            disks: vec![
                DiskConfig {
                    path: p.clone(),
                    read_only: false,
                };
                2
            ],
            nets: vec![],
        };
        let err = two
            .open()
            .unwrap()
            .resolve(&disk_only(&p, 4096))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "this side was given 2 disk(s), the guest has 1"
        );
    }

    #[test]
    fn a_path_that_is_not_an_image_is_refused_when_opened() {
        let dir = std::env::temp_dir();
        let err = Devices {
            disks: vec![DiskConfig {
                path: dir.clone(),
                read_only: true,
            }],
            nets: vec![],
        }
        .open()
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
