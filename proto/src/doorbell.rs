//! Doorbells: how the driver tells the device that a ring has new entries.
//!
//! A doorbell descriptor on a doorbell queue is device-readable and holds 1 to [`MAX_BATCH`]
//! [`Doorbell`]s back to back, so one kick can cover work on many QPs. The device reads the
//! named ring's producer index itself; a doorbell carries no count, so a repeated or stale
//! doorbell is harmless.

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{DecodeError, check_reserved};

/// Size of one [`Doorbell`].
pub const SIZE: usize = 8;
/// The most doorbells in one descriptor.
pub const MAX_BATCH: usize = 64;

wire_enum! {
    /// Which ring a doorbell names.
    pub enum Kind: u8 as "doorbell kind" {
        /// The send ring of QP `handle` has new work requests.
        Send = 1,
        /// The receive ring of QP `handle` has new receives. Optional: the device reads the
        /// receive ring itself when a message arrives; this only makes the device look at a QP
        /// in the error state sooner, to flush the new receives.
        Recv = 2,
        /// The shared receive queue `handle` (an SRQ number, not a QP number) has new
        /// receives. Optional, and in this version a hint only: the device reads an SRQ's
        /// ring when a message arrives for a QP attached to it, and an SRQ's receives are
        /// never flushed, so there is nothing more for the device to do.
        Srq = 3,
    }
}

/// One doorbell.
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
pub struct Doorbell {
    /// Raw [`Kind`].
    pub kind: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
    /// QP number (`Send`, `Recv`) or SRQ number (`Srq`).
    pub handle: U32,
}

impl Doorbell {
    /// A doorbell of `kind` for QP (or, for `Srq`, SRQ) `handle`.
    pub fn new(kind: Kind, handle: u32) -> Self {
        Doorbell {
            kind: kind.raw(),
            reserved: [0; 3],
            handle: handle.into(),
        }
    }
}

/// Decodes a doorbell descriptor's bytes into `(kind, handle)` pairs.
///
/// The whole batch is checked before any doorbell is returned, so a malformed batch is
/// rejected whole rather than half obeyed.
pub fn decode_batch(bytes: &[u8]) -> Result<impl Iterator<Item = (Kind, u32)> + '_, DecodeError> {
    if bytes.is_empty() || bytes.len() % SIZE != 0 {
        return Err(DecodeError::Inconsistent {
            field: "doorbell batch",
            reason: "length is not a non-zero multiple of 8",
        });
    }
    if bytes.len() / SIZE > MAX_BATCH {
        return Err(DecodeError::TooLarge {
            field: "doorbell batch",
            value: (bytes.len() / SIZE) as u64,
            max: MAX_BATCH as u64,
        });
    }
    for chunk in bytes.chunks_exact(SIZE) {
        let db = Doorbell::read_from_bytes(chunk).unwrap_or_default();
        Kind::from_raw(db.kind)?;
        check_reserved(&db.reserved, "doorbell reserved")?;
    }
    Ok(bytes.chunks_exact(SIZE).filter_map(|chunk| {
        let db = Doorbell::read_from_bytes(chunk).ok()?;
        Some((Kind::from_raw(db.kind).ok()?, db.handle.get()))
    }))
}
