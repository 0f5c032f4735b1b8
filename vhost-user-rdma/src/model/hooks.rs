//! What a fabric is told of a VM's objects as its control path changes them.
//!
//! The soft and RoCEv2 fabrics keep nothing outside a VM's own tables, so they ignore these; a
//! NIC fabric mirrors the objects on the NIC (registers the memory, creates and transitions its
//! QPs). The hooks run on the VM's control path under the VM's lock, never on the scheduler's
//! thread, so a slow NIC registration holds back only the VM that asked for it. A hook that
//! fails makes its command fail with the status it returns and nothing changed.

use vrdma_proto::cmd::Status;
use vrdma_proto::qp;

use super::objects::{Mr, Qp};

/// A VM's objects as the fabric sees them change. Every method has a default that accepts.
pub trait ObjectHooks: Send + Sync + std::fmt::Debug {
    /// MR `lkey` of VM `vm` is being registered.
    fn register_mr(&self, vm: u64, lkey: u32, mr: &Mr) -> Result<(), Status> {
        let _ = (vm, lkey, mr);
        Ok(())
    }

    /// MR `lkey` of VM `vm` has been deregistered.
    fn deregister_mr(&self, vm: u64, lkey: u32, mr: &Mr) {
        let _ = (vm, lkey, mr);
    }

    /// QP `qpn` of VM `vm` is being created (in RESET).
    fn create_qp(&self, vm: u64, qpn: u32, qp: &Qp) -> Result<(), Status> {
        let _ = (vm, qpn, qp);
        Ok(())
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

    /// QP `qpn` of VM `vm` has been destroyed.
    fn destroy_qp(&self, vm: u64, qpn: u32, qp: &Qp) {
        let _ = (vm, qpn, qp);
    }
}

/// Hooks that accept everything: the fabrics that keep no state of their own.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl ObjectHooks for NoHooks {}
