//! Assembles the tiny guests in tiny/ with GNU as and links each one flat at its load
//! address (see tiny/README.md), into $OUT_DIR/<name>.bin, and writes $OUT_DIR/tiny.rs
//! with one `pub const NAME: TinyImage` per guest.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (install binutils: apt-get install binutils)")
    });
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let out = Path::new(&out);
    println!("cargo:rerun-if-changed=tiny");
    let mut files: Vec<_> = std::fs::read_dir("tiny")
        .expect("tests/tiny exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "S"))
        .collect();
    files.sort();
    let mut consts = String::new();
    for src in files {
        let stem = src.file_stem().unwrap().to_str().unwrap().to_string();
        if stem.starts_with("pvh_") {
            // A PVH ELF, loaded by a VMM's kernel loader at 1 MiB.
            let obj = out.join(format!("{stem}.o"));
            let elf = out.join(format!("{stem}.elf"));
            run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
            run(Command::new("ld")
                .args(["-m", "elf_x86_64", "-e", "start", "-Ttext-segment=0x100000"])
                .args(["-z", "noexecstack", "-o"])
                .arg(&elf)
                .arg(&obj));
            writeln!(
                consts,
                "/// Built from tests/tiny/{stem}.S.\npub const {}: PvhImage = PvhImage {{ name: \"{stem}\", elf: include_bytes!({:?}) }};",
                stem.to_uppercase(),
                elf.display().to_string()
            )
            .unwrap();
            continue;
        }
        let (addr, mode) = if stem.starts_with("real_") {
            (0x1000u64, "Real")
        } else if stem.starts_with("long_") {
            (0x10000u64, "Long64")
        } else {
            panic!(
                "{}: name must start with real_, long_ or pvh_",
                src.display()
            );
        };
        let obj = out.join(format!("{stem}.o"));
        let bin = out.join(format!("{stem}.bin"));
        run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
        run(Command::new("ld")
            .args(["-m", "elf_x86_64", "--oformat=binary", "-e", "start"])
            .arg(format!("-Ttext={addr:#x}"))
            .arg("-o")
            .arg(&bin)
            .arg(&obj));
        writeln!(
            consts,
            "/// Built from tests/tiny/{stem}.S.\npub const {}: TinyImage = TinyImage {{ name: \"{stem}\", bytes: include_bytes!({:?}), addr: {addr:#x}, mode: TinyMode::{mode} }};",
            stem.to_uppercase(),
            bin.display().to_string()
        )
        .unwrap();
    }
    std::fs::write(out.join("tiny.rs"), consts).expect("write tiny.rs");
}
