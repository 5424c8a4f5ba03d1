//! The control messages' round trips and hostile frames.

use super::*;

#[test]
fn messages_round_trip() {
    for m in [
        Message::Hello(Hello::new(256 << 20, 2, "{\"x\":1}".into(), None)),
        Message::Hello(Hello::new(
            256 << 20,
            2,
            "{\"x\":1}".into(),
            Some(crate::state::GuestCpu {
                host_vendor: "GenuineIntel".into(),
                host_signature: 0xc06f2,
                tsc_khz: 2_100_000,
                cpuid: vec![crate::state::Leaf {
                    function: 1,
                    eax: 0x1_0676,
                    ..Default::default()
                }],
            }),
        )),
        Message::Hello(Hello::new(64 << 20, 1, "p".into(), None).with_devices(vec![
            crate::state::DeviceBackend::Disk {
                path: "/srv/a.img".into(),
                size: 1 << 30,
                read_only: true,
            },
            crate::state::DeviceBackend::Net {
                mac: [0x52, 0x54, 0, 1, 2, 3],
                tap: "tap0".into(),
            },
        ])),
        Message::Accept,
        Message::Refuse("missing features: ssse3".into()),
        Message::Restored,
        Message::Failed("KVM_SET_MSRS".into()),
        Message::Commit,
        Message::Running,
        Message::Cancel("timed out".into()),
        Message::State,
        Message::Sync,
        Message::Synced,
        Message::Touched(vec![0b1011, u64::MAX]),
        Message::Touched(Vec::new()),
        Message::AuthChallenge([1; 32]),
        Message::AuthResponse([2; 32], [3; 32]),
        Message::AuthProof([4; 32]),
        Message::Missing {
            first_page: 64,
            words: vec![1, u64::MAX],
        },
        Message::Missing {
            first_page: 0,
            words: vec![0; MAX_MISSING_WORDS],
        },
        Message::PageRequest(vec![(0x5000, 1), (0x10_0000, 255)]),
        Message::PostcopyDone,
    ] {
        let mut buf = Vec::new();
        let n = send(&mut buf, &m).unwrap();
        assert_eq!(n, buf.len() as u64, "{} bytes written", m.name());
        assert_eq!(recv(&mut buf.as_slice()).unwrap(), m);
    }
}

#[test]
fn a_peers_reason_and_tag_reach_error_lines_escaped() {
    let mut buf = Vec::new();
    send(
        &mut buf,
        &Message::Refuse("no\nferry: error: forged\u{1b}[31m".into()),
    )
    .unwrap();
    match recv(&mut buf.as_slice()).unwrap() {
        Message::Refuse(r) => {
            assert_eq!(r, "no\\nferry: error: forged\\u{1b}[31m");
            assert!(!r.contains('\n') && !r.contains('\u{1b}'));
        }
        other => panic!("{other:?}"),
    }
    let mut odd = b"A\nB\x07".to_vec();
    odd.extend_from_slice(&0u32.to_le_bytes());
    let e = recv(&mut odd.as_slice()).unwrap_err().to_string();
    assert!(
        e.contains("A\\") && !e.contains('\n') && !e.contains('\u{7}'),
        "{e}"
    );
}

#[test]
fn hostile_frames_are_errors() {
    let mut huge = b"HELO".to_vec();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        recv(&mut huge.as_slice()),
        Err(Error::TooLarge { .. })
    ));
    let mut bad = b"XXXX".to_vec();
    bad.extend_from_slice(&0u32.to_le_bytes());
    assert!(recv(&mut bad.as_slice()).is_err());
    let mut buf = Vec::new();
    let h = Hello::new(
        1,
        1,
        "p".into(),
        Some(crate::state::GuestCpu {
            host_vendor: "GenuineIntel".into(),
            host_signature: 0xc06f2,
            tsc_khz: 2_100_000,
            cpuid: vec![crate::state::Leaf {
                function: 1,
                eax: 0x1_0676,
                ..Default::default()
            }],
        }),
    );
    let h = h.with_devices(vec![crate::state::DeviceBackend::Net {
        mac: [2; 6],
        tap: "t".into(),
    }]);
    send(&mut buf, &Message::Hello(h)).unwrap();
    for cut in 0..buf.len() {
        assert!(recv(&mut &buf[..cut]).is_err(), "truncated at {cut}");
    }
    // A device of an unknown kind (the kind's first byte, right after the count).
    let kind = buf.len() - (4 + 6 + 4 + 1);
    assert_eq!(buf[kind], 1, "the network card's kind");
    let mut forged = buf.clone();
    forged[kind] = 9;
    let err = recv(&mut forged.as_slice()).unwrap_err().to_string();
    assert!(err.contains("device kind"), "{err}");
    // A Touched map longer than any Hello's RAM, or claiming more words than it holds.
    let mut long = b"TUCH".to_vec();
    long.extend_from_slice(&4u32.to_le_bytes());
    long.extend_from_slice(&(MAX_TOUCHED_WORDS as u32 + 1).to_le_bytes());
    assert!(matches!(
        recv(&mut long.as_slice()),
        Err(Error::TooLarge { .. })
    ));
    let mut short = b"TUCH".to_vec();
    short.extend_from_slice(&12u32.to_le_bytes());
    short.extend_from_slice(&2u32.to_le_bytes());
    short.extend_from_slice(&7u64.to_le_bytes());
    assert!(recv(&mut short.as_slice()).is_err());
    assert!(send(
        &mut Vec::new(),
        &Message::Touched(vec![0; MAX_TOUCHED_WORDS + 1])
    )
    .is_err());
    let mut trailing = Vec::new();
    send(&mut trailing, &Message::Accept).unwrap();
    trailing[4] = 1;
    trailing.push(0);
    assert!(
        recv(&mut trailing.as_slice()).is_err(),
        "payload where none belongs"
    );
}

#[test]
fn precopy_reads_pages_cancel_and_state() {
    let mut w = crate::pages::BatchWriter::new();
    w.set_round(3);
    w.page_slot()[0] = 7;
    w.commit_page(0x5000, false);
    let mut stream = w.finish().to_vec();
    send(&mut stream, &Message::Cancel("user".into())).unwrap();
    send(&mut stream, &Message::State).unwrap();
    send(&mut stream, &Message::Commit).unwrap();
    let mut r = stream.as_slice();
    match recv_precopy(&mut r).unwrap() {
        Precopy::Pages(mut h) => {
            assert_eq!((h.round, h.runs[0].gpa, h.data_len), (3, 0x5000, 4096));
            let mut page = vec![0u8; h.data_len];
            r.read_exact(&mut page).unwrap();
            assert_eq!(page[0], 7);
            h.crc_update(&page);
            h.check_crc(&mut r).unwrap();
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(recv_precopy(&mut r).unwrap(), Precopy::Cancel(c) if c == "user"));
    assert!(matches!(recv_precopy(&mut r).unwrap(), Precopy::State));
    let e = recv_precopy(&mut r).unwrap_err().to_string();
    assert!(e.contains("Commit"), "{e}");
    // A page frame claiming more than the cap is refused before reading it.
    let mut huge = b"PAGS".to_vec();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(recv_precopy(&mut huge.as_slice()).is_err());
}

#[test]
fn expect_names_what_came_instead() {
    let mut buf = Vec::new();
    send(&mut buf, &Message::Commit).unwrap();
    let e = expect(&mut buf.as_slice(), "Restored")
        .unwrap_err()
        .to_string();
    assert!(e.contains("Restored") && e.contains("Commit"), "{e}");
}

#[test]
fn postcopy_messages_past_their_caps_are_refused_both_ways() {
    let too_many = Message::PageRequest(vec![(0, 1); MAX_REQUEST_RANGES + 1]);
    let too_long = Message::PageRequest(vec![(0, MAX_REQUEST_PAGES), (0x1000, 1)]);
    let empty_range = Message::PageRequest(vec![(0, 0)]);
    let unaligned = Message::Missing {
        first_page: 3,
        words: vec![1],
    };
    let huge = Message::Missing {
        first_page: 0,
        words: vec![0; MAX_MISSING_WORDS + 1],
    };
    for m in [&too_many, &too_long, &empty_range, &unaligned, &huge] {
        assert!(send(&mut Vec::new(), m).is_err(), "{m:?}");
    }
    // Forged on the wire: the same refused when read.
    let mut forged = b"PREQ".to_vec();
    forged.extend_from_slice(&28u32.to_le_bytes());
    forged.extend_from_slice(&2u32.to_le_bytes());
    for (gpa, pages) in [(0u64, MAX_REQUEST_PAGES), (0x1000, 1)] {
        forged.extend_from_slice(&gpa.to_le_bytes());
        forged.extend_from_slice(&pages.to_le_bytes());
    }
    assert!(matches!(
        recv(&mut forged.as_slice()),
        Err(Error::TooLarge { .. })
    ));
    let mut odd = b"MISS".to_vec();
    odd.extend_from_slice(&20u32.to_le_bytes());
    odd.extend_from_slice(&5u64.to_le_bytes());
    odd.extend_from_slice(&1u32.to_le_bytes());
    odd.extend_from_slice(&1u64.to_le_bytes());
    assert!(recv(&mut odd.as_slice()).is_err());
    // Missing arrives among precopy traffic.
    let mut buf = Vec::new();
    send(
        &mut buf,
        &Message::Missing {
            first_page: 128,
            words: vec![7],
        },
    )
    .unwrap();
    assert!(matches!(
        recv_precopy(&mut buf.as_slice()).unwrap(),
        Precopy::Missing { first_page: 128, ref words } if words == &[7]
    ));
}

#[test]
fn a_page_request_is_checked_against_guest_ram_without_overflow() {
    let ram = [(0u64, 0x10_0000u64), (0x1_0000_0000, 0x1000)];
    assert!(check_request(&[(0x1000, 1), (0x1_0000_0000, 1)], &ram).is_ok());
    for bad in [
        (0x10_0000 - 0x1000, 2),
        (!0xfffu64, 2),
        (0x1_0000_0000, 2),
        (0x1001, 1),
        (0x20_0000, 1),
    ] {
        let e = check_request(&[bad], &ram).unwrap_err();
        assert!(
            matches!(e, Error::NotRam { gpa, pages } if (gpa, pages) == bad),
            "{bad:?}: {e}"
        );
        assert!(e.to_string().contains("not guest RAM"), "{bad:?}: {e}");
    }
}
