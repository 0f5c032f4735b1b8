//! Events the device puts on the event queue.
//!
//! The driver keeps the event queue stocked with device-writable buffers of at least
//! [`SIZE`] bytes; each used buffer holds one [`Event`]. When no buffer is available the device
//! keeps completion notifications pending per CQ (one per CQ; later ones merge into it, as a
//! hardware CQ's event does) and asynchronous events in a bounded queue, and delivers them when
//! buffers arrive.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{DecodeError, check_reserved, read_prefix};

/// Size of one [`Event`].
pub const SIZE: usize = 8;

wire_enum! {
    /// Event kinds. Values below 0x100 are those of `ibv_event_type`.
    pub enum Kind: u16 as "event kind" {
        /// CQ `handle` overran or its ring became unusable (`IBV_EVENT_CQ_ERR`).
        CqErr = 0,
        /// QP `handle` went to the error state for a reason not tied to one work request
        /// (`IBV_EVENT_QP_FATAL`), e.g. its ring was corrupted.
        QpFatal = 1,
        /// QP `handle`: a peer reported an invalid request (`IBV_EVENT_QP_REQ_ERR`).
        QpReqErr = 2,
        /// QP `handle`: a peer's request violated access rights (`IBV_EVENT_QP_ACCESS_ERR`).
        QpAccessErr = 3,
        /// QP `handle` received its first packet in RTR (`IBV_EVENT_COMM_EST`).
        CommEst = 4,
        /// QP `handle` in SQD has drained its send queue (`IBV_EVENT_SQ_DRAINED`).
        SqDrained = 5,
        /// The device failed; every object is unusable (`IBV_EVENT_DEVICE_FATAL`).
        DeviceFatal = 8,
        /// Port `handle` became active (`IBV_EVENT_PORT_ACTIVE`).
        PortActive = 9,
        /// Port `handle` went down (`IBV_EVENT_PORT_ERR`).
        PortErr = 10,
        /// SRQ `handle` is unusable: its ring overran or its memory is gone
        /// (`IBV_EVENT_SRQ_ERR`).
        SrqErr = 14,
        /// SRQ `handle` holds fewer receives than the limit it was armed with; the SRQ is
        /// disarmed (`IBV_EVENT_SRQ_LIMIT_REACHED`).
        SrqLimitReached = 15,
        /// QP `handle`, attached to an SRQ, is in ERR and will take no more receives from it;
        /// the receive it held, if any, has been flushed (`IBV_EVENT_QP_LAST_WQE_REACHED`).
        QpLastWqeReached = 16,
        /// CQ `handle` was armed and has a matching completion.
        CqCompletion = 0x100,
    }
}

/// One event.
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
pub struct Event {
    /// Raw [`Kind`].
    pub kind: U16,
    /// Reserved, zero.
    pub reserved: U16,
    /// The CQ, QP, SRQ or port the event is about.
    pub handle: U32,
}

impl Event {
    /// An event of `kind` about `handle`.
    pub fn new(kind: Kind, handle: u32) -> Self {
        Event {
            kind: kind.raw().into(),
            reserved: 0.into(),
            handle: handle.into(),
        }
    }

    /// Copies and checks an event (the driver's side).
    pub fn decode(bytes: &[u8]) -> Result<(Kind, u32), DecodeError> {
        let (event, _) = read_prefix::<Event>(bytes, "event")?;
        check_reserved(event.reserved.as_bytes(), "event reserved")?;
        Ok((Kind::from_raw(event.kind.get())?, event.handle.get()))
    }
}
