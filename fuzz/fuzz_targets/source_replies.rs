//! The source's side of the protocol as a destination's replies drive it: the key's
//! challenge and response (migration::auth, the source's half), Accept or Refuse after the
//! Hello, then whatever the destination sends during the migration and postcopy (Synced,
//! Restored, Running, Failed, page requests), each page request checked against a guest
//! RAM layout of two regions as the source checks it before reading guest memory
//! (migration::protocol::check_request). The first byte picks how far the conversation
//! has gone (authenticated or not). Nothing a destination sends may panic the source,
//! make it read outside guest RAM, or allocate beyond the protocol's caps.
#![no_main]

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use migration::auth::{self, Key};
use migration::protocol::{self, Message};

/// Guest RAM as the source lays it out: below the PCI hole and above 4 GiB.
const REGIONS: [(u64, u64); 2] = [(0, 0xc000_0000), (0x1_0000_0000, 0x4000_0000)];

/// The destination's bytes to read, and a sink for what the source writes.
struct Peer<'a>(&'a [u8]);

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut peer = Peer(rest);
    if first & 1 == 1 {
        let key = Key::new(&[0x5a; 32]).expect("a 32-byte key");
        if auth::source_handshake(&mut peer, &key, [7; 32]).is_err() {
            return;
        }
    }
    match protocol::expect(&mut peer, "Accept") {
        Ok(Message::Accept) => {}
        _ => return,
    }
    for _ in 0..10_000 {
        match protocol::recv(&mut peer) {
            Ok(Message::PageRequest(ranges)) => {
                if protocol::check_request(&ranges, &REGIONS).is_ok() {
                    for &(gpa, n) in &ranges {
                        let end = gpa + u64::from(n) * 4096;
                        assert!(REGIONS.iter().any(|&(s, l)| gpa >= s && end <= s + l));
                    }
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
});
