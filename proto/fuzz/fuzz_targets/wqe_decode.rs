//! Work-queue entries: `wqe::decode_send` and `wqe::decode_recv` on an arbitrary ring slot
//! under arbitrary QP limits, with a round-trip oracle: whatever decodes is re-encoded with
//! `wqe::encode_send` / `wqe::encode_recv`, must reproduce the slot's bytes exactly, and must
//! decode again to the same work request.
//!
//! Input: byte 0 is `max_sge`, bytes 1-2 (little endian) are `max_inline`, the rest is the slot.
//! The limits are deliberately not clamped to the protocol's maxima: the decoders must be safe
//! whatever the device was configured with.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vrdma_proto::DecodeError;
use vrdma_proto::wqe::{self, Data, Limits, Payload, SendFlags, Sge};
use zerocopy::IntoBytes;

fuzz_target!(|data: &[u8]| {
    let [max_sge, inline_lo, inline_hi, slot @ ..] = data else {
        return;
    };
    let limits = Limits {
        max_sge: u32::from(*max_sge),
        max_inline: u32::from(u16::from_le_bytes([*inline_lo, *inline_hi])),
    };
    send(slot, limits);
    recv(slot, limits.max_sge);
});

fn send(slot: &[u8], limits: Limits) {
    let wr = match wqe::decode_send(slot, limits) {
        Ok(wr) => wr,
        Err(err) => {
            let _ = err.to_string();
            return;
        }
    };
    let header = wr.header;
    assert_eq!(header.opcode, wr.opcode.raw());
    assert_eq!(header.send_flags, wr.flags.bits());

    // Invariants of a decoded send.
    let sges: Vec<Sge>;
    let payload = match wr.payload {
        Payload::Inline(bytes) => {
            assert!(wr.flags.contains(SendFlags::INLINE));
            assert!(!wr.opcode.writes_local());
            assert_eq!(header.num_sge.get(), 0);
            assert_eq!(header.inline_len.get() as usize, bytes.len());
            assert!(bytes.len() as u64 <= u64::from(limits.max_inline));
            assert_eq!(wr.byte_len as usize, bytes.len());
            Data::Inline(bytes)
        }
        Payload::Sges(list) => {
            assert!(!wr.flags.contains(SendFlags::INLINE));
            assert_eq!(header.inline_len.get(), 0);
            assert_eq!(usize::from(header.num_sge.get()), list.len());
            assert!(list.len() as u64 <= u64::from(limits.max_sge));
            assert_eq!(list.is_empty(), header.num_sge.get() == 0);
            sges = list.iter().collect();
            assert_eq!(sges.len(), list.len());
            let total: u64 = sges.iter().map(|s| u64::from(s.length.get())).sum();
            assert_eq!(total, u64::from(wr.byte_len));
            Data::Sges(&sges)
        }
    };

    // Round trip.
    let mut buf = vec![0u8; slot.len()];
    let n = wqe::encode_send(&mut buf, header, payload).expect("re-encoding a decoded send");
    assert_eq!(n, wqe::SEND_HEADER_SIZE as usize + payload_len(&payload));
    assert_eq!(
        &buf[..n],
        &slot[..n],
        "re-encoded send differs from the slot"
    );
    let again = wqe::decode_send(&buf[..n], limits).expect("decoding a re-encoded send");
    assert_eq!(again.header, wr.header);
    assert_eq!(again.opcode, wr.opcode);
    assert_eq!(again.flags, wr.flags);
    assert_eq!(again.byte_len, wr.byte_len);
    assert_eq!(again.payload, wr.payload);

    // A slot one byte short is refused, not overrun.
    let mut short = vec![0u8; n - 1];
    assert!(matches!(
        wqe::encode_send(&mut short, header, payload),
        Err(DecodeError::Truncated { need, got, .. }) if need == n && got == n - 1
    ));
}

fn payload_len(data: &Data<'_>) -> usize {
    match data {
        Data::Sges(sges) => sges.as_bytes().len(),
        Data::Inline(bytes) => bytes.len(),
    }
}

fn recv(slot: &[u8], max_sge: u32) {
    let wr = match wqe::decode_recv(slot, max_sge) {
        Ok(wr) => wr,
        Err(err) => {
            let _ = err.to_string();
            return;
        }
    };
    assert!(wr.sges.len() as u64 <= u64::from(max_sge));
    let sges: Vec<Sge> = wr.sges.iter().collect();
    let total: u64 = sges.iter().map(|s| u64::from(s.length.get())).sum();
    assert_eq!(total, u64::from(wr.byte_len));

    let mut buf = vec![0u8; slot.len()];
    let n = wqe::encode_recv(&mut buf, wr.wr_id, &sges).expect("re-encoding a decoded receive");
    assert_eq!(
        n,
        wqe::RECV_HEADER_SIZE as usize + sges.len() * wqe::SGE_SIZE as usize
    );
    assert_eq!(
        &buf[..n],
        &slot[..n],
        "re-encoded receive differs from the slot"
    );
    let again = wqe::decode_recv(&buf[..n], max_sge).expect("decoding a re-encoded receive");
    assert_eq!(again.wr_id, wr.wr_id);
    assert_eq!(again.byte_len, wr.byte_len);
    assert_eq!(again.sges, wr.sges);
    assert!(again.sges.iter().eq(sges.iter().copied()));

    let mut short = vec![0u8; n - 1];
    assert!(matches!(
        wqe::encode_recv(&mut short, wr.wr_id, &sges),
        Err(DecodeError::Truncated { need, got, .. }) if need == n && got == n - 1
    ));
}
