//! The destination's side of the protocol as a connection's bytes drive it: the receiver
//! state machine (migration::receiver) decides every step, as in ferry; this target plays
//! the destination's I/O without KVM (page bytes read and CRC-checked, the VM stream
//! decoded, every check of this host taken as passing). Authentication comes before the
//! receiver (inside TLS), so the first byte (once a keyed flag) is skipped.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use migration::protocol::{self, Message, Precopy};
use migration::receiver::{Action, Input, Receiver};

fuzz_target!(|data: &[u8]| {
    let mut r = data.get(1..).unwrap_or_default();
    let mut rx = Receiver::new();
    let mut outcome: Option<Input> = None;
    let mut head = None;
    for _ in 0..100_000 {
        let input = match outcome.take() {
            Some(i) => i,
            None if rx.in_precopy() => match protocol::recv_precopy(&mut r) {
                Ok(Precopy::Pages(h)) => {
                    let round = h.round;
                    head = Some(h);
                    Input::Pages { round }
                }
                Ok(Precopy::Touched(w)) => Input::Message(Message::Touched(w)),
                Ok(Precopy::Missing { first_page, words }) => {
                    Input::Message(Message::Missing { first_page, words })
                }
                Ok(Precopy::Cancel(c)) => Input::Message(Message::Cancel(c)),
                Ok(Precopy::Sync) => Input::Message(Message::Sync),
                Ok(Precopy::State) => Input::Message(Message::State),
                Err(_) => return,
            },
            None => match protocol::recv(&mut r) {
                Ok(m) => Input::Message(m),
                Err(_) => return,
            },
        };
        let Ok(action) = rx.step(input) else { return };
        match action {
            Action::Next | Action::Reply(_) | Action::Accept => {}
            Action::CheckHello(_) | Action::Sync | Action::Start => outcome = Some(Input::Done(Ok(()))),
            Action::WritePages => {
                let Some(mut h) = head.take() else { panic!("pages without a head") };
                assert!(h.data_len <= migration::pages::MAX_PAYLOAD);
                let mut page = vec![0u8; h.data_len];
                if r.read_exact(&mut page).is_err() {
                    return;
                }
                h.crc_update(&page);
                if h.check_crc(&mut r).is_err() {
                    return;
                }
            }
            Action::Readahead(words) => assert!(words.len() <= protocol::MAX_TOUCHED_WORDS),
            Action::Missing { first_page, words } => {
                assert!(words.len() <= protocol::MAX_MISSING_WORDS && first_page % 64 == 0)
            }
            Action::LoadState => {
                let loaded = migration::stream::read_vm_until_end(&mut r);
                outcome = Some(Input::Done(loaded.map(|_| ()).map_err(|e| e.to_string())));
            }
            Action::Running => return,
        }
    }
});
