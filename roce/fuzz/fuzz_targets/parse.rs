//! `packet::parse` on arbitrary datagrams under an arbitrary MTU and IP/UDP description, with
//! a round-trip oracle: whatever parses is rebuilt with `Packet::new`, re-encoded with
//! `Packet::encode`, and must reproduce the datagram (pad bytes zeroed; the ICRC recomputed,
//! and equal to the received one when it was verified).
//!
//! Input: bytes 0-1 (LE) the MTU; byte 2 flags (bit 0 IPv6, bit 1 seal the datagram with a
//! correct ICRC before parsing, so that mutations get past the ICRC check); bytes 3-42 the
//! description (source and destination address, 16 bytes each, IPv4 using the first 4;
//! Identification; flags/fragment; source and destination port; all big-endian); the rest is
//! the UDP payload.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use vrdma_roce::icrc::{self, Ip, IpUdp};
use vrdma_roce::packet::{self, IcrcCheck, Packet, ParseError};

const PREFIX: usize = 43;

fuzz_target!(|data: &[u8]| {
    let Some((prefix, datagram)) = data.split_first_chunk::<PREFIX>() else {
        return;
    };
    let mtu = usize::from(u16::from_le_bytes([prefix[0], prefix[1]]));
    let flags = prefix[2];
    let be16 = |at: usize| u16::from_be_bytes([prefix[at], prefix[at + 1]]);
    let addr = |at: usize| -> [u8; 16] { prefix[at..at + 16].try_into().unwrap() };
    let ip = if flags & 1 == 0 {
        let (src, dst) = (addr(3), addr(19));
        Ip::V4 {
            src: Ipv4Addr::new(src[0], src[1], src[2], src[3]),
            dst: Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]),
            id: be16(35),
            flags_frag: be16(37),
        }
    } else {
        Ip::V6 {
            src: Ipv6Addr::from(addr(3)),
            dst: Ipv6Addr::from(addr(19)),
        }
    };
    let headers = IpUdp {
        ip,
        src_port: be16(39),
        dst_port: be16(41),
    };

    let mut datagram = datagram.to_vec();
    if flags & 2 != 0 {
        icrc::seal(&headers, &mut datagram);
    }

    let skipped = packet::parse(&datagram, mtu, IcrcCheck::Skip);
    let verified = packet::parse(&datagram, mtu, IcrcCheck::Verify(&headers));
    // The ICRC check only adds BadIcrc, and only for datagrams of a plausible length whose
    // ICRC is wrong.
    let icrc_ok = icrc::verify(&headers, &datagram);
    match skipped {
        Err(ParseError::Truncated) if datagram.len() < packet::MIN_DATAGRAM => {
            assert_eq!(verified, skipped)
        }
        Err(ParseError::Oversized) => assert_eq!(verified, skipped),
        _ if icrc_ok => assert_eq!(verified, skipped),
        _ => assert_eq!(verified, Err(ParseError::BadIcrc)),
    }
    if flags & 2 != 0 && datagram.len() >= packet::MIN_DATAGRAM {
        assert!(icrc_ok);
    }

    let packet = match skipped {
        Ok(packet) => packet,
        Err(err) => {
            assert!(!err.to_string().is_empty());
            assert_eq!(ParseError::ALL[err.index()], err);
            return;
        }
    };
    let _ = format!("{packet:?}");
    if let Some(aeth) = packet.ext().aeth {
        if let Ok(syndrome) = aeth.syndrome() {
            assert_eq!(syndrome.raw(), Ok(aeth.raw_syndrome()));
        }
    }

    // Invariants of a parsed packet.
    let layout = packet.opcode().layout();
    assert_eq!(packet.bth().opcode(), packet.opcode().raw());
    assert_eq!(packet.bth().tver(), 0);
    assert!(packet.payload().len() <= mtu);
    assert!(layout.payload || packet.payload().is_empty());
    assert_eq!((packet.payload().len() + packet.pad_len()) % 4, 0);
    assert_eq!(packet.encoded_len(), datagram.len());
    for &ext in layout.headers {
        assert!(packet.ext().has(ext));
    }

    // Rebuilding from the parts gives the same packet.
    let rebuilt = Packet::new(*packet.bth(), *packet.ext(), packet.payload()).unwrap();
    assert_eq!(rebuilt, packet);

    // Re-encoding reproduces the datagram, up to pad bytes and (if not verified) the ICRC.
    let len = datagram.len();
    let mut out = vec![0xa5u8; len + 1];
    assert_eq!(
        packet
            .encode(&mut out[..len - 1], &headers)
            .map(|_| ())
            .unwrap_err()
            .needed,
        len
    );
    assert_eq!(packet.encode(&mut out, &headers), Ok(len));
    assert_eq!(out[len], 0xa5, "wrote past the datagram");
    let body = len - icrc::LEN - packet.pad_len();
    assert_eq!(out[..body], datagram[..body]);
    assert!(out[body..len - icrc::LEN].iter().all(|&b| b == 0));
    assert!(icrc::verify(&headers, &out[..len]));
    if icrc_ok && datagram[body..len - icrc::LEN].iter().all(|&b| b == 0) {
        assert_eq!(out[..len], datagram[..]);
    }
    // And parses to the same packet.
    let reparsed = packet::parse(&out[..len], mtu, IcrcCheck::Verify(&headers)).unwrap();
    assert_eq!(reparsed, packet);
});
