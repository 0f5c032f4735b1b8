//! The RoCEv2 invariant CRC (IBA annex A17.3.3, built on IBA 7.8.1).
//!
//! The ICRC is the Ethernet CRC-32 (reflected polynomial `0xEDB88320`, initial value all ones,
//! final complement) over the packet as an InfiniBand end node would see it, with every field
//! a network element may change replaced by ones:
//!
//! 1. 8 bytes of `0xFF` standing in for the LRH, which RoCEv2 does not have;
//! 2. the IP header with its variant fields set to ones: for IPv4 the TOS byte (DSCP and ECN),
//!    the TTL and the header checksum; for IPv6 the traffic class, the flow label and the hop
//!    limit. Everything else is covered, lengths, addresses and the IPv4 Identification and
//!    flags/fragment offset included;
//! 3. the UDP header with its checksum set to ones (ports and length are covered);
//! 4. the BTH with its byte 4 (FECN, BECN, resv6a: IBA's "resv8a") set to ones;
//! 5. the extension headers, the payload and the pad bytes.
//!
//! It is stored in the last 4 bytes of the UDP payload **least significant byte first**, the
//! way Ethernet stores its FCS: [`compute`]'s value `v` goes on the wire as `v.to_le_bytes()`.
//! Linux rxe does exactly this on little-endian hosts (it computes the complemented
//! `crc32_le` and stores the `u32` in host order), and a ConnectX-4 Lx capture in the tests
//! confirms it for hardware. Wireshark (4.0) displays the field as a big-endian number and
//! does not check it.
//!
//! # What the receiver must know
//!
//! The ICRC covers header fields a user-space UDP socket does not hand to the application.
//! [`IpUdp`] describes them; addresses and ports come from `recvmsg` (`IP_PKTINFO` /
//! `IPV6_RECVPKTINFO` for the local address), lengths follow from the datagram length
//! (this crate assumes an IPv4 header without options and an IPv6 header without extension
//! headers, as every RoCEv2 sender produces), and IPv6 has nothing else. IPv4 also has the
//! **Identification** field, which is covered and which the socket API never reports:
//!
//! - Linux gives ID 0 to datagrams sent with DF set on an *unconnected* UDP socket (connected
//!   sockets count from a random start), so a vrdma sender that uses an unconnected socket
//!   with `IP_MTU_DISCOVER = IP_PMTUDISC_DO` and computes its ICRC with ID 0 and flags
//!   [`IPV4_DF`] produces packets any receiver, rxe and NICs included, can verify;
//! - rxe builds its own IPv4 header and picks a hashed, unpredictable ID for every packet
//!   (`__ip_select_ident`). A receiver on a UDP socket therefore **cannot verify the ICRC of
//!   IPv4 packets from rxe** (it would reject every one as corrupt). It has to either learn
//!   the ID (a packet socket, `AF_PACKET`/XDP, instead of a UDP socket) or skip the check
//!   ([`crate::packet::IcrcCheck::Skip`]) and rely on the per-hop Ethernet FCS, which does not
//!   catch corruption inside a switch. (The ICRC is linear in the ID, so the ID could also be
//!   solved for from the received ICRC, leaving a 16-bit check; not implemented.) Over IPv6
//!   there is no such field and the ICRC is always checkable.
//!
//! rxe also sends UDP checksum 0; over IPv6 a Linux UDP socket drops zero-checksum datagrams
//! unless it sets `UDP_NO_CHECK6_RX`.

use core::net::{Ipv4Addr, Ipv6Addr};

/// Size of the ICRC on the wire.
pub const LEN: usize = 4;

/// The DF ("don't fragment") bit of the IPv4 flags/fragment-offset field, the value RoCEv2
/// senders use for that field.
pub const IPV4_DF: u16 = 0x4000;

/// Size of an IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// Size of an IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;
/// Size of a UDP header.
pub const UDP_HEADER_LEN: usize = 8;

const IPPROTO_UDP: u8 = 17;
const BTH_VARIANT_BYTE: usize = 4;

/// The IP header fields the ICRC covers, as the fabric knows them for a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ip {
    /// IPv4 without options. Total length is derived from the datagram length.
    V4 {
        /// Source address.
        src: Ipv4Addr,
        /// Destination address.
        dst: Ipv4Addr,
        /// The Identification field (see the module documentation).
        id: u16,
        /// Flags and fragment offset, as one big-endian field: [`IPV4_DF`] for RoCEv2.
        flags_frag: u16,
    },
    /// IPv6 without extension headers. Payload length is derived from the datagram length.
    V6 {
        /// Source address.
        src: Ipv6Addr,
        /// Destination address.
        dst: Ipv6Addr,
    },
}

/// The IP and UDP headers around a RoCEv2 datagram, minus what the ICRC masks or derives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpUdp {
    /// The IP header.
    pub ip: Ip,
    /// UDP source port (RoCEv2 senders vary it per QP for ECMP entropy).
    pub src_port: u16,
    /// UDP destination port, [`crate::UDP_PORT`] in practice.
    pub dst_port: u16,
}

impl IpUdp {
    /// The largest UDP payload these headers can carry: the IP length fields are 16 bits.
    pub const fn max_datagram(&self) -> usize {
        match self.ip {
            Ip::V4 { .. } => u16::MAX as usize - IPV4_HEADER_LEN - UDP_HEADER_LEN,
            Ip::V6 { .. } => u16::MAX as usize - UDP_HEADER_LEN,
        }
    }
}

/// The ICRC of a datagram whose UDP payload is `covered` followed by the 4 ICRC bytes:
/// `covered` is the BTH, the extension headers, the payload and the pad.
///
/// The value goes on the wire as `to_le_bytes()`. The IP and UDP lengths are computed from
/// `covered.len() + 4`; a datagram too long for them (see [`IpUdp::max_datagram`]) cannot
/// exist, and gets the ICRC of its lengths truncated to 16 bits. A `covered` shorter than a
/// BTH is hashed as it is.
pub fn compute(headers: &IpUdp, covered: &[u8]) -> u32 {
    let udp_len = covered.len() + LEN + UDP_HEADER_LEN;
    let mut crc = crc32fast::Hasher::new();
    // The LRH stand-in.
    crc.update(&[0xff; 8]);
    match headers.ip {
        Ip::V4 {
            src,
            dst,
            id,
            flags_frag,
        } => {
            let total = be16(udp_len + IPV4_HEADER_LEN);
            let [id_hi, id_lo] = id.to_be_bytes();
            let [ff_hi, ff_lo] = flags_frag.to_be_bytes();
            let [s0, s1, s2, s3] = src.octets();
            let [d0, d1, d2, d3] = dst.octets();
            crc.update(&[
                0x45, // version 4, 5 words: no options
                0xff, // TOS: DSCP and ECN are rewritten in the network
                total[0],
                total[1],
                id_hi,
                id_lo,
                ff_hi,
                ff_lo,
                0xff, // TTL
                IPPROTO_UDP,
                0xff, // header checksum
                0xff,
                s0,
                s1,
                s2,
                s3,
                d0,
                d1,
                d2,
                d3,
            ]);
        }
        Ip::V6 { src, dst } => {
            let payload = be16(udp_len);
            // Version 6, then traffic class (8 bits) and flow label (20 bits) all ones.
            crc.update(&[
                0x6f,
                0xff,
                0xff,
                0xff,
                payload[0],
                payload[1],
                IPPROTO_UDP,
                0xff,
            ]);
            crc.update(&src.octets());
            crc.update(&dst.octets());
        }
    }
    let [sp_hi, sp_lo] = headers.src_port.to_be_bytes();
    let [dp_hi, dp_lo] = headers.dst_port.to_be_bytes();
    let udp_len = be16(udp_len);
    crc.update(&[
        sp_hi, sp_lo, dp_hi, dp_lo, udp_len[0], udp_len[1], 0xff, 0xff,
    ]);

    // The BTH with its variant byte masked, then everything after it as is.
    match covered.split_at_checked(BTH_VARIANT_BYTE) {
        Some((before, [_, after @ ..])) => {
            crc.update(before);
            crc.update(&[0xff]);
            crc.update(after);
        }
        _ => crc.update(covered),
    }
    crc.finalize()
}

/// Whether the last 4 bytes of `datagram` (a whole UDP payload) are the ICRC of the rest.
/// A datagram shorter than the ICRC is not valid.
pub fn verify(headers: &IpUdp, datagram: &[u8]) -> bool {
    match datagram.split_last_chunk::<LEN>() {
        Some((covered, stored)) => compute(headers, covered) == u32::from_le_bytes(*stored),
        None => false,
    }
}

/// Writes the ICRC of `datagram` (a whole UDP payload, its last 4 bytes reserved for the ICRC)
/// into those last 4 bytes. Does nothing to a datagram shorter than the ICRC.
pub fn seal(headers: &IpUdp, datagram: &mut [u8]) {
    if let Some((covered, stored)) = datagram.split_last_chunk_mut::<LEN>() {
        *stored = compute(headers, covered).to_le_bytes();
    }
}

/// A length as a big-endian 16-bit IP/UDP length field (truncated: see [`compute`]).
fn be16(len: usize) -> [u8; 2] {
    (len as u16).to_be_bytes()
}
