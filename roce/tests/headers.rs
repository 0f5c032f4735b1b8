//! Layouts and accessors of the header types: sizes, where each field's bits sit, masking of
//! the neighbouring bits, and refusal of values that do not fit.

use vrdma_roce::aeth::{self, Aeth, NakCode, ReservedSyndrome, Syndrome};
use vrdma_roce::atomic::{self, AtomicAckEth, AtomicEth};
use vrdma_roce::bth::{self, Bth};
use vrdma_roce::deth::{self, Deth};
use vrdma_roce::ieth::{self, Ieth};
use vrdma_roce::imm::{self, ImmDt};
use vrdma_roce::opcode::Opcode;
use vrdma_roce::reth::{self, Reth};
use vrdma_roce::{MAX_24, OutOfRange};
use zerocopy::{FromBytes, IntoBytes};

#[test]
fn sizes() {
    assert_eq!((size_of::<Bth>(), bth::LEN), (12, 12));
    assert_eq!((size_of::<Reth>(), reth::LEN), (16, 16));
    assert_eq!((size_of::<Aeth>(), aeth::LEN), (4, 4));
    assert_eq!((size_of::<Deth>(), deth::LEN), (8, 8));
    assert_eq!((size_of::<ImmDt>(), imm::LEN), (4, 4));
    assert_eq!((size_of::<Ieth>(), ieth::LEN), (4, 4));
    assert_eq!((size_of::<AtomicEth>(), atomic::ETH_LEN), (28, 28));
    assert_eq!((size_of::<AtomicAckEth>(), atomic::ACK_ETH_LEN), (8, 8));
    assert_eq!(align_of::<AtomicEth>(), 1);
}

#[test]
fn bth_fields_sit_where_the_iba_puts_them() {
    let bth = Bth::new(Opcode::RcWriteOnly, 0x123456, 0xabcdef)
        .unwrap()
        .with_solicited(true)
        .with_pkey(0x8001)
        .with_ack_req(true);
    assert_eq!(
        bth.as_bytes(),
        [
            0x0a, 0x80, 0x80, 0x01, 0x00, 0x12, 0x34, 0x56, 0x80, 0xab, 0xcd, 0xef
        ]
    );
    let bth = Bth::new(Opcode::RcSendOnly, 0, 0)
        .unwrap()
        .with_mig_req(true)
        .with_pad_count(3)
        .unwrap()
        .with_fecn(true)
        .with_becn(true);
    assert_eq!(
        bth.as_bytes(),
        [0x04, 0x70, 0xff, 0xff, 0xc0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(bth.with_tver(0xf).unwrap().as_bytes()[1], 0x7f);
}

#[test]
fn bth_accessors_mask_their_neighbours() {
    // Every bit set: each accessor must see only its own bits.
    let bth = Bth::read_from_bytes(&[0xff; 12]).unwrap();
    assert_eq!(bth.opcode(), 0xff);
    assert!(bth.solicited() && bth.mig_req() && bth.fecn() && bth.becn() && bth.ack_req());
    assert_eq!(bth.pad_count(), 3);
    assert_eq!(bth.tver(), 0xf);
    assert_eq!(bth.pkey(), 0xffff);
    assert_eq!(bth.dest_qp(), MAX_24);
    assert_eq!(bth.psn(), MAX_24);
    assert_eq!(bth.resv6a(), 0x3f);
    assert_eq!(bth.resv7(), 0x7f);

    // Setters leave the neighbouring bits alone.
    let changed = bth
        .with_dest_qp(0)
        .unwrap()
        .with_psn(0)
        .unwrap()
        .with_pad_count(0)
        .unwrap()
        .with_solicited(false)
        .with_ack_req(false)
        .with_fecn(false);
    assert_eq!(
        changed.as_bytes(),
        [0xff, 0x4f, 0xff, 0xff, 0x7f, 0, 0, 0, 0x7f, 0, 0, 0]
    );

    let zero = Bth::read_from_bytes(&[0; 12]).unwrap();
    assert!(!zero.solicited() && !zero.mig_req() && !zero.fecn() && !zero.becn());
    assert!(!zero.ack_req());
    assert_eq!(
        (zero.pad_count(), zero.tver(), zero.dest_qp(), zero.psn()),
        (0, 0, 0, 0)
    );
}

#[test]
fn bth_refuses_out_of_range() {
    let err = Bth::new(Opcode::RcSendOnly, 0x0100_0000, 0).unwrap_err();
    assert_eq!(
        err,
        OutOfRange {
            field: "DestQP",
            value: 0x0100_0000,
            max: 0xff_ffff
        }
    );
    assert_eq!(
        Bth::new(Opcode::RcSendOnly, 0, 0x0100_0000)
            .unwrap_err()
            .field,
        "PSN"
    );
    let bth = Bth::new(Opcode::RcSendOnly, MAX_24, MAX_24).unwrap();
    assert_eq!((bth.dest_qp(), bth.psn()), (MAX_24, MAX_24));
    assert!(bth.with_dest_qp(u32::MAX).is_err());
    assert!(bth.with_psn(1 << 24).is_err());
    assert!(bth.with_pad_count(4).is_err());
    assert!(bth.with_tver(16).is_err());
    assert!(err.to_string().contains("DestQP"));
}

#[test]
fn reth_atomic_imm_ieth_layouts() {
    let reth = Reth::new(0x0102_0304_0506_0708, 0x090a_0b0c, 0x0d0e_0f10);
    assert_eq!(reth.as_bytes(), (1..=16).collect::<Vec<u8>>());
    assert_eq!(
        (reth.va(), reth.rkey(), reth.dma_len()),
        (0x0102_0304_0506_0708, 0x090a_0b0c, 0x0d0e_0f10)
    );

    let cas = AtomicEth::compare_swap(0x1000, 0x2000_0001, 0x3333, 0x4444);
    let mut expected = vec![0, 0, 0, 0, 0, 0, 0x10, 0];
    expected.extend([0x20, 0, 0, 0x01]);
    expected.extend([0, 0, 0, 0, 0, 0, 0x44, 0x44]); // swap comes first
    expected.extend([0, 0, 0, 0, 0, 0, 0x33, 0x33]);
    assert_eq!(cas.as_bytes(), expected);
    assert_eq!((cas.swap_add(), cas.compare()), (0x4444, 0x3333));
    let faa = AtomicEth::fetch_add(8, 9, 10);
    assert_eq!(
        (faa.va(), faa.rkey(), faa.swap_add(), faa.compare()),
        (8, 9, 10, 0)
    );

    assert_eq!(
        AtomicAckEth::new(0x0102_0304_0506_0708).as_bytes(),
        [1, 2, 3, 4, 5, 6, 7, 8]
    );
    assert_eq!(ImmDt::new(0xdead_beef).as_bytes(), [0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(ImmDt::from_bytes([1, 2, 3, 4]).get(), 0x0102_0304);
    assert_eq!(ImmDt::new(5).bytes(), [0, 0, 0, 5]);
    assert_eq!(Ieth::new(0x0a0b_0c0d).as_bytes(), [0x0a, 0x0b, 0x0c, 0x0d]);
}

#[test]
fn deth_layout_and_masking() {
    let deth = Deth::new(0x8001_0002, 0x00ab_cdef).unwrap();
    assert_eq!(
        deth.as_bytes(),
        [0x80, 0x01, 0x00, 0x02, 0x00, 0xab, 0xcd, 0xef]
    );
    assert!(Deth::new(0, 0x0100_0000).is_err());
    let raw = Deth::read_from_bytes(&[0xff; 8]).unwrap();
    assert_eq!(
        (raw.qkey(), raw.src_qp(), raw.resv8()),
        (u32::MAX, MAX_24, 0xff)
    );
}

#[test]
fn aeth_syndromes() {
    let cases = [
        (Syndrome::Ack { credits: 0 }, 0x00),
        (
            Syndrome::Ack {
                credits: aeth::NO_CREDITS,
            },
            0x1f,
        ),
        (Syndrome::RnrNak { timer: 0 }, 0x20),
        (Syndrome::RnrNak { timer: 31 }, 0x3f),
        (Syndrome::Nak(NakCode::PsnSequenceError), 0x60),
        (Syndrome::Nak(NakCode::InvalidRequest), 0x61),
        (Syndrome::Nak(NakCode::RemoteAccessError), 0x62),
        (Syndrome::Nak(NakCode::RemoteOperationalError), 0x63),
        (Syndrome::Nak(NakCode::InvalidRdRequest), 0x64),
    ];
    for (syndrome, raw) in cases {
        assert_eq!(syndrome.raw(), Ok(raw), "{syndrome:?}");
        let aeth = Aeth::new(syndrome, 0x00c0_ffee).unwrap();
        assert_eq!(aeth.as_bytes(), [raw, 0xc0, 0xff, 0xee]);
        assert_eq!(aeth.syndrome(), Ok(syndrome));
        assert_eq!((aeth.raw_syndrome(), aeth.msn()), (raw, 0x00c0_ffee));
    }
    assert!(Syndrome::Ack { credits: 32 }.raw().is_err());
    assert!(Syndrome::RnrNak { timer: 0xff }.raw().is_err());
    assert!(Aeth::new(Syndrome::Ack { credits: 0 }, 1 << 24).is_err());

    // Every byte decodes to a syndrome that re-encodes to it, or is reserved: bit 7, kind 10,
    // NAK codes 5-31.
    for raw in 0..=u8::MAX {
        let reserved = raw & 0x80 != 0 || raw >> 5 == 0b10 || (raw >> 5 == 0b11 && raw & 0x1f > 4);
        match Syndrome::from_raw(raw) {
            Ok(s) => {
                assert!(!reserved, "{raw:#04x}");
                assert_eq!(s.raw(), Ok(raw));
            }
            Err(e) => {
                assert!(reserved, "{raw:#04x}");
                assert_eq!(e, ReservedSyndrome(raw));
            }
        }
    }
    let aeth = Aeth::read_from_bytes(&[0xff; 4]).unwrap();
    assert_eq!(aeth.msn(), MAX_24);
    assert_eq!(aeth.syndrome(), Err(ReservedSyndrome(0xff)));
}
