//! Responder rules every fabric shares: whether a QP answers, the R_Key check, taking and
//! completing receives, and applying one piece of a message (a chunk from a local requester or
//! a packet from the network) to the responder's memory.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::debug;
use vm_memory::{Bytes, GuestAddress};
use vrdma_proto::cqe::{self, Status, VendorErr};
use vrdma_proto::mr::Access;
use vrdma_proto::wqe::{self, Opcode};
use vrdma_proto::{Gid, event, qp, ring};
use zerocopy::FromBytes;

use super::completion::{self, Completion, set_error};
use crate::handle::Table;
use crate::model::memory::{
    self, Copied, CopyCut, GuestMem, Runs, Side, WriteKind, load_producer, publish_consumer,
};
use crate::model::objects::{Mr, VmObjects, check_local, sge_iter_runs};
use crate::model::qp_state::RecvCopy;
use crate::model::vm::Vm;

/// How long a requester may leave a message half-received before another may start one.
const OWNER_STALE: Duration = Duration::from_millis(100);
/// Size of the GRH a UD receive buffer starts with.
pub const GRH_SIZE: u32 = 40;

/// What the responder did with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resp {
    /// Applied.
    Done,
    /// Applied to this many bytes of the piece, which its [`Chunk::cut`] ended early (at least
    /// one byte in, never at the message's end): the requester goes on from there.
    Cut(u32),
    /// No receive posted: retry after this many microseconds.
    Rnr(u32),
    /// No QP ready to answer (wrong GID or QPN, or not in RTR/RTS).
    NoResponder,
    /// The responder refused; the requester completes with this status.
    Nak(Status, VendorErr),
    /// Another requester's message is in progress.
    Busy,
    /// UD datagram dropped.
    Dropped,
    /// The requester's own memory failed (its memory table changed under it).
    LocalFault(VendorErr),
}

/// Everything the responder needs about one piece of a message: a chunk a local requester
/// moves, or a packet from the network.
#[derive(Debug)]
pub struct Chunk<'a> {
    /// The requester's VM (a value no local VM has for a packet from the network).
    pub a_id: u64,
    /// The requester's port.
    pub a_gid: Gid,
    /// The requester's QP.
    pub a_qpn: u32,
    /// RC or UD.
    pub qp_type: qp::Type,
    /// What the message does.
    pub opcode: Opcode,
    /// Its work request's header (remote address, R_Key, immediate data, atomic operands).
    pub header: &'a wqe::SendHeader,
    /// It asks for a solicited event.
    pub solicited: bool,
    /// The whole message's length.
    pub len: u32,
    /// Bytes of the message before this piece.
    pub done: u32,
    /// Bytes in this piece.
    pub n: u32,
    /// Whether this piece ends the message.
    pub last: bool,
    /// The Q_Key (UD).
    pub qkey: u32,
    /// Where the requester's bytes are (or go, for a READ), in `a_mem`.
    pub a_runs: &'a Runs,
    /// The piece's bytes themselves, when they are not in the requester's memory.
    pub inline: &'a [u8],
    /// Whether the bytes are `inline` rather than at `a_runs`.
    pub is_inline: bool,
    /// The requester's memory.
    pub a_mem: &'a GuestMem,
    /// The responder's memory.
    pub b_mem: &'a GuestMem,
    /// What may end the piece's copy early (a local requester's step of a lower class).
    pub cut: Option<CopyCut<'a>>,
}

impl Chunk<'_> {
    /// Copies this chunk's payload from the requester into `dst`; an error names whose memory
    /// failed (`Side::Source` is the requester's).
    fn copy_into(&self, dst: &Runs) -> Result<Copied, (Side, VendorErr)> {
        if self.is_inline {
            memory::write_runs(self.inline, self.b_mem, dst.as_slice(), WriteKind::Payload)
                .map_err(|v| (Side::Destination, v))?;
            Ok(Copied {
                bytes: self.inline.len() as u64,
                cut: false,
            })
        } else {
            memory::copy_runs(
                self.a_mem,
                self.a_runs.as_slice(),
                self.b_mem,
                dst.as_slice(),
                self.cut,
            )
        }
    }
}

/// The responder's check of an R_Key that a request names, for a QP in PD `pdn` whose remote
/// access flags are `qp_access`: the MR exists, is in the same PD, grants `need` (and so does
/// the QP), and covers `[addr, addr + len)`.
pub fn check_rkey(
    mrs: &Table<Mr>,
    pdn: u32,
    qp_access: Access,
    rkey: u32,
    addr: u64,
    len: u64,
    need: Access,
) -> Result<&Mr, VendorErr> {
    let mr = mrs.get(rkey).ok_or(VendorErr::BadRkey)?;
    if mr.pdn != pdn {
        Err(VendorErr::PdMismatch)
    } else if !mr.access().contains(need) || !qp_access.contains(need) {
        Err(VendorErr::RemoteAccess)
    } else if !mr.contains(addr, len) {
        Err(VendorErr::RemoteOutOfBounds)
    } else {
        Ok(mr)
    }
}

/// The responder: applies one chunk to QP `dest_qpn` of VM `vm`.
pub fn respond(
    objects: &mut VmObjects,
    vm: &Vm,
    dest_qpn: u32,
    c: &Chunk<'_>,
    atomic_result: &mut u64,
) -> Resp {
    // Nobody to take the message: a datagram is lost (and counted), an RC request unanswered.
    let unanswered = || {
        if c.qp_type == qp::Type::Ud {
            vm.counters.ud_dropped.fetch_add(1, Ordering::Relaxed);
            Resp::Dropped
        } else {
            Resp::NoResponder
        }
    };
    let Some(qp) = objects.qps.get(dest_qpn) else {
        return unanswered();
    };
    if qp.qp_type() != c.qp_type || !qp.responds() {
        return unanswered();
    }
    if c.qp_type == qp::Type::Ud {
        return respond_ud(objects, vm, dest_qpn, c);
    }
    // An RC QP answers only the QP it is connected to: anything else could be another tenant
    // injecting into the connection, and gets no answer, as a packet for another connection.
    if qp.attr.dest_qp_num.get() != c.a_qpn || qp.attr.ah_attr.dgid != c.a_gid {
        return unanswered();
    }
    if let Some((port_id, qpn, at)) = qp.rt.rx_owner {
        if (port_id, qpn) != (c.a_id, c.a_qpn) && at.elapsed() < OWNER_STALE {
            return Resp::Busy;
        }
    }
    let (b_pdn, b_access) = (qp.pdn, qp.remote_access());
    let min_rnr = qp::rnr_timer_micros(qp.attr.min_rnr_timer);
    let remote_need = match c.opcode {
        Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => Some(Access::REMOTE_WRITE),
        Opcode::RdmaRead => Some(Access::REMOTE_READ),
        Opcode::AtomicCmpAndSwp | Opcode::AtomicFetchAndAdd => Some(Access::REMOTE_ATOMIC),
        Opcode::Send | Opcode::SendWithImm => None,
    };
    let consumes_recv = matches!(
        c.opcode,
        Opcode::Send | Opcode::SendWithImm | Opcode::RdmaWriteWithImm
    );
    // Take the receive at the message's first chunk and keep it to its last.
    let mut recv = RecvCopy::default();
    if consumes_recv {
        match take_recv(objects, vm, dest_qpn, c.b_mem) {
            Ok(Some(r)) => recv = r,
            Ok(None) => return Resp::Rnr(min_rnr),
            Err(v) => {
                responder_error(objects, vm, c.b_mem, dest_qpn, None, v);
                return Resp::Nak(Status::RemOpErr, v);
            }
        }
        if c.opcode != Opcode::RdmaWriteWithImm && recv.room < c.len {
            responder_error(
                objects,
                vm,
                c.b_mem,
                dest_qpn,
                Some((recv.wr_id, Status::LocLenErr)),
                VendorErr::RecvTooSmall,
            );
            return Resp::Nak(Status::RemInvReqErr, VendorErr::RecvTooSmall);
        }
        if let Some(qp) = objects.qps.get_mut(dest_qpn) {
            qp.rt.rx_owner = Some((c.a_id, c.a_qpn, Instant::now()));
        }
    }
    let mut b_runs = Runs::default();
    // A zero-length RDMA operation names no memory: its R_Key and address are not checked
    // (IBA C9-88), so a 0-byte WRITE with immediate works as a doorbell with any R_Key.
    let names_memory = c.len > 0 || c.opcode.is_atomic();
    if let Some(need) = remote_need.filter(|_| names_memory) {
        let rkey = c.header.rkey.get();
        let raddr = c.header.remote_addr.get();
        let check = check_rkey(
            &objects.mrs,
            b_pdn,
            b_access,
            rkey,
            raddr,
            c.len.into(),
            need,
        );
        let mr = match check {
            Ok(mr) => mr,
            Err(v) => {
                responder_error(objects, vm, c.b_mem, dest_qpn, None, v);
                vm.push_event(event::Kind::QpAccessErr, dest_qpn);
                return Resp::Nak(Status::RemAccessErr, v);
            }
        };
        if c.opcode.is_atomic() && raddr % 8 != 0 {
            responder_error(objects, vm, c.b_mem, dest_qpn, None, VendorErr::BadAtomic);
            vm.push_event(event::Kind::QpReqErr, dest_qpn);
            return Resp::Nak(Status::RemInvReqErr, VendorErr::BadAtomic);
        }
        if let Err(v) = mr.runs(raddr + u64::from(c.done), c.n, &mut b_runs) {
            return Resp::Nak(Status::RemAccessErr, v);
        }
    } else if let Err(v) = sge_iter_runs(
        &objects.mrs,
        recv.sges[..recv.n].iter().copied(),
        c.done,
        c.n,
        &mut b_runs,
    ) {
        responder_error(
            objects,
            vm,
            c.b_mem,
            dest_qpn,
            Some((recv.wr_id, Status::LocProtErr)),
            v,
        );
        return Resp::Nak(Status::RemOpErr, v);
    }
    // Move the bytes. An error names whose memory failed: the requester's own memory is its
    // local protection error and leaves the responder alone.
    let requester_side =
        |side: Side, requester_is_source: bool| (side == Side::Source) == requester_is_source;
    let moved: Result<Copied, (bool, VendorErr)> = match c.opcode {
        Opcode::Send | Opcode::SendWithImm | Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => c
            .copy_into(&b_runs)
            .map_err(|(side, v)| (requester_side(side, true), v)),
        Opcode::RdmaRead => memory::copy_runs(
            c.b_mem,
            b_runs.as_slice(),
            c.a_mem,
            c.a_runs.as_slice(),
            c.cut,
        )
        .map_err(|(side, v)| (requester_side(side, false), v)),
        Opcode::AtomicCmpAndSwp | Opcode::AtomicFetchAndAdd => {
            let gpa = b_runs.as_slice().first().map(|r| r.gpa).unwrap_or(0);
            let (compare_add, swap) = (c.header.compare_add.get(), c.header.swap.get());
            memory::with_atomic(c.b_mem, gpa, |atomic| {
                *atomic_result = if c.opcode == Opcode::AtomicCmpAndSwp {
                    memory::compare_swap(atomic, compare_add, swap)
                } else {
                    atomic.fetch_add(compare_add, Ordering::SeqCst)
                };
            })
            .map(|()| Copied {
                bytes: 8,
                cut: false,
            })
            .map_err(|v| (false, v))
        }
    };
    match moved {
        // Ended early: the receive (if any) stays this requester's until the message's end.
        Ok(Copied { bytes, cut: true }) => return Resp::Cut(bytes as u32),
        Ok(_) => {}
        Err((true, v)) => {
            // The responder keeps its receive for the next message.
            if let Some(qp) = objects.qps.get_mut(dest_qpn) {
                qp.rt.rx_owner = None;
            }
            return Resp::LocalFault(v);
        }
        Err((false, v)) => {
            responder_error(
                objects,
                vm,
                c.b_mem,
                dest_qpn,
                consumes_recv.then_some((recv.wr_id, Status::LocProtErr)),
                v,
            );
            return Resp::Nak(Status::RemAccessErr, v);
        }
    }
    if consumes_recv && c.last {
        let (opcode, byte_len) = if c.opcode == Opcode::RdmaWriteWithImm {
            (cqe::Opcode::RecvRdmaWithImm, c.len)
        } else {
            (cqe::Opcode::Recv, c.len)
        };
        let mut done = Completion::new(
            recv.wr_id,
            dest_qpn,
            Status::Success,
            opcode,
            VendorErr::None,
        );
        done.cqe.byte_len = byte_len.into();
        done.cqe.src_qp = c.a_qpn.into();
        if c.opcode.has_imm() {
            done.cqe.imm_data = c.header.imm_data;
            done.cqe.wc_flags = cqe::Flags::WITH_IMM.bits();
        }
        done.solicited = c.solicited;
        finish_recv(objects, vm, c.b_mem, dest_qpn, &done);
    }
    Resp::Done
}

/// UD: the whole datagram in one step, or dropped as an unreliable network would.
fn respond_ud(objects: &mut VmObjects, vm: &Vm, dest_qpn: u32, c: &Chunk<'_>) -> Resp {
    let Some(qp) = objects.qps.get(dest_qpn) else {
        return Resp::Dropped;
    };
    if qp.attr.qkey.get() != c.qkey {
        vm.counters.ud_dropped.fetch_add(1, Ordering::Relaxed);
        return Resp::Dropped;
    }
    let recv = match take_recv(objects, vm, dest_qpn, c.b_mem) {
        Ok(Some(r)) => r,
        Ok(None) => {
            vm.counters.ud_dropped.fetch_add(1, Ordering::Relaxed);
            return Resp::Dropped;
        }
        Err(v) => {
            vm.counters.ud_dropped.fetch_add(1, Ordering::Relaxed);
            // A receive that failed its checks after it was taken from an SRQ is this QP's
            // now: it completes in error here, and the QP stays as it is, as for a receive
            // whose SGEs fail while a datagram is placed. (One from the QP's own ring stays
            // at its head.)
            let held = objects.qps.get(dest_qpn).and_then(|q| q.rt.srq_recv);
            if let Some(r) = held {
                let bad = Completion::new(
                    r.wr_id,
                    dest_qpn,
                    recv_error_status(v),
                    cqe::Opcode::Recv,
                    v,
                );
                finish_recv(objects, vm, c.b_mem, dest_qpn, &bad);
            }
            return Resp::Dropped;
        }
    };
    let total = c.len + GRH_SIZE;
    if recv.room < total {
        let mut bad = Completion::new(
            recv.wr_id,
            dest_qpn,
            Status::LocLenErr,
            cqe::Opcode::Recv,
            VendorErr::RecvTooSmall,
        );
        bad.solicited = true;
        finish_recv(objects, vm, c.b_mem, dest_qpn, &bad);
        return Resp::Done;
    }
    let mut b_runs = Runs::default();
    let grh = grh(c.a_gid, vm.gid, c.len);
    let result = sge_iter_runs(
        &objects.mrs,
        recv.sges[..recv.n].iter().copied(),
        0,
        total,
        &mut b_runs,
    )
    .and_then(|()| {
        let mut head = Runs::default();
        sge_iter_runs(
            &objects.mrs,
            recv.sges[..recv.n].iter().copied(),
            0,
            GRH_SIZE,
            &mut head,
        )?;
        memory::write_runs(&grh, c.b_mem, head.as_slice(), WriteKind::Payload)?;
        let mut body = Runs::default();
        sge_iter_runs(
            &objects.mrs,
            recv.sges[..recv.n].iter().copied(),
            GRH_SIZE,
            c.len,
            &mut body,
        )?;
        // A datagram is moved whole: its chunk has no cut.
        c.copy_into(&body).map(|_| ()).map_err(|(_, v)| v)
    });
    let mut done = match result {
        Ok(()) => {
            let mut ok = Completion::new(
                recv.wr_id,
                dest_qpn,
                Status::Success,
                cqe::Opcode::Recv,
                VendorErr::None,
            );
            ok.cqe.byte_len = total.into();
            ok.cqe.src_qp = c.a_qpn.into();
            ok.cqe.sgid = c.a_gid;
            let mut flags = cqe::Flags::GRH;
            if c.opcode.has_imm() {
                ok.cqe.imm_data = c.header.imm_data;
                flags |= cqe::Flags::WITH_IMM;
            }
            ok.cqe.wc_flags = flags.bits();
            ok.solicited = c.solicited;
            ok
        }
        Err(v) => Completion::new(
            recv.wr_id,
            dest_qpn,
            Status::LocProtErr,
            cqe::Opcode::Recv,
            v,
        ),
    };
    done.cqe.qp_num = dest_qpn.into();
    finish_recv(objects, vm, c.b_mem, dest_qpn, &done);
    Resp::Done
}

/// The 40-byte GRH a UD receive buffer starts with, in IPv6 form (RoCEv2 over IPv4 puts its
/// IPv4 header in the last 20 bytes instead; vrdma always writes the GID form).
fn grh(sgid: Gid, dgid: Gid, payload: u32) -> [u8; GRH_SIZE as usize] {
    let mut h = [0u8; GRH_SIZE as usize];
    h[0] = 0x60; // IP version 6
    let len = u16::try_from(payload).unwrap_or(u16::MAX).to_be_bytes();
    h[4..6].copy_from_slice(&len);
    h[6] = 0x1b; // next header: IB BTH
    h[7] = 64; // hop limit
    h[8..24].copy_from_slice(&sgid.0);
    h[24..40].copy_from_slice(&dgid.0);
    h
}

/// The receive work request QP `qpn` is to place a message in, with its SGEs checked against
/// the PD and local-write rights.
///
/// With a receive ring of its own, that is the entry at the head of the ring, read without
/// consuming it ([`finish_recv`] consumes it). With an SRQ, it is the receive the QP already
/// holds for the message in progress, or else the next entry of the SRQ, which taking
/// consumes there and then: the entry leaves the SRQ (its slot is free for the driver, and
/// the SRQ's limit is checked) and is the QP's until it completes, so another QP sharing the
/// SRQ can never take it too. A taken entry that fails its checks stays with the QP, so that
/// it still completes exactly once.
pub fn take_recv(
    objects: &mut VmObjects,
    vm: &Vm,
    qpn: u32,
    mem: &GuestMem,
) -> Result<Option<RecvCopy>, VendorErr> {
    let Some(qp) = objects.qps.get(qpn) else {
        return Ok(None);
    };
    if qp.has_srq() {
        return take_from_srq(objects, vm, qpn, mem);
    }
    let Some(geometry) = qp.rq_geometry() else {
        return Ok(None);
    };
    let mut buf = [0u8; wqe::recv_stride(crate::limits::MAX_SGE) as usize];
    let Some((_, slot)) = ring_head(mem, qp.rq_ring_addr, geometry, qp.rt.rq_done, &mut buf)?
    else {
        return Ok(None);
    };
    let mut copy = RecvCopy::default();
    check_recv(
        &objects.mrs,
        slot,
        qp.caps.max_recv_sge.get(),
        qp.pdn,
        &mut copy,
    )?;
    Ok(Some(copy))
}

/// [`take_recv`] for a QP attached to an SRQ.
fn take_from_srq(
    objects: &mut VmObjects,
    vm: &Vm,
    qpn: u32,
    mem: &GuestMem,
) -> Result<Option<RecvCopy>, VendorErr> {
    let Some(qp) = objects.qps.get(qpn) else {
        return Ok(None);
    };
    if let Some(held) = qp.rt.srq_recv {
        return Ok(Some(held));
    }
    let srqn = qp.srqn;
    // An SRQ cannot be destroyed while a QP is attached to it.
    let Some(srq) = objects.srqs.get(srqn) else {
        return Ok(None);
    };
    if let Some(v) = srq.fault {
        return Err(v);
    }
    let Some(geometry) = srq.geometry() else {
        return Ok(None);
    };
    let mut buf = [0u8; wqe::recv_stride(crate::limits::MAX_SRQ_SGE) as usize];
    let (posted, slot) = match ring_head(mem, srq.ring_addr, geometry, srq.consumer, &mut buf) {
        Ok(Some(head)) => head,
        Ok(None) => return Ok(None),
        Err(v) => return Err(srq_failed(objects, vm, srqn, v)),
    };
    let mut taken = RecvCopy::default();
    let checked = check_recv(&objects.mrs, slot, srq.max_sge, srq.pdn, &mut taken);
    // Taken, whatever it holds: the entry belongs to this QP from here on.
    let (ring_addr, consumer, limit) = (srq.ring_addr, srq.consumer.wrapping_add(1), srq.limit);
    let left = posted - 1;
    if let Some(srq) = objects.srqs.get_mut(srqn) {
        srq.consumer = consumer;
        // Fired once, then disarmed, as rxe does when a take leaves fewer than the limit.
        if limit != 0 && left < limit {
            srq.limit = 0;
            vm.push_event(event::Kind::SrqLimitReached, srqn);
        }
    }
    publish_consumer(mem, ring_addr, consumer);
    if let Some(qp) = objects.qps.get_mut(qpn) {
        qp.rt.srq_recv = Some(taken);
    }
    checked.map(|()| Some(taken))
}

/// Puts SRQ `srqn` in error for good, raising SRQ_ERR the first time; returns `v`.
fn srq_failed(objects: &mut VmObjects, vm: &Vm, srqn: u32, v: VendorErr) -> VendorErr {
    if let Some(srq) = objects.srqs.get_mut(srqn) {
        if srq.fault.is_none() {
            debug!(
                "vm {}: SRQ {srqn:#x}'s ring is unusable ({v:?}); the SRQ is in error",
                vm.name
            );
            srq.fault = Some(v);
            vm.push_event(event::Kind::SrqErr, srqn);
        }
    }
    v
}

/// The entries posted in the receive ring of `geometry` at `ring_addr` beyond index
/// `consumer`, with the first of them copied into `buf`; `None` if there are none. An overrun
/// ring (§11.3 of docs/protocol.md) or one whose memory is gone is an error.
fn ring_head<'a>(
    mem: &GuestMem,
    ring_addr: u64,
    geometry: ring::Geometry,
    consumer: u32,
    buf: &'a mut [u8],
) -> Result<Option<(u32, &'a [u8])>, VendorErr> {
    let producer = load_producer(mem, ring_addr).ok_or(VendorErr::GuestMemory)?;
    let posted = match geometry.occupancy(producer, consumer) {
        Ok(0) => return Ok(None),
        Ok(n) => n,
        Err(_) => return Err(VendorErr::RingOverrun),
    };
    let slot = buf
        .get_mut(..geometry.stride() as usize)
        .ok_or(VendorErr::MalformedWqe)?;
    let at = GuestAddress(ring_addr + geometry.entry_offset(consumer));
    mem.read_slice(slot, at)
        .map_err(|_| VendorErr::GuestMemory)?;
    Ok(Some((posted, slot)))
}

/// Decodes a receive slot copied out of a ring into `copy` and checks its SGEs against PD
/// `pdn` and local-write rights. On a failure `copy` still holds what could be read of the
/// request (its `wr_id` at least), which a taken SRQ entry needs to complete.
pub fn check_recv(
    mrs: &Table<Mr>,
    slot: &[u8],
    max_sge: u32,
    pdn: u32,
    copy: &mut RecvCopy,
) -> Result<(), VendorErr> {
    let wr = match wqe::decode_recv(slot, max_sge) {
        Ok(wr) => wr,
        Err(_) => {
            copy.wr_id = wqe::RecvHeader::read_from_prefix(slot)
                .map(|(h, _)| h.wr_id.get())
                .unwrap_or(0);
            return Err(VendorErr::MalformedWqe);
        }
    };
    copy.wr_id = wr.wr_id;
    copy.n = wr.sges.len();
    copy.room = wr.byte_len;
    for (i, sge) in wr.sges.iter().enumerate() {
        copy.sges[i] = sge;
    }
    for sge in wr.sges.iter() {
        check_local(mrs, pdn, &sge, Access::LOCAL_WRITE).map_err(|f| f.vendor())?;
    }
    Ok(())
}

/// The status a receive completes with when it fails its own checks.
fn recv_error_status(v: VendorErr) -> Status {
    match v {
        VendorErr::MalformedWqe => Status::LocQpOpErr,
        VendorErr::LocalAccess => Status::LocAccessErr,
        _ => Status::LocProtErr,
    }
}

/// Completes the receive at the head of QP `qpn`'s ring (or, with an SRQ, the one it holds)
/// with `c` and consumes it.
pub fn finish_recv(objects: &mut VmObjects, vm: &Vm, mem: &GuestMem, qpn: u32, c: &Completion) {
    let Some(qp) = objects.qps.get_mut(qpn) else {
        return;
    };
    if qp.has_srq() {
        // Consumed from the SRQ when it was taken: only the completion is left to write.
        qp.rt.srq_recv = None;
        qp.rt.rx_owner = None;
        let cqn = qp.recv_cqn;
        if !completion::post(objects, vm, mem, cqn, c) {
            set_error(objects, vm, qpn);
        }
        return;
    }
    let (cqn, ring_addr) = (qp.recv_cqn, qp.rq_ring_addr);
    qp.rt.rq_done = qp.rt.rq_done.wrapping_add(1);
    qp.rt.rx_owner = None;
    // As for sends: the slot is free before the completion says so.
    publish_consumer(mem, ring_addr, qp.rt.rq_done);
    if !completion::post(objects, vm, mem, cqn, c) {
        set_error(objects, vm, qpn);
    }
}

/// The responder found an error: complete its receive (if it has taken one) with `recv_status`,
/// and move its QP to the error state.
pub fn responder_error(
    objects: &mut VmObjects,
    vm: &Vm,
    mem: &GuestMem,
    qpn: u32,
    recv: Option<(u64, Status)>,
    v: VendorErr,
) {
    if let Some((wr_id, status)) = recv {
        let c = Completion::new(wr_id, qpn, status, cqe::Opcode::Recv, v);
        finish_recv(objects, vm, mem, qpn, &c);
    }
    set_error(objects, vm, qpn);
}
