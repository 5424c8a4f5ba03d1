//! The virtio-blk device (vmm::devices::virtio::block) as a guest drives it through the
//! virtio-mmio transport: the input sets the device up and makes the descriptor chains,
//! request headers (type, sector), data buffers and notifications (guest.rs), over a
//! 64 KiB image file (written afresh in the temporary directory for each input, removed
//! once open), read-only where the input's first byte is odd. Checks, beyond guest.rs's
//! (dirty pages, used ring entries, a saved state restores): no panic, the image keeps its
//! size (no write past its end), a read-only image is never written; libFuzzer's malloc
//! and RSS limits catch an unbounded allocation, -timeout a device that spins.
#![no_main]

mod guest;
mod input;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::block::{Block, DiskConfig, SECTOR};

use guest::Guest;
use input::Input;

/// The image: 128 sectors.
const IMAGE_SIZE: usize = 128 * SECTOR as usize;

/// The image's path and what it holds before each input (sector i: bytes i).
fn image() -> &'static (PathBuf, Vec<u8>) {
    static IMAGE: OnceLock<(PathBuf, Vec<u8>)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let name = format!("ferry-fuzz-virtio-blk-{}.img", std::process::id());
        let path = std::env::temp_dir().join(name);
        let bytes = (0..IMAGE_SIZE)
            .map(|i| (i / SECTOR as usize) as u8)
            .collect();
        (path, bytes)
    })
}

/// Writes the image afresh and opens it as the device (`read_only` or not) and for the
/// checks; it is removed once open, so that no process leaves one behind.
fn open_image(path: &Path, fresh: &[u8], read_only: bool) -> (Block, File) {
    std::fs::write(path, fresh).expect("the image is written");
    let cfg = DiskConfig {
        path: path.to_path_buf(),
        read_only,
    };
    let block = Block::open(&cfg).expect("the image opens");
    let check = File::open(path).expect("the image opens");
    std::fs::remove_file(path).expect("the image is removed");
    (block, check)
}

fuzz_target!(|data: &[u8]| {
    let (path, fresh) = image();
    let mut input = Input(data);
    let read_only = input.u8() & 1 != 0;
    let (block, image) = open_image(path, fresh, read_only);
    let mut guest = Guest::new(Box::new(block), &mut input);
    guest.run(&mut input, |_, _| {});
    drop(guest);
    let len = image.metadata().expect("the image's size").len();
    assert_eq!(len, IMAGE_SIZE as u64, "the image's size changed");
    let mut now = vec![0u8; IMAGE_SIZE];
    image.read_exact_at(&mut now, 0).expect("the image reads");
    assert!(!read_only || now == *fresh, "a read-only image was written");
});
