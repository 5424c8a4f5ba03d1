//! Loading a Linux kernel into guest memory and describing the machine to it.
//!
//! Two kernel formats, told apart by their first bytes:
//! - an ELF `vmlinux`: entered through its PVH entry note (32-bit protected mode, `ebx` =
//!   `hvm_start_info`), or at its ELF entry in 64-bit mode with a zero page if it has none;
//! - a `bzImage`: the protected-mode part is loaded at 1 MiB and entered at its 64-bit entry
//!   (load address + 0x200) with `rsi` = the zero page (Linux x86 boot protocol >= 2.12).
//!
//! Both get the command line, the initrd (highest page-aligned place in low RAM), an e820
//! map and an MP table (see [`layout`]).

pub mod layout;
pub mod mptable;
pub mod regs;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use layout::*;
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::configurator::{
    linux::LinuxBootConfigurator, pvh::PvhBootConfigurator, BootConfigurator, BootParams,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, Cmdline, KernelLoader};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::memory::GuestMemoryMmap;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Boot protocol 2.12 added the 64-bit entry point flag.
const MIN_BOOT_PROTOCOL_64: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel {path}: cannot read it: {source}")]
    ReadKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {path}: not a kernel: neither an ELF vmlinux nor a bzImage (no \"HdrS\" boot header)")]
    NotAKernel { path: String },
    #[error("kernel {path}: cannot load the ELF vmlinux: {source}")]
    LoadElf { path: String, source: loader::Error },
    #[error("kernel {path}: cannot load the bzImage: {source}")]
    LoadBzImage { path: String, source: loader::Error },
    #[error("kernel {path}: bzImage boot protocol {version:#x} has no 64-bit entry (needs 2.12 or later with XLF_KERNEL_64)")]
    No64BitEntry { path: String, version: u16 },
    #[error("initrd {path}: cannot read it: {source}")]
    ReadInitrd {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "initrd {path}: {size} bytes do not fit in guest RAM between the kernel and {limit:#x}"
    )]
    InitrdTooBig { path: String, size: u64, limit: u64 },
    #[error("kernel command line is invalid or too long ({len} bytes, at most {max}): {source}")]
    Cmdline {
        len: usize,
        max: usize,
        #[source]
        source: linux_loader::cmdline::Error,
    },
    #[error("cannot write the {what} into guest memory: {source}")]
    WriteBootData {
        what: &'static str,
        #[source]
        source: linux_loader::configurator::Error,
    },
    #[error("cannot write the kernel command line into guest memory: {0}")]
    WriteCmdline(#[source] loader::Error),
    #[error("cannot write the raw image into guest memory: {0}")]
    WriteImage(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
}

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info` address.
    Pvh { rip: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode with identity paging, `rsi` = zero page.
    Linux64 { rip: u64, zero_page: u64 },
    /// A raw image entered in real mode at `rip` with every segment base 0.
    Real { rip: u64 },
    /// A raw image entered in 64-bit long mode, ring 0, identity paging, stack below `rsp`.
    Long64 { rip: u64, rsp: u64 },
}

enum Format {
    Elf,
    BzImage,
}

fn format_of(path: &Path) -> Result<Format, Error> {
    let path_s = path.display().to_string();
    let mut head = [0u8; 0x206];
    let mut f = File::open(path).map_err(|source| Error::ReadKernel {
        path: path_s.clone(),
        source,
    })?;
    let n = read_up_to(&mut f, &mut head).map_err(|source| Error::ReadKernel {
        path: path_s.clone(),
        source,
    })?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Format::Elf);
    }
    if n >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]])
            == KERNEL_HDR_MAGIC
    {
        return Ok(Format::BzImage);
    }
    Err(Error::NotAKernel { path: path_s })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// End of the first RAM region (the part below the MMIO gap).
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().next().map(|r| r.len()).unwrap_or(0)
}

/// The e820 map: base memory up to the EBDA, then RAM from 1 MiB in every region.
fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (i, r) in mem.iter().enumerate() {
        let (start, len) = if i == 0 {
            (HIMEM_START, r.len().saturating_sub(HIMEM_START))
        } else {
            (r.start_addr().0, r.len())
        };
        if len > 0 {
            map.push((start, len, E820_RAM));
        }
    }
    map
}

/// Loads the kernel, initrd and command line of `cfg` and writes the boot structures.
pub fn load_linux(mem: &GuestMemoryMmap, cfg: &VmConfig) -> Result<EntryPoint, Error> {
    let path_s = cfg.kernel.display().to_string();
    let format = format_of(&cfg.kernel)?;
    let mut kernel = File::open(&cfg.kernel).map_err(|source| Error::ReadKernel {
        path: path_s.clone(),
        source,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let loaded = match format {
        Format::Elf => {
            Elf::load(mem, None, &mut kernel, himem).map_err(|source| Error::LoadElf {
                path: path_s.clone(),
                source,
            })?
        }
        Format::BzImage => {
            BzImage::load(mem, None, &mut kernel, himem).map_err(|source| Error::LoadBzImage {
                path: path_s.clone(),
                source,
            })?
        }
    };

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| cmdline_error(cfg, e))?;
    cmdline
        .insert_str(&cfg.cmdline)
        .map_err(|e| cmdline_error(cfg, e))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(Error::WriteCmdline)?;

    let initrd_limit = match &loaded.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max) + 1,
        _ => u64::MAX,
    };
    let initrd = match &cfg.initrd {
        Some(p) => Some(load_initrd(mem, p, loaded.kernel_end, initrd_limit)?),
        None => None,
    };
    mptable::write(mem, cfg.vcpus)?;

    if let (Format::Elf, PvhBootCapability::PvhEntryPresent(entry)) = (&format, loaded.pvh_boot_cap)
    {
        write_pvh_info(mem, initrd)?;
        return Ok(EntryPoint::Pvh {
            rip: entry.0,
            start_info: PVH_INFO_START,
        });
    }
    let (rip, hdr) = match (&format, loaded.setup_header) {
        (Format::BzImage, Some(h)) => {
            let version = h.version;
            if version < MIN_BOOT_PROTOCOL_64 || h.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::No64BitEntry {
                    path: path_s,
                    version,
                });
            }
            (loaded.kernel_load.0 + 0x200, h)
        }
        _ => (loaded.kernel_load.0, Default::default()),
    };
    write_zero_page(mem, hdr, cfg.cmdline.len(), initrd)?;
    Ok(EntryPoint::Linux64 {
        rip,
        zero_page: ZERO_PAGE_START,
    })
}

fn cmdline_error(cfg: &VmConfig, source: linux_loader::cmdline::Error) -> Error {
    Error::Cmdline {
        len: cfg.cmdline.len(),
        max: CMDLINE_MAX - 1,
        source,
    }
}

/// Loads the initrd at the highest page-aligned address that keeps it in low RAM, below
/// `limit` and above the kernel. Returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), Error> {
    let path_s = path.display().to_string();
    let top = low_ram_end(mem).min(limit);
    let size = std::fs::metadata(path)
        .map_err(|source| Error::ReadInitrd {
            path: path_s.clone(),
            source,
        })?
        .len();
    let too_big = || Error::InitrdTooBig {
        path: path_s.clone(),
        size,
        limit: top,
    };
    let addr = top.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    let mut f = File::open(path).map_err(|source| Error::ReadInitrd {
        path: path_s.clone(),
        source,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| Error::ReadInitrd {
            path: path_s,
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size))
}

fn write_pvh_info(mem: &GuestMemoryMmap, initrd: Option<(u64, u64)>) -> Result<(), Error> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(|source| {
        Error::WriteBootData {
            what: "PVH start info",
            source,
        }
    })
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mut hdr: linux_loader::bootparam::setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), Error> {
    if hdr.header != KERNEL_HDR_MAGIC {
        // An ELF vmlinux entered at startup_64: describe ourselves as the boot loader.
        hdr.header = KERNEL_HDR_MAGIC;
        hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let map = e820_map(mem);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem).map_err(|source| {
        Error::WriteBootData {
            what: "zero page",
            source,
        }
    })
}

/// Copies a raw machine-code image to `addr` (tiny test guests, firmware-less boots).
pub fn load_raw(mem: &GuestMemoryMmap, image: &[u8], addr: u64) -> Result<(), Error> {
    mem.write_slice(image, GuestAddress(addr))
        .map_err(Error::WriteImage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ferry-boot-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn a_file_that_is_not_a_kernel_is_named() {
        let p = temp_file("notakernel", &[0x42; 4096]);
        let mem = crate::memory::GuestRam::new(64 << 20).unwrap();
        let cfg = VmConfig::new(&p);
        let e = load_linux(mem.memory(), &cfg).unwrap_err().to_string();
        assert!(e.contains("not a kernel"), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn e820_covers_ram_and_skips_the_ebda() {
        let mem = crate::memory::GuestRam::new(64 << 20).unwrap();
        let map = e820_map(mem.memory());
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
    }
}
