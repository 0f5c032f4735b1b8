//! The built-in soft fabric: a VM's work goes straight into its peer's memory when the peer
//! is a VM of this daemon, one chunk per step, with the sender's and the receiver's objects
//! locked for that chunk (the receiver's with `try_lock`). With `--roce`, QPs whose peer is
//! on another host go through the RoCEv2 fabric instead.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::debug;
use vm_memory::GuestAddressSpace;
use vrdma_proto::cqe::{Status, VendorErr};
use vrdma_proto::wqe::{self, Payload, SendFlags};
use vrdma_proto::{Gid, qp};

use super::roce::RoceFabric;
use super::{Fabric, StepOutcome, WR_COST};
use crate::model::hooks::{NoHooks, ObjectHooks};
use crate::model::memory::{self, CopyCut, GuestMem, Runs, WriteKind};
use crate::model::objects::{VmObjects, sge_runs};
use crate::model::vm::Vm;
use crate::rnic::requester::{Start, complete_wr, fail_wr, set_sq_polling, sq_drained, start_wr};
use crate::rnic::responder::{Chunk, Resp, respond};

/// How soon a request to a paused VM is tried again.
const PAUSED_RETRY: Duration = Duration::from_millis(1);

/// The soft fabric: VMs of this daemon by GID, and the RoCEv2 fabric for the rest.
#[derive(Debug, Default)]
pub struct SoftFabric {
    by_gid: HashMap<Gid, Arc<Vm>>,
    /// VMs whose traffic is paused (few, and only during a migration).
    paused: Vec<u64>,
    /// The inter-host fabric, with `--roce`.
    remote: Option<RoceFabric>,
}

impl SoftFabric {
    /// A soft fabric; with `remote`, QPs whose peer is on another host use it.
    pub fn new(remote: Option<RoceFabric>) -> Self {
        SoftFabric {
            remote,
            ..SoftFabric::default()
        }
    }
}

impl Fabric for SoftFabric {
    fn attach(&mut self, vm: &Arc<Vm>) {
        self.by_gid.insert(vm.gid, vm.clone());
        if let Some(remote) = &mut self.remote {
            remote.attach(vm);
        }
    }

    fn detach(&mut self, vm: &Arc<Vm>) {
        if self.by_gid.get(&vm.gid).is_some_and(|v| v.id == vm.id) {
            self.by_gid.remove(&vm.gid);
        }
        self.paused.retain(|&id| id != vm.id);
        if let Some(remote) = &mut self.remote {
            remote.detach(vm);
        }
    }

    fn moved_away(&mut self, vm: &Arc<Vm>) {
        if let Some(remote) = &mut self.remote {
            remote.release(&vm.gid);
        }
    }

    fn announce(&mut self, vm: &Arc<Vm>, objects: &mut VmObjects) -> Vec<u32> {
        match &mut self.remote {
            Some(remote) => remote.announce(vm, objects),
            None => Vec::new(),
        }
    }

    fn pause(&mut self, vm_id: u64) {
        if !self.paused.contains(&vm_id) {
            self.paused.push(vm_id);
        }
        self.pause_remote(vm_id, true);
    }

    fn resume(&mut self, vm_id: u64) {
        self.paused.retain(|&id| id != vm_id);
        self.pause_remote(vm_id, false);
    }

    fn step(
        &mut self,
        vm: &Arc<Vm>,
        objects: &mut VmObjects,
        mem: &GuestMem,
        qpn: u32,
        budget: u32,
        cut: Option<CopyCut<'_>>,
    ) -> StepOutcome {
        let Some(qp) = objects.qps.get(qpn) else {
            return StepOutcome::IDLE;
        };
        if let Some(remote) = &mut self.remote {
            // A QP that has used the wire stays on it even if its peer's VM attaches here
            // later (its packets then come back to this daemon's own address): its packets in
            // flight and PSNs belong to the wire, and switching would lose them.
            let on_wire = qp.rt.rc.is_started() || !self.by_gid.contains_key(&qp.attr.ah_attr.dgid);
            if qp.qp_type() == qp::Type::Rc && on_wire {
                return remote.step_rc(vm, objects, mem, qpn, budget, cut);
            }
        }
        if !qp.rt.inflight.active {
            if qp.state() == qp::State::Sqd {
                sq_drained(objects, vm, qpn);
                return StepOutcome::IDLE;
            }
            if vm.share.is_draining() {
                return StepOutcome::IDLE;
            }
            match start_wr(objects, vm, mem, qpn) {
                Start::Started => {
                    set_sq_polling(objects, mem, qpn, true);
                }
                Start::Empty => return StepOutcome::IDLE,
                Start::Failed => return StepOutcome::FAILED,
            }
        }
        let Some(qp) = objects.qps.get(qpn) else {
            return StepOutcome::IDLE;
        };
        if let Some(at) = qp.rt.inflight.wait_until {
            if at > Instant::now() {
                return StepOutcome::wait_until(at);
            }
        }
        self.execute(vm, objects, mem, qpn, budget, cut)
    }

    fn hooks(&self) -> Arc<dyn ObjectHooks> {
        Arc::new(NoHooks)
    }

    /// Guest to guest, a step carries the responder's side too; only RoCEv2's receive
    /// threads give VMs work of their own accord.
    fn gives_work_from_its_threads(&self) -> bool {
        self.remote.is_some()
    }
}

impl SoftFabric {
    /// Pauses (or resumes) what the RoCEv2 fabric takes from the network for VM `vm_id`, on
    /// its address; a VM that resumes (or starts) takes its address if this daemon does not
    /// hold it yet (it arrived by migration).
    fn pause_remote(&mut self, vm_id: u64, paused: bool) {
        let gid = self.by_gid.values().find(|v| v.id == vm_id).map(|v| v.gid);
        if let (Some(remote), Some(gid)) = (&mut self.remote, gid) {
            remote.set_paused(&gid, paused);
            if !paused {
                remote.claim(&gid);
            }
        }
    }

    /// Moves the next chunk of QP `qpn`'s work request in progress (less, if `cut` ends its
    /// copy early).
    fn execute(
        &mut self,
        a: &Arc<Vm>,
        av: &mut VmObjects,
        a_mem: &GuestMem,
        qpn: u32,
        budget: u32,
        cut: Option<CopyCut<'_>>,
    ) -> StepOutcome {
        let Some(qp) = av.qps.get(qpn) else {
            return StepOutcome::IDLE;
        };
        let slot = qp.rt.inflight.slot;
        let Ok(wr) = wqe::decode_send(&slot, qp.send_limits()) else {
            // Decoded once already when the work request started; the copy cannot change.
            fail_wr(
                av,
                a,
                a_mem,
                qpn,
                Status::LocQpOpErr,
                VendorErr::MalformedWqe,
            );
            return StepOutcome::FAILED;
        };
        let qp_type = qp.qp_type();
        let done = qp.rt.inflight.done;
        let pdn = qp.pdn;
        // Where the message goes.
        let (dgid, dest_qpn, qkey) = if qp_type == qp::Type::Ud {
            let Some(ah) = av.ahs.get(wr.header.ah.get()) else {
                fail_wr(av, a, a_mem, qpn, Status::LocQpOpErr, VendorErr::BadAh);
                return StepOutcome::FAILED;
            };
            if ah.pdn != pdn {
                fail_wr(av, a, a_mem, qpn, Status::LocQpOpErr, VendorErr::PdMismatch);
                return StepOutcome::FAILED;
            }
            let wr_qkey = wr.header.remote_qkey.get();
            // Verbs: a Q_Key with the high bit set means "use the QP's own".
            let qkey = if wr_qkey & 0x8000_0000 != 0 {
                qp.attr.qkey.get()
            } else {
                wr_qkey
            };
            (ah.attr.dgid, wr.header.remote_qpn.get(), qkey)
        } else {
            (qp.attr.ah_attr.dgid, qp.attr.dest_qp_num.get(), 0)
        };
        let len = wr.byte_len;
        // A datagram and an atomic are indivisible; only RC data moves in pieces.
        let n = if qp_type == qp::Type::Ud || wr.opcode.is_atomic() {
            len - done
        } else {
            (len - done).min(budget)
        };
        // The requester's side of this chunk: where its bytes come from or go to.
        let mut a_runs = Runs::default();
        let mut inline = [0u8; crate::limits::MAX_INLINE as usize];
        let mut inline_len = 0usize;
        match wr.payload {
            Payload::Inline(bytes) => {
                let chunk = &bytes[done as usize..(done + n) as usize];
                inline[..chunk.len()].copy_from_slice(chunk);
                inline_len = chunk.len();
            }
            Payload::Sges(sges) => {
                if let Err(v) = sge_runs(&av.mrs, sges, done, n, &mut a_runs) {
                    fail_wr(av, a, a_mem, qpn, Status::LocProtErr, v);
                    return StepOutcome::FAILED;
                }
            }
        }
        let Some(b) = self.by_gid.get(&dgid).cloned() else {
            if let (Some(remote), qp::Type::Ud) = (&mut self.remote, qp_type) {
                return remote.send_ud(a, av, a_mem, qpn, &wr, dgid, dest_qpn, qkey);
            }
            return no_responder(a, av, a_mem, qpn, qp_type);
        };
        if self.paused.contains(&b.id) {
            return StepOutcome::wait_until(Instant::now() + PAUSED_RETRY);
        }
        let same = b.id == a.id;
        let b_mem_guard;
        let b_mem: &GuestMem = if same {
            a_mem
        } else {
            b_mem_guard = b.mem.memory();
            &b_mem_guard
        };
        let mut b_lock = if same {
            None
        } else {
            match b.try_lock() {
                Some(g) => Some(g),
                None => return StepOutcome::BLOCKED,
            }
        };
        let bv: &mut VmObjects = match b_lock.as_mut() {
            Some(g) => g,
            None => av,
        };
        let ctx = Chunk {
            a_id: a.id,
            a_gid: a.gid,
            a_qpn: qpn,
            qp_type,
            opcode: wr.opcode,
            header: &wr.header,
            solicited: wr.flags.contains(SendFlags::SOLICITED),
            len,
            done,
            n,
            last: done + n == len,
            qkey,
            a_runs: &a_runs,
            inline: &inline[..inline_len],
            is_inline: matches!(wr.payload, Payload::Inline(_)),
            a_mem,
            b_mem,
            // A datagram and an atomic are indivisible.
            cut: cut.filter(|_| qp_type != qp::Type::Ud && !wr.opcode.is_atomic()),
        };
        let mut atomic_result = 0u64;
        let resp = respond(bv, &b, dest_qpn, &ctx, &mut atomic_result);
        if let Some(g) = b_lock.take() {
            drop(g);
            b.deliver_events();
        }
        // Back on the requester's side (if `same`, `bv` was `av` and its borrow has ended).
        match resp {
            Resp::Done | Resp::Dropped => {
                if wr.opcode.is_atomic()
                    && memory::write_runs(
                        &atomic_result.to_ne_bytes(),
                        a_mem,
                        a_runs.as_slice(),
                        WriteKind::Atomic,
                    )
                    .is_err()
                {
                    fail_wr(
                        av,
                        a,
                        a_mem,
                        qpn,
                        Status::LocProtErr,
                        VendorErr::GuestMemory,
                    );
                    return StepOutcome::progress(WR_COST + n, false, 0, 1);
                }
                let Some(qp) = av.qps.get_mut(qpn) else {
                    return StepOutcome::IDLE;
                };
                qp.rt.inflight.done = done + n;
                if qp.rt.inflight.done < len && resp != Resp::Dropped {
                    return StepOutcome::progress(n, true, n, 0);
                }
                let more = complete_wr(av, a, a_mem, qpn, &wr, Status::Success, VendorErr::None);
                StepOutcome::progress(n + WR_COST, more, n, 1)
            }
            Resp::Cut(moved) => {
                debug_assert!(moved > 0, "a cut copy moves at least one piece");
                let Some(qp) = av.qps.get_mut(qpn) else {
                    return StepOutcome::IDLE;
                };
                qp.rt.inflight.done = done + moved;
                StepOutcome::progress(moved, true, moved, 0)
            }
            Resp::Busy => StepOutcome::BLOCKED,
            Resp::LocalFault(v) => {
                fail_wr(av, a, a_mem, qpn, Status::LocProtErr, v);
                StepOutcome::FAILED
            }
            Resp::NoResponder => no_responder(a, av, a_mem, qpn, qp_type),
            Resp::Rnr(micros) => {
                let Some(qp) = av.qps.get_mut(qpn) else {
                    return StepOutcome::IDLE;
                };
                if !qp.rt.retries.take_rnr(qp.attr.rnr_retry) {
                    fail_wr(
                        av,
                        a,
                        a_mem,
                        qpn,
                        Status::RnrRetryExcErr,
                        VendorErr::RnrExhausted,
                    );
                    return StepOutcome::FAILED;
                }
                let at = Instant::now() + Duration::from_micros(micros.into());
                qp.rt.inflight.wait_until = Some(at);
                StepOutcome::wait_until(at)
            }
            Resp::Nak(status, vendor) => {
                fail_wr(av, a, a_mem, qpn, status, vendor);
                StepOutcome::FAILED
            }
        }
    }
}

/// Nobody answered: UD drops the datagram and completes; RC retries after its ACK timeout
/// and gives up with RETRY_EXC_ERR after `retry_cnt` retries, as an RNIC does.
fn no_responder(
    a: &Vm,
    av: &mut VmObjects,
    a_mem: &GuestMem,
    qpn: u32,
    qp_type: qp::Type,
) -> StepOutcome {
    if qp_type == qp::Type::Ud {
        a.counters.ud_dropped.fetch_add(1, Ordering::Relaxed);
        let Some(qp) = av.qps.get(qpn) else {
            return StepOutcome::IDLE;
        };
        let slot = qp.rt.inflight.slot;
        let Ok(wr) = wqe::decode_send(&slot, qp.send_limits()) else {
            return StepOutcome::IDLE;
        };
        let more = complete_wr(av, a, a_mem, qpn, &wr, Status::Success, VendorErr::None);
        return StepOutcome::progress(WR_COST, more, 0, 1);
    }
    let Some(qp) = av.qps.get_mut(qpn) else {
        return StepOutcome::IDLE;
    };
    if !qp.rt.retries.take_transport() {
        fail_wr(
            av,
            a,
            a_mem,
            qpn,
            Status::RetryExcErr,
            VendorErr::PeerUnreachable,
        );
        return StepOutcome::FAILED;
    }
    let wait = qp::ack_timeout_micros(qp.attr.timeout)
        .unwrap_or(10_000)
        .clamp(100, 1_000_000);
    let at = Instant::now() + Duration::from_micros(wait);
    qp.rt.inflight.wait_until = Some(at);
    debug!(
        "vm {}: QP {qpn:#x} has no responder; retrying in {wait} µs",
        a.name
    );
    StepOutcome::wait_until(at)
}
