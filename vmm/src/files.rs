//! Files a user names, read with a cap: a profile, an image or a certificate may be a FIFO,
//! /dev/zero or simply huge, and nothing past the cap is read or allocated.

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
