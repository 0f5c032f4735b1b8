//! The requester: work requests into packets, the window, go-back-N, and completions from
//! ACKs, NAKs and READ and atomic responses.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::debug;
use vrdma_proto::cqe::{Status, VendorErr};
use vrdma_proto::wqe::{self, Opcode, Payload, SendFlags};
use vrdma_proto::{Gid, qp};
use vrdma_roce::aeth::{Aeth, NakCode, Syndrome};
use vrdma_roce::atomic::AtomicEth;
use vrdma_roce::bth::Bth;
use vrdma_roce::deth::Deth;
use vrdma_roce::imm::ImmDt;
use vrdma_roce::opcode::Opcode as Op;
use vrdma_roce::packet::{Extensions, Packet};
use vrdma_roce::reth::Reth;
use zerocopy::FromBytes;

use super::batch::Batch;
use super::endpoint::{Counters, Endpoint};
use super::psn::{PSN_MASK, mtu_of, psn_add, psn_diff};
use crate::fabric::{StepOutcome, WR_COST};
use crate::model::memory::{self, CopyCut, GuestMem, Runs, WriteKind};
use crate::model::objects::{Qp, VmObjects, sge_runs};
use crate::model::qp_state::{MAX_SEND_SLOT, RC_WINDOW, RcTransport, Retries, Sent};
use crate::model::vm::Vm;
use crate::rnic::completion::ring_fatal;
use crate::rnic::requester::{
    Posted, Retired, check_wr, fail_head, fail_wr, read_send_slot, retire_head, sq_drained,
    sq_posted,
};

pub use crate::model::qp_state::MAX_UNACKED;

/// The smallest window a lossy path shrinks a QP's to.
const MIN_WINDOW: u32 = 8;

/// A long message asks for an ACK at least this often, so the requester's window moves before
/// the message ends.
const ACK_EVERY: u32 = 64;

/// The requester's ACK timeout when the QP's `timeout` is 0 (infinite on hardware): a peer that
/// vanished must not hold a work request forever in a daemon serving many tenants.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// The shortest ACK timeout: a software transport's round trip includes scheduling delays of
/// milliseconds, and a shorter timer only retransmits what is still on its way (rxe's timer
/// has the same floor, one kernel tick).
const MIN_TIMEOUT: Duration = Duration::from_millis(4);

/// How soon an ACK timer that expired while the receive thread was behind looks again.
const RX_BEHIND_RECHECK: Duration = Duration::from_millis(1);

/// The requester's buffers, owned by the scheduler so sending allocates nothing.
#[derive(Debug)]
pub struct TxBuffers {
    payload: Box<[u8]>,
    /// Packets waiting to be sent; the scheduler flushes them after each step.
    pub batch: Batch,
}

impl Default for TxBuffers {
    fn default() -> Self {
        TxBuffers {
            payload: vec![0; 4096].into_boxed_slice(),
            batch: Batch::default(),
        }
    }
}

fn timeout_of(qp: &Qp) -> Duration {
    qp::ack_timeout_micros(qp.attr.timeout)
        .map(Duration::from_micros)
        .unwrap_or(DEFAULT_TIMEOUT)
        .max(MIN_TIMEOUT)
}

/// PSNs a work request takes: one per packet, and a READ one per response packet.
pub fn psns_for(opcode: Opcode, len: u32, mtu: u32) -> u32 {
    if opcode.is_atomic() {
        1
    } else {
        len.div_ceil(mtu).max(1)
    }
}

/// The scheduler's step for an RC QP whose peer is on another host, sending from `ep`:
/// retransmits if the oldest packet timed out or a NAK asked for it, then sends new packets
/// within the window and `budget`, or until `cut`, asked between packets, ends the step.
#[allow(clippy::too_many_arguments)]
pub fn step_rc(
    ep: &Arc<Endpoint>,
    bufs: &mut TxBuffers,
    a: &Vm,
    av: &mut VmObjects,
    mem: &GuestMem,
    qpn: u32,
    budget: u32,
    cut: Option<CopyCut<'_>>,
) -> StepOutcome {
    let Some(qp) = av.qps.get_mut(qpn) else {
        return StepOutcome::IDLE;
    };
    let now = Instant::now();
    let (retry_cnt, timeout) = (qp.attr.retry_cnt, timeout_of(qp));
    let sqd = qp.state() == qp::State::Sqd;
    let (sq_head, una, next) = (qp.rt.sq_head, qp.rt.psns.una, qp.rt.psns.next);
    if !qp.rt.rc.started {
        // A QP whose peer was on this daemon (or on the one it migrated from) may be in the
        // middle of a work request moved by local copies: on the wire it starts again from
        // its first byte, as a message the peer has not seen (copies into the peer's memory
        // are idempotent, and a receive is consumed only at a message's last byte).
        qp.rt.inflight = Default::default();
        qp.rt.retries = Retries::full(&qp.attr);
        let t = &mut qp.rt.rc;
        t.started = true;
        t.cwnd = MAX_UNACKED;
        t.sq_next = sq_head;
        t.sq_max = sq_head;
        t.psn_max = next;
    }
    let t = &mut qp.rt.rc;
    let outstanding = una != t.psn_max;
    if t.timer_at.is_some_and(|at| at <= now) {
        t.timer_at = None;
    }
    if let Some(until) = t.rnr_until {
        if now < until {
            return StepOutcome {
                timer: arm_timer(t, until),
                ..StepOutcome::IDLE
            };
        }
        t.rnr_until = None;
        t.rewind = true;
    }
    let expired = t.deadline.filter(|&d| outstanding && now >= d);
    if let Some(deadline) = expired.filter(|&d| !ep.caught_up(d)) {
        // Datagrams that reached this address before the deadline are still unread: the
        // answer may be among them, waiting for a receive thread the host has not run yet.
        // The timer is about the peer, so its silence is judged once they are read; no
        // retry is spent and nothing is resent meanwhile.
        log::trace!(
            "vm {}: QP {qpn:#x}: ACK timer of {:?} ago waits for the receive thread",
            a.name,
            now - deadline
        );
        ep.counters.timer_deferred.fetch_add(1, Ordering::Relaxed);
        t.deadline = Some(now + RX_BEHIND_RECHECK);
    } else if expired.is_some() {
        if !qp.rt.retries.take_transport() {
            debug!(
                "vm {}: QP {qpn:#x}: no answer after {retry_cnt} retries; RETRY_EXC_ERR",
                a.name
            );
            fail_oldest(
                av,
                a,
                mem,
                qpn,
                Status::RetryExcErr,
                VendorErr::PeerUnreachable,
            );
            return StepOutcome {
                wrs: 0,
                ..StepOutcome::FAILED
            };
        }
        let t = &mut qp.rt.rc;
        t.rewind = true;
        t.deadline = None;
    }
    if qp.rt.rc.rewind {
        qp.rt.rc.rewind = false;
        if !go_back(av, a, mem, qpn, &ep.counters) {
            return StepOutcome::IDLE;
        }
    }
    let (mut cost, mut bytes, mut wrs) = (0u32, 0u32, 0u32);
    let mut more = false;
    // The cost at which `cut` is next asked: it is asked between packets, not before the
    // first, so every step moves something.
    let mut ask_at = cut.map_or(u32::MAX, |c| c.every.max(1));
    loop {
        if cost >= budget {
            more = true;
            break;
        }
        if cost >= ask_at {
            if cut.is_some_and(|c| (c.stop)()) {
                more = true;
                break;
            }
            ask_at = cost.saturating_add(cut.map_or(u32::MAX, |c| c.every.max(1)));
        }
        let Some(qp) = av.qps.get(qpn) else {
            return StepOutcome::IDLE;
        };
        if !qp.rt.inflight.active {
            // A draining VM sends again what is on the wire (go-back-N) but starts nothing
            // the peer has not seen.
            let new_work = qp.rt.rc.sq_next == qp.rt.rc.sq_max;
            if sqd || (new_work && a.share.is_draining()) {
                break;
            }
            match begin_wr(av, a, mem, qpn) {
                Begin::Started { first_time } => {
                    cost += WR_COST;
                    wrs += u32::from(first_time);
                }
                Begin::Full | Begin::Empty | Begin::Wait => break,
                Begin::Failed { retired } => {
                    cost += WR_COST;
                    wrs += u32::from(retired);
                    more = true;
                    break;
                }
            }
        }
        match send_next(ep, bufs, a, av, mem, qpn) {
            Sent1::Sent { payload, moves } => {
                cost += payload.max(1);
                bytes = bytes.saturating_add(moves);
            }
            Sent1::WindowFull => break,
            Sent1::Failed => {
                cost += WR_COST;
                break;
            }
        }
    }
    let Some(qp) = av.qps.get_mut(qpn) else {
        return StepOutcome::IDLE;
    };
    let outstanding = qp.rt.psns.una != qp.rt.rc.psn_max;
    let t = &mut qp.rt.rc;
    if outstanding && t.deadline.is_none() {
        t.deadline = Some(Instant::now() + timeout);
    }
    if !outstanding {
        t.deadline = None;
    }
    let drained = sqd && !outstanding && !qp.rt.inflight.active && qp.rt.sq_head == t.sq_max;
    if drained {
        sq_drained(av, a, qpn);
    }
    let Some(qp) = av.qps.get_mut(qpn) else {
        return StepOutcome::IDLE;
    };
    let t = &mut qp.rt.rc;
    let want = match (t.deadline, t.rnr_until) {
        (Some(d), Some(r)) => Some(d.min(r)),
        (d, r) => d.or(r),
    };
    let timer = want.and_then(|at| arm_timer(t, at));
    let mut outcome = if cost > 0 {
        StepOutcome::progress(cost, more, bytes, wrs)
    } else {
        StepOutcome::IDLE
    };
    outcome.timer = timer;
    outcome
}

/// Arms the scheduler's timer for `at`, unless one is pending that fires no later. One timer
/// per QP in the scheduler's heap at a time: a deadline that moved later is re-armed when the
/// earlier timer fires and the step finds it early.
fn arm_timer(t: &mut RcTransport, at: Instant) -> Option<Instant> {
    if t.timer_at.is_some_and(|pending| pending <= at) {
        return None;
    }
    t.timer_at = Some(at);
    Some(at)
}

enum Begin {
    /// It is on its way; `first_time` unless a go-back-N is sending it again.
    Started {
        first_time: bool,
    },
    Empty,
    Full,
    /// The next work request cannot start until those before it complete.
    Wait,
    /// It (or the ring) failed; `retired` if a work request completed with an error.
    Failed {
        retired: bool,
    },
}

/// Copies the work request at `sq_next` into `inflight` and records it as sent.
fn begin_wr(av: &mut VmObjects, a: &Vm, mem: &GuestMem, qpn: u32) -> Begin {
    let Some(qp) = av.qps.get(qpn) else {
        return Begin::Empty;
    };
    let taken = qp.rt.rc.sq_next.wrapping_sub(qp.rt.sq_head);
    if taken as usize >= RC_WINDOW {
        return Begin::Full;
    }
    match sq_posted(av, a, mem, qpn, taken) {
        Posted::More => {}
        Posted::Nothing => return Begin::Empty,
        Posted::Fatal => return Begin::Failed { retired: false },
    }
    let Some(qp) = av.qps.get(qpn) else {
        return Begin::Empty;
    };
    let t = &qp.rt.rc;
    let index = t.sq_next;
    let at_head = index == qp.rt.sq_head;
    let mut slot = [0u8; MAX_SEND_SLOT];
    if !read_send_slot(qp, mem, index, &mut slot) {
        ring_fatal(av, a, mem, qpn, VendorErr::GuestMemory);
        return Begin::Failed { retired: false };
    }
    let (mtu, next_psn) = (mtu_of(qp), qp.rt.psns.next);
    // READs and atomics outstanding are limited by max_rd_atomic, as on an RNIC: the
    // responder keeps only that many atomic results for replays.
    let reads_out = (0..index.wrapping_sub(qp.rt.sq_head))
        .map(|k| qp.rt.sq_head.wrapping_add(k))
        .filter(|&i| {
            Opcode::from_raw(t.sent(i).opcode).is_ok_and(|o| o == Opcode::RdmaRead || o.is_atomic())
        })
        .count();
    let read_like = wqe::SendHeader::read_from_prefix(&slot)
        .ok()
        .and_then(|(h, _)| Opcode::from_raw(h.opcode).ok())
        .is_some_and(|o| o == Opcode::RdmaRead || o.is_atomic());
    if read_like && reads_out >= usize::from(qp.attr.max_rd_atomic.max(1)) {
        return Begin::Wait;
    }
    let checked = match wqe::decode_send(&slot, qp.send_limits()) {
        Err(_) => Err((Status::LocQpOpErr, VendorErr::MalformedWqe)),
        Ok(wr) => check_wr(av, qp, &wr).map(|()| {
            let signaled = qp.sq_sig_all || wr.flags.contains(SendFlags::SIGNALED);
            Sent {
                first_psn: next_psn,
                last_psn: psn_add(next_psn, psns_for(wr.opcode, wr.byte_len, mtu) - 1),
                wr_id: wr.header.wr_id.get(),
                opcode: wr.opcode.raw(),
                signaled,
                len: wr.byte_len,
            }
        }),
    };
    let sent = match checked {
        Ok(s) => s,
        Err((status, vendor)) => {
            // Completions are in order: a bad request fails once all before it have completed.
            if !at_head {
                return Begin::Wait;
            }
            let Some(qp) = av.qps.get_mut(qpn) else {
                return Begin::Empty;
            };
            qp.rt.inflight.slot = slot;
            qp.rt.inflight.active = true;
            fail_wr(av, a, mem, qpn, status, vendor);
            return Begin::Failed { retired: true };
        }
    };
    let Some(qp) = av.qps.get_mut(qpn) else {
        return Begin::Empty;
    };
    qp.rt.inflight.slot = slot;
    qp.rt.inflight.active = true;
    let t = &mut qp.rt.rc;
    t.records().sent[index as usize % RC_WINDOW] = sent;
    let first_time = index == t.sq_max;
    if first_time {
        t.sq_max = index.wrapping_add(1);
    }
    Begin::Started { first_time }
}

enum Sent1 {
    /// A packet went out carrying `payload` bytes, asking for `moves` bytes to be moved (its
    /// payload; what a READ request asks for).
    Sent {
        payload: u32,
        moves: u32,
    },
    WindowFull,
    Failed,
}

/// Sends the next packet of the work request in `inflight`.
fn send_next(
    ep: &Arc<Endpoint>,
    bufs: &mut TxBuffers,
    a: &Vm,
    av: &mut VmObjects,
    mem: &GuestMem,
    qpn: u32,
) -> Sent1 {
    let Some(qp) = av.qps.get(qpn) else {
        return Sent1::Failed;
    };
    let psns = qp.rt.psns;
    if psn_diff(psns.next, psns.una) as u32 >= qp.rt.rc.cwnd {
        return Sent1::WindowFull;
    }
    let t = &qp.rt.rc;
    let index = t.sq_next;
    let sent = t.sent(index);
    let slot = qp.rt.inflight.slot;
    let Ok(wr) = wqe::decode_send(&slot, qp.send_limits()) else {
        // Decoded when it started; a retransmission re-reads the ring, which the guest may
        // have overwritten under its own request.
        fail_oldest(av, a, mem, qpn, Status::LocQpOpErr, VendorErr::MalformedWqe);
        return Sent1::Failed;
    };
    let mtu = mtu_of(qp);
    let k = psn_diff(psns.next, sent.first_psn).max(0) as u32;
    let npsn = psn_diff(sent.last_psn, sent.first_psn) as u32 + 1;
    let (dest, peer) = (qp.attr.dest_qp_num.get(), qp.attr.ah_attr.dgid);
    let tos = ep.tos(a, qp);
    let psn = psns.next;
    let first = k == 0;
    let last = k + 1 >= npsn;
    let off = k.saturating_mul(mtu);
    let header = &wr.header;
    let mut ext = Extensions::default();
    let mut n = 0u32;
    // What this packet moves for the requester: its payload, what a READ asks for, or an
    // atomic's 8 bytes (as the soft fabric counts them).
    let mut moves = if wr.opcode.is_atomic() {
        wqe::ATOMIC_SIZE
    } else {
        0
    };
    let (op, advance) = match wr.opcode {
        Opcode::RdmaRead => {
            let rest = wr.byte_len.saturating_sub(off);
            moves = rest;
            ext.reth = Some(Reth::new(
                header.remote_addr.get().wrapping_add(u64::from(off)),
                header.rkey.get(),
                rest,
            ));
            (Op::RcReadRequest, npsn - k)
        }
        Opcode::AtomicCmpAndSwp => {
            ext.atomic = Some(AtomicEth::compare_swap(
                header.remote_addr.get(),
                header.rkey.get(),
                header.compare_add.get(),
                header.swap.get(),
            ));
            (Op::RcCompareSwap, 1)
        }
        Opcode::AtomicFetchAndAdd => {
            ext.atomic = Some(AtomicEth::fetch_add(
                header.remote_addr.get(),
                header.rkey.get(),
                header.compare_add.get(),
            ));
            (Op::RcFetchAdd, 1)
        }
        Opcode::Send | Opcode::SendWithImm | Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => {
            n = wr.byte_len.saturating_sub(off).min(mtu);
            let payload = &mut bufs.payload[..n as usize];
            let read = match wr.payload {
                Payload::Inline(bytes) => bytes
                    .get(off as usize..(off + n) as usize)
                    .map(|b| payload.copy_from_slice(b))
                    .ok_or(VendorErr::MalformedWqe),
                Payload::Sges(sges) => {
                    let mut runs = Runs::default();
                    sge_runs(&av.mrs, sges, off, n, &mut runs)
                        .and_then(|()| memory::read_runs(mem, runs.as_slice(), payload))
                }
            };
            if let Err(v) = read {
                // The guest changed its memory table under its own request.
                return fail_local(av, a, mem, qpn, index, v);
            }
            let imm = wr.opcode.has_imm() && last;
            if imm {
                ext.imm = Some(ImmDt::from_bytes(header.imm_data));
            }
            let write = matches!(wr.opcode, Opcode::RdmaWrite | Opcode::RdmaWriteWithImm);
            if write && first {
                ext.reth = Some(Reth::new(
                    header.remote_addr.get(),
                    header.rkey.get(),
                    wr.byte_len,
                ));
            }
            let op = match (write, first, last, imm) {
                (false, true, true, false) => Op::RcSendOnly,
                (false, true, true, true) => Op::RcSendOnlyWithImm,
                (false, true, false, _) => Op::RcSendFirst,
                (false, false, false, _) => Op::RcSendMiddle,
                (false, false, true, false) => Op::RcSendLast,
                (false, false, true, true) => Op::RcSendLastWithImm,
                (true, true, true, false) => Op::RcWriteOnly,
                (true, true, true, true) => Op::RcWriteOnlyWithImm,
                (true, true, false, _) => Op::RcWriteFirst,
                (true, false, false, _) => Op::RcWriteMiddle,
                (true, false, true, false) => Op::RcWriteLast,
                (true, false, true, true) => Op::RcWriteLastWithImm,
            };
            (op, 1)
        }
    };
    // As rxe: SE only where the responder completes a receive, AckReq on every READ and
    // atomic request.
    let solicited = last
        && wr.flags.contains(SendFlags::SOLICITED)
        && matches!(
            wr.opcode,
            Opcode::Send | Opcode::SendWithImm | Opcode::RdmaWriteWithImm
        );
    // The window moves only on acknowledgements: ask for one at least twice per window.
    let in_flight = psn_diff(psn, psns.una) as u32 + 1;
    let half_window = (qp.rt.rc.cwnd / 2).clamp(1, ACK_EVERY);
    let ack_req = last || advance > 1 || in_flight % half_window == 0;
    let payload = &bufs.payload[..n as usize];
    let pkt = Bth::new(op, dest, psn).ok().and_then(|bth| {
        let bth = bth.with_ack_req(ack_req).with_solicited(solicited);
        Packet::new(bth, ext, payload).ok()
    });
    let Some(pkt) = pkt else {
        fail_oldest(av, a, mem, qpn, Status::LocQpOpErr, VendorErr::MalformedWqe);
        return Sent1::Failed;
    };
    bufs.batch.push(ep, peer, tos, &pkt);
    let Some(qp) = av.qps.get_mut(qpn) else {
        return Sent1::Failed;
    };
    qp.rt.psns.next = psn_add(psn, advance);
    if psn_diff(qp.rt.psns.next, qp.rt.rc.psn_max) > 0 {
        qp.rt.rc.psn_max = qp.rt.psns.next;
    }
    if k + advance >= npsn {
        qp.rt.inflight.active = false;
        qp.rt.rc.sq_next = index.wrapping_add(1);
    }
    Sent1::Sent {
        payload: n,
        moves: moves.max(n),
    }
}

/// The requester's own memory failed while building a packet of work request `index`: it
/// completes with a local protection error once it is the oldest; until then nothing more is
/// sent.
fn fail_local(
    av: &mut VmObjects,
    a: &Vm,
    mem: &GuestMem,
    qpn: u32,
    index: u32,
    v: VendorErr,
) -> Sent1 {
    let Some(qp) = av.qps.get(qpn) else {
        return Sent1::Failed;
    };
    if index != qp.rt.sq_head {
        return Sent1::WindowFull;
    }
    fail_oldest(av, a, mem, qpn, Status::LocProtErr, v);
    Sent1::Failed
}

/// Go-back-N: makes the oldest unacknowledged PSN the next to send again. Returns false if the
/// work request it belongs to can no longer be read (the QP has failed).
fn go_back(av: &mut VmObjects, a: &Vm, mem: &GuestMem, qpn: u32, counters: &Counters) -> bool {
    let Some(qp) = av.qps.get(qpn) else {
        return false;
    };
    let una = qp.rt.psns.una;
    if una == qp.rt.rc.psn_max {
        return true;
    }
    let resent = psn_diff(qp.rt.rc.psn_max, una).max(0) as u64;
    match resume_at_una(av, a, mem, qpn) {
        Resume::Failed => return false,
        Resume::Nothing => return true,
        Resume::At => {}
    }
    counters.retransmitted.fetch_add(resent, Ordering::Relaxed);
    let Some(qp) = av.qps.get_mut(qpn) else {
        return false;
    };
    qp.rt.rc.rewound = Some(una);
    // Each go-back resends everything after the gap: a path that loses or reorders packets
    // gets a smaller window, and earns it back one packet per acknowledgement.
    qp.rt.rc.cwnd = (qp.rt.rc.cwnd / 2).max(MIN_WINDOW);
    debug!(
        "vm {}: QP {qpn:#x}: going back to PSN {una:#x} ({resent} packets)",
        a.name
    );
    true
}

/// Where [`resume_at_una`] left the transmitter.
enum Resume {
    /// At the oldest unacknowledged PSN, in the work request it belongs to.
    At,
    /// Nothing on the wire holds it: every request sent is acknowledged.
    Nothing,
    /// The work request could not be read again; the QP has failed.
    Failed,
}

/// Makes the oldest unacknowledged PSN the next to send, in the work request it belongs to,
/// re-read from the ring: the transmitter then sends that request's packet for it, and the
/// requests after it with the PSNs they had. Moving only the PSN would send the rest of
/// another request under it.
fn resume_at_una(av: &mut VmObjects, a: &Vm, mem: &GuestMem, qpn: u32) -> Resume {
    let Some(qp) = av.qps.get(qpn) else {
        return Resume::Failed;
    };
    let una = qp.rt.psns.una;
    let (head, end) = (qp.rt.sq_head, qp.rt.rc.sq_max);
    let mut i = head;
    let mut found = None;
    while i != end {
        let s = qp.rt.rc.sent(i);
        if psn_diff(una, s.first_psn) >= 0 && psn_diff(una, s.last_psn) <= 0 {
            found = Some(i);
            break;
        }
        i = i.wrapping_add(1);
    }
    let Some(index) = found else {
        return Resume::Nothing;
    };
    let mut slot = [0u8; MAX_SEND_SLOT];
    if !read_send_slot(qp, mem, index, &mut slot) {
        ring_fatal(av, a, mem, qpn, VendorErr::GuestMemory);
        return Resume::Failed;
    }
    let Some(qp) = av.qps.get_mut(qpn) else {
        return Resume::Failed;
    };
    qp.rt.inflight.slot = slot;
    qp.rt.inflight.active = true;
    qp.rt.rc.sq_next = index;
    qp.rt.psns.next = una;
    Resume::At
}

/// An acknowledgement moved the oldest unacknowledged PSN past the next one to send (a
/// go-back-N was resending what the first transmission had already delivered): carry on from
/// it, without resending what is acknowledged.
fn skip_acknowledged(av: &mut VmObjects, a: &Vm, mem: &GuestMem, qpn: u32) {
    let Some(qp) = av.qps.get_mut(qpn) else {
        return;
    };
    if psn_diff(qp.rt.psns.una, qp.rt.psns.next) <= 0 {
        return;
    }
    if let Resume::Nothing = resume_at_una(av, a, mem, qpn) {
        // Everything sent is acknowledged: go on after the last request begun.
        if let Some(qp) = av.qps.get_mut(qpn) {
            qp.rt.psns.next = qp.rt.psns.una;
            qp.rt.rc.sq_next = qp.rt.rc.sq_max;
            qp.rt.inflight.active = false;
        }
    }
}

/// Completes the oldest work request on the wire with `status` and takes the QP to ERR,
/// flushing the rest; the transport starts afresh.
fn fail_oldest(av: &mut VmObjects, a: &Vm, mem: &GuestMem, qpn: u32, status: Status, v: VendorErr) {
    let Some(qp) = av.qps.get_mut(qpn) else {
        return;
    };
    let on_wire = qp.rt.sq_head != qp.rt.rc.sq_max;
    let head = on_wire.then(|| retired(&qp.rt.rc.sent(qp.rt.sq_head)));
    qp.rt.rc = std::mem::take(&mut qp.rt.rc).reset();
    qp.rt.psns.una = qp.rt.psns.next;
    fail_head(av, a, mem, qpn, head, status, v);
}

/// The completion of a work request from its record.
fn retired(s: &Sent) -> Retired {
    Retired {
        wr_id: s.wr_id,
        opcode: Opcode::from_raw(s.opcode).unwrap_or(Opcode::Send),
        signaled: s.signaled,
        byte_len: s.len,
    }
}

/// Completes the work request at the send queue's head from its record, and consumes it.
fn complete_oldest(
    av: &mut VmObjects,
    a: &Vm,
    mem: &GuestMem,
    qpn: u32,
    status: Status,
    v: VendorErr,
) {
    let Some(qp) = av.qps.get_mut(qpn) else {
        return;
    };
    let done = retired(&qp.rt.rc.sent(qp.rt.sq_head));
    if qp.rt.sq_head == qp.rt.rc.sq_next {
        // It was still being transmitted.
        qp.rt.inflight.active = false;
        qp.rt.rc.sq_next = qp.rt.sq_head.wrapping_add(1);
    }
    retire_head(av, a, mem, qpn, &done, status, v);
}

/// A response to this VM's requester: ACK, NAK, READ response or atomic ACK. Returns whether
/// the QP's window moved (the scheduler should send more).
pub fn on_response(
    ep: &Endpoint,
    a: &Vm,
    av: &mut VmObjects,
    mem: &GuestMem,
    pkt: &Packet<'_>,
    peer: Gid,
) -> bool {
    let qpn = pkt.bth().dest_qp();
    let Some(qp) = av.qps.get(qpn) else {
        ep.counters.no_qp.fetch_add(1, Ordering::Relaxed);
        return false;
    };
    if qp.qp_type() != qp::Type::Rc || !qp.sends() || qp.attr.ah_attr.dgid != peer {
        ep.counters.no_qp.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let psn = pkt.bth().psn();
    let una = qp.rt.psns.una;
    // Only PSNs on the wire can be answered.
    if psn_diff(psn, una) < -1 || psn_diff(psn, qp.rt.rc.psn_max) >= 0 {
        ep.counters.stray_responses.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    if pkt.bth().becn() {
        ep.counters.becn.fetch_add(1, Ordering::Relaxed);
        if let Some(qp) = av.qps.get_mut(qpn) {
            if slow_down(qp) {
                ep.counters.window_cuts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let syndrome = pkt.ext().aeth.map(|a| a.syndrome());
    match pkt.opcode() {
        Op::RcAcknowledge => match syndrome {
            Some(Ok(Syndrome::Ack { .. })) => {
                ack_through(av, a, mem, qpn, psn) || wants_rewind(av, qpn)
            }
            Some(Ok(Syndrome::Nak(NakCode::PsnSequenceError))) => {
                ack_through(av, a, mem, qpn, psn_add(psn, PSN_MASK));
                rewind(av, qpn);
                true
            }
            Some(Ok(Syndrome::RnrNak { timer })) => {
                ack_through(av, a, mem, qpn, psn_add(psn, PSN_MASK));
                if !head_holds(av, qpn, psn) {
                    // It names a request after a READ or atomic still unanswered: those
                    // responses were lost, so go back for them first (as rxe does).
                    rewind(av, qpn);
                    return true;
                }
                let Some(qp) = av.qps.get_mut(qpn) else {
                    return false;
                };
                if !qp.rt.retries.take_rnr(qp.attr.rnr_retry) {
                    fail_oldest(
                        av,
                        a,
                        mem,
                        qpn,
                        Status::RnrRetryExcErr,
                        VendorErr::RnrExhausted,
                    );
                    return false;
                }
                let wait = Duration::from_micros(qp::rnr_timer_micros(timer).into());
                qp.rt.rc.rnr_until = Some(Instant::now() + wait);
                qp.rt.rc.deadline = None;
                true
            }
            Some(Ok(Syndrome::Nak(code))) => {
                ack_through(av, a, mem, qpn, psn_add(psn, PSN_MASK));
                if !head_holds(av, qpn, psn) {
                    rewind(av, qpn);
                    return true;
                }
                let status = match code {
                    NakCode::InvalidRequest | NakCode::InvalidRdRequest => Status::RemInvReqErr,
                    NakCode::RemoteAccessError => Status::RemAccessErr,
                    _ => Status::RemOpErr,
                };
                fail_oldest(av, a, mem, qpn, status, VendorErr::None);
                false
            }
            _ => false,
        },
        Op::RcReadResponseFirst
        | Op::RcReadResponseMiddle
        | Op::RcReadResponseLast
        | Op::RcReadResponseOnly => read_response(av, a, mem, qpn, pkt),
        Op::RcAtomicAcknowledge => atomic_response(av, a, mem, qpn, pkt),
        _ => false,
    }
}

/// A VM that arrived by live migration tells its RC peers it runs again, as a migrated VM's
/// network stack announces its addresses: whatever either side sent during the switch-over
/// was dropped, and without this each side would wait for its ACK timeout (tens of
/// milliseconds to seconds) before resending. Every QP that has used the wire sends its peer a
/// PSN sequence error NAK for the PSN it expects, which a requester answers with a go-back-N
/// at once (as to any gap; a peer with nothing outstanding ignores it), and goes back itself
/// to its oldest unacknowledged PSN. Returns the QPs the scheduler must look at.
pub fn announce(ep: &Arc<Endpoint>, bufs: &mut TxBuffers, vm: &Vm, av: &mut VmObjects) -> Vec<u32> {
    let mut rewound = Vec::new();
    let qpns: Vec<u32> = av.qps.iter().map(|(qpn, _)| qpn).collect();
    for qpn in qpns {
        let Some(qp) = av.qps.get_mut(qpn) else {
            continue;
        };
        if qp.qp_type() != qp::Type::Rc || !qp.rt.rc.started {
            continue;
        }
        let (peer, dest) = (qp.attr.ah_attr.dgid, qp.attr.dest_qp_num.get());
        let tos = ep.tos(vm, qp);
        if qp.responds() {
            let (psn, msn) = (qp.rt.psns.expected, qp.rt.psns.msn);
            let nak = Bth::new(Op::RcAcknowledge, dest, psn)
                .ok()
                .zip(Aeth::new(Syndrome::Nak(NakCode::PsnSequenceError), msn & PSN_MASK).ok());
            if let Some((bth, aeth)) = nak {
                let ext = Extensions {
                    aeth: Some(aeth),
                    ..Extensions::default()
                };
                if let Ok(pkt) = Packet::new(bth, ext, &[]) {
                    bufs.batch.push(ep, peer, tos, &pkt);
                }
            }
        }
        if qp.sends() && qp.rt.psns.una != qp.rt.rc.psn_max {
            qp.rt.rc.rewind = true;
            qp.rt.rc.rewound = None;
            qp.rt.rc.deadline = None;
            rewound.push(qpn);
        }
    }
    bufs.batch.flush();
    rewound
}

/// Whether a go-back-N is waiting for the scheduler.
fn wants_rewind(av: &VmObjects, qpn: u32) -> bool {
    av.qps.get(qpn).is_some_and(|q| q.rt.rc.rewind)
}

/// Whether the oldest work request on the wire is the one packet `psn` belongs to: a NAK
/// fails only that one.
fn head_holds(av: &VmObjects, qpn: u32, psn: u32) -> bool {
    av.qps.get(qpn).is_some_and(|q| {
        let s = q.rt.rc.sent(q.rt.sq_head);
        q.rt.sq_head != q.rt.rc.sq_max
            && psn_diff(psn, s.first_psn) >= 0
            && psn_diff(psn, s.last_psn) <= 0
    })
}

/// Asks the transmitter to go back to the oldest unacknowledged PSN.
fn rewind(av: &mut VmObjects, qpn: u32) {
    if let Some(qp) = av.qps.get_mut(qpn) {
        ask_rewind(qp);
    }
}

/// Asks for a go-back-N unless one from the same PSN is already under way: every packet after
/// a gap reports it, and answering each would resend the window again and again. The ACK
/// timer still catches a resent packet that was itself lost.
fn ask_rewind(qp: &mut Qp) {
    let una = qp.rt.psns.una;
    if qp.rt.rc.rewound != Some(una) {
        qp.rt.rc.rewind = true;
    }
}

/// Completes the SENDs and WRITEs whose packets up to `psn` are acknowledged. A READ or atomic
/// among them whose response has not arrived means the response was lost: go back for it
/// (IBA 9.7.4.1.3, implied NAK).
fn ack_through(av: &mut VmObjects, a: &Vm, mem: &GuestMem, qpn: u32, psn: u32) -> bool {
    let mut moved = false;
    loop {
        let Some(qp) = av.qps.get_mut(qpn) else {
            return moved;
        };
        let una = qp.rt.psns.una;
        if psn_diff(psn, una) < 0 {
            break;
        }
        let head = qp.rt.sq_head;
        if head == qp.rt.rc.sq_max {
            break;
        }
        let s = qp.rt.rc.sent(head);
        let opcode = Opcode::from_raw(s.opcode).unwrap_or(Opcode::Send);
        if matches!(opcode, Opcode::RdmaRead) || opcode.is_atomic() {
            // Its own responses acknowledge it. Only an acknowledgement of a later request
            // means they were lost (IBA 9.7.4.1.3, implied NAK).
            if psn_diff(psn, s.last_psn) >= 0 {
                ask_rewind(qp);
            }
            break;
        }
        if psn_diff(psn, s.last_psn) < 0 {
            // Part of a long message.
            qp.rt.psns.una = psn_add(psn, 1);
            progress(qp);
            moved = true;
            break;
        }
        // Every PSN up to `psn` was sent at least once (responses beyond `psn_max` are
        // refused), so the whole request has arrived even if a go-back-N is resending it.
        qp.rt.psns.una = psn_add(s.last_psn, 1);
        progress(qp);
        complete_oldest(av, a, mem, qpn, Status::Success, VendorErr::None);
        moved = true;
    }
    if moved {
        skip_acknowledged(av, a, mem, qpn);
    }
    moved
}

/// A response echoed a congestion mark (BECN) on QP `qp`'s packets: halves its window, once
/// per window's worth of packets (the marks echoed for packets sent before the last cut are
/// the same congestion), as DCQCN's first step does with its rate. Returns whether it did.
/// The window grows back one packet per acknowledgement, as after a loss.
fn slow_down(qp: &mut Qp) -> bool {
    let una = qp.rt.psns.una;
    let t = &mut qp.rt.rc;
    if t.congestion_cut_at.is_some_and(|at| psn_diff(una, at) < 0) {
        return false;
    }
    t.cwnd = (t.cwnd / 2).max(MIN_WINDOW);
    t.congestion_cut_at = Some(t.psn_max);
    true
}

/// Forward progress: the retry budget is whole again and the timer restarts.
fn progress(qp: &mut Qp) {
    qp.rt.retries = Retries::full(&qp.attr);
    let w = &mut qp.rt.rc;
    w.deadline = None;
    w.cwnd = (w.cwnd + 1).min(MAX_UNACKED);
}

/// The work request at the head, if it is a READ or atomic whose PSNs include `psn` and
/// everything before it has been acknowledged by this response (responses come in order). A
/// response after a gap means the packets between were lost: it asks for a go-back-N.
fn responded(av: &mut VmObjects, a: &Vm, mem: &GuestMem, qpn: u32, psn: u32) -> Option<Sent> {
    // A response implies every request before it was received.
    ack_through(av, a, mem, qpn, psn_add(psn, PSN_MASK));
    let qp = av.qps.get_mut(qpn)?;
    if psn_diff(psn, qp.rt.psns.una) > 0 {
        ask_rewind(qp);
        return None;
    }
    let head = qp.rt.sq_head;
    if head == qp.rt.rc.sq_max {
        return None;
    }
    let s = qp.rt.rc.sent(head);
    let in_range = psn_diff(psn, s.first_psn) >= 0 && psn_diff(psn, s.last_psn) <= 0;
    (in_range && psn == qp.rt.psns.una).then_some(s)
}

/// Writes `bytes` at offset `off` of the message the head work request `s` receives into (a
/// READ's or atomic's SGEs), re-reading the request from the ring as an RNIC re-reads its WQE.
fn place_at_head(
    av: &VmObjects,
    mem: &GuestMem,
    qpn: u32,
    s: &Sent,
    off: u32,
    bytes: &[u8],
    kind: WriteKind,
) -> Result<(), VendorErr> {
    let qp = av.qps.get(qpn).ok_or(VendorErr::GuestMemory)?;
    let mut slot = [0u8; MAX_SEND_SLOT];
    if !read_send_slot(qp, mem, qp.rt.sq_head, &mut slot) {
        return Err(VendorErr::GuestMemory);
    }
    let wr = wqe::decode_send(&slot, qp.send_limits()).map_err(|_| VendorErr::MalformedWqe)?;
    // The guest may have overwritten its posted request: the one there now is not ours.
    if wr.opcode.raw() != s.opcode || wr.header.wr_id.get() != s.wr_id {
        return Err(VendorErr::MalformedWqe);
    }
    let Payload::Sges(sges) = wr.payload else {
        return Err(VendorErr::MalformedWqe);
    };
    let mut runs = Runs::default();
    sge_runs(&av.mrs, sges, off, bytes.len() as u32, &mut runs)?;
    memory::write_runs(bytes, mem, runs.as_slice(), kind)
}

/// A response's data is in place: the PSN is acknowledged, and the request completes if this
/// was its last.
fn answered(av: &mut VmObjects, a: &Vm, mem: &GuestMem, qpn: u32, psn: u32, last: bool) -> bool {
    let Some(qp) = av.qps.get_mut(qpn) else {
        return false;
    };
    qp.rt.psns.una = psn_add(psn, 1);
    progress(qp);
    if last {
        complete_oldest(av, a, mem, qpn, Status::Success, VendorErr::None);
    }
    skip_acknowledged(av, a, mem, qpn);
    true
}

/// A READ response packet: its payload goes where the READ's SGEs say.
fn read_response(av: &mut VmObjects, a: &Vm, mem: &GuestMem, qpn: u32, pkt: &Packet<'_>) -> bool {
    let psn = pkt.bth().psn();
    let Some(s) = responded(av, a, mem, qpn, psn) else {
        return wants_rewind(av, qpn);
    };
    if Opcode::from_raw(s.opcode).ok() != Some(Opcode::RdmaRead) {
        return false;
    }
    let Some(qp) = av.qps.get(qpn) else {
        return false;
    };
    let mtu = mtu_of(qp);
    let k = psn_diff(psn, s.first_psn) as u32;
    let off = k * mtu;
    let payload = pkt.payload();
    let n = payload.len() as u32;
    let last = psn == s.last_psn;
    let op = pkt.opcode();
    // A READ retried from its middle is answered FIRST, MIDDLE..., LAST from where it resumed,
    // so only the sizes are fixed: a full MTU until the last, which ends the message.
    let ends = matches!(op, Op::RcReadResponseOnly | Op::RcReadResponseLast);
    let shape_ok = ends == last && if last { off + n == s.len } else { n == mtu };
    if !shape_ok {
        // Not what was asked: treat as lost and ask again.
        rewind(av, qpn);
        return true;
    }
    if let Err(v) = place_at_head(av, mem, qpn, &s, off, payload, WriteKind::Payload) {
        fail_oldest(av, a, mem, qpn, Status::LocProtErr, v);
        return false;
    }
    answered(av, a, mem, qpn, psn, last)
}

/// An atomic's acknowledgement: the value before goes into the request's SGE.
fn atomic_response(av: &mut VmObjects, a: &Vm, mem: &GuestMem, qpn: u32, pkt: &Packet<'_>) -> bool {
    let psn = pkt.bth().psn();
    let Some(s) = responded(av, a, mem, qpn, psn) else {
        return wants_rewind(av, qpn);
    };
    let Some(ack) = pkt.ext().atomic_ack else {
        return false;
    };
    if !Opcode::from_raw(s.opcode).is_ok_and(Opcode::is_atomic) {
        return false;
    }
    let original = ack.original().to_ne_bytes();
    if let Err(v) = place_at_head(av, mem, qpn, &s, 0, &original, WriteKind::Atomic) {
        fail_oldest(av, a, mem, qpn, Status::LocProtErr, v);
        return false;
    }
    answered(av, a, mem, qpn, psn, true)
}

/// Where a UD datagram goes: the port and QP, and the Q_Key it carries.
#[derive(Debug, Clone, Copy)]
pub struct UdDest {
    /// The destination port's GID.
    pub dgid: Gid,
    /// The destination QP.
    pub qpn: u32,
    /// The Q_Key.
    pub qkey: u32,
    /// The IP TOS byte (IPv6 traffic class) of the datagram.
    pub tos: u8,
}

/// Sends UD work request `wr` of QP `src_qpn` as one datagram from `ep`, numbered `psn`.
#[allow(clippy::too_many_arguments)]
pub fn send_ud(
    ep: &Arc<Endpoint>,
    bufs: &mut TxBuffers,
    av: &VmObjects,
    mem: &GuestMem,
    wr: &wqe::SendWr<'_>,
    dest: UdDest,
    src_qpn: u32,
    psn: u32,
) -> Result<(), VendorErr> {
    let UdDest {
        dgid,
        qpn: dest_qpn,
        qkey,
        tos,
    } = dest;
    let n = wr.byte_len;
    let payload = bufs
        .payload
        .get_mut(..n as usize)
        .ok_or(VendorErr::MessageTooLong)?;
    match wr.payload {
        Payload::Inline(bytes) => payload.copy_from_slice(bytes),
        Payload::Sges(sges) => {
            let mut runs = Runs::default();
            sge_runs(&av.mrs, sges, 0, n, &mut runs)?;
            memory::read_runs(mem, runs.as_slice(), payload)?;
        }
    }
    let (op, imm) = if wr.opcode.has_imm() {
        (
            Op::UdSendOnlyWithImm,
            Some(ImmDt::from_bytes(wr.header.imm_data)),
        )
    } else {
        (Op::UdSendOnly, None)
    };
    let deth = Deth::new(qkey, src_qpn).map_err(|_| VendorErr::BadAh)?;
    let bth = Bth::new(op, dest_qpn, psn)
        .map_err(|_| VendorErr::BadAh)?
        .with_solicited(wr.flags.contains(SendFlags::SOLICITED));
    let ext = Extensions {
        deth: Some(deth),
        imm,
        ..Extensions::default()
    };
    let pkt = Packet::new(bth, ext, &bufs.payload[..n as usize])
        .map_err(|_| VendorErr::MessageTooLong)?;
    bufs.batch.push(ep, dgid, tos, &pkt);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use vrdma_proto::wqe::Data;

    use super::*;
    use crate::testing::{TestVm, send_header};

    #[test]
    fn a_work_request_takes_one_psn_per_packet_and_a_read_one_per_response() {
        assert_eq!(psns_for(Opcode::Send, 0, 1024), 1);
        assert_eq!(psns_for(Opcode::Send, 1024, 1024), 1);
        assert_eq!(psns_for(Opcode::RdmaWrite, 1025, 1024), 2);
        assert_eq!(psns_for(Opcode::RdmaRead, 65536, 4096), 16);
        assert_eq!(psns_for(Opcode::AtomicFetchAndAdd, 8, 256), 1);
    }

    /// The receive thread takes what waits on `ep`'s socket and handles it, as
    /// `network::receive_loop` does.
    fn receive_thread_reads(ep: &Endpoint) {
        ep.rx_progress.taking();
        let started = Instant::now();
        ep.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        while ep.socket.recv(&mut buf).is_ok() {}
        ep.rx_progress.drained(started);
        ep.rx_progress.waiting();
    }

    #[test]
    fn an_answer_unread_or_being_handled_keeps_the_endpoint_behind() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let ep = Endpoint::new(addr, socket, true, addr.port());
        assert!(ep.caught_up(Instant::now()), "nothing arrived");

        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(b"ack", addr).unwrap();
        let mut buf = [0u8; 8];
        ep.socket.peek(&mut buf).unwrap();
        let deadline = Instant::now();
        assert!(!ep.caught_up(deadline), "it waits in the socket");

        // Taken, not yet handled: the socket is empty but the thread holds it.
        ep.rx_progress.taking();
        let started = Instant::now();
        ep.socket.recv(&mut buf).unwrap();
        assert!(!ep.caught_up(deadline), "taken, not handled");
        ep.rx_progress.drained(started);
        assert!(ep.caught_up(deadline), "handled");
        ep.rx_progress.waiting();
        assert!(ep.caught_up(Instant::now()), "idle, socket empty");
    }

    /// A step given a cut asks it between packets and ends when it says stop: a WRITE of
    /// several packets goes out one packet a step, where without a cut one step sends them
    /// all (the window allowing).
    #[test]
    fn a_cut_ends_a_step_between_packets() {
        let packets_per_step = |cut_every: Option<u32>| {
            let mut a = TestVm::new(1, 1);
            let pd = a.pd();
            let qp = a.qp(pd, qp::Type::Rc, 16, 16);
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            a.connect(qp.qpn, Gid::from_ipv4([127, 0, 0, 1]), 0x11, (7, 7, 1));
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let ep = Arc::new(Endpoint::new(
                socket.local_addr().unwrap(),
                socket,
                true,
                peer.local_addr().unwrap().port(),
            ));
            let mr = a.mr(pd, 16 << 10, vrdma_proto::mr::Access::LOCAL_WRITE);
            let mut header = send_header(Opcode::RdmaWrite, 7, SendFlags::SIGNALED);
            header.remote_addr = 0x1000.into();
            header.rkey = 0x100.into();
            let sges = [vrdma_proto::wqe::Sge::new(mr.addr, 16 << 10, mr.lkey)];
            a.post_send(&qp, header, Data::Sges(&sges));
            let mem = a.mem();
            let mut bufs = TxBuffers::default();
            let stop = || true;
            let mut sent = Vec::new();
            for _ in 0..64 {
                let cut = cut_every.map(|every| CopyCut { every, stop: &stop });
                let mut objects = a.vm.lock();
                step_rc(
                    &ep,
                    &mut bufs,
                    &a.vm,
                    &mut objects,
                    &mem,
                    qp.qpn,
                    1 << 20,
                    cut,
                );
                drop(objects);
                bufs.batch.flush();
                match ep.counters.tx.swap(0, Ordering::Relaxed) {
                    0 => break,
                    n => sent.push(n),
                }
            }
            sent
        };
        let whole = packets_per_step(None);
        assert_eq!(whole.len(), 1, "one step sends the message: {whole:?}");
        assert!(whole[0] > 1, "a message of several packets: {whole:?}");
        let cut = packets_per_step(Some(1));
        assert_eq!(cut, vec![1; whole[0] as usize], "a packet a step");
    }

    /// The ACK timer of a QP with no retries left expires while an answer from the peer waits
    /// unread in its address's socket (the host has not run the receive thread yet): the QP
    /// neither fails nor resends until the receive thread has read it; then the timer counts.
    #[test]
    fn an_ack_timer_waits_for_answers_the_receive_thread_has_not_read() {
        let mut a = TestVm::new(1, 1);
        let pd = a.pd();
        let qp = a.qp(pd, qp::Type::Rc, 16, 16);
        // Where the SEND goes; nothing answers from there.
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer_gid = Gid::from_ipv4([127, 0, 0, 1]);
        a.connect(qp.qpn, peer_gid, 0x11, (0, 0, 0));
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let ep = Arc::new(Endpoint::new(
            addr,
            socket,
            true,
            peer.local_addr().unwrap().port(),
        ));
        let mut bufs = TxBuffers::default();
        let header = send_header(Opcode::Send, 7, SendFlags::SIGNALED);
        a.post_send(&qp, header, Data::Inline(b"hello"));
        let mem = a.mem();
        let step = |bufs: &mut TxBuffers| {
            let mut objects = a.vm.lock();
            step_rc(&ep, bufs, &a.vm, &mut objects, &mem, qp.qpn, 1 << 20, None);
            drop(objects);
            bufs.batch.flush();
        };
        let sent = || ep.counters.tx.swap(0, Ordering::Relaxed);
        let expire = || {
            let mut objects = a.vm.lock();
            let t = &mut objects.qps.get_mut(qp.qpn).unwrap().rt.rc;
            assert!(t.deadline.is_some(), "the SEND is on the wire, timed");
            t.deadline = Some(Instant::now() - Duration::from_millis(1));
        };
        step(&mut bufs);
        assert_eq!(sent(), 1, "the SEND went out");

        // The peer's ACK reaches the socket; the receive thread has not run.
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .send_to(b"ack", addr)
            .unwrap();
        let mut buf = [0u8; 8];
        ep.socket.peek(&mut buf).unwrap();
        expire();
        step(&mut bufs);
        assert!(
            a.completions(qp.cq_ring, 16).is_empty(),
            "no RETRY_EXC_ERR while the answer is unread"
        );
        assert_eq!(sent(), 0, "nothing resent");
        assert_eq!(ep.counters.retransmitted.load(Ordering::Relaxed), 0);
        assert_eq!(ep.counters.timer_deferred.load(Ordering::Relaxed), 1);
        {
            let objects = a.vm.lock();
            let q = objects.qps.get(qp.qpn).unwrap();
            assert_eq!(q.state(), qp::State::Rts);
            assert!(q.rt.rc.deadline.is_some_and(|d| d > Instant::now()));
        }

        // Read, and it answered nothing this QP waits for: now the peer is silent.
        receive_thread_reads(&ep);
        expire();
        step(&mut bufs);
        let done = a.completions(qp.cq_ring, 16);
        assert_eq!(done.len(), 1);
        assert_eq!(
            (done[0].wr_id.get(), done[0].status),
            (7, Status::RetryExcErr.raw())
        );
    }
}
