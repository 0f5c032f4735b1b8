use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vrdma_proto::cmd::{self, Opcode};
use vrdma_proto::cqe::{self, Cqe};
use vrdma_proto::{Gid, event, ring};
use zerocopy::IntoBytes;

use super::context::{Context, Inner};
use super::ring::Ring;
use super::{Error, Result};

/// Completion status (`ibv_wc_status`).
pub type WcStatus = cqe::Status;
/// Completion opcode (`ibv_wc_opcode`).
pub type WcOpcode = cqe::Opcode;

/// One work completion (`ibv_wc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The work request's `wr_id`.
    pub wr_id: u64,
    /// Its status.
    pub status: WcStatus,
    /// What completed.
    pub opcode: WcOpcode,
    /// vrdma's detail of an error (`cqe::VendorErr` values).
    pub vendor_err: u32,
    /// Bytes transferred.
    pub byte_len: u32,
    /// Immediate data, as the sender gave it.
    pub imm_data: Option<u32>,
    /// The local QP.
    pub qp_num: u32,
    /// The sending QP (receives).
    pub src_qp: u32,
    /// Whether a GRH starts the receive buffer (UD).
    pub grh: bool,
    /// The sender's GID (UD receives).
    pub sgid: Gid,
}

/// A blank completion, to fill the array given to [`CompletionQueue::poll`].
impl Default for WorkCompletion {
    fn default() -> Self {
        WorkCompletion {
            wr_id: 0,
            status: WcStatus::Success,
            opcode: WcOpcode::Send,
            vendor_err: 0,
            byte_len: 0,
            imm_data: None,
            qp_num: 0,
            src_qp: 0,
            grh: false,
            sgid: Gid::default(),
        }
    }
}

impl WorkCompletion {
    fn from_cqe(c: &cqe::Completion) -> Self {
        let e = &c.cqe;
        WorkCompletion {
            wr_id: e.wr_id.get(),
            status: c.status,
            opcode: c.opcode,
            vendor_err: e.vendor_err.get(),
            byte_len: e.byte_len.get(),
            imm_data: c
                .flags
                .contains(cqe::Flags::WITH_IMM)
                .then(|| u32::from_be_bytes(e.imm_data)),
            qp_num: e.qp_num.get(),
            src_qp: e.src_qp.get(),
            grh: c.flags.contains(cqe::Flags::GRH),
            sgid: e.sgid,
        }
    }
}

#[derive(Debug)]
struct CqState {
    consumer: u32,
    arm_sequence: u32,
}

#[derive(Debug)]
pub(crate) struct CqInner {
    pub(crate) ctx: Arc<Inner>,
    pub(crate) cqn: u32,
    ring: Ring,
    state: Mutex<CqState>,
}

impl Drop for CqInner {
    fn drop(&mut self) {
        self.ctx
            .destroy(Opcode::DestroyCq, self.cqn, "ibv_destroy_cq");
    }
}

/// A completion queue (`ibv_cq`).
#[derive(Debug, Clone)]
pub struct CompletionQueue {
    pub(crate) inner: Arc<CqInner>,
}

impl CompletionQueue {
    /// Creates a CQ of at least `cqe` entries (rounded up to a power of two).
    #[doc(alias = "ibv_create_cq")]
    pub fn new(ctx: &Context, cqe: u32) -> Result<CompletionQueue> {
        const VERB: &str = "ibv_create_cq";
        let depth = cqe.max(1).checked_next_power_of_two().unwrap_or(u32::MAX);
        let max = ctx.inner.caps().max_cqe.get();
        if depth > max {
            return Err(Error::invalid(
                VERB,
                format!("{cqe} entries exceed the device's {max}"),
            ));
        }
        let geometry = ring::Geometry::new(depth, cqe::SIZE)
            .map_err(|source| Error::Protocol { verb: VERB, source })?;
        let buf = ctx
            .inner
            .alloc(geometry.byte_len() as usize, ring::ALIGN as usize, VERB)?;
        let ring = Ring::new(buf, geometry);
        let body = cmd::CreateCq {
            cqe: depth.into(),
            reserved: 0.into(),
            ring_addr: ctx.inner.ring_addr(ring.addr(), ring.len(), VERB)?.into(),
        };
        let resp: cmd::CreateCqResp =
            ctx.inner
                .command_as(Opcode::CreateCq, body.as_bytes(), VERB)?;
        Ok(CompletionQueue {
            inner: Arc::new(CqInner {
                ctx: ctx.inner.clone(),
                cqn: resp.cqn.get(),
                ring,
                state: Mutex::new(CqState {
                    consumer: 0,
                    arm_sequence: 0,
                }),
            }),
        })
    }

    /// The CQ number.
    pub fn handle(&self) -> u32 {
        self.inner.cqn
    }

    /// Entries.
    pub fn depth(&self) -> u32 {
        self.inner.ring.geometry().depth()
    }

    /// Takes up to `out.len()` completions, oldest first. Returns how many.
    #[doc(alias = "ibv_poll_cq")]
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize> {
        let ring = &self.inner.ring;
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let producer = ring.load(ring::PRODUCER_OFFSET, Ordering::Acquire);
        let mut n = 0;
        while n < out.len() && state.consumer != producer {
            let mut raw = Cqe::default();
            ring.read_entry(state.consumer, raw.as_mut_bytes());
            let c = Cqe::decode(raw.as_bytes()).map_err(|source| Error::Protocol {
                verb: "ibv_poll_cq",
                source,
            })?;
            out[n] = WorkCompletion::from_cqe(&c);
            n += 1;
            state.consumer = state.consumer.wrapping_add(1);
        }
        if n > 0 {
            ring.store(ring::CONSUMER_OFFSET, state.consumer, Ordering::Release);
        }
        Ok(n)
    }

    /// Arms the CQ: the next completion (a solicited or error one with `solicited_only`)
    /// raises one event on the context's completion channel. As in verbs, completions already
    /// in the CQ raise none: poll after arming.
    #[doc(alias = "ibv_req_notify_cq")]
    pub fn req_notify(&self, solicited_only: bool) -> Result<()> {
        let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        state.arm_sequence = state.arm_sequence.wrapping_add(1) & ring::ARM_SEQ_MASK;
        let word = ring::arm_word(state.arm_sequence, solicited_only);
        self.inner
            .ring
            .store(ring::ARM_OFFSET, word, Ordering::SeqCst);
        // Pairs with the device's fence after storing the producer index (docs/protocol.md).
        Ring::full_fence();
        Ok(())
    }

    /// Arms the CQ through the control queue (`REQ_NOTIFY_CQ`) and returns how many
    /// completions were already waiting.
    pub fn req_notify_by_command(&self, solicited_only: bool) -> Result<u32> {
        let flags = if solicited_only {
            cmd::NotifyFlags::SOLICITED_ONLY
        } else {
            cmd::NotifyFlags::empty()
        };
        let body = cmd::ReqNotifyCq {
            cqn: self.inner.cqn.into(),
            flags: flags.bits().into(),
        };
        let resp: cmd::ReqNotifyCqResp =
            self.inner
                .ctx
                .command_as(Opcode::ReqNotifyCq, body.as_bytes(), "ibv_req_notify_cq")?;
        let (sequence, _) =
            ring::split_arm_word(self.inner.ring.load(ring::ARM_OFFSET, Ordering::Acquire));
        self.inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .arm_sequence = sequence;
        Ok(resp.pending.get())
    }
}

/// What [`CompletionChannel::take_all_events`] found.
#[derive(Debug, Default)]
pub struct ChannelEvents {
    /// The CQ numbers of completion events, oldest first.
    pub completions: Vec<u32>,
    /// Asynchronous events, each with the handle it names (QPN, CQN or SRQ number).
    pub asynchronous: Vec<(AsyncEventKind, u32)>,
}

/// The kind of an asynchronous event (`ibv_event_type`), as
/// [`CompletionChannel::take_async_events`] returns it with the handle it names: among them
/// `QpFatal`, `CqErr`, `SqDrained`, and for shared receive queues `SrqLimitReached` and
/// `SrqErr` (naming the SRQ) and `QpLastWqeReached` (naming a QP attached to one).
pub type AsyncEventKind = event::Kind;

/// A completion channel (`ibv_comp_channel`): a file descriptor that becomes readable when an
/// armed CQ gets a completion. It works with poll and epoll.
#[derive(Debug)]
pub struct CompletionChannel {
    ctx: Arc<Inner>,
    pending: Mutex<VecDeque<u32>>,
    async_events: Mutex<VecDeque<(AsyncEventKind, u32)>>,
    epoll: Epoll,
}

impl CompletionChannel {
    /// A channel for the context's CQs.
    #[doc(alias = "ibv_create_comp_channel")]
    pub fn new(ctx: &Context) -> Result<CompletionChannel> {
        let epoll = Epoll::new().map_err(|e| Error::Transport {
            verb: "ibv_create_comp_channel",
            source: Box::new(e),
        })?;
        epoll
            .ctl(
                ControlOperation::Add,
                ctx.inner.event_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(|e| Error::Transport {
                verb: "ibv_create_comp_channel",
                source: Box::new(e),
            })?;
        // So that a wait ends with an error when the device goes away, not at its timeout
        // (or never).
        if let Some(fd) = ctx.inner.hangup_fd() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::READ_HANG_UP, 1),
                )
                .map_err(|e| Error::Transport {
                    verb: "ibv_create_comp_channel",
                    source: Box::new(e),
                })?;
        }
        Ok(CompletionChannel {
            ctx: ctx.inner.clone(),
            pending: Mutex::new(VecDeque::new()),
            async_events: Mutex::new(VecDeque::new()),
            epoll,
        })
    }

    /// The file descriptor to wait on.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.ctx.event_fd()
    }

    /// Waits up to `timeout` (for ever with `None`) for a CQ event and returns the CQ's number,
    /// or `None` on timeout.
    #[doc(alias = "ibv_get_cq_event")]
    pub fn get_cq_event(&self, timeout: Option<Duration>) -> Result<Option<u32>> {
        const VERB: &str = "ibv_get_cq_event";
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(cqn) = self.pop_pending() {
                return Ok(Some(cqn));
            }
            // No pass over the event queue before the wait: every event the device has used
            // since the last pass signalled the fd, which that pass reset before reading the
            // queue, so the wait ends at once if one is there. A message in event mode then
            // costs its wake-up, one wait and one pass (two system calls), not two passes and
            // a look for a hang-up besides (five).
            let wait_ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    // Zero left still looks once, without waiting.
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
            };
            let mut events = [EpollEvent::default(); 1];
            match self.epoll.wait(wait_ms, &mut events) {
                // The event fd, or the device's hang-up (which the pass reports when it finds
                // no event).
                Ok(n) if n > 0 => self.collect(VERB)?,
                Ok(_) => {
                    if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                        return Ok(None);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Transport {
                        verb: VERB,
                        source: Box::new(e),
                    });
                }
            }
        }
    }

    fn pop_pending(&self) -> Option<u32> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// Every event received so far, in one pass over the device's event queue: the CQ numbers
    /// of completion events, oldest first, and the asynchronous events. A caller that waits
    /// for [`Context::event_fd`] to be readable and then calls this misses nothing: the pass
    /// resets the fd before it reads the queue, so any later event makes it readable again.
    /// (Calling [`CompletionChannel::get_cq_event`] and then
    /// [`CompletionChannel::take_async_events`] makes two passes, and completion events the
    /// second one finds wait, with the fd reset, until the next call.)
    pub fn take_all_events(&self) -> Result<ChannelEvents> {
        self.collect("ibv_get_cq_event")?;
        let completions = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        let asynchronous = self
            .async_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        Ok(ChannelEvents {
            completions,
            asynchronous,
        })
    }

    /// Asynchronous events (QP fatal, CQ error, SQ drained, SRQ limit reached, last WQE
    /// reached...) received so far, each with the handle it names (QPN, CQN or SRQ number).
    #[doc(alias = "ibv_get_async_event")]
    pub fn take_async_events(&self) -> Result<Vec<(AsyncEventKind, u32)>> {
        self.collect("ibv_get_async_event")?;
        Ok(self
            .async_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect())
    }

    fn collect(&self, verb: &'static str) -> Result<()> {
        for ev in self.ctx.drain_events(verb)? {
            if ev.kind == event::Kind::CqCompletion {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back(ev.handle);
            } else {
                self.async_events
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back((ev.kind, ev.handle));
            }
        }
        Ok(())
    }
}
