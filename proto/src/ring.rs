//! The shared rings that carry work requests and completions.
//!
//! Each send queue, receive queue and completion queue is a ring in guest memory that the
//! driver allocates and names when it creates the QP or CQ. A ring is a 128-byte [`Header`]
//! followed by `depth` entries of `stride` bytes; `depth` and `stride` are powers of two.
//!
//! Indices are free-running 32-bit counters: entry `i` lives in slot `i & (depth - 1)`, the ring
//! holds `producer - consumer` entries (wrapping subtraction), it is empty when they are equal
//! and full when that difference is `depth`. Exactly one side writes each index:
//!
//! | ring | producer written by | consumer written by |
//! |------|---------------------|---------------------|
//! | send, receive | driver | device |
//! | completion | device | driver |
//!
//! Ordering (the rxe rings' rule): the producer writes an entry, then stores the producer index
//! with release ordering; the consumer loads the producer index with acquire ordering before it
//! reads entries, and stores the consumer index with release ordering after it has finished
//! with them. The producer and consumer indices sit in different cache lines so the two sides
//! do not write the same line.
//!
//! A completion ring also carries the arm word (driver-written) and the notify acknowledgement
//! (device-written); see [`arm_word`].

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::DecodeError;

/// Bytes before the first entry.
pub const HEADER_SIZE: u64 = 128;
/// Alignment of a ring's base address.
pub const ALIGN: u64 = 64;
/// The deepest ring this protocol describes; devices advertise their own, smaller limits.
pub const MAX_DEPTH: u32 = 1 << 20;

/// Byte offset of the producer index.
pub const PRODUCER_OFFSET: u64 = 0;
/// Byte offset of the notify acknowledgement (completion rings).
pub const NOTIFY_ACK_OFFSET: u64 = 4;
/// Byte offset of the polling word (send rings; the same word as [`NOTIFY_ACK_OFFSET`] of a
/// completion ring): non-zero while the device will load the producer index again without a
/// doorbell, so the driver may skip ringing one. The device writes it; see the protocol
/// specification for the ordering both sides must follow.
pub const SEND_POLLING_OFFSET: u64 = 4;
/// Byte offset of the consumer index.
pub const CONSUMER_OFFSET: u64 = 64;
/// Byte offset of the arm word (completion rings).
pub const ARM_OFFSET: u64 = 68;

/// The ring header. Shown as a struct for its layout; the two sides access its words with
/// atomic loads and stores, never by copying the struct.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Header {
    /// Next index the producer will fill.
    pub producer: U32,
    /// Completion rings: the arm sequence the device last raised an event for.
    pub notify_ack: U32,
    /// Keeps the consumer's words out of the producer's cache line.
    pub pad0: [u8; 56],
    /// Next index the consumer will take.
    pub consumer: U32,
    /// Completion rings: the arm word, see [`arm_word`].
    pub arm: U32,
    /// Pads the header to [`HEADER_SIZE`].
    pub pad1: [u8; 56],
}

/// The sequence part of an arm word.
pub const ARM_SEQ_MASK: u32 = 0x7fff_ffff;
/// The arm word's "solicited only" bit.
pub const ARM_SOLICITED_ONLY: u32 = 1 << 31;

/// Builds the arm word the driver stores to arm a completion ring.
///
/// The ring is armed while the word's sequence differs from `notify_ack`. To arm, the driver
/// stores a sequence one past its previous one; when the device next writes a completion that
/// matches (any completion, or with `solicited_only` a solicited or error completion) it stores
/// that sequence in `notify_ack` and puts one `CqCompletion` event on the event queue.
///
/// Both sides store one word and then load the other's (the driver stores the arm word and
/// loads the producer index; the device stores the producer index and loads the arm word), so
/// each needs a full (sequentially consistent) fence between its store and its load; with the
/// fences at least one side sees the other's store and no completion is left without an event
/// or a poll.
pub const fn arm_word(sequence: u32, solicited_only: bool) -> u32 {
    (sequence & ARM_SEQ_MASK)
        | if solicited_only {
            ARM_SOLICITED_ONLY
        } else {
            0
        }
}

/// Splits an arm word into its sequence and its solicited-only bit.
pub const fn split_arm_word(word: u32) -> (u32, bool) {
    (word & ARM_SEQ_MASK, word & ARM_SOLICITED_ONLY != 0)
}

/// Checks a ring depth: a power of two from 1 to [`MAX_DEPTH`].
pub fn check_depth(depth: u32, field: &'static str) -> Result<(), DecodeError> {
    if depth == 0 || !depth.is_power_of_two() {
        return Err(DecodeError::Inconsistent {
            field,
            reason: "ring depth must be a power of two",
        });
    }
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooLarge {
            field,
            value: depth.into(),
            max: MAX_DEPTH.into(),
        });
    }
    Ok(())
}

/// Checks a ring's base address is [`ALIGN`]-aligned and not null.
pub fn check_base(addr: u64, field: &'static str) -> Result<(), DecodeError> {
    if addr == 0 {
        return Err(DecodeError::Inconsistent {
            field,
            reason: "ring address is null",
        });
    }
    if addr % ALIGN != 0 {
        return Err(DecodeError::Misaligned {
            field,
            value: addr,
            align: ALIGN,
        });
    }
    Ok(())
}

/// The shape of one ring, and its index arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    depth: u32,
    stride: u32,
}

/// A consumer found the producer index more than a ring's depth ahead of its own: the producer
/// wrote a value no correct producer can, so nothing in the ring can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "producer index {producer} is {ahead} entries ahead of consumer index {consumer}, more than the ring's {depth} slots"
)]
pub struct Overrun {
    /// The producer index read.
    pub producer: u32,
    /// The consumer index.
    pub consumer: u32,
    /// `producer - consumer`, wrapping.
    pub ahead: u32,
    /// The ring's depth.
    pub depth: u32,
}

impl Geometry {
    /// A ring of `depth` entries of `stride` bytes; both powers of two.
    pub fn new(depth: u32, stride: u32) -> Result<Self, DecodeError> {
        check_depth(depth, "ring depth")?;
        if stride == 0 || !stride.is_power_of_two() {
            return Err(DecodeError::Inconsistent {
                field: "ring stride",
                reason: "entry size must be a power of two",
            });
        }
        Ok(Geometry { depth, stride })
    }

    /// Entries in the ring.
    pub const fn depth(&self) -> u32 {
        self.depth
    }

    /// Bytes per entry.
    pub const fn stride(&self) -> u32 {
        self.stride
    }

    /// The slot that free-running index `index` maps to.
    pub const fn slot(&self, index: u32) -> u32 {
        index & (self.depth - 1)
    }

    /// Byte offset of entry `index` from the ring's base.
    pub const fn entry_offset(&self, index: u32) -> u64 {
        HEADER_SIZE + self.slot(index) as u64 * self.stride as u64
    }

    /// The ring's whole size in bytes, header included.
    pub const fn byte_len(&self) -> u64 {
        HEADER_SIZE + self.depth as u64 * self.stride as u64
    }

    /// Entries waiting between `consumer` and `producer`, or [`Overrun`] if `producer` is
    /// further ahead than any correct producer can be.
    pub const fn occupancy(&self, producer: u32, consumer: u32) -> Result<u32, Overrun> {
        let ahead = producer.wrapping_sub(consumer);
        if ahead > self.depth {
            Err(Overrun {
                producer,
                consumer,
                ahead,
                depth: self.depth,
            })
        } else {
            Ok(ahead)
        }
    }

    /// Free slots, or [`Overrun`] as for [`Geometry::occupancy`].
    pub const fn free(&self, producer: u32, consumer: u32) -> Result<u32, Overrun> {
        match self.occupancy(producer, consumer) {
            Ok(used) => Ok(self.depth - used),
            Err(e) => Err(e),
        }
    }
}
