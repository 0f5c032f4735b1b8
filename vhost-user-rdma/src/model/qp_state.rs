//! A QP's data-path state, as data: where its rings stand, the work request in progress, its
//! retry budget, and the RC transport's state on the inter-host fabric (PSNs, the work
//! requests on the wire, the READs and atomics answered). The rules that change it live in
//! `rnic` and the fabrics; keeping the state here, apart from them, is what lets it be saved
//! and restored.

use std::time::Instant;

use vrdma_proto::qp;
use vrdma_proto::wqe::{self, Sge};

/// Bytes of the largest send ring slot a QP can have.
pub const MAX_SEND_SLOT: usize =
    wqe::send_stride(crate::limits::MAX_SGE, crate::limits::MAX_INLINE) as usize;

/// Packets a QP may have on the wire unacknowledged: more only fills socket buffers, and a
/// loss then costs a longer go-back-N. Its congestion window never exceeds this.
pub const MAX_UNACKED: u32 = 256;

/// Work requests an RC QP may have on the wire unacknowledged.
pub const RC_WINDOW: usize = 32;
/// READs a responder remembers, as many as a requester may have outstanding.
pub const READ_HISTORY: usize = crate::limits::MAX_RD_ATOM as usize;
/// Atomic results kept per QP to answer a retransmitted atomic without executing it twice: one
/// per atomic a requester may have outstanding (`max_dest_rd_atomic`, at most
/// [`crate::limits::MAX_RD_ATOM`]).
pub const ATOMIC_REPLAY: usize = crate::limits::MAX_RD_ATOM as usize;

/// A receive work request the responder has taken for a message in progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvCopy {
    /// Its `wr_id`.
    pub wr_id: u64,
    /// SGEs in use.
    pub n: usize,
    /// The SGEs, copied so the guest cannot change them mid-message.
    pub sges: [Sge; crate::limits::MAX_SGE as usize],
    /// Room in bytes.
    pub room: u32,
}

/// The send work request a QP is executing.
#[derive(Debug, Clone, Copy)]
pub struct Inflight {
    /// Whether a work request is in progress.
    pub active: bool,
    /// Its ring slot, copied when it started.
    pub slot: [u8; MAX_SEND_SLOT],
    /// Payload bytes done.
    pub done: u32,
    /// Do not try again before this.
    pub wait_until: Option<Instant>,
}

impl Default for Inflight {
    fn default() -> Self {
        Inflight {
            active: false,
            slot: [0; MAX_SEND_SLOT],
            done: 0,
            wait_until: None,
        }
    }
}

/// The retries a requester has left, of each kind, for the operation it is waiting on. Every
/// fabric counts them here, from the QP's `retry_cnt` and `rnr_retry`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Retries {
    /// Transport retries (no answer within the ACK timeout).
    pub transport: u8,
    /// RNR retries.
    pub rnr: u8,
}

impl Retries {
    /// The whole budget of a QP whose attributes are `attr`.
    pub fn full(attr: &qp::Attr) -> Self {
        Retries {
            transport: attr.retry_cnt,
            rnr: attr.rnr_retry,
        }
    }

    /// Takes one transport retry. Returns false when none is left: the work request fails
    /// with RETRY_EXC_ERR.
    pub fn take_transport(&mut self) -> bool {
        match self.transport.checked_sub(1) {
            Some(fewer) => {
                self.transport = fewer;
                true
            }
            None => false,
        }
    }

    /// Takes one RNR retry for a QP whose `rnr_retry` attribute is `rnr_retry` (7 is
    /// infinite). Returns false when none is left: the work request fails with
    /// RNR_RETRY_EXC_ERR.
    pub fn take_rnr(&mut self, rnr_retry: u8) -> bool {
        if rnr_retry == qp::RNR_RETRY_INFINITE {
            return true;
        }
        match self.rnr.checked_sub(1) {
            Some(fewer) => {
                self.rnr = fewer;
                true
            }
            None => false,
        }
    }
}

/// The PSNs a QP carries across a migration: where each direction stands.
#[derive(Debug, Clone, Copy, Default)]
pub struct Psns {
    /// Next PSN the requester sends.
    pub next: u32,
    /// Oldest PSN the requester has not had acknowledged.
    pub una: u32,
    /// PSN the responder expects next.
    pub expected: u32,
    /// Messages the responder has completed (the AETH's MSN).
    pub msn: u32,
}

/// A QP's data-path state.
#[derive(Debug, Clone, Default)]
pub struct QpRuntime {
    /// Index of the oldest send work request not yet completed.
    pub sq_head: u32,
    /// Receive work requests completed (the receive ring's consumer index).
    pub rq_done: u32,
    /// The SQD drained event has been raised.
    pub sqd_notified: bool,
    /// The send ring was found overrun: nothing in it is trusted, not even to flush, until the
    /// QP is reset.
    pub sq_dead: bool,
    /// The send ring's polling word is set: the driver skips doorbells because the scheduler
    /// will look at the ring again before the QP goes idle.
    pub sq_polling: bool,
    /// The current work request.
    pub inflight: Inflight,
    /// Retries left for what the requester waits on.
    pub retries: Retries,
    /// The requester whose message this QP is receiving (RC), and when it last moved a piece,
    /// so two cannot interleave; one silent for a while has gone and is replaced.
    pub rx_owner: Option<(u64, u32, Instant)>,
    /// The receive this QP took from its SRQ and holds until the message it was taken for
    /// completes. Taking it consumed it from the SRQ, so it is this QP's alone: a message that
    /// fails leaves it here for the next one, and a flush completes it on this QP's CQ.
    pub srq_recv: Option<RecvCopy>,
    /// QP_LAST_WQE_REACHED has been raised since the QP (attached to an SRQ) entered ERR.
    pub last_wqe_raised: bool,
    /// Where the QP stands in PSN space on the inter-host fabric.
    pub psns: Psns,
    /// The QP's transport on the inter-host fabric.
    pub rc: RcTransport,
}

impl QpRuntime {
    /// A runtime whose rings start at these indices (after a reset).
    pub fn at(sq_head: u32, rq_done: u32) -> Self {
        QpRuntime {
            sq_head,
            rq_done,
            ..QpRuntime::default()
        }
    }
}

/// A work request on the wire, kept until it is acknowledged.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    /// PSN of its first packet.
    pub first_psn: u32,
    /// PSN of its last packet (a READ: of its last response).
    pub last_psn: u32,
    /// Its `wr_id`.
    pub wr_id: u64,
    /// Its opcode, raw.
    pub opcode: u8,
    /// Whether it completes with a CQE when it succeeds.
    pub signaled: bool,
    /// Its length.
    pub len: u32,
}

/// A READ the responder has executed, kept to answer a retransmitted request for it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadRecord {
    /// PSN of the request (and of its first response).
    pub first_psn: u32,
    /// Response packets.
    pub npkts: u32,
    /// Address read.
    pub va: u64,
    /// R_Key used.
    pub rkey: u32,
    /// Length read.
    pub len: u32,
    /// MSN its responses carry.
    pub msn: u32,
}

/// The message a responder is in the middle of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RxMsg {
    /// Between messages.
    #[default]
    Idle,
    /// A SEND: bytes so far.
    Send {
        /// Bytes so far.
        done: u32,
    },
    /// An RDMA WRITE, from its first packet's RETH.
    Write {
        /// Target address.
        va: u64,
        /// R_Key.
        rkey: u32,
        /// Message length.
        len: u32,
        /// Bytes so far.
        done: u32,
    },
}

/// What an RC QP's transport remembers of its traffic on the inter-host fabric.
#[derive(Debug, Clone, Copy, Default)]
pub struct Records {
    /// Work requests `[sq_head, sq_max)` on the wire, by ring index modulo [`RC_WINDOW`].
    pub sent: [Sent; RC_WINDOW],
    /// READs executed as responder, for duplicates.
    pub reads: [ReadRecord; READ_HISTORY],
    /// Recent atomics' PSNs and results, for duplicates.
    pub atomics: [(u32, u64, bool); ATOMIC_REPLAY],
}

/// An RC QP's transport state on the inter-host fabric.
#[derive(Debug, Clone, Default)]
pub struct RcTransport {
    /// The requester has taken its retry counters from the QP's attributes.
    pub started: bool,
    /// Ring index of the work request being transmitted (if `inflight.active`) or next to be.
    pub sq_next: u32,
    /// Ring index after the last work request ever begun: `[sq_head, sq_max)` have records in
    /// `sent`. A go-back-N moves `sq_next` back; this stays.
    pub sq_max: u32,
    /// PSN after the last packet ever sent: acknowledgements up to it are valid even while a
    /// go-back-N resends from further back.
    pub psn_max: u32,
    /// The records of work requests on the wire, READs and atomics answered. Made with the
    /// QP when the daemon runs the inter-host fabric (`--roce`), so that every other QP stays
    /// small.
    pub records: Option<Box<Records>>,
    /// When the oldest unacknowledged packet times out.
    pub deadline: Option<Instant>,
    /// An RNR NAK asked to wait until then.
    pub rnr_until: Option<Instant>,
    /// Go back to the oldest unacknowledged PSN before sending more.
    pub rewind: bool,
    /// The PSN the last go-back-N resent from.
    pub rewound: Option<u32>,
    /// Packets the requester may have unacknowledged now.
    pub cwnd: u32,
    /// The window was last halved for a congestion mark (BECN) when this was `psn_max`: the
    /// marks echoed for packets sent before it are the same congestion, and do not halve it
    /// again until the acknowledgements pass it.
    pub congestion_cut_at: Option<u32>,
    /// When the scheduler's timer for this QP fires, if one is pending.
    pub timer_at: Option<Instant>,
    /// The responder's message in progress.
    pub rx: RxMsg,
    /// A sequence-error NAK was sent for the current gap; one per gap, as the IBA asks.
    pub nak_sent: bool,
    /// Where the next READ record goes.
    pub read_next: u8,
    /// PSN of the last SEND, WRITE or atomic the responder accepted: what a duplicate's ACK
    /// names.
    pub acked: Option<u32>,
    /// Where the next atomic record goes.
    pub atomic_next: u8,
}

impl RcTransport {
    /// A transport for a QP that may talk across hosts, its records made now (control path).
    pub fn with_records() -> Self {
        RcTransport {
            records: Some(Box::default()),
            ..RcTransport::default()
        }
    }

    /// The transport of a QP just reset: everything forgotten, the records (if it has them)
    /// kept for reuse, so a reset allocates nothing.
    pub fn reset(self) -> Self {
        let records = self.records.map(|mut r| {
            *r = Records::default();
            r
        });
        RcTransport {
            records,
            ..RcTransport::default()
        }
    }

    /// Whether the requester has sent on the wire since the QP was last reset.
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// The record of the work request in send ring slot `index` (a blank one if the QP has no
    /// records).
    pub fn sent(&self, index: u32) -> Sent {
        self.records
            .as_ref()
            .map_or_else(Sent::default, |r| r.sent[index as usize % RC_WINDOW])
    }

    /// The records, made now for a QP that first goes on the wire after it was restored on a
    /// daemon with `--roce` from one without; a QP created with `--roce` has them from the
    /// start.
    pub fn records(&mut self) -> &mut Records {
        self.records.get_or_insert_with(Box::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rnr_retries_run_out_unless_infinite() {
        let mut r = Retries {
            transport: 0,
            rnr: 2,
        };
        assert!(r.take_rnr(2));
        assert!(r.take_rnr(2));
        assert!(!r.take_rnr(2), "two retries, then none");
        assert_eq!(r.rnr, 0);
        for _ in 0..100 {
            assert!(r.take_rnr(qp::RNR_RETRY_INFINITE));
        }
    }

    #[test]
    fn transport_retries_run_out() {
        let mut r = Retries {
            transport: 1,
            rnr: 0,
        };
        assert!(r.take_transport());
        assert!(!r.take_transport());
        assert_eq!(r.transport, 0);
    }
}
