//! A bounded mutation test over a corpus of valid inputs: the golden VM stream, a page frame
//! and every protocol message, each mutated thousands of times (byte flips, overwrites with
//! boundary values, insertions, deletions, duplicated and swapped chunks, truncation) by a
//! seeded generator, so every run checks the same inputs. Every decoder must return (Ok or
//! an error), never panic; a stream that still decodes must pass `validate` and encode again.

use std::io::Read;

use migration::pages::{self, BatchWriter};
use migration::protocol::{self, Hello, Message, Precopy};
use migration::stream;

const GOLDEN: &[u8] = include_bytes!("golden/v1-small.bin");
const MUTATIONS: usize = 3000;

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four mutations of `input`.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..=rng.below(4) {
        let len = b.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len >= 8 => {
                // A boundary value over 1, 2, 4 or 8 bytes (lengths, counts, addresses).
                let w = 1 << rng.below(4);
                let i = rng.below(len - w + 1);
                let v: u64 = [0, 1, 0x7f, 0xff, 0x7fff_ffff, u64::MAX, 1 << 40][rng.below(7)];
                b[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below(64.min(len - i));
                b.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below(256.min(len - i));
                let chunk = b[i..i + n].to_vec();
                let j = rng.below(len + 1);
                b.splice(j..j, chunk);
            }
            5 if len > 32 => {
                let (i, j) = (rng.below(len - 16), rng.below(len - 16));
                for k in 0..16 {
                    b.swap(i + k, j + k);
                }
            }
            _ => b.truncate(rng.below(len + 1)),
        }
    }
    b
}

#[test]
fn mutated_vm_streams_never_panic_and_what_decodes_is_valid() {
    let mut rng = Rng(0x5eed_0001);
    let mut accepted = 0;
    for _ in 0..MUTATIONS {
        let m = mutate(&mut rng, GOLDEN);
        if let Ok(vm) = stream::decode_vm(&m) {
            accepted += 1;
            stream::validate(&vm).expect("a decoded stream is valid");
            let mut again = Vec::new();
            stream::write_vm(&mut again, &vm).expect("and encodes again");
        }
    }
    // CRCs make almost every mutation an error; the count only shows the test ran.
    assert!(accepted < MUTATIONS, "{accepted} of {MUTATIONS} accepted");
}

fn page_frame() -> Vec<u8> {
    let mut w = BatchWriter::new();
    w.set_round(2);
    for (i, gpa) in [0x1000u64, 0x2000, 0x9000].into_iter().enumerate() {
        w.page_slot().fill(i as u8 + 1);
        w.commit_page(gpa, false);
    }
    w.push_zero(0x20000);
    w.finish().to_vec()
}

#[test]
fn mutated_page_frames_never_panic() {
    let frame = page_frame();
    let mut rng = Rng(0x5eed_0002);
    for _ in 0..MUTATIONS {
        let m = mutate(&mut rng, &frame);
        // In memory, and from a stream the way the destination reads it.
        if m.len() >= 8 {
            let _ = pages::decode(&m[8..]);
        }
        let mut r = m.as_slice();
        if let Ok(Precopy::Pages(mut head)) = protocol::recv_precopy(&mut r) {
            assert!(head.data_len <= pages::MAX_PAYLOAD);
            let mut data = vec![0u8; head.data_len];
            if r.read_exact(&mut data).is_ok() {
                head.crc_update(&data);
                let _ = head.check_crc(&mut r);
            }
        }
    }
}

#[test]
fn mutated_protocol_messages_never_panic() {
    let mut corpus = Vec::new();
    for m in [
        Message::Hello(Hello::new(256 << 20, 2, "{\"name\":\"x\"}".into(), None)),
        Message::Hello(Hello::new(
            1 << 30,
            2,
            "{\"name\":\"x\"}".into(),
            Some(migration::GuestCpu {
                host_vendor: "AuthenticAMD".into(),
                host_signature: 0xa10f11,
                tsc_khz: 2_596_096,
                cpuid: vec![migration::Leaf::default(); 3],
            }),
        )),
        Message::Accept,
        Message::Refuse("missing features: ssse3".into()),
        Message::Cancel("timed out".into()),
        Message::AuthResponse([1; 32], [2; 32]),
        Message::Sync,
        Message::Commit,
    ] {
        let mut b = Vec::new();
        protocol::send(&mut b, &m).unwrap();
        corpus.push(b);
    }
    let mut rng = Rng(0x5eed_0003);
    for _ in 0..MUTATIONS {
        let input = &corpus[rng.below(corpus.len())];
        let m = mutate(&mut rng, input);
        let _ = protocol::recv(&mut m.as_slice());
        let _ = protocol::recv_precopy(&mut m.as_slice());
    }
}
