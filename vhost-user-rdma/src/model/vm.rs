//! One connected VM as every thread of the daemon shares it: its identity, its memory, its
//! objects behind its own lock, the QPs with work for the scheduler, its backlog of
//! asynchronous events, and its counters.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use crate::config::{PriorityClass, SERVICE_LEVELS, SlClasses};
use std::sync::{Arc, Mutex, MutexGuard};

use vrdma_proto::{Gid, event, qp};

use vrdma_proto::cmd::Request;

use super::control::ControlEnv;
use super::memory::GuestMemAtomic;
use super::objects::{Failure, VmObjects};

/// Most asynchronous events kept while the driver has no event buffers posted.
pub const MAX_PENDING_EVENTS: usize = 4096;

/// Priority classes: one ready list each.
const CLASSES: usize = PriorityClass::ALL.len();

/// In `ReadyLists::class_of_slot`: not known yet, the QP goes on its VM's class's list.
const CLASS_UNKNOWN: u8 = u8::MAX;

/// A VM's QPs with work for the scheduler, each at most once, on the ready list of a priority
/// class (a QP's class is its VM's, or lower by the service level of its path: see
/// [`SlClasses`]). Sized for every QP the VM may have when it is made, so queueing never
/// allocates.
struct ReadyLists {
    /// Per class, slot indices (the low bits of QPNs; at most `limits::MAX_QP`, so they fit
    /// 16 bits) in the order they became ready. A slot is on one list at most.
    queues: [VecDeque<u16>; CLASSES],
    /// Per slot, the QPN last queued for it, or 0 if it is on no list. Whatever its
    /// generation, it stands for the slot: the scheduler steps the QP that lives there when it
    /// gets to it, so a stale doorbell or timer (of a QP destroyed since) can never hide a live
    /// QP's.
    current: Vec<u32>,
    /// Per slot, the class the scheduler found the slot's QP in at its last step, as
    /// `PriorityClass::index`, or [`CLASS_UNKNOWN`]: the list its doorbells go on. Only a
    /// guide: a QP whose class changed since (a new QP in the slot, a new path) comes off the
    /// list it went on, and the scheduler moves it instead of stepping it.
    class_of_slot: Vec<u8>,
}

impl ReadyLists {
    fn new(max_qp: u32) -> Self {
        let slots = max_qp.next_power_of_two() as usize;
        ReadyLists {
            queues: std::array::from_fn(|_| VecDeque::with_capacity(slots)),
            current: vec![0; slots],
            class_of_slot: vec![CLASS_UNKNOWN; slots],
        }
    }

    fn slot(&self, qpn: u32) -> usize {
        (qpn & (self.current.len() as u32 - 1)) as usize
    }

    /// Queues `qpn` on class `class`'s list, unless its slot is on a list already. Returns
    /// whether it was queued now. QPN 0 names no QP (0 in `current` is "on no list"): a
    /// doorbell naming it is ignored, as one naming any QP that does not exist is.
    fn push(&mut self, qpn: u32, class: usize) -> bool {
        if qpn == 0 {
            return false;
        }
        let slot = self.slot(qpn);
        let queued_now = self.current[slot] == 0;
        if queued_now {
            // Slots number at most MAX_QP (1 << 16): the index fits.
            self.queues[class].push_back(slot as u16);
        }
        self.current[slot] = qpn;
        queued_now
    }

    fn pop(&mut self, class: usize) -> Option<u32> {
        let slot = self.queues[class].pop_front()?;
        Some(std::mem::take(&mut self.current[usize::from(slot)]))
    }

    /// Makes room for QPs in slots up to `max_qp` (a raised quota), keeping what is queued
    /// (each QPN in its slot under the wider mask, on the same list). Never shrinks: QPs made
    /// under a higher quota keep their slots. The guides start afresh.
    fn grow(&mut self, max_qp: u32) {
        if max_qp.next_power_of_two() as usize <= self.current.len() {
            return;
        }
        let mut old = std::mem::replace(self, ReadyLists::new(max_qp));
        for class in 0..CLASSES {
            while let Some(qpn) = old.pop(class) {
                self.push(qpn, class);
            }
        }
    }

    /// Moves every queued slot to class `class`'s list and forgets every guide: the classes
    /// changed (an operator's `class=` or `sl.N=`), and each QP goes from its VM's class to its
    /// own at its next step.
    fn regroup(&mut self, class: usize) {
        for k in (0..CLASSES).filter(|&k| k != class) {
            while let Some(slot) = self.queues[k].pop_front() {
                self.queues[class].push_back(slot);
            }
        }
        self.class_of_slot.fill(CLASS_UNKNOWN);
    }
}

/// Per-VM counters, for operators and the benchmarks. The VM's server keeps one set for the
/// configured VM and every guest connection's [`Vm`] shares it, so they run on across
/// reconnections (and a migration's restore sets them) until [`Counters::reset`].
#[derive(Debug)]
pub struct Counters {
    /// Send work requests completed (any status).
    pub wrs: AtomicU64,
    /// Payload bytes the fabric moved on the VM's behalf as requester (counted by the
    /// scheduler from what each step moved; a READ's bytes when it is carried out, RoCEv2
    /// retransmissions included).
    pub bytes: AtomicU64,
    /// Completions written into the VM's CQs.
    pub completions: AtomicU64,
    /// Error completions written into the VM's CQs (flushes excluded).
    pub errors: AtomicU64,
    /// Nanoseconds the VM had work waiting while the scheduler served other VMs.
    pub wait_ns: AtomicU64,
    /// Control commands executed successfully.
    pub commands_ok: AtomicU64,
    /// Control commands that failed.
    pub commands_failed: AtomicU64,
    /// Doorbells received.
    pub doorbells: AtomicU64,
    /// Of `doorbells`, those the scheduler took by polling, with no kick (the rest came with
    /// a kick, through the vring worker): shows whether adaptive polling is at work.
    pub doorbells_polled: AtomicU64,
    /// Doorbell descriptors ignored as malformed.
    pub doorbells_malformed: AtomicU64,
    /// Datagrams dropped (no receive posted, Q_Key mismatch, no such QP).
    pub ud_dropped: AtomicU64,
    /// Events lost because the driver kept no event buffers and the backlog was full.
    pub events_lost: AtomicU64,
    /// `errors` by completion status, indexed by the status byte. Not part of a saved state
    /// (whose format predates it): after a migration it counts from zero while `errors` goes
    /// on from its restored value.
    pub errors_by_status: [AtomicU64; 256],
    /// `bytes` by the priority class of the QPs that moved them (`PriorityClass::index`): a
    /// VM's QPs may be in its class or below (`sl.N=`). Not part of a saved state, as
    /// `errors_by_status`.
    pub bytes_by_class: [AtomicU64; CLASSES],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            wrs: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            wait_ns: AtomicU64::new(0),
            commands_ok: AtomicU64::new(0),
            commands_failed: AtomicU64::new(0),
            doorbells: AtomicU64::new(0),
            doorbells_polled: AtomicU64::new(0),
            doorbells_malformed: AtomicU64::new(0),
            ud_dropped: AtomicU64::new(0),
            events_lost: AtomicU64::new(0),
            errors_by_status: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes_by_class: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Counters {
    /// The counters' names, in the order of [`Counters::values`].
    pub const NAMES: [&'static str; 12] = [
        "wrs",
        "bytes",
        "completions",
        "errors",
        "wait_ns",
        "commands_ok",
        "commands_failed",
        "doorbells",
        "doorbells_polled",
        "doorbells_malformed",
        "ud_dropped",
        "events_lost",
    ];

    /// Every counter, in declaration order (the order a saved state keeps them in).
    pub fn values(&self) -> [u64; 12] {
        self.all().map(|c| c.load(Ordering::Relaxed))
    }

    /// `bytes_by_class` as it stands, by `PriorityClass::index`.
    pub fn class_bytes(&self) -> [u64; CLASSES] {
        self.bytes_by_class
            .each_ref()
            .map(|b| b.load(Ordering::Relaxed))
    }

    /// Sets every counter, in the order of [`Counters::values`] (a restored VM's).
    pub fn set_values(&self, values: &[u64; 12]) {
        for (c, v) in self.all().iter().zip(values) {
            c.store(*v, Ordering::Relaxed);
        }
    }

    /// Counts an error completion of status `status` (the raw status byte), in total and by
    /// status: two relaxed adds, as cheap as the completion path needs.
    pub fn count_error(&self, status: u8) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.errors_by_status[usize::from(status)].fetch_add(1, Ordering::Relaxed);
    }

    /// Sets every counter to zero, for an operator who asks (`vrdmactl reset`). Counters of work under way may be counted on either side of the reset.
    pub fn reset(&self) {
        self.set_values(&[0; 12]);
        for c in self.errors_by_status.iter().chain(&self.bytes_by_class) {
            c.store(0, Ordering::Relaxed);
        }
    }

    fn all(&self) -> [&AtomicU64; 12] {
        [
            &self.wrs,
            &self.bytes,
            &self.completions,
            &self.errors,
            &self.wait_ns,
            &self.commands_ok,
            &self.commands_failed,
            &self.doorbells,
            &self.doorbells_polled,
            &self.doorbells_malformed,
            &self.ud_dropped,
            &self.events_lost,
        ]
    }
}

/// What a VM may take of the fabric, which an operator may change while it runs (`vrdmactl
/// set`, `vrdmactl drain`): its weight, its bandwidth and message-rate caps, and whether it is
/// draining. The VM's server keeps one for the configured VM and every guest connection's
/// [`Vm`] shares it, so a change reaches the scheduler at once, through atomics it reads
/// without a lock.
#[derive(Debug)]
pub struct Share {
    weight: AtomicU32,
    /// Payload bytes per second, 0 for no cap.
    max_bw: AtomicU64,
    /// Work requests per second, 0 for no cap.
    max_msg_rate: AtomicU64,
    /// Bumped by every change of a cap, so the scheduler rebuilds its token buckets only then.
    caps_generation: AtomicU64,
    draining: AtomicBool,
    /// Its priority class, as `PriorityClass::index`.
    class: AtomicU8,
    /// Per service level, the class its QPs take, as `PriorityClass::index`, or
    /// [`SL_IN_VM_CLASS`].
    sl_classes: [AtomicU8; SERVICE_LEVELS],
    /// Bumped by every change of the class or the service levels' classes.
    classes_generation: AtomicU64,
}

/// In `Share::sl_classes`: the SL's QPs are in the VM's class.
const SL_IN_VM_CLASS: u8 = u8::MAX;

impl Share {
    /// A share of `weight`, capped at `max_bw` payload bytes and `max_msg_rate` work requests
    /// per second (`None`: no cap).
    pub fn new(weight: u32, max_bw: Option<u64>, max_msg_rate: Option<u64>) -> Self {
        Share {
            weight: AtomicU32::new(weight),
            max_bw: AtomicU64::new(max_bw.unwrap_or(0)),
            max_msg_rate: AtomicU64::new(max_msg_rate.unwrap_or(0)),
            caps_generation: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            class: AtomicU8::new(PriorityClass::Normal as u8),
            sl_classes: std::array::from_fn(|_| AtomicU8::new(SL_IN_VM_CLASS)),
            classes_generation: AtomicU64::new(0),
        }
    }

    /// The same share with `sl_classes`.
    pub fn with_sl_classes(self, sl_classes: &SlClasses) -> Self {
        self.set_sl_classes(sl_classes);
        self
    }

    /// Gives each service level the class its QPs take from now on (`sl.N=`): the scheduler
    /// regroups the VM's queued QPs at its next round, and moves each to its class at its next
    /// step.
    pub fn set_sl_classes(&self, sl_classes: &SlClasses) {
        let mut changed = false;
        for (slot, class) in self.sl_classes.iter().zip(sl_classes.0) {
            let raw = class.map_or(SL_IN_VM_CLASS, |c| c as u8);
            changed |= slot.swap(raw, Ordering::Relaxed) != raw;
        }
        // Only a change regroups the VM's ready lists (an operator's `vrdmactl set` of its
        // weight sets these too).
        if changed {
            self.classes_generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Changes whenever [`Share::set_class`] or [`Share::set_sl_classes`] changes something:
    /// the scheduler regroups the VM's ready lists when it does ([`Vm::regroup`]).
    pub fn classes_generation(&self) -> u64 {
        self.classes_generation.load(Ordering::Acquire)
    }

    /// The classes the service levels give, as set.
    pub fn sl_classes(&self) -> SlClasses {
        SlClasses(std::array::from_fn(|sl| self.sl_class(sl as u8)))
    }

    /// The class SL `sl` (its low 4 bits) gives its QPs, if any.
    fn sl_class(&self, sl: u8) -> Option<PriorityClass> {
        match self.sl_classes[usize::from(sl) % SERVICE_LEVELS].load(Ordering::Relaxed) {
            SL_IN_VM_CLASS => None,
            raw => Some(PriorityClass::from_index(raw)),
        }
    }

    /// The class of a QP of this VM of type `qp_type` whose path has service level `sl`: the
    /// lower of the VM's class and the SL's (see [`SlClasses`]). UD QPs are in the VM's class.
    pub fn qp_class(&self, qp_type: qp::Type, sl: u8) -> PriorityClass {
        let own = match qp_type {
            qp::Type::Ud => None,
            _ => self.sl_class(sl),
        };
        own.map_or(self.class(), |c| c.max(self.class()))
    }

    /// The same share in priority class `class`.
    pub fn with_class(self, class: PriorityClass) -> Self {
        self.set_class(class);
        self
    }

    /// The VM's priority class.
    pub fn class(&self) -> PriorityClass {
        PriorityClass::from_index(self.class.load(Ordering::Relaxed))
    }

    /// Moves the VM to class `class`; the scheduler uses it from its next round.
    pub fn set_class(&self, class: PriorityClass) {
        if self.class.swap(class as u8, Ordering::Relaxed) != class as u8 {
            self.classes_generation.fetch_add(1, Ordering::Release);
        }
    }

    /// The VM's weight: the deficit it earns per round, in quanta.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Sets the weight; the scheduler uses it from its next round.
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
    }

    /// The caps: payload bytes and work requests per second, `None` where there is none.
    pub fn caps(&self) -> (Option<u64>, Option<u64>) {
        let some = |v: u64| (v != 0).then_some(v);
        (
            some(self.max_bw.load(Ordering::Relaxed)),
            some(self.max_msg_rate.load(Ordering::Relaxed)),
        )
    }

    /// Sets the caps (`None`: none); the scheduler applies them at its next look at the VM.
    pub fn set_caps(&self, max_bw: Option<u64>, max_msg_rate: Option<u64>) {
        self.max_bw.store(max_bw.unwrap_or(0), Ordering::Relaxed);
        self.max_msg_rate
            .store(max_msg_rate.unwrap_or(0), Ordering::Relaxed);
        self.caps_generation.fetch_add(1, Ordering::Release);
    }

    /// Changes with every [`Share::set_caps`]: the scheduler compares it with the one its
    /// buckets were made for.
    pub fn caps_generation(&self) -> u64 {
        self.caps_generation.load(Ordering::Acquire)
    }

    /// Whether the VM is draining: the fabric starts none of its send work requests, and
    /// those under way finish (as if every QP were in SQD, without the guest seeing a change
    /// of state). Posted requests wait in their rings, not lost, until [`Share::set_draining`]
    /// turns it off or the VM goes.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts (`true`) or ends a drain.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }
}

impl Default for Share {
    fn default() -> Self {
        Share::new(1, None, None)
    }
}

/// Where a VM's asynchronous events go: its event virtqueue, which the vhost layer owns.
pub trait EventSink: Send + Sync {
    /// Moves events from the front of `backlog` into the buffers the driver has posted and
    /// interrupts the driver if any were delivered; what finds no buffer stays in `backlog`.
    fn deliver(&self, vm: &Vm, backlog: &mut VecDeque<event::Event>);
}

/// Events that go nowhere: a VM whose driver has no event queue yet keeps them in its backlog.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEventQueue;

impl EventSink for NoEventQueue {
    fn deliver(&self, _vm: &Vm, _backlog: &mut VecDeque<event::Event>) {}
}

/// One connected VM.
pub struct Vm {
    /// Unique for the daemon's lifetime (not reused across reconnections).
    pub id: u64,
    /// Name, for logs.
    pub name: String,
    /// Its port's GID.
    pub gid: Gid,
    /// What it may take of the fabric: its weight, caps and drain, shared with its server,
    /// which keeps them across connections and changes them at an operator's request.
    pub share: Arc<Share>,
    /// Its memory.
    pub mem: GuestMemAtomic,
    objects: Mutex<VmObjects>,
    /// Set when QPs are on a ready list; cleared by the scheduler when it empties the last.
    pub has_work: AtomicBool,
    /// Per priority class, set when QPs are on its ready list: what the scheduler reads, with
    /// no lock, to see which class has work.
    class_work: [AtomicBool; CLASSES],
    ready: Mutex<ReadyLists>,
    events: Mutex<VecDeque<event::Event>>,
    /// Whether `events` may be non-empty, so the scheduler need not lock it after every step.
    events_pending: AtomicBool,
    event_sink: Arc<dyn EventSink>,
    /// What this VM has done: shared with its server, which keeps them across connections.
    pub counters: Arc<Counters>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("gid", &self.gid)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// The VM whose objects are `objects` and memory `mem`, sharing the fabric by `weight`,
    /// with its events going to `event_sink`.
    pub fn new(
        id: u64,
        objects: VmObjects,
        weight: u32,
        mem: GuestMemAtomic,
        event_sink: Arc<dyn EventSink>,
    ) -> Self {
        // QP numbers the NIC chose may use any slot a QPN can name, not only the first
        // max_qp: the ready list must tell every such slot apart.
        let max_qp = if objects.nic_qpns {
            1 << crate::limits::QPN_INDEX_BITS
        } else {
            objects.caps.max_qp.get()
        };
        Vm {
            id,
            name: objects.name.clone(),
            gid: objects.gid,
            share: Arc::new(Share::new(weight, None, None)),
            mem,
            objects: Mutex::new(objects),
            has_work: AtomicBool::new(false),
            class_work: std::array::from_fn(|_| AtomicBool::new(false)),
            ready: Mutex::new(ReadyLists::new(max_qp)),
            events: Mutex::new(VecDeque::with_capacity(MAX_PENDING_EVENTS)),
            events_pending: AtomicBool::new(false),
            event_sink,
            counters: Arc::default(),
        }
    }

    /// Counts into `counters` (the configured VM's, kept across its guest connections)
    /// rather than a fresh set of the connection's own.
    pub fn with_counters(mut self, counters: Arc<Counters>) -> Self {
        self.counters = counters;
        self
    }

    /// Limits what the VM may move per second (see `config::Quotas`).
    pub fn with_limits(self, max_bw: Option<u64>, max_msg_rate: Option<u64>) -> Self {
        self.share.set_caps(max_bw, max_msg_rate);
        self
    }

    /// Takes its weight, caps and drain from `share` (the configured VM's, which an operator
    /// changes at run time) rather than a share of the connection's own.
    pub fn with_share(mut self, share: Arc<Share>) -> Self {
        self.share = share;
        self
    }

    /// Applies new object quotas while the VM runs (see `VmObjects::set_quotas`), making
    /// room on the ready list for the QPs a raised quota allows.
    pub fn set_quotas(&self, quotas: &crate::config::Quotas) {
        let mut objects = self.lock();
        objects.set_quotas(quotas);
        if !objects.nic_qpns {
            self.ready
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .grow(quotas.max_qp);
        }
    }

    /// Puts every QP back on the ready list, for the scheduler to look at their rings again
    /// (a drain ended: the requests posted meanwhile wait there).
    pub fn wake_all(&self) {
        let qpns: Vec<u32> = self.lock().qps.iter().map(|(qpn, _)| qpn).collect();
        for qpn in qpns {
            self.enqueue(qpn);
        }
    }

    /// Locks the VM's objects, waiting if the scheduler or the control path holds them. Only
    /// the VM's own control path and threads that serve nobody else may wait here.
    pub fn lock(&self) -> MutexGuard<'_, VmObjects> {
        // Every mutation of the objects is complete before the lock is released, so a panic
        // elsewhere cannot leave them half-changed; keep serving rather than poison every
        // later request.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the VM's objects if nobody else holds them: the scheduler never waits for one
    /// VM's control path, so a VM busy registering memory cannot stall the others.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, VmObjects>> {
        match self.objects.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Executes one control command against the VM's objects (waiting for their lock: only
    /// the VM's own control path calls this), then hands the scheduler the QPs the command
    /// gave work to.
    pub fn execute(&self, request: Request<'_>, env: &ControlEnv<'_>) -> Result<Vec<u8>, Failure> {
        let mut objects = self.lock();
        let result = objects.execute(request, env);
        let wake = std::mem::take(&mut objects.wake);
        let raised = std::mem::take(&mut objects.raised);
        drop(objects);
        for qpn in wake {
            self.enqueue(qpn);
        }
        for (kind, handle) in raised {
            self.push_event(kind, handle);
        }
        result
    }

    /// Puts QP `qpn` on the ready list of its class unless it is there already (the class
    /// the scheduler last found it in, else the VM's). Takes only the ready lists' own lock,
    /// never the VM's: doorbells must not contend with the scheduler, or the VM that rings
    /// most would lose the most turns.
    pub fn enqueue(&self, qpn: u32) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let class = match ready.class_of_slot[ready.slot(qpn)] {
            CLASS_UNKNOWN => self.class().index(),
            known => usize::from(known),
        };
        if ready.push(qpn, class) {
            self.class_work[class].store(true, Ordering::Release);
        }
        self.has_work.store(true, Ordering::Release);
    }

    /// Puts QP `qpn` on the ready list of class `class` (unless it is on a list already),
    /// where its doorbells go from now on: the scheduler found it in that class.
    pub fn enqueue_in(&self, qpn: u32, class: PriorityClass) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let slot = ready.slot(qpn);
        ready.class_of_slot[slot] = class as u8;
        if ready.push(qpn, class.index()) {
            self.class_work[class.index()].store(true, Ordering::Release);
        }
        self.has_work.store(true, Ordering::Release);
    }

    /// Takes the next QP off class `class`'s ready list; when it is empty, clears that
    /// class's flag (and `has_work`, if no list has work) under the same lock, so a
    /// concurrent enqueue cannot be missed.
    pub fn pop_ready_in(&self, class: PriorityClass) -> Option<u32> {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let qpn = ready.pop(class.index());
        if qpn.is_none() {
            self.class_work[class.index()].store(false, Ordering::Release);
            if !self.class_work.iter().any(|w| w.load(Ordering::Relaxed)) {
                self.has_work.store(false, Ordering::Release);
            }
        }
        qpn
    }

    /// Takes the next QP off the ready lists, the highest class's first.
    #[cfg(test)]
    pub(crate) fn pop_ready(&self) -> Option<u32> {
        PriorityClass::ALL
            .into_iter()
            .find_map(|class| self.pop_ready_in(class))
    }

    /// Whether QPs of class `class` are on its ready list.
    pub fn has_work_in(&self, class: PriorityClass) -> bool {
        self.class_work[class.index()].load(Ordering::Acquire)
    }

    /// The VM's priority class.
    pub fn class(&self) -> PriorityClass {
        self.share.class()
    }

    /// Puts every queued QP on the ready list of the VM's class and forgets where each QP's
    /// doorbells went: an operator changed the VM's class or its service levels' (the
    /// scheduler sees `Share::classes_generation` change), so the QPs queued on the old lists
    /// do not wait for a pass that no longer suits them; each moves on to its own class at its
    /// next step.
    pub fn regroup(&self) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let class = self.class().index();
        ready.regroup(class);
        let queued = !ready.queues[class].is_empty();
        for (k, flag) in self.class_work.iter().enumerate() {
            flag.store(k == class && queued, Ordering::Release);
        }
        self.has_work.store(queued, Ordering::Release);
    }

    /// Empties the ready lists (the VM's objects are being released).
    pub fn clear_ready(&self) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        for class in 0..CLASSES {
            while ready.pop(class).is_some() {}
        }
        for flag in &self.class_work {
            flag.store(false, Ordering::Release);
        }
        self.has_work.store(false, Ordering::Release);
    }

    /// Drops every queued event (the VM's objects are being released, so none names anything).
    pub fn clear_events(&self) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Queues an event for the driver; [`Vm::deliver_events`] hands it over.
    pub fn push_event(&self, kind: event::Kind, handle: u32) {
        let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_PENDING_EVENTS {
            self.counters.events_lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(event::Event::new(kind, handle));
        self.events_pending.store(true, Ordering::Release);
    }

    /// The events queued and not yet delivered, oldest first (saving the VM).
    pub fn pending_events(&self) -> Vec<event::Event> {
        let q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().copied().collect()
    }

    /// Hands queued events to the event queue, if any wait.
    pub fn deliver_events(&self) {
        if !self.events_pending.load(Ordering::Acquire) {
            return;
        }
        let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if q.is_empty() {
            self.events_pending.store(false, Ordering::Release);
            return;
        }
        self.event_sink.deliver(self, &mut q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestVm;

    /// The ready lists' flags say what is queued, whatever moves it: a QP queued on one list
    /// stays there when a doorbell's guide names another, a regroup puts everything on the
    /// VM's class's list (and clears `has_work` if nothing is queued), a grown table keeps
    /// each list's QPs, and QPN 0 (no QP) is never queued.
    #[test]
    fn ready_lists_flags_follow_what_is_queued() {
        use PriorityClass::{Bulk, Latency, Normal};
        let a = TestVm::new(1, 1);
        let vm = &a.vm;
        let flags = || PriorityClass::ALL.map(|c| vm.has_work_in(c));
        vm.enqueue_in(5, Bulk);
        vm.enqueue_in(6, Latency);
        // A doorbell for 5 whose guide says latency: 5 is on the bulk list already.
        vm.enqueue_in(5, Latency);
        assert_eq!(flags(), [true, false, true]);
        assert_eq!(vm.pop_ready_in(Latency), Some(6));
        assert_eq!(vm.pop_ready_in(Latency), None, "5 is on one list only");
        assert_eq!(flags(), [false, false, true]);
        vm.enqueue(0);
        assert_eq!(vm.pop_ready_in(Normal), None, "QPN 0 is not queued");
        // The VM is normal: a regroup moves 5 to normal, and its doorbells go there.
        vm.regroup();
        assert_eq!(flags(), [false, true, false]);
        vm.enqueue(7);
        assert_eq!(vm.pop_ready_in(Normal), Some(5));
        assert_eq!(vm.pop_ready_in(Normal), Some(7));
        assert!(vm.has_work.load(Ordering::Acquire), "not yet seen empty");
        vm.regroup();
        assert!(
            !vm.has_work.load(Ordering::Acquire),
            "nothing queued after a regroup"
        );
        // Grown, each list keeps its QPs, each QPN in its slot under the wider mask.
        let narrow = 16;
        let mut lists = ReadyLists::new(narrow);
        assert!(lists.push(3, Latency.index()));
        assert!(lists.push(narrow + 4, Bulk.index()));
        lists.grow(4 * narrow);
        assert_eq!(lists.pop(Latency.index()), Some(3));
        assert_eq!(lists.pop(Bulk.index()), Some(narrow + 4));
        assert!(lists.push(4, Bulk.index()), "4 and 20 are two slots now");
    }

    #[test]
    fn counters_count_errors_by_status_and_reset_on_request() {
        let c = Counters::default();
        c.wrs.fetch_add(5, Ordering::Relaxed);
        c.count_error(12);
        c.count_error(12);
        c.count_error(4);
        assert_eq!(c.errors.load(Ordering::Relaxed), 3);
        assert_eq!(c.errors_by_status[12].load(Ordering::Relaxed), 2);
        assert_eq!(c.errors_by_status[4].load(Ordering::Relaxed), 1);
        c.reset();
        assert_eq!(c.values(), [0; 12]);
        assert!(
            c.errors_by_status
                .iter()
                .all(|s| s.load(Ordering::Relaxed) == 0)
        );
    }
}
