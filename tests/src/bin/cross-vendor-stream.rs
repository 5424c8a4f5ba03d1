//! Records this host's live migrations into the cross-vendor stream corpus (run by
//! scripts/cross-vendor-stream, which builds and names what it needs):
//!
//!   cross-vendor-stream OUT_DIR PROFILE...
//!
//! For each CPU profile: boots the test guest with its disk and network card, live-migrates
//! it through a recording relay to a real `ferry receive` here (ferry_tests::streams::record)
//! and writes OUT_DIR/NAME.stream (the source's side), NAME.disk (the disk at the switch),
//! NAME.console.log and NAME.json (the sidecar), NAME being
//! `<vendor>-f<family>m<model>-<profile>`. `FERRY_BIN`, `FERRY_GUEST_DIR` and
//! `FERRY_COMMIT` name the ferry, the guest and the commit it was built from.

use std::path::{Path, PathBuf};

fn name_of(profile: &str) -> String {
    let h = ferry_tests::corpus::this_host();
    let p = profile.replace([',', '='], "-");
    format!("{}-f{}m{}-{p}", h.vendor.to_lowercase(), h.family, h.model)
}

fn run(out: &Path, profiles: &[String]) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let client = exe.with_file_name("service-client");
    if !client.exists() {
        return Err(format!("{} is not built", client.display()));
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    for profile in profiles {
        let name = name_of(profile);
        eprintln!("== {name}: recording a live migration of the test guest with --cpu {profile}");
        let made = ferry_tests::streams::record(profile, &name, &client);
        let write = |ext: &str, bytes: &[u8]| {
            let path = out.join(format!("{name}.{ext}"));
            std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))
        };
        let mut stream = Vec::new();
        made.recording
            .write(&mut stream)
            .map_err(|e| e.to_string())?;
        write("stream", &stream)?;
        write("disk", &made.disk)?;
        write("console.log", made.console.replace('\r', "").as_bytes())?;
        let sidecar = serde_json::to_string_pretty(&made.sidecar).unwrap() + "\n";
        write("json", sidecar.as_bytes())?;
        eprintln!(
            "   {} bytes sent, answers {:?}; {}",
            made.recording.sent_bytes(),
            made.recording.answers(),
            made.sidecar["migration_report"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((out, profiles)) = args.split_first().filter(|(_, p)| !p.is_empty()) else {
        eprintln!("usage: cross-vendor-stream OUT_DIR PROFILE...");
        std::process::exit(2);
    };
    ferry_tests::require_kvm();
    if let Err(e) = run(&PathBuf::from(out), profiles) {
        eprintln!("cross-vendor-stream: error: {e}");
        std::process::exit(1);
    }
}
