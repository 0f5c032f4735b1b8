//! A fabric for the scheduler's unit tests: it records every step it is asked for and answers
//! each QP by a plan the test sets, without touching guest memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::{Fabric, StepOutcome, WR_COST};
use crate::model::hooks::{NoHooks, ObjectHooks};
use crate::model::memory::{CopyCut, GuestMem};
use crate::model::objects::VmObjects;
use crate::model::vm::Vm;

/// How the mock answers one QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Endless messages of this many bytes: each step moves as much of the current one as the
    /// budget allows, and the QP always has more. A step given a cut moves it in pieces and
    /// asks between them, as the soft fabric's copy does (work that "arrives" at a step is on
    /// its VM's ready list before the first piece).
    Bulk {
        /// Bytes per message.
        message: u32,
        /// Bytes of the current message moved so far.
        done: u32,
    },
    /// `left` more messages of `size` bytes, each moved whole in one step; then idle.
    Messages {
        /// Messages still to move.
        left: u32,
        /// Bytes per message.
        size: u32,
    },
    /// The peer is busy.
    Blocked,
    /// Nothing to do before this instant.
    WaitUntil(Instant),
    /// Nothing to do.
    Idle,
}

/// One step the scheduler asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockStep {
    /// The VM.
    pub vm: u64,
    /// The QP.
    pub qpn: u32,
    /// The budget it was given.
    pub budget: u32,
    /// Bytes between the questions of the cut it was given, if any.
    pub cut_every: Option<u32>,
    /// Bytes it moved of a `Plan::Bulk` message (0 for other plans).
    pub moved: u32,
}

/// What the mock has seen and how it answers.
#[derive(Debug, Default)]
pub struct MockState {
    /// Every step, in order.
    pub steps: Vec<MockStep>,
    /// Per (VM, QP), how to answer; a QP with no plan is idle.
    pub plans: HashMap<(u64, u32), Plan>,
    /// Bytes the mock adds to a VM's byte counter behind the scheduler's back at every step,
    /// as the RoCEv2 receive threads count for a VM while its step runs.
    pub concurrent_bytes: u64,
    /// VMs attached, in order.
    pub attached: Vec<u64>,
    /// VMs detached, in order.
    pub detached: Vec<u64>,
    /// VMs paused now.
    pub paused: Vec<u64>,
    /// Work that arrives while the scheduler runs, as a guest's doorbell would: once the mock
    /// has taken this many steps, the QP of the VM gets the plan and goes on its ready list.
    pub arrivals: Vec<(usize, Arc<Vm>, u32, Plan)>,
    /// Steps the fabric can take before it is full (as a NIC's queue), if it can fill up:
    /// each step with a plan takes one, and the test gives them back as a NIC's completions
    /// would.
    pub room: Option<u32>,
    /// Says that no thread of its own gives VMs work (`Fabric::gives_work_from_its_threads`),
    /// as the soft fabric without RoCEv2; by default it says some may, as its arrivals come
    /// during a step.
    pub no_work_from_its_threads: bool,
}

/// The mock fabric; clones share their state, so a test keeps one to inspect and script.
#[derive(Debug, Clone, Default)]
pub struct MockFabric {
    state: Arc<Mutex<MockState>>,
}

impl MockFabric {
    /// The state, to script and inspect.
    pub fn state(&self) -> MutexGuard<'_, MockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Fabric for MockFabric {
    fn attach(&mut self, vm: &Arc<Vm>) {
        self.state().attached.push(vm.id);
    }

    fn detach(&mut self, vm: &Arc<Vm>) {
        self.state().detached.push(vm.id);
    }

    fn pause(&mut self, vm_id: u64) {
        self.state().paused.push(vm_id);
    }

    fn resume(&mut self, vm_id: u64) {
        self.state().paused.retain(|&v| v != vm_id);
    }

    fn step(
        &mut self,
        vm: &Arc<Vm>,
        _objects: &mut VmObjects,
        _mem: &GuestMem,
        qpn: u32,
        budget: u32,
        cut: Option<CopyCut<'_>>,
    ) -> StepOutcome {
        let mut state = self.state();
        state.steps.push(MockStep {
            vm: vm.id,
            qpn,
            budget,
            cut_every: cut.map(|c| c.every),
            moved: 0,
        });
        let taken = state.steps.len();
        while let Some(k) = state.arrivals.iter().position(|a| a.0 == taken) {
            let (_, other, other_qpn, plan) = state.arrivals.swap_remove(k);
            state.plans.insert((other.id, other_qpn), plan);
            other.enqueue(other_qpn);
        }
        let planned = state.plans.contains_key(&(vm.id, qpn));
        if let Some(room) = state.room.as_mut().filter(|_| planned) {
            match room.checked_sub(1) {
                Some(left) => *room = left,
                None => return StepOutcome::FULL,
            }
        }
        let noise = state.concurrent_bytes;
        vm.counters
            .bytes
            .fetch_add(noise, std::sync::atomic::Ordering::Relaxed);
        let state = &mut *state;
        let plan = state.plans.get_mut(&(vm.id, qpn));
        match plan {
            Some(Plan::Bulk { message, done }) => {
                let mut n = (*message - *done).min(budget);
                if let Some(c) = cut {
                    let every = c.every.max(1);
                    let mut moved = every.min(n);
                    while moved < n && !(c.stop)() {
                        moved = moved.saturating_add(every).min(n);
                    }
                    n = moved;
                }
                *done += n;
                if let Some(step) = state.steps.last_mut() {
                    step.moved = n;
                }
                if *done == *message {
                    *done = 0;
                    StepOutcome::progress(n + WR_COST, true, n, 1)
                } else {
                    StepOutcome::progress(n, true, n, 0)
                }
            }
            Some(Plan::Messages { left, size }) if *left > 0 => {
                *left -= 1;
                StepOutcome::progress(*size + WR_COST, *left > 0, *size, 1)
            }
            Some(Plan::Messages { .. }) => StepOutcome::IDLE,
            Some(Plan::Blocked) => StepOutcome::BLOCKED,
            Some(Plan::WaitUntil(at)) => StepOutcome::wait_until(*at),
            Some(Plan::Idle) | None => StepOutcome::IDLE,
        }
    }

    fn hooks(&self) -> Arc<dyn ObjectHooks> {
        Arc::new(NoHooks)
    }

    fn gives_work_from_its_threads(&self) -> bool {
        !self.state().no_work_from_its_threads
    }
}
