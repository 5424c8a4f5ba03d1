//! The destination's side of the protocol, as it reads a connection: the handshake
//! messages, then precopy frames (page heads, their data and CRC, Sync, Cancel, State), then
//! the VM stream, until the input ends or something is refused.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use migration::protocol::{self, Message, Precopy};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    // Handshake: authentication messages and a Hello, in any order the input has.
    for _ in 0..4 {
        match protocol::recv(&mut r) {
            Ok(Message::Hello(_)) => break,
            Ok(_) => continue,
            Err(_) => return,
        }
    }
    loop {
        match protocol::recv_precopy(&mut r) {
            Ok(Precopy::Pages(mut head)) => {
                assert!(head.data_len <= migration::pages::MAX_PAYLOAD);
                let mut page = vec![0u8; head.data_len];
                if r.read_exact(&mut page).is_err() {
                    return;
                }
                head.crc_update(&page);
                if head.check_crc(&mut r).is_err() {
                    return;
                }
            }
            Ok(Precopy::Sync) => continue,
            Ok(Precopy::Touched(words)) => {
                assert!(words.len() <= protocol::MAX_TOUCHED_WORDS)
            }
            Ok(Precopy::Cancel(_)) => return,
            Ok(Precopy::State) => break,
            Err(_) => return,
        }
    }
    let _ = migration::stream::read_vm_until_end(&mut r);
});
