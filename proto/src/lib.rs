//! The vrdma wire protocol, version 1.
//!
//! Everything the guest driver (crate `vrdma`) and the device (`vhost-user-rdma`) exchange is
//! defined here: the virtio identity of the device, its configuration space, the control
//! commands, the work-queue and completion layouts and the rings that carry them. The
//! normative text is `docs/protocol.md`; this crate is its executable form.
//!
//! Every wire type is `#[repr(C)]` over little-endian byte-array integers, so it has alignment
//! 1, no padding and the same bytes on every host. Types are copied out of untrusted memory
//! before they are checked (a guest can rewrite shared memory between a check and a use), and
//! every decoder returns [`DecodeError`] rather than panicking.
//!
//! Handles that appear in these types (PD, CQ, QP numbers, lkeys, rkeys, AH handles) are
//! virtual numbers the device allocates. They are never host pointers or NIC numbers, which is
//! what lets a VM migrate to a host with another NIC and keeps one VM from naming another's
//! objects.
#![no_std]
#![forbid(unsafe_code)]

#[macro_use]
mod macros;

pub mod cmd;
pub mod config;
pub mod cqe;
pub mod doorbell;
pub mod event;
pub mod mr;
pub mod qp;
pub mod queue;
pub mod ring;
pub mod wqe;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The virtio device ID the virtio specification reserves for RDMA devices.
///
/// `virtio-bindings` does not define it, so it lives here.
pub const VIRTIO_ID_RDMA: u32 = 42;

/// The protocol version this crate speaks, reported in [`config::Config::version`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The device-specific feature bits (virtio feature bits 0 to 23).
///
/// `VIRTIO_F_VERSION_1` (bit 32) is mandatory as well: the device offers it and a driver that
/// does not accept it is refused at `FEATURES_OK`. So is [`features::SYNC_RECV`] once the
/// device offers it.
pub mod features {
    /// Unreliable datagram QPs (`qp::Type::Ud`) are supported.
    pub const UD: u64 = 1 << 0;
    /// `ATOMIC_CMP_AND_SWP` and `ATOMIC_FETCH_AND_ADD` are supported.
    pub const ATOMICS: u64 = 1 << 1;
    /// Send work requests may carry inline data.
    pub const INLINE_DATA: u64 = 1 << 2;
    /// The device has more than one doorbell queue (`config::Config::num_doorbell_queues`).
    pub const MULTI_DOORBELL: u64 = 1 << 3;
    /// Completion-queue notification through the event queue (`event::Kind::CqCompletion`).
    pub const CQ_NOTIFY: u64 = 1 << 4;
    /// Shared receive queues: the `*_SRQ` commands, `CREATE_QP` with an SRQ, SRQ doorbells
    /// and the SRQ events; the configuration space's `srq` limits are valid.
    pub const SRQ: u64 = 1 << 5;
    /// The device posts receives to its fabric ahead of arrival: after publishing receives on
    /// a QP's receive ring the driver sends `POST_RECV` naming the QP (after posting to an SRQ,
    /// `POST_SRQ_RECV` naming the SRQ), and the receives are posted when it returns. A device
    /// whose fabric is an RDMA NIC cannot wait for a message to look at the ring, since the NIC
    /// drops what arrives with no receive posted; a doorbell would not do either, being
    /// asynchronous: a peer answering the guest's post could overtake it. So the device offers
    /// this bit and refuses a driver that does not accept it.
    pub const SYNC_RECV: u64 = 1 << 6;
    /// `VIRTIO_F_VERSION_1`, required.
    pub const VERSION_1: u64 = 1 << 32;

    /// Every device-specific bit this version defines; the device never offers others.
    pub const ALL_DEVICE: u64 =
        UD | ATOMICS | INLINE_DATA | MULTI_DOORBELL | CQ_NOTIFY | SRQ | SYNC_RECV;
}

/// A 128-bit global identifier, in network byte order as in `ibv_gid`.
///
/// For RoCEv2 it is an IPv6 address or an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// The IPv4-mapped GID for `a.b.c.d`, as RoCEv2 derives it from an IPv4 address.
    pub const fn from_ipv4(addr: [u8; 4]) -> Self {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12] = addr[0];
        gid[13] = addr[1];
        gid[14] = addr[2];
        gid[15] = addr[3];
        Gid(gid)
    }

    /// The IPv4 address if this is an IPv4-mapped GID.
    pub fn to_ipv4(&self) -> Option<[u8; 4]> {
        let g = &self.0;
        if g[..10].iter().all(|&b| b == 0) && g[10] == 0xff && g[11] == 0xff {
            Some([g[12], g[13], g[14], g[15]])
        } else {
            None
        }
    }

    /// The node GUID of the device whose port has this GID (host order; its big-endian
    /// bytes are the GUID). An IPv4-mapped GID gives `02:56:52:44` ("VRD", locally
    /// administered) followed by the IPv4 address; an IPv6 GID gives its interface
    /// identifier, as RoCE NICs derive their GUID from the MAC address in their link-local
    /// GID. So a VM keeps its GUID when it moves to another host, and two daemons' VMs never
    /// share one.
    pub fn node_guid(&self) -> u64 {
        match self.to_ipv4() {
            Some(v4) => 0x0256_5244_0000_0000 | u64::from(u32::from_be_bytes(v4)),
            None => {
                let mut id = [0u8; 8];
                id.copy_from_slice(&self.0[8..16]);
                u64::from_be_bytes(id)
            }
        }
    }

    /// Whether this is the all-zero GID, which never names a port.
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }
}

impl core::fmt::Debug for Gid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(self, f)
    }
}

/// Printed as eight colon-separated groups of four hex digits, as `ibv_devinfo -v` does.
impl core::fmt::Display for Gid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, pair) in self.0.chunks_exact(2).enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{:02x}{:02x}", pair[0], pair[1])?;
        }
        Ok(())
    }
}

/// Why bytes from the other side were not accepted.
///
/// The device answers a command that fails to decode with the [`cmd::Status`] that its
/// `From<DecodeError>` implementation gives (`UnknownOpcode` for an unknown command opcode,
/// `Malformed` for everything else) and a work request with a `cqe::Status` error completion;
/// it never trusts a partially decoded value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the layout needs.
    #[error("{what} is truncated: {need} bytes needed, {got} given")]
    Truncated {
        /// The structure being decoded.
        what: &'static str,
        /// Bytes the layout needs.
        need: usize,
        /// Bytes that were there.
        got: usize,
    },
    /// More bytes than the layout allows (a body must be exactly its command's size).
    #[error("{what} has {extra} unexpected trailing bytes")]
    Trailing {
        /// The structure being decoded.
        what: &'static str,
        /// Bytes beyond the end of the layout.
        extra: usize,
    },
    /// An enumerated field holds a value this protocol version does not define.
    #[error("{field} has unknown value {value:#x}")]
    UnknownValue {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A flags field has bits this protocol version does not define.
    #[error("{field} has undefined bits {bits:#x} set")]
    ReservedBits {
        /// The field.
        field: &'static str,
        /// The undefined bits that were set.
        bits: u64,
    },
    /// A reserved field is not zero.
    #[error("reserved field {field} is not zero")]
    ReservedNonZero {
        /// The field.
        field: &'static str,
    },
    /// A count exceeds the limit that applies to it.
    #[error("{field} is {value}, more than the limit {max}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The largest value allowed here.
        max: u64,
    },
    /// A length or address computation would overflow 64 bits.
    #[error("{field} overflows when added to its base")]
    Overflow {
        /// The field.
        field: &'static str,
    },
    /// A field is not aligned as the operation requires.
    #[error("{field} ({value:#x}) is not aligned to {align} bytes")]
    Misaligned {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The alignment required.
        align: u64,
    },
    /// Fields are individually valid but contradict each other.
    #[error("{field}: {reason}")]
    Inconsistent {
        /// The field found at fault.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Copies a fixed-size wire struct from the front of `bytes`.
///
/// Copying (rather than referencing) is deliberate: the source may be guest memory that the
/// guest can change while the device is still looking at it.
pub(crate) fn read_prefix<'a, T: FromBytes + KnownLayout + Immutable>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<(T, &'a [u8]), DecodeError> {
    T::read_from_prefix(bytes).map_err(|_| DecodeError::Truncated {
        what,
        need: core::mem::size_of::<T>(),
        got: bytes.len(),
    })
}

/// Copies a fixed-size wire struct that must fill `bytes` exactly.
pub(crate) fn read_exact<T: FromBytes + KnownLayout + Immutable>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, DecodeError> {
    let (value, rest) = read_prefix::<T>(bytes, what)?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing {
            what,
            extra: rest.len(),
        });
    }
    Ok(value)
}

/// Fails with [`DecodeError::ReservedNonZero`] unless every byte is zero.
pub(crate) fn check_reserved(bytes: &[u8], field: &'static str) -> Result<(), DecodeError> {
    if bytes.iter().all(|&b| b == 0) {
        Ok(())
    } else {
        Err(DecodeError::ReservedNonZero { field })
    }
}

/// An error with all of its causes, displayed `outer: inner: innermost`: what the daemon and
/// the guest library print for operators, so a message names the cause at every level.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn core::error::Error + 'static));

impl core::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
