//! The virtio-net device (vmm::devices::virtio::net) as a guest drives it through the
//! virtio-mmio transport (guest.rs: features such as MRG_RXBUF, receive and transmit
//! chains, notifications), over a tap that is one end of a datagram socket pair
//! (`Tap::from_file`, feature `fuzzing` of ferry-vmm): a real tap needs root and
//! /dev/net/tun, and a non-blocking datagram socket reads and writes one frame per call as
//! a tap does, so the device's own code runs unchanged. The input's own step is a frame
//! arriving on the tap (up to 64 KiB and more, its bytes from the input, the rest a
//! pattern), which the device places into the guest's receive buffers; the guest's
//! transmit chains become frames read from the other end. Checks, beyond guest.rs's (dirty
//! pages, used entries within their chains' writable bytes, a saved state restores): no
//! panic, every frame sent holds more than the virtio-net header and at most the largest
//! frame; libFuzzer's limits catch an unbounded allocation, -timeout a device that spins.
#![no_main]

mod guest;
mod input;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::tap::{Tap, VNET_HDR};

use guest::Guest;
use input::Input;

/// The largest frame the device sends: 64 KiB of payload, an Ethernet header, the header.
const MAX_FRAME: usize = VNET_HDR + 65536 + 14;

/// A frame from the tap: length (u16, plus 64 KiB where the flag's bit 0 is set), then
/// its bytes from the input as far as it has them, a pattern after; the device is told.
fn frame_from_tap(guest: &mut Guest, input: &mut Input, peer: &UnixDatagram) {
    let len = usize::from(input.u16()) + usize::from(input.u8() & 1) * 0x1_0000;
    let mut frame = input.bytes(len).to_vec();
    frame.extend((frame.len()..len).map(|i| i as u8));
    let _ = peer.send(&frame);
    guest.device(|dev| dev.io_ready());
}

fuzz_target!(|data: &[u8]| {
    let (ours, peer) = UnixDatagram::pair().expect("a socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    peer.set_nonblocking(true).expect("non-blocking");
    let tap = Tap::from_file(File::from(OwnedFd::from(ours)), "fuzz0");
    let net = Net::new(tap, [0x52, 0x54, 0, 0x46, 0x52, 0]);
    let mut input = Input(data);
    let mut guest = Guest::new(Box::new(net), &mut input);
    guest.run(&mut input, |g, input| frame_from_tap(g, input, &peer));
    drop(guest);
    let mut buf = vec![0u8; MAX_FRAME + 1];
    while let Ok(n) = peer.recv(&mut buf) {
        assert!(
            n > VNET_HDR && n <= MAX_FRAME,
            "the device sent a {n}-byte frame"
        );
    }
});
