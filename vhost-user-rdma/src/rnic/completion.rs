//! Completion rules: writing completions into a VM's CQ rings, raising CQ events, flushing a
//! QP's queues, and taking a QP to the error state.

use std::sync::atomic::{Ordering, fence};

use log::warn;
use vrdma_proto::cqe::{self, Cqe, VendorErr};
use vrdma_proto::{event, qp, ring, wqe};
use zerocopy::{FromBytes, IntoBytes};

use crate::model::memory::{self, GuestMem, WriteKind, load_producer, publish_consumer, ring_word};
use crate::model::objects::VmObjects;
use crate::model::vm::Vm;

/// A completion about to be written.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The entry.
    pub cqe: Cqe,
    /// Whether it may satisfy a solicited-only arm (solicited receives and every error).
    pub solicited: bool,
}

impl Completion {
    /// A completion of `status` and `opcode` for `wr_id` on `qpn`.
    pub fn new(
        wr_id: u64,
        qpn: u32,
        status: cqe::Status,
        opcode: cqe::Opcode,
        vendor: VendorErr,
    ) -> Self {
        let cqe = Cqe {
            wr_id: wr_id.into(),
            qp_num: qpn.into(),
            status: status.raw(),
            opcode: opcode.raw(),
            vendor_err: vendor.raw().into(),
            ..Cqe::default()
        };
        Completion {
            cqe,
            solicited: status != cqe::Status::Success,
        }
    }
}

/// Writes `c` into CQ `cqn` of `vm` and raises a completion event if the CQ is armed for it.
/// Returns false if the CQ is gone, overflowed now or before: the caller's QP must then go to
/// the error state, as on hardware.
pub fn post(objects: &mut VmObjects, vm: &Vm, mem: &GuestMem, cqn: u32, c: &Completion) -> bool {
    let Some(cq) = objects.cqs.get_mut(cqn) else {
        return false;
    };
    if cq.overflowed {
        return false;
    }
    let base = cq.ring_addr;
    let Some(consumer) = memory::load_u32(
        mem,
        ring_word(base, ring::CONSUMER_OFFSET),
        Ordering::Acquire,
    ) else {
        return false;
    };
    let used = cq.producer.wrapping_sub(consumer);
    if used >= cq.depth {
        // Either the CQ is full or the driver wrote a consumer index ahead of the producer;
        // both leave the CQ unusable.
        cq.overflowed = true;
        vm.push_event(event::Kind::CqErr, cqn);
        return false;
    }
    let slot = u64::from(cq.producer & (cq.depth - 1));
    let at = base + ring::HEADER_SIZE + slot * u64::from(cqe::SIZE);
    if memory::write_bytes(mem, at, c.cqe.as_bytes(), WriteKind::Cqe).is_err() {
        cq.overflowed = true;
        vm.push_event(event::Kind::CqErr, cqn);
        return false;
    }
    cq.producer = cq.producer.wrapping_add(1);
    let published = memory::store_u32(
        mem,
        ring_word(base, ring::PRODUCER_OFFSET),
        cq.producer,
        Ordering::Release,
        WriteKind::RingIndex,
    );
    if published.is_err() {
        return false;
    }
    vm.counters.completions.fetch_add(1, Ordering::Relaxed);
    if c.cqe.status != cqe::Status::Success.raw() && c.cqe.status != cqe::Status::WrFlushErr.raw() {
        vm.counters.count_error(c.cqe.status);
    }
    // Pairs with the driver's fence between storing the arm word and loading the producer
    // index (docs/protocol.md): one of the two sides sees the other's store.
    fence(Ordering::SeqCst);
    let Some(arm) = memory::load_u32(mem, ring_word(base, ring::ARM_OFFSET), Ordering::SeqCst)
    else {
        return true;
    };
    let (sequence, solicited_only) = ring::split_arm_word(arm);
    if sequence != cq.notify_ack && (!solicited_only || c.solicited) {
        cq.notify_ack = sequence;
        let _ = memory::store_u32(
            mem,
            ring_word(base, ring::NOTIFY_ACK_OFFSET),
            sequence,
            Ordering::Release,
            WriteKind::ControlWord,
        );
        vm.push_event(event::Kind::CqCompletion, cqn);
    }
    true
}

/// Completes every outstanding work request of QP `qpn` with `WR_FLUSH_ERR`: its send queue
/// if `send`, its receive queue if `recv`. Stops early if a CQ cannot take more; the rest is
/// flushed on a later call.
///
/// A QP attached to an SRQ has no receive queue of its own: the SRQ's entries are not the
/// QP's to flush (other QPs go on taking them), so `recv` flushes only the receive the QP
/// holds, and then raises QP_LAST_WQE_REACHED, once per entry into ERR.
pub fn flush(objects: &mut VmObjects, vm: &Vm, mem: &GuestMem, qpn: u32, send: bool, recv: bool) {
    let Some(qp) = objects.qps.get(qpn) else {
        return;
    };
    let (send_cqn, recv_cqn) = (qp.send_cqn, qp.recv_cqn);
    let (sq_addr, rq_addr) = (qp.sq_ring_addr, qp.rq_ring_addr);
    let Some(sq) = qp.sq_geometry() else {
        return;
    };
    let rq = qp.rq_geometry();
    let has_srq = qp.has_srq();
    let (mut sq_head, mut rq_done) = (qp.rt.sq_head, qp.rt.rq_done);
    // An overrun send ring holds nothing the device may trust, so nothing in it is completed.
    let send = send && !qp.rt.sq_dead;
    if send {
        let producer = load_producer(mem, sq_addr).unwrap_or(sq_head);
        let pending = sq
            .occupancy(producer, sq_head)
            .unwrap_or(sq.depth())
            .min(producer.wrapping_sub(sq_head));
        for _ in 0..pending {
            let mut header = wqe::SendHeader::default();
            let at = vm_memory::GuestAddress(sq_addr + sq.entry_offset(sq_head));
            let _ = vm_memory::Bytes::read_slice(mem, header.as_mut_bytes(), at);
            let opcode = wqe::Opcode::from_raw(header.opcode)
                .map(cqe::Opcode::of_send)
                .unwrap_or(cqe::Opcode::Send);
            let c = Completion::new(
                header.wr_id.get(),
                qpn,
                cqe::Status::WrFlushErr,
                opcode,
                VendorErr::None,
            );
            // Free the slot before its completion is visible, as for any completion.
            publish_consumer(mem, sq_addr, sq_head.wrapping_add(1));
            if !post(objects, vm, mem, send_cqn, &c) {
                break;
            }
            sq_head = sq_head.wrapping_add(1);
        }
    }
    if recv && has_srq {
        flush_srq_recv(objects, vm, mem, qpn);
    } else if let (true, Some(rq)) = (recv, rq) {
        let producer = load_producer(mem, rq_addr).unwrap_or(rq_done);
        let pending = rq
            .occupancy(producer, rq_done)
            .unwrap_or(rq.depth())
            .min(producer.wrapping_sub(rq_done));
        for _ in 0..pending {
            let mut raw = [0u8; size_of::<wqe::RecvHeader>()];
            let at = vm_memory::GuestAddress(rq_addr + rq.entry_offset(rq_done));
            let _ = vm_memory::Bytes::read_slice(mem, &mut raw, at);
            let wr_id = wqe::RecvHeader::read_from_bytes(&raw)
                .map(|h| h.wr_id.get())
                .unwrap_or(0);
            let c = Completion::new(
                wr_id,
                qpn,
                cqe::Status::WrFlushErr,
                cqe::Opcode::Recv,
                VendorErr::None,
            );
            publish_consumer(mem, rq_addr, rq_done.wrapping_add(1));
            if !post(objects, vm, mem, recv_cqn, &c) {
                break;
            }
            rq_done = rq_done.wrapping_add(1);
        }
    }
    if let Some(qp) = objects.qps.get_mut(qpn) {
        if send {
            qp.rt.sq_head = sq_head;
            qp.rt.inflight.active = false;
        }
        if recv {
            qp.rt.rq_done = rq_done;
        }
    }
}

/// The receive flush of a QP in ERR attached to an SRQ: its held receive completes with
/// `WR_FLUSH_ERR`, then QP_LAST_WQE_REACHED tells the driver no more will come.
fn flush_srq_recv(objects: &mut VmObjects, vm: &Vm, mem: &GuestMem, qpn: u32) {
    let Some(qp) = objects.qps.get_mut(qpn) else {
        return;
    };
    let held = qp.rt.srq_recv.take();
    let first = !qp.rt.last_wqe_raised;
    qp.rt.last_wqe_raised = true;
    let cqn = qp.recv_cqn;
    if let Some(r) = held {
        let c = Completion::new(
            r.wr_id,
            qpn,
            cqe::Status::WrFlushErr,
            cqe::Opcode::Recv,
            VendorErr::None,
        );
        // A CQ in error drops it, as any flush completion destined for it (§18.5).
        let _ = post(objects, vm, mem, cqn, &c);
    }
    if first {
        vm.push_event(event::Kind::QpLastWqeReached, qpn);
    }
}

/// Moves QP `qpn` to ERR and queues it, so the scheduler flushes it and keeps flushing what
/// the driver posts later, whatever path took it there.
pub fn set_error(objects: &mut VmObjects, vm: &Vm, qpn: u32) {
    if let Some(qp) = objects.qps.get_mut(qpn) {
        qp.attr.qp_state = qp::State::Err.raw();
        qp.rt.rx_owner = None;
        vm.enqueue(qpn);
    }
}

/// The QP's send ring is unusable (overrun or unmapped): error state and a QP_FATAL event.
pub fn ring_fatal(objects: &mut VmObjects, vm: &Vm, mem: &GuestMem, qpn: u32, v: VendorErr) {
    warn!(
        "vm {}: QP {qpn:#x}'s send ring is unusable ({v:?}); the QP goes to the error state",
        vm.name
    );
    set_error(objects, vm, qpn);
    if let Some(qp) = objects.qps.get_mut(qpn) {
        qp.rt.sq_dead = true;
        qp.rt.inflight.active = false;
    }
    vm.push_event(event::Kind::QpFatal, qpn);
    flush(objects, vm, mem, qpn, false, true);
}
