//! Queue-pair types, states, attributes and the legal state transitions.
//!
//! The transition rules are those of `ib_modify_qp_is_ok` in Linux (the InfiniBand
//! specification's QP state diagram with its required and optional attributes), so a program
//! that works against a hardware RNIC works here and one that is rejected there is rejected
//! here. The driver may check them before sending `MODIFY_QP`; the device always checks them.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{DecodeError, Gid, check_reserved};

wire_enum! {
    /// QP transport type, with the values of `ibv_qp_type`.
    pub enum Type: u8 as "qp type" {
        /// Reliable connected.
        Rc = 2,
        /// Unreliable datagram.
        Ud = 4,
    }
}

wire_enum! {
    /// QP state, with the values of `ibv_qp_state`.
    pub enum State: u8 as "qp state" {
        /// Just created or reset; nothing is processed.
        Reset = 0,
        /// Receives may be posted; nothing is processed.
        Init = 1,
        /// Ready to receive.
        Rtr = 2,
        /// Ready to send.
        Rts = 3,
        /// Send queue drained: new sends wait.
        Sqd = 4,
        /// Send queue error (UD only): sends complete in error.
        Sqe = 5,
        /// Error: every outstanding and new WR completes with `WR_FLUSH_ERR`.
        Err = 6,
    }
}

wire_enum! {
    /// Path migration state, with the values of `ibv_mig_state`. vrdma has no alternate path,
    /// so a QP is always `Migrated`.
    pub enum MigState: u8 as "path migration state" {
        /// Migrated: the primary path is in use.
        Migrated = 0,
        /// Rearm.
        Rearm = 1,
        /// Armed.
        Armed = 2,
    }
}

bitflags::bitflags! {
    /// Which attributes a `MODIFY_QP` sets, with the bit values of `ibv_qp_attr_mask`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct AttrMask: u32 {
        /// `qp_state`.
        const STATE = 1 << 0;
        /// `cur_qp_state`.
        const CUR_STATE = 1 << 1;
        /// `en_sqd_async_notify`.
        const EN_SQD_ASYNC_NOTIFY = 1 << 2;
        /// `qp_access_flags`.
        const ACCESS_FLAGS = 1 << 3;
        /// `pkey_index`.
        const PKEY_INDEX = 1 << 4;
        /// `port_num`.
        const PORT = 1 << 5;
        /// `qkey`.
        const QKEY = 1 << 6;
        /// `ah_attr` (the primary address vector).
        const AV = 1 << 7;
        /// `path_mtu`.
        const PATH_MTU = 1 << 8;
        /// `timeout`.
        const TIMEOUT = 1 << 9;
        /// `retry_cnt`.
        const RETRY_CNT = 1 << 10;
        /// `rnr_retry`.
        const RNR_RETRY = 1 << 11;
        /// `rq_psn`.
        const RQ_PSN = 1 << 12;
        /// `max_rd_atomic`.
        const MAX_QP_RD_ATOMIC = 1 << 13;
        /// The alternate path; accepted where verbs accepts it, but vrdma has none to use.
        const ALT_PATH = 1 << 14;
        /// `min_rnr_timer`.
        const MIN_RNR_TIMER = 1 << 15;
        /// `sq_psn`.
        const SQ_PSN = 1 << 16;
        /// `max_dest_rd_atomic`.
        const MAX_DEST_RD_ATOMIC = 1 << 17;
        /// `path_mig_state`.
        const PATH_MIG_STATE = 1 << 18;
        /// `cap` (resizing); vrdma does not support it and the device answers `NotSupported`.
        const CAP = 1 << 19;
        /// `dest_qp_num`.
        const DEST_QPN = 1 << 20;
    }
}

impl AttrMask {
    /// An RC QP's RESET → INIT: `STATE` and exactly the attributes verbs requires.
    pub const RC_INIT: AttrMask = AttrMask::STATE
        .union(AttrMask::PKEY_INDEX)
        .union(AttrMask::PORT)
        .union(AttrMask::ACCESS_FLAGS);
    /// An RC QP's INIT → RTR: `STATE` and exactly the attributes verbs requires.
    pub const RC_RTR: AttrMask = AttrMask::STATE
        .union(AttrMask::AV)
        .union(AttrMask::PATH_MTU)
        .union(AttrMask::DEST_QPN)
        .union(AttrMask::RQ_PSN)
        .union(AttrMask::MAX_DEST_RD_ATOMIC)
        .union(AttrMask::MIN_RNR_TIMER);
    /// An RC QP's RTR → RTS: `STATE` and exactly the attributes verbs requires.
    pub const RC_RTS: AttrMask = AttrMask::STATE
        .union(AttrMask::TIMEOUT)
        .union(AttrMask::RETRY_CNT)
        .union(AttrMask::RNR_RETRY)
        .union(AttrMask::SQ_PSN)
        .union(AttrMask::MAX_QP_RD_ATOMIC);
}

/// Why a `MODIFY_QP` was refused by the state machine, before any attribute value is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// Verbs defines no such transition for this QP type.
    #[error("a {qp_type:?} QP cannot move from {from:?} to {to:?}")]
    Illegal {
        /// The QP's type.
        qp_type: Type,
        /// Its current state.
        from: State,
        /// The requested state.
        to: State,
    },
    /// Attributes the transition requires were not in the mask.
    #[error("moving a {qp_type:?} QP from {from:?} to {to:?} requires attributes {missing:?}")]
    Missing {
        /// The QP's type.
        qp_type: Type,
        /// Its current state.
        from: State,
        /// The requested state.
        to: State,
        /// The required attributes that were absent.
        missing: AttrMask,
    },
    /// Attributes the transition does not allow were in the mask.
    #[error("moving a {qp_type:?} QP from {from:?} to {to:?} does not allow attributes {extra:?}")]
    NotAllowed {
        /// The QP's type.
        qp_type: Type,
        /// Its current state.
        from: State,
        /// The requested state.
        to: State,
        /// The attributes that may not be given here.
        extra: AttrMask,
    },
    /// `cur_qp_state` was given but does not match the QP's actual state, or was given for a
    /// transition out of a state where verbs does not accept it.
    #[error("cur_qp_state {claimed:?} does not match the QP's state {actual:?}")]
    CurrentStateMismatch {
        /// What the driver claimed.
        claimed: State,
        /// What the QP is in.
        actual: State,
    },
}

impl TransitionError {
    /// The attribute bits at fault, reported to the driver in the response's `detail` field.
    pub fn offending_bits(&self) -> AttrMask {
        match *self {
            TransitionError::Illegal { .. } => AttrMask::STATE,
            TransitionError::Missing { missing, .. } => missing,
            TransitionError::NotAllowed { extra, .. } => extra,
            TransitionError::CurrentStateMismatch { .. } => AttrMask::CUR_STATE,
        }
    }
}

/// Required and optional attributes of one legal transition.
struct Rule {
    required: AttrMask,
    optional: AttrMask,
}

const NONE: AttrMask = AttrMask::empty();

/// The attribute rules for `from → to` on `qp_type`, or `None` where verbs has no transition.
fn rule(qp_type: Type, from: State, to: State) -> Option<Rule> {
    use AttrMask as M;
    use State::*;
    let rc = qp_type == Type::Rc;
    let (required, optional) = match (from, to) {
        // Every state but RESET may be forced into ERR, and every state may be reset.
        (_, Reset) => (NONE, NONE),
        (Reset, Err) => return None,
        (_, Err) => (NONE, NONE),
        (Reset, Init) => {
            let req = if rc {
                M::PKEY_INDEX | M::PORT | M::ACCESS_FLAGS
            } else {
                M::PKEY_INDEX | M::PORT | M::QKEY
            };
            (req, NONE)
        }
        (Init, Init) => {
            let opt = if rc {
                M::PKEY_INDEX | M::PORT | M::ACCESS_FLAGS
            } else {
                M::PKEY_INDEX | M::PORT | M::QKEY
            };
            (NONE, opt)
        }
        (Init, Rtr) => {
            if rc {
                (
                    M::AV
                        | M::PATH_MTU
                        | M::DEST_QPN
                        | M::RQ_PSN
                        | M::MAX_DEST_RD_ATOMIC
                        | M::MIN_RNR_TIMER,
                    M::ALT_PATH | M::ACCESS_FLAGS | M::PKEY_INDEX,
                )
            } else {
                (NONE, M::PKEY_INDEX | M::QKEY)
            }
        }
        (Rtr, Rts) => {
            if rc {
                (
                    M::TIMEOUT | M::RETRY_CNT | M::RNR_RETRY | M::SQ_PSN | M::MAX_QP_RD_ATOMIC,
                    M::CUR_STATE
                        | M::ALT_PATH
                        | M::ACCESS_FLAGS
                        | M::MIN_RNR_TIMER
                        | M::PATH_MIG_STATE,
                )
            } else {
                (M::SQ_PSN, M::CUR_STATE | M::QKEY)
            }
        }
        (Rts, Rts) | (Sqd, Rts) => {
            let opt = if rc {
                M::CUR_STATE | M::ACCESS_FLAGS | M::ALT_PATH | M::PATH_MIG_STATE | M::MIN_RNR_TIMER
            } else {
                M::CUR_STATE | M::QKEY
            };
            (NONE, opt)
        }
        (Rts, Sqd) => (NONE, M::EN_SQD_ASYNC_NOTIFY),
        (Sqd, Sqd) => {
            let opt = if rc {
                M::PORT
                    | M::AV
                    | M::TIMEOUT
                    | M::RETRY_CNT
                    | M::RNR_RETRY
                    | M::MAX_QP_RD_ATOMIC
                    | M::MAX_DEST_RD_ATOMIC
                    | M::ALT_PATH
                    | M::ACCESS_FLAGS
                    | M::PKEY_INDEX
                    | M::MIN_RNR_TIMER
                    | M::PATH_MIG_STATE
            } else {
                M::PKEY_INDEX | M::QKEY
            };
            (NONE, opt)
        }
        // Only UD QPs enter SQE; an RC QP's send errors take it to ERR.
        (Sqe, Rts) if !rc => (NONE, M::CUR_STATE | M::QKEY),
        _ => return None,
    };
    Some(Rule { required, optional })
}

/// Checks a `MODIFY_QP` against the verbs state machine.
///
/// `actual` is the QP's state; `mask` and `attr` are what the driver sent. Returns the state
/// the QP moves to. Attribute values (PSN ranges, MTU, access flags...) are checked separately
/// by [`Attr::validate`]; this only decides whether the transition and mask are legal.
pub fn check_transition(
    qp_type: Type,
    actual: State,
    mask: AttrMask,
    attr: &Attr,
) -> Result<State, TransitionError> {
    let from = if mask.contains(AttrMask::CUR_STATE) {
        let claimed = State::from_raw(attr.cur_qp_state).unwrap_or(State::Err);
        // Verbs accepts cur_qp_state only out of RTR, RTS, SQD and SQE, and vrdma holds the
        // QP's real state, so a claim that differs from it is refused rather than believed.
        if claimed != actual || !matches!(actual, State::Rtr | State::Rts | State::Sqd | State::Sqe)
        {
            return Err(TransitionError::CurrentStateMismatch { claimed, actual });
        }
        claimed
    } else {
        actual
    };
    let to = if mask.contains(AttrMask::STATE) {
        State::from_raw(attr.qp_state).map_err(|_| TransitionError::Illegal {
            qp_type,
            from,
            to: State::Err,
        })?
    } else {
        from
    };
    let rule = rule(qp_type, from, to).ok_or(TransitionError::Illegal { qp_type, from, to })?;
    let missing = rule.required - mask;
    if !missing.is_empty() {
        return Err(TransitionError::Missing {
            qp_type,
            from,
            to,
            missing,
        });
    }
    let extra = mask - rule.required - rule.optional - AttrMask::STATE;
    if !extra.is_empty() {
        return Err(TransitionError::NotAllowed {
            qp_type,
            from,
            to,
            extra,
        });
    }
    Ok(to)
}

/// Sizes of a QP's queues, as `ibv_qp_cap`.
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
pub struct Caps {
    /// Send-queue depth; a power of two (the driver rounds up before creating the ring).
    pub max_send_wr: U32,
    /// Receive-queue depth; a power of two.
    pub max_recv_wr: U32,
    /// Most SGEs in one send WR.
    pub max_send_sge: U32,
    /// Most SGEs in one receive WR.
    pub max_recv_sge: U32,
    /// Most inline bytes in one send WR.
    pub max_inline_data: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// An address vector, as `ibv_ah_attr` with its GRH.
///
/// On RoCE every address is global: `is_global` must be 1 and `dgid` names the peer port.
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
pub struct AhAttr {
    /// Destination GID.
    pub dgid: Gid,
    /// IPv6 flow label (20 bits).
    pub flow_label: U32,
    /// Index of the source GID in the port's table.
    pub sgid_index: u8,
    /// Hop limit (IP TTL).
    pub hop_limit: u8,
    /// Traffic class (IP DSCP and ECN).
    pub traffic_class: u8,
    /// Service level (0 to 15).
    pub sl: u8,
    /// 1 if the GRH fields are valid; must be 1 on RoCE.
    pub is_global: u8,
    /// Port number; must be 1.
    pub port_num: u8,
    /// Destination LID; unused on RoCE, must be 0.
    pub dlid: U16,
    /// Source path bits; unused on RoCE, must be 0.
    pub src_path_bits: u8,
    /// Static rate (`ibv_rate`); 0 is "port rate".
    pub static_rate: u8,
    /// Reserved, zero.
    pub reserved: [u8; 2],
}

impl AhAttr {
    /// Checks an address vector the driver sent.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.is_global != 1 {
            return Err(DecodeError::Inconsistent {
                field: "ah_attr.is_global",
                reason: "RoCE addresses must carry a GRH (is_global = 1)",
            });
        }
        if self.port_num != 1 {
            return Err(DecodeError::UnknownValue {
                field: "ah_attr.port_num",
                value: self.port_num.into(),
            });
        }
        if self.dgid.is_zero() {
            return Err(DecodeError::Inconsistent {
                field: "ah_attr.dgid",
                reason: "the destination GID is all zeroes",
            });
        }
        if self.flow_label.get() >= 1 << 20 {
            return Err(DecodeError::TooLarge {
                field: "ah_attr.flow_label",
                value: self.flow_label.get().into(),
                max: (1 << 20) - 1,
            });
        }
        if self.sl > 15 {
            return Err(DecodeError::TooLarge {
                field: "ah_attr.sl",
                value: self.sl.into(),
                max: 15,
            });
        }
        if self.dlid.get() != 0 || self.src_path_bits != 0 {
            return Err(DecodeError::Inconsistent {
                field: "ah_attr.dlid",
                reason: "LIDs do not exist on RoCE; dlid and src_path_bits must be 0",
            });
        }
        check_reserved(&self.reserved, "ah_attr.reserved")
    }
}

/// The largest packet sequence number (PSNs are 24 bits).
pub const MAX_PSN: u32 = (1 << 24) - 1;
/// The largest QP number (QPNs are 24 bits on the wire).
pub const MAX_QPN: u32 = (1 << 24) - 1;
/// The largest `timeout`, `retry_cnt`, `rnr_retry` and `min_rnr_timer` as verbs defines them.
pub const MAX_TIMEOUT: u8 = 31;
/// The largest `retry_cnt` and `rnr_retry` (7 means "infinite" for `rnr_retry`).
pub const MAX_RETRY: u8 = 7;
/// `rnr_retry` value meaning "retry for ever".
pub const RNR_RETRY_INFINITE: u8 = 7;

/// QP attributes, as `ibv_qp_attr` without the alternate path and the capabilities.
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
pub struct Attr {
    /// Raw [`State`]: the state to move to.
    pub qp_state: u8,
    /// Raw [`State`]: the state the driver believes the QP is in.
    pub cur_qp_state: u8,
    /// Raw [`crate::config::Mtu`].
    pub path_mtu: u8,
    /// Raw [`MigState`].
    pub path_mig_state: u8,
    /// 1 to get `SqDrained` events.
    pub en_sqd_async_notify: u8,
    /// Set by `QUERY_QP`: 1 while an SQD QP is still draining.
    pub sq_draining: u8,
    /// Outstanding RDMA READ/atomic requests as requester.
    pub max_rd_atomic: u8,
    /// Outstanding RDMA READ/atomic requests as responder.
    pub max_dest_rd_atomic: u8,
    /// Q_Key (UD).
    pub qkey: U32,
    /// Receive PSN (24 bits).
    pub rq_psn: U32,
    /// Send PSN (24 bits).
    pub sq_psn: U32,
    /// Remote QPN (RC, 24 bits).
    pub dest_qp_num: U32,
    /// Responder access rights, [`crate::mr::Access`] bits.
    pub qp_access_flags: U32,
    /// P_Key index; the table has one entry, so 0.
    pub pkey_index: U16,
    /// Reserved, zero.
    pub reserved0: U16,
    /// Port number, 1.
    pub port_num: u8,
    /// Local ACK timeout: 4.096 µs × 2^timeout; 0 means infinite.
    pub timeout: u8,
    /// Transport retries (0 to 7).
    pub retry_cnt: u8,
    /// RNR retries (0 to 6, 7 = infinite).
    pub rnr_retry: u8,
    /// Minimum RNR NAK timer, the 5-bit IB encoding (0 = 655.36 ms, 1 = 0.01 ms ... 31 = 491.52 ms).
    pub min_rnr_timer: u8,
    /// Reserved, zero.
    pub reserved1: [u8; 3],
    /// Primary address vector (RC).
    pub ah_attr: AhAttr,
}

impl Attr {
    /// Checks the values of the attributes named in `mask` (and only those: verbs ignores the
    /// others, so a driver need not clear them). Reserved fields must be zero whatever the mask.
    pub fn validate(&self, mask: AttrMask) -> Result<(), DecodeError> {
        check_reserved(self.reserved0.as_bytes(), "qp_attr.reserved0")?;
        check_reserved(&self.reserved1, "qp_attr.reserved1")?;
        if mask.contains(AttrMask::STATE) {
            State::from_raw(self.qp_state)?;
        }
        if mask.contains(AttrMask::CUR_STATE) {
            State::from_raw(self.cur_qp_state)?;
        }
        if mask.contains(AttrMask::PATH_MTU) {
            crate::config::Mtu::from_raw(self.path_mtu)?;
        }
        if mask.contains(AttrMask::PATH_MIG_STATE) {
            MigState::from_raw(self.path_mig_state)?;
        }
        if mask.contains(AttrMask::EN_SQD_ASYNC_NOTIFY) && self.en_sqd_async_notify > 1 {
            return Err(DecodeError::UnknownValue {
                field: "qp_attr.en_sqd_async_notify",
                value: self.en_sqd_async_notify.into(),
            });
        }
        let psn_fields = [
            (AttrMask::RQ_PSN, self.rq_psn.get(), "qp_attr.rq_psn"),
            (AttrMask::SQ_PSN, self.sq_psn.get(), "qp_attr.sq_psn"),
            (
                AttrMask::DEST_QPN,
                self.dest_qp_num.get(),
                "qp_attr.dest_qp_num",
            ),
        ];
        for (bit, value, field) in psn_fields {
            if mask.contains(bit) && value > MAX_PSN {
                return Err(DecodeError::TooLarge {
                    field,
                    value: value.into(),
                    max: MAX_PSN.into(),
                });
            }
        }
        if mask.contains(AttrMask::ACCESS_FLAGS) {
            decode_flags!(
                crate::mr::Access,
                self.qp_access_flags.get(),
                "qp_attr.qp_access_flags"
            )?;
        }
        if mask.contains(AttrMask::PKEY_INDEX) && self.pkey_index.get() != 0 {
            return Err(DecodeError::TooLarge {
                field: "qp_attr.pkey_index",
                value: self.pkey_index.get().into(),
                max: 0,
            });
        }
        if mask.contains(AttrMask::PORT) && self.port_num != 1 {
            return Err(DecodeError::UnknownValue {
                field: "qp_attr.port_num",
                value: self.port_num.into(),
            });
        }
        let small_fields = [
            (
                AttrMask::TIMEOUT,
                self.timeout,
                MAX_TIMEOUT,
                "qp_attr.timeout",
            ),
            (
                AttrMask::RETRY_CNT,
                self.retry_cnt,
                MAX_RETRY,
                "qp_attr.retry_cnt",
            ),
            (
                AttrMask::RNR_RETRY,
                self.rnr_retry,
                MAX_RETRY,
                "qp_attr.rnr_retry",
            ),
            (
                AttrMask::MIN_RNR_TIMER,
                self.min_rnr_timer,
                MAX_TIMEOUT,
                "qp_attr.min_rnr_timer",
            ),
        ];
        for (bit, value, max, field) in small_fields {
            if mask.contains(bit) && value > max {
                return Err(DecodeError::TooLarge {
                    field,
                    value: value.into(),
                    max: max.into(),
                });
            }
        }
        if mask.contains(AttrMask::AV) {
            self.ah_attr.validate()?;
        }
        Ok(())
    }
}

/// The IB encoding of `min_rnr_timer` in microseconds (IBA table 45).
pub fn rnr_timer_micros(encoded: u8) -> u32 {
    const TABLE: [u32; 32] = [
        655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1_280, 1_920, 2_560,
        3_840, 5_120, 7_680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880,
        163_840, 245_760, 327_680, 491_520,
    ];
    TABLE[usize::from(encoded & 31)]
}

/// The local ACK timeout in microseconds (4.096 µs × 2^timeout), or `None` for 0 (infinite).
pub fn ack_timeout_micros(timeout: u8) -> Option<u64> {
    match timeout {
        0 => None,
        t => Some((4096u64 << u32::from(t.min(MAX_TIMEOUT))) / 1000),
    }
}
