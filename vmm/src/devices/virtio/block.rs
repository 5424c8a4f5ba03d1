//! virtio-blk backed by a raw image file: read, write, flush, get-id. A write to a read-only
//! disk, a sector past the end or a failing file is the request's I/O error status; a
//! request the guest built wrong (a buffer outside RAM, a broken chain, a short header) is a
//! device error (DEVICE_NEEDS_RESET).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::*;
use virtio_queue::{Queue, QueueT};

use super::{descriptors, pop, Backend, Error};
use crate::memory::GuestMemoryMmap;

/// Bytes of a sector.
pub const SECTOR: u64 = 512;
/// The bounce buffer between the image and guest RAM.
const CHUNK: usize = 128 << 10;
/// The request header: type u32, reserved u32, sector u64.
const HEADER: usize = 16;
/// Length of the GET_ID answer.
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// What `--disk path=FILE[,readonly=on]` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("disk {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {0}: not a regular file")]
    NotAFile(PathBuf),
    #[error("disk {0}: its size is not a multiple of 512 bytes")]
    Unaligned(PathBuf),
}

/// A virtio block device.
#[derive(Debug)]
pub struct Block {
    file: File,
    path: PathBuf,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    buf: Vec<u8>,
}

impl Block {
    /// Opens the image `cfg` names (read-only if asked).
    pub fn open(cfg: &DiskConfig) -> Result<Block, OpenError> {
        let path = &cfg.path;
        let open = |source| OpenError::Open {
            path: path.clone(),
            source,
        };
        if !std::fs::metadata(path).map_err(open)?.is_file() {
            return Err(OpenError::NotAFile(path.clone()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(path)
            .map_err(open)?;
        let meta = file.metadata().map_err(open)?;
        if meta.len() % SECTOR != 0 {
            return Err(OpenError::Unaligned(path.clone()));
        }
        // The image as both sides of a migration name it (shared storage); its ID is the
        // canonical file name, the same on both.
        let canonical = std::fs::canonicalize(path).map_err(open)?;
        let mut id = [0u8; ID_LEN];
        let name = canonical
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        for (d, s) in id.iter_mut().zip(name.unwrap_or_default().bytes()) {
            *d = s;
        }
        Ok(Block {
            file,
            path: canonical,
            sectors: meta.len() / SECTOR,
            read_only: cfg.read_only,
            id,
            buf: vec![0; CHUNK],
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves one request; returns the bytes written into the chain (data and status).
    fn request(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, Error> {
        descriptors(chain.clone())?;
        let buffer = Error::Buffer;
        let mut reader = chain.clone().reader(mem).map_err(buffer)?;
        let mut writer = chain.writer(mem).map_err(buffer)?;
        let mut header = [0u8; HEADER];
        reader
            .read_exact(&mut header)
            .map_err(|_| Error::ShortRequest)?;
        if writer.available_bytes() == 0 {
            return Err(Error::ShortRequest);
        }
        // The last writable byte is the status.
        let mut status_w = writer
            .split_at(writer.available_bytes() - 1)
            .map_err(buffer)?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let (status, written) = match kind {
            VIRTIO_BLK_T_IN => self.read(sector, &mut writer),
            VIRTIO_BLK_T_OUT => (self.write(sector, &mut reader), 0),
            VIRTIO_BLK_T_FLUSH => (self.flush(), 0),
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(ID_LEN);
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        status_w
            .write_all(&[status as u8])
            .map_err(Error::BufferIo)?;
        Ok(written as u32 + 1)
    }

    /// Whether `[sector, sector + len)` bytes-wise lies inside the image.
    fn inside(&self, sector: u64, len: usize) -> Option<u64> {
        let start = sector.checked_mul(SECTOR)?;
        let end = start.checked_add(len as u64)?;
        (end <= self.sectors * SECTOR).then_some(start)
    }

    fn read(
        &mut self,
        sector: u64,
        w: &mut virtio_queue::Writer<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> (u32, usize) {
        let len = w.available_bytes();
        let Some(mut at) = self.inside(sector, len) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            if self.file.read_exact_at(&mut self.buf[..n], at).is_err()
                || w.write_all(&self.buf[..n]).is_err()
            {
                return (VIRTIO_BLK_S_IOERR, done);
            }
            done += n;
            at += n as u64;
        }
        (VIRTIO_BLK_S_OK, done)
    }

    fn write(
        &mut self,
        sector: u64,
        r: &mut virtio_queue::Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> u32 {
        if self.read_only {
            return VIRTIO_BLK_S_IOERR;
        }
        let len = r.available_bytes();
        let Some(mut at) = self.inside(sector, len) else {
            return VIRTIO_BLK_S_IOERR;
        };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            if r.read_exact(&mut self.buf[..n]).is_err()
                || self.file.write_all_at(&self.buf[..n], at).is_err()
            {
                return VIRTIO_BLK_S_IOERR;
            }
            done += n;
            at += n as u64;
        }
        VIRTIO_BLK_S_OK
    }

    fn flush(&mut self) -> u32 {
        match self.file.sync_data() {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(_) => VIRTIO_BLK_S_IOERR,
        }
    }
}

impl Backend for Block {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_sizes(&self) -> &'static [u16] {
        &[256]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64, sectors) is the only field offered.
        let config = self.sectors.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, Error> {
        let mut used = false;
        // A queue the driver did not make ready has no rings to read or write.
        let Some(q) = queues.get_mut(index).filter(|q| q.ready()) else {
            return Ok(false);
        };
        loop {
            while let Some(chain) = pop(q, index, mem)? {
                let head = chain.head_index();
                let len = self.request(chain, mem)?;
                q.add_used(mem, head, len)
                    .map_err(|e| Error::Queue(index, e))?;
                used = true;
            }
            // With EVENT_IDX the driver notifies only past the index this publishes.
            if !q
                .enable_notification(mem)
                .map_err(|e| Error::Queue(index, e))?
            {
                return Ok(used);
            }
        }
    }

    fn backend(&self) -> migration::DeviceBackend {
        migration::DeviceBackend::Disk {
            path: self.path.to_string_lossy().into_owned(),
            size: self.sectors * SECTOR,
            read_only: self.read_only,
        }
    }

    fn describe(&self) -> String {
        format!(
            "virtio-blk {}{}",
            self.path.display(),
            if self.read_only { " (read-only)" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// Guest RAM (64 KiB) and a ready 16-entry queue: descriptors at 0x1000, available
    /// ring at 0x2000, used ring at 0x3000.
    fn ram_and_queue() -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mut q = super::super::new_queue(16);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        (mem, q)
    }

    fn disk(name: &str) -> (Block, PathBuf) {
        let p = std::env::temp_dir().join(format!("ferry-block-{}-{name}.img", std::process::id()));
        std::fs::write(&p, vec![0u8; 8 * SECTOR as usize]).unwrap();
        let cfg = DiskConfig {
            path: p.clone(),
            read_only: false,
        };
        (Block::open(&cfg).unwrap(), p)
    }

    // Found by the virtio_blk fuzz target: virtio-queue reports no chain for an available
    // index more than a queue ahead, yet more buffers to enable_notification, and the
    // device looped for ever.
    #[test]
    fn an_available_index_more_than_a_queue_ahead_is_a_device_error() {
        let (mem, q) = ram_and_queue();
        let (mut blk, path) = disk("ahead");
        mem.write_obj(17u16, GuestAddress(0x2002)).unwrap();
        let r = blk.process_queue(0, &mut [q], &mem);
        std::fs::remove_file(path).unwrap();
        assert!(matches!(r, Err(Error::Queue(0, _))), "{r:?}");
    }

    #[test]
    fn a_queue_not_ready_is_left_alone() {
        let (mem, mut q) = ram_and_queue();
        q.reset(); // not ready, its rings at address 0
        let (mut blk, path) = disk("not-ready");
        mem.write_obj(0xffff_ffffu32, GuestAddress(0)).unwrap();
        let r = blk.process_queue(0, &mut [q], &mem);
        std::fs::remove_file(path).unwrap();
        assert!(matches!(r, Ok(false)), "{r:?}");
        let at0: u32 = mem.read_obj(GuestAddress(0)).unwrap();
        assert_eq!(
            at0, 0xffff_ffff,
            "nothing written at the default ring address 0"
        );
    }
}
