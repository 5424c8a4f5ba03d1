//! Guest RAM: anonymous mmap regions (vm-memory) with a dirty bitmap per region for the
//! pages ferry itself writes, registered as KVM memslots whose dirty logging can be switched
//! on and off while the VM exists.
//!
//! ```text
//! guest physical
//! 0 ............................ low_end                        4 GiB ........ high_end
//! [ slot 0: RAM                 ][ MMIO gap: IOAPIC, LAPIC, ... ][ slot 1: RAM ]
//! ```
//! Invariant: every slot is page aligned and backed by exactly one vm-memory region at the
//! same guest address; slot i is region i. A restored region may be a private mapping of
//! a snapshot file instead (image.rs): its pages are read from the file on first touch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_userspace_memory_region, KVMIO,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

mod image;
mod pagemap;
mod pages;
pub(crate) use pagemap::PAGEMAP_SCAN;

pub use pagemap::Pagemap;
pub use pages::PageSet;

/// Guest memory with a dirty bitmap for writes made by the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Start of the hole below 4 GiB for MMIO (IOAPIC, LAPIC, devices).
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of the MMIO hole: RAM continues here.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Guest page size for dirty tracking: the one the stream and the page frames use.
pub use migration::limits::PAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    Allocate {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot register guest memory slot {slot} with KVM: {source}")]
    SetUserMemoryRegion {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot read the dirty log of slot {slot}: {source}")]
    GetDirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot clear the dirty log of slot {slot}: {source}")]
    ClearDirtyLog {
        slot: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("guest RAM is not attached to a VM yet")]
    NotAttached,
    #[error("cannot keep guest memory out of core dumps (MADV_DONTDUMP): {0}")]
    NoDump(#[source] std::io::Error),
}

/// The pages whose bits are set in `words` (bit i of word w is page 64 w + i), counted from
/// `first_page`, ascending: how the dirty log's and pagemap's bitmaps are read.
pub fn set_pages(words: &[u64], first_page: u64) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(move |(w, &word)| {
        let base = first_page + w as u64 * 64;
        let mut rest = word;
        std::iter::from_fn(move || {
            (rest != 0).then(|| {
                let bit = u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                base + bit
            })
        })
    })
}

vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Switches `vm` to manual dirty-log protection with an initially set log where its KVM has
/// it; returns whether it is on (see [`GuestRam::manual_protect`]).
fn enable_manual_protect(vm: &VmFd) -> bool {
    let want = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
    let supported = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if supported < 0 || (supported as u32) & want != want {
        return false;
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(want);
    vm.enable_cap(&cap).is_ok()
}

/// The RAM ranges (guest address, size) for `size` bytes of guest memory.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    ranges
}

/// Backs `[gpa, gpa + len)` of guest RAM with memory now, as a first write would (the kernel
/// allocates and zeroes it), without changing what it holds: MADV_POPULATE_WRITE. The range
/// is clipped to RAM; a part outside RAM is skipped. Fails where the kernel has no
/// MADV_POPULATE_WRITE (before Linux 5.14).
pub fn populate(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> std::io::Result<()> {
    for region in mem.iter() {
        let start = region.start_addr().0;
        let from = gpa.max(start);
        let to = gpa.saturating_add(len).min(start + region.len());
        if from >= to {
            continue;
        }
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(from - start))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // [host, host + (to - from)) lies inside this region's mapping (clipped above),
        // which `mem` keeps alive for the call. MADV_POPULATE_WRITE only faults the pages
        // in as writable, never changes their contents, so a vCPU or another thread writing
        // them at the same time sees nothing different.
        advise(host, (to - from) as usize, libc::MADV_POPULATE_WRITE)?;
    }
    Ok(())
}

/// madvise(2) of `[host, host + len)`, a range inside a mapping of guest RAM, with an advice
/// that changes how the kernel backs or dumps it, never what it holds.
fn advise(host: *mut u8, len: usize, advice: libc::c_int) -> std::io::Result<()> {
    debug_assert!([
        libc::MADV_POPULATE_WRITE,
        libc::MADV_HUGEPAGE,
        libc::MADV_DONTDUMP
    ]
    .contains(&advice));
    // SAFETY: these advices change how the kernel backs a mapping (faulting pages in, huge
    // pages) or whether a core dump holds it, never what it holds or whether it stays
    // mapped, so the call is sound for any range; an unmapped one fails with ENOMEM.
    match unsafe { libc::madvise(host.cast::<libc::c_void>(), len, advice) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The bytes of guest RAM `[gpa, gpa + len)`, read in place (no copy); None unless that
/// range lies in one RAM region.
///
/// # Safety
///
/// Nothing may write that RAM while the returned slice or a piece of it is used: the
/// guest's vCPUs and its virtio devices (the only devices that write guest RAM: a disk's
/// reads, a card's received frames) are paused and stay so (Vm::pause pauses both, see
/// crate::devices::manager), and ferry itself writes it only when booting or restoring.
pub unsafe fn ram_bytes(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Option<&[u8]> {
    let host = mem
        .get_slice(GuestAddress(gpa), len as usize)
        .ok()?
        .ptr_guard()
        .as_ptr();
    // SAFETY: [host, host + len) lies in the mapping of one RAM region (get_slice checked
    // that), which lives as long as `mem`; the caller guarantees that nothing writes it
    // while the slice is used.
    Some(unsafe { std::slice::from_raw_parts(host, len as usize) })
}

/// Guest RAM and the KVM memslots over it.
#[derive(Debug)]
pub struct GuestRam {
    /// The VM whose memslots these are, once attached (dropped before `mem` is unmapped).
    vm: OnceLock<Arc<VmFd>>,
    mem: GuestMemoryMmap,
    dirty_logging: AtomicBool,
    /// KVM's manual dirty-log protection is on (see [`GuestRam::manual_protect`]).
    manual_protect: bool,
    /// Extents (gpa, length, ascending) mapped from a snapshot file that hold data: pages
    /// whose contents are in the file, resident or not (image.rs).
    file_extents: Vec<(u64, u64)>,
}

impl GuestRam {
    /// Allocates `size` bytes of guest RAM (not yet registered with KVM).
    pub fn new(size: u64) -> Result<Self, Error> {
        let regions = ram_ranges(size)
            .into_iter()
            .map(|(addr, len)| GuestRegionMmap::from_range(addr, len as usize, None))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| Error::Allocate { size, source })?;
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Allocate {
            size,
            source: e.into(),
        })?;
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("a region contains its own first byte");
            // The whole mapping this region owns. Transparent huge pages: 512x fewer faults
            // and TLB entries. Left out of core dumps: the guest's RAM is not ferry's to dump.
            if let Err(e) = advise(host, region.len() as usize, libc::MADV_HUGEPAGE) {
                log::info!("guest memory: no transparent huge pages: {e}");
            }
            advise(host, region.len() as usize, libc::MADV_DONTDUMP).map_err(Error::NoDump)?;
        }
        Ok(GuestRam {
            vm: OnceLock::new(),
            mem,
            dirty_logging: AtomicBool::new(false),
            manual_protect: false,
            file_extents: Vec::new(),
        })
    }

    /// The memory, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }

    /// Each region's guest address and length, in the order of the bitmaps below.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }

    /// Makes this RAM the memory of `vm`: manual dirty-log protection where KVM has it (see
    /// [`GuestRam::manual_protect`]), then every region as a memslot. Once per RAM.
    pub fn attach(&mut self, vm: Arc<VmFd>) -> Result<(), Error> {
        self.manual_protect = enable_manual_protect(&vm);
        self.register(&vm)?;
        let _ = self.vm.set(vm);
        Ok(())
    }

    fn vm(&self) -> Result<&VmFd, Error> {
        self.vm.get().map(|v| &**v).ok_or(Error::NotAttached)
    }

    /// Whether KVM is logging dirty pages.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging.load(Ordering::SeqCst)
    }

    /// Whether the dirty log is protected manually: KVM's manual protection with an initially
    /// set log (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2). Then switching logging on write-protects
    /// nothing: every page reads as dirty until [`GuestRam::clear_dirty_log`] protects it,
    /// which a migration does chunk by chunk just before it sends the chunk, and reading the
    /// log no longer clears it. Without it, switching logging on write-protects all of RAM
    /// at once (a stall for the guest, which then faults on every first write) and each read
    /// of the log re-protects every page found dirty. Set up by [`GuestRam::attach`].
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Write-protects again, and clears in KVM's log, the pages of slot `slot` whose bits are
    /// set in `bits`, starting at page `first_page` (a multiple of 64); `bits` covers whole
    /// words of pages, or reaches the end of the slot. Only with manual protection.
    pub fn clear_dirty_log(&self, slot: u32, first_page: u64, bits: &[u64]) -> Result<(), Error> {
        let vm = self.vm()?;
        let slot_pages = self
            .mem
            .iter()
            .nth(slot as usize)
            .map(|r| r.len() / PAGE_SIZE)
            .unwrap_or(0);
        let num_pages = (bits.len() as u64 * 64).min(slot_pages.saturating_sub(first_page));
        if num_pages == 0 {
            return Ok(());
        }
        let mut clear = kvm_clear_dirty_log {
            slot,
            num_pages: num_pages as u32,
            first_page,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = bits.as_ptr() as *mut libc::c_void;
        // SAFETY: `clear` is a valid kvm_clear_dirty_log whose bitmap points at `bits`, which
        // holds at least num_pages bits and outlives the call; KVM only reads it.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if rc < 0 {
            return Err(Error::ClearDirtyLog {
                slot,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Registers (or re-registers) every slot with KVM, with dirty logging as currently set.
    fn register(&self, vm: &VmFd) -> Result<(), Error> {
        let flags = if self.dirty_logging() {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in self.mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("a region contains its own first byte");
            let desc = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range [host, host + len) is an mmap owned by `self.mem`, which
            // lives as long as the VM that uses it (the Vm owns both and drops the VmFd first).
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(|source| Error::SetUserMemoryRegion { slot, source })?;
        }
        Ok(())
    }

    /// Switches KVM's dirty page logging on or off for every slot, keeping the memory.
    /// Callers serialize changes (the VM's lifecycle lock).
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), Error> {
        let vm = self.vm()?;
        let before = self.dirty_logging.swap(on, Ordering::SeqCst);
        self.register(vm)
            .inspect_err(|_| self.dirty_logging.store(before, Ordering::SeqCst))
    }

    /// Fetches and clears KVM's dirty bitmap of every slot: one bit per page, bit i of word w
    /// is page 64 * w + i of the slot; the pages found dirty are write-protected again.
    pub fn take_dirty_log(&self) -> Result<PageSet, Error> {
        let bits = self.peek_dirty_log()?;
        if self.manual_protect {
            for (slot, b) in bits.regions().iter().enumerate() {
                self.clear_dirty_log(slot as u32, 0, b)?;
            }
        }
        Ok(bits)
    }

    /// Fetches KVM's dirty bitmap of every slot as [`GuestRam::take_dirty_log`] does; with
    /// manual protection it stays set (clear it with [`GuestRam::clear_dirty_log`]).
    pub fn peek_dirty_log(&self) -> Result<PageSet, Error> {
        let vm = self.vm()?;
        self.mem
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let slot = slot as u32;
                vm.get_dirty_log(slot, region.len() as usize)
                    .map_err(|source| Error::GetDirtyLog { slot, source })
            })
            .collect::<Result<_, _>>()
            .map(PageSet::new)
    }

    /// Guest addresses of the blocks of `block` bytes (a power of two, 4 KiB to 64 MiB) of
    /// RAM (ascending) holding at least one page resident in this process's memory
    /// (mincore: what the guest or ferry touched and the kernel has not swapped out), or
    /// holding data of a mapped snapshot image (resident or not). Cheap
    /// (no per-page entries are built for untouched RAM), and a hint only: a page swapped
    /// out counts as not resident. Where mincore fails, every block counts.
    pub fn resident_blocks(&self, block: u64) -> Vec<u64> {
        // Guest RAM looked at per call: 16 KiB of mincore vector.
        const PIECE: u64 = 64 << 20;
        assert!(
            block.is_power_of_two() && (PAGE_SIZE..=PIECE).contains(&block),
            "resident_blocks of {block} bytes"
        );
        let mut blocks = Vec::new();
        let mut vec = vec![0u8; (PIECE / PAGE_SIZE) as usize];
        for region in self.mem.iter() {
            let (start, len) = (region.start_addr().0, region.len());
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("a region contains its own first byte");
            for off in (0..len).step_by(PIECE as usize) {
                let n = PIECE.min(len - off);
                let v = &mut vec[..n.div_ceil(PAGE_SIZE) as usize];
                // SAFETY: [host + off, host + off + n) lies inside this region's mapping
                // (off + n <= len), which `self.mem` keeps alive for the call; host is page
                // aligned (an mmap); mincore writes one byte per page of it into `v`, which
                // holds exactly that many bytes. It reads no guest memory.
                let rc = unsafe {
                    libc::mincore(host.add(off as usize).cast(), n as usize, v.as_mut_ptr())
                };
                let failed = rc != 0;
                for (i, pages) in v.chunks((block / PAGE_SIZE) as usize).enumerate() {
                    if failed || pages.iter().any(|b| b & 1 != 0) {
                        blocks.push((start + off) / block * block + i as u64 * block);
                    }
                }
            }
        }
        self.add_file_blocks(&mut blocks, block);
        blocks
    }

    /// Pages of every slot that the guest or ferry ever touched (bitmaps as in
    /// [`GuestRam::take_dirty_log`]), from the kernel's page table for this process
    /// (/proc/self/pagemap: present or swapped) without reading the pages, and the pages
    /// of a mapped snapshot image that hold data. A page never touched reads as zero. Where pagemap cannot be read, every page counts as touched.
    pub fn touched_pages(&self) -> PageSet {
        let pagemap = Pagemap::open();
        PageSet::new(
            (0..self.mem.num_regions())
                .map(|r| {
                    let pages = self.mem.iter().nth(r).map_or(0, |g| g.len() / PAGE_SIZE);
                    self.touched_range(&pagemap, r, 0, pages.div_ceil(64) as usize)
                })
                .collect(),
        )
    }

    /// As [`GuestRam::touched_pages`], for `words` 64-page words of region `region` from page
    /// `first_page` (a multiple of 64); pages past the region's end read as untouched.
    pub fn touched_range(
        &self,
        pagemap: &Pagemap,
        region: usize,
        first_page: u64,
        words: usize,
    ) -> Vec<u64> {
        let mut bits = vec![0u64; words];
        let Some(r) = self.mem.iter().nth(region) else {
            return bits;
        };
        let region_pages = r.len() / PAGE_SIZE;
        let pages = (words as u64 * 64).min(region_pages.saturating_sub(first_page)) as usize;
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("a region contains its own first byte") as u64;
        pagemap.mark_touched(host + first_page * PAGE_SIZE, pages, &mut bits);
        self.add_file_pages(&mut bits, r.start_addr().0, first_page);
        bits
    }

    /// Switches dirty tracking on (KVM's log of every slot, and ferry's own bitmap, both
    /// starting empty) or off. Callers serialize changes (the VM's lifecycle lock).
    pub fn set_dirty_tracking(&self, on: bool) -> Result<(), Error> {
        self.set_dirty_logging(on)?;
        if on {
            // Classic: clear what logging found so far. Manual: every page reads as dirty
            // until a migration clears it, chunk by chunk.
            if !self.manual_protect {
                self.take_dirty_log()?;
            }
            self.take_vmm_dirty();
        }
        Ok(())
    }

    /// Pages written since the last call (or since tracking started), by the guest (KVM's
    /// log) or by ferry: one bitmap per region, bit i of word w = page 64 * w + i. With
    /// manual protection KVM's part stays set until [`GuestRam::clear_dirty_log`] clears it:
    /// at the start every page is dirty.
    pub fn take_dirty(&self) -> Result<PageSet, Error> {
        let mut bits = self.peek_dirty_log()?;
        bits.add(&self.take_vmm_dirty());
        Ok(bits)
    }

    /// Fetches and clears the bitmap of pages the VMM wrote through `memory()`.
    pub fn take_vmm_dirty(&self) -> PageSet {
        PageSet::new(
            self.mem
                .iter()
                .map(|region| {
                    let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
                    mapping.bitmap().get_and_reset()
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests;
