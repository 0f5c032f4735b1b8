//! The ICRC against captures of other implementations and against a bit-by-bit reference
//! written from rxe_icrc.c's algorithm (tests/common).

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};

use common::{Rng, Variant, crc32_le_bitwise, reference_icrc, reference_icrc_for};
use vrdma_roce::icrc::{self, Ip, IpUdp};

/// Parses the hex dump format `0x0000:  e41d 2dab ...` into bytes.
fn hexdump(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (_, data) = line.split_once(':').unwrap();
        for word in data.split_whitespace() {
            for i in (0..word.len()).step_by(2) {
                out.push(u8::from_str_radix(&word[i..i + 2], 16).unwrap());
            }
        }
    }
    out
}

#[test]
fn rxe_seed_is_the_crc_of_the_masked_lrh() {
    // rxe hard-codes this; check it is what the comment there says it is.
    assert_eq!(crc32_le_bitwise(!0, &[0xff; 8]), common::RXE_SEED);
}

/// A RoCEv2 CNP captured from a Mellanox ConnectX-4 Lx, as published in Scapy's RoCE tests
/// (test/contrib/roce.uts). Hardware computed this ICRC; it pins the algorithm and the byte
/// order independently of rxe and of this crate. The TOS (0xc2) and TTL (0x40) are non-zero,
/// so their masking is exercised too.
#[test]
fn connectx4_cnp_capture() {
    let frame = hexdump(
        "0x0000:  e41d 2dab 2bc2 7cfe 9064 3b32 0800 45c2
         0x0010:  003c 718c 4000 4011 9161 0a00 1101 0a00
         0x0020:  1201 0000 12b7 0028 0000 8100 ffff 4000
         0x0030:  0118 0000 0000 0000 0000 0000 0000 0000
         0x0040:  0000 0000 0000 82fd 002a",
    );
    assert_eq!(frame.len(), 74);
    let datagram = &frame[14 + 20 + 8..];
    assert_eq!(datagram.len(), 12 + 16 + 4);
    let headers = IpUdp {
        ip: Ip::V4 {
            src: Ipv4Addr::new(10, 0, 17, 1),
            dst: Ipv4Addr::new(10, 0, 18, 1),
            id: 0x718c,
            flags_frag: icrc::IPV4_DF,
        },
        src_port: 0,
        dst_port: 4791,
    };
    assert!(icrc::verify(&headers, datagram));
    let (covered, stored) = datagram.split_at(datagram.len() - 4);
    assert_eq!(icrc::compute(&headers, covered).to_le_bytes(), stored);
    assert_eq!(stored, [0x82, 0xfd, 0x00, 0x2a]);
    // The reference, from the real header bytes of the capture (TOS, TTL, checksum included).
    assert_eq!(reference_icrc(&frame[14..42], false, covered), stored);

    // The Identification is covered: with the value a UDP socket would have to guess, it fails.
    let mut guessed = headers;
    if let Ip::V4 { id, .. } = &mut guessed.ip {
        *id = 0;
    }
    assert!(!icrc::verify(&guessed, datagram));
}

/// A UC SEND ONLY with M set, pad count 2 and 18 bytes of payload over IPv4, whose ICRC
/// Scapy's RoCE layer computes as 0x78f353f3 (read big-endian from the wire bytes), i.e. the
/// wire bytes 78 f3 53 f3. Scapy's implementation is a third, independent one (zlib crc32
/// over a masked copy of the packet, then byte-reversed).
#[test]
fn scapy_uc_send_only() {
    let headers = IpUdp {
        ip: Ip::V4 {
            src: Ipv4Addr::new(192, 168, 0, 7),
            dst: Ipv4Addr::new(192, 168, 0, 7),
            id: 1144,
            flags_frag: icrc::IPV4_DF,
        },
        src_port: 49152,
        dst_port: 4791,
    };
    let mut covered = vec![
        0x24, // UC SEND ONLY
        0x60, // M, PadCnt 2, TVer 0
        0xff, 0xff, // P_Key
        0x00, 0x00, 0x00, 0xd3, // DestQP 211
        0x00, 0xcf, 0x17, 0x10, // PSN 13571856
    ];
    covered.extend(b"F0\x81\x8b\xe2\x895\xd9\x0e\x9a\x95PT\x01\xbe\x88^P\x00\x00");
    assert_eq!(8 + covered.len() + 4, 44, "UDP length of the Scapy packet");
    assert_eq!(
        icrc::compute(&headers, &covered),
        u32::from_le_bytes([0x78, 0xf3, 0x53, 0xf3])
    );
    assert_eq!(
        reference_icrc_for(
            &headers,
            Variant {
                tos_or_tclass: 1,
                ..Variant::ZERO
            },
            &covered
        ),
        [0x78, 0xf3, 0x53, 0xf3]
    );
}

/// The crate and the bit-by-bit rxe-style reference agree on many random datagrams, IPv4 and
/// IPv6, whatever the variant fields hold.
#[test]
fn agrees_with_rxe_style_reference() {
    let mut rng = Rng::new(0x1c4c);
    for _ in 0..2000 {
        let headers = common::random_ip_udp(&mut rng);
        let len = rng.below(600);
        let covered = rng.bytes(len);
        let variant = Variant::random(&mut rng);
        let expected = reference_icrc_for(&headers, variant, &covered);
        assert_eq!(
            icrc::compute(&headers, &covered).to_le_bytes(),
            expected,
            "{headers:?} {variant:?} len {len}"
        );
        let mut datagram = covered.clone();
        datagram.extend([0; 4]);
        icrc::seal(&headers, &mut datagram);
        assert_eq!(datagram[len..], expected);
        assert!(icrc::verify(&headers, &datagram));
    }
}

/// Changing any covered field changes the ICRC; changing a variant one does not.
#[test]
fn covers_the_invariant_fields_only() {
    let mut rng = Rng::new(7);
    let covered = rng.bytes(64);
    let base4 = common::v4();
    let base6 = common::v6();
    let crc4 = icrc::compute(&base4, &covered);
    let crc6 = icrc::compute(&base6, &covered);

    // Variant IP/UDP fields: the reference puts arbitrary values there, the crate never sees
    // them, and both agree.
    for _ in 0..50 {
        let variant = Variant::random(&mut rng);
        assert_eq!(
            reference_icrc_for(&base4, variant, &covered),
            crc4.to_le_bytes()
        );
        assert_eq!(
            reference_icrc_for(&base6, variant, &covered),
            crc6.to_le_bytes()
        );
    }
    // BTH byte 4 (FECN, BECN, resv6a) is variant; every other BTH byte is covered.
    for byte in 0..12 {
        let mut changed = covered.clone();
        changed[byte] ^= 0x81;
        assert_eq!(
            icrc::compute(&base4, &changed) == crc4,
            byte == 4,
            "BTH byte {byte}"
        );
    }

    let v4_variants: [fn(&mut IpUdp); 7] = [
        |h| h.src_port ^= 1,
        |h| h.dst_port ^= 1,
        |h| set_v4(h, |src, _, _, _| *src = Ipv4Addr::new(1, 2, 3, 4)),
        |h| set_v4(h, |_, dst, _, _| *dst = Ipv4Addr::new(1, 2, 3, 4)),
        |h| set_v4(h, |_, _, id, _| *id ^= 0x8000),
        |h| set_v4(h, |_, _, _, ff| *ff = 0),
        |h| {
            h.ip = Ip::V6 {
                src: Ipv6Addr::UNSPECIFIED,
                dst: Ipv6Addr::UNSPECIFIED,
            }
        },
    ];
    for (i, change) in v4_variants.iter().enumerate() {
        let mut h = base4;
        change(&mut h);
        assert_ne!(icrc::compute(&h, &covered), crc4, "IPv4 change {i}");
    }
    let mut h = base6;
    if let Ip::V6 { dst, .. } = &mut h.ip {
        *dst = Ipv6Addr::LOCALHOST;
    }
    assert_ne!(icrc::compute(&h, &covered), crc6);
}

fn set_v4(h: &mut IpUdp, f: impl FnOnce(&mut Ipv4Addr, &mut Ipv4Addr, &mut u16, &mut u16)) {
    if let Ip::V4 {
        src,
        dst,
        id,
        flags_frag,
    } = &mut h.ip
    {
        f(src, dst, id, flags_frag);
    }
}

#[test]
fn short_inputs_do_not_panic() {
    let headers = common::v4();
    for len in 0..20 {
        let bytes = vec![0xa5; len];
        // Shorter than a BTH: still the reference's answer (it masks what exists).
        assert_eq!(
            icrc::compute(&headers, &bytes).to_le_bytes(),
            reference_icrc_for(&headers, Variant::ZERO, &bytes)
        );
        let _ = icrc::verify(&headers, &bytes);
        let mut bytes = bytes;
        icrc::seal(&headers, &mut bytes);
        if len >= 4 {
            assert!(icrc::verify(&headers, &bytes));
        }
    }
    assert!(!icrc::verify(&headers, &[]));
}
