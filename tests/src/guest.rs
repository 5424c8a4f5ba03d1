//! The Linux test guest: built by tests/guest/build.sh from Debian packages, cached outside
//! the work tree. `FERRY_GUEST_DIR` points the tests at an already built guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The files of a built test guest.
#[derive(Debug, Clone)]
pub struct Guest {
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    /// The default kernel command line (console, emulator accommodations, `ferry.park`).
    pub cmdline: String,
}

impl Guest {
    fn at(dir: &Path) -> Guest {
        let cmdline = std::fs::read_to_string(dir.join("cmdline"))
            .unwrap_or_else(|e| panic!("test guest {}: no cmdline file: {e}", dir.display()));
        Guest {
            dir: dir.to_path_buf(),
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            initramfs: dir.join("initramfs.cpio"),
            cmdline: cmdline.trim().to_string(),
        }
    }

    /// The default command line plus `extra` (workload, heartbeat interval, ...).
    pub fn cmdline_with(&self, extra: &str) -> String {
        format!("{} {extra}", self.cmdline)
    }
}

/// The test guest, built on first use (minutes, once per set of inputs).
pub fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        if let Some(dir) = std::env::var_os("FERRY_GUEST_DIR") {
            return Guest::at(Path::new(&dir));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Guest::at(Path::new(&dir))
    })
}
