//! Shared key files: read only when nobody but their owner can read them, and made with
//! `ferry key generate` (32 random bytes, mode 0600, never over an existing file).

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use migration::auth::Key;

/// Bytes of a generated key.
pub const GENERATED_KEY: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: readable by group or others (mode {mode:04o}); `chmod 600 {path}` first")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("key file {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: migration::auth::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads at most `max` bytes of the private file at `path`; refuses one that its group or
/// others may read or write.
pub fn read_private(path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mode = f.metadata().map_err(io(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    Read::by_ref(&mut f)
        .take(max)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    Ok(bytes)
}

/// Reads the key file at `path`; refuses one that its group or others may read or write.
pub fn load(path: &Path) -> Result<Key, Error> {
    let bytes = read_private(path, migration::auth::MAX_KEY as u64 + 2)?;
    Key::new(&bytes).map_err(|source| Error::Key {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a new key file of [`GENERATED_KEY`] random bytes with mode 0600; an existing
/// file is left as it is and refused.
pub fn generate(path: &Path) -> Result<(), Error> {
    let key: [u8; GENERATED_KEY] = super::random().map_err(io(Path::new("getrandom")))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    // The mode a umask may have narrowed further is fine; wider is not possible.
    f.write_all(&key)
        .and_then(|()| f.sync_all())
        .map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ferry-key-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn a_generated_key_is_private_and_loads_and_is_never_overwritten() {
        let p = temp("gen");
        generate(&p).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), GENERATED_KEY as u64);
        load(&p).unwrap();
        let before = std::fs::read(&p).unwrap();
        let err = generate(&p).unwrap_err().to_string();
        assert!(err.contains("exists"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), before, "left as it was");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_key_others_can_read_is_refused_naming_the_mode() {
        let p = temp("exposed");
        std::fs::write(&p, [7u8; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&p).unwrap_err().to_string();
        assert!(
            err.contains("mode 0644") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load(&p).is_err(), "group-readable too");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        load(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
    }
}
