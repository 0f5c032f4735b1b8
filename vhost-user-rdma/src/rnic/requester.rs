//! Requester rules every fabric shares: which QPs may send, taking a send work request off the
//! ring and checking it, retiring the request at the head of the send queue with its
//! completion, failing it, the send ring's polling word, and the SQD drained event.

use std::sync::atomic::{Ordering, fence};

use log::debug;
use vm_memory::{Bytes, GuestAddress};
use vrdma_proto::cqe::{self, Status, VendorErr};
use vrdma_proto::mr::Access;
use vrdma_proto::wqe::{self, Opcode, Payload, SendFlags};
use vrdma_proto::{event, qp, ring};
use zerocopy::FromBytes;

use super::completion::{self, Completion, flush, ring_fatal, set_error};
use crate::model::memory::{self, GuestMem, WriteKind, load_producer, publish_consumer};
use crate::model::objects::{Qp, SgeFault, VmObjects, check_local};
use crate::model::qp_state::{MAX_SEND_SLOT, Retries};
use crate::model::vm::Vm;

/// What the scheduler should do with a QP it was asked to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Examined {
    /// The QP may send (RTS, or SQD finishing what it started): hand it to the fabric.
    Send,
    /// The QP is in ERR or SQE: its queues were flushed, and work posted later must be too.
    Flushed,
    /// Nothing to do in this state.
    Idle,
}

/// Looks at QP `qpn` as a requester: a QP in ERR has both queues flushed, one in SQE its send
/// queue; only RTS and SQD send.
pub fn examine(objects: &mut VmObjects, vm: &Vm, mem: &GuestMem, qpn: u32) -> Examined {
    let Some(qp) = objects.qps.get(qpn) else {
        return Examined::Idle;
    };
    match qp.state() {
        qp::State::Err => {
            // Doorbells tell the device about new work to flush; nobody will poll for it.
            set_sq_polling(objects, mem, qpn, false);
            flush(objects, vm, mem, qpn, true, true);
            Examined::Flushed
        }
        qp::State::Sqe => {
            set_sq_polling(objects, mem, qpn, false);
            flush(objects, vm, mem, qpn, true, false);
            Examined::Flushed
        }
        qp::State::Rts | qp::State::Sqd => Examined::Send,
        _ => Examined::Idle,
    }
}

/// Reads send ring entry `index` of `qp` into `slot`. False if the ring's memory is gone.
pub fn read_send_slot(qp: &Qp, mem: &GuestMem, index: u32, slot: &mut [u8; MAX_SEND_SLOT]) -> bool {
    let Some(geometry) = qp.sq_geometry() else {
        return false;
    };
    let stride = geometry.stride() as usize;
    let at = GuestAddress(qp.sq_ring_addr + geometry.entry_offset(index));
    stride <= MAX_SEND_SLOT && mem.read_slice(&mut slot[..stride], at).is_ok()
}

/// What a send ring holds beyond the work requests already taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// More work requests.
    More,
    /// Nothing more.
    Nothing,
    /// The ring's producer index cannot be read or is impossible: the QP has gone to ERR.
    Fatal,
}

/// What QP `qpn`'s send ring holds beyond the `taken` work requests after its head. A ring
/// whose producer index cannot be read or is impossible is fatal to the QP.
pub fn sq_posted(objects: &mut VmObjects, vm: &Vm, mem: &GuestMem, qpn: u32, taken: u32) -> Posted {
    let Some(qp) = objects.qps.get(qpn) else {
        return Posted::Nothing;
    };
    let Some(geometry) = qp.sq_geometry() else {
        return Posted::Nothing;
    };
    let Some(producer) = load_producer(mem, qp.sq_ring_addr) else {
        ring_fatal(objects, vm, mem, qpn, VendorErr::GuestMemory);
        return Posted::Fatal;
    };
    match geometry.occupancy(producer, qp.rt.sq_head) {
        Ok(n) if n > taken => Posted::More,
        Ok(_) => Posted::Nothing,
        Err(_) => {
            ring_fatal(objects, vm, mem, qpn, VendorErr::RingOverrun);
            Posted::Fatal
        }
    }
}

/// How a local work request got on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// It is the one in progress now.
    Started,
    /// The ring is empty.
    Empty,
    /// It (or the ring) failed and has completed with an error.
    Failed,
}

/// Takes the next send work request of QP `qpn` off its ring, checks it, and makes it the one
/// in progress, with the QP's whole retry budget.
pub fn start_wr(objects: &mut VmObjects, vm: &Vm, mem: &GuestMem, qpn: u32) -> Start {
    match sq_posted(objects, vm, mem, qpn, 0) {
        Posted::More => {}
        Posted::Nothing => return Start::Empty,
        Posted::Fatal => return Start::Failed,
    }
    let Some(qp) = objects.qps.get(qpn) else {
        return Start::Empty;
    };
    let mut slot = [0u8; MAX_SEND_SLOT];
    if !read_send_slot(qp, mem, qp.rt.sq_head, &mut slot) {
        ring_fatal(objects, vm, mem, qpn, VendorErr::GuestMemory);
        return Start::Failed;
    }
    let retries = Retries::full(&qp.attr);
    let checked = match wqe::decode_send(&slot, qp.send_limits()) {
        Err(_) => Err((Status::LocQpOpErr, VendorErr::MalformedWqe)),
        Ok(wr) => check_wr(objects, qp, &wr),
    };
    let Some(qp) = objects.qps.get_mut(qpn) else {
        return Start::Empty;
    };
    let inflight = &mut qp.rt.inflight;
    inflight.slot = slot;
    inflight.active = true;
    inflight.done = 0;
    inflight.wait_until = None;
    qp.rt.retries = retries;
    match checked {
        Ok(()) => Start::Started,
        Err((status, vendor)) => {
            fail_wr(objects, vm, mem, qpn, status, vendor);
            Start::Failed
        }
    }
}

/// The requester-side checks of a work request of `qp`, before any byte moves.
pub fn check_wr(
    objects: &VmObjects,
    qp: &Qp,
    wr: &wqe::SendWr<'_>,
) -> Result<(), (Status, VendorErr)> {
    let qp_type = qp.qp_type();
    if qp_type == qp::Type::Ud && !wr.opcode.allowed_on_ud() {
        return Err((Status::LocQpOpErr, VendorErr::BadOpcodeForQp));
    }
    if wr.byte_len > crate::limits::MAX_MSG_SIZE {
        return Err((Status::LocLenErr, VendorErr::MessageTooLong));
    }
    if qp_type == qp::Type::Ud && wr.byte_len > vrdma_proto::config::Mtu::Mtu4096.bytes() {
        return Err((Status::LocLenErr, VendorErr::MessageTooLong));
    }
    if wr.opcode.is_atomic() && wr.byte_len != wqe::ATOMIC_SIZE {
        return Err((Status::LocLenErr, VendorErr::BadAtomic));
    }
    if let Payload::Sges(sges) = wr.payload {
        let need = if wr.opcode.writes_local() {
            Access::LOCAL_WRITE
        } else {
            Access::empty()
        };
        for sge in sges.iter() {
            check_local(&objects.mrs, qp.pdn, &sge, need).map_err(|fault| match fault {
                SgeFault::Access(v) => (Status::LocAccessErr, v),
                SgeFault::Protection(v) => (Status::LocProtErr, v),
            })?;
        }
    }
    Ok(())
}

/// What a completion says about the send work request it retires.
#[derive(Debug, Clone, Copy)]
pub struct Retired {
    /// Its `wr_id`.
    pub wr_id: u64,
    /// Its opcode.
    pub opcode: Opcode,
    /// Whether it asked for a completion when it succeeds (or its QP completes every send).
    pub signaled: bool,
    /// Its length.
    pub byte_len: u32,
}

impl Retired {
    /// The work request `wr` of `qp`.
    pub fn of(qp: &Qp, wr: &wqe::SendWr<'_>) -> Self {
        Retired {
            wr_id: wr.header.wr_id.get(),
            opcode: wr.opcode,
            signaled: qp.sq_sig_all || wr.flags.contains(SendFlags::SIGNALED),
            byte_len: wr.byte_len,
        }
    }

    /// The work request in ring slot `slot` of `qp`: decoded whole, or, if it is malformed,
    /// what its header says (it still completes, with an error).
    pub fn of_slot(qp: &Qp, slot: &[u8]) -> Self {
        if let Ok(wr) = wqe::decode_send(slot, qp.send_limits()) {
            return Retired::of(qp, &wr);
        }
        let header = wqe::SendHeader::read_from_prefix(slot)
            .map(|(h, _)| h)
            .unwrap_or_default();
        Retired {
            wr_id: header.wr_id.get(),
            opcode: Opcode::from_raw(header.opcode).unwrap_or(Opcode::Send),
            signaled: true,
            byte_len: 0,
        }
    }
}

/// Retires the work request at the head of QP `qpn`'s send queue, `done`, with `status`: the
/// ring slot is freed, the request counted, and its completion written if it is signalled or
/// failed. Returns whether the QP should be looked at again: more requests wait, or it is in
/// SQD and its drained event may be due. Every fabric retires requests here, so they
/// complete the same way whoever carried them.
pub fn retire_head(
    objects: &mut VmObjects,
    vm: &Vm,
    mem: &GuestMem,
    qpn: u32,
    done: &Retired,
    status: Status,
    v: VendorErr,
) -> bool {
    let Some(qp) = objects.qps.get_mut(qpn) else {
        return false;
    };
    let (cqn, ring_addr) = (qp.send_cqn, qp.sq_ring_addr);
    qp.rt.sq_head = qp.rt.sq_head.wrapping_add(1);
    let head = qp.rt.sq_head;
    // The slot is free before its completion is visible: a driver that polls the completion
    // and posts at once must find room, as on hardware. The CQ producer's release store
    // carries this store to the driver's acquire load.
    publish_consumer(mem, ring_addr, head);
    vm.counters.wrs.fetch_add(1, Ordering::Relaxed);
    if done.signaled || status != Status::Success {
        let mut c = Completion::new(
            done.wr_id,
            qpn,
            status,
            cqe::Opcode::of_send(done.opcode),
            v,
        );
        if status == Status::Success {
            let byte_len = if done.opcode.is_atomic() {
                wqe::ATOMIC_SIZE
            } else {
                done.byte_len
            };
            c.cqe.byte_len = byte_len.into();
        }
        if !completion::post(objects, vm, mem, cqn, &c) {
            set_error(objects, vm, qpn);
            return true;
        }
    }
    let draining = objects
        .qps
        .get(qpn)
        .is_some_and(|q| q.state() == qp::State::Sqd);
    draining || load_producer(mem, ring_addr).is_some_and(|p| p != head)
}

/// Completes QP `qpn`'s local work request in progress with `status` and consumes it.
/// Returns whether the QP should be looked at again.
pub fn complete_wr(
    objects: &mut VmObjects,
    vm: &Vm,
    mem: &GuestMem,
    qpn: u32,
    wr: &wqe::SendWr<'_>,
    status: Status,
    v: VendorErr,
) -> bool {
    let Some(qp) = objects.qps.get_mut(qpn) else {
        return false;
    };
    qp.rt.inflight.active = false;
    let done = Retired::of(qp, wr);
    retire_head(objects, vm, mem, qpn, &done, status, v)
}

/// Fails the work request at the head of QP `qpn`'s send queue, `head` (if one was under
/// way), with `status`, and takes the QP to the error state (SQE for UD), flushing what
/// remains.
pub fn fail_head(
    objects: &mut VmObjects,
    vm: &Vm,
    mem: &GuestMem,
    qpn: u32,
    head: Option<Retired>,
    status: Status,
    v: VendorErr,
) {
    if let Some(done) = head {
        retire_head(objects, vm, mem, qpn, &done, status, v);
    }
    debug!(
        "vm {}: QP {qpn:#x} failed a work request: {status:?} ({v:?})",
        vm.name
    );
    let Some(qp) = objects.qps.get_mut(qpn) else {
        return;
    };
    qp.rt.inflight.active = false;
    if qp.qp_type() == qp::Type::Ud {
        qp.attr.qp_state = qp::State::Sqe.raw();
        vm.enqueue(qpn);
        flush(objects, vm, mem, qpn, true, false);
    } else {
        set_error(objects, vm, qpn);
        flush(objects, vm, mem, qpn, true, true);
    }
}

/// Fails QP `qpn`'s local work request in progress (if any) with `status`; see [`fail_head`].
pub fn fail_wr(
    objects: &mut VmObjects,
    vm: &Vm,
    mem: &GuestMem,
    qpn: u32,
    status: Status,
    v: VendorErr,
) {
    let Some(qp) = objects.qps.get(qpn) else {
        return;
    };
    let head = qp
        .rt
        .inflight
        .active
        .then(|| Retired::of_slot(qp, &qp.rt.inflight.slot));
    fail_head(objects, vm, mem, qpn, head, status, v);
}

/// Raises QP `qpn`'s SqDrained event if it asked for one and has not had it since it entered
/// SQD; the caller has found its send queue drained.
pub fn sq_drained(objects: &mut VmObjects, vm: &Vm, qpn: u32) {
    let Some(qp) = objects.qps.get_mut(qpn) else {
        return;
    };
    if qp.attr.en_sqd_async_notify == 1 && !qp.rt.sqd_notified {
        qp.rt.sqd_notified = true;
        vm.push_event(event::Kind::SqDrained, qpn);
    }
}

/// Sets or clears QP `qpn`'s send-ring polling word (`ring::SEND_POLLING_OFFSET`), writing
/// guest memory only when it changes. Clearing returns whether work was posted meanwhile: the
/// driver stores its producer index, fences and loads the word, and the device clears the
/// word, fences and loads the producer index, so one of the two always sees the other (as
/// with virtio's `NO_NOTIFY`).
pub fn set_sq_polling(objects: &mut VmObjects, mem: &GuestMem, qpn: u32, on: bool) -> bool {
    let Some(qp) = objects.qps.get_mut(qpn) else {
        return false;
    };
    if qp.rt.sq_polling == on {
        return false;
    }
    qp.rt.sq_polling = on;
    let word = memory::ring_word(qp.sq_ring_addr, ring::SEND_POLLING_OFFSET);
    let _ = memory::store_u32(
        mem,
        word,
        u32::from(on),
        Ordering::SeqCst,
        WriteKind::ControlWord,
    );
    if on {
        return false;
    }
    fence(Ordering::SeqCst);
    load_producer(mem, qp.sq_ring_addr).is_some_and(|p| p != qp.rt.sq_head)
}
