use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vrdma_proto::cmd::{self, Opcode};
use vrdma_proto::config::Mtu;
use vrdma_proto::doorbell::{self, Doorbell};
use vrdma_proto::mr::Access;
use vrdma_proto::{qp, ring, wqe};
use zerocopy::IntoBytes;

use super::ah::{AddressHandle, AhAttr};
use super::context::{Inner, ReceiveRing};
use super::cq::{CompletionQueue, CqInner};
use super::pd::{PdInner, ProtectionDomain};
use super::ring::Ring;
use super::srq::{SharedReceiveQueue, SrqInner};
use super::{Error, Result};

/// QP transport type (`ibv_qp_type`).
pub type QpType = qp::Type;
/// QP state (`ibv_qp_state`).
pub type QpState = qp::State;
/// Which attributes a modify sets (`ibv_qp_attr_mask`).
// A re-export, not a type alias: rustdoc shows an alias of a bitflags type without its
// flag constants, which are the point of the page.
#[doc(inline)]
pub use vrdma_proto::qp::AttrMask as QpAttrMask;
/// Work-request opcode (`ibv_wr_opcode`).
pub type WrOpcode = wqe::Opcode;
/// Send flags (`ibv_send_flags`).
// A re-export, not a type alias: rustdoc shows an alias of a bitflags type without its
// flag constants, which are the point of the page.
#[doc(inline)]
pub use vrdma_proto::wqe::SendFlags;
/// A scatter/gather entry (`ibv_sge`).
pub type Sge = wqe::Sge;

/// Queue sizes (`ibv_qp_cap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCap {
    /// Send-queue depth (rounded up to a power of two).
    pub max_send_wr: u32,
    /// Receive-queue depth (rounded up to a power of two).
    pub max_recv_wr: u32,
    /// SGEs per send.
    pub max_send_sge: u32,
    /// SGEs per receive.
    pub max_recv_sge: u32,
    /// Inline bytes per send.
    pub max_inline_data: u32,
}

impl Default for QpCap {
    fn default() -> Self {
        QpCap {
            max_send_wr: 64,
            max_recv_wr: 64,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        }
    }
}

/// What a QP is created with (`ibv_qp_init_attr`).
#[derive(Debug, Clone, Copy)]
pub struct QpInitAttr<'a> {
    /// CQ for send completions.
    pub send_cq: &'a CompletionQueue,
    /// CQ for receive completions (also those of receives taken from `srq`).
    pub recv_cq: &'a CompletionQueue,
    /// The shared receive queue the QP takes its receives from, or `None` for a receive queue
    /// of its own. With an SRQ, `cap.max_recv_wr` and `cap.max_recv_sge` are ignored (the QP
    /// has no receive queue) and [`QueuePair::post_recv`] fails; post to the SRQ instead.
    pub srq: Option<&'a SharedReceiveQueue>,
    /// Queue sizes.
    pub cap: QpCap,
    /// RC or UD.
    pub qp_type: QpType,
    /// Every send completes with a CQE.
    pub sq_sig_all: bool,
}

/// QP attributes (`ibv_qp_attr`), for [`QueuePair::modify`] and [`QueuePair::query`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpAttr {
    /// Target state.
    pub qp_state: QpState,
    /// The state the caller believes the QP is in (with `CUR_STATE`).
    pub cur_qp_state: QpState,
    /// Path MTU.
    pub path_mtu: Mtu,
    /// Q_Key (UD).
    pub qkey: u32,
    /// Receive PSN.
    pub rq_psn: u32,
    /// Send PSN.
    pub sq_psn: u32,
    /// Remote QPN (RC).
    pub dest_qp_num: u32,
    /// Responder rights.
    pub qp_access_flags: Access,
    /// P_Key index.
    pub pkey_index: u16,
    /// Port.
    pub port_num: u8,
    /// ACK timeout exponent.
    pub timeout: u8,
    /// Transport retries.
    pub retry_cnt: u8,
    /// RNR retries (7 = infinite).
    pub rnr_retry: u8,
    /// Minimum RNR NAK timer (IB encoding).
    pub min_rnr_timer: u8,
    /// Outstanding READ/atomic as requester.
    pub max_rd_atomic: u8,
    /// Outstanding READ/atomic as responder.
    pub max_dest_rd_atomic: u8,
    /// Primary path.
    pub ah_attr: AhAttr,
    /// SQD drained events wanted.
    pub en_sqd_async_notify: bool,
}

impl Default for QpAttr {
    fn default() -> Self {
        QpAttr {
            qp_state: QpState::Reset,
            cur_qp_state: QpState::Reset,
            path_mtu: Mtu::Mtu1024,
            qkey: 0,
            rq_psn: 0,
            sq_psn: 0,
            dest_qp_num: 0,
            qp_access_flags: Access::empty(),
            pkey_index: 0,
            port_num: 1,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
            max_rd_atomic: 1,
            max_dest_rd_atomic: 1,
            ah_attr: AhAttr::default(),
            en_sqd_async_notify: false,
        }
    }
}

impl QpAttr {
    fn to_wire(self) -> qp::Attr {
        qp::Attr {
            qp_state: self.qp_state.raw(),
            cur_qp_state: self.cur_qp_state.raw(),
            path_mtu: self.path_mtu.raw(),
            path_mig_state: qp::MigState::Migrated.raw(),
            en_sqd_async_notify: u8::from(self.en_sqd_async_notify),
            sq_draining: 0,
            max_rd_atomic: self.max_rd_atomic,
            max_dest_rd_atomic: self.max_dest_rd_atomic,
            qkey: self.qkey.into(),
            rq_psn: self.rq_psn.into(),
            sq_psn: self.sq_psn.into(),
            dest_qp_num: self.dest_qp_num.into(),
            qp_access_flags: self.qp_access_flags.bits().into(),
            pkey_index: self.pkey_index.into(),
            reserved0: 0.into(),
            port_num: self.port_num,
            timeout: self.timeout,
            retry_cnt: self.retry_cnt,
            rnr_retry: self.rnr_retry,
            min_rnr_timer: self.min_rnr_timer,
            reserved1: [0; 3],
            ah_attr: self.ah_attr,
        }
    }

    fn from_wire(a: &qp::Attr) -> Self {
        QpAttr {
            qp_state: QpState::from_raw(a.qp_state).unwrap_or(QpState::Err),
            cur_qp_state: QpState::from_raw(a.cur_qp_state).unwrap_or(QpState::Err),
            path_mtu: Mtu::from_raw(a.path_mtu).unwrap_or(Mtu::Mtu1024),
            qkey: a.qkey.get(),
            rq_psn: a.rq_psn.get(),
            sq_psn: a.sq_psn.get(),
            dest_qp_num: a.dest_qp_num.get(),
            qp_access_flags: Access::from_bits_truncate(a.qp_access_flags.get()),
            pkey_index: a.pkey_index.get(),
            port_num: a.port_num,
            timeout: a.timeout,
            retry_cnt: a.retry_cnt,
            rnr_retry: a.rnr_retry,
            min_rnr_timer: a.min_rnr_timer,
            max_rd_atomic: a.max_rd_atomic,
            max_dest_rd_atomic: a.max_dest_rd_atomic,
            ah_attr: a.ah_attr,
            en_sqd_async_notify: a.en_sqd_async_notify == 1,
        }
    }
}

/// A send work request (`ibv_send_wr`). Build one with [`SendWr::send`], [`SendWr::rdma_write`]
/// and the others, then adjust it with the `with_*` methods.
#[derive(Debug, Clone, Copy)]
pub struct SendWr<'a> {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Operation.
    pub opcode: WrOpcode,
    /// Flags.
    pub flags: SendFlags,
    /// Local buffers (or, with `INLINE`, the bytes to copy into the request).
    pub sg_list: &'a [Sge],
    /// Immediate data (for the `*_WITH_IMM` opcodes), in host order.
    pub imm_data: u32,
    /// Remote address (RDMA and atomics).
    pub remote_addr: u64,
    /// Remote key (RDMA and atomics).
    pub rkey: u32,
    /// Compare value or addend (atomics).
    pub compare_add: u64,
    /// Swap value (compare-and-swap).
    pub swap: u64,
    /// Destination (UD).
    pub ah: Option<&'a AddressHandle>,
    /// Destination QPN (UD).
    pub remote_qpn: u32,
    /// Q_Key (UD).
    pub remote_qkey: u32,
}

impl<'a> SendWr<'a> {
    fn new(wr_id: u64, opcode: WrOpcode, sg_list: &'a [Sge]) -> Self {
        SendWr {
            wr_id,
            opcode,
            flags: SendFlags::SIGNALED,
            sg_list,
            imm_data: 0,
            remote_addr: 0,
            rkey: 0,
            compare_add: 0,
            swap: 0,
            ah: None,
            remote_qpn: 0,
            remote_qkey: 0,
        }
    }

    /// SEND (signalled).
    pub fn send(wr_id: u64, sg_list: &'a [Sge]) -> Self {
        Self::new(wr_id, WrOpcode::Send, sg_list)
    }

    /// UD SEND to `remote_qpn` behind `ah`.
    pub fn ud_send(
        wr_id: u64,
        sg_list: &'a [Sge],
        ah: &'a AddressHandle,
        remote_qpn: u32,
        qkey: u32,
    ) -> Self {
        SendWr {
            ah: Some(ah),
            remote_qpn,
            remote_qkey: qkey,
            ..Self::send(wr_id, sg_list)
        }
    }

    /// RDMA WRITE to `remote_addr` in the MR of `rkey`.
    pub fn rdma_write(wr_id: u64, sg_list: &'a [Sge], remote_addr: u64, rkey: u32) -> Self {
        SendWr {
            remote_addr,
            rkey,
            ..Self::new(wr_id, WrOpcode::RdmaWrite, sg_list)
        }
    }

    /// RDMA READ from `remote_addr` in the MR of `rkey`.
    pub fn rdma_read(wr_id: u64, sg_list: &'a [Sge], remote_addr: u64, rkey: u32) -> Self {
        SendWr {
            remote_addr,
            rkey,
            ..Self::new(wr_id, WrOpcode::RdmaRead, sg_list)
        }
    }

    /// 8-byte compare-and-swap; the old value lands in `sg_list`.
    pub fn compare_swap(
        wr_id: u64,
        sg_list: &'a [Sge],
        remote_addr: u64,
        rkey: u32,
        compare: u64,
        swap: u64,
    ) -> Self {
        SendWr {
            remote_addr,
            rkey,
            compare_add: compare,
            swap,
            ..Self::new(wr_id, WrOpcode::AtomicCmpAndSwp, sg_list)
        }
    }

    /// 8-byte fetch-and-add; the old value lands in `sg_list`.
    pub fn fetch_add(
        wr_id: u64,
        sg_list: &'a [Sge],
        remote_addr: u64,
        rkey: u32,
        add: u64,
    ) -> Self {
        SendWr {
            remote_addr,
            rkey,
            compare_add: add,
            ..Self::new(wr_id, WrOpcode::AtomicFetchAndAdd, sg_list)
        }
    }

    /// Adds immediate data: SEND becomes SEND_WITH_IMM, RDMA WRITE becomes
    /// RDMA_WRITE_WITH_IMM.
    pub fn with_imm(mut self, imm: u32) -> Self {
        self.imm_data = imm;
        self.opcode = match self.opcode {
            WrOpcode::Send => WrOpcode::SendWithImm,
            WrOpcode::RdmaWrite => WrOpcode::RdmaWriteWithImm,
            other => other,
        };
        self
    }

    /// Replaces the flags (e.g. `SendFlags::empty()` for an unsignalled request).
    pub fn with_flags(mut self, flags: SendFlags) -> Self {
        self.flags = flags;
        self
    }
}

/// A receive work request (`ibv_recv_wr`).
#[derive(Debug, Clone, Copy)]
pub struct RecvWr<'a> {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Where received data goes.
    pub sg_list: &'a [Sge],
}

/// A ring the driver produces into (a send, receive or shared receive queue) and its producer
/// index.
#[derive(Debug)]
pub(crate) struct WorkQueue {
    pub(crate) ring: Ring,
    pub(crate) producer: u32,
}

impl WorkQueue {
    /// Writes `wrs` into the ring as receive entries of at most `max_sge` SGEs and publishes
    /// them, then, if it published any, tells `ctx` they are on `posted` (one `POST_RECV` for
    /// the whole call, when the device posts receives ahead of arrival). As in verbs, the
    /// requests before a failing one are posted, so the device is told of them too.
    ///
    /// # Safety
    ///
    /// The memory every SGE names must stay valid and must not be accessed by the caller
    /// until the receive's completion has been polled (the device writes into it).
    pub(crate) unsafe fn post_receives(
        &mut self,
        wrs: &[RecvWr<'_>],
        max_sge: u32,
        ctx: &Inner,
        posted: ReceiveRing,
        verb: &'static str,
    ) -> Result<()> {
        let first = self.producer;
        let geometry = self.ring.geometry();
        let stride = geometry.stride() as usize;
        let mut slot = [0u8; 1024];
        let mut result = Ok(());
        for wr in wrs {
            let consumer = self.ring.load(ring::CONSUMER_OFFSET, Ordering::Acquire);
            if self.producer.wrapping_sub(consumer) >= geometry.depth() {
                result = Err(Error::QueueFull {
                    verb,
                    depth: geometry.depth(),
                });
                break;
            }
            if wr.sg_list.len() > max_sge as usize {
                result = Err(Error::invalid(
                    verb,
                    format!("{} SGEs exceed the queue's {max_sge}", wr.sg_list.len()),
                ));
                break;
            }
            match wqe::encode_recv(&mut slot[..stride], wr.wr_id, wr.sg_list) {
                Ok(n) => {
                    self.ring.write_entry(self.producer, &slot[..n]);
                    self.producer = self.producer.wrapping_add(1);
                }
                Err(source) => {
                    result = Err(Error::Protocol { verb, source });
                    break;
                }
            }
        }
        self.ring
            .store(ring::PRODUCER_OFFSET, self.producer, Ordering::Release);
        if self.producer != first {
            ctx.receives_posted(posted, verb)?;
        }
        result
    }
}

#[derive(Debug)]
struct QpInner {
    pd: Arc<PdInner>,
    _send_cq: Arc<CqInner>,
    _recv_cq: Arc<CqInner>,
    /// The SRQ the QP takes its receives from, kept alive (the device refuses to destroy an
    /// SRQ a QP is attached to) until the QP is destroyed.
    srq: Option<Arc<SrqInner>>,
    qpn: u32,
    qp_type: QpType,
    cap: QpCap,
    sq: Mutex<WorkQueue>,
    /// `None` when the QP takes its receives from an SRQ.
    rq: Option<Mutex<WorkQueue>>,
}

impl Drop for QpInner {
    fn drop(&mut self) {
        self.pd
            .ctx
            .destroy(Opcode::DestroyQp, self.qpn, "ibv_destroy_qp");
    }
}

/// A queue pair (`ibv_qp`).
#[derive(Debug, Clone)]
pub struct QueuePair {
    inner: Arc<QpInner>,
}

impl QueuePair {
    /// Creates a QP in RESET, with a receive queue of its own or, with `init.srq`, taking its
    /// receives from a shared receive queue.
    #[doc(alias = "ibv_create_qp")]
    pub fn new(pd: &ProtectionDomain, init: &QpInitAttr<'_>) -> Result<QueuePair> {
        const VERB: &str = "ibv_create_qp";
        let ctx = &pd.inner.ctx;
        let caps = ctx.caps();
        let mut cap = init.cap;
        cap.max_send_wr = cap
            .max_send_wr
            .max(1)
            .checked_next_power_of_two()
            .unwrap_or(u32::MAX);
        cap.max_recv_wr = cap
            .max_recv_wr
            .max(1)
            .checked_next_power_of_two()
            .unwrap_or(u32::MAX);
        if init.srq.is_some() {
            // No receive queue: verbs ignores these with an SRQ, and the device wants them 0.
            cap.max_recv_wr = 0;
            cap.max_recv_sge = 0;
        }
        let limits = [
            ("max_send_wr", cap.max_send_wr, caps.max_qp_wr.get()),
            ("max_recv_wr", cap.max_recv_wr, caps.max_qp_wr.get()),
            ("max_send_sge", cap.max_send_sge, caps.max_sge.get()),
            ("max_recv_sge", cap.max_recv_sge, caps.max_sge.get()),
            (
                "max_inline_data",
                cap.max_inline_data,
                caps.max_inline_data.get(),
            ),
        ];
        for (name, value, max) in limits {
            if value > max {
                return Err(Error::invalid(
                    VERB,
                    format!("{name} {value} exceeds the device's {max}"),
                ));
            }
        }
        let sq_geometry = ring::Geometry::new(
            cap.max_send_wr,
            wqe::send_stride(cap.max_send_sge, cap.max_inline_data),
        )
        .map_err(|source| Error::Protocol { verb: VERB, source })?;
        let sq = Ring::new(
            ctx.alloc(sq_geometry.byte_len() as usize, ring::ALIGN as usize, VERB)?,
            sq_geometry,
        );
        let rq = match init.srq {
            Some(_) => None,
            None => {
                let geometry =
                    ring::Geometry::new(cap.max_recv_wr, wqe::recv_stride(cap.max_recv_sge))
                        .map_err(|source| Error::Protocol { verb: VERB, source })?;
                Some(Ring::new(
                    ctx.alloc(geometry.byte_len() as usize, ring::ALIGN as usize, VERB)?,
                    geometry,
                ))
            }
        };
        let srqn = init.srq.map_or(0, |srq| srq.srq_num());
        let sq_ring_addr = ctx.ring_addr(sq.addr(), sq.len(), VERB)?;
        let rq_ring_addr = match &rq {
            Some(rq) => ctx.ring_addr(rq.addr(), rq.len(), VERB)?,
            None => 0,
        };
        let body = cmd::CreateQp {
            pdn: pd.inner.pdn.into(),
            qp_type: init.qp_type.raw(),
            sq_sig_all: u8::from(init.sq_sig_all),
            reserved: 0.into(),
            send_cqn: init.send_cq.inner.cqn.into(),
            recv_cqn: init.recv_cq.inner.cqn.into(),
            cap: qp::Caps {
                max_send_wr: cap.max_send_wr.into(),
                max_recv_wr: cap.max_recv_wr.into(),
                max_send_sge: cap.max_send_sge.into(),
                max_recv_sge: cap.max_recv_sge.into(),
                max_inline_data: cap.max_inline_data.into(),
                reserved: 0.into(),
            },
            sq_ring_addr: sq_ring_addr.into(),
            rq_ring_addr: rq_ring_addr.into(),
            srqn: srqn.into(),
            reserved1: 0.into(),
        };
        // Without an SRQ, the body devices that predate SRQs know (§9.12 of docs/protocol.md).
        let body = match init.srq {
            Some(_) => body.as_bytes(),
            None => &body.as_bytes()[..cmd::CREATE_QP_BASE_SIZE],
        };
        let resp: cmd::CreateQpResp = ctx.command_as(Opcode::CreateQp, body, VERB)?;
        Ok(QueuePair {
            inner: Arc::new(QpInner {
                pd: pd.inner.clone(),
                _send_cq: init.send_cq.inner.clone(),
                _recv_cq: init.recv_cq.inner.clone(),
                srq: init.srq.map(|srq| srq.inner.clone()),
                qpn: resp.qpn.get(),
                qp_type: init.qp_type,
                cap,
                sq: Mutex::new(WorkQueue {
                    ring: sq,
                    producer: 0,
                }),
                rq: rq.map(|ring| Mutex::new(WorkQueue { ring, producer: 0 })),
            }),
        })
    }

    /// The QP number.
    pub fn qp_num(&self) -> u32 {
        self.inner.qpn
    }

    /// Its type.
    pub fn qp_type(&self) -> QpType {
        self.inner.qp_type
    }

    /// Queue sizes as created (no receive queue, `max_recv_wr` 0, with an SRQ).
    pub fn cap(&self) -> QpCap {
        self.inner.cap
    }

    /// The number of the SRQ the QP takes its receives from, if it does.
    pub fn srq_num(&self) -> Option<u32> {
        self.inner.srq.as_ref().map(|srq| srq.srqn)
    }

    /// Changes the QP's state and attributes, with the same rules as on hardware.
    #[doc(alias = "ibv_modify_qp")]
    pub fn modify(&self, attr: &QpAttr, mask: QpAttrMask) -> Result<()> {
        let body = cmd::ModifyQp {
            qpn: self.inner.qpn.into(),
            attr_mask: mask.bits().into(),
            attr: attr.to_wire(),
        };
        self.inner
            .pd
            .ctx
            .command(Opcode::ModifyQp, body.as_bytes(), "ibv_modify_qp")?;
        if mask.contains(QpAttrMask::STATE) && attr.qp_state == QpState::Reset {
            // The device dropped queued work; start over from its indices.
            for q in std::iter::once(&self.inner.sq).chain(self.inner.rq.as_ref()) {
                let mut q = q.lock().unwrap_or_else(|p| p.into_inner());
                q.producer = q.ring.load(ring::CONSUMER_OFFSET, Ordering::Acquire);
            }
        }
        Ok(())
    }

    /// The QP's attributes and queue sizes.
    #[doc(alias = "ibv_query_qp")]
    pub fn query(&self) -> Result<(QpAttr, QpCap)> {
        let body = cmd::Handle {
            handle: self.inner.qpn.into(),
            reserved: 0.into(),
        };
        let resp: cmd::QueryQpResp =
            self.inner
                .pd
                .ctx
                .command_as(Opcode::QueryQp, body.as_bytes(), "ibv_query_qp")?;
        let c = resp.cap;
        let cap = QpCap {
            max_send_wr: c.max_send_wr.get(),
            max_recv_wr: c.max_recv_wr.get(),
            max_send_sge: c.max_send_sge.get(),
            max_recv_sge: c.max_recv_sge.get(),
            max_inline_data: c.max_inline_data.get(),
        };
        Ok((QpAttr::from_wire(&resp.attr), cap))
    }

    /// Posts send work requests and rings one doorbell for all of them.
    ///
    /// # Safety
    ///
    /// As with `ibv_post_send`: the memory every SGE names must stay valid, and must not be
    /// written by the caller while the device may read it (or read while the device may write
    /// it), until the request's completion has been polled (or a later signalled request on the
    /// same QP has completed). With `INLINE`, the SGEs' bytes are read during this call.
    #[doc(alias = "ibv_post_send")]
    pub unsafe fn post_send(&self, wrs: &[SendWr<'_>]) -> Result<()> {
        const VERB: &str = "ibv_post_send";
        let mut sq = self.inner.sq.lock().unwrap_or_else(|p| p.into_inner());
        let geometry = sq.ring.geometry();
        let mut slot = [0u8; 2048];
        let stride = geometry.stride() as usize;
        let mut outcome = Ok(());
        for wr in wrs {
            let consumer = sq.ring.load(ring::CONSUMER_OFFSET, Ordering::Acquire);
            if sq.producer.wrapping_sub(consumer) >= geometry.depth() {
                outcome = Err(Error::QueueFull {
                    verb: VERB,
                    depth: geometry.depth(),
                });
                break;
            }
            // SAFETY: this function's contract is the one `encode_send_wr` needs.
            match unsafe { self.encode_send_wr(wr, &mut slot[..stride]) } {
                Ok(n) => {
                    sq.ring.write_entry(sq.producer, &slot[..n]);
                    sq.producer = sq.producer.wrapping_add(1);
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        // As in verbs, the requests before a failing one are posted (`bad_wr` is the first
        // one that is not).
        self.publish_send(&sq)?;
        outcome
    }

    /// Encodes one send work request into `slot`; returns the bytes written.
    ///
    /// # Safety
    ///
    /// With `INLINE`, every SGE must name `length` readable bytes at `addr` (as
    /// [`QueuePair::post_send`] requires of its caller).
    unsafe fn encode_send_wr(&self, wr: &SendWr<'_>, slot: &mut [u8]) -> Result<usize> {
        const VERB: &str = "ibv_post_send";
        let header = self.send_header(wr)?;
        let mut inline = [0u8; 1024];
        let data = if wr.flags.contains(SendFlags::INLINE) {
            let total: usize = wr.sg_list.iter().map(|s| s.length.get() as usize).sum();
            if total > self.inner.cap.max_inline_data as usize {
                return Err(Error::invalid(
                    VERB,
                    format!(
                        "{total} inline bytes exceed the QP's {}",
                        self.inner.cap.max_inline_data
                    ),
                ));
            }
            let mut at = 0;
            for sge in wr.sg_list {
                let n = sge.length.get() as usize;
                // SAFETY: the caller guarantees (this function's contract) that every SGE names
                // `length` readable bytes at `addr`.
                let src = unsafe { std::slice::from_raw_parts(sge.addr.get() as *const u8, n) };
                inline[at..at + n].copy_from_slice(src);
                at += n;
            }
            wqe::Data::Inline(&inline[..at])
        } else {
            if wr.sg_list.len() > self.inner.cap.max_send_sge as usize {
                return Err(Error::invalid(
                    VERB,
                    format!(
                        "{} SGEs exceed the QP's {}",
                        wr.sg_list.len(),
                        self.inner.cap.max_send_sge
                    ),
                ));
            }
            wqe::Data::Sges(wr.sg_list)
        };
        wqe::encode_send(slot, header, data)
            .map_err(|source| Error::Protocol { verb: VERB, source })
    }

    fn send_header(&self, wr: &SendWr<'_>) -> Result<wqe::SendHeader> {
        let mut h = wqe::SendHeader {
            wr_id: wr.wr_id.into(),
            opcode: wr.opcode.raw(),
            send_flags: wr.flags.bits(),
            imm_data: wr.imm_data.to_be_bytes(),
            rkey: wr.rkey.into(),
            remote_addr: wr.remote_addr.into(),
            compare_add: wr.compare_add.into(),
            swap: wr.swap.into(),
            ..wqe::SendHeader::default()
        };
        if self.inner.qp_type == QpType::Ud {
            let ah = wr.ah.ok_or_else(|| {
                Error::invalid("ibv_post_send", "a UD send needs an address handle")
            })?;
            h.ah = ah.handle().into();
            h.remote_qpn = wr.remote_qpn.into();
            h.remote_qkey = wr.remote_qkey.into();
        }
        Ok(h)
    }

    fn publish_send(&self, sq: &WorkQueue) -> Result<()> {
        sq.ring
            .store(ring::PRODUCER_OFFSET, sq.producer, Ordering::Release);
        // The device polls this ring while it has work on it, and then reads the producer
        // index again before it stops (protocol §11): no doorbell needed. The full fence
        // orders the producer store before the load, pairing with the device's.
        std::sync::atomic::fence(Ordering::SeqCst);
        if sq.ring.load(ring::SEND_POLLING_OFFSET, Ordering::Relaxed) != 0 {
            return Ok(());
        }
        let qpn = self.inner.qpn;
        self.inner.pd.ctx.ring(
            &[Doorbell::new(doorbell::Kind::Send, qpn)],
            qpn as u16,
            "ibv_post_send",
        )
    }

    /// Posts receive work requests.
    ///
    /// Fails (`EINVAL`, as `rxe`) for a QP attached to an SRQ, which has no receive queue:
    /// post with [`SharedReceiveQueue::post_recv`] instead.
    ///
    /// # Safety
    ///
    /// As with `ibv_post_recv`: the memory every SGE names must stay valid and must not be
    /// accessed by the caller until the receive's completion has been polled.
    #[doc(alias = "ibv_post_recv")]
    pub unsafe fn post_recv(&self, wrs: &[RecvWr<'_>]) -> Result<()> {
        const VERB: &str = "ibv_post_recv";
        let Some(rq) = &self.inner.rq else {
            return Err(Error::invalid(
                VERB,
                format!(
                    "QP {:#x} takes its receives from SRQ {:#x}: post them to the SRQ",
                    self.inner.qpn,
                    self.srq_num().unwrap_or(0)
                ),
            ));
        };
        let mut rq = rq.lock().unwrap_or_else(|p| p.into_inner());
        let posted = ReceiveRing::Qp(self.inner.qpn);
        let ctx = &self.inner.pd.ctx;
        // SAFETY: this function's contract is the one `post_receives` needs.
        unsafe { rq.post_receives(wrs, self.inner.cap.max_recv_sge, ctx, posted, VERB) }
    }
}
