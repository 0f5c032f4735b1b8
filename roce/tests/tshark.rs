//! Wireshark's view of our packets: builds Ethernet/IP/UDP frames around encoded datagrams,
//! writes a pcap file by hand, runs `tshark` on it and checks that it decodes the opcode, PSN,
//! destination QP and extension-header fields we put in, and finds the ICRC exactly in the
//! last 4 bytes (so its idea of each opcode's header lengths and of the pad agrees with ours).
//!
//! Wireshark (4.0) does not validate the ICRC (it only displays it), so this test cannot
//! check the ICRC value; tests/icrc.rs does that against a ConnectX-4 capture and an
//! rxe-style reference. It does check Wireshark accepts our IPv4 header checksums.
//!
//! Requires `tshark` (Debian: `apt-get install tshark`); fails if it is missing.

mod common;

use std::process::Command;

use common::Rng;
use vrdma_roce::aeth::{Aeth, Syndrome};
use vrdma_roce::atomic::{AtomicAckEth, AtomicEth};
use vrdma_roce::bth::Bth;
use vrdma_roce::deth::Deth;
use vrdma_roce::icrc::{Ip, IpUdp};
use vrdma_roce::ieth::Ieth;
use vrdma_roce::imm::ImmDt;
use vrdma_roce::opcode::{Ext, Opcode};
use vrdma_roce::packet::{Extensions, Packet};
use vrdma_roce::reth::Reth;

/// One Ethernet frame around a datagram, with real IP/UDP headers (IPv4 checksum computed).
fn frame(headers: &IpUdp, datagram: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    frame.extend(match headers.ip {
        Ip::V4 { .. } => [0x08, 0x00],
        Ip::V6 { .. } => [0x86, 0xdd],
    });
    frame.extend(common::ip_udp_bytes(
        headers,
        common::Variant::ZERO,
        datagram.len(),
    ));
    frame.extend(datagram);
    frame
}

/// A classic pcap file (microsecond timestamps, little-endian, link type Ethernet).
fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(0xa1b2_c3d4_u32.to_le_bytes()); // magic
    out.extend(2u16.to_le_bytes()); // version 2.4
    out.extend(4u16.to_le_bytes());
    out.extend(0i32.to_le_bytes()); // thiszone
    out.extend(0u32.to_le_bytes()); // sigfigs
    out.extend(65535u32.to_le_bytes()); // snaplen
    out.extend(1u32.to_le_bytes()); // LINKTYPE_ETHERNET
    for (i, frame) in frames.iter().enumerate() {
        out.extend((1_700_000_000u32 + i as u32).to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend((frame.len() as u32).to_le_bytes());
        out.extend((frame.len() as u32).to_le_bytes());
        out.extend(frame);
    }
    out
}

/// The tshark fields we read, in `-e` order.
const FIELDS: &[&str] = &[
    "infiniband.bth.opcode",
    "infiniband.bth.psn",
    "infiniband.bth.destqp",
    "infiniband.bth.padcnt",
    "infiniband.bth.se",
    "infiniband.bth.a",
    "infiniband.invariant.crc",
    "infiniband.reth.va",
    "infiniband.reth.r_key",
    "infiniband.reth.dmalen",
    "infiniband.aeth.syndrome",
    "infiniband.aeth.msn",
    "infiniband.deth.q_key",
    "infiniband.deth.srcqp",
    "infiniband.atomiceth.swapdt",
    "infiniband.atomiceth.cmpdt",
    "infiniband.atomicacketh.origremdt",
    "infiniband.immdt",
    "infiniband.ieth",
    "ip.checksum.status",
];

/// Parses tshark's rendering of an integer field (decimal, or hex with 0x).
fn num(text: &str) -> u64 {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .unwrap_or_else(|e| panic!("not a number: {text:?}: {e}"))
}

fn random_packet<'a>(rng: &mut Rng, opcode: Opcode, payload: &'a [u8]) -> Packet<'a> {
    let mut ext = Extensions::default();
    for &header in opcode.layout().headers {
        match header {
            Ext::Reth => ext.reth = Some(Reth::new(rng.next_u64(), rng.u32(), rng.u32())),
            Ext::Aeth => {
                let syndrome = Syndrome::Ack {
                    credits: rng.u8() & 0x1f,
                };
                ext.aeth = Some(Aeth::new(syndrome, rng.u32() & 0xff_ffff).unwrap());
            }
            Ext::Deth => ext.deth = Some(Deth::new(rng.u32(), rng.u32() & 0xff_ffff).unwrap()),
            Ext::ImmDt => ext.imm = Some(ImmDt::new(rng.u32())),
            Ext::Ieth => ext.ieth = Some(Ieth::new(rng.u32())),
            Ext::AtomicEth => {
                ext.atomic = Some(AtomicEth::new(
                    rng.next_u64() & !7,
                    rng.u32(),
                    rng.next_u64(),
                    rng.next_u64(),
                ))
            }
            Ext::AtomicAckEth => ext.atomic_ack = Some(AtomicAckEth::new(rng.next_u64())),
        }
    }
    let bth = Bth::new(opcode, rng.u32() & 0xff_ffff, rng.u32() & 0xff_ffff)
        .unwrap()
        .with_solicited(rng.bool())
        .with_ack_req(rng.bool());
    Packet::new(
        bth,
        ext,
        if opcode.layout().payload {
            payload
        } else {
            &[]
        },
    )
    .unwrap()
}

#[test]
fn wireshark_decodes_our_packets() {
    let mut rng = Rng::new(0x7534);
    let payloads: Vec<Vec<u8>> = (0..Opcode::ALL.len() * 2)
        .map(|i| {
            let len = [0, 1, 2, 3, 4, 5, 8, 13, 256][i % 9];
            rng.bytes(len)
        })
        .collect();
    let mut packets = Vec::new();
    for (i, payload) in payloads.iter().enumerate() {
        let opcode = Opcode::ALL[i % Opcode::ALL.len()];
        let headers = if i < Opcode::ALL.len() {
            common::v4()
        } else {
            common::v6()
        };
        packets.push((headers, random_packet(&mut rng, opcode, payload)));
    }

    let mut frames = Vec::new();
    let mut datagrams = Vec::new();
    for (headers, packet) in &packets {
        let mut datagram = vec![0; packet.encoded_len()];
        packet.encode(&mut datagram, headers).unwrap();
        frames.push(frame(headers, &datagram));
        datagrams.push(datagram);
    }
    let path = std::env::temp_dir().join(format!("vrdma-roce-{}.pcap", std::process::id()));
    std::fs::write(&path, pcap(&frames)).unwrap();

    let mut command = Command::new("tshark");
    command
        .args(["-n", "-o", "ip.check_checksum:TRUE", "-r"])
        .arg(&path)
        .args(["-T", "fields", "-E", "separator=|", "-E", "occurrence=f"]);
    for field in FIELDS {
        command.args(["-e", field]);
    }
    let output = match command.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "tshark is not installed; this test needs it \
             (DEBIAN_FRONTEND=noninteractive apt-get install -y tshark)"
        ),
        Err(e) => panic!("running tshark: {e}"),
    };
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Shown only if the test fails.
    println!("tshark fields ({}):\n{stdout}", FIELDS.join("|"));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), packets.len(), "one line per frame:\n{stdout}");

    for (((headers, packet), datagram), line) in packets.iter().zip(&datagrams).zip(&lines) {
        let cols: Vec<&str> = line.split('|').collect();
        assert_eq!(cols.len(), FIELDS.len(), "{line}");
        let field = |name: &str| cols[FIELDS.iter().position(|f| *f == name).unwrap()];
        let ctx = format!("{:?}: {line}", packet.opcode());
        let bth = packet.bth();
        assert_eq!(
            num(field("infiniband.bth.opcode")),
            u64::from(bth.opcode()),
            "{ctx}"
        );
        assert_eq!(
            num(field("infiniband.bth.psn")),
            u64::from(bth.psn()),
            "{ctx}"
        );
        assert_eq!(
            num(field("infiniband.bth.destqp")),
            u64::from(bth.dest_qp()),
            "{ctx}"
        );
        assert_eq!(
            num(field("infiniband.bth.padcnt")),
            packet.pad_len() as u64,
            "{ctx}"
        );
        let flag = |f: &str| matches!(f, "1" | "True");
        assert_eq!(flag(field("infiniband.bth.se")), bth.solicited(), "{ctx}");
        assert_eq!(flag(field("infiniband.bth.a")), bth.ack_req(), "{ctx}");
        // Wireshark shows the last 4 bytes as a big-endian number: it found the ICRC where we
        // put it, after exactly the headers, payload and pad we wrote. Wireshark 4.0.17 shows
        // no ICRC field at all for SEND LAST, SEND ONLY and the SENDs with invalidate (it
        // offers their payload to upper-layer dissectors), so there it may be absent.
        let tail: [u8; 4] = datagram[datagram.len() - 4..].try_into().unwrap();
        let icrc = field("infiniband.invariant.crc");
        if matches!(bth.opcode(), 0x02 | 0x04 | 0x16 | 0x17) {
            assert!(
                icrc.is_empty() || num(icrc) == u64::from(u32::from_be_bytes(tail)),
                "{ctx}"
            );
        } else {
            assert_eq!(num(icrc), u64::from(u32::from_be_bytes(tail)), "{ctx}");
        }
        // IPv4 only: 1 is PROTO_CHECKSUM_E_GOOD (0 bad, 2 unverified).
        if matches!(headers.ip, Ip::V4 { .. }) {
            assert_eq!(field("ip.checksum.status"), "1", "{ctx}");
        }
        let ext = packet.ext();
        if let Some(reth) = ext.reth {
            assert_eq!(num(field("infiniband.reth.va")), reth.va(), "{ctx}");
            assert_eq!(
                num(field("infiniband.reth.r_key")),
                u64::from(reth.rkey()),
                "{ctx}"
            );
            assert_eq!(
                num(field("infiniband.reth.dmalen")),
                u64::from(reth.dma_len()),
                "{ctx}"
            );
        }
        if let Some(aeth) = ext.aeth {
            let syndrome = u64::from(aeth.raw_syndrome());
            assert_eq!(num(field("infiniband.aeth.syndrome")), syndrome, "{ctx}");
            assert_eq!(
                num(field("infiniband.aeth.msn")),
                u64::from(aeth.msn()),
                "{ctx}"
            );
        }
        if let Some(deth) = ext.deth {
            assert_eq!(
                num(field("infiniband.deth.q_key")),
                u64::from(deth.qkey()),
                "{ctx}"
            );
            assert_eq!(
                num(field("infiniband.deth.srcqp")),
                u64::from(deth.src_qp()),
                "{ctx}"
            );
        }
        if let Some(atomic) = ext.atomic {
            assert_eq!(
                num(field("infiniband.atomiceth.swapdt")),
                atomic.swap_add(),
                "{ctx}"
            );
            assert_eq!(
                num(field("infiniband.atomiceth.cmpdt")),
                atomic.compare(),
                "{ctx}"
            );
        }
        if let Some(ack) = ext.atomic_ack {
            assert_eq!(
                num(field("infiniband.atomicacketh.origremdt")),
                ack.original(),
                "{ctx}"
            );
        }
        if let Some(imm) = ext.imm {
            let hex: String = imm.bytes().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(field("infiniband.immdt").replace(':', ""), hex, "{ctx}");
        }
        if let Some(ieth) = ext.ieth {
            let hex = format!("{:08x}", ieth.rkey());
            assert_eq!(field("infiniband.ieth").replace(':', ""), hex, "{ctx}");
        }
    }
}
