//! The verbs fabric (`--fabric verbs:DEV`, cargo feature `verbs`): VMs' work carried by the
//! host's RDMA NIC through libibverbs.
//!
//! * [`nic`]: the NIC behind safe types, the one module that calls libibverbs;
//! * [`mirror`]: each VM's PDs, MRs, CQs, QPs and AHs mirrored on the NIC as its control path
//!   makes them (the guest sees the NIC's QP numbers and rkeys, so peers' packets name what
//!   the NIC knows; docs/architecture.md);
//! * [`post`]: the scheduler's step, which checks a QP's work requests with the rules every
//!   fabric shares and posts them to the NIC, and the receives the driver posts;
//! * [`completions`]: one thread per VM turning the NIC's completions into guest CQEs;
//! * [`check`]: the loopback self-test of `--check-fabric`.
//!
//! The NIC runs the transport (RC and UD, every opcode, retries and RNR); the daemon still
//! checks every guest request, keeps the per-VM quotas, and decides through its scheduler
//! what each VM posts, with at most [`post::MAX_VM_IN_FLIGHT`] work requests of a VM on the
//! NIC at once.

pub mod check;
pub mod completions;
pub mod mirror;
pub mod nic;
pub mod objects;
pub mod post;
pub mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use self::mirror::NicHooks;
use self::objects::{VmNic, error_chain};

use super::{Fabric, StepOutcome};
use crate::model::hooks::ObjectHooks;
use crate::model::memory::{CopyCut, GuestMem};
use crate::model::objects::VmObjects;
use crate::model::vm::Vm;
use crate::wake::Bell;

/// A VM carried by the NIC: its objects there and its completion thread.
#[derive(Debug)]
struct Attached {
    nic_vm: Arc<VmNic>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

/// The verbs fabric.
#[derive(Debug)]
pub struct VerbsFabric {
    hooks: Arc<NicHooks>,
    attached: HashMap<u64, Attached>,
    /// Rung by the completion threads when QPs can post again.
    bell: Option<Arc<Bell>>,
}

impl VerbsFabric {
    /// A fabric on `nic`.
    pub fn new(nic: nic::Nic) -> Self {
        VerbsFabric {
            hooks: Arc::new(NicHooks::new(nic)),
            attached: HashMap::new(),
            bell: None,
        }
    }
}

impl Fabric for VerbsFabric {
    fn set_bell(&mut self, bell: Arc<Bell>) {
        self.bell = Some(bell);
    }

    fn attach(&mut self, vm: &Arc<Vm>) {
        let nic_vm = match self.hooks.vm_or_new(vm.id) {
            Ok(v) => v,
            Err(e) => {
                warn!(
                    "vm {}: the NIC gave no completion channel, so its work cannot be carried: {}",
                    vm.name,
                    error_chain(&e)
                );
                return;
            }
        };
        let stop = match EventFd::new(libc::EFD_NONBLOCK) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                warn!("vm {}: no eventfd for its NIC thread: {e}", vm.name);
                return;
            }
        };
        let Some(scheduler) = self.bell.clone() else {
            warn!("vm {}: the NIC fabric has no scheduler to wake", vm.name);
            return;
        };
        let (v, n, s, r) = (
            vm.clone(),
            nic_vm.clone(),
            stop.clone(),
            self.hooks.room.clone(),
        );
        let thread = std::thread::Builder::new()
            .name(format!("vrdma-nic-{}", vm.name))
            .spawn(move || completions::run(v, n, r, s, scheduler));
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(
                    "vm {}: cannot start its NIC completion thread: {e}",
                    vm.name
                );
                None
            }
        };
        info!("vm {}: carried by NIC {}", vm.name, self.hooks.nic.name());
        self.attached.insert(
            vm.id,
            Attached {
                nic_vm,
                stop,
                thread,
            },
        );
    }

    fn detach(&mut self, vm: &Arc<Vm>) {
        let Some(mut a) = self.attached.remove(&vm.id) else {
            return;
        };
        let _ = a.stop.write(1);
        if let Some(t) = a.thread.take() {
            let _ = t.join();
        }
        // The VM's NIC objects go with the last reference (the hooks' copy, dropped here),
        // and its sends on the NIC with them: their room is everyone's again.
        if let Some(gone) = self.hooks.remove(vm.id) {
            let held: u32 = gone.state().qps.values().map(|q| q.send.in_flight).sum();
            self.hooks.room.give(held);
        }
    }

    fn pause(&mut self, _vm_id: u64) {}

    fn resume(&mut self, _vm_id: u64) {}

    fn step(
        &mut self,
        vm: &Arc<Vm>,
        objects: &mut VmObjects,
        mem: &GuestMem,
        qpn: u32,
        budget: u32,
        // A NIC posts a whole work request at once: there is no copy of the daemon's to end.
        _cut: Option<CopyCut<'_>>,
    ) -> StepOutcome {
        let Some(a) = self.attached.get(&vm.id) else {
            return StepOutcome::IDLE;
        };
        let mut st = a.nic_vm.state();
        post::step(vm, objects, &mut st, &self.hooks.room, mem, qpn, budget)
    }

    fn hooks(&self) -> Arc<dyn ObjectHooks> {
        self.hooks.clone()
    }
}
