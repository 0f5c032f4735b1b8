//! Helpers shared by the integration tests: a tiny PRNG, a reference ICRC written
//! independently of the crate, and real IP/UDP header bytes to feed it.
#![allow(dead_code)] // each test crate uses a different subset

use std::net::{Ipv4Addr, Ipv6Addr};

use vrdma_roce::icrc::{Ip, IpUdp};

/// xorshift64*: deterministic, no dependency, good enough to pick test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    pub fn u16(&mut self) -> u16 {
        (self.next_u64() >> 48) as u16
    }

    pub fn u8(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    pub fn bool(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    /// Uniform in `0..n` (n > 0), bias irrelevant here.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.u8()).collect()
    }
}

/// Linux's `crc32_le(seed, data)` one bit at a time: the reflected CRC-32 register update with
/// polynomial 0xEDB88320 and no pre- or post-inversion (those are the caller's business).
pub fn crc32_le_bitwise(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let lsb = crc & 1;
            crc >>= 1;
            if lsb != 0 {
                crc ^= 0xedb8_8320;
            }
        }
    }
    crc
}

/// The seed rxe starts from: the register after 8 bytes of 0xFF (the masked LRH) from ~0.
pub const RXE_SEED: u32 = 0xdebb_20e3;

/// The fields of the IP header that the ICRC masks, which the crate's `IpUdp` does not carry;
/// the reference puts arbitrary values in them to show they do not matter.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub tos_or_tclass: u8,
    pub ttl_or_hop_limit: u8,
    pub flow_label: u32,
    pub udp_checksum: u16,
}

impl Variant {
    pub const ZERO: Variant = Variant {
        tos_or_tclass: 0,
        ttl_or_hop_limit: 64,
        flow_label: 0,
        udp_checksum: 0,
    };

    pub fn random(rng: &mut Rng) -> Self {
        Variant {
            tos_or_tclass: rng.u8(),
            ttl_or_hop_limit: rng.u8(),
            flow_label: rng.u32() & 0xf_ffff,
            udp_checksum: rng.u16(),
        }
    }
}

/// The one's-complement checksum of an IPv4 header (checksum field zero on input).
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The real IP and UDP header bytes of a datagram of `udp_payload_len` bytes, with the
/// variant fields as given (IPv4 header checksum computed properly).
pub fn ip_udp_bytes(headers: &IpUdp, variant: Variant, udp_payload_len: usize) -> Vec<u8> {
    let udp_len = (udp_payload_len + 8) as u16;
    let mut out = Vec::new();
    match headers.ip {
        Ip::V4 {
            src,
            dst,
            id,
            flags_frag,
        } => {
            let total = udp_len + 20;
            let mut ip = vec![0x45, variant.tos_or_tclass];
            ip.extend(total.to_be_bytes());
            ip.extend(id.to_be_bytes());
            ip.extend(flags_frag.to_be_bytes());
            ip.extend([variant.ttl_or_hop_limit, 17, 0, 0]);
            ip.extend(src.octets());
            ip.extend(dst.octets());
            let sum = ipv4_checksum(&ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            out.extend(ip);
        }
        Ip::V6 { src, dst } => {
            let first =
                (6u32 << 28) | (u32::from(variant.tos_or_tclass) << 20) | variant.flow_label;
            out.extend(first.to_be_bytes());
            out.extend(udp_len.to_be_bytes());
            out.extend([17, variant.ttl_or_hop_limit]);
            out.extend(src.octets());
            out.extend(dst.octets());
        }
    }
    out.extend(headers.src_port.to_be_bytes());
    out.extend(headers.dst_port.to_be_bytes());
    out.extend(udp_len.to_be_bytes());
    out.extend(variant.udp_checksum.to_be_bytes());
    out
}

/// The ICRC the way rxe_icrc.c computes it: copy the real IP+UDP+BTH headers, overwrite the
/// variant fields with ones (IPv4: tos, ttl, check; IPv6: the 4-bit priority, the 3 flow-label
/// bytes, hop limit; UDP check; BTH byte 4), run `crc32_le` from the seed 0xdebb20e3 over that
/// and then over the rest of the datagram up to the ICRC, complement, and store the `u32`
/// in host (little-endian) order. Returns the 4 ICRC bytes.
pub fn reference_icrc(ip_udp: &[u8], is_v6: bool, covered: &[u8]) -> [u8; 4] {
    let mut pseudo = ip_udp.to_vec();
    if is_v6 {
        pseudo[0] |= 0x0f; // priority (low nibble of byte 0 in the kernel's bitfield)
        pseudo[1] = 0xff; // flow_lbl[0..3]
        pseudo[2] = 0xff;
        pseudo[3] = 0xff;
        pseudo[7] = 0xff; // hop_limit
    } else {
        pseudo[1] = 0xff; // tos
        pseudo[8] = 0xff; // ttl
        pseudo[10] = 0xff; // check
        pseudo[11] = 0xff;
    }
    let udp = pseudo.len() - 8;
    pseudo[udp + 6] = 0xff;
    pseudo[udp + 7] = 0xff;
    let bth_len = covered.len().min(12);
    let mut bth = covered[..bth_len].to_vec();
    if bth.len() > 4 {
        bth[4] = 0xff; // resv8a
    }
    pseudo.extend(&bth);
    let crc = crc32_le_bitwise(RXE_SEED, &pseudo);
    let crc = crc32_le_bitwise(crc, &covered[bth_len..]);
    (!crc).to_le_bytes()
}

/// `reference_icrc` for a description and arbitrary variant fields.
pub fn reference_icrc_for(headers: &IpUdp, variant: Variant, covered: &[u8]) -> [u8; 4] {
    let ip_udp = ip_udp_bytes(headers, variant, covered.len() + 4);
    reference_icrc(&ip_udp, matches!(headers.ip, Ip::V6 { .. }), covered)
}

/// A fixed IPv4 description used by tests that do not care about addresses.
pub fn v4() -> IpUdp {
    IpUdp {
        ip: Ip::V4 {
            src: Ipv4Addr::new(192, 168, 10, 1),
            dst: Ipv4Addr::new(192, 168, 10, 2),
            id: 0,
            flags_frag: vrdma_roce::icrc::IPV4_DF,
        },
        src_port: 0xc001,
        dst_port: vrdma_roce::UDP_PORT,
    }
}

/// A fixed IPv6 description.
pub fn v6() -> IpUdp {
    IpUdp {
        ip: Ip::V6 {
            src: "fd00::1".parse::<Ipv6Addr>().unwrap(),
            dst: "fd00::2".parse::<Ipv6Addr>().unwrap(),
        },
        src_port: 0xc002,
        dst_port: vrdma_roce::UDP_PORT,
    }
}

/// A random description, IPv4 or IPv6.
pub fn random_ip_udp(rng: &mut Rng) -> IpUdp {
    let ip = if rng.bool() {
        Ip::V4 {
            src: Ipv4Addr::from(rng.u32()),
            dst: Ipv4Addr::from(rng.u32()),
            id: rng.u16(),
            flags_frag: rng.u16(),
        }
    } else {
        Ip::V6 {
            src: Ipv6Addr::from(u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())),
            dst: Ipv6Addr::from(u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())),
        }
    };
    IpUdp {
        ip,
        src_port: rng.u16(),
        dst_port: rng.u16(),
    }
}
