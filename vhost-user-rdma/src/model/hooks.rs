//! What a fabric is told of a VM's objects as its control path changes them.
//!
//! The soft and RoCEv2 fabrics keep nothing outside a VM's own tables, so they ignore these; a
//! NIC fabric mirrors the objects on the NIC (allocates a PD per PD, registers the memory,
//! creates a CQ per CQ, creates and transitions its QPs, makes its address handles). The hooks
//! run on the VM's control path under the VM's lock, never on the scheduler's thread, so a
//! slow NIC registration holds back only the VM that asked for it. A hook that fails makes its
//! command fail with the status it returns and nothing changed.

use vrdma_proto::cmd::Status;
use vrdma_proto::qp;

use super::memory::GuestMem;
use super::objects::{Ah, Cq, Mr, Qp, Srq, VmObjects};

/// A VM's objects as the fabric sees them change. Every method has a default that accepts
/// and keeps the daemon's own handles.
pub trait ObjectHooks: Send + Sync + std::fmt::Debug {
    /// PD `pdn` of VM `vm` is being allocated.
    fn alloc_pd(&self, vm: u64, pdn: u32) -> Result<(), Status> {
        let _ = (vm, pdn);
        Ok(())
    }

    /// PD `pdn` of VM `vm` has been freed.
    fn dealloc_pd(&self, vm: u64, pdn: u32) {
        let _ = (vm, pdn);
    }

    /// MR `lkey` of VM `vm`, whose memory is `mem`, is being registered. Returns the key
    /// peers must name it by, if not the daemon's (a NIC's rkey).
    fn register_mr(
        &self,
        vm: u64,
        lkey: u32,
        mr: &Mr,
        mem: &GuestMem,
    ) -> Result<Option<u32>, Status> {
        let _ = (vm, lkey, mr, mem);
        Ok(None)
    }

    /// MR `lkey` of VM `vm` has been deregistered.
    fn deregister_mr(&self, vm: u64, lkey: u32, mr: &Mr) {
        let _ = (vm, lkey, mr);
    }

    /// CQ `cqn` of VM `vm` is being created.
    fn create_cq(&self, vm: u64, cqn: u32, cq: &Cq) -> Result<(), Status> {
        let _ = (vm, cqn, cq);
        Ok(())
    }

    /// CQ `cqn` of VM `vm` has been destroyed.
    fn destroy_cq(&self, vm: u64, cqn: u32) {
        let _ = (vm, cqn);
    }

    /// A QP of VM `vm`, whose memory is `mem`, is being created (in RESET). Returns the
    /// number it must have, if the fabric chooses it (a NIC's QPN, which peers put in their
    /// packets); `fits` says whether the VM's table can take a number.
    fn create_qp(
        &self,
        vm: u64,
        qp: &Qp,
        mem: &GuestMem,
        fits: &dyn Fn(u32) -> bool,
    ) -> Result<Option<u32>, Status> {
        let _ = (vm, qp, mem, fits);
        Ok(None)
    }

    /// QP `qpn` of VM `vm`, now `before`, is about to take the attributes of `attr` that
    /// `mask` names and move to `next`; the transition has passed every check of the device.
    fn modify_qp(
        &self,
        vm: u64,
        qpn: u32,
        before: &Qp,
        mask: qp::AttrMask,
        attr: &qp::Attr,
        next: qp::State,
    ) -> Result<(), Status> {
        let _ = (vm, qpn, before, mask, attr, next);
        Ok(())
    }

    /// Send work requests of VM `vm` the fabric holds outside the VM's tables (posted to a
    /// NIC and not yet completed): a draining VM is drained only when none are left.
    fn sends_in_flight(&self, vm: u64) -> u32 {
        let _ = vm;
        0
    }

    /// Whether QP `qpn` of VM `vm`, now `qp`, went to the error state in the fabric by
    /// itself (a NIC's QP does, on a responder error): the guest's query must see it.
    fn failed_qp(&self, vm: u64, qpn: u32, qp: &Qp) -> bool {
        let _ = (vm, qpn, qp);
        false
    }

    /// The driver published receives on QP `qpn`'s receive ring (`POST_RECV`). A fabric that
    /// reads receive rings when a message arrives ignores this; a NIC fabric posts them to
    /// the NIC before the command returns, so a message sent after the guest's post finds
    /// them, as on hardware. A receive it cannot post takes the QP to ERR (queued in
    /// `objects.wake` for its flush); the command itself succeeds, as `ibv_post_recv` does.
    fn post_receives(&self, vm: u64, objects: &mut VmObjects, mem: &GuestMem, qpn: u32) {
        let _ = (vm, objects, mem, qpn);
    }

    /// QP `qpn` of VM `vm` has been destroyed.
    fn destroy_qp(&self, vm: u64, qpn: u32, qp: &Qp) {
        let _ = (vm, qpn, qp);
    }

    /// SRQ `srqn` of VM `vm` is being created.
    fn create_srq(&self, vm: u64, srqn: u32, srq: &Srq) -> Result<(), Status> {
        let _ = (vm, srqn, srq);
        Ok(())
    }

    /// SRQ `srqn` of VM `vm` has been destroyed.
    fn destroy_srq(&self, vm: u64, srqn: u32) {
        let _ = (vm, srqn);
    }

    /// The driver published receives on SRQ `srqn`'s ring (`POST_SRQ_RECV`): as
    /// [`ObjectHooks::post_receives`]; one the fabric cannot post puts the SRQ in error.
    fn post_srq_receives(&self, vm: u64, objects: &mut VmObjects, mem: &GuestMem, srqn: u32) {
        let _ = (vm, objects, mem, srqn);
    }

    /// Address handle `handle` of VM `vm` is being created.
    fn create_ah(&self, vm: u64, handle: u32, ah: &Ah) -> Result<(), Status> {
        let _ = (vm, handle, ah);
        Ok(())
    }

    /// Address handle `handle` of VM `vm` has been destroyed.
    fn destroy_ah(&self, vm: u64, handle: u32) {
        let _ = (vm, handle);
    }
}

/// Hooks that accept everything: the fabrics that keep no state of their own.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl ObjectHooks for NoHooks {}
