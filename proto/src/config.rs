//! The device configuration space: what a driver reads before it sends any command.
//!
//! The layout is fixed for protocol version 1 and read-only for the driver. The device fills
//! it from the limits the operator configured for this VM, so `DeviceCaps` already reflects the
//! VM's quotas (a VM allowed 64 QPs sees `max_qp == 64`).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{DecodeError, check_reserved, read_prefix};

wire_enum! {
    /// The logical state of a port, as `ibv_port_state`.
    pub enum PortState: u8 as "port state" {
        /// No state change.
        Nop = 0,
        /// The link is down.
        Down = 1,
        /// The link is initialising.
        Init = 2,
        /// The link is armed.
        Armed = 3,
        /// The link is usable.
        Active = 4,
        /// Active, with a deferred state change pending.
        ActiveDefer = 5,
    }
}

wire_enum! {
    /// A path MTU, as `ibv_mtu`.
    pub enum Mtu: u8 as "mtu" {
        /// 256 bytes.
        Mtu256 = 1,
        /// 512 bytes.
        Mtu512 = 2,
        /// 1024 bytes.
        Mtu1024 = 3,
        /// 2048 bytes.
        Mtu2048 = 4,
        /// 4096 bytes.
        Mtu4096 = 5,
    }
}

impl Mtu {
    /// The MTU in bytes.
    pub const fn bytes(self) -> u32 {
        256 << (self as u32 - 1)
    }
}

wire_enum! {
    /// How the port's link is carried, as `IBV_LINK_LAYER_*`.
    pub enum LinkLayer: u8 as "link layer" {
        /// Not reported.
        Unspecified = 0,
        /// InfiniBand.
        Infiniband = 1,
        /// Ethernet (RoCE); vrdma ports are always this.
        Ethernet = 2,
    }
}

wire_enum! {
    /// Which atomic operations are atomic with respect to what, as `ibv_atomic_cap`.
    pub enum AtomicCap: u8 as "atomic capability" {
        /// No atomics.
        None = 0,
        /// Atomic with respect to other atomics through this device.
        Hca = 1,
        /// Atomic with respect to every access, including the CPU's.
        Glob = 2,
    }
}

wire_enum! {
    /// The type of a GID table entry, as `ibv_gid_type`.
    pub enum GidType: u8 as "gid type" {
        /// InfiniBand.
        Ib = 0,
        /// RoCE version 1 (Ethernet, no IP).
        RoceV1 = 1,
        /// RoCE version 2 (UDP encapsulation); every vrdma GID is this type.
        RoceV2 = 2,
    }
}

/// Device attributes, the `ibv_device_attr` subset vrdma implements.
///
/// Limits are per VM: the device derives them from that VM's configured quotas.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct DeviceCaps {
    /// Node GUID, unique per VM's device.
    pub node_guid: U64,
    /// System image GUID.
    pub sys_image_guid: U64,
    /// The largest single memory region, in bytes.
    pub max_mr_size: U64,
    /// Bit `n` set means pages of `2^n` bytes may back a memory region.
    pub page_size_cap: U64,
    /// The most bytes this VM may have registered at once, over all its MRs.
    pub max_registered_bytes: U64,
    /// IEEE vendor ID.
    pub vendor_id: U32,
    /// Vendor part ID.
    pub vendor_part_id: U32,
    /// Hardware (here: device model) version.
    pub hw_ver: U32,
    /// Most QPs.
    pub max_qp: U32,
    /// Most outstanding work requests on one send or receive queue.
    pub max_qp_wr: U32,
    /// Most scatter/gather entries in one work request.
    pub max_sge: U32,
    /// Most CQs.
    pub max_cq: U32,
    /// Most entries in one CQ.
    pub max_cqe: U32,
    /// Most MRs.
    pub max_mr: U32,
    /// Most PDs.
    pub max_pd: U32,
    /// Most AHs.
    pub max_ah: U32,
    /// Most RDMA READ and atomic requests a QP accepts as responder at once.
    pub max_qp_rd_atom: U32,
    /// Most RDMA READ and atomic requests a QP has outstanding as requester.
    pub max_qp_init_rd_atom: U32,
    /// Most inline bytes in one send work request.
    pub max_inline_data: U32,
    /// Most page addresses in one `REG_MR` page list.
    pub max_mr_pages: U32,
    /// Raw [`AtomicCap`].
    pub atomic_cap: u8,
    /// Number of ports; always 1 in version 1.
    pub phys_port_cnt: u8,
    /// Reserved, zero.
    pub reserved: [u8; 2],
}

impl DeviceCaps {
    /// Copies and checks device attributes (the driver's side of `QUERY_DEVICE` and the
    /// config space): enumerations must be known and reserved bytes zero.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (caps, _) = read_prefix::<Self>(bytes, "device capabilities")?;
        AtomicCap::from_raw(caps.atomic_cap)?;
        check_reserved(&caps.reserved, "device capabilities reserved")?;
        Ok(caps)
    }
}

/// Port attributes, the `ibv_port_attr` subset that applies to a RoCE port.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct PortAttr {
    /// Raw [`PortState`].
    pub state: u8,
    /// Raw [`Mtu`]: the largest the port supports.
    pub max_mtu: u8,
    /// Raw [`Mtu`]: the one in use.
    pub active_mtu: u8,
    /// Raw [`LinkLayer`].
    pub link_layer: u8,
    /// Entries in the GID table.
    pub gid_tbl_len: U16,
    /// Entries in the P_Key table.
    pub pkey_tbl_len: U16,
    /// `IBV_PORT_*` capability flags.
    pub port_cap_flags: U32,
    /// The largest message, in bytes.
    pub max_msg_sz: U32,
    /// Base LID; 0 on RoCE.
    pub lid: U16,
    /// Subnet manager LID; 0 on RoCE.
    pub sm_lid: U16,
    /// `IBV_WIDTH_*`.
    pub active_width: u8,
    /// `IBV_SPEED_*`.
    pub active_speed: u8,
    /// Physical port state (5 = LinkUp).
    pub phys_state: u8,
    /// Reserved, zero.
    pub reserved: u8,
}

impl PortAttr {
    /// Copies and checks port attributes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (attr, _) = read_prefix::<Self>(bytes, "port attributes")?;
        PortState::from_raw(attr.state)?;
        Mtu::from_raw(attr.max_mtu)?;
        Mtu::from_raw(attr.active_mtu)?;
        LinkLayer::from_raw(attr.link_layer)?;
        check_reserved(&[attr.reserved], "port attributes reserved")?;
        Ok(attr)
    }
}

/// Shared-receive-queue limits (the `ibv_device_attr` fields `max_srq`, `max_srq_wr` and
/// `max_srq_sge`), at the end of the configuration space.
///
/// They follow the rest of the space rather than being part of [`DeviceCaps`] so that no
/// offset of version 1 moves: a device that does not offer `features::SRQ` writes zeros
/// here (or ends its space before them), and a driver reads them only if it accepted the
/// feature.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct SrqCaps {
    /// Most SRQs.
    pub max_srq: U32,
    /// Most work requests one SRQ holds (largest ring depth); at most `ring::MAX_DEPTH`.
    pub max_srq_wr: U32,
    /// Most scatter/gather entries in one SRQ work request; at most `wqe::MAX_SGE`.
    pub max_srq_sge: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

impl SrqCaps {
    /// Copies and checks SRQ limits: within the protocol's bounds, reserved bytes zero.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (caps, _) = read_prefix::<Self>(bytes, "SRQ capabilities")?;
        check_reserved(caps.reserved.as_bytes(), "SRQ capabilities reserved")?;
        let bounds = [
            ("max_srq_wr", caps.max_srq_wr.get(), crate::ring::MAX_DEPTH),
            ("max_srq_sge", caps.max_srq_sge.get(), crate::wqe::MAX_SGE),
        ];
        for (field, value, max) in bounds {
            if value > max {
                return Err(DecodeError::TooLarge {
                    field,
                    value: value.into(),
                    max: max.into(),
                });
            }
        }
        Ok(caps)
    }
}

/// Bytes of the configuration space before [`Config::srq`]: all of it in version 1 as first
/// published, and all a device that does not offer `features::SRQ` need expose.
pub const BASE_CONFIG_SIZE: usize = core::mem::offset_of!(Config, srq);

/// The whole configuration space, read-only for the driver.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct Config {
    /// [`crate::PROTOCOL_VERSION`]; a driver that does not know it must not use the device.
    pub version: U32,
    /// Doorbell virtqueues the device serves (at least 1); see [`crate::queue`].
    pub num_doorbell_queues: U16,
    /// Reserved, zero.
    pub reserved: U16,
    /// Device attributes.
    pub caps: DeviceCaps,
    /// Attributes of port 1.
    pub port: PortAttr,
    /// GID index 0 of port 1, so a driver can address its peers without a command.
    pub gid: crate::Gid,
    /// Shared-receive-queue limits; zero unless the device offers `features::SRQ`.
    pub srq: SrqCaps,
}

impl Config {
    /// Copies and checks a configuration space image. An image of [`BASE_CONFIG_SIZE`] bytes
    /// (a device without SRQs that exposes only those) reads as one whose `srq` is zero.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut whole = [0u8; core::mem::size_of::<Config>()];
        let image = if bytes.len() == BASE_CONFIG_SIZE {
            whole[..BASE_CONFIG_SIZE].copy_from_slice(bytes);
            &whole[..]
        } else {
            bytes
        };
        let (config, _) = read_prefix::<Self>(image, "config space")?;
        if config.version.get() != crate::PROTOCOL_VERSION {
            return Err(DecodeError::UnknownValue {
                field: "config version",
                value: config.version.get().into(),
            });
        }
        if config.num_doorbell_queues.get() == 0 {
            return Err(DecodeError::Inconsistent {
                field: "num_doorbell_queues",
                reason: "a device needs at least one doorbell queue",
            });
        }
        if config.num_doorbell_queues.get() > crate::queue::MAX_DOORBELL_QUEUES {
            return Err(DecodeError::TooLarge {
                field: "num_doorbell_queues",
                value: config.num_doorbell_queues.get().into(),
                max: crate::queue::MAX_DOORBELL_QUEUES.into(),
            });
        }
        check_reserved(config.reserved.as_bytes(), "config reserved")?;
        DeviceCaps::decode(config.caps.as_bytes())?;
        PortAttr::decode(config.port.as_bytes())?;
        SrqCaps::decode(config.srq.as_bytes())?;
        Ok(config)
    }
}
