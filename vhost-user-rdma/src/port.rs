//! What the daemon shares about one connected VM between its vhost-user device, its server
//! thread and the scheduler: its objects (behind the VM's own lock), its memory, its event
//! queue and its counters.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use log::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vrdma_proto::{Gid, doorbell, event, queue};
use zerocopy::IntoBytes;

use crate::vm::{GuestMem, Vm};

/// Guest memory as the vhost-user library keeps it: replaced whole on every memory-table
/// change, so holding a snapshot never outlives the table it came from by more than one chunk.
pub type GuestMemAtomic = vm_memory::GuestMemoryAtomic<GuestMem>;
/// A virtqueue as the vhost-user library keeps it.
pub type Vring = VringRwLock<GuestMemAtomic>;

/// Most asynchronous events kept while the driver has no event buffers posted.
pub const MAX_PENDING_EVENTS: usize = 4096;

/// QPs with work for the scheduler, each at most once. Sized for every QP the VM may have
/// when it is made, so queueing never allocates.
struct ReadyList {
    /// Slot indices (the low bits of QPNs), in the order they became ready.
    queue: VecDeque<u32>,
    /// Per slot, the QPN queued for it, or 0. A doorbell for a newer generation of the same
    /// slot replaces an older one, so a stale doorbell can never hide a live QP's.
    current: Vec<u32>,
}

impl ReadyList {
    fn new(max_qp: u32) -> Self {
        let slots = max_qp.next_power_of_two() as usize;
        ReadyList {
            queue: VecDeque::with_capacity(slots),
            current: vec![0; slots],
        }
    }

    fn push(&mut self, qpn: u32) {
        let slot = qpn & (self.current.len() as u32 - 1);
        let current = &mut self.current[slot as usize];
        if *current == 0 {
            self.queue.push_back(slot);
        }
        *current = qpn;
    }

    fn pop(&mut self) -> Option<u32> {
        let slot = self.queue.pop_front()?;
        Some(std::mem::take(&mut self.current[slot as usize]))
    }
}

/// Per-VM counters, for operators and the benchmarks.
#[derive(Debug, Default)]
pub struct Counters {
    /// Send work requests completed (any status).
    pub wrs: AtomicU64,
    /// Payload bytes moved on the VM's behalf (as requester).
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
    /// Doorbell descriptors ignored as malformed.
    pub doorbells_malformed: AtomicU64,
    /// Datagrams dropped (no receive posted, Q_Key mismatch, no such QP).
    pub ud_dropped: AtomicU64,
    /// Events lost because the driver kept no event buffers and the backlog was full.
    pub events_lost: AtomicU64,
}

/// One connected VM.
pub struct VmPort {
    /// Unique for the daemon's lifetime (not reused across reconnections).
    pub id: u64,
    /// Name, for logs.
    pub name: String,
    /// Its port's GID.
    pub gid: Gid,
    /// Share of the fabric.
    pub weight: u32,
    /// Payload bytes per second it may move as requester, if limited.
    pub max_bw: Option<u64>,
    /// Work requests per second it may complete as requester, if limited.
    pub max_msg_rate: Option<u64>,
    /// Its memory.
    pub mem: GuestMemAtomic,
    state: Mutex<Vm>,
    /// Set when QPs are on the ready list; cleared by the scheduler when it empties it.
    pub has_work: AtomicBool,
    ready: Mutex<ReadyList>,
    events: Mutex<VecDeque<event::Event>>,
    /// Whether `events` may be non-empty, so the scheduler need not lock it after every step.
    events_pending: AtomicBool,
    event_vring: Mutex<Option<Vring>>,
    /// The doorbell virtqueues, each known from its first kick, so the scheduler can poll
    /// them without taking any lock but the vring's own.
    doorbell_vrings: Box<[OnceLock<Vring>]>,
    /// Set when a doorbell vring becomes known, so a scheduler that is already polling turns
    /// its kicks off too.
    pub new_doorbell_vring: AtomicBool,
    /// What this VM has done.
    pub counters: Counters,
}

impl std::fmt::Debug for VmPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmPort")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("gid", &self.gid)
            .finish_non_exhaustive()
    }
}

impl VmPort {
    /// A port for `vm`, whose memory is `mem`.
    pub fn new(id: u64, vm: Vm, weight: u32, mem: GuestMemAtomic) -> Self {
        let max_qp = vm.caps.max_qp.get();
        VmPort {
            id,
            name: vm.name.clone(),
            gid: vm.gid,
            weight,
            max_bw: None,
            max_msg_rate: None,
            mem,
            state: Mutex::new(vm),
            has_work: AtomicBool::new(false),
            ready: Mutex::new(ReadyList::new(max_qp)),
            events: Mutex::new(VecDeque::with_capacity(MAX_PENDING_EVENTS)),
            events_pending: AtomicBool::new(false),
            event_vring: Mutex::new(None),
            doorbell_vrings: (0..queue::MAX_DOORBELL_QUEUES)
                .map(|_| OnceLock::new())
                .collect(),
            new_doorbell_vring: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    /// Locks the VM's objects, waiting if the scheduler or the control path holds them.
    pub fn lock(&self) -> MutexGuard<'_, Vm> {
        // Every mutation of a Vm is complete before the lock is released, so a panic elsewhere
        // cannot leave it half-changed; keep serving rather than poison every later request.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the VM's objects if nobody else holds them: the scheduler never waits for one
    /// VM's control path, so a VM busy registering memory cannot stall the others.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, Vm>> {
        match self.state.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Limits what the VM may move per second (see `config::Quotas`).
    pub fn with_limits(mut self, max_bw: Option<u64>, max_msg_rate: Option<u64>) -> Self {
        self.max_bw = max_bw;
        self.max_msg_rate = max_msg_rate;
        self
    }

    /// Puts QP `qpn` on the ready list unless it is there already. Takes only the ready
    /// list's own lock, never the VM's: doorbells must not contend with the scheduler, or the
    /// VM that rings most would lose the most turns.
    pub fn enqueue(&self, qpn: u32) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        ready.push(qpn);
        self.has_work.store(true, Ordering::Release);
    }

    /// Takes the next QP off the ready list; when it is empty, clears `has_work` under the
    /// same lock so a concurrent enqueue cannot be missed.
    pub fn pop_ready(&self) -> Option<u32> {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let qpn = ready.pop();
        if qpn.is_none() {
            self.has_work.store(false, Ordering::Release);
        }
        qpn
    }

    /// Empties the ready list (the VM's objects are being released).
    pub fn clear_ready(&self) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        while ready.pop().is_some() {}
        self.has_work.store(false, Ordering::Release);
    }

    /// Drops every queued event (the VM's objects are being released, so none names anything).
    pub fn clear_events(&self) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Remembers the event virtqueue so events can be delivered from any thread.
    pub fn set_event_vring(&self, vring: &Vring) {
        let mut slot = self.event_vring.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(vring.clone());
        }
    }

    /// Remembers doorbell virtqueue `index` (counted from the first doorbell queue) so the
    /// scheduler can poll it.
    pub fn set_doorbell_vring(&self, index: u16, vring: &Vring) {
        if let Some(slot) = self.doorbell_vrings.get(usize::from(index)) {
            if slot.set(vring.clone()).is_ok() {
                self.new_doorbell_vring.store(true, Ordering::Release);
            }
        }
    }

    /// The doorbell virtqueues kicked at least once so far.
    pub fn doorbell_vrings(&self) -> impl Iterator<Item = &Vring> {
        self.doorbell_vrings.iter().filter_map(OnceLock::get)
    }

    /// Hot path: takes the doorbell batches the driver has made available on `vring`, puts
    /// their QPs on the ready list and returns the descriptors. Returns how many batches it
    /// took. One chain at a time (the vring lock is released between them) and nothing is
    /// collected, so it allocates nothing; both the vring's worker (on a kick) and the
    /// scheduler (while it polls) call it.
    pub fn drain_doorbells(&self, vring: &Vring) -> usize {
        let mem = self.mem.memory();
        let mut batch = [0u8; doorbell::SIZE * doorbell::MAX_BATCH];
        let mut taken = 0;
        loop {
            let Some(chain) = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone())
            else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            let mut len = 0usize;
            let mut ok = true;
            for desc in chain {
                let n = desc.len() as usize;
                if desc.is_write_only() || len + n > batch.len() {
                    ok = false;
                    break;
                }
                if mem
                    .read_slice(&mut batch[len..len + n], desc.addr())
                    .is_err()
                {
                    ok = false;
                    break;
                }
                len += n;
            }
            match doorbell::decode_batch(&batch[..len]) {
                Ok(doorbells) if ok => {
                    for (_kind, qpn) in doorbells {
                        self.counters.doorbells.fetch_add(1, Ordering::Relaxed);
                        // Either kind just asks the scheduler to look at the QP: a send doorbell
                        // for new work, a receive doorbell for a QP in ERR whose new receives
                        // must be flushed. A QPN that names nothing is skipped there, as an RNIC
                        // ignores a doorbell for a QP that does not exist.
                        self.enqueue(qpn);
                    }
                }
                _ => {
                    self.counters
                        .doorbells_malformed
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Err(e) = vring.add_used(head, 0) {
                warn!("vm {}: cannot return a doorbell descriptor: {e}", self.name);
            }
        }
        if taken > 0 && wants_interrupt(vring, &mem) {
            vring.signal_used_queue().ok();
        }
        taken
    }

    /// Queues an event for the driver; [`VmPort::deliver_events`] hands it over.
    pub fn push_event(&self, kind: event::Kind, handle: u32) {
        let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_PENDING_EVENTS {
            self.counters.events_lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(event::Event::new(kind, handle));
        self.events_pending.store(true, Ordering::Release);
    }

    /// Moves queued events into the buffers the driver posted on the event queue, and
    /// interrupts the driver if any were delivered.
    pub fn deliver_events(&self) {
        if !self.events_pending.load(Ordering::Acquire) {
            return;
        }
        let mut q = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if q.is_empty() {
            self.events_pending.store(false, Ordering::Release);
            return;
        }
        let vring = self.event_vring.lock().unwrap_or_else(|p| p.into_inner());
        let Some(vring) = vring.as_ref() else { return };
        let mem = self.mem.memory();
        let mut delivered = false;
        // Two passes at most: a driver posting buffers as fast as they are taken must not keep
        // the caller (the scheduler) here.
        for _pass in 0..2 {
            while let Some(ev) = q.front() {
                let chain = match vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone())
                {
                    Some(c) => c,
                    None => break,
                };
                let head = chain.head_index();
                let mut written = 0u32;
                if let Some(desc) = chain.into_iter().find(|d| d.is_write_only()) {
                    if desc.len() as usize >= event::SIZE
                        && mem.write_slice(ev.as_bytes(), desc.addr()).is_ok()
                    {
                        written = event::SIZE as u32;
                    }
                }
                if written == 0 {
                    warn!(
                        "vm {}: an event buffer was unusable; the event waits for the next",
                        self.name
                    );
                } else {
                    q.pop_front();
                }
                if vring.add_used(head, written).is_err() {
                    break;
                }
                delivered = true;
            }
            // Kicks for refilled event buffers are only needed while events wait for buffers:
            // otherwise each refill would wake this VM's worker thread for nothing.
            if q.is_empty() {
                let _ = vring.disable_notification();
                break;
            }
            // Buffers posted between the last pop and re-enabling kicks raise no kick.
            if !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        if delivered {
            if let Err(e) = vring.signal_used_queue() {
                warn!(
                    "vm {}: cannot interrupt the guest for events: {e}",
                    self.name
                );
            }
        }
    }
}

/// Whether the driver wants an interrupt for buffers returned on `vring`: a driver that is
/// not waiting for free doorbell slots sets `VRING_AVAIL_F_NO_INTERRUPT`, which saves the
/// daemon a system call per batch (virtio-queue does not read that flag itself).
fn wants_interrupt(vring: &Vring, mem: &GuestMem) -> bool {
    let avail = vring.get_ref().get_queue().avail_ring();
    // Order the used index published by add_used before the flags are read, so a driver that
    // clears the flag and then re-checks the used ring cannot be missed.
    std::sync::atomic::fence(Ordering::SeqCst);
    match mem.load::<u16>(GuestAddress(avail), Ordering::Acquire) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
        // Unreadable rings get their interrupt; the driver's next access will fail anyway.
        Err(_) => true,
    }
}
