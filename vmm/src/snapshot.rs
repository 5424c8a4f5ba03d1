//! Snapshot files: a VM stream (docs/migration-format.md) written by `ferry ctl snapshot`
//! and read by `ferry restore`, plain or compressed with zstd.

use migration::VmState;

use crate::devices::virtio::backends::Devices as DeviceChoice;
use crate::vm::state::Error;
use crate::vm::Vm;

/// Why a snapshot file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Open(#[source] std::io::Error),
    #[error("zstd: {0}")]
    Zstd(#[source] ruzstd::decoding::errors::FrameDecoderError),
    #[error(transparent)]
    Stream(#[from] migration::stream::Error),
    #[error(transparent)]
    Save(#[from] Error),
    #[error("{path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Saves the paused `vm` and writes it to `<path>.partial` (a new file, never through an
/// existing one or a link), syncs it, renames it over `path` and syncs the directory;
/// removes the partial file on failure. Guest RAM goes from where it lies into the file
/// ([`Vm::save_in_place`]; `lifecycle` is the VM's lifecycle guard, held). Returns the bytes
/// written and the memory ranges.
pub fn write_file(
    vm: &Vm,
    lifecycle: &std::sync::MutexGuard<'_, ()>,
    path: &std::path::Path,
) -> Result<(u64, usize), FileError> {
    vm.save_in_place(lifecycle, |state, ranges| {
        write_new(path, |w| migration::write_vm_ranges(w, state, ranges))
            .map(|bytes| (bytes, ranges.len()))
    })?
}

/// Writes a new file through `<path>.partial` as [`write_file`] describes, its contents from
/// `contents` (given a buffered writer); returns what `contents` returned.
fn write_new(
    path: &std::path::Path,
    contents: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<u64>,
) -> Result<u64, FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".partial");
    let tmp = std::path::PathBuf::from(tmp_name);
    let at = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| FileError::Write { path, source }
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .map_err(at(&tmp))?;
    let written = (|| -> Result<u64, FileError> {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let bytes = contents(&mut w).map_err(at(&tmp))?;
        let file = w.into_inner().map_err(|e| at(&tmp)(e.into_error()))?;
        file.sync_all().map_err(at(&tmp))?;
        std::fs::rename(&tmp, path).map_err(at(path))?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(at(dir))?;
        Ok(bytes)
    })();
    match written {
        Ok(bytes) => Ok(bytes),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The first bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Opens a snapshot file: a VM stream as `ferry ctl snapshot` writes it, or the same
/// compressed with zstd (told by its first bytes, whatever its name). Decompression is
/// streaming, its window capped at 100 MiB by the decoder; the stream reader's caps apply
/// to what comes out.
fn open(path: &std::path::Path) -> Result<Box<dyn std::io::Read>, FileError> {
    use std::io::{BufReader, Read, Seek};
    let mut file = std::fs::File::open(path).map_err(FileError::Open)?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(FileError::Open)?;
    file.rewind().map_err(FileError::Open)?;
    let file = BufReader::with_capacity(1 << 20, file);
    if n == magic.len() && magic == ZSTD_MAGIC {
        let z = ruzstd::decoding::StreamingDecoder::new(file).map_err(FileError::Zstd)?;
        return Ok(Box::new(BufReader::with_capacity(1 << 20, z)));
    }
    Ok(Box::new(file))
}

/// Reads a whole snapshot file ([`open`]), its memory included, onto the heap.
pub fn read_file(path: &std::path::Path) -> Result<VmState, FileError> {
    Ok(migration::stream::read_vm(&mut open(path)?)?)
}

/// Restores the snapshot file at `path` into a new VM, paused, as [`Vm::restore`] does, with
/// its memory written into guest RAM as each section arrives: the heap holds one MEMR section
/// at a time (at most 64 MiB, 4 MiB as ferry writes them), never the guest's RAM.
pub fn restore_file(
    path: &std::path::Path,
    devices: &DeviceChoice,
    console: Box<dyn std::io::Write + Send>,
) -> Result<Vm, FileError> {
    use vm_memory::{Bytes, GuestAddress};
    let mut input = open(path)?;
    let (state, rest) = migration::read_head(&mut input)?;
    let mut vm = Vm::build_for(&state, devices, console)?;
    rest.memory(|gpa, data| {
        vm.memory()
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| "is not guest RAM")
    })?;
    vm.restore_state(&state)?;
    Ok(vm)
}
