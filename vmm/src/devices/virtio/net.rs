//! virtio-net backed by a tap: queue 0 receives (frames from the tap into the guest's
//! buffers), queue 1 transmits. Every frame carries the 12-byte virtio-net header, which the
//! tap reads and writes as it is (TUNSETVNETHDRSZ 12), so offloads cost ferry nothing. It
//! offers the guest to send unfinished checksums and 64 KiB TCP segments (CSUM and
//! HOST_TSO4/6/ECN: the host kernel finishes them) and to receive them (GUEST_CSUM and
//! GUEST_TSO4/6/ECN, turned on in the tap with TUNSETOFFLOAD only as far as the driver
//! accepts them), with mergeable receive buffers (MRG_RXBUF: a frame fills as many of the
//! driver's small buffers as it needs, num_buffers says how many; without it a frame must
//! fit one buffer chain, and a larger one is dropped, as a NIC drops a frame too long for
//! its ring).

use std::os::unix::io::{AsRawFd, RawFd};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR};
use super::{descriptors, pop, Backend, Error};
use crate::memory::GuestMemoryMmap;

/// The largest frame with its header: 64 KiB of payload and an Ethernet header.
const MAX_FRAME: usize = VNET_HDR + 65536 + 14;
const RX: usize = 0;
const TX: usize = 1;

/// What `--net tap=NAME[,mac=MAC]` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    /// None: [`default_mac`] of the device's place among the network cards (a restored or
    /// received guest keeps the MAC it had).
    pub mac: Option<[u8; 6]>,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// A locally administered unicast MAC for device `n` when none is given.
pub fn default_mac(n: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x46, 0x52, n as u8]
}

/// The tap offloads (`TUN_F_*`) that the driver's receive features allow.
fn tap_offload(features: u64) -> u32 {
    let has = |bit: u32| features & (1 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut f = TUN_F_CSUM;
    for (bit, flag) in [
        (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
        (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    ] {
        if has(bit) {
            f |= flag;
        }
    }
    f
}

/// What a guest that has just moved sends, as QEMU's self-announce does: a broadcast RARP
/// frame from its MAC (after the tap's virtio-net header), so that switches and bridges
/// learn at once which port leads to it now.
fn announcement(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR];
    f.extend([0xff; 6]);
    f.extend(mac);
    f.extend([0x80, 0x35]); // RARP
    f.extend([0, 1, 0x08, 0x00, 6, 4, 0, 3]); // Ethernet, IPv4, 6, 4, reverse request
    f.extend(mac);
    f.extend([0; 4]);
    f.extend(mac);
    f.extend([0; 4]);
    f.resize(VNET_HDR + 60, 0); // the shortest Ethernet frame
    f
}

/// A virtio network device.
#[derive(Debug)]
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    frame: Vec<u8>,
    /// Bytes of a frame read from the tap that no receive buffer has taken yet.
    pending: usize,
    /// The driver took MRG_RXBUF: a frame may span several buffers.
    mergeable: bool,
    pub dropped: u64,
}

type Chain<'m> = virtio_queue::DescriptorChain<&'m GuestMemoryMmap>;

/// The receive buffers a pending frame found.
enum Taken<'m> {
    /// The chains it fills (none: it was dropped).
    Enough(Vec<(Chain<'m>, usize)>),
    /// Too few, all put back; `seen`: the driver's available index they ended at.
    TooFew { seen: u16 },
}

/// Asks the driver of the receive queue to notify when it makes buffers available past
/// index `seen`, and tells whether it has meanwhile. (`enable_notification` alone asks past
/// the queue's next_avail, which stays behind `seen` when buffers were put back: it would
/// answer "more" at once, for ever, and with EVENT_IDX the driver would not notify.)
fn more_since(q: &mut Queue, mem: &GuestMemoryMmap, seen: u16) -> Result<bool, Error> {
    let back = q.next_avail();
    q.set_next_avail(seen);
    let more = q.enable_notification(mem);
    q.set_next_avail(back);
    more.map_err(|e| Error::Queue(RX, e))
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            frame: vec![0; MAX_FRAME],
            pending: 0,
            mergeable: false,
            dropped: 0,
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Moves frames from the tap into receive buffers until either runs out.
    fn receive(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, Error> {
        let mut used = false;
        // A queue the driver did not make ready has no rings to read or write.
        let Some(q) = queues.get_mut(RX).filter(|q| q.ready()) else {
            return Ok(false);
        };
        loop {
            if self.pending == 0 {
                match self.tap.read_frame(&mut self.frame) {
                    Ok(n) if n > VNET_HDR => self.pending = n,
                    Ok(_) => continue,
                    Err(_) => return Ok(used),
                }
            }
            let chains = match self.take_buffers(q, mem)? {
                Taken::Enough(chains) => chains,
                // Too few buffers: the frame waits for the guest's next receive
                // notification (unless buffers came in meanwhile).
                Taken::TooFew { seen } => {
                    if more_since(q, mem, seen)? {
                        continue;
                    }
                    return Ok(used);
                }
            };
            self.deliver(q, mem, chains)?;
            self.pending = 0;
            used = true;
        }
    }

    /// Pops the buffer chains the pending frame needs: one without mergeable buffers (an
    /// empty list where it is too small: the frame is dropped), as many as it fills with
    /// them. TooFew, with nothing popped, where the queue has too few.
    fn take_buffers<'m>(
        &mut self,
        q: &mut Queue,
        mem: &'m GuestMemoryMmap,
    ) -> Result<Taken<'m>, Error> {
        let mut chains = Vec::new();
        let mut room = 0;
        while room < self.pending {
            let Some(chain) = pop(q, RX, mem)? else {
                let seen = q.next_avail();
                chains.iter().for_each(|_| q.go_to_previous_position());
                return Ok(Taken::TooFew { seen });
            };
            descriptors(chain.clone())?;
            let size = chain
                .clone()
                .writer(mem)
                .map_err(Error::Buffer)?
                .available_bytes();
            if !self.mergeable && size < self.pending {
                self.dropped += 1;
                q.add_used(mem, chain.head_index(), 0)
                    .map_err(|e| Error::Queue(RX, e))?;
                return Ok(Taken::Enough(Vec::new()));
            }
            if self.mergeable && (size == 0 || (chains.is_empty() && size < VNET_HDR)) {
                return Err(Error::SmallBuffer(size));
            }
            room += size;
            chains.push((chain, size));
        }
        Ok(Taken::Enough(chains))
    }

    /// Writes the pending frame across `chains` (num_buffers: how many) and uses them.
    fn deliver(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        chains: Vec<(Chain<'_>, usize)>,
    ) -> Result<(), Error> {
        use std::io::Write;
        let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        self.frame[10..12].copy_from_slice(&count.to_le_bytes());
        let mut at = 0;
        for (chain, size) in chains {
            let n = size.min(self.pending - at);
            let head = chain.head_index();
            let mut w = chain.writer(mem).map_err(Error::Buffer)?;
            w.write_all(&self.frame[at..at + n])
                .map_err(Error::BufferIo)?;
            q.add_used(mem, head, n as u32)
                .map_err(|e| Error::Queue(RX, e))?;
            at += n;
        }
        Ok(())
    }

    /// Sends every frame the guest queued for transmission.
    fn transmit(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, Error> {
        let mut used = false;
        let Some(q) = queues.get_mut(TX).filter(|q| q.ready()) else {
            return Ok(false);
        };
        let mut frame = vec![0u8; MAX_FRAME];
        loop {
            let Some(chain) = pop(q, TX, mem)? else {
                // With EVENT_IDX the driver notifies only past the index this publishes.
                if q.enable_notification(mem)
                    .map_err(|e| Error::Queue(TX, e))?
                {
                    continue;
                }
                return Ok(used);
            };
            let head = chain.head_index();
            descriptors(chain.clone())?;
            let mut r = chain.reader(mem).map_err(Error::Buffer)?;
            let n = r.available_bytes();
            if n <= VNET_HDR || n > MAX_FRAME {
                self.dropped += 1;
            } else {
                use std::io::Read;
                r.read_exact(&mut frame[..n]).map_err(Error::BufferIo)?;
                // A full tap queue drops the frame: the guest's TCP retransmits.
                if self.tap.write_frame(&frame[..n]).is_err() {
                    self.dropped += 1;
                }
            }
            q.add_used(mem, head, 0).map_err(|e| Error::Queue(TX, e))?;
            used = true;
        }
    }
}

impl Backend for Net {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_MRG_RXBUF,
        ]
        .iter()
        .fold(0, |f, b| f | 1 << b)
    }

    fn activate(&mut self, features: u64) {
        self.mergeable = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let offload = tap_offload(features);
        if let Err(e) = self.tap.set_offload(offload) {
            log::warn!("{}: TUNSETOFFLOAD {offload:#x}: {e}", self.describe());
        }
    }

    fn queue_sizes(&self) -> &'static [u16] {
        &[256, 256]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| self.mac.get(o + i))
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
        match index {
            RX => self.receive(queues, mem),
            TX => self.transmit(queues, mem),
            _ => Ok(false),
        }
    }

    fn io_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }

    fn process_io(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, Error> {
        self.receive(queues, mem)
    }

    fn reset(&mut self) {
        self.pending = 0;
        self.mergeable = false;
        // Until the next driver says what it takes, the tap sends only finished frames.
        let _ = self.tap.set_offload(0);
    }

    fn backend(&self) -> migration::DeviceBackend {
        migration::DeviceBackend::Net {
            mac: self.mac,
            tap: self.tap.name().into(),
        }
    }

    fn announce(&mut self) {
        if let Err(e) = self.tap.write_frame(&announcement(self.mac)) {
            log::warn!("{}: announcing the guest's MAC: {e}", self.describe());
        }
    }

    fn describe(&self) -> String {
        format!(
            "virtio-net on tap {} ({})",
            self.tap.name(),
            format_mac(self.mac)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_broadcast_rarp_from_the_guests_mac() {
        let mac = [0x52, 0x54, 0, 0x46, 0x52, 1];
        let f = announcement(mac);
        assert_eq!(
            f.len(),
            VNET_HDR + 60,
            "header, then a minimum Ethernet frame"
        );
        assert!(f[..VNET_HDR].iter().all(|b| *b == 0), "no offload asked");
        let eth = &f[VNET_HDR..];
        assert_eq!(eth[..6], [0xff; 6], "to everyone");
        assert_eq!(eth[6..12], mac, "from the guest");
        assert_eq!(eth[12..14], [0x80, 0x35], "RARP");
        assert_eq!(eth[20..22], [0, 3], "reverse request");
        assert_eq!(eth[22..28], mac, "sender hardware address");
        assert_eq!(eth[32..38], mac, "target hardware address");
    }

    // Found by the virtio_net fuzz target: with mergeable buffers, a frame larger than the
    // buffers available had them put back, and enable_notification (which compares with
    // the queue's next_avail, behind them) answered "more" for ever.
    #[test]
    fn a_frame_waits_for_enough_mergeable_buffers_without_spinning() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mut queues = [super::super::new_queue(16), super::super::new_queue(16)];
        for (i, q) in queues.iter_mut().enumerate() {
            let base = 0x1000 + 0x3000 * i as u32;
            q.set_desc_table_address(Some(base), Some(0));
            q.set_avail_ring_address(Some(base + 0x1000), Some(0));
            q.set_used_ring_address(Some(base + 0x2000), Some(0));
            q.set_ready(true);
        }
        let (ours, peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let tap = Tap::from_file(std::fs::File::from(std::os::fd::OwnedFd::from(ours)), "t");
        let mut net = Net::new(tap, default_mac(0));
        net.activate(1 << VIRTIO_NET_F_MRG_RXBUF);
        // Receive buffer i: descriptor i, 1 KiB at 0x8000 + 1 KiB * i, device-writable, in
        // available ring slot i.
        let buffer = |i: u16| {
            let desc = 0x1000 + 16 * u64::from(i);
            mem.write_obj(0x8000 + 0x400 * u64::from(i), GuestAddress(desc))
                .unwrap();
            mem.write_obj(0x400u32, GuestAddress(desc + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap();
            mem.write_obj(i, GuestAddress(0x2004 + 2 * u64::from(i)))
                .unwrap();
            mem.write_obj(i + 1, GuestAddress(0x2002)).unwrap();
        };
        buffer(0);
        peer.send(&[0u8; 3000]).unwrap();
        assert!(
            !net.process_io(&mut queues, &mem).unwrap(),
            "the frame waits"
        );
        buffer(1);
        buffer(2);
        assert!(
            net.process_queue(RX, &mut queues, &mem).unwrap(),
            "three buffers take it"
        );
        let used: u16 = mem.read_obj(GuestAddress(0x3002)).unwrap();
        assert_eq!(used, 3);
    }

    #[test]
    fn macs_print_and_parse_alike() {
        let m = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
        assert_eq!(format_mac(m), "52:54:00:ab:cd:ef");
        assert_eq!(parse_mac(&format_mac(m)), Some(m));
        assert_eq!(parse_mac("52:54:00:ab:cd"), None);
    }
}
