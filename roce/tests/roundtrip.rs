//! Random packets of every opcode: encode, parse, compare, re-encode.

mod common;

use common::Rng;
use vrdma_roce::MAX_24;
use vrdma_roce::aeth::{Aeth, NakCode, Syndrome};
use vrdma_roce::atomic::{AtomicAckEth, AtomicEth};
use vrdma_roce::bth::Bth;
use vrdma_roce::deth::Deth;
use vrdma_roce::icrc;
use vrdma_roce::ieth::Ieth;
use vrdma_roce::imm::ImmDt;
use vrdma_roce::opcode::{Ext, Opcode};
use vrdma_roce::packet::{self, Extensions, IcrcCheck, Packet};
use vrdma_roce::reth::Reth;

fn random_extensions(rng: &mut Rng, opcode: Opcode) -> Extensions {
    let mut ext = Extensions::default();
    for &header in opcode.layout().headers {
        match header {
            Ext::Reth => ext.reth = Some(Reth::new(rng.next_u64(), rng.u32(), rng.u32())),
            Ext::Aeth => {
                let syndrome = match rng.below(3) {
                    0 => Syndrome::Ack {
                        credits: rng.u8() & 0x1f,
                    },
                    1 => Syndrome::RnrNak {
                        timer: rng.u8() & 0x1f,
                    },
                    _ => Syndrome::Nak(NakCode::ALL[rng.below(NakCode::ALL.len())]),
                };
                ext.aeth = Some(Aeth::new(syndrome, rng.u32() & MAX_24).unwrap());
            }
            Ext::Deth => ext.deth = Some(Deth::new(rng.u32(), rng.u32() & MAX_24).unwrap()),
            Ext::ImmDt => ext.imm = Some(ImmDt::new(rng.u32())),
            Ext::Ieth => ext.ieth = Some(Ieth::new(rng.u32())),
            Ext::AtomicEth => {
                ext.atomic = Some(AtomicEth::new(
                    rng.next_u64(),
                    rng.u32(),
                    rng.next_u64(),
                    rng.next_u64(),
                ))
            }
            Ext::AtomicAckEth => ext.atomic_ack = Some(AtomicAckEth::new(rng.next_u64())),
        }
    }
    ext
}

fn random_bth(rng: &mut Rng, opcode: Opcode) -> Bth {
    Bth::new(opcode, rng.u32() & MAX_24, rng.u32() & MAX_24)
        .unwrap()
        .with_solicited(rng.bool())
        .with_mig_req(rng.bool())
        .with_pkey(rng.u16())
        .with_fecn(rng.bool())
        .with_becn(rng.bool())
        .with_ack_req(rng.bool())
}

#[test]
fn every_opcode_round_trips() {
    let mut rng = Rng::new(0x5eed);
    let mut buf = vec![0u8; 8192];
    for i in 0..3000 {
        let opcode = Opcode::ALL[i % Opcode::ALL.len()];
        let headers = common::random_ip_udp(&mut rng);
        let payload = if opcode.layout().payload {
            let len = rng.below(4097);
            rng.bytes(len)
        } else {
            Vec::new()
        };
        let packet = Packet::new(
            random_bth(&mut rng, opcode),
            random_extensions(&mut rng, opcode),
            &payload,
        )
        .unwrap();
        let len = packet.encode(&mut buf, &headers).unwrap();
        let datagram = &buf[..len];
        assert_eq!(len % 4, 0);

        // The independent reference agrees with the ICRC the encoder wrote.
        let (covered, stored) = datagram.split_at(len - 4);
        assert_eq!(
            common::reference_icrc_for(&headers, common::Variant::ZERO, covered),
            stored
        );

        let parsed = packet::parse(datagram, 4096, IcrcCheck::Verify(&headers)).unwrap();
        assert_eq!(parsed, packet, "{opcode:?}");
        assert_eq!(parsed.payload(), &payload[..]);
        assert_eq!(packet::parse(datagram, 4096, IcrcCheck::Skip), Ok(parsed));

        let mut again = vec![0u8; len];
        assert_eq!(parsed.encode(&mut again, &headers), Ok(len));
        assert_eq!(again, datagram);

        // FECN/BECN are rewritten by the network without touching the ICRC.
        let mut marked = datagram.to_vec();
        marked[4] ^= 0xc0;
        let parsed = packet::parse(&marked, 4096, IcrcCheck::Verify(&headers)).unwrap();
        assert_eq!(parsed.bth().fecn(), !packet.bth().fecn());
        assert_eq!(parsed.bth().becn(), !packet.bth().becn());
        assert!(icrc::verify(&headers, &marked));
    }
}
