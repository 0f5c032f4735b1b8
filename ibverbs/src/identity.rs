//! How a vrdma port presents itself to programs written for InfiniBand.
//!
//! vrdma ports are RoCEv2 ports: their address is a GID (an IPv4-mapped or IPv6 address),
//! and the device needs a GID in every address vector. Programs such as perftest and qperf,
//! though, connect with LIDs unless told a GID index (`-x`, `-g`), and on an Ethernet link
//! layer perftest insists on RoCE GID discovery through sysfs. So the shim reports an
//! InfiniBand link layer with a LID derived from the GID, and turns a LID back into a GID
//! when an address vector has no GRH:
//!
//! * the LID is the low 16 bits of the GID (for `10.0.3.7`, LID 0x0307);
//! * a LID resolves to the local GID with its low 16 bits replaced, so every port with
//!   the same upper 112 bits (the same IPv4 /16, or IPv6 /112) is reachable by LID, as
//!   ports of one InfiniBand subnet are;
//! * address vectors with a GRH (`is_global`) use their GID as given, so peers outside the
//!   /16 are reachable by GID.
//!
//! A GID whose low 16 bits are 0 or in the multicast LID range (0xC000 and up) has no valid
//! unicast LID; its port reports LID 0 and must be addressed by GID.

use vrdma_proto::Gid;

/// The first multicast LID: unicast LIDs are 1..=0xBFFF.
const MULTICAST_LID_BASE: u16 = 0xC000;

/// The LID a port with this GID reports, or 0 if its low 16 bits are not a unicast LID.
pub fn lid_of(gid: &Gid) -> u16 {
    let lid = u16::from_be_bytes([gid.0[14], gid.0[15]]);
    if lid == 0 || lid >= MULTICAST_LID_BASE {
        0
    } else {
        lid
    }
}

/// The GID of the port with LID `dlid` in `local`'s subnet, or `None` for a LID that names
/// no unicast port.
pub fn gid_of_lid(local: &Gid, dlid: u16) -> Option<Gid> {
    if dlid == 0 || dlid >= MULTICAST_LID_BASE {
        return None;
    }
    let mut gid = *local;
    gid.0[14..16].copy_from_slice(&dlid.to_be_bytes());
    Some(gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lid_is_the_gids_low_16_bits_and_resolves_back_within_the_subnet() {
        let a = Gid::from_ipv4([10, 0, 3, 7]);
        assert_eq!(lid_of(&a), 0x0307);
        let b = Gid::from_ipv4([10, 0, 0, 2]);
        assert_eq!(gid_of_lid(&a, lid_of(&b)), Some(b));
        assert_eq!(gid_of_lid(&a, lid_of(&a)), Some(a));
    }

    #[test]
    fn gids_without_a_unicast_lid_report_lid_zero_and_lid_zero_resolves_to_nothing() {
        assert_eq!(lid_of(&Gid::from_ipv4([10, 0, 0, 0])), 0);
        assert_eq!(lid_of(&Gid::from_ipv4([10, 0, 0xc0, 1])), 0);
        let a = Gid::from_ipv4([10, 0, 0, 1]);
        assert_eq!(gid_of_lid(&a, 0), None);
        assert_eq!(gid_of_lid(&a, 0xc001), None);
    }
}
