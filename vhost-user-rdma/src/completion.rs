//! Writing completions into a VM's CQ rings, raising CQ events, and flushing a QP's queues.

use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, GuestAddress};
use vrdma_proto::cqe::{self, Cqe, VendorErr};
use vrdma_proto::{event, ring, wqe};
use zerocopy::{FromBytes, IntoBytes};

use crate::port::VmPort;
use crate::vm::{GuestMem, Vm};

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

fn ring_word(base: u64, offset: u64) -> GuestAddress {
    GuestAddress(base.wrapping_add(offset))
}

/// Writes `c` into CQ `cqn` of `vm` and raises a completion event if the CQ is armed for it.
/// Returns false if the CQ is gone, overflowed now or before: the caller's QP must then go to
/// the error state, as on hardware.
pub fn post(vm: &mut Vm, port: &VmPort, mem: &GuestMem, cqn: u32, c: &Completion) -> bool {
    let Some(cq) = vm.cqs.get_mut(cqn) else {
        return false;
    };
    if cq.overflowed {
        return false;
    }
    let base = cq.ring_addr;
    let Ok(consumer) = mem.load::<u32>(ring_word(base, ring::CONSUMER_OFFSET), Ordering::Acquire)
    else {
        return false;
    };
    let used = cq.producer.wrapping_sub(consumer);
    if used >= cq.depth {
        // Either the CQ is full or the driver wrote a consumer index ahead of the producer;
        // both leave the CQ unusable.
        cq.overflowed = true;
        port.push_event(event::Kind::CqErr, cqn);
        return false;
    }
    let slot = u64::from(cq.producer & (cq.depth - 1));
    let at = GuestAddress(base + ring::HEADER_SIZE + slot * u64::from(cqe::SIZE));
    if mem.write_slice(c.cqe.as_bytes(), at).is_err() {
        cq.overflowed = true;
        port.push_event(event::Kind::CqErr, cqn);
        return false;
    }
    cq.producer = cq.producer.wrapping_add(1);
    if mem
        .store(
            cq.producer,
            ring_word(base, ring::PRODUCER_OFFSET),
            Ordering::Release,
        )
        .is_err()
    {
        return false;
    }
    port.counters.completions.fetch_add(1, Ordering::Relaxed);
    if c.cqe.status != cqe::Status::Success.raw() && c.cqe.status != cqe::Status::WrFlushErr.raw() {
        port.counters.errors.fetch_add(1, Ordering::Relaxed);
    }
    // Pairs with the driver's fence between storing the arm word and loading the producer
    // index (docs/protocol.md): one of the two sides sees the other's store.
    fence(Ordering::SeqCst);
    let Ok(arm) = mem.load::<u32>(ring_word(base, ring::ARM_OFFSET), Ordering::SeqCst) else {
        return true;
    };
    let (sequence, solicited_only) = ring::split_arm_word(arm);
    if sequence != cq.notify_ack && (!solicited_only || c.solicited) {
        cq.notify_ack = sequence;
        let _ = mem.store(
            sequence,
            ring_word(base, ring::NOTIFY_ACK_OFFSET),
            Ordering::Release,
        );
        port.push_event(event::Kind::CqCompletion, cqn);
    }
    true
}

/// Publishes a ring's consumer index to the driver.
pub fn publish_consumer(mem: &GuestMem, ring_addr: u64, index: u32) {
    // If the ring's memory is gone the driver has torn it down; nothing to tell.
    let _ = mem.store(
        index,
        ring_word(ring_addr, ring::CONSUMER_OFFSET),
        Ordering::Release,
    );
}

/// Loads a ring's producer index.
pub fn load_producer(mem: &GuestMem, ring_addr: u64) -> Option<u32> {
    mem.load::<u32>(
        ring_word(ring_addr, ring::PRODUCER_OFFSET),
        Ordering::Acquire,
    )
    .ok()
}

/// Completes every outstanding work request of QP `qpn` with `WR_FLUSH_ERR`: its send queue
/// if `send`, its receive queue if `recv`. Stops early if a CQ cannot take more; the rest is
/// flushed on a later call.
pub fn flush(vm: &mut Vm, port: &VmPort, mem: &GuestMem, qpn: u32, send: bool, recv: bool) {
    let Some(qp) = vm.qps.get(qpn) else { return };
    let (send_cqn, recv_cqn) = (qp.send_cqn, qp.recv_cqn);
    let (sq_addr, rq_addr) = (qp.sq_ring_addr, qp.rq_ring_addr);
    let (Some(sq), Some(rq)) = (qp.sq_geometry(), qp.rq_geometry()) else {
        return;
    };
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
            let at = GuestAddress(sq_addr + sq.entry_offset(sq_head));
            let _ = mem.read_slice(header.as_mut_bytes(), at);
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
            if !post(vm, port, mem, send_cqn, &c) {
                break;
            }
            sq_head = sq_head.wrapping_add(1);
        }
    }
    if recv {
        let producer = load_producer(mem, rq_addr).unwrap_or(rq_done);
        let pending = rq
            .occupancy(producer, rq_done)
            .unwrap_or(rq.depth())
            .min(producer.wrapping_sub(rq_done));
        for _ in 0..pending {
            let mut raw = [0u8; size_of::<wqe::RecvHeader>()];
            let _ = mem.read_slice(&mut raw, GuestAddress(rq_addr + rq.entry_offset(rq_done)));
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
            if !post(vm, port, mem, recv_cqn, &c) {
                break;
            }
            rq_done = rq_done.wrapping_add(1);
        }
    }
    if let Some(qp) = vm.qps.get_mut(qpn) {
        if send {
            qp.rt.sq_head = sq_head;
            qp.rt.inflight.active = false;
        }
        if recv {
            qp.rt.rq_done = rq_done;
        }
    }
}
