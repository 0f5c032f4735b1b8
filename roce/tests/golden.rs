//! Golden packets: each datagram is written out byte by byte from the IBA field layouts
//! (comments give the field), the ICRC is appended by the bit-by-bit reference in
//! tests/common, and the crate must encode exactly those bytes and parse them back.

mod common;

use vrdma_roce::aeth::{Aeth, NakCode, Syndrome};
use vrdma_roce::atomic::{AtomicAckEth, AtomicEth};
use vrdma_roce::bth::Bth;
use vrdma_roce::deth::Deth;
use vrdma_roce::ieth::Ieth;
use vrdma_roce::imm::ImmDt;
use vrdma_roce::opcode::Opcode;
use vrdma_roce::packet::{self, Extensions, IcrcCheck, Packet};
use vrdma_roce::reth::Reth;

/// Encodes `packet` and compares with `covered` + reference ICRC, over IPv4 and IPv6; parses
/// the golden bytes and compares with `packet`.
fn check(packet: Packet<'_>, covered: &[u8]) {
    for headers in [common::v4(), common::v6()] {
        let mut golden = covered.to_vec();
        golden.extend(common::reference_icrc_for(
            &headers,
            common::Variant::ZERO,
            covered,
        ));

        let mut buf = [0xaa_u8; 256];
        let len = packet.encode(&mut buf, &headers).unwrap();
        assert_eq!(len, packet.encoded_len());
        assert_eq!(
            &buf[..len],
            &golden[..],
            "{:?} over {:?}",
            packet.opcode(),
            headers.ip
        );
        assert!(
            buf[len..].iter().all(|&b| b == 0xaa),
            "wrote past the datagram"
        );

        let parsed = packet::parse(&golden, 4096, IcrcCheck::Verify(&headers)).unwrap();
        assert_eq!(parsed, packet);
        assert_eq!(
            parsed.payload().as_ptr(),
            golden[covered.len() - parsed.payload().len() - parsed.pad_len()..].as_ptr()
        );
    }
}

#[test]
fn rdma_write_only() {
    let payload = [1, 2, 3, 4, 5, 6, 7, 8];
    let bth = Bth::new(Opcode::RcWriteOnly, 0x000012, 0x000001)
        .unwrap()
        .with_ack_req(true);
    let reth = Reth::new(0x0000_7f00_1234_5000, 0x00ab_cdef, 8);
    let packet = Packet::new(
        bth,
        Extensions {
            reth: Some(reth),
            ..Extensions::default()
        },
        &payload,
    )
    .unwrap();
    #[rustfmt::skip]
    let covered = [
        // BTH
        0x0a,                   // OpCode: RC RDMA WRITE ONLY
        0x00,                   // SE 0, M 0, PadCnt 0, TVer 0
        0xff, 0xff,             // P_Key: default partition
        0x00,                   // FECN 0, BECN 0, resv6a
        0x00, 0x00, 0x12,       // DestQP 0x000012
        0x80,                   // A 1, resv7
        0x00, 0x00, 0x01,       // PSN 0x000001
        // RETH
        0x00, 0x00, 0x7f, 0x00, 0x12, 0x34, 0x50, 0x00, // VA
        0x00, 0xab, 0xcd, 0xef, // R_Key
        0x00, 0x00, 0x00, 0x08, // DMA Length
        // payload, 8 bytes: no pad
        1, 2, 3, 4, 5, 6, 7, 8,
    ];
    check(packet, &covered);
}

#[test]
fn rdma_read_request() {
    let bth = Bth::new(Opcode::RcReadRequest, 0x000013, 0x000002)
        .unwrap()
        .with_ack_req(true);
    let packet = Packet::new(
        bth,
        Extensions {
            reth: Some(Reth::new(0x1000, 0x1234_5678, 0x0001_0000)),
            ..Extensions::default()
        },
        &[],
    )
    .unwrap();
    #[rustfmt::skip]
    let covered = [
        0x0c, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x13, 0x80, 0x00, 0x00, 0x02, // BTH
        0, 0, 0, 0, 0, 0, 0x10, 0x00,   // VA 0x1000
        0x12, 0x34, 0x56, 0x78,         // R_Key
        0x00, 0x01, 0x00, 0x00,         // DMA Length 64 KiB
    ];
    check(packet, &covered);
}

fn ack(syndrome: Syndrome, msn: u32, psn: u32) -> Packet<'static> {
    let bth = Bth::new(Opcode::RcAcknowledge, 0x000021, psn).unwrap();
    Packet::new(
        bth,
        Extensions {
            aeth: Some(Aeth::new(syndrome, msn).unwrap()),
            ..Extensions::default()
        },
        &[],
    )
    .unwrap()
}

#[test]
fn acknowledge() {
    #[rustfmt::skip]
    let covered = [
        0x11, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x21, 0x00, 0x00, 0x00, 0x02, // BTH, A 0
        0x1f,                   // Syndrome: ACK (00), credit count 31 = none
        0x00, 0x00, 0x05,       // MSN 5
    ];
    check(ack(Syndrome::Ack { credits: 0x1f }, 5, 2), &covered);
}

#[test]
fn rnr_nak() {
    #[rustfmt::skip]
    let covered = [
        0x11, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x21, 0x00, 0x00, 0x00, 0x07, // BTH
        0x2e,                   // Syndrome: RNR NAK (01), timer 14 (1.28 ms)
        0x00, 0x00, 0x06,       // MSN 6
    ];
    let packet = ack(Syndrome::RnrNak { timer: 14 }, 6, 7);
    check(packet, &covered);
    assert_eq!(
        packet.ext().aeth.unwrap().syndrome(),
        Ok(Syndrome::RnrNak { timer: 14 })
    );
}

#[test]
fn nak_psn_sequence_error() {
    #[rustfmt::skip]
    let covered = [
        0x11, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x21, 0x00, 0xff, 0xff, 0xff, // BTH, PSN max
        0x60,                   // Syndrome: NAK (11), PSN sequence error (0)
        0xff, 0xff, 0xff,       // MSN 0xffffff
    ];
    check(
        ack(
            Syndrome::Nak(NakCode::PsnSequenceError),
            0xff_ffff,
            0xff_ffff,
        ),
        &covered,
    );
}

#[test]
fn ud_send_only() {
    let payload = *b"hello";
    let bth = Bth::new(Opcode::UdSendOnly, 0x000102, 0x000abc)
        .unwrap()
        .with_solicited(true);
    let packet = Packet::new(
        bth,
        Extensions {
            deth: Some(Deth::new(0x1111_1111, 0x000101).unwrap()),
            ..Extensions::default()
        },
        &payload,
    )
    .unwrap();
    #[rustfmt::skip]
    let covered = [
        0x64,                   // UD SEND ONLY
        0xb0,                   // SE 1, M 0, PadCnt 3 (5 bytes + 3 = 8), TVer 0
        0xff, 0xff, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x0a, 0xbc,
        0x11, 0x11, 0x11, 0x11, // DETH Q_Key
        0x00, 0x00, 0x01, 0x01, // resv8, SrcQP 0x000101
        b'h', b'e', b'l', b'l', b'o', 0, 0, 0, // payload and pad
    ];
    check(packet, &covered);
    assert_eq!(packet.pad_len(), 3);
}

#[test]
fn ud_send_only_with_imm() {
    let bth = Bth::new(Opcode::UdSendOnlyWithImm, 0x000102, 1).unwrap();
    let packet = Packet::new(
        bth,
        Extensions {
            deth: Some(Deth::new(0x8000_0000, 0x000001).unwrap()),
            imm: Some(ImmDt::new(0xcafe_f00d)),
            ..Extensions::default()
        },
        &[0x42],
    )
    .unwrap();
    #[rustfmt::skip]
    let covered = [
        0x65, 0x30, 0xff, 0xff, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x01, // BTH, PadCnt 3
        0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, // DETH
        0xca, 0xfe, 0xf0, 0x0d, // ImmDt after the DETH
        0x42, 0, 0, 0,
    ];
    check(packet, &covered);
}

#[test]
fn compare_swap_and_atomic_ack() {
    let bth = Bth::new(Opcode::RcCompareSwap, 0x000012, 0x000010)
        .unwrap()
        .with_ack_req(true);
    let cas = Packet::new(
        bth,
        Extensions {
            atomic: Some(AtomicEth::compare_swap(
                0x0000_5555_0000_1000,
                0x0000_0077,
                0x0123_4567_89ab_cdef,
                0xfedc_ba98_7654_3210,
            )),
            ..Extensions::default()
        },
        &[],
    )
    .unwrap();
    #[rustfmt::skip]
    let covered = [
        0x13, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x12, 0x80, 0x00, 0x00, 0x10, // BTH
        0x00, 0x00, 0x55, 0x55, 0x00, 0x00, 0x10, 0x00, // VA
        0x00, 0x00, 0x00, 0x77,                         // R_Key
        0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10, // Swap Data
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, // Compare Data
    ];
    check(cas, &covered);

    let bth = Bth::new(Opcode::RcAtomicAcknowledge, 0x000034, 0x000010).unwrap();
    let ack = Packet::new(
        bth,
        Extensions {
            aeth: Some(Aeth::new(Syndrome::Ack { credits: 4 }, 0x000003).unwrap()),
            atomic_ack: Some(AtomicAckEth::new(0x0123_4567_89ab_cdef)),
            ..Extensions::default()
        },
        &[],
    )
    .unwrap();
    #[rustfmt::skip]
    let covered = [
        0x12, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x34, 0x00, 0x00, 0x00, 0x10, // BTH
        0x04, 0x00, 0x00, 0x03,                         // AETH: ACK, 4 credits, MSN 3
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, // Original Remote Data
    ];
    check(ack, &covered);
}

#[test]
fn send_only_with_invalidate_and_write_with_imm() {
    let bth = Bth::new(Opcode::RcSendOnlyWithInvalidate, 7, 8).unwrap();
    let packet = Packet::new(
        bth,
        Extensions {
            ieth: Some(Ieth::new(0x0102_0304)),
            ..Extensions::default()
        },
        &[9, 9],
    )
    .unwrap();
    #[rustfmt::skip]
    let covered = [
        0x17, 0x20, 0xff, 0xff, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x08, // PadCnt 2
        0x01, 0x02, 0x03, 0x04, // IETH
        9, 9, 0, 0,
    ];
    check(packet, &covered);

    let bth = Bth::new(Opcode::RcWriteOnlyWithImm, 7, 9).unwrap();
    let packet = Packet::new(
        bth,
        Extensions {
            reth: Some(Reth::new(0, 1, 0)),
            imm: Some(ImmDt::new(2)),
            ..Extensions::default()
        },
        &[],
    )
    .unwrap();
    #[rustfmt::skip]
    let covered = [
        0x0b, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x09,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, // RETH: zero-length write
        0, 0, 0, 2,             // ImmDt after the RETH
    ];
    check(packet, &covered);
}
