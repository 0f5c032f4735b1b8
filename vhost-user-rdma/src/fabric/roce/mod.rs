//! The RoCEv2 fabric: RoCEv2 over UDP between hosts, as Linux Soft-RoCE (rxe) and RoCE NICs
//! speak it.
//!
//! Each VM's GID is an address of this host; with `--roce` the daemon binds UDP port 4791 on
//! it, so a GID resolves to a host the way RoCEv2 resolves it: by IP. A QP whose peer GID
//! belongs to no VM of this daemon sends its work as RoCEv2 packets to that address (the soft
//! fabric hands such QPs to [`RoceFabric`]); packets arriving on a VM's address are answered
//! by its QPs.
//!
//! Division of labour: the scheduler thread is the requester's transmitter (work requests into
//! packets, go-back-N retransmission, timers; [`requester`]); one receive thread per VM
//! address ([`network`]) parses datagrams and runs the responder ([`responder`]: requests into
//! guest memory, ACKs, READ responses) and the requester's completer (ACKs, NAKs, READ and
//! atomic responses into completions). Both work on a QP only under its VM's lock, so a QP's
//! transport state has one writer at a time.
//!
//! Packets from the network are as untrusted as guests: [`vrdma_roce::packet::parse`] checks
//! form and ICRC, and every field that names guest memory goes through the same checks as a
//! local request (the responder is [`crate::rnic::responder::respond`]).
//!
//! Files import one way: `psn` and `endpoint` are leaves, `batch` sends from an endpoint, the
//! `requester` and the `responder` build on those, `network` dispatches received packets to
//! both, and this file ties the scheduler's side together.

use std::sync::Arc;

use vrdma_proto::cqe::{Status, VendorErr};
use vrdma_proto::wqe::SendWr;
use vrdma_proto::{Gid, qp};

use crate::fabric::{StepOutcome, WR_COST};
use crate::model::memory::{CopyCut, GuestMem};
use crate::model::objects::VmObjects;
use crate::model::vm::Vm;
use crate::rnic::requester::{complete_wr, fail_wr};

mod batch;
pub mod endpoint;
pub mod network;
mod psn;
pub mod requester;
pub mod responder;

pub use endpoint::{Counters, Endpoint};
pub use network::{Error, Network};
use requester::{TxBuffers, UdDest};

/// The scheduler's side of the RoCEv2 fabric: the network, and the buffers packets are built
/// in (so sending allocates nothing).
#[derive(Debug)]
pub struct RoceFabric {
    net: Arc<Network>,
    tx: TxBuffers,
}

impl RoceFabric {
    /// The scheduler's side of `net`.
    pub fn new(net: Arc<Network>) -> Self {
        RoceFabric {
            net,
            tx: TxBuffers::default(),
        }
    }

    /// VM `vm` answers on its address from now on.
    pub fn attach(&mut self, vm: &Arc<Vm>) {
        self.net.attach(&vm.gid, Some(vm.clone()));
    }

    /// The VM on `gid` runs here now: its address is bound if it is not yet.
    pub fn claim(&mut self, gid: &Gid) {
        self.net.claim(gid);
    }

    /// VM `vm` moved to another daemon: its address is released for that daemon to bind.
    pub fn release(&mut self, gid: &Gid) {
        self.net.release(gid);
    }

    /// VM `vm` no longer answers on its address.
    pub fn detach(&mut self, vm: &Arc<Vm>) {
        let ep_vm = self
            .net
            .endpoint(&vm.gid)
            .and_then(|ep| ep.vm.read().ok().and_then(|v| v.as_ref().map(|v| v.id)));
        if ep_vm == Some(vm.id) {
            self.net.attach(&vm.gid, None);
            self.net.set_paused(&vm.gid, false);
        }
    }

    /// Drops the traffic arriving from the network for the VM on `gid`'s address while
    /// `paused` (its peers resend it, as after a loss), or takes it again.
    pub fn set_paused(&mut self, gid: &Gid, paused: bool) {
        self.net.set_paused(gid, paused);
    }

    /// VM `vm`, whose objects are `objects`, arrived by live migration and runs here now: its
    /// QPs on the wire tell their peers (see [`requester::announce`]). Returns the QPs that
    /// go back to resend.
    pub fn announce(&mut self, vm: &Vm, objects: &mut VmObjects) -> Vec<u32> {
        let Some(ep) = self.net.endpoint(&vm.gid) else {
            return Vec::new();
        };
        requester::announce(ep, &mut self.tx, vm, objects)
    }

    /// The scheduler's step for RC QP `qpn` of `vm`, whose peer is on another host.
    pub fn step_rc(
        &mut self,
        vm: &Vm,
        objects: &mut VmObjects,
        mem: &GuestMem,
        qpn: u32,
        budget: u32,
        cut: Option<CopyCut<'_>>,
    ) -> StepOutcome {
        let Some(ep) = self.net.endpoint(&vm.gid) else {
            return StepOutcome::IDLE;
        };
        let outcome = requester::step_rc(ep, &mut self.tx, vm, objects, mem, qpn, budget, cut);
        self.tx.batch.flush();
        outcome
    }

    /// Sends UD work request `wr` of QP `qpn` (in progress) as one datagram to `dgid`'s host;
    /// it completes as soon as it is sent, as on an RNIC.
    #[allow(clippy::too_many_arguments)]
    pub fn send_ud(
        &mut self,
        vm: &Vm,
        objects: &mut VmObjects,
        mem: &GuestMem,
        qpn: u32,
        wr: &SendWr<'_>,
        dgid: Gid,
        dest_qpn: u32,
        qkey: u32,
    ) -> StepOutcome {
        let Some(ep) = self.net.endpoint(&vm.gid) else {
            return StepOutcome::IDLE;
        };
        // UD packets carry PSNs too, one per datagram (receivers ignore them).
        let psn = objects.qps.get_mut(qpn).map_or(0, |q| {
            let psn = q.rt.psns.next;
            q.rt.psns.next = (psn + 1) & qp::MAX_PSN;
            psn
        });
        let traffic_class = objects
            .ahs
            .get(wr.header.ah.get())
            .map_or(0, |ah| ah.attr.traffic_class);
        let dest = UdDest {
            dgid,
            qpn: dest_qpn,
            qkey,
            tos: ep.datagram_tos(vm, traffic_class),
        };
        let sent = requester::send_ud(ep, &mut self.tx, objects, mem, wr, dest, qpn, psn);
        self.tx.batch.flush();
        if let Err(v) = sent {
            fail_wr(objects, vm, mem, qpn, Status::LocProtErr, v);
            return StepOutcome::FAILED;
        }
        let len = wr.byte_len;
        let more = complete_wr(objects, vm, mem, qpn, wr, Status::Success, VendorErr::None);
        StepOutcome::progress(len + WR_COST, more, len, 1)
    }
}
