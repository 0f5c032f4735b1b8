//! Fabrics: how a VM's work requests reach their peers.
//!
//! The scheduler decides whose turn it is and how many bytes a turn may move; a [`Fabric`]
//! carries the work of one QP for one turn. The daemon runs one fabric:
//!
//! * [`soft::SoftFabric`], built in: VMs on this daemon copy guest to guest, and with `--roce`
//!   QPs whose peer is on another host go through [`roce::RoceFabric`], RoCEv2 over UDP;
//! * `mock::MockFabric`, for the scheduler's unit tests (built with the tests only);
//! * `verbs`, a NIC fabric through libibverbs (`--fabric verbs:DEV`, cargo feature `verbs`):
//!   so far the NIC's safe wrapper and its self-test; the trait's [`Fabric::hooks`] will tell
//!   it of every object a VM makes, so it can mirror them on the NIC.
//!
//! Every fabric completes work through the shared rules of [`crate::rnic`], so a guest sees
//! the same verbs semantics whichever carries its traffic.

use std::sync::Arc;
use std::time::Instant;

use crate::model::hooks::ObjectHooks;
use crate::model::memory::{CopyCut, GuestMem};
use crate::model::objects::VmObjects;
use crate::model::vm::Vm;
use crate::wake::Bell;

#[cfg(test)]
pub mod mock;
pub mod roce;
pub mod soft;
#[cfg(feature = "verbs")]
pub mod verbs;

/// Bytes charged per work request on top of its payload, so that a VM sending tiny messages
/// pays for the scheduler time each one takes (decoding, checks, a completion), not just for
/// its few payload bytes. 8 KiB is about what one work request's processing costs in memcpy
/// time on a current core; without it, 64-byte messages at equal weight would take most of
/// the scheduler's time from a bulk neighbour.
pub const WR_COST: u32 = 8 * 1024;

/// What one step of one QP achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until the next doorbell (or the outcome's timer).
    Idle,
    /// Moved work forward at `cost` (bytes, plus [`WR_COST`] per work request); `more` if the
    /// QP has more work right now.
    Progress {
        /// What the step costs the VM's deficit.
        cost: u32,
        /// The QP has more work now.
        more: bool,
    },
    /// The peer VM is busy; try again next round.
    Blocked,
    /// The fabric takes no more work from anyone now (a NIC's queue holds all the daemon lets
    /// it): the scheduler ends its pass here and resumes it at this VM, with the deficits as
    /// they stand, when the fabric unparks it. Who posts next is then the scheduler's choice,
    /// so the weights hold on a fabric that is the bottleneck.
    Full,
}

/// What a fabric's step of one QP did, for the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOutcome {
    /// What the step achieved.
    pub step: Step,
    /// Look at the QP again then (an RNR or ACK timer), if not before.
    pub timer: Option<Instant>,
    /// Payload bytes the step moved as requester: what the VM's bandwidth limit is charged
    /// and its byte counter counts. Only the step's own work, never what other threads did
    /// for the VM meanwhile.
    pub bytes: u32,
    /// Work requests the step carried out as requester: what the VM's message-rate limit is
    /// charged.
    pub wrs: u32,
}

impl StepOutcome {
    /// Nothing done.
    pub const IDLE: StepOutcome = StepOutcome {
        step: Step::Idle,
        timer: None,
        bytes: 0,
        wrs: 0,
    };

    /// Nothing done before `at`.
    pub fn wait_until(at: Instant) -> Self {
        StepOutcome {
            timer: Some(at),
            ..StepOutcome::IDLE
        }
    }

    /// Work done at `cost`, with `more` to do now, moving `bytes` and carrying out `wrs`.
    pub fn progress(cost: u32, more: bool, bytes: u32, wrs: u32) -> Self {
        StepOutcome {
            step: Step::Progress { cost, more },
            timer: None,
            bytes,
            wrs,
        }
    }

    /// A work request failed before moving anything: it costs its processing.
    pub const FAILED: StepOutcome = StepOutcome {
        step: Step::Progress {
            cost: WR_COST,
            more: false,
        },
        timer: None,
        bytes: 0,
        wrs: 1,
    };

    /// The fabric is full.
    pub const FULL: StepOutcome = StepOutcome {
        step: Step::Full,
        timer: None,
        bytes: 0,
        wrs: 0,
    };

    /// The peer is busy.
    pub const BLOCKED: StepOutcome = StepOutcome {
        step: Step::Blocked,
        timer: None,
        bytes: 0,
        wrs: 0,
    };
}

/// Carries VMs' work. The scheduler's thread makes it, owns it and is the only caller of
/// these methods; what a fabric shares with other threads (receive threads, the VMs' control
/// paths) it keeps behind its own synchronisation.
pub trait Fabric: std::fmt::Debug {
    /// What the scheduler sleeps on: a fabric whose own threads hand the scheduler work rings
    /// it. Given once, before any VM is attached.
    fn set_bell(&mut self, _bell: Arc<Bell>) {}

    /// VM `vm` connected: the fabric may carry its work and deliver to it.
    fn attach(&mut self, vm: &Arc<Vm>);

    /// VM `vm` is going away: once this returns the fabric holds no reference to it and
    /// delivers nothing more to it.
    fn detach(&mut self, vm: &Arc<Vm>);

    /// VM `vm`, detached, went to another daemon by live migration: give up what it owned
    /// here on the network (its address), so the daemon it went to can take it.
    fn moved_away(&mut self, _vm: &Arc<Vm>) {}

    /// VM `vm`, whose objects are `objects` (locked by the caller), arrived by live
    /// migration and has just resumed here: tell its peers, so neither side waits for a
    /// timeout to resend what the switch-over dropped. Returns the QPs to look at.
    fn announce(&mut self, _vm: &Arc<Vm>, _objects: &mut VmObjects) -> Vec<u32> {
        Vec::new()
    }

    /// Stops carrying VM `vm_id`'s traffic in either direction, as for a live migration:
    /// requests to it wait (peers' QPs retry later, as across a link that paused) until
    /// [`Fabric::resume`]. The scheduler stops stepping its QPs itself.
    fn pause(&mut self, vm_id: u64);

    /// Carries VM `vm_id`'s traffic again.
    fn resume(&mut self, vm_id: u64);

    /// Advances QP `qpn` of `vm`, whose objects are `objects` (locked by the caller) and
    /// memory `mem`, by at most `budget` payload bytes. The QP is in RTS or SQD. With `cut`,
    /// the step asks it between pieces of its work and ends early when it says so (a higher
    /// priority class's work arrived): what it moved so far counts, and the QP has `more`.
    fn step(
        &mut self,
        vm: &Arc<Vm>,
        objects: &mut VmObjects,
        mem: &GuestMem,
        qpn: u32,
        budget: u32,
        cut: Option<CopyCut<'_>>,
    ) -> StepOutcome;

    /// What the VMs' control paths tell the fabric as objects are made, changed and
    /// destroyed; called on those paths, not on the scheduler's thread.
    fn hooks(&self) -> Arc<dyn ObjectHooks>;

    /// Whether threads of the fabric's own (a RoCEv2 receive thread) may give a VM work while
    /// the scheduler steps another. Only then, or with a higher class's VM polled, can a lower
    /// class's step find that class's work between the pieces of its copy; otherwise the
    /// scheduler does not cut it into pieces. Those that cannot tell say yes.
    fn gives_work_from_its_threads(&self) -> bool {
        true
    }
}
