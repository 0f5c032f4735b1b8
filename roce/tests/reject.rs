//! Every reason `packet::parse` drops a datagram, every reason `Packet::new` refuses one, and
//! the encoder's buffer check. Each malformed datagram is re-sealed with a correct ICRC so
//! that it reaches the check it is aimed at.

mod common;

use vrdma_roce::aeth::{Aeth, Syndrome};
use vrdma_roce::bth::Bth;
use vrdma_roce::deth::Deth;
use vrdma_roce::icrc;
use vrdma_roce::opcode::{Ext, Opcode};
use vrdma_roce::packet::{
    self, BufferTooSmall, BuildError, Extensions, IcrcCheck, MAX_DATAGRAM, Packet, ParseError,
};
use vrdma_roce::reth::Reth;

const MTU: usize = 1024;

fn parse(datagram: &[u8]) -> Result<Packet<'_>, ParseError> {
    packet::parse(datagram, MTU, IcrcCheck::Verify(&common::v4()))
}

fn sealed(mut covered: Vec<u8>) -> Vec<u8> {
    covered.extend([0; 4]);
    icrc::seal(&common::v4(), &mut covered);
    covered
}

/// A valid SEND ONLY of `len` payload bytes, as bytes.
fn send_only(len: usize) -> Vec<u8> {
    let payload = vec![0x5a; len];
    let packet = Packet::new(
        Bth::new(Opcode::RcSendOnly, 1, 2).unwrap(),
        Extensions::default(),
        &payload,
    )
    .unwrap();
    let mut buf = vec![0; packet.encoded_len()];
    packet.encode(&mut buf, &common::v4()).unwrap();
    buf
}

/// `datagram` without its ICRC, with `f` applied to it, re-sealed.
fn mutate(datagram: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut covered = datagram[..datagram.len() - 4].to_vec();
    f(&mut covered);
    sealed(covered)
}

#[test]
fn valid_baseline() {
    for len in [0, 1, 2, 3, 4, 5, MTU] {
        let datagram = send_only(len);
        let packet = parse(&datagram).unwrap();
        assert_eq!(packet.payload().len(), len);
        assert_eq!(packet.pad_len(), (4 - len % 4) % 4);
    }
}

#[test]
fn truncated() {
    let datagram = send_only(0);
    assert_eq!(datagram.len(), packet::MIN_DATAGRAM);
    for len in 0..packet::MIN_DATAGRAM {
        assert_eq!(parse(&datagram[..len]), Err(ParseError::Truncated), "{len}");
        assert_eq!(
            packet::parse(&datagram[..len], MTU, IcrcCheck::Skip),
            Err(ParseError::Truncated)
        );
    }
    // A READ request whose RETH is cut short, and an ATOMIC ACKNOWLEDGE missing its
    // AtomicAckETH.
    let mut read = Bth::new(Opcode::RcReadRequest, 1, 2)
        .unwrap()
        .as_bytes_vec();
    read.extend([0; 12]);
    assert_eq!(parse(&sealed(read)), Err(ParseError::Truncated));
    let mut atomic_ack = Bth::new(Opcode::RcAtomicAcknowledge, 1, 2)
        .unwrap()
        .as_bytes_vec();
    atomic_ack.extend([0; 4 + 4]);
    assert_eq!(parse(&sealed(atomic_ack)), Err(ParseError::Truncated));
}

trait AsBytesVec {
    fn as_bytes_vec(&self) -> Vec<u8>;
}

impl AsBytesVec for Bth {
    fn as_bytes_vec(&self) -> Vec<u8> {
        zerocopy::IntoBytes::as_bytes(self).to_vec()
    }
}

#[test]
fn oversized() {
    let mut big = Bth::new(Opcode::RcSendMiddle, 1, 2).unwrap().as_bytes_vec();
    big.resize(MAX_DATAGRAM + 1 - 4, 0);
    let big = sealed(big);
    assert_eq!(
        packet::parse(&big, usize::MAX, IcrcCheck::Skip),
        Err(ParseError::Oversized)
    );
    // The longest well-framed datagram below the limit (a multiple of 4) is fine, given a
    // large enough MTU.
    let mut max = Bth::new(Opcode::RcSendMiddle, 1, 2).unwrap().as_bytes_vec();
    max.resize(MAX_DATAGRAM / 4 * 4 - 4, 0);
    let max = sealed(max);
    assert!(packet::parse(&max, usize::MAX, IcrcCheck::Skip).is_ok());
    assert_eq!(
        packet::parse(&max, MTU, IcrcCheck::Skip),
        Err(ParseError::PayloadTooLong)
    );
}

#[test]
fn bad_icrc() {
    let datagram = send_only(8);
    for bit in 0..datagram.len() * 8 {
        let mut corrupt = datagram.clone();
        corrupt[bit / 8] ^= 1 << (bit % 8);
        let result = parse(&corrupt);
        if bit / 8 == 4 {
            // FECN/BECN/resv6a are not covered: the packet is still valid.
            assert!(result.is_ok(), "bit {bit}");
        } else {
            assert_eq!(result, Err(ParseError::BadIcrc), "bit {bit}");
            // Without the check the corruption is either harmless or caught elsewhere, never
            // a panic.
            let _ = packet::parse(&corrupt, MTU, IcrcCheck::Skip);
        }
    }
    // Right bytes, wrong IP/UDP description.
    let mut other = common::v4();
    other.src_port ^= 1;
    assert_eq!(
        packet::parse(&datagram, MTU, IcrcCheck::Verify(&other)),
        Err(ParseError::BadIcrc)
    );
    assert_eq!(
        packet::parse(&datagram, MTU, IcrcCheck::Verify(&common::v6())),
        Err(ParseError::BadIcrc)
    );
    // Skipping the check accepts a wrong ICRC.
    let mut wrong = datagram.clone();
    *wrong.last_mut().unwrap() ^= 0xff;
    assert_eq!(parse(&wrong), Err(ParseError::BadIcrc));
    assert!(packet::parse(&wrong, MTU, IcrcCheck::Skip).is_ok());
}

#[test]
fn bad_version() {
    for tver in 1..16u8 {
        let datagram = mutate(&send_only(4), |c| c[1] |= tver);
        assert_eq!(parse(&datagram), Err(ParseError::BadVersion), "{tver}");
    }
}

#[test]
fn unknown_opcode() {
    for raw in 0..=u8::MAX {
        let datagram = mutate(&send_only(4), |c| c[0] = raw);
        let result = parse(&datagram);
        match Opcode::from_raw(raw) {
            None => assert_eq!(result, Err(ParseError::UnknownOpcode), "{raw:#04x}"),
            Some(_) => assert_ne!(result, Err(ParseError::UnknownOpcode), "{raw:#04x}"),
        }
    }
}

#[test]
fn payload_not_allowed() {
    for opcode in Opcode::ALL.iter().filter(|o| !o.layout().payload) {
        let header_len = opcode.layout().header_len();
        let mut covered = Bth::new(*opcode, 1, 2).unwrap().as_bytes_vec();
        covered.resize(header_len, 0);
        assert!(parse(&sealed(covered.clone())).is_ok(), "{opcode:?} bare");
        covered.extend([1, 2, 3, 4]);
        assert_eq!(
            parse(&sealed(covered)),
            Err(ParseError::PayloadNotAllowed),
            "{opcode:?}"
        );
    }
}

#[test]
fn bad_pad() {
    // Payload plus pad not a multiple of 4.
    for extra in 1..4 {
        let datagram = mutate(&send_only(4), |c| c.extend(vec![0; extra]));
        assert_eq!(parse(&datagram), Err(ParseError::BadPad), "{extra}");
    }
    // A pad count larger than payload plus pad (which is empty).
    for pad in 1..4u8 {
        let datagram = mutate(&send_only(0), |c| c[1] |= pad << 4);
        assert_eq!(parse(&datagram), Err(ParseError::BadPad), "{pad}");
    }
    // A non-zero pad count on an opcode without payload.
    let mut ack = Bth::new(Opcode::RcAcknowledge, 1, 2)
        .unwrap()
        .with_pad_count(1)
        .unwrap()
        .as_bytes_vec();
    ack.extend([0; 4]);
    assert_eq!(parse(&sealed(ack)), Err(ParseError::BadPad));
    // Any pad count 0-3 is consistent with 4 bytes of payload plus pad: it only decides how
    // many of them are payload.
    for pad in 0..4u8 {
        let datagram = mutate(&send_only(4), |c| c[1] = pad << 4);
        assert_eq!(
            parse(&datagram).unwrap().payload().len(),
            4 - usize::from(pad)
        );
    }
}

#[test]
fn payload_too_long() {
    let datagram = send_only(MTU + 1);
    assert_eq!(parse(&datagram), Err(ParseError::PayloadTooLong));
    assert!(packet::parse(&datagram, MTU + 1, IcrcCheck::Verify(&common::v4())).is_ok());
    // The limit is on payload bytes, not on payload plus pad.
    let datagram = send_only(MTU - 1);
    assert!(packet::parse(&datagram, MTU - 1, IcrcCheck::Verify(&common::v4())).is_ok());
    assert_eq!(
        packet::parse(&datagram, MTU - 2, IcrcCheck::Verify(&common::v4())),
        Err(ParseError::PayloadTooLong)
    );
}

#[test]
fn error_indices_are_dense_and_messages_distinct() {
    for (i, reason) in ParseError::ALL.iter().enumerate() {
        assert_eq!(reason.index(), i);
    }
    let messages: std::collections::HashSet<String> =
        ParseError::ALL.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), ParseError::ALL.len());
}

#[test]
fn build_errors() {
    let send = Bth::new(Opcode::RcSendOnly, 1, 2).unwrap();
    let reth = Some(Reth::new(0, 0, 0));

    let mut unknown = send.as_bytes_vec();
    unknown[0] = 0x24;
    let unknown: Bth = zerocopy::FromBytes::read_from_bytes(&unknown[..]).unwrap();
    assert_eq!(
        Packet::new(unknown, Extensions::default(), &[]),
        Err(BuildError::UnknownOpcode(0x24))
    );
    assert_eq!(
        Packet::new(send.with_tver(2).unwrap(), Extensions::default(), &[]),
        Err(BuildError::BadVersion(2))
    );
    assert_eq!(
        Packet::new(
            send.with_opcode(Opcode::RcWriteOnly),
            Extensions::default(),
            &[]
        ),
        Err(BuildError::MissingHeader(Ext::Reth))
    );
    assert_eq!(
        Packet::new(
            send,
            Extensions {
                reth,
                ..Extensions::default()
            },
            &[]
        ),
        Err(BuildError::UnexpectedHeader(Ext::Reth))
    );
    let ud = Extensions {
        deth: Some(Deth::new(1, 2).unwrap()),
        ..Extensions::default()
    };
    assert_eq!(
        Packet::new(send.with_opcode(Opcode::UdSendOnlyWithImm), ud, &[]),
        Err(BuildError::MissingHeader(Ext::ImmDt))
    );
    let ack = Extensions {
        aeth: Some(Aeth::new(Syndrome::Ack { credits: 0 }, 0).unwrap()),
        ..Extensions::default()
    };
    assert_eq!(
        Packet::new(send.with_opcode(Opcode::RcAcknowledge), ack, &[1]),
        Err(BuildError::PayloadNotAllowed)
    );
    let big = vec![0; MAX_DATAGRAM];
    assert!(matches!(
        Packet::new(send, Extensions::default(), &big),
        Err(BuildError::Oversized(_))
    ));
    // The pad count given is replaced by the right one.
    let padded = Packet::new(
        send.with_pad_count(3).unwrap(),
        Extensions::default(),
        &[1; 4],
    );
    assert_eq!(padded.unwrap().bth().pad_count(), 0);
}

#[test]
fn encode_buffer_too_small() {
    let packet = Packet::new(
        Bth::new(Opcode::RcSendOnly, 1, 2).unwrap(),
        Extensions::default(),
        &[7; 5],
    )
    .unwrap();
    assert_eq!(packet.encoded_len(), 12 + 5 + 3 + 4);
    for len in 0..packet.encoded_len() {
        let mut buf = vec![0xee; len];
        assert_eq!(
            packet.encode(&mut buf, &common::v4()),
            Err(BufferTooSmall {
                needed: 24,
                available: len
            })
        );
        assert!(buf.iter().all(|&b| b == 0xee), "nothing written on failure");
    }
    let mut buf = vec![0xee; 100];
    assert_eq!(packet.encode(&mut buf, &common::v4()), Ok(24));
    assert_eq!(&buf[17..20], [0, 0, 0], "zero pad");
}
