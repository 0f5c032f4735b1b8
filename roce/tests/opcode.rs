//! The opcode table against the reference implementation, Linux rxe's `rxe_opcode[]`
//! (drivers/infiniband/sw/rxe/rxe_opcode.c), transcribed here by hand: for each opcode its
//! header mask bits in rxe's offset order, `.length` and whether `RXE_PAYLOAD_MASK` is set.

use vrdma_roce::opcode::{Ext, Opcode};

/// rxe's header sizes (rxe_hdr.h), written out so a wrong size in the crate shows up.
const BTH: usize = 12;
const RETH: usize = 16;
const AETH: usize = 4;
const DETH: usize = 8;
const IMMDT: usize = 4;
const IETH: usize = 4;
const ATMETH: usize = 28;
const ATMACK: usize = 8;

/// (value, rxe name, headers after the BTH in rxe's offset order, rxe .length, payload mask).
const RXE: &[(u8, &str, &[Ext], usize, bool)] = &[
    (0x00, "RC_SEND_FIRST", &[], BTH, true),
    (0x01, "RC_SEND_MIDDLE", &[], BTH, true),
    (0x02, "RC_SEND_LAST", &[], BTH, true),
    (
        0x03,
        "RC_SEND_LAST_WITH_IMMEDIATE",
        &[Ext::ImmDt],
        BTH + IMMDT,
        true,
    ),
    (0x04, "RC_SEND_ONLY", &[], BTH, true),
    (
        0x05,
        "RC_SEND_ONLY_WITH_IMMEDIATE",
        &[Ext::ImmDt],
        BTH + IMMDT,
        true,
    ),
    (0x06, "RC_RDMA_WRITE_FIRST", &[Ext::Reth], BTH + RETH, true),
    (0x07, "RC_RDMA_WRITE_MIDDLE", &[], BTH, true),
    (0x08, "RC_RDMA_WRITE_LAST", &[], BTH, true),
    (
        0x09,
        "RC_RDMA_WRITE_LAST_WITH_IMMEDIATE",
        &[Ext::ImmDt],
        BTH + IMMDT,
        true,
    ),
    (0x0a, "RC_RDMA_WRITE_ONLY", &[Ext::Reth], BTH + RETH, true),
    (
        0x0b,
        "RC_RDMA_WRITE_ONLY_WITH_IMMEDIATE",
        &[Ext::Reth, Ext::ImmDt],
        BTH + RETH + IMMDT,
        true,
    ),
    (
        0x0c,
        "RC_RDMA_READ_REQUEST",
        &[Ext::Reth],
        BTH + RETH,
        false,
    ),
    (
        0x0d,
        "RC_RDMA_READ_RESPONSE_FIRST",
        &[Ext::Aeth],
        BTH + AETH,
        true,
    ),
    (0x0e, "RC_RDMA_READ_RESPONSE_MIDDLE", &[], BTH, true),
    (
        0x0f,
        "RC_RDMA_READ_RESPONSE_LAST",
        &[Ext::Aeth],
        BTH + AETH,
        true,
    ),
    (
        0x10,
        "RC_RDMA_READ_RESPONSE_ONLY",
        &[Ext::Aeth],
        BTH + AETH,
        true,
    ),
    (0x11, "RC_ACKNOWLEDGE", &[Ext::Aeth], BTH + AETH, false),
    (
        0x12,
        "RC_ATOMIC_ACKNOWLEDGE",
        &[Ext::Aeth, Ext::AtomicAckEth],
        BTH + AETH + ATMACK,
        false,
    ),
    (
        0x13,
        "RC_COMPARE_SWAP",
        &[Ext::AtomicEth],
        BTH + ATMETH,
        false,
    ),
    (0x14, "RC_FETCH_ADD", &[Ext::AtomicEth], BTH + ATMETH, false),
    (
        0x16,
        "RC_SEND_LAST_WITH_INVALIDATE",
        &[Ext::Ieth],
        BTH + IETH,
        true,
    ),
    (
        0x17,
        "RC_SEND_ONLY_WITH_INVALIDATE",
        &[Ext::Ieth],
        BTH + IETH,
        true,
    ),
    (0x64, "UD_SEND_ONLY", &[Ext::Deth], BTH + DETH, true),
    (
        0x65,
        "UD_SEND_ONLY_WITH_IMMEDIATE",
        &[Ext::Deth, Ext::ImmDt],
        BTH + DETH + IMMDT,
        true,
    ),
];

#[test]
fn table_matches_rxe() {
    assert_eq!(Opcode::ALL.len(), RXE.len(), "same set of opcodes");
    for &(value, name, headers, length, payload) in RXE {
        let opcode = Opcode::from_raw(value).unwrap_or_else(|| panic!("{name} unknown"));
        assert_eq!(opcode.raw(), value, "{name}");
        let layout = opcode.layout();
        assert_eq!(layout.headers, headers, "{name} headers");
        assert_eq!(layout.header_len(), length, "{name} length");
        assert_eq!(layout.payload, payload, "{name} payload");
        assert_eq!(opcode.is_ud(), name.starts_with("UD_"), "{name}");
        let response = name.contains("RESPONSE") || name.contains("ACKNOWLEDGE");
        assert_eq!(opcode.is_response(), response, "{name}");
    }
}

#[test]
fn every_other_value_is_unknown() {
    let known: Vec<u8> = RXE.iter().map(|e| e.0).collect();
    for raw in 0..=u8::MAX {
        assert_eq!(
            Opcode::from_raw(raw).is_some(),
            known.contains(&raw),
            "{raw:#04x}"
        );
    }
    // In particular: UC SEND ONLY, RD SEND ONLY, the RC reserved 0x15, CNP.
    for raw in [0x24, 0x44, 0x15, 0x81] {
        assert_eq!(Opcode::from_raw(raw), None);
    }
}

#[test]
fn ext_sizes() {
    let sizes = [
        (Ext::Reth, RETH),
        (Ext::Aeth, AETH),
        (Ext::Deth, DETH),
        (Ext::ImmDt, IMMDT),
        (Ext::Ieth, IETH),
        (Ext::AtomicEth, ATMETH),
        (Ext::AtomicAckEth, ATMACK),
    ];
    for (ext, len) in sizes {
        assert_eq!(ext.wire_len(), len, "{ext:?}");
    }
}
