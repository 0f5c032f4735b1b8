//! Posting a VM's work to the NIC: its send work requests, checked by the requester rules
//! every fabric shares and translated (the guest's lkeys to the NIC's; addresses stay, as
//! each NIC MR is registered at the guest MR's own iova), and its receives.
//!
//! Runs on the scheduler's thread under the VM's lock; allocates nothing.

use vm_memory::{Bytes, GuestAddress};
use vrdma_proto::cqe::{Status, VendorErr};
use vrdma_proto::qp;
use vrdma_proto::wqe::{self, Opcode, Payload, SendFlags, Sge};

use super::nic;
use super::objects::{Fault, NicState, PostedRecv, Room, error_chain};
use crate::fabric::{StepOutcome, WR_COST};
use crate::model::memory::{GuestMem, load_producer, publish_consumer};
use crate::model::objects::VmObjects;
use crate::model::qp_state::{MAX_SEND_SLOT, RecvCopy};
use crate::model::vm::Vm;
use crate::rnic::completion::ring_fatal;
use crate::rnic::requester::{
    Posted, Retired, check_wr, fail_head, read_send_slot, sq_drained, sq_posted,
};
use crate::rnic::responder::check_recv;

/// What a NIC work request's id says: which QP life, which queue, which ring index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// The QP's epoch when it was posted.
    pub epoch: u16,
    /// A receive rather than a send.
    pub recv: bool,
    /// A receive of an SRQ: `index` is its slot among the SRQ's receives on the NIC.
    pub srq: bool,
    /// Its guest ring index.
    pub index: u32,
}

impl Tag {
    /// As a `wr_id`.
    pub fn encode(self) -> u64 {
        (u64::from(self.epoch) << 40)
            | (u64::from(self.srq) << 33)
            | (u64::from(self.recv) << 32)
            | u64::from(self.index)
    }

    /// From a `wr_id` the fabric posted.
    pub fn decode(wr_id: u64) -> Tag {
        Tag {
            epoch: (wr_id >> 40) as u16,
            recv: (wr_id >> 32) & 1 == 1,
            srq: (wr_id >> 33) & 1 == 1,
            index: wr_id as u32,
        }
    }
}

/// The NIC operation of a guest send work request.
fn send_op<'a>(
    st: &'a NicState,
    wr: &wqe::SendWr<'_>,
    qp_type: qp::Type,
) -> Result<nic::SendOp<'a>, VendorErr> {
    let h = &wr.header;
    let imm = matches!(wr.opcode, Opcode::SendWithImm | Opcode::RdmaWriteWithImm)
        .then(|| u32::from_be_bytes(h.imm_data));
    let (addr, rkey) = (h.remote_addr.get(), h.rkey.get());
    Ok(match wr.opcode {
        Opcode::Send | Opcode::SendWithImm if qp_type == qp::Type::Ud => {
            let ah = st.ahs.get(&h.ah.get()).ok_or(VendorErr::BadAh)?;
            nic::SendOp::Datagram {
                ah,
                qpn: h.remote_qpn.get(),
                qkey: h.remote_qkey.get(),
                imm,
            }
        }
        Opcode::Send | Opcode::SendWithImm => nic::SendOp::Send { imm },
        Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => nic::SendOp::Write { addr, rkey, imm },
        Opcode::RdmaRead => nic::SendOp::Read { addr, rkey },
        Opcode::AtomicCmpAndSwp => nic::SendOp::CompareSwap {
            addr,
            rkey,
            compare: h.compare_add.get(),
            swap: h.swap.get(),
        },
        Opcode::AtomicFetchAndAdd => nic::SendOp::FetchAdd {
            addr,
            rkey,
            add: h.compare_add.get(),
        },
    })
}

/// The NIC's SGEs for the guest's `sges`, which the requester or responder rules have
/// checked: each lkey replaced by its NIC MR's (addresses stay: the NIC MR is registered at
/// the guest MR's iova), empty ones left out.
fn nic_sges(
    st: &NicState,
    sges: impl Iterator<Item = Sge>,
    out: &mut [nic::Sge; nic::MAX_SGE],
) -> Result<usize, VendorErr> {
    let mut n = 0;
    for sge in sges {
        let len = sge.length.get();
        if len == 0 {
            continue;
        }
        let mr = st.mrs.get(&sge.lkey.get()).ok_or(VendorErr::BadLkey)?;
        *out.get_mut(n).ok_or(VendorErr::MalformedWqe)? = nic::Sge {
            addr: sge.addr.get(),
            len,
            lkey: mr.mr.lkey(),
        };
        n += 1;
    }
    Ok(n)
}

/// The NIC's SGEs for a checked work request whose slot (ring index `index`) is `slot`.
fn send_sges(
    st: &NicState,
    qpn: u32,
    wr: &wqe::SendWr<'_>,
    slot: &[u8],
    slot_gpa: u64,
    out: &mut [nic::Sge; nic::MAX_SGE],
) -> Result<usize, VendorErr> {
    match wr.payload {
        Payload::Sges(list) => nic_sges(st, list.iter(), out),
        Payload::Inline(data) => {
            if data.is_empty() {
                return Ok(0);
            }
            // The data stays in the guest's ring slot, which is the device's until the
            // request completes: the NIC sends it from there, through the ring's
            // registration (named by guest-physical address).
            let ring = &st.qps.get(&qpn).ok_or(VendorErr::MalformedWqe)?.ring;
            let offset = (data.as_ptr() as usize).wrapping_sub(slot.as_ptr() as usize);
            out[0] = nic::Sge {
                addr: slot_gpa + offset as u64,
                len: data.len() as u32,
                lkey: ring.mr.lkey(),
            };
            Ok(1)
        }
    }
}

/// What posting the next send work request of a QP came to.
enum Next {
    /// Posted, moving this many payload bytes.
    Posted(u32),
    /// Nothing more to post now.
    Done,
    /// The request failed now (nothing of the QP's was on the NIC); the QP is in error.
    FailedNow,
    /// The ring cannot be read: the QP is in error.
    Fatal,
    /// The NIC has no room for anyone's sends now.
    Full,
}

/// Posts QP `qpn`'s send work requests to the NIC, up to `budget` bytes of cost, as many as
/// the ring and the VM's bound on the NIC allow.
pub fn step(
    vm: &Vm,
    objects: &mut VmObjects,
    st: &mut NicState,
    room: &Room,
    mem: &GuestMem,
    qpn: u32,
    budget: u32,
) -> StepOutcome {
    let Some(qp) = objects.qps.get(qpn) else {
        return StepOutcome::IDLE;
    };
    if qp.state() == qp::State::Sqd {
        // SQD takes no new work; it drains what is on the NIC.
        if st.qps.get(&qpn).is_some_and(|nq| nq.send.in_flight == 0) {
            sq_drained(objects, vm, qpn);
        }
        return StepOutcome::IDLE;
    }
    if vm.share.is_draining() {
        // What is on the NIC finishes; nothing more goes to it.
        return StepOutcome::IDLE;
    }
    let (mut cost, mut bytes, mut wrs) = (0u32, 0u32, 0u32);
    while cost < budget {
        match post_next(vm, objects, st, room, mem, qpn) {
            Next::Posted(len) => {
                cost = cost.saturating_add(WR_COST.saturating_add(len));
                bytes = bytes.saturating_add(len);
                wrs += 1;
            }
            Next::Done => break,
            Next::FailedNow => {
                return StepOutcome::progress(cost.saturating_add(WR_COST), false, bytes, wrs + 1);
            }
            Next::Fatal => return StepOutcome::FAILED,
            Next::Full if wrs == 0 => return StepOutcome::FULL,
            // What was posted counts; the next step finds the NIC full.
            Next::Full => return StepOutcome::progress(cost, true, bytes, wrs),
        }
    }
    if wrs == 0 {
        StepOutcome::IDLE
    } else {
        StepOutcome::progress(cost, cost >= budget, bytes, wrs)
    }
}

/// Checks, translates and posts QP `qpn`'s next send work request.
fn post_next(
    vm: &Vm,
    objects: &mut VmObjects,
    st: &mut NicState,
    room: &Room,
    mem: &GuestMem,
    qpn: u32,
) -> Next {
    let (Some(qp), Some(nq)) = (objects.qps.get(qpn), st.qps.get(&qpn)) else {
        return Next::Done;
    };
    let Some(geometry) = qp.sq_geometry() else {
        return Next::Done;
    };
    if nq.fault.is_some() {
        return Next::Done;
    }
    let head = qp.rt.sq_head;
    let next = nq.send.next_from(head);
    let taken = next.wrapping_sub(head);
    if taken >= geometry.depth() {
        if let Some(nq) = st.qps.get_mut(&qpn) {
            nq.stalled = true;
        }
        return Next::Done;
    }
    match sq_posted(objects, vm, mem, qpn, taken) {
        Posted::More => {}
        Posted::Nothing => return Next::Done,
        Posted::Fatal => return Next::Fatal,
    }
    if !room.take() {
        return Next::Full;
    }
    let (Some(qp), Some(nq)) = (objects.qps.get(qpn), st.qps.get(&qpn)) else {
        room.give(1);
        return Next::Done;
    };
    let mut slot = [0u8; MAX_SEND_SLOT];
    if !read_send_slot(qp, mem, next, &mut slot) {
        room.give(1);
        ring_fatal(objects, vm, mem, qpn, VendorErr::GuestMemory);
        return Next::Fatal;
    }
    let slot = &slot[..geometry.stride() as usize];
    let slot_gpa = qp.sq_ring_addr + geometry.entry_offset(next);
    let mut sges = [nic::Sge {
        addr: 0,
        len: 0,
        lkey: 0,
    }; nic::MAX_SGE];
    let tag = Tag {
        epoch: nq.epoch,
        recv: false,
        srq: false,
        index: next,
    };
    let posted = match wqe::decode_send(slot, qp.send_limits()) {
        Err(_) => Err((
            Retired::of_slot(qp, slot),
            Status::LocQpOpErr,
            VendorErr::MalformedWqe,
        )),
        Ok(wr) => {
            let retired = Retired::of(qp, &wr);
            check_wr(objects, qp, &wr)
                .and_then(|()| {
                    let op = send_op(st, &wr, qp.qp_type()).map_err(|v| (Status::LocQpOpErr, v))?;
                    let n = send_sges(st, qpn, &wr, slot, slot_gpa, &mut sges)
                        .map_err(|v| (Status::LocProtErr, v))?;
                    let flags = nic::PostFlags {
                        solicited: wr.flags.contains(SendFlags::SOLICITED),
                        fence: wr.flags.contains(SendFlags::FENCE),
                    };
                    nq.qp
                        .post_send_with(tag.encode(), &sges[..n], op, flags)
                        .map_err(|e| {
                            log::warn!(
                                "vm {}: the NIC refused a work request of QP {qpn:#x}: {}",
                                vm.name,
                                error_chain(&e)
                            );
                            (Status::LocQpOpErr, VendorErr::None)
                        })
                })
                .map(|()| (retired, wr.byte_len))
                .map_err(|(s, v)| (retired, s, v))
        }
    };
    match posted {
        Ok((retired, len)) => {
            if let Some(nq) = st.qps.get_mut(&qpn) {
                nq.sends[geometry.slot(next) as usize] = Some(retired);
                nq.send.next = Some(next.wrapping_add(1));
                nq.send.in_flight += 1;
            }
            Next::Posted(len)
        }
        Err(failed) => {
            room.give(1);
            fail_unposted(vm, objects, st, mem, qpn, next, taken, failed)
        }
    }
}

/// A send work request that failed its checks (or that the NIC refused), at ring index
/// `next` with `taken` before it on the NIC.
#[allow(clippy::too_many_arguments)]
fn fail_unposted(
    vm: &Vm,
    objects: &mut VmObjects,
    st: &mut NicState,
    mem: &GuestMem,
    qpn: u32,
    next: u32,
    taken: u32,
    (retired, status, vendor): (Retired, Status, VendorErr),
) -> Next {
    if taken == 0 {
        // Nothing of the QP's is on the NIC: it fails now, in order.
        fail_head(objects, vm, mem, qpn, Some(retired), status, vendor);
        stop_nic_qp(objects, st, qpn);
        return Next::FailedNow;
    }
    // It fails once the requests before it have completed.
    if let Some(nq) = st.qps.get_mut(&qpn) {
        nq.fault = Some(Fault {
            index: next,
            retired,
            status,
            vendor,
        });
    }
    Next::Done
}

/// Takes QP `qpn`'s NIC QP to ERR if the guest's went there: the NIC flushes what it holds
/// (those completions are found stale and dropped) and stops answering peers. A UD QP whose
/// guest QP went to SQE keeps its NIC QP as it is: its receives go on, and the guest's sends
/// are flushed by the daemon until it returns to RTS.
pub fn stop_nic_qp(objects: &VmObjects, st: &mut NicState, qpn: u32) {
    if objects
        .qps
        .get(qpn)
        .is_some_and(|q| q.state() != qp::State::Err)
    {
        return;
    }
    if let Some(nq) = st.qps.get_mut(&qpn) {
        if std::mem::replace(&mut nq.stopped, true) {
            return;
        }
        if let Err(e) = nq.qp.to_error() {
            log::debug!("QP {qpn:#x}: the NIC's QP did not go to ERR: {e}");
        }
    }
}

/// Takes QP `qpn` to ERR from its control path (the scheduler flushes it, as it does every
/// QP in `objects.wake`), and its NIC QP with it.
fn fail_from_control(objects: &mut VmObjects, st: &mut NicState, qpn: u32) {
    if let Some(qp) = objects.qps.get_mut(qpn) {
        qp.attr.qp_state = qp::State::Err.raw();
        qp.rt.rx_owner = None;
        objects.wake.push(qpn);
    }
    stop_nic_qp(objects, st, qpn);
}

/// Posts the receives the driver published on QP `qpn`'s ring since the last call
/// (`POST_RECV`, on the VM's control path).
pub fn post_receives(objects: &mut VmObjects, st: &mut NicState, mem: &GuestMem, qpn: u32) {
    let Some(qp) = objects.qps.get(qpn) else {
        return;
    };
    if qp.has_srq()
        || !matches!(
            qp.state(),
            qp::State::Init | qp::State::Rtr | qp::State::Rts | qp::State::Sqd | qp::State::Sqe
        )
    {
        return;
    }
    let Some(geometry) = qp.rq_geometry() else {
        return;
    };
    let (ring_addr, done, pdn, max_sge) = (
        qp.rq_ring_addr,
        qp.rt.rq_done,
        qp.pdn,
        qp.caps.max_recv_sge.get(),
    );
    let Some(producer) = load_producer(mem, ring_addr) else {
        fail_from_control(objects, st, qpn);
        return;
    };
    let Ok(posted) = geometry.occupancy(producer, done) else {
        fail_from_control(objects, st, qpn);
        return;
    };
    let mut buf = [0u8; wqe::recv_stride(crate::limits::MAX_SGE) as usize];
    let stride = geometry.stride() as usize;
    loop {
        let Some(nq) = st.qps.get(&qpn) else {
            return;
        };
        let next = nq.recv.next_from(done);
        if next.wrapping_sub(done) >= posted {
            return;
        }
        let Some(slot) = buf.get_mut(..stride) else {
            return;
        };
        let at = GuestAddress(ring_addr + geometry.entry_offset(next));
        let mut copy = RecvCopy::default();
        let checked = mem
            .read_slice(slot, at)
            .map_err(|_| VendorErr::GuestMemory)
            .and_then(|()| check_recv(&objects.mrs, slot, max_sge, pdn, &mut copy));
        let mut sges = [nic::Sge {
            addr: 0,
            len: 0,
            lkey: 0,
        }; nic::MAX_SGE];
        let translated =
            checked.and_then(|()| nic_sges(st, copy.sges[..copy.n].iter().copied(), &mut sges));
        let tag = Tag {
            epoch: nq.epoch,
            recv: true,
            srq: false,
            index: next,
        };
        let result = translated.and_then(|n| {
            nq.qp.post_recv(tag.encode(), &sges[..n]).map_err(|e| {
                log::warn!(
                    "vm {}: the NIC refused a receive of QP {qpn:#x}: {}",
                    objects.name,
                    error_chain(&e)
                );
                VendorErr::None
            })
        });
        if let Err(v) = result {
            // A receive the NIC cannot take fails the QP when it is posted (the soft fabric
            // fails it when a message arrives for it): every receive is flushed.
            log::debug!(
                "vm {}: QP {qpn:#x}'s receive {next} is unusable ({v:?}); the QP goes to ERR",
                objects.name
            );
            fail_from_control(objects, st, qpn);
            return;
        }
        let first = copy.sges[..copy.n]
            .first()
            .map(|s| (s.lkey.get(), s.addr.get()));
        if let Some(nq) = st.qps.get_mut(&qpn) {
            nq.recvs[geometry.slot(next) as usize] = PostedRecv {
                wr_id: copy.wr_id,
                first,
            };
            nq.recv.next = Some(next.wrapping_add(1));
            nq.recv.in_flight += 1;
        }
    }
}

/// Posts the receives the driver published on SRQ `srqn`'s ring to its NIC SRQ, as many as
/// the NIC SRQ has room for; each leaves the guest's ring as it is posted. Returns true if the
/// SRQ has just gone into error (a receive it could not post, or a ring it cannot read): the
/// caller raises SRQ_ERR.
pub fn post_srq_receives(
    objects: &mut VmObjects,
    st: &mut NicState,
    mem: &GuestMem,
    srqn: u32,
) -> bool {
    let Some(srq) = objects.srqs.get(srqn) else {
        return false;
    };
    if srq.fault.is_some() {
        return false;
    }
    let Some(geometry) = srq.geometry() else {
        return false;
    };
    let (ring_addr, pdn, max_sge, mut consumer) =
        (srq.ring_addr, srq.pdn, srq.max_sge, srq.consumer);
    let fault = |objects: &mut VmObjects, v: VendorErr| {
        if let Some(srq) = objects.srqs.get_mut(srqn) {
            srq.fault = Some(v);
        }
        true
    };
    let Some(producer) = load_producer(mem, ring_addr) else {
        return fault(objects, VendorErr::GuestMemory);
    };
    let Ok(mut waiting) = geometry.occupancy(producer, consumer) else {
        return fault(objects, VendorErr::RingOverrun);
    };
    let mut buf = [0u8; wqe::recv_stride(crate::limits::MAX_SRQ_SGE) as usize];
    let stride = geometry.stride() as usize;
    let mut failed = None;
    while waiting > 0 {
        let Some(nsrq) = st.srqs.get_mut(&srqn) else {
            break;
        };
        let Some(&slot_id) = nsrq.free.last() else {
            break;
        };
        let Some(slot) = buf.get_mut(..stride) else {
            break;
        };
        let at = GuestAddress(ring_addr + geometry.entry_offset(consumer));
        let mut copy = RecvCopy::default();
        let mut sges = [nic::Sge {
            addr: 0,
            len: 0,
            lkey: 0,
        }; nic::MAX_SGE];
        let posted = mem
            .read_slice(slot, at)
            .map_err(|_| VendorErr::GuestMemory)
            .and_then(|()| check_recv(&objects.mrs, slot, max_sge, pdn, &mut copy))
            .and_then(|()| nic_sges(st, copy.sges[..copy.n].iter().copied(), &mut sges))
            .and_then(|n| {
                let tag = Tag {
                    epoch: 0,
                    recv: true,
                    srq: true,
                    index: slot_id,
                };
                let nsrq = st.srqs.get(&srqn).ok_or(VendorErr::MalformedWqe)?;
                nsrq.srq.post_recv(tag.encode(), &sges[..n]).map_err(|e| {
                    log::warn!(
                        "vm {}: the NIC refused a receive of SRQ {srqn:#x}: {}",
                        objects.name,
                        error_chain(&e)
                    );
                    VendorErr::None
                })
            });
        if let Err(v) = posted {
            failed = Some(v);
            break;
        }
        if let Some(nsrq) = st.srqs.get_mut(&srqn) {
            nsrq.free.pop();
            nsrq.posted[slot_id as usize] = Some(PostedRecv {
                wr_id: copy.wr_id,
                first: copy.sges[..copy.n]
                    .first()
                    .map(|s| (s.lkey.get(), s.addr.get())),
            });
        }
        consumer = consumer.wrapping_add(1);
        waiting -= 1;
    }
    if let Some(srq) = objects.srqs.get_mut(srqn) {
        if srq.consumer != consumer {
            srq.consumer = consumer;
            // The NIC holds them now: their slots are the driver's again.
            publish_consumer(mem, ring_addr, consumer);
        }
    }
    match failed {
        Some(v) => fault(objects, v),
        None => false,
    }
}
