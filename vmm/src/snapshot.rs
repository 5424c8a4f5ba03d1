//! Snapshot files: a VM stream (docs/migration-format.md) written by `ferry ctl snapshot`
//! and read by `ferry restore`, plain or compressed with zstd.

use migration::VmState;

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
/// removes the partial file on failure. Returns the bytes written and the memory ranges.
pub fn write_file(vm: &Vm, path: &std::path::Path) -> Result<(u64, usize), FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let state = vm.save_state()?;
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
        let mut w = std::io::BufWriter::new(file);
        let bytes = migration::stream::write_vm(&mut w, &state).map_err(at(&tmp))?;
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
        Ok(bytes) => Ok((bytes, state.memory.len())),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The first bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Reads a snapshot file: a VM stream as `ferry ctl snapshot` writes it, or the same
/// compressed with zstd (told by its first bytes, whatever its name). Decompression is
/// streaming, its window capped at 100 MiB by the decoder; the stream reader's caps apply
/// to what comes out.
pub fn read_file(path: &std::path::Path) -> Result<VmState, FileError> {
    use std::io::{BufReader, Read, Seek};
    let mut file = std::fs::File::open(path).map_err(FileError::Open)?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(FileError::Open)?;
    file.rewind().map_err(FileError::Open)?;
    let file = BufReader::new(file);
    if n == magic.len() && magic == ZSTD_MAGIC {
        let mut z = ruzstd::decoding::StreamingDecoder::new(file).map_err(FileError::Zstd)?;
        return Ok(migration::stream::read_vm(&mut BufReader::new(&mut z))?);
    }
    Ok(migration::stream::read_vm(&mut { file })?)
}
