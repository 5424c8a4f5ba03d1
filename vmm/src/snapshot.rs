//! Snapshot files: a VM stream (docs/migration-format.md) written by `ferry ctl snapshot`
//! and read by `ferry restore`, plain or compressed with zstd.

use migration::VmState;

use crate::devices::virtio::backends::Opened as HostDevices;
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
    #[error(transparent)]
    Memory(#[from] crate::memory::Error),
    #[error("{path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    /// What kind of failure this is (docs/api.md, "Error codes").
    pub fn code(&self) -> crate::codes::Code {
        use crate::codes::Code;
        match self {
            FileError::Open(_) | FileError::Write { .. } => Code::Io,
            FileError::Zstd(_) | FileError::Stream(_) => Code::BadFile,
            FileError::Save(e) => e.code(),
            FileError::Memory(_) => Code::Kvm,
        }
    }
}

/// Saves the paused `vm` and writes it to `<path>.partial` (a new file, never through an
/// existing one or a link), syncs it, renames it over `path` and syncs the directory;
/// removes the partial file on failure. Guest RAM goes from where it lies into the file
/// ([`Vm::save_in_place`]; `lifecycle` is the VM's lifecycle guard, held) as one image per
/// RAM region (format version 4, MEMI): its non-zero extents at their places, page
/// aligned, zero pages left as holes, so that [`restore_file`] can map it. Returns the
/// stream's bytes (the file's length; its disk use is the extents) and the extents.
pub fn write_file(
    vm: &Vm,
    lifecycle: &std::sync::MutexGuard<'_, ()>,
    path: &std::path::Path,
) -> Result<(u64, usize), FileError> {
    let regions = vm.ram().regions();
    vm.save_in_place(lifecycle, |state, ranges| {
        write_new(path, |w| {
            migration::write_vm_image(w, state, &regions, ranges)
        })
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

/// A snapshot file as found: plain (a VM stream from offset 0), or compressed with zstd
/// (told by its first bytes, whatever its name).
enum Opened {
    Plain(std::fs::File),
    Zstd(Box<dyn std::io::Read>),
}

/// Tells a snapshot file's kind by its first bytes. Decompression is streaming, its window
/// capped at 100 MiB by the decoder; the stream reader's caps apply to what comes out.
fn classify(mut file: std::fs::File) -> Result<Opened, FileError> {
    use std::io::{BufReader, Read, Seek};
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(FileError::Open)?;
    file.rewind().map_err(FileError::Open)?;
    if n == magic.len() && magic == ZSTD_MAGIC {
        let file = BufReader::with_capacity(1 << 20, file);
        let z = ruzstd::decoding::StreamingDecoder::new(file).map_err(FileError::Zstd)?;
        return Ok(Opened::Zstd(Box::new(BufReader::with_capacity(1 << 20, z))));
    }
    Ok(Opened::Plain(file))
}

/// Reads a whole snapshot file ([`open`]), its memory included, onto the heap.
pub fn read_file(path: &std::path::Path) -> Result<VmState, FileError> {
    let file = std::fs::File::open(path).map_err(FileError::Open)?;
    Ok(match classify(file)? {
        Opened::Plain(f) => {
            migration::stream::read_vm(&mut std::io::BufReader::with_capacity(1 << 20, f))?
        }
        Opened::Zstd(mut r) => migration::stream::read_vm(&mut r)?,
    })
}

/// Restores the snapshot file at `path` into a new VM, paused, as [`Vm::restore`] does.
/// A plain file's memory images (MEMI) are mapped, private, over guest RAM: no page is
/// read before the guest touches it, and the file must not change while the VM runs
/// (replacing it with a new file, as `ferry ctl snapshot` does, is fine). Memory ranges
/// (MEMR: older snapshots, or a compressed file's images) are written into guest RAM as
/// each arrives: the heap holds one section or extent at a time (at most 64 MiB), never
/// the guest's RAM.
pub fn restore_file(
    path: &std::path::Path,
    devices: &mut HostDevices,
    console: Box<dyn std::io::Write + Send>,
) -> Result<Vm, FileError> {
    let file = std::fs::File::open(path).map_err(FileError::Open)?;
    restore_from(file, devices, console)
}

/// [`restore_file`] from a snapshot file opened already (`ferry restore` opens it before
/// it gives up root and enters its filter, and reads it only after).
pub fn restore_from(
    file: std::fs::File,
    devices: &mut HostDevices,
    console: Box<dyn std::io::Write + Send>,
) -> Result<Vm, FileError> {
    use vm_memory::{Bytes, GuestAddress};
    let (mut vm, state) = match classify(file)? {
        Opened::Plain(file) => {
            let len = file.metadata().map_err(FileError::Open)?.len();
            let mut input = std::io::BufReader::with_capacity(1 << 16, &file);
            let (state, rest) = migration::read_head(&mut input)?;
            crate::timeline::mark("state read");
            let ram = std::cell::RefCell::new(crate::memory::GuestRam::new(state.config.memory)?);
            rest.memory_mapped(
                |image| ram.borrow_mut().map_image(&file, len, image),
                |gpa, data| {
                    let ram = ram.borrow();
                    let mem = ram.memory();
                    mem.write_slice(data, GuestAddress(gpa))
                        .map_err(|_| "is not guest RAM")
                },
            )?;
            crate::timeline::mark("memory");
            let ram = Some(ram.into_inner());
            (Vm::build_for(&state, devices, console, ram)?, state)
        }
        Opened::Zstd(mut input) => {
            let (state, rest) = migration::read_head(&mut input)?;
            crate::timeline::mark("state read");
            let vm = Vm::build_for(&state, devices, console, None)?;
            rest.memory(|gpa, data| {
                vm.memory()
                    .write_slice(data, GuestAddress(gpa))
                    .map_err(|_| "is not guest RAM")
            })?;
            crate::timeline::mark("memory");
            (vm, state)
        }
    };
    vm.restore_state(&state)?;
    crate::timeline::mark("loaded");
    Ok(vm)
}
