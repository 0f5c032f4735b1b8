//! A VM's doorbell and event virtqueues: doorbells taken off the rings (on a kick by the VM's
//! vring worker, or by the scheduler while it polls), whether the driver should kick, and
//! events written into the buffers the driver posts.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwapOption;
use log::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::event::EventConsumer;
use vrdma_proto::{doorbell, event, queue};
use zerocopy::IntoBytes;

use crate::model::memory::{self, GuestMem, GuestMemAtomic, WatchedWord, WriteKind};
use crate::model::vm::{EventSink, Vm};
use crate::sched::doorbells::Doorbells;
use crate::sched::kick_token;
use crate::wake::Bell;

/// A virtqueue as the vhost-user library keeps it.
pub type Vring = VringRwLock<GuestMemAtomic>;

/// A VM's doorbell virtqueues, each known from its first kick.
pub struct DoorbellQueues {
    vm: Arc<Vm>,
    vrings: Box<[OnceLock<Vring>]>,
    /// The scheduler polls this VM: its driver must not kick, on the queues known now and on
    /// any that start or restart later.
    kicks_off: AtomicBool,
    /// What the scheduler sleeps on, if the queues' kicks go to it directly.
    bell: Option<Arc<Bell>>,
    /// Per queue, the duplicate of its kick fd the scheduler watches, from the ring's start
    /// until it stops.
    handed_over: Box<[Mutex<Option<EventConsumer>>]>,
    /// The scheduler muted the kicks ([`Doorbells::mute_kicks`]): the duplicates are not
    /// watched.
    muted: AtomicBool,
    /// The available index of each running queue, as of the last `take` ([`AvailIndexes`]).
    avail_indexes: ArcSwapOption<AvailIndexes>,
    /// Counts the forgets of `avail_indexes`, so that a take that built a watch while a queue
    /// started or the table changed does not keep it.
    watch_generation: AtomicU64,
    /// Per queue, where the daemon's last look or take left the driver's available index: the
    /// next entry it takes, or the index itself if nothing more can be taken up to it (an
    /// impossible index, an entry that cannot be read). What [`Doorbells::arrived`] compares
    /// the index with.
    taken_up_to: Box<[AtomicU16]>,
}

/// The available indices of a VM's running doorbell queues, in order, watched for
/// [`Doorbells::arrived`]: a load each. Replaced whole when a queue starts, stops or moves or
/// the memory table changes, which `take` notices.
#[derive(Debug, Default)]
struct AvailIndexes {
    /// Per running queue: its index among the doorbell queues, where its available index is
    /// (guest-physical), and the word itself unless it cannot be watched (not in guest memory,
    /// or not aligned: its doorbells are then seen at the step's end).
    rings: Vec<(usize, u64, Option<WatchedWord>)>,
}

impl std::fmt::Debug for DoorbellQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoorbellQueues")
            .field("vm", &self.vm.name)
            .field("kicks_off", &self.kicks_off)
            .finish_non_exhaustive()
    }
}

impl DoorbellQueues {
    /// The doorbell queues of `vm`, none known yet.
    pub fn new(vm: Arc<Vm>) -> Self {
        DoorbellQueues {
            vm,
            vrings: (0..queue::MAX_DOORBELL_QUEUES)
                .map(|_| OnceLock::new())
                .collect(),
            kicks_off: AtomicBool::new(false),
            bell: None,
            handed_over: (0..queue::MAX_DOORBELL_QUEUES)
                .map(|_| Mutex::new(None))
                .collect(),
            muted: AtomicBool::new(false),
            avail_indexes: ArcSwapOption::empty(),
            watch_generation: AtomicU64::new(0),
            taken_up_to: (0..queue::MAX_DOORBELL_QUEUES)
                .map(|_| AtomicU16::new(0))
                .collect(),
        }
    }

    /// The same, with each queue's kicks handed to the scheduler sleeping on `bell`
    /// ([`DoorbellQueues::hand_over_kicks`]).
    pub fn handing_kicks_to(mut self, bell: Arc<Bell>) -> Self {
        self.bell = Some(bell);
        self
    }

    /// Hands queue `index`'s kicks to the scheduler: the scheduler watches a duplicate of its
    /// kick fd, and `stop_watching` takes the original out of the vring worker's epoll set. A
    /// kick then wakes the scheduler, which takes the doorbells itself (`Doorbells::take`),
    /// instead of waking this VM's vring worker to take them and wake the scheduler in turn:
    /// in event mode, where a message finds both asleep, that was one thread wake-up more per
    /// message. Called by the worker after it took the queue's doorbells: that it is called
    /// at all means the library has registered the kick with it (as the ring starts, and again
    /// at a `SET_VRING_ENABLE` of a started ring; the library then has the worker look at the
    /// ring at once), so it hands the kicks over anew each time. If anything fails, the worker
    /// keeps the kicks.
    pub fn hand_over_kicks(
        &self,
        index: u16,
        vring: &Vring,
        stop_watching: impl FnOnce(RawFd) -> std::io::Result<()>,
    ) {
        let (Some(bell), Some(slot)) = (&self.bell, self.handed_over.get(usize::from(index)))
        else {
            return;
        };
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        let Some(token) = kick_token(self.vm.id, index) else {
            return;
        };
        let state = vring.get_ref();
        let Some(kick) = state.get_kick() else {
            return;
        };
        // Muted kicks are handed over unwatched: the scheduler watches them once it unmutes.
        let muted = self.muted.load(Ordering::Acquire);
        let watched = kick.try_clone().and_then(|dup| {
            if !muted {
                bell.watch(dup.as_raw_fd(), token)?;
            }
            Ok(dup)
        });
        let dup = match watched {
            Ok(dup) => dup,
            Err(e) => {
                debug!(
                    "vm {}: doorbell queue {index}'s kicks stay with the vring worker: {e}",
                    self.vm.name
                );
                return;
            }
        };
        // Both watch the kicks for this moment (and the scheduler twice, if it still has the
        // previous duplicate): a kick now wakes both, and none is lost.
        if let Err(e) = stop_watching(kick.as_raw_fd()) {
            // The worker was not watching after all (a second call for the same registration,
            // or the ring stopped meanwhile): whatever the scheduler watches stays as it is.
            debug!(
                "vm {}: doorbell queue {index}'s kicks not handed over again: {e}",
                self.vm.name
            );
            if !muted {
                let _ = bell.unwatch(dup.as_raw_fd());
            }
            return;
        }
        let previous = slot.replace(dup);
        self.unwatch(previous);
    }

    /// Queue `index` stopped (`GET_VRING_BASE`): the scheduler stops watching its kicks. When
    /// the ring starts again, the library gives them to the vring worker, which hands them
    /// over again (the VMM may give the ring a new kick fd meanwhile).
    pub fn kicks_stopped(&self, index: u16) {
        if let Some(slot) = self.handed_over.get(usize::from(index)) {
            let dup = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            self.unwatch(dup);
        }
    }

    /// Takes the doorbells of every known queue that has any; `polled`: no kick announced
    /// them. Returns whether any was well formed (a queue of malformed batches is emptied, but
    /// brings nothing). Refreshes the watched available indices if the running queues or the
    /// memory table changed.
    fn take_all(&self, polled: bool) -> bool {
        // Read first: a queue that starts, or a table that changes, while this take looks
        // makes the watch it builds stale before it is stored.
        let generation = self.watch_generation.load(Ordering::Acquire);
        let mem = self.vm.mem.memory();
        let watched = self.avail_indexes.load();
        let mut watched_rings = watched.as_ref().map(|w| w.rings.iter());
        let mut stale = watched.is_none();
        let mut any = false;
        for (index, vring) in self.known() {
            let Some(look) = look(vring, &mem) else {
                continue;
            };
            let next = watched_rings.as_mut().and_then(Iterator::next);
            stale |= !next.is_some_and(|(i, gpa, word)| {
                *i == index
                    && *gpa == look.avail_index
                    && word.as_ref().is_none_or(|w| w.is_in(&mem))
            });
            let seen = &self.taken_up_to[index];
            if look.pending {
                // The drain records where it stopped. If that is short of the index this look
                // saw (a ring entry it could not read), the index is recorded instead: it is
                // then not news again until it changes, so a driver cuts no more steps than it
                // makes changes. Past it (the driver posted meanwhile) is left as is, or the
                // next question would cut a step for doorbells already taken.
                any |= self.drain(index, vring, polled) > 0;
                let short = look.quiet_at.wrapping_sub(seen.load(Ordering::Relaxed));
                if short != 0 && short <= u16::MAX / 2 {
                    seen.store(look.quiet_at, Ordering::Relaxed);
                }
            } else {
                seen.store(look.quiet_at, Ordering::Relaxed);
            }
        }
        stale |= watched_rings.is_some_and(|mut rest| rest.next().is_some());
        drop(watched);
        if stale {
            self.watch_avail_indexes(mem, generation);
        }
        any
    }

    /// Whether any running queue's available index is not where the last look or take left
    /// it, by the watched words: a load per queue, no lock. `unwatched`: the answer for what
    /// has no word (no watch at all, or a ring that cannot be watched).
    fn any_moved(&self, unwatched: bool) -> bool {
        let watched = self.avail_indexes.load();
        let Some(w) = watched.as_ref() else {
            return unwatched;
        };
        w.rings.iter().any(|(index, _, word)| match word {
            Some(word) => {
                word.load(Ordering::Acquire) != self.taken_up_to[*index].load(Ordering::Relaxed)
            }
            None => unwatched,
        })
    }

    /// Whether the watched indices have queue `index` at its ring's place. No watch at all
    /// does not count: a take may be building one without this queue. A load and a scan of a
    /// few entries, no lock.
    fn watches(&self, index: usize, queue: &virtio_queue::Queue) -> bool {
        let avail_index = avail_index_address(queue);
        self.avail_indexes.load().as_ref().is_some_and(|w| {
            w.rings
                .iter()
                .any(|(i, gpa, _)| *i == index && *gpa == avail_index)
        })
    }

    /// Stops watching the queues' available indices until the next `take` finds them again:
    /// the memory table changed or a ring stopped. Lets go of the table the watched words are
    /// in, so a replaced table is not kept mapped for them.
    pub fn forget_avail_indexes(&self) {
        self.watch_generation.fetch_add(1, Ordering::AcqRel);
        self.avail_indexes.store(None);
    }

    /// Finds the available index of each running queue in memory table `mem` (the one the
    /// caller compared the watched words with), for [`Doorbells::arrived`]. Off the hot path:
    /// when queues start, stop or move, or the table changes. `generation`: the watch
    /// generation the caller read before it looked; if a forget came since, the watch built
    /// is dropped at once (the next take builds another).
    fn watch_avail_indexes(&self, mem: vm_memory::GuestMemoryLoadGuard<GuestMem>, generation: u64) {
        let mem = mem.into_inner();
        let mut rings = Vec::new();
        for (index, vring) in self.known() {
            let Some(look) = look(vring, &mem) else {
                continue;
            };
            // A ring whose index is not in guest memory is kept unwatched (so that it is not
            // looked up again at every take): its doorbells are seen at the step's end, and the
            // driver's next access fails anyway.
            let word = WatchedWord::new(mem.clone(), look.avail_index);
            rings.push((index, look.avail_index, word));
        }
        self.avail_indexes
            .store(Some(Arc::new(AvailIndexes { rings })));
        // A forget that came meanwhile stored its None before or after this watch: if before,
        // its generation is seen here.
        if self.watch_generation.load(Ordering::Acquire) != generation {
            self.avail_indexes.store(None);
        }
    }

    /// The doorbell queues known so far, with their indices.
    fn known(&self) -> impl Iterator<Item = (usize, &Vring)> {
        self.vrings
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((i, v.get()?)))
    }

    fn unwatch(&self, dup: Option<EventConsumer>) {
        if let (Some(bell), Some(dup)) = (&self.bell, dup) {
            let _ = bell.unwatch(dup.as_raw_fd());
        }
    }

    /// Doorbell queue `index` (counted from the first doorbell queue) was kicked, or started
    /// or restarted (the vhost-user library calls the device for a ring that becomes ready):
    /// remembers it, sets its notification state to match whether the scheduler polls (a ring
    /// stopped while polled keeps `VRING_USED_F_NO_NOTIFY` in guest memory, and a driver would
    /// never kick it again), and takes its doorbells.
    pub fn kicked(&self, index: u16, vring: &Vring) {
        if let Some(slot) = self.vrings.get(usize::from(index)) {
            let _ = slot.set(vring.clone());
        }
        {
            let mem = self.vm.mem.memory();
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            // Read under the vring's lock, as the scheduler changes it (see `set_kicks`):
            // whichever of the two applies last applies the current state. Written only when
            // the ring's flag says otherwise, so an ordinary kick costs one load.
            let off = self.kicks_off.load(Ordering::Acquire);
            if queue.ready() && no_notify(queue.used_ring(), &mem) != Some(off) {
                if off {
                    let _ = queue.disable_notification(&*mem);
                } else {
                    let _ = queue.enable_notification(&*mem);
                }
            }
            // A ring that started (or moved) since the indices were watched: the scheduler
            // takes a polled VM's doorbells only when `worth_taking` says so, which asks the
            // watched words alone, so they are looked up again at its next take.
            if runs(&state) && !self.watches(usize::from(index), state.get_queue()) {
                self.forget_avail_indexes();
            }
        }
        self.drain(usize::from(index), vring, false);
    }

    /// Whether the scheduler polls this VM and wants its driver not to kick (what the queues
    /// that run show as `VRING_USED_F_NO_NOTIFY`). For tests and diagnostics.
    pub fn kicks_off(&self) -> bool {
        self.kicks_off.load(Ordering::Acquire)
    }

    /// The doorbell queues known so far.
    pub fn vrings(&self) -> impl Iterator<Item = &Vring> {
        self.vrings.iter().filter_map(OnceLock::get)
    }

    /// Hot path: takes the doorbell batches the driver has made available on `vring`, puts
    /// their QPs on the ready list and returns the descriptors. Returns how many well-formed
    /// doorbells it took. One chain at a time (the vring lock is released between them) and nothing is
    /// collected, so it allocates nothing. `polled`: the scheduler took them without a kick.
    fn drain(&self, index: usize, vring: &Vring, polled: bool) -> usize {
        let vm = &self.vm;
        let mem = vm.mem.memory();
        let mut batch = [0u8; doorbell::SIZE * doorbell::MAX_BATCH];
        let mut taken = 0;
        let mut rung = 0;
        loop {
            let Some(chain) = pop_running(vring, &mem) else {
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
                    for (kind, handle) in doorbells {
                        rung += 1;
                        vm.counters.doorbells.fetch_add(1, Ordering::Relaxed);
                        if polled {
                            vm.counters.doorbells_polled.fetch_add(1, Ordering::Relaxed);
                        }
                        // An SRQ doorbell names an SRQ, not a QP, and asks nothing: SRQ
                        // entries are read when a message arrives and are never flushed.
                        if kind == doorbell::Kind::Srq {
                            continue;
                        }
                        // Either other kind just asks the scheduler to look at the QP: a send
                        // doorbell for new work, a receive doorbell for a QP in ERR whose new
                        // receives must be flushed. A QPN that names nothing is skipped there,
                        // as an RNIC ignores a doorbell for a QP that does not exist.
                        vm.enqueue(handle);
                    }
                }
                _ => {
                    vm.counters
                        .doorbells_malformed
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Err(e) = vring.add_used(head, 0) {
                warn!("vm {}: cannot return a doorbell descriptor: {e}", vm.name);
            }
        }
        if let Some(seen) = self.taken_up_to.get(index) {
            seen.store(vring.get_ref().get_queue().next_avail(), Ordering::Relaxed);
        }
        if taken > 0 && wants_interrupt(vring, &mem) {
            vring.signal_used_queue().ok();
        }
        rung
    }
}

impl Drop for DoorbellQueues {
    /// The connection ended: the scheduler stops watching its kicks before their fds close.
    fn drop(&mut self) {
        for slot in &self.handed_over {
            self.unwatch(slot.lock().unwrap_or_else(|p| p.into_inner()).take());
        }
    }
}

impl Doorbells for DoorbellQueues {
    fn take(&self) -> bool {
        self.take_all(true)
    }

    fn arrived(&self) -> bool {
        // News until the next take looks (the scheduler takes after every yes: a step cut
        // short asks `worth_taking`), so a driver that keeps changing its index, with
        // doorbells or not, cuts no more steps than it makes changes. What is not watched
        // is seen at the step's end.
        self.any_moved(false)
    }

    fn worth_taking(&self) -> bool {
        // Nothing watched (yet, or any more), or a ring that cannot be watched: only a take
        // finds out, as before watching (and a take watches again).
        self.any_moved(true)
    }

    fn take_kicked(&self) -> bool {
        self.take_all(false)
    }

    fn mute_kicks(&self, muted: bool) {
        let Some(bell) = &self.bell else {
            return;
        };
        self.muted.store(muted, Ordering::Release);
        for (index, slot) in self.handed_over.iter().enumerate() {
            // Under the slot's lock, as `hand_over_kicks` changes it: whichever applies last
            // sees the other's state.
            let slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            let (Some(dup), Some(token)) = (&*slot, kick_token(self.vm.id, index as u16)) else {
                continue;
            };
            // An fd already in the state asked fails harmlessly (watched twice, or not at all).
            let _ = if muted {
                bell.unwatch(dup.as_raw_fd())
            } else {
                bell.watch(dup.as_raw_fd(), token)
            };
        }
    }

    fn set_kicks(&self, on: bool) -> bool {
        self.kicks_off.store(!on, Ordering::Release);
        let mem = self.vm.mem.memory();
        let mut pending = false;
        for vring in self.vrings() {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            // A stopped ring is left alone: `kicked` sets its state when it starts again.
            if !queue.ready() {
                continue;
            }
            if on {
                pending |= queue.enable_notification(&*mem).unwrap_or(false);
            } else {
                let _ = queue.disable_notification(&*mem);
            }
        }
        pending
    }
}

/// Whether the ring whose lock the caller holds runs: started (ready) and enabled. A ring the
/// VMM disabled or stopped is not touched, not even polled: its indices are the VMM's until it
/// starts the ring again. Only ever checked under the same lock as what it guards: the VMM's
/// `GET_VRING_BASE` marks a ring not ready before `stop_vring` waits for the worker, so a
/// check made under an earlier lock can be stale by the time the ring is read.
fn runs(state: &vhost_user_backend::VringState<GuestMemAtomic>) -> bool {
    state.is_enabled() && state.get_queue().ready()
}

/// Every chain the driver has made available on `vring`, taken off the ring, or `None` if the
/// ring does not run (the VMM stopped or disabled it: nothing to do until it starts again).
/// The check and the walk are made under the ring's one lock, as in [`pop_running`]: checked
/// under a lock of its own, a ring stopped in between makes virtio-queue fail with
/// `QueueNotReady`, and an error from the worker's event handler ends the VM's vring worker,
/// after which no kick of any of its queues is ever seen again.
pub fn take_available<M>(
    vring: &Vring,
    mem: &M,
) -> Option<Result<Vec<virtio_queue::DescriptorChain<M>>, virtio_queue::Error>>
where
    M: Clone + std::ops::Deref<Target = GuestMem>,
{
    let mut state = vring.get_mut();
    if !runs(&state) {
        return None;
    }
    Some(
        state
            .get_queue_mut()
            .iter(mem.clone())
            .map(Iterator::collect),
    )
}

/// The next chain the driver made available on `vring`, if the ring runs. The check and the
/// pop are made under the ring's one lock, so a ring stopped meanwhile gives nothing.
fn pop_running<M>(vring: &Vring, mem: &M) -> Option<virtio_queue::DescriptorChain<M>>
where
    M: Clone + std::ops::Deref<Target = GuestMem>,
{
    let mut state = vring.get_mut();
    if !runs(&state) {
        return None;
    }
    state.get_queue_mut().pop_descriptor_chain(mem.clone())
}

/// A look at a running ring's indices.
struct Look {
    /// The driver has made doorbells available that the daemon has not taken.
    pending: bool,
    /// The available index at which [`Doorbells::arrived`] sees nothing new once this look's
    /// doorbells are taken: the driver's index as read, or the daemon's next entry if the
    /// index cannot be read (an impossible index counts as read, so that each change of it
    /// cuts a lower class's step once, not as often as the driver likes).
    quiet_at: u16,
    /// Where the driver's available index is (guest-physical).
    avail_index: u64,
}

/// A look at `vring`'s indices if it runs (`None` if not). Made under the vring's read lock,
/// before taking it for writing, so an idle poll costs two loads; a driver whose available
/// index is impossible gets nothing polled (its kicks still reach the worker, which reports
/// it).
fn look(vring: &Vring, mem: &GuestMem) -> Option<Look> {
    let state = vring.get_ref();
    if !runs(&state) {
        return None;
    }
    let queue = state.get_queue();
    let next_avail = queue.next_avail();
    let (pending, quiet_at) = match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => {
            let ahead = idx.0.wrapping_sub(next_avail);
            (ahead != 0 && ahead <= queue.size(), idx.0)
        }
        Err(_) => (false, next_avail),
    };
    Some(Look {
        pending,
        quiet_at,
        avail_index: avail_index_address(queue),
    })
}

/// Where `queue`'s available index is (guest-physical): the available ring's flags come
/// first, then its index (virtio 1.x, 2.7.6).
fn avail_index_address(queue: &virtio_queue::Queue) -> u64 {
    queue.avail_ring().wrapping_add(2)
}

/// Whether the used ring at `used` tells the driver not to kick (`VRING_USED_F_NO_NOTIFY`),
/// or `None` if it cannot be read.
fn no_notify(used: u64, mem: &GuestMem) -> Option<bool> {
    let flags = mem
        .load::<u16>(GuestAddress(used), Ordering::Acquire)
        .ok()?;
    Some(u16::from_le(flags) & VRING_USED_F_NO_NOTIFY as u16 != 0)
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

/// A VM's event virtqueue, known from its first kick.
#[derive(Default)]
pub struct EventQueue {
    vring: Mutex<Option<Vring>>,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue").finish_non_exhaustive()
    }
}

impl EventQueue {
    /// Remembers the event virtqueue so events can be delivered from any thread.
    pub fn kicked(&self, vring: &Vring) {
        let mut slot = self.vring.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(vring.clone());
        }
    }
}

impl EventSink for EventQueue {
    fn deliver(&self, vm: &Vm, backlog: &mut VecDeque<event::Event>) {
        let vring = self.vring.lock().unwrap_or_else(|p| p.into_inner());
        let Some(vring) = vring.as_ref() else { return };
        let mem = vm.mem.memory();
        let mut delivered = false;
        // Two passes at most: a driver posting buffers as fast as they are taken must not keep
        // the caller (the scheduler) here.
        for _pass in 0..2 {
            while let Some(ev) = backlog.front() {
                // On a ring the VMM disabled or stopped, the events wait in the backlog.
                let Some(chain) = pop_running(vring, &mem) else {
                    break;
                };
                let head = chain.head_index();
                let mut written = 0u32;
                if let Some(desc) = chain.into_iter().find(|d| d.is_write_only()) {
                    if desc.len() as usize >= event::SIZE
                        && memory::write_bytes(&mem, desc.addr().0, ev.as_bytes(), WriteKind::Event)
                            .is_ok()
                    {
                        written = event::SIZE as u32;
                    }
                }
                if written == 0 {
                    warn!(
                        "vm {}: an event buffer was unusable; the event waits for the next",
                        vm.name
                    );
                } else {
                    backlog.pop_front();
                }
                if vring.add_used(head, written).is_err() {
                    break;
                }
                delivered = true;
            }
            // Kicks for refilled event buffers are only needed while events wait for buffers:
            // otherwise each refill would wake this VM's worker thread for nothing.
            if backlog.is_empty() {
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
                warn!("vm {}: cannot interrupt the guest for events: {e}", vm.name);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use vhost_user_backend::VringT;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vrdma_proto::event::Kind;

    use super::*;
    use crate::model::memory::recorder;
    use crate::testing::TestVm;

    /// A running (ready and enabled) virtqueue of `len` entries at `at` in `vm`'s memory.
    pub(crate) fn vring_at(vm: &TestVm, at: u64, len: u16) -> Vring {
        let vring = Vring::new(vm.vm.mem.clone(), len).unwrap();
        let mem = vm.mem();
        let mock = MockSplitQueue::create(&*mem, GuestAddress(at), len);
        vring
            .set_queue_info(
                mock.desc_table_addr().0,
                mock.avail_addr().0,
                mock.used_addr().0,
            )
            .unwrap();
        vring.set_queue_size(len);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    /// Events go into the driver's buffers through the one write path: nothing but the event
    /// and the virtqueue's own rings changes.
    #[test]
    fn events_are_written_through_the_one_path() {
        let events = Arc::new(EventQueue::default());
        let mut vm = TestVm::with_events(5, events.clone());
        let ring = vm.alloc(16 << 10);
        let buffers = vm.alloc(4096);
        let vring = vring_at(&vm, ring, 16);
        {
            let mem = vm.mem();
            let mock = MockSplitQueue::create(&*mem, GuestAddress(ring), 16);
            let descs: Vec<RawDescriptor> = (0..2)
                .map(|i| {
                    let d =
                        SplitDescriptor::new(buffers + i * 64, 64, VRING_DESC_F_WRITE as u16, 0);
                    RawDescriptor::from(d)
                })
                .collect();
            mock.add_desc_chains(&descs, 0).unwrap();
        }
        events.kicked(&vring);
        vm.vm.push_event(Kind::CqErr, 7);
        vm.vm.push_event(Kind::QpFatal, 9);
        let before = recorder::snapshot(&vm.mem());
        recorder::start();
        vm.vm.deliver_events();
        let writes = recorder::take();
        let after = recorder::snapshot(&vm.mem());
        // The descriptor table, available and used rings are virtio-queue's.
        recorder::assert_covered_except(&before, &after, &writes, &[(ring, ring + (16 << 10))]);
        let kinds: Vec<(WriteKind, u64)> = writes.iter().map(|w| (w.kind, w.gpa)).collect();
        assert_eq!(
            kinds,
            vec![
                (WriteKind::Event, buffers),
                (WriteKind::Event, buffers + 64)
            ]
        );
        let first = vm.read(buffers, event::SIZE);
        assert_eq!(first, event::Event::new(Kind::CqErr, 7).as_bytes());
    }

    /// A ring the VMM stopped gives nothing and no error (an error would end the VM's vring
    /// worker), and leaves its chains for when it starts again.
    #[test]
    fn a_stopped_ring_takes_nothing_and_fails_nothing() {
        let mut vm = TestVm::new(7, 1);
        let ring = vm.alloc(16 << 10);
        let buffer = vm.alloc(4096);
        let vring = vring_at(&vm, ring, 16);
        {
            let mem = vm.mem();
            let mock = MockSplitQueue::create(&*mem, GuestAddress(ring), 16);
            let desc = SplitDescriptor::new(buffer, 64, 0, 0);
            mock.add_desc_chains(&[RawDescriptor::from(desc)], 0)
                .unwrap();
        }
        let mem = vm.vm.mem.memory();
        vring.set_queue_ready(false);
        assert!(take_available(&vring, &mem).is_none());
        vring.set_queue_ready(true);
        vring.set_enabled(false);
        assert!(take_available(&vring, &mem).is_none());
        vring.set_enabled(true);
        let chains = take_available(&vring, &mem)
            .expect("the ring runs")
            .expect("the ring is sound");
        assert_eq!(chains.len(), 1, "the chain waited for the ring to start");
    }

    /// VM `id` with one running doorbell queue of 16 entries that the queues know (it started
    /// empty), and a batch holding one send doorbell for QP 0x01_0003, not yet posted. Returns
    /// the VM, the ring's and the batch's addresses, the ring and the queues.
    fn one_doorbell_queue(id: u8) -> (TestVm, u64, u64, Vring, DoorbellQueues) {
        let mut vm = TestVm::new(id, 1);
        let ring = vm.alloc(16 << 10);
        let batch = vm.alloc(4096);
        let good = doorbell::Doorbell::new(doorbell::Kind::Send, 0x01_0003);
        vm.mem()
            .write_slice(good.as_bytes(), GuestAddress(batch))
            .unwrap();
        let vring = vring_at(&vm, ring, 16);
        let queues = DoorbellQueues::new(vm.vm.clone());
        // The ring starts with nothing on it: the queues know it from now on.
        queues.kicked(0, &vring);
        (vm, ring, batch, vring, queues)
    }

    /// A batch that is not whole doorbells is returned and counted as malformed, and brings
    /// nothing: a kick that only finds such batches counts as empty (the scheduler mutes a VM
    /// whose kicks keep bringing nothing).
    #[test]
    fn malformed_doorbells_are_taken_but_bring_nothing() {
        let (vm, ring, batch, _vring, queues) = one_doorbell_queue(8);
        let mem = vm.mem();
        let mock = MockSplitQueue::create(&*mem, GuestAddress(ring), 16);
        let chain = |len| [RawDescriptor::from(SplitDescriptor::new(batch, len, 0, 0))];
        mock.add_desc_chains(&chain(5), 0).unwrap();
        assert!(!queues.take_kicked(), "five bytes are no doorbell");
        let counters = &vm.vm.counters;
        assert_eq!(counters.doorbells_malformed.load(Ordering::Relaxed), 1);
        assert_eq!(vm.vm.pop_ready(), None);
        mock.add_desc_chains(&chain(8), 1).unwrap();
        assert!(queues.take_kicked(), "a whole doorbell");
        assert_eq!(vm.vm.pop_ready(), Some(0x01_0003));
    }

    /// `arrived` (and `worth_taking`) see a doorbell the driver made available without taking
    /// it, until it is taken; an impossible index the driver writes is seen until the next
    /// look; a stopped ring and a forgotten table are not watched (and a forgotten table is
    /// worth a take, which watches again).
    #[test]
    fn arrived_sees_new_doorbells_until_they_are_taken() {
        let (vm, ring, batch, vring, queues) = one_doorbell_queue(9);
        assert!(
            queues.worth_taking(),
            "nothing watched yet: only a take can tell"
        );
        assert!(!queues.take(), "nothing rung yet");
        assert!(!queues.arrived());
        assert!(!queues.worth_taking(), "watched, and nothing new");
        let mem = vm.mem();
        let mock = MockSplitQueue::create(&*mem, GuestAddress(ring), 16);
        let chain = [RawDescriptor::from(SplitDescriptor::new(batch, 8, 0, 0))];
        mock.add_desc_chains(&chain, 0).unwrap();
        assert!(queues.arrived(), "a doorbell made available");
        assert!(queues.arrived(), "still there until taken");
        assert!(queues.worth_taking());
        assert_eq!(vm.vm.pop_ready(), None, "looking takes nothing");
        let watched = queues.avail_indexes.load_full();
        assert!(queues.take());
        assert_eq!(vm.vm.pop_ready(), Some(0x01_0003));
        assert!(!queues.arrived(), "taken");
        assert!(!queues.worth_taking(), "taken");
        assert!(
            Arc::ptr_eq(
                &watched.unwrap(),
                &queues.avail_indexes.load_full().unwrap()
            ),
            "nothing moved: the watched indices are not looked up again"
        );
        // Taken by the vring worker after a kick: the same.
        mock.add_desc_chains(&chain, 1).unwrap();
        assert!(queues.arrived());
        queues.kicked(0, &vring);
        assert!(!queues.arrived(), "taken after a kick");
        // A hostile driver's impossible index brings nothing, and once looked at is not seen
        // again (it would cut other VMs' steps for nothing).
        let idx = mock.avail().idx().load();
        mock.avail().idx().store(idx.wrapping_add(100));
        assert!(queues.arrived(), "the index changed");
        assert!(!queues.take(), "an impossible index brings nothing");
        assert!(!queues.arrived(), "and is not seen again");
        assert!(!queues.worth_taking());
        mock.avail().idx().store(idx);
        assert!(!queues.take());
        // A stopped ring is not watched.
        vring.set_queue_ready(false);
        assert!(!queues.take());
        mock.add_desc_chains(&chain, 2).unwrap();
        assert!(!queues.arrived(), "a stopped ring is not watched");
        vring.set_queue_ready(true);
        assert!(queues.take(), "the doorbell waited for the ring to start");
        assert!(!queues.arrived());
        // A new memory table: nothing watched until the next look.
        queues.forget_avail_indexes();
        mock.add_desc_chains(&chain, 3).unwrap();
        assert!(!queues.arrived(), "not watched until looked up again");
        assert!(queues.worth_taking(), "but worth a take");
        assert!(queues.take());
        mock.add_desc_chains(&chain, 4).unwrap();
        assert!(queues.arrived(), "watched again");
    }

    /// A ring that starts after the indices were watched, or moves, has them looked up again
    /// at the next take: the scheduler takes a polled VM's doorbells only when `worth_taking`
    /// says so, and would otherwise never see that ring's.
    #[test]
    fn a_ring_that_starts_or_moves_is_watched_from_the_next_take() {
        let (mut vm, _ring, batch, vring, queues) = one_doorbell_queue(11);
        assert!(!queues.take());
        assert!(!queues.worth_taking());
        let second = vm.alloc(16 << 10);
        let second_vring = vring_at(&vm, second, 16);
        queues.kicked(1, &second_vring);
        assert!(queues.worth_taking(), "the second ring is not watched yet");
        assert!(!queues.take(), "nothing on it: the take watches it");
        let mem = vm.mem();
        let mock = MockSplitQueue::create(&*mem, GuestAddress(second), 16);
        let chain = [RawDescriptor::from(SplitDescriptor::new(batch, 8, 0, 0))];
        mock.add_desc_chains(&chain, 0).unwrap();
        assert!(queues.worth_taking() && queues.arrived(), "watched");
        assert!(queues.take());
        assert_eq!(vm.vm.pop_ready(), Some(0x01_0003));
        assert!(!queues.worth_taking());
        // The first ring moves (its VMM gave it new addresses) and starts again there.
        let moved = vm.alloc(16 << 10);
        let at = MockSplitQueue::create(&*mem, GuestAddress(moved), 16);
        vring
            .set_queue_info(at.desc_table_addr().0, at.avail_addr().0, at.used_addr().0)
            .unwrap();
        queues.kicked(0, &vring);
        assert!(
            queues.worth_taking(),
            "the moved ring is not watched where it is"
        );
        assert!(!queues.take());
        at.add_desc_chains(&chain, 0).unwrap();
        assert!(queues.arrived(), "watched where it is now");
        assert!(queues.take());
        // A kick of a ring where it was watched keeps the watch.
        let watched = queues.avail_indexes.load_full().unwrap();
        queues.kicked(0, &vring);
        assert!(Arc::ptr_eq(
            &watched,
            &queues.avail_indexes.load_full().unwrap()
        ));
        // A take that looked before a forget (a ring started meanwhile) keeps no watch.
        let generation = queues.watch_generation.load(Ordering::Acquire);
        queues.forget_avail_indexes();
        queues.watch_avail_indexes(vm.vm.mem.memory(), generation);
        assert!(
            queues.avail_indexes.load().is_none(),
            "built before the forget"
        );
        assert!(queues.worth_taking());
        assert!(!queues.take());
        assert!(
            queues.avail_indexes.load().is_some(),
            "the next take watches again"
        );
    }

    /// A running ring whose available index is not in guest memory is not watched, and is
    /// not looked up again at every take (which would allocate on the hot path).
    #[test]
    fn a_ring_that_cannot_be_watched_is_not_looked_up_at_every_take() {
        let (_vm, _ring, _batch, vring, queues) = one_doorbell_queue(10);
        let (desc, used) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (queue.desc_table(), queue.used_ring())
        };
        vring.set_queue_info(desc, 1 << 40, used).unwrap();
        assert!(!queues.take());
        let watched = queues.avail_indexes.load_full().expect("looked up");
        assert!(watched.rings[0].2.is_none(), "{watched:?}");
        assert!(!queues.take());
        assert!(!queues.arrived());
        assert!(queues.worth_taking(), "only a take can look at it");
        assert!(
            Arc::ptr_eq(&watched, &queues.avail_indexes.load_full().unwrap()),
            "not looked up again"
        );
    }

    /// An SRQ doorbell is counted and asks nothing: its handle, an SRQ number, is never taken
    /// for a QPN, so it cannot displace a pending doorbell of the QP whose slot its low bits
    /// name.
    #[test]
    fn an_srq_doorbell_names_no_qp() {
        let mut vm = TestVm::new(6, 1);
        let ring = vm.alloc(16 << 10);
        let batch = vm.alloc(4096);
        let qpn = 0x01_0003;
        let same_slot = 0x0002_0003;
        let bells = [
            doorbell::Doorbell::new(doorbell::Kind::Send, qpn),
            doorbell::Doorbell::new(doorbell::Kind::Srq, same_slot),
        ];
        let bytes: Vec<u8> = bells.iter().flat_map(|d| d.as_bytes().to_vec()).collect();
        vm.mem().write_slice(&bytes, GuestAddress(batch)).unwrap();
        let vring = vring_at(&vm, ring, 16);
        {
            let mem = vm.mem();
            let mock = MockSplitQueue::create(&*mem, GuestAddress(ring), 16);
            let desc = SplitDescriptor::new(batch, bytes.len() as u32, 0, 0);
            mock.add_desc_chains(&[RawDescriptor::from(desc)], 0)
                .unwrap();
        }
        DoorbellQueues::new(vm.vm.clone()).kicked(0, &vring);
        assert_eq!(vm.vm.counters.doorbells.load(Ordering::Relaxed), 2);
        assert_eq!(vm.vm.pop_ready(), Some(qpn));
        assert_eq!(vm.vm.pop_ready(), None);
    }
}
