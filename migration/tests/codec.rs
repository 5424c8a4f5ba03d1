//! The codec's public API: little-endian round trips, bounds checks that name the field and
//! the offset, lengths checked against the cap and the input before anything is allocated.

use migration::codec::{Decoder, Encoder, Error};

#[test]
fn round_trip_integers_and_bytes() {
    let mut e = Encoder::new();
    e.u8(0xab);
    e.u16(0x1234);
    e.u32(0xdead_beef);
    e.u64(0x0102_0304_0506_0708);
    e.bytes(b"xy");
    e.bytes_u32("b32", b"hello", 5).unwrap();
    e.bytes_u64("b64", b"", 0).unwrap();
    e.str_u32("s", "ferry", 16).unwrap();
    let bytes = e.into_inner();
    assert_eq!(&bytes[1..3], &[0x34, 0x12], "little-endian");
    let mut d = Decoder::new(&bytes);
    assert_eq!(d.u8("a").unwrap(), 0xab);
    assert_eq!(d.u16("a").unwrap(), 0x1234);
    assert_eq!(d.u32("a").unwrap(), 0xdead_beef);
    assert_eq!(d.u64("a").unwrap(), 0x0102_0304_0506_0708);
    assert_eq!(&d.array::<2>("a").unwrap(), b"xy");
    assert_eq!(d.bytes_u32("b32", 5).unwrap(), b"hello");
    assert_eq!(d.bytes_u64("b64", 0).unwrap(), b"");
    assert_eq!(d.str_u32("s", 16).unwrap(), "ferry");
    d.finish("end").unwrap();
}

#[test]
fn reads_past_the_end_name_field_and_offset() {
    let mut d = Decoder::with_base(&[1, 2, 3], 100);
    assert_eq!(d.u16("first").unwrap(), 0x0201);
    let err = d.u32("second").unwrap_err();
    assert_eq!(
        err,
        Error::Truncated {
            what: "second",
            offset: 102,
            need: 4,
            left: 1
        }
    );
    assert!(err.to_string().contains("second") && err.to_string().contains("102"));
    // A failed read consumes nothing.
    assert_eq!(d.u8("third").unwrap(), 3);
    assert!(d.finish("x").is_ok());
}

#[test]
fn lengths_are_checked_against_cap_then_input() {
    let mut e = Encoder::new();
    e.u32(u32::MAX);
    let bytes = e.into_inner();
    let err = Decoder::new(&bytes).bytes_u32("blob", 64).unwrap_err();
    assert!(matches!(
        err,
        Error::TooLarge {
            len: 0xffff_ffff,
            cap: 64,
            ..
        }
    ));
    let err = Decoder::new(&bytes)
        .bytes_u32("blob", u32::MAX)
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Truncated {
            need: 0xffff_ffff,
            left: 0,
            ..
        }
    ));

    let mut e = Encoder::new();
    e.u64(1 << 60);
    let bytes = e.into_inner();
    let err = Decoder::new(&bytes)
        .bytes_u64("blob", u64::MAX)
        .unwrap_err();
    assert!(matches!(err, Error::Truncated { .. }));

    let mut e = Encoder::new();
    e.u32(1000);
    e.bytes(&[0; 16]);
    let bytes = e.into_inner();
    let err = Decoder::new(&bytes)
        .count_u32("list", 1024, 12)
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Truncated {
            need: 12000,
            left: 16,
            ..
        }
    ));
    assert_eq!(
        Decoder::new(&bytes).count_u32("list", 1024, 0).unwrap(),
        1000
    );
}

#[test]
fn encoder_refuses_what_decoder_would() {
    let mut e = Encoder::new();
    assert!(matches!(
        e.bytes_u32("blob", &[0; 9], 8),
        Err(Error::TooLarge { len: 9, cap: 8, .. })
    ));
    assert!(e.is_empty(), "nothing written on refusal");
    assert!(e.count_u32("n", 3, 2).is_err());
}

#[test]
fn utf8_and_trailing_are_errors() {
    let mut e = Encoder::new();
    e.bytes_u32("s", &[0xff, 0xfe], 8).unwrap();
    e.u8(0);
    let bytes = e.into_inner();
    let mut d = Decoder::new(&bytes);
    assert!(matches!(
        d.str_u32("s", 8),
        Err(Error::NotUtf8 { offset: 0, .. })
    ));
    assert!(matches!(
        d.finish("rec"),
        Err(Error::Trailing { left: 1, .. })
    ));
}
