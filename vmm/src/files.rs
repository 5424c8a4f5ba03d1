//! Files a user names, read with a cap: a profile, an image or a certificate may be a FIFO,
//! /dev/zero or simply huge, and nothing past the cap is read or allocated. And a file's
//! pages dropped from the page cache, for measuring a restore from disk.

use std::io::Read;
use std::path::Path;

/// The bytes of `path`, refused with an error once it holds more than `max`.
pub fn read_capped(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(bytes)
}

/// Writes back and drops `path`'s pages from the page cache (posix_fadvise DONTNEED): the
/// next read comes from the disk. Pages some process has mapped stay.
pub fn drop_cached(path: &Path) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path)?;
    f.sync_all()?;
    // SAFETY: posix_fadvise only advises the kernel about the open file's cached pages; it
    // reads and writes no memory of this process.
    match unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_endless_file_is_refused_at_the_cap() {
        let e = super::read_capped(std::path::Path::new("/dev/zero"), 4096).unwrap_err();
        assert_eq!(e.to_string(), "larger than 4096 bytes");
        let dir = std::env::temp_dir().join(format!("ferry-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("exact");
        std::fs::write(&f, [7u8; 4096]).unwrap();
        assert_eq!(super::read_capped(&f, 4096).unwrap().len(), 4096);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
