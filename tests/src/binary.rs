//! The `ferry` binary the tests run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `ferry` binary of this build (built on first use if cargo has not built it yet), or
/// the one `FERRY_BIN` names (to run the tests against a ferry built elsewhere).
pub fn ferry_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("FERRY_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/<test> -> target/<profile>/ferry
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir layout");
        let release = profile_dir.ends_with("release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "ferry-vmm", "--bin", "ferry"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the ferry binary");
        assert!(status.success(), "cargo build of the ferry binary failed");
        let bin = profile_dir.join("ferry");
        assert!(bin.exists(), "{} missing after cargo build", bin.display());
        bin
    })
}
