//! Snapshot memory images mapped over guest RAM (vmm::memory::GuestRam::map_image,
//! memory/image.rs), without KVM: mmap only. The input's first byte even: the rest is a
//! snapshot file, restored as vmm::snapshot::restore_file restores a plain one, up to the
//! VM (migration::read_head, GuestRam::new, Rest::memory_mapped: MEMI images to
//! map_image, MEMR ranges written into RAM); CRCs are not checked under cfg(fuzzing).
//! Guest RAM is the stream's config.memory but at most 1 MiB, so that image tables the
//! stream's checks let through (they measure against config.memory) meet RAM smaller than
//! they claim. Odd: one migration::Image straight to map_image (RAM size, gpa, length, file
//! offset and up to 4 extents from the input, the file the rest of it). Checks: no panic;
//! an image mapped lies inside RAM and inside the file, RAM over it reads as the file's
//! bytes there and RAM outside it is as it was; afterwards the pages of every mapped
//! extent count as touched and their blocks as resident (what a snapshot or migration of
//! the restored VM sends).
#![no_main]

mod input;

use std::cell::RefCell;
use std::fs::File;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use migration::Image;
use vm_memory::{Bytes, GuestAddress};
use vmm::memory::GuestRam;

use input::Input;

const PAGE: u64 = 4096;
/// The most guest RAM an input gets.
const MAX_RAM: u64 = 1 << 20;

/// The snapshot file of this process, written for each input and removed once open (its
/// mappings keep it).
fn file_with(bytes: &[u8]) -> File {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        let name = format!("ferry-fuzz-snapshot-{}.bin", std::process::id());
        std::env::temp_dir().join(name)
    });
    std::fs::write(path, bytes).expect("the snapshot file is written");
    let file = File::open(path).expect("the snapshot file opens");
    std::fs::remove_file(path).expect("the snapshot file is removed");
    file
}

/// All of guest RAM (one region: at most 1 MiB, below the MMIO gap).
fn ram_bytes(ram: &GuestRam) -> Vec<u8> {
    let mut bytes = vec![0u8; ram.size() as usize];
    ram.memory()
        .read_slice(&mut bytes, GuestAddress(0))
        .expect("guest RAM reads");
    bytes
}

/// Maps `image` from `file` (holding `bytes`), checking what the mapping did to RAM.
fn map(ram: &mut GuestRam, file: &File, bytes: &[u8], image: &Image) -> Result<(), &'static str> {
    let before = ram_bytes(ram);
    ram.map_image(file, bytes.len() as u64, image)?;
    let (gpa, len, offset) = (image.gpa, image.len, image.offset);
    let end = gpa.checked_add(len).filter(|e| *e <= ram.size());
    assert!(
        end.is_some(),
        "{image:?} mapped outside {} bytes of RAM",
        ram.size()
    );
    let from_file = offset
        .checked_add(len)
        .and_then(|e| bytes.get(offset as usize..e as usize));
    let Some(from_file) = from_file else {
        panic!("{image:?} mapped from beyond a {}-byte file", bytes.len())
    };
    let now = ram_bytes(ram);
    let (gpa, len) = (gpa as usize, len as usize);
    assert!(
        now[gpa..gpa + len] == *from_file,
        "{image:?}: RAM does not read as the file"
    );
    assert!(
        now[..gpa] == before[..gpa] && now[gpa + len..] == before[gpa + len..],
        "{image:?}: mapping it changed RAM outside it"
    );
    Ok(())
}

/// Every extent of `images` lies inside its image; its pages count as touched, and its
/// blocks of `4096 << shift` bytes as resident.
fn check_extents(ram: &GuestRam, images: &[Image], shift: u8) {
    let touched = ram.touched_pages();
    let block = PAGE << (shift % 15);
    let resident = ram.resident_blocks(block);
    for image in images {
        for &(gpa, len) in &image.extents {
            let inside = gpa >= image.gpa
                && gpa
                    .checked_add(len)
                    .is_some_and(|e| e <= image.gpa + image.len);
            assert!(inside, "{image:?} mapped with an extent outside it");
            for page in gpa / PAGE..(gpa + len) / PAGE {
                let word = touched[0].get((page / 64) as usize).copied().unwrap_or(0);
                assert!(
                    word & 1 << (page % 64) != 0,
                    "extent page {page} not touched"
                );
            }
            let first = gpa / block * block;
            assert!(
                resident.contains(&first),
                "extent block {first:#x} not resident"
            );
        }
    }
    assert_eq!(
        ram.mapped_from_file(),
        images.iter().any(|i| !i.extents.is_empty())
    );
}

/// A snapshot file restored as restore_file restores a plain one, up to the VM.
fn restore(bytes: &[u8], shift: u8) {
    let file = file_with(bytes);
    let mut r = std::io::BufReader::with_capacity(1 << 16, &file);
    let Ok((state, rest)) = migration::read_head(&mut r) else {
        return;
    };
    let size = (state.config.memory / PAGE * PAGE).clamp(PAGE, MAX_RAM);
    let ram = RefCell::new(GuestRam::new(size).expect("guest RAM"));
    let mut mapped = Vec::new();
    let _ = rest.memory_mapped(
        |image| {
            map(&mut ram.borrow_mut(), &file, bytes, image)?;
            mapped.push(image.clone());
            Ok(())
        },
        |gpa, data| {
            let ram = ram.borrow();
            ram.memory()
                .write_slice(data, GuestAddress(gpa))
                .map_err(|_| "is not guest RAM")
        },
    );
    check_extents(&ram.borrow(), &mapped, shift);
}

/// One image straight to map_image.
fn map_one(input: &mut Input, shift: u8) {
    let size = (1 + u64::from(input.u8())) * PAGE;
    let mut image = Image {
        gpa: input.u64(),
        len: input.u64(),
        offset: input.u64(),
        extents: Vec::new(),
    };
    for _ in 0..input.u8() % 5 {
        image.extents.push((input.u64(), input.u64()));
    }
    let bytes = input.0;
    let file = file_with(bytes);
    let mut ram = GuestRam::new(size).expect("guest RAM");
    if map(&mut ram, &file, bytes, &image).is_ok() {
        check_extents(&ram, &[image], shift);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8();
    if mode & 1 == 0 {
        restore(input.0, mode >> 1);
    } else {
        map_one(&mut input, mode >> 1);
    }
});
