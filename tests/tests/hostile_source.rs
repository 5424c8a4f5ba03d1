//! A hostile or broken source, played by the test over a socket pair against a real
//! destination (`migrate::receive_over`, a real KVM VM): every case ends in an error naming
//! the problem, never a panic, a write outside guest RAM or an allocation beyond the caps.
//! The destination's thread runs under ferry's seccomp filter for a receiver, as in
//! `ferry receive`: its error paths make no call outside it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ferry_tests::tiny::Console;
use migration::pages::BatchWriter;
use migration::protocol::{self, Hello, Message};
use vmm::migrate;
use vmm::sandbox::Kind;

const MEMORY: u64 = 64 << 20;

/// Plays `script` as the source (after Hello and the destination's Accept when `hello`),
/// and returns the destination's error.
fn against_destination(hello: bool, script: impl FnOnce(&mut UnixStream)) -> String {
    ferry_tests::require_kvm();
    let (mut a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let dest = std::thread::spawn(move || {
        ferry_tests::sandbox_on(Some(Kind::Receiver));
        migrate::receive_over(b, None, Box::new(Console::default()))
    });
    if hello {
        let h = Hello::new(MEMORY, 1, ferry_tests::host_profile_json(), None);
        protocol::send(&mut a, &Message::Hello(h)).unwrap();
        assert_eq!(protocol::recv(&mut a).unwrap(), Message::Accept);
    }
    script(&mut a);
    drop(a);
    match dest.join().expect("the destination must not panic") {
        Ok(_) => panic!("the destination took a hostile stream"),
        Err(e) => e.to_string(),
    }
}

fn one_page_frame(gpa: u64) -> Vec<u8> {
    let mut w = BatchWriter::new();
    w.page_slot().fill(0x5a);
    w.commit_page(gpa, false);
    w.finish().to_vec()
}

#[test]
fn pages_outside_guest_ram_are_refused() {
    for gpa in [MEMORY, MEMORY + (1 << 30), 0xfee0_0000, !0xfff] {
        let e = against_destination(true, |a| {
            let _ = a.write_all(&one_page_frame(gpa));
        });
        assert!(
            e.contains("outside guest RAM") || e.contains("wraps"),
            "{gpa:#x}: {e}"
        );
    }
}

#[test]
fn a_frame_over_its_cap_is_refused_before_it_is_read() {
    let e = against_destination(true, |a| {
        let mut f = b"PAGS".to_vec();
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        let _ = a.write_all(&f);
    });
    assert!(e.contains("over the cap"), "{e}");
}

#[test]
fn a_damaged_frame_is_refused() {
    let e = against_destination(true, |a| {
        let mut f = one_page_frame(0x10000);
        let n = f.len();
        f[n - 100] ^= 0xff;
        let _ = a.write_all(&f);
    });
    assert!(e.contains("CRC32"), "{e}");
}

#[test]
fn an_unknown_or_misplaced_frame_is_refused() {
    let e = against_destination(true, |a| {
        let mut f = b"XXXX".to_vec();
        f.extend_from_slice(&0u32.to_le_bytes());
        let _ = a.write_all(&f);
    });
    assert!(e.contains("XXXX") || e.contains("unexpected"), "{e}");
    let e = against_destination(true, |a| {
        let _ = protocol::send(a, &Message::Commit);
    });
    assert!(e.contains("Commit"), "{e}");
    // Pages before any Hello.
    let e = against_destination(false, |a| {
        let _ = a.write_all(&one_page_frame(0x10000));
    });
    assert!(e.contains("handshake") && e.contains("PAGS"), "{e}");
}

#[test]
fn a_touched_map_not_of_this_ram_or_out_of_place_is_refused() {
    // 64 MiB of RAM: 32 blocks, one word.
    for words in [vec![], vec![u64::MAX; 2]] {
        let e = against_destination(true, |a| {
            let _ = protocol::send(a, &Message::Touched(words.clone()));
        });
        assert!(
            e.contains("map of touched RAM has") && e.contains("needs 1"),
            "{} words: {e}",
            words.len()
        );
    }
    // After round 0 it would back RAM the guest's pages are already in.
    let e = against_destination(true, |a| {
        let _ = a.write_all(&one_page_frame(0x10000));
        let _ = protocol::send(a, &Message::Sync);
        let _ = protocol::recv(a);
        let _ = protocol::send(a, &Message::Touched(vec![1]));
    });
    assert!(e.contains("Touched") && e.contains("round"), "{e}");
}

#[test]
fn a_stream_cut_anywhere_in_a_frame_is_an_error() {
    let frame = one_page_frame(0x10000);
    for cut in [1, 8, 12, 20, 100, frame.len() - 1] {
        let e = against_destination(true, |a| {
            let _ = a.write_all(&frame[..cut]);
        });
        assert!(e.contains("receiving memory"), "cut at {cut}: {e}");
    }
}

#[test]
fn a_hello_the_destination_cannot_build_is_refused() {
    ferry_tests::require_kvm();
    for (memory, vcpus) in [
        (0u64, 1u32),
        (MEMORY + 1, 1),
        (MEMORY, 0),
        (MEMORY, 100_000),
    ] {
        let (mut a, b) = UnixStream::pair().unwrap();
        let dest = std::thread::spawn(move || {
            ferry_tests::sandbox_on(Some(Kind::Receiver));
            migrate::receive_over(b, None, Box::new(Console::default()))
        });
        let h = Hello::new(memory, vcpus, ferry_tests::host_profile_json(), None);
        protocol::send(&mut a, &Message::Hello(h)).unwrap();
        match protocol::recv(&mut a).unwrap() {
            // Too many vCPUs for this host's limit, or for its KVM.
            Message::Refuse(r) => assert!(
                r.contains("cannot create the VM")
                    || r.contains("more than this destination takes"),
                "{r}"
            ),
            other => panic!("{memory} bytes, {vcpus} vCPUs: {other:?}"),
        }
        assert!(dest.join().unwrap().is_err());
    }
}
