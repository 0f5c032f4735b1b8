//! Packet sequence numbers: 24-bit, compared within half their space (IBA 9.7.1).

use vrdma_proto::config::Mtu;

use crate::model::objects::Qp;

/// PSNs are 24 bits.
pub const PSN_MASK: u32 = vrdma_roce::MAX_24;

/// PSN `a + n`, modulo 2^24.
pub fn psn_add(a: u32, n: u32) -> u32 {
    a.wrapping_add(n) & PSN_MASK
}

/// `a - b` as a signed distance in PSN space (the IBA's half-window comparison).
pub fn psn_diff(a: u32, b: u32) -> i32 {
    let d = a.wrapping_sub(b) & PSN_MASK;
    if d >= 1 << 23 {
        d as i32 - (1 << 24)
    } else {
        d as i32
    }
}

/// The path MTU of `qp`, in payload bytes per packet.
pub fn mtu_of(qp: &Qp) -> u32 {
    Mtu::from_raw(qp.attr.path_mtu)
        .map(Mtu::bytes)
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psn_arithmetic_wraps_at_24_bits() {
        assert_eq!(psn_add(PSN_MASK, 1), 0);
        assert_eq!(psn_add(5, PSN_MASK), 4);
        assert_eq!(psn_diff(0, PSN_MASK), 1);
        assert_eq!(psn_diff(PSN_MASK, 0), -1);
        assert_eq!(psn_diff(10, 3), 7);
        assert_eq!(psn_diff(3, 10), -7);
    }
}
