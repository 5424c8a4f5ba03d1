//! The guest's side of the virtio fuzz targets (virtio_blk, virtio_net; not a target of its
//! own): 80 KiB of guest RAM in two regions with a hole between, and a driver that sets a
//! device up through its virtio-mmio registers as a guest's virtio driver does (features,
//! queue sizes and ring addresses from the input), then performs the input's steps:
//! descriptors (direct, indirect, chained), available ring entries and indexes, buffer
//! bytes, used_event, queue notifications, any register read or write (resets included),
//! pause and resume, a save and restore of the device's state (a migration), the target's
//! own step (a frame from the tap). After every step that lets the device run it checks
//! what the guest and a migration rely on: every page the device changed is marked in the
//! guest memory's dirty bitmap, every used ring entry names a descriptor of the queue and
//! claims no more bytes than its chain's writable buffers hold, and a saved device state
//! restores.

use std::os::raw::c_uint;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};
use vmm::devices::virtio::mmio::Transport;
use vmm::devices::virtio::Backend;
use vmm::devices::BusDevice;
use vmm::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;

use crate::input::Input;

/// Guest RAM: 64 KiB at 0 and 16 KiB at 128 KiB (a buffer across the hole is outside RAM).
pub const RAM: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x4000)];
/// Steps of one input at most (each at least one byte).
const MAX_STEPS: usize = 512;
const PAGE: usize = 4096;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// One queue as the driver set it up (or as the device has it), and how far the driver got
/// with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The driver's available index (what it last wrote to avail.idx).
    avail_idx: u16,
    /// The next descriptor a Chain step takes.
    next_desc: u16,
}

/// A used ring entry: id, length, and the chain's writable buffers (None: no chain).
type Entry = (u32, u32, Option<Vec<(u64, u64)>>);

/// Guest RAM as it was before a step: (guest address, bytes) per region.
struct Before(Vec<(u64, Vec<u8>)>);

impl Before {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.0.iter().any(|(start, bytes)| {
            let Some(off) = addr.checked_sub(*start) else {
                return false;
            };
            let Some(src) = usize::try_from(off)
                .ok()
                .and_then(|o| bytes.get(o..o.checked_add(buf.len())?))
            else {
                return false;
            };
            buf.copy_from_slice(src);
            true
        })
    }
}

/// A device on guest RAM and the driver that uses it.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub dev: Transport,
    rings: Vec<Ring>,
}

impl Guest {
    /// Guest RAM (zero) and a device of `backend` on it, set up as the input says.
    pub fn new(backend: Box<dyn Backend>, input: &mut Input) -> Guest {
        let ranges = RAM.map(|(a, l)| (GuestAddress(a), l));
        let mem = GuestMemoryMmap::from_ranges(&ranges).expect("80 KiB of guest RAM");
        let queues = backend.queue_sizes().len();
        let irq = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
        let dev = Transport::new(backend, mem.clone(), irq);
        let mut g = Guest {
            mem,
            dev,
            rings: vec![Ring::default(); queues],
        };
        g.setup(input);
        g
    }

    fn write_reg(&mut self, offset: c_uint, v: u32) {
        self.dev.write(u64::from(offset), &v.to_le_bytes());
    }

    fn read_reg(&mut self, offset: c_uint) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    /// A driver's initialization: reset, features (those offered that the input asks for,
    /// with VERSION_1; with flag 1 exactly what it asks for), every queue's size and ring
    /// addresses (ready unless flag 2 << queue), DRIVER_OK; then the VM runs.
    fn setup(&mut self, input: &mut Input) {
        let flags = input.u8();
        let wanted = input.u64();
        self.write_reg(VIRTIO_MMIO_STATUS, 0);
        let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        self.write_reg(VIRTIO_MMIO_STATUS, status);
        status |= VIRTIO_CONFIG_S_DRIVER;
        self.write_reg(VIRTIO_MMIO_STATUS, status);
        let mut offered = 0u64;
        for sel in 0..2 {
            self.write_reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read_reg(VIRTIO_MMIO_DEVICE_FEATURES)) << (32 * sel);
        }
        let features = if flags & 1 != 0 {
            wanted
        } else {
            wanted & offered | 1 << VIRTIO_F_VERSION_1
        };
        for sel in 0..2 {
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        status |= VIRTIO_CONFIG_S_FEATURES_OK;
        self.write_reg(VIRTIO_MMIO_STATUS, status);
        for i in 0..self.rings.len() {
            let r = Ring {
                size: input.u16(),
                desc: input.u32().into(),
                avail: input.u32().into(),
                used: input.u32().into(),
                ..Ring::default()
            };
            self.rings[i] = r;
            self.write_reg(VIRTIO_MMIO_QUEUE_SEL, i as u32);
            self.write_reg(VIRTIO_MMIO_QUEUE_NUM, r.size.into());
            for (low, addr) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, r.desc),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, r.avail),
                (VIRTIO_MMIO_QUEUE_USED_LOW, r.used),
            ] {
                self.write_reg(low, addr as u32);
                self.write_reg(low + 4, (addr >> 32) as u32);
            }
            let ready = flags & (2 << i) == 0;
            self.write_reg(VIRTIO_MMIO_QUEUE_READY, ready.into());
        }
        self.write_reg(VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
        self.device(|dev| dev.resume());
    }

    /// The ring of queue byte `q` (taken modulo the number of queues).
    fn ring(&mut self, q: u8) -> &mut Ring {
        let n = self.rings.len();
        &mut self.rings[usize::from(q) % n]
    }

    /// Writes guest RAM as the guest does (ignored outside RAM).
    pub fn poke(&self, addr: u64, bytes: &[u8]) {
        let _ = self.mem.write_slice(bytes, GuestAddress(addr));
    }

    /// Descriptor `idx` of the table at `table`.
    fn write_desc(&self, table: u64, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.poke(table.wrapping_add(16 * u64::from(idx)), &d);
    }

    /// Puts `head` in the next available ring entry of queue `q` and publishes it.
    fn push(&mut self, q: u8, head: u16) {
        let r = *self.ring(q);
        let slot = r.avail_idx % r.size.max(1);
        self.poke(r.avail + 4 + 2 * u64::from(slot), &head.to_le_bytes());
        self.set_avail_idx(q, r.avail_idx.wrapping_add(1));
    }

    fn set_avail_idx(&mut self, q: u8, idx: u16) {
        let r = self.ring(q);
        r.avail_idx = idx;
        let at = r.avail + 2;
        self.poke(at, &idx.to_le_bytes());
    }

    /// A chain of 1 to 4 buffers (address, length, flags: bit 0 device-writable, bit 1
    /// through a one-entry indirect table at the buffer's own address + 4096) in the next
    /// free descriptors of queue `q`, made available.
    fn chain(&mut self, q: u8, input: &mut Input) {
        let n = 1 + input.u8() % 4;
        let r = *self.ring(q);
        let size = r.size.max(1);
        let head = r.next_desc % size;
        for i in 0..n {
            let idx = r.next_desc.wrapping_add(i.into()) % size;
            let next = idx.wrapping_add(1) % size;
            let (addr, len, how) = (input.u32().into(), input.u32(), input.u8());
            let mut flags = if i + 1 < n { F_NEXT } else { 0 };
            let write = if how & 1 != 0 { F_WRITE } else { 0 };
            if how & 2 != 0 {
                let table = addr + 4096;
                self.write_desc(table, 0, addr, len, write, 0);
                flags |= F_INDIRECT;
                self.write_desc(r.desc, idx, table, 16, flags, next);
            } else {
                self.write_desc(r.desc, idx, addr, len, flags | write, next);
            }
        }
        self.ring(q).next_desc = r.next_desc.wrapping_add(n.into());
        self.push(q, head);
    }

    /// Performs the input's steps (`extra`: the target's own step, which may run the
    /// device), then notifies every queue once more.
    pub fn run(&mut self, input: &mut Input, mut extra: impl FnMut(&mut Guest, &mut Input)) {
        for _ in 0..MAX_STEPS {
            if input.is_empty() {
                break;
            }
            match input.u8() % 13 {
                0 => {
                    let (addr, n) = (input.u32(), input.u8());
                    let bytes = input.bytes(n.into());
                    self.poke(addr.into(), bytes);
                }
                1 => {
                    let (q, idx) = (input.u8(), input.u8());
                    let table = self.ring(q).desc;
                    let (addr, len) = (input.u64(), input.u32());
                    let (flags, next) = (input.u16(), input.u16());
                    self.write_desc(table, idx.into(), addr, len, flags, next);
                }
                2 => {
                    let q = input.u8();
                    self.chain(q, input);
                }
                3 => {
                    let (q, head) = (input.u8(), input.u16());
                    self.push(q, head);
                }
                4 => {
                    let (q, idx) = (input.u8(), input.u16());
                    self.set_avail_idx(q, idx);
                }
                5 => {
                    let (q, event) = (input.u8(), input.u16());
                    let r = *self.ring(q);
                    self.poke(r.avail + 4 + 2 * u64::from(r.size), &event.to_le_bytes());
                }
                6 => {
                    let q = input.u8();
                    self.device(|dev| {
                        dev.write(VIRTIO_MMIO_QUEUE_NOTIFY.into(), &u32::from(q).to_le_bytes())
                    });
                }
                7 => {
                    let (reg, v) = (input.u8(), input.u32());
                    self.device(|dev| dev.write(u64::from(reg) * 4, &v.to_le_bytes()));
                }
                8 => {
                    let (offset, len) = (input.u16(), 1 + input.u8() % 8);
                    let mut buf = [0u8; 8];
                    self.dev.read(offset.into(), &mut buf[..len.into()]);
                }
                9 => self.device(|dev| {
                    dev.pause();
                    dev.resume();
                }),
                10 => self.device(|dev| {
                    let s = dev.save_state();
                    if let Err(e) = dev.restore_state(&s) {
                        panic!("a device's saved state does not restore: {e}");
                    }
                }),
                11 => extra(self, input),
                _ => self.setup(input),
            }
        }
        for q in 0..self.rings.len() {
            self.device(|dev| dev.notify(q));
        }
    }

    /// Guest RAM now, with every dirty bit cleared.
    fn before(&self) -> Before {
        Before(
            self.mem
                .iter()
                .map(|region| {
                    let start = region.start_addr().0;
                    let mut bytes = vec![0u8; region.len() as usize];
                    self.mem
                        .read_slice(&mut bytes, GuestAddress(start))
                        .expect("a region reads");
                    let mapping: &MmapRegion<AtomicBitmap> = region;
                    mapping.bitmap().reset();
                    (start, bytes)
                })
                .collect(),
        )
    }

    /// Lets the device run (`f`), then checks what it did to guest RAM.
    pub fn device<R>(&mut self, f: impl FnOnce(&mut Transport) -> R) -> R {
        let before = self.before();
        let (rings, first) = self.device_rings();
        let r = f(&mut self.dev);
        self.check_dirty(&before);
        // Rings moved by the step (registers written after a reset) are not checked.
        let (now, end) = self.device_rings();
        if now == rings {
            let used: Vec<_> = first.into_iter().zip(end).collect();
            self.check_used(&rings, &used, &before);
        }
        r
    }

    /// The queues as the device has them (the driver's register writes, resets included,
    /// may have moved them from what the setup wrote): None where not ready; and the
    /// device's used index of each.
    fn device_rings(&self) -> (Vec<Option<Ring>>, Vec<u16>) {
        let queues = self.dev.save_state().queues;
        let used = queues.iter().map(|q| q.next_used).collect();
        let ring = |q: &migration::QueueState| Ring {
            size: q.size,
            desc: q.desc_table,
            avail: q.avail_ring,
            used: q.used_ring,
            ..Ring::default()
        };
        (
            queues.iter().map(|q| q.ready.then(|| ring(q))).collect(),
            used,
        )
    }

    /// Every page that changed is marked dirty: a migration's next round sends it.
    fn check_dirty(&self, before: &Before) {
        for ((start, old), region) in before.0.iter().zip(self.mem.iter()) {
            let mut now = vec![0u8; old.len()];
            self.mem
                .read_slice(&mut now, GuestAddress(*start))
                .expect("a region reads");
            let mapping: &MmapRegion<AtomicBitmap> = region;
            for (i, (a, b)) in old.chunks(PAGE).zip(now.chunks(PAGE)).enumerate() {
                assert!(
                    a == b || mapping.bitmap().is_addr_set(i * PAGE),
                    "the device wrote guest page {:#x} without marking it dirty",
                    start + (i * PAGE) as u64
                );
            }
        }
    }

    /// The used ring entries the device added in a step, `first` to `end` (its own used
    /// index before and after: what the driver wrote at used.idx does not count): (id, len,
    /// the chain's writable buffers before the step) per entry; None where the ring's size
    /// is not a power of two or the index moved by more than a queue.
    fn added(&self, r: &Ring, (first, end): (u16, u16), before: &Before) -> Option<Vec<Entry>> {
        let new = end.wrapping_sub(first);
        if !r.size.is_power_of_two() || new > r.size {
            return None;
        }
        (0..new)
            .map(|k| {
                let slot = first.wrapping_add(k) % r.size;
                let mut e = [0u8; 8];
                self.read(r.used + 4 + 8 * u64::from(slot), &mut e)
                    .then_some(())?;
                let id = u32::from_le_bytes(e[..4].try_into().expect("4 bytes"));
                let len = u32::from_le_bytes(e[4..].try_into().expect("4 bytes"));
                Some((id, len, writable(&|a, b| before.read(a, b), r, id as u16)))
            })
            .collect()
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.mem.read_slice(buf, GuestAddress(addr)).is_ok()
    }

    /// The used ring entries the device added in a step name a descriptor of their queue and
    /// claim no more bytes than their chains' writable buffers hold, as the chains read
    /// before the step. Not checked for a used ring that the guest laid over another ring or
    /// over a writable buffer (the device's writes may land on the entries), nor for a
    /// chain that reads differently after the step (the device wrote over its descriptors).
    fn check_used(&self, rings: &[Option<Ring>], used: &[(u16, u16)], before: &Before) {
        if used.iter().all(|(first, end)| first == end) {
            return;
        }
        // What the device may write in a step, each used ring marked with its queue.
        let mut areas: Vec<(Option<usize>, (u64, u64))> = Vec::new();
        for (q, r) in rings.iter().enumerate() {
            let Some(r) = r else { continue };
            let ring_len = 6 + 8 * u64::from(r.size);
            areas.extend([
                (None, (r.desc, 16 * u64::from(r.size))),
                (None, (r.avail, ring_len)),
                (Some(q), (r.used, ring_len)),
            ]);
        }
        let added: Vec<_> = rings
            .iter()
            .zip(used)
            .map(|(r, u)| r.as_ref().and_then(|r| self.added(r, *u, before)))
            .collect();
        // Every writable buffer of every chain, before and after the step (a superset of
        // what the device wrote: its used entries may be garbage where it wrote over them).
        let now = |a: u64, b: &mut [u8]| self.read(a, b);
        let was = |a: u64, b: &mut [u8]| before.read(a, b);
        for r in rings.iter().flatten() {
            for head in 0..r.size {
                for read in [&now as &dyn Fn(u64, &mut [u8]) -> bool, &was] {
                    let buffers = writable(read, r, head).unwrap_or_default();
                    areas.extend(buffers.into_iter().map(|b| (None, b)));
                }
            }
        }
        for (q, (r, entries)) in rings.iter().zip(added).enumerate() {
            let Some(r) = r else { continue };
            let used = (r.used, 6 + 8 * u64::from(r.size));
            let alone = areas
                .iter()
                .all(|&(owner, a)| owner == Some(q) || !overlap(a, used));
            for (id, len, old) in entries.into_iter().flatten().filter(|_| alone) {
                assert!(
                    id < r.size.into(),
                    "used entry {id} of a {}-entry queue",
                    r.size
                );
                let Some(old) = old.filter(|o| {
                    Some(o) == writable(&|a, b| self.read(a, b), r, id as u16).as_ref()
                }) else {
                    continue;
                };
                let room: u64 = old.iter().map(|b| b.1).sum();
                assert!(
                    u64::from(len) <= room,
                    "queue {q}: used entry {id} claims {len} bytes of {room} writable"
                );
            }
        }
    }
}

/// Whether two (address, length) ranges share a byte.
fn overlap((a, n): (u64, u64), (b, m): (u64, u64)) -> bool {
    a < b.saturating_add(m) && b < a.saturating_add(n)
}

/// The device-writable buffers (address, length) of chain `head` of ring `r` as `read`
/// shows guest RAM, walked as virtio-queue walks a chain (indirect tables included); None
/// where the walk would not finish.
fn writable(read: &dyn Fn(u64, &mut [u8]) -> bool, r: &Ring, head: u16) -> Option<Vec<(u64, u64)>> {
    let (mut table, mut size, mut next, mut ttl) = (r.desc, r.size, head, r.size);
    let mut indirect = false;
    let mut buffers = Vec::new();
    loop {
        if ttl == 0 || next >= size {
            return None;
        }
        let mut d = [0u8; 16];
        if !read(table.checked_add(16 * u64::from(next))?, &mut d) {
            return None;
        }
        let addr = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes([d[12], d[13]]);
        if flags & F_INDIRECT != 0 {
            if indirect || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                return None;
            }
            let n = (len / 16) as u16;
            (table, size, next, ttl, indirect) = (addr, n, 0, n, true);
            continue;
        }
        if flags & F_WRITE != 0 {
            buffers.push((addr, u64::from(len)));
        }
        if flags & F_NEXT == 0 {
            return Some(buffers);
        }
        next = u16::from_le_bytes([d[14], d[15]]);
        ttl -= 1;
    }
}
