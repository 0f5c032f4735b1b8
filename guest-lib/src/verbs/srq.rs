use std::sync::{Arc, Mutex};

use vrdma_proto::cmd::{self, Opcode};
use vrdma_proto::{config, ring, wqe};
use zerocopy::IntoBytes;

use super::context::ReceiveRing;
use super::pd::{PdInner, ProtectionDomain};
use super::qp::{RecvWr, WorkQueue};
use super::ring::Ring;
use super::{Error, Result};

/// Which attributes [`SharedReceiveQueue::modify`] sets (`ibv_srq_attr_mask`): `MAX_WR`
/// (resizing, which the device refuses) and `LIMIT` (arming the limit event).
// A re-export, not a type alias: rustdoc shows an alias of a bitflags type without its
// flag constants, which are the point of the page.
#[doc(inline)]
pub use vrdma_proto::cmd::SrqAttrMask;

/// The device's limits on SRQs (`max_srq`, `max_srq_wr` and `max_srq_sge` of
/// `ibv_device_attr`), as [`super::Context::srq_caps`] reads them; all zero from a device
/// without SRQs.
pub type SrqCaps = config::SrqCaps;

/// SRQ attributes (`ibv_srq_attr`): what [`SharedReceiveQueue::new`] creates an SRQ with, what
/// [`SharedReceiveQueue::modify`] sets and what [`SharedReceiveQueue::query`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SrqAttr {
    /// Receives the SRQ holds (rounded up to a power of two when it is created).
    pub max_wr: u32,
    /// Most SGEs in one receive.
    pub max_sge: u32,
    /// The limit: once a receive the device takes leaves fewer than this many in the SRQ, it
    /// raises one `SrqLimitReached` event and disarms the SRQ (the limit reads 0 again).
    /// 0 means not armed.
    pub srq_limit: u32,
}

#[derive(Debug)]
pub(crate) struct SrqInner {
    pd: Arc<PdInner>,
    pub(crate) srqn: u32,
    max_sge: u32,
    rq: Mutex<WorkQueue>,
}

impl Drop for SrqInner {
    fn drop(&mut self) {
        self.pd
            .ctx
            .destroy(Opcode::DestroySrq, self.srqn, "ibv_destroy_srq");
    }
}

/// A shared receive queue (`ibv_srq`): one pool of receives that any number of QPs, RC and UD,
/// take from in place of receive queues of their own ([`super::QpInitAttr::srq`]). Each
/// message that consumes a receive takes the next one, in the order posted, whichever QP it
/// arrives on; its completion goes to that QP's receive CQ with that QP's number.
///
/// Dropping it destroys the SRQ on the device once no QP uses it any more (each QP attached
/// keeps it alive, since the device refuses to destroy an SRQ a QP is attached to).
#[derive(Debug, Clone)]
pub struct SharedReceiveQueue {
    pub(crate) inner: Arc<SrqInner>,
}

impl SharedReceiveQueue {
    /// Creates an SRQ in `pd` holding `attr.max_wr` receives (rounded up to a power of two)
    /// of at most `attr.max_sge` SGEs each, armed with `attr.srq_limit` if it is not 0 (as
    /// Linux `rxe` does; verbs leaves arming at creation to the provider).
    #[doc(alias = "ibv_create_srq")]
    pub fn new(pd: &ProtectionDomain, attr: &SrqAttr) -> Result<SharedReceiveQueue> {
        const VERB: &str = "ibv_create_srq";
        let ctx = &pd.inner.ctx;
        let caps = ctx.srq_caps();
        if caps.max_srq.get() == 0 {
            return Err(Error::invalid(VERB, "the device offers no SRQs"));
        }
        let max_wr = attr
            .max_wr
            .max(1)
            .checked_next_power_of_two()
            .unwrap_or(u32::MAX);
        let limits = [
            ("max_wr", max_wr, caps.max_srq_wr.get()),
            ("max_sge", attr.max_sge, caps.max_srq_sge.get()),
            ("srq_limit", attr.srq_limit, max_wr),
        ];
        for (name, value, max) in limits {
            if value > max {
                return Err(Error::invalid(
                    VERB,
                    format!("{name} {value} exceeds the largest allowed, {max}"),
                ));
            }
        }
        let geometry = ring::Geometry::new(max_wr, wqe::recv_stride(attr.max_sge))
            .map_err(|source| Error::Protocol { verb: VERB, source })?;
        let ring = Ring::new(
            ctx.alloc(geometry.byte_len() as usize, ring::ALIGN as usize, VERB)?,
            geometry,
        );
        let body = cmd::CreateSrq {
            pdn: pd.inner.pdn.into(),
            max_wr: max_wr.into(),
            max_sge: attr.max_sge.into(),
            srq_limit: attr.srq_limit.into(),
            ring_addr: ctx.ring_addr(ring.addr(), ring.len(), VERB)?.into(),
        };
        let resp: cmd::CreateSrqResp = ctx.command_as(Opcode::CreateSrq, body.as_bytes(), VERB)?;
        Ok(SharedReceiveQueue {
            inner: Arc::new(SrqInner {
                pd: pd.inner.clone(),
                srqn: resp.srqn.get(),
                max_sge: attr.max_sge,
                rq: Mutex::new(WorkQueue { ring, producer: 0 }),
            }),
        })
    }

    /// The SRQ number the device gave it (what `SrqLimitReached` events name).
    pub fn srq_num(&self) -> u32 {
        self.inner.srqn
    }

    /// Changes the SRQ's attributes in `mask`: `LIMIT` arms the limit event with
    /// `attr.srq_limit` (0 disarms it). `MAX_WR` (resizing) is refused by the device with
    /// `EOPNOTSUPP`: create a larger SRQ instead.
    #[doc(alias = "ibv_modify_srq")]
    pub fn modify(&self, attr: &SrqAttr, mask: SrqAttrMask) -> Result<()> {
        let body = cmd::ModifySrq {
            srqn: self.inner.srqn.into(),
            attr_mask: mask.bits().into(),
            max_wr: attr.max_wr.into(),
            srq_limit: attr.srq_limit.into(),
        };
        self.inner
            .pd
            .ctx
            .command(Opcode::ModifySrq, body.as_bytes(), "ibv_modify_srq")?;
        Ok(())
    }

    /// The SRQ's attributes: its size, and its limit if it is armed (0 once the limit event
    /// has fired).
    #[doc(alias = "ibv_query_srq")]
    pub fn query(&self) -> Result<SrqAttr> {
        let body = cmd::Handle {
            handle: self.inner.srqn.into(),
            reserved: 0.into(),
        };
        let resp: cmd::QuerySrqResp =
            self.inner
                .pd
                .ctx
                .command_as(Opcode::QuerySrq, body.as_bytes(), "ibv_query_srq")?;
        Ok(SrqAttr {
            max_wr: resp.max_wr.get(),
            max_sge: resp.max_sge.get(),
            srq_limit: resp.srq_limit.get(),
        })
    }

    /// Posts receive work requests to the SRQ. No doorbell is rung: the device reads the SRQ
    /// when a message arrives for one of its QPs (an `Srq` doorbell would change nothing). A
    /// device that posts receives ahead of arrival (`SYNC_RECV`) is sent `POST_SRQ_RECV`
    /// instead, and has posted them when this returns.
    ///
    /// As in verbs, the requests before a failing one are posted; a full SRQ fails with
    /// `ENOMEM`. A slot is free again as soon as the device has taken its receive for a
    /// message, before the receive completes.
    ///
    /// # Safety
    ///
    /// As with `ibv_post_srq_recv`: the memory every SGE names must stay valid and must not be
    /// accessed by the caller until the receive's completion has been polled, on the CQ of
    /// whichever QP took it.
    #[doc(alias = "ibv_post_srq_recv")]
    pub unsafe fn post_recv(&self, wrs: &[RecvWr<'_>]) -> Result<()> {
        let mut rq = self.inner.rq.lock().unwrap_or_else(|p| p.into_inner());
        let posted = ReceiveRing::Srq(self.inner.srqn);
        let ctx = &self.inner.pd.ctx;
        // SAFETY: this function's contract is the one `post_receives` needs.
        unsafe { rq.post_receives(wrs, self.inner.max_sge, ctx, posted, "ibv_post_srq_recv") }
    }
}
