//! The NIC's completions turned into the guest's: one thread per VM waits on the VM's
//! completion channel, polls the NIC CQ that has work, and completes each guest work request
//! through the completion rules every fabric shares, in ring order.
//!
//! The thread serves only its VM, so it may wait for the VM's lock (as a RoCEv2 receive
//! thread does); it hands the scheduler the QPs that can post again.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{debug, warn};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;
use vrdma_proto::cqe::{self, Flags, Status, VendorErr};
use vrdma_proto::{event, qp};

use super::nic;
use super::objects::{NicState, PostedRecv, Room, VmNic};
use super::post::{Tag, post_srq_receives, stop_nic_qp};
use crate::model::memory::{GuestMem, Runs, load_producer, read_runs};
use crate::model::objects::VmObjects;
use crate::model::vm::Vm;
use crate::rnic::completion::{Completion, flush, set_error};
use crate::rnic::requester::{fail_head, retire_head, sq_drained};
use crate::rnic::responder::{finish_recv, responder_error};
use crate::wake::Bell;

/// Completions taken from the NIC per poll.
const BATCH: usize = 16;

/// `IBV_WC_RECV_RDMA_WITH_IMM`.
const NIC_RECV_RDMA_WITH_IMM: u32 = 129;

/// Bytes of the GRH a UD receive starts with, and where its source GID lies.
const GRH_SGID_OFFSET: u64 = 8;

/// Waits for and delivers VM `vm`'s completions until `stop` is signalled.
pub fn run(
    vm: Arc<Vm>,
    nic_vm: Arc<VmNic>,
    room: Arc<Room>,
    stop: Arc<EventFd>,
    scheduler: Arc<Bell>,
) {
    let mut batch = [nic::Completion::default(); BATCH];
    let mut wake: Vec<u32> = Vec::with_capacity(64);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: nic_vm.channel.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            warn!("vm {}: waiting for NIC completions failed: {e}", vm.name);
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }
        let cqn = match nic_vm.channel.take_event() {
            Ok(cookie) => cookie as u32,
            Err(e) => {
                warn!("vm {}: reading a NIC completion event failed: {e}", vm.name);
                continue;
            }
        };
        let mut unpark = false;
        deliver(&vm, &nic_vm, &room, cqn, &mut batch, &mut wake, &mut unpark);
        for qpn in wake.drain(..) {
            vm.enqueue(qpn);
            unpark = true;
        }
        if unpark {
            scheduler.ring();
        }
        vm.deliver_events();
    }
}

/// Re-arms CQ `cqn` and completes everything it holds.
fn deliver(
    vm: &Vm,
    nic_vm: &VmNic,
    room: &Room,
    cqn: u32,
    batch: &mut [nic::Completion; BATCH],
    wake: &mut Vec<u32>,
    unpark: &mut bool,
) {
    let Some(cq) = nic_vm.state().cqs.get(&cqn).cloned() else {
        return;
    };
    // Armed before polling: a completion that lands after the last poll raises an event.
    if let Err(e) = cq.arm() {
        warn!("vm {}: arming a NIC CQ failed: {e}", vm.name);
    }
    loop {
        let n = match cq.poll(batch) {
            Ok(n) => n,
            Err(e) => {
                warn!("vm {}: polling a NIC CQ failed: {e}", vm.name);
                return;
            }
        };
        if n == 0 {
            return;
        }
        let mem = vm.mem.memory();
        let mut objects = vm.lock();
        let mut st = nic_vm.state();
        for c in &batch[..n] {
            complete(vm, &mut objects, &mut st, room, &mem, c, wake, unpark);
        }
    }
}

fn status_of(c: &nic::Completion) -> Status {
    u8::try_from(c.status)
        .ok()
        .and_then(|s| Status::from_raw(s).ok())
        .unwrap_or(Status::GeneralErr)
}

/// Completes the guest work request behind NIC completion `c`.
#[allow(clippy::too_many_arguments)]
fn complete(
    vm: &Vm,
    objects: &mut VmObjects,
    st: &mut NicState,
    room: &Room,
    mem: &GuestMem,
    c: &nic::Completion,
    wake: &mut Vec<u32>,
    unpark: &mut bool,
) {
    let tag = Tag::decode(c.wr_id);
    let qpn = c.qp_num;
    if tag.srq {
        complete_srq_recv(vm, objects, st, mem, c, tag.index);
        return;
    }
    let Some(nq) = st.qps.get_mut(&qpn) else {
        return;
    };
    if tag.epoch != nq.epoch {
        return;
    }
    if tag.recv {
        nq.recv.in_flight = nq.recv.in_flight.saturating_sub(1);
    } else {
        nq.send.in_flight = nq.send.in_flight.saturating_sub(1);
        if room.give(1) {
            *unpark = true;
        }
    }
    if tag.recv {
        complete_recv(vm, objects, st, mem, c, tag.index);
    } else {
        complete_send(vm, objects, st, mem, c, tag.index, wake);
    }
    // However the guest's QP went to ERR here (a CQ that overflowed, too), the NIC's follows,
    // so that it writes nothing more into receives the guest has seen flushed.
    stop_nic_qp(objects, st, qpn);
}

fn complete_send(
    vm: &Vm,
    objects: &mut VmObjects,
    st: &mut NicState,
    mem: &GuestMem,
    c: &nic::Completion,
    index: u32,
    wake: &mut Vec<u32>,
) {
    let qpn = c.qp_num;
    let Some(qp) = objects.qps.get(qpn) else {
        return;
    };
    // A request before the head was completed already, by a flush.
    if index != qp.rt.sq_head {
        return;
    }
    let Some(geometry) = qp.sq_geometry() else {
        return;
    };
    let Some(nq) = st.qps.get_mut(&qpn) else {
        return;
    };
    let Some(retired) = nq.sends[geometry.slot(index) as usize].take() else {
        return;
    };
    let status = status_of(c);
    if status != Status::Success {
        debug!(
            "vm {}: QP {qpn:#x}'s work request failed on the NIC: {}",
            vm.name,
            nic::status_text(c.status)
        );
        fail_head(
            objects,
            vm,
            mem,
            qpn,
            Some(retired),
            status,
            VendorErr::None,
        );
        stop_nic_qp(objects, st, qpn);
        return;
    }
    retire_head(objects, vm, mem, qpn, &retired, status, VendorErr::None);
    let Some(nq) = st.qps.get_mut(&qpn) else {
        return;
    };
    let head = index.wrapping_add(1);
    // A request that failed its checks behind this one fails now, in order.
    if let Some(fault) = nq.fault.filter(|f| f.index == head) {
        nq.fault = None;
        fail_head(
            objects,
            vm,
            mem,
            qpn,
            Some(fault.retired),
            fault.status,
            fault.vendor,
        );
        stop_nic_qp(objects, st, qpn);
        return;
    }
    if std::mem::take(&mut nq.stalled) {
        wake.push(qpn);
    }
    let drained = nq.send.in_flight == 0;
    if drained
        && objects
            .qps
            .get(qpn)
            .is_some_and(|q| q.state() == qp::State::Sqd)
    {
        sq_drained(objects, vm, qpn);
    }
}

/// Completes a receive the NIC took from an SRQ (for QP `c.qp_num`), then posts what the
/// guest's SRQ ring holds into the room it left, and checks the SRQ's limit.
fn complete_srq_recv(
    vm: &Vm,
    objects: &mut VmObjects,
    st: &mut NicState,
    mem: &GuestMem,
    c: &nic::Completion,
    slot: u32,
) {
    let qpn = c.qp_num;
    let Some(srqn) = objects.qps.get(qpn).map(|q| q.srqn) else {
        return;
    };
    let Some(nsrq) = st.srqs.get_mut(&srqn) else {
        return;
    };
    let Some(posted) = nsrq.posted.get_mut(slot as usize).and_then(Option::take) else {
        return;
    };
    nsrq.free.push(slot);
    let status = status_of(c);
    match status {
        Status::Success => {
            let done = received(c, posted, qpn, objects, mem);
            finish_recv(objects, vm, mem, qpn, &done);
        }
        Status::WrFlushErr => {
            set_error(objects, vm, qpn);
            flush(objects, vm, mem, qpn, true, true);
        }
        _ => {
            responder_error(
                objects,
                vm,
                mem,
                qpn,
                Some((posted.wr_id, status)),
                VendorErr::None,
            );
            stop_nic_qp(objects, st, qpn);
        }
    }
    if post_srq_receives(objects, st, mem, srqn) {
        vm.push_event(event::Kind::SrqErr, srqn);
    }
    // The limit counts the receives the SRQ still holds: on the NIC and in the ring.
    let on_nic = st
        .srqs
        .get(&srqn)
        .map_or(0, |n| (n.posted.len() - n.free.len()) as u32);
    let Some(srq) = objects.srqs.get_mut(srqn) else {
        return;
    };
    let in_ring = load_producer(mem, srq.ring_addr)
        .and_then(|p| srq.geometry()?.occupancy(p, srq.consumer).ok())
        .unwrap_or(0);
    if srq.limit != 0 && on_nic + in_ring < srq.limit {
        srq.limit = 0;
        vm.push_event(event::Kind::SrqLimitReached, srqn);
    }
}

/// The guest completion of a successful receive `posted` of QP `qpn`.
fn received(
    c: &nic::Completion,
    posted: PostedRecv,
    qpn: u32,
    objects: &VmObjects,
    mem: &GuestMem,
) -> Completion {
    let opcode = if c.opcode == NIC_RECV_RDMA_WITH_IMM {
        cqe::Opcode::RecvRdmaWithImm
    } else {
        cqe::Opcode::Recv
    };
    let mut done = Completion::new(posted.wr_id, qpn, Status::Success, opcode, VendorErr::None);
    let mut flags = Flags::empty();
    done.cqe.byte_len = c.byte_len.into();
    done.cqe.src_qp = c.src_qp.into();
    done.cqe.sl = c.sl;
    if let Some(imm) = c.imm {
        flags |= Flags::WITH_IMM;
        done.cqe.imm_data = imm.to_be_bytes();
    }
    if c.grh {
        flags |= Flags::GRH;
        if let Some(sgid) = posted.first.and_then(|f| read_sgid(objects, mem, f)) {
            done.cqe.sgid = vrdma_proto::Gid(sgid);
        }
    }
    done.cqe.wc_flags = flags.bits();
    // The NIC does not say whether the message was solicited: every receive may wake a
    // solicited-only arm (an extra wake-up, never a lost one).
    done.solicited = true;
    done
}

fn complete_recv(
    vm: &Vm,
    objects: &mut VmObjects,
    st: &mut NicState,
    mem: &GuestMem,
    c: &nic::Completion,
    index: u32,
) {
    let qpn = c.qp_num;
    let Some(qp) = objects.qps.get(qpn) else {
        return;
    };
    if index != qp.rt.rq_done {
        return;
    }
    let Some(geometry) = qp.rq_geometry() else {
        return;
    };
    let Some(nq) = st.qps.get(&qpn) else {
        return;
    };
    let posted = nq.recvs[geometry.slot(index) as usize];
    let status = status_of(c);
    match status {
        Status::Success => {}
        Status::WrFlushErr => {
            // The NIC's QP went to ERR by itself (a responder error): the guest's follows,
            // and every receive is flushed in order.
            set_error(objects, vm, qpn);
            flush(objects, vm, mem, qpn, true, true);
            return;
        }
        _ => {
            responder_error(
                objects,
                vm,
                mem,
                qpn,
                Some((posted.wr_id, status)),
                VendorErr::None,
            );
            stop_nic_qp(objects, st, qpn);
            return;
        }
    }
    let done = received(c, posted, qpn, objects, mem);
    finish_recv(objects, vm, mem, qpn, &done);
}

/// The source GID of the GRH the NIC wrote at the start of a UD receive's first SGE.
fn read_sgid(objects: &VmObjects, mem: &GuestMem, (lkey, addr): (u32, u64)) -> Option<[u8; 16]> {
    let mr = objects.mrs.get(lkey)?;
    let at = addr.checked_add(GRH_SGID_OFFSET)?;
    if !mr.contains(at, 16) {
        return None;
    }
    let mut runs = Runs::EMPTY;
    mr.runs(at, 16, &mut runs).ok()?;
    let mut gid = [0u8; 16];
    read_runs(mem, runs.as_slice(), &mut gid).ok()?;
    Some(gid)
}
