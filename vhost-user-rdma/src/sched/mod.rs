//! The scheduler: where every VM's work meets.
//!
//! One thread serves the VMs by deficit round robin on bytes, weighted by each VM's configured
//! weight, and lets the fabric move at most one chunk of one QP's work per step, so a bulk
//! transfer cannot hold back another VM's small messages. Within a VM, QPs take turns; within
//! a QP, work requests run in order, as on an RNIC. It also runs the RNR and retry timers,
//! flushes QPs in the error state, enforces the VMs' rate limits, and polls the doorbell
//! queues while traffic flows ([`doorbells::Doorbells`], implemented by the vhost layer).
//!
//! The hot path (doorbell → work request → fabric → completion) allocates nothing and takes
//! no lock shared between VMs: the scheduler owns its tables, and takes a VM's objects only
//! with `try_lock`, so it never waits for one VM's control path (a VM registering gigabytes of
//! memory holds its own lock for a long time).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vm_memory::GuestAddressSpace;
use vrdma_proto::cqe::{Status, VendorErr};
use vrdma_proto::{Gid, qp};

use crate::config::PriorityClass;
use crate::fabric::{Fabric, Step, StepOutcome, WR_COST};
use crate::model::hooks::ObjectHooks;
use crate::model::memory::{CHUNK, CopyCut, load_producer};
use crate::model::vm::Vm;
use crate::rnic::completion::flush;
use crate::rnic::requester::{Examined, examine, fail_wr, set_sq_polling};
use crate::wake::{Bell, Sleeper};

pub mod doorbells;
pub mod rate;

use doorbells::Doorbells;
use rate::Buckets;

/// How often the loop, awake, looks for the kicks of VMs it does not poll (asleep, a kick
/// wakes it): a system call per look, so about one per 20 µs of copying at most.
const KICK_LOOK: Duration = Duration::from_micros(20);

/// Bits of a kick token that name the doorbell queue (the rest name the VM).
const KICK_TOKEN_QUEUE_BITS: u32 = 8;

/// Kicks in a row that bring a VM no doorbell before its kicks are muted: an honest driver
/// kicks after it rings, so only a race makes one of its kicks empty (the doorbell taken by a
/// look before the kick's own). A guest that writes its kick fd in a loop would otherwise keep
/// the shared scheduler awake, a wake-up per pass. Each mute halves the next threshold (down
/// to 8), so that a guest ringing now and then while it kicks in a loop is muted again soon;
/// `KICK_STORM` kicks in a row that bring doorbells, or `STRIKES_FORGOTTEN` without a mute,
/// restore it. Kicks of a VM being polled do not count (polling takes the doorbells first), nor
/// the one a kick fd watched again reports at once (nobody reads it, so it stays readable).
const KICK_STORM: u32 = 64;

/// How many times a VM's threshold of empty kicks halves (`KICK_STORM >> 3` is 8).
const MAX_KICK_STRIKES: u8 = 3;

/// How long after its last mute a VM's strikes are forgotten.
const STRIKES_FORGOTTEN: Duration = Duration::from_secs(1);

/// How often the queues of a VM whose kicks are muted are looked at: a doorbell it rings
/// waits at most this long, and unmutes it.
const MUTED_LOOK: Duration = Duration::from_millis(1);

/// The token a VM's doorbell queue's kick fd is watched with on the scheduler's bell
/// ([`Bell::watch`]): a kick makes the scheduler take that VM's doorbells. `None` for a VM id
/// too large to encode (never, in practice: ids count connections from 1).
pub fn kick_token(vm_id: u64, queue: u16) -> Option<u64> {
    let token = vm_id.checked_mul(1 << KICK_TOKEN_QUEUE_BITS)? | u64::from(queue & 0xff);
    (token <= crate::wake::MAX_TOKEN).then_some(token)
}

/// Deficit a weight-1 VM earns per round.
pub const QUANTUM: u32 = CHUNK;

/// Priority classes.
const CLASSES: usize = PriorityClass::ALL.len();

/// A class below the first gets at least one part in this many of the fabric while it has
/// work, however busy the classes above it are.
pub const MIN_SHARE_PARTS: u64 = 10;

/// What a step that finds nothing to do costs its VM's turn and its class: a doorbell for a
/// QP with no work still takes the scheduler a lookup and a lock. Without it, a higher-class
/// VM ringing such doorbells as fast as they are taken would hold every lower class back
/// while moving nothing, and so earn them no minimum share.
const IDLE_STEP_COST: u32 = WR_COST / 4;

/// The smallest step a time bound leaves: below it, a step's own cost (about as much as
/// copying 8 KiB, see `fabric::WR_COST`) would outweigh the copy.
const MIN_TIMED_STEP: u32 = 8 * 1024;

/// The bytes per nanosecond the scheduler's steps move, as a moving average of the steps that
/// moved at least [`MIN_TIMED_STEP`] (smaller ones measure the step's overhead, not the
/// copy): it sizes a step to a time on this host, whatever its memory's speed.
#[derive(Debug, Default, Clone, Copy)]
struct CopyRate {
    bytes_per_ns: Option<f64>,
}

impl CopyRate {
    fn observe(&mut self, bytes: u32, took: Duration) {
        if bytes < MIN_TIMED_STEP || took.is_zero() {
            return;
        }
        let rate = f64::from(bytes) / took.as_nanos() as f64;
        self.bytes_per_ns = Some(match self.bytes_per_ns {
            Some(r) => 0.875 * r + 0.125 * rate,
            None => rate,
        });
    }

    /// The bytes a step moves in `time`, at least `floor`: a whole chunk until a rate is
    /// known.
    fn bytes_in(&self, time: Duration, floor: u32) -> u32 {
        match self.bytes_per_ns {
            Some(r) => {
                (r * time.as_nanos() as f64).clamp(f64::from(floor), f64::from(CHUNK)) as u32
            }
            None => CHUNK,
        }
    }
}

/// How much of a lower class's copying a higher class's message may wait behind: a step below
/// a higher class is asked, about this often, whether that class's work arrived, and ends
/// early if it did (see `memory::CopyCut`).
const CUT_EVERY: Duration = Duration::from_micros(1);

/// The fewest bytes between two such questions: a page. Each walks the VMs and costs a few
/// loads for each of a higher class (its flags and doorbell indices): tens of nanoseconds
/// with a dozen VMs, less than copying a page.
const MIN_CUT: u32 = 4096;

/// The most quanta a VM alone with work takes after its turn's first without a round
/// (`Turns::alone_with_work`): 1 MiB at weight 1, some 30-60 µs of copying, the longest a
/// control command (an operator's, a VM attaching) waits for the loop's next pass.
const ALONE_EXTRA_QUANTA: u32 = 15;

/// A polled VM below the highest class present has its doorbell queues looked at once in
/// this many passes (see `Turns::poll_doorbells`).
const LOWER_CLASS_POLL_EVERY: u32 = 8;

/// The most a class is owed of its minimum share: a class starved for long catches up by
/// this much at once, not by a burst that would hold the others back. It is also the most a
/// class may owe back for a turn that took more than its share.
const MAX_OWED: i64 = 16 * QUANTUM as i64;
/// How soon work skipped because a VM's objects were locked is tried again.
const RETRY_BUSY: Duration = Duration::from_micros(50);
/// How often QPs in the error state are checked for newly posted work to flush.
pub const FLUSH_TICK: Duration = Duration::from_millis(1);
/// Longest the scheduler polls the doorbell queues after its last work before it sleeps, as
/// KVM's halt polling (whose default this is): a wake-up costs tens of microseconds on a
/// virtual machine, more than a small message takes end to end.
const POLL_MAX: Duration = Duration::from_micros(200);
/// The first polling window once sleeping has proved too slow; it doubles up to
/// [`POLL_MAX`] each time work arrives soon after the scheduler went to sleep, and halves (to
/// nothing) each time the scheduler sleeps longer than [`POLL_MAX`], so VMs that are idle or
/// talk rarely cost no CPU.
const POLL_START: Duration = Duration::from_micros(10);

enum Control {
    Attach(Arc<Vm>, Arc<dyn Doorbells>),
    /// Detach VM `.0`; `.2`: it moved to another daemon (migration), so its peers' QPs are
    /// left alone to reach it there.
    Detach(u64, SyncSender<()>, bool),
    Pause(u64, SyncSender<()>),
    /// Resume VM `.0`; `.1`: it has just arrived by live migration, so its peers are told.
    Resume(u64, bool),
}

/// What the scheduler's loop has done, for operators (metrics). The scheduler thread only
/// adds to and stores these with relaxed atomics; readers on other threads take no lock and
/// may see one a moment old.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Passes of the scheduler's loop (busy or idle).
    pub passes: AtomicU64,
    /// Rounds of deficit round robin that moved some VM's work.
    pub busy_rounds: AtomicU64,
    /// Times the scheduler slept, waiting for a kick, a timer or 100 ms.
    pub sleeps: AtomicU64,
    /// VMs whose doorbell queues are polled now (their drivers do not kick): a gauge.
    pub polled_vms: AtomicU64,
    /// The adaptive polling window now, in nanoseconds (0: no polling): a gauge.
    pub poll_window_ns: AtomicU64,
    /// Turns cut short because a VM of a higher priority class had work.
    pub preemptions: AtomicU64,
    /// Quanta a VM took without a round, nobody else having work (`Turns::alone_with_work`).
    pub alone_quanta: AtomicU64,
    /// Times a VM's kicks were muted for bringing no doorbells (`KICK_STORM`).
    pub kick_mutes: AtomicU64,
    /// VMs whose kicks are muted now: a gauge.
    pub muted_vms: AtomicU64,
}

/// The handle the devices and servers use to reach the scheduler.
#[derive(Clone)]
pub struct Scheduler {
    tx: SyncSender<Control>,
    bell: Arc<Bell>,
    hooks: Arc<dyn ObjectHooks>,
    stats: Arc<SchedulerStats>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

impl Scheduler {
    /// Starts the scheduler thread, which makes its fabric with `make_fabric` (the fabric
    /// lives on that thread, with its buffers) and carries work on it.
    pub fn start(
        make_fabric: impl FnOnce() -> Box<dyn Fabric> + Send + 'static,
    ) -> std::io::Result<Scheduler> {
        Self::start_with(make_fabric, None)
    }

    /// As [`Scheduler::start`], with the steps of a VM below a higher priority class bounded
    /// to about `step_time` (`--step-time-us`).
    pub fn start_with(
        make_fabric: impl FnOnce() -> Box<dyn Fabric> + Send + 'static,
        step_time: Option<Duration>,
    ) -> std::io::Result<Scheduler> {
        let (tx, rx) = sync_channel(256);
        let (hooks_tx, hooks_rx) = sync_channel(1);
        let stats = Arc::new(SchedulerStats::default());
        let thread_stats = stats.clone();
        let bell = Bell::new()?;
        let sleeper = Sleeper::new(bell.clone())?;
        std::thread::Builder::new()
            .name("vrdma-scheduler".into())
            .spawn(move || {
                let fabric = make_fabric();
                if hooks_tx.send(fabric.hooks()).is_ok() {
                    let mut turns = Turns::new(rx, fabric, sleeper);
                    turns.stats = thread_stats;
                    turns.step_time = step_time;
                    turns.run();
                }
            })?;
        let hooks = hooks_rx.recv().map_err(|_| {
            std::io::Error::other("the scheduler thread ended before its fabric was made")
        })?;
        Ok(Scheduler {
            tx,
            bell,
            hooks,
            stats,
        })
    }

    /// What the scheduler's loop has done so far.
    pub fn stats(&self) -> &Arc<SchedulerStats> {
        &self.stats
    }

    /// What the VMs' control paths tell the fabric of their objects.
    pub fn hooks(&self) -> &Arc<dyn ObjectHooks> {
        &self.hooks
    }

    /// What the scheduler sleeps on, for whoever must wake it (the RoCEv2 receive threads)
    /// and for the sources it watches itself (the VMs' doorbell kicks, see [`kick_token`]).
    pub fn bell(&self) -> &Arc<Bell> {
        &self.bell
    }

    /// Adds a connected VM, whose doorbell queues are `doorbells`, to the fabric.
    pub fn attach(&self, vm: Arc<Vm>, doorbells: Arc<dyn Doorbells>) {
        if self.tx.send(Control::Attach(vm, doorbells)).is_ok() {
            self.wake();
        }
    }

    /// Removes a VM from the fabric; its peers' QPs with sends outstanding to it go to the
    /// error state. Returns once the scheduler holds no reference to it.
    pub fn detach(&self, vm_id: u64) {
        self.request(|done| Control::Detach(vm_id, done, false), "release", vm_id);
    }

    /// Removes a VM that migrated to another daemon: its peers' QPs keep their work and reach
    /// it where it went (over RoCEv2), as a VM's peers reach it after it moved on hardware.
    pub fn detach_moved(&self, vm_id: u64) {
        self.request(|done| Control::Detach(vm_id, done, true), "release", vm_id);
    }

    /// Stops serving VM `vm_id` and carrying its traffic (migration). Returns once no step of
    /// the VM is under way.
    pub fn pause(&self, vm_id: u64) {
        self.request(|done| Control::Pause(vm_id, done), "pause", vm_id);
    }

    /// Sends the scheduler a request that it answers once done, and waits for the answer (at
    /// most 10 s: a scheduler that does not answer is logged, not waited for forever).
    fn request(&self, control: impl FnOnce(SyncSender<()>) -> Control, what: &str, vm_id: u64) {
        let (done_tx, done_rx) = sync_channel(1);
        if self.tx.send(control(done_tx)).is_ok() {
            self.wake();
            if done_rx.recv_timeout(Duration::from_secs(10)).is_err() {
                warn!("the scheduler did not {what} VM {vm_id} within 10 s");
            }
        }
    }

    /// Serves VM `vm_id` again (or starts serving it: a VM whose guest starts takes its network
    /// address then if this daemon does not hold it yet).
    pub fn resume(&self, vm_id: u64) {
        if self.tx.send(Control::Resume(vm_id, false)).is_ok() {
            self.wake();
        }
    }

    /// Serves VM `vm_id`, which has just arrived by live migration: as [`Scheduler::resume`],
    /// and its QPs tell their peers (`Fabric::announce`).
    pub fn resume_arrived(&self, vm_id: u64) {
        if self.tx.send(Control::Resume(vm_id, true)).is_ok() {
            self.wake();
        }
    }

    /// Tells the scheduler there is work.
    pub fn wake(&self) {
        self.bell.ring();
    }
}

/// One VM as the scheduler serves it.
struct Entry {
    vm: Arc<Vm>,
    doorbells: Arc<dyn Doorbells>,
    /// Deficit-round-robin credit in each priority class's pass, in bytes (a VM's QPs may be
    /// in its class and the ones below: see `config::SlClasses`).
    deficit: [i64; CLASSES],
    /// Rate limits.
    buckets: Buckets,
    /// The `Share::caps_generation` the buckets were made for: another means an operator
    /// changed the caps.
    caps_generation: u64,
    /// Per class, since when the VM has had work waiting in it while others were served.
    waiting_since: [Option<Instant>; CLASSES],
    /// Whether its doorbell queues are polled (its driver told not to kick).
    polled: bool,
    /// When it last had work.
    last_work: Instant,
    /// Its traffic is paused (migration).
    paused: bool,
    /// Its priority class, as of the current round: its QPs are in it or below it.
    class: PriorityClass,
    /// Per class, its last step there could not move (the peer's objects were busy, or its
    /// own): until one moves, its work in that class does not hold a lower class back.
    stalled: [bool; CLASSES],
    /// The `Share::classes_generation` its ready lists were grouped for: another means an
    /// operator changed its class or its service levels' (`Vm::regroup`).
    classes_generation: u64,
    /// Its kicks in a row that brought no doorbell.
    empty_kicks: u32,
    /// Its kicks in a row that brought doorbells, while it has strikes.
    good_kicks: u32,
    /// Times its kicks were muted since it last kicked `KICK_STORM` times in a row with
    /// doorbells, or went `STRIKES_FORGOTTEN` without a mute (at most `MAX_KICK_STRIKES`):
    /// each halves its threshold.
    kick_strikes: u8,
    /// When its kicks were last muted.
    last_mute: Option<Instant>,
    /// Its kicks were unmuted and not reported since: the first report is the kick fd's
    /// readiness, not a kick.
    rewatched: bool,
    /// Its kicks are muted: its queues are looked at every `MUTED_LOOK` instead.
    muted: bool,
}

impl Entry {
    /// Whether it is of a class above `class` and may be served (not paused): the VMs whose
    /// work cuts a `class` turn short.
    fn outranks(&self, class: PriorityClass) -> bool {
        self.class < class && !self.paused
    }

    /// Whether it has work queued in a class above `class` that can move (its last step there
    /// was not stalled), whatever its rate limit says.
    fn movable_above(&self, class: PriorityClass) -> bool {
        PriorityClass::ALL[..class.index()]
            .iter()
            .any(|above| !self.stalled[above.index()] && self.vm.has_work_in(*above))
    }

    /// Whether its rate limit holds it back now.
    fn held_by_limit(&self) -> bool {
        self.buckets.limited() && self.buckets.wait().is_some()
    }
}

/// The QPs of VM `vm` connected to a VM that went away, to fail once `vm`'s objects can be
/// taken.
#[derive(Debug, Clone, Copy)]
struct PeerFailure {
    vm: u64,
    gone_gid: Gid,
    gone_id: u64,
}

/// The scheduler thread's state.
struct Turns {
    rx: Receiver<Control>,
    entries: Vec<Entry>,
    /// When the earliest rate-limited VM may move again.
    rate_wake: Option<Instant>,
    /// Work was skipped because a VM's lock was busy; nobody will unpark the scheduler when it
    /// frees, so look again soon.
    retry_soon: bool,
    /// Per priority class, where its pass stopped (the fabric filled up, or a higher class
    /// had work): the VM its next pass resumes at, and whether that VM was mid-turn (it then
    /// gets no new quantum) or had not begun it.
    resume: [Option<(u64, bool)>; CLASSES],
    /// The fabric filled up during the last round (`Step::Full`): it unparks the scheduler
    /// when it has room again.
    fabric_full: bool,
    /// Doorbells were taken in the middle of this round (between steps, or a kick looked for
    /// while busy): their work may be on a list this round has passed, so the next round is
    /// due at once; said "nothing moved", the loop would stop polling and sleep with it.
    taken_in_round: bool,
    /// The VMs' indices in the order of the current round, each with the class of the pass
    /// that serves it: a VM comes once in its class's pass and once in each pass below, for
    /// its QPs there (capacity for every VM in every class).
    order: Vec<(usize, PriorityClass)>,
    /// Per priority class, what it is owed of its minimum share, in deficit units (negative:
    /// what it took beyond it, while the classes above had work).
    owed: [i64; CLASSES],
    /// The class served first in the current round to give it its share, if any.
    guaranteed: Option<PriorityClass>,
    /// The highest class of the VMs served, as of the last round's look at their classes.
    highest: PriorityClass,
    /// How fast steps move bytes, measured on the steps that are sized by time.
    copy_rate: CopyRate,
    /// How long a step of a VM below a higher class may last (`--step-time-us`), if bounded.
    step_time: Option<Duration>,
    timers: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    error_qps: Vec<(u64, u32)>,
    last_flush: Instant,
    /// Peers of departed VMs still to fail, their VMs' objects having been busy.
    peer_failures: Vec<PeerFailure>,
    /// VMs that arrived by migration and still have to tell their peers, their objects having
    /// been busy.
    arrivals: Vec<u64>,
    /// How long to keep polling a VM after its last work (adaptive).
    poll_window: Duration,
    /// VMs being polled.
    polled: usize,
    /// Passes that polled doorbells (which of them also look at the lower classes').
    poll_passes: u32,
    /// VMs the last round served, by index, once for each class's pass that served them
    /// (capacity for every VM in every class, so no allocation).
    served: Vec<usize>,
    fabric: Box<dyn Fabric>,
    /// What the loop has done, for metrics.
    stats: Arc<SchedulerStats>,
    /// What the loop sleeps on: rings, and the kicks of VMs not polled.
    sleeper: Sleeper,
    /// The kick tokens a sleep or a look reported (capacity kept, so no allocation).
    kicked: Vec<u64>,
    /// When the loop, awake, last looked for kicks.
    kicks_seen_at: Instant,
    /// A clock reading from a moment ago, with only bookkeeping since (the pass's start or
    /// the last timed step's end), for the reads a step below a higher class needs: its start,
    /// and the looks for that class's work around it. `None` once something that takes time
    /// (a look for kicks, an untimed step) came between; see `Turns::clock`.
    recent: Option<Instant>,
    /// The most quanta a VM alone with work takes without a round after its first:
    /// `ALONE_EXTRA_QUANTA`, or 0 in unit tests that count a round's steps.
    alone_extra_quanta: u32,
    /// VMs whose kicks are muted.
    muted: usize,
    /// When their queues are looked at next.
    muted_look_at: Instant,
}

impl Turns {
    fn new(rx: Receiver<Control>, mut fabric: Box<dyn Fabric>, sleeper: Sleeper) -> Self {
        fabric.set_bell(sleeper.bell().clone());
        Turns {
            rx,
            entries: Vec::new(),
            rate_wake: None,
            retry_soon: false,
            resume: [None; CLASSES],
            fabric_full: false,
            taken_in_round: false,
            order: Vec::new(),
            owed: [0; CLASSES],
            guaranteed: None,
            highest: PriorityClass::Normal,
            copy_rate: CopyRate::default(),
            step_time: None,
            timers: BinaryHeap::with_capacity(4096),
            error_qps: Vec::with_capacity(256),
            last_flush: Instant::now(),
            peer_failures: Vec::new(),
            arrivals: Vec::new(),
            poll_window: Duration::ZERO,
            polled: 0,
            poll_passes: 0,
            served: Vec::new(),
            fabric,
            stats: Arc::default(),
            sleeper,
            kicked: Vec::with_capacity(64),
            kicks_seen_at: Instant::now(),
            recent: None,
            alone_extra_quanta: ALONE_EXTRA_QUANTA,
            muted: 0,
            muted_look_at: Instant::now(),
        }
    }

    fn run(mut self) {
        loop {
            // Read before looking for work: a ring after this keeps the sleep below from
            // sleeping, as an unpark before a park would.
            let generation = self.sleeper.bell().generation();
            self.stats.passes.fetch_add(1, Ordering::Relaxed);
            loop {
                match self.rx.try_recv() {
                    Ok(c) => self.control(c),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                }
            }
            self.fire_timers();
            if !self.peer_failures.is_empty() {
                self.fail_pending_peers();
            }
            if !self.arrivals.is_empty() {
                self.announce_arrivals();
            }
            if !self.error_qps.is_empty() && self.last_flush.elapsed() >= FLUSH_TICK {
                self.flush_error_qps();
            }
            // Kicks wake the loop when it sleeps; awake, it looks for them every KICK_LOOK, here
            // and between the steps of a lower class (`higher_class_waiting`), so a VM that
            // kicks while the others keep it busy waits for a step or a round at most.
            // The pass's one clock reading, which the round's first timed step starts from.
            let now = Instant::now();
            self.recent = Some(now);
            if self.kick_look_due(now) {
                self.look_for_kicks();
            }
            if self.muted > 0 {
                self.look_at_muted();
            }
            // While kicks are off, doorbells are only seen here: look on every pass, busy or
            // not, so a VM never waits behind a neighbour's backlog for more than a chunk (a
            // load per queue while the watched indices say nothing came).
            let polled = self.polled > 0 && self.poll_doorbells();
            if self.round() {
                self.stats.busy_rounds.fetch_add(1, Ordering::Relaxed);
                if !self.poll_window.is_zero() {
                    let now = Instant::now();
                    for k in 0..self.served.len() {
                        let i = self.served[k];
                        self.entries[i].last_work = now;
                        if !self.entries[i].polled {
                            self.set_polling(i, true);
                        }
                    }
                }
                continue;
            }
            if self.polled > 0 {
                if polled {
                    continue;
                }
                if self.expire_polling() {
                    // Posted while kicks were off: no kick will announce them.
                    continue;
                }
                if self.polled > 0 {
                    // Polling must not keep a guest's own thread off a shared core.
                    std::thread::yield_now();
                    continue;
                }
            }
            let now = Instant::now();
            self.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            self.sleep(generation, self.sleep_for(now));
            if self
                .entries
                .iter()
                .any(|e| e.vm.has_work.load(Ordering::Relaxed))
            {
                self.adapt_polling(now.elapsed());
            }
        }
    }

    /// How long the scheduler may sleep when nothing is runnable: until the next timer, flush
    /// tick, rate-limit refill or retry of busy work, or 100 ms.
    fn sleep_for(&self, now: Instant) -> Duration {
        let mut sleep = Duration::from_millis(100);
        if let Some(Reverse((at, _, _))) = self.timers.peek() {
            sleep = sleep.min(at.saturating_duration_since(now));
        }
        if !self.error_qps.is_empty() {
            sleep = sleep.min(FLUSH_TICK);
        }
        if let Some(at) = self.rate_wake {
            sleep = sleep.min(at.saturating_duration_since(now));
        }
        if self.retry_soon || !self.peer_failures.is_empty() || !self.arrivals.is_empty() {
            sleep = sleep.min(RETRY_BUSY);
        }
        // The fabric unparks the scheduler when it has room again; look anyway now and then,
        // so that a wake-up lost to a race costs a millisecond, not the VM's traffic.
        if self.fabric_full {
            sleep = sleep.min(FLUSH_TICK);
        }
        if self.muted > 0 {
            sleep = sleep.min(self.muted_look_at.saturating_duration_since(now));
        }
        sleep
    }

    /// Sleeps for at most `timeout`, unless the bell rang since `generation`, and takes the
    /// doorbells of the VMs whose kicks ended it.
    fn sleep(&mut self, generation: u64, timeout: Duration) {
        let mut kicked = std::mem::take(&mut self.kicked);
        match self
            .sleeper
            .sleep(generation, timeout, |token| kicked.push(token))
        {
            // The wait reported every kick since the last look. (Without a wait, a ring kept
            // it from sleeping: the looks every KICK_LOOK go on, however often rings come.)
            Ok(true) => self.kicks_seen_at = Instant::now(),
            Ok(false) => {}
            Err(e) => {
                // Never seen: epoll_wait fails only for a bad descriptor or buffer. Wait as
                // parking would, so a broken bell does not spin the loop.
                warn!("the scheduler cannot wait on its bell: {e}");
                std::thread::sleep(timeout.min(Duration::from_millis(1)));
            }
        }
        self.take_kicked(&mut kicked, false);
        self.kicked = kicked;
    }

    /// Takes the doorbells of the VMs that kicked since the last look or sleep.
    fn look_for_kicks(&mut self) {
        self.kicks_seen_at = Instant::now();
        // A system call: a reading from before it is not recent any more.
        self.recent = None;
        if !self.sleeper.bell().watching() {
            return;
        }
        let mut kicked = std::mem::take(&mut self.kicked);
        if let Err(e) = self.sleeper.look(|token| kicked.push(token)) {
            warn!("the scheduler cannot look for kicks: {e}");
        }
        self.take_kicked(&mut kicked, true);
        self.kicked = kicked;
    }

    /// Takes the doorbells of the VMs in `kicked`; `busy`: the loop found the kicks while it
    /// had work, not by waking. A VM whose kick brought doorbells while the loop was busy is
    /// polled from then on, until the loop runs out of work: its kicks are otherwise seen
    /// once per `KICK_LOOK` (20 µs) of someone else's work, and the polling window, which
    /// adapts only when the loop sleeps, never starts while a bulk VM keeps it busy (a latency
    /// VM that started next to one then paid those 20 µs for every message).
    fn take_kicked(&mut self, kicked: &mut Vec<u64>, busy: bool) {
        // One look takes every queue of a VM: its tokens count as one kick, so that a VM with
        // many queues is not taken for one kicking for nothing.
        kicked.sort_unstable();
        let mut last_vm = None;
        for token in kicked.drain(..) {
            let vm_id = token >> KICK_TOKEN_QUEUE_BITS;
            if last_vm.replace(vm_id) == Some(vm_id) {
                continue;
            }
            // A VM not attached yet has its doorbells taken when it is; one detached has none.
            if let Some(i) = self.position(vm_id) {
                let found = self.entries[i].doorbells.take_kicked();
                self.count_kick(i, found);
                if busy && found {
                    self.taken_in_round = true;
                    if !self.entries[i].polled {
                        self.set_polling(i, true);
                    }
                }
            }
        }
    }

    /// Counts a kick of VM `i` that brought doorbells (`found`) or none: `KICK_STORM` in a row
    /// with none (fewer after strikes) mute its kicks; one with doorbells unmutes them.
    fn count_kick(&mut self, i: usize, found: bool) {
        let e = &mut self.entries[i];
        let rewatched = std::mem::take(&mut e.rewatched);
        if found {
            e.empty_kicks = 0;
            if e.kick_strikes > 0 {
                e.good_kicks += 1;
                if e.good_kicks >= KICK_STORM {
                    e.kick_strikes = 0;
                    e.good_kicks = 0;
                }
            }
            if e.muted {
                self.set_muted(i, false);
            }
            return;
        }
        if rewatched || e.polled {
            return;
        }
        e.good_kicks = 0;
        e.empty_kicks = e.empty_kicks.saturating_add(1);
        if e.empty_kicks >= KICK_STORM >> e.kick_strikes {
            self.set_muted(i, true);
        }
    }

    /// Mutes VM `i`'s kicks, its queues then looked at every `MUTED_LOOK`, or unmutes them.
    fn set_muted(&mut self, i: usize, muted: bool) {
        let e = &mut self.entries[i];
        if e.muted == muted {
            return;
        }
        e.muted = muted;
        e.empty_kicks = 0;
        e.doorbells.mute_kicks(muted);
        if muted {
            let now = Instant::now();
            if e.last_mute
                .is_some_and(|at| now.duration_since(at) >= STRIKES_FORGOTTEN)
            {
                e.kick_strikes = 0;
            }
            e.last_mute = Some(now);
            e.kick_strikes = (e.kick_strikes + 1).min(MAX_KICK_STRIKES);
            if self.muted == 0 {
                self.muted_look_at = now + MUTED_LOOK;
            }
            self.muted += 1;
            self.stats.kick_mutes.fetch_add(1, Ordering::Relaxed);
            debug!(
                "vm {}: its kicks brought no doorbell (mute {} in a row); its doorbell queues \
                 are looked at every {MUTED_LOOK:?} until it rings one",
                e.vm.name, e.kick_strikes
            );
        } else {
            e.rewatched = true;
            self.muted -= 1;
        }
        self.stats
            .muted_vms
            .store(self.muted as u64, Ordering::Relaxed);
    }

    /// Takes the doorbells of the VMs whose kicks are muted, once a `MUTED_LOOK`: a VM that
    /// has rung one gets its kicks back.
    fn look_at_muted(&mut self) {
        let now = Instant::now();
        if now < self.muted_look_at {
            return;
        }
        self.muted_look_at = now + MUTED_LOOK;
        // Counted as polled: the scheduler found them by looking, no kick told it.
        for i in 0..self.entries.len() {
            if self.entries[i].muted && self.entries[i].doorbells.take() {
                self.set_muted(i, false);
            }
        }
    }

    /// Grows or shrinks the polling window after a sleep that a guest's doorbell ended.
    fn adapt_polling(&mut self, slept: Duration) {
        let w = &mut self.poll_window;
        if slept <= POLL_MAX {
            *w = (*w * 2).clamp(POLL_START, POLL_MAX);
        } else {
            *w /= 2;
            if *w < POLL_START {
                *w = Duration::ZERO;
            }
        }
        let ns = u64::try_from(w.as_nanos()).unwrap_or(u64::MAX);
        self.stats.poll_window_ns.store(ns, Ordering::Relaxed);
    }

    /// Takes doorbells straight from the doorbell queues of the VMs being polled. Returns
    /// whether any came. Below the highest class present, a VM's queues are looked at only
    /// every [`LOWER_CLASS_POLL_EVERY`] passes: looking costs the scheduler a fraction of a
    /// microsecond per VM, which a busy latency class would otherwise pay for every bulk VM
    /// on every pass, and a lower class's new work waits for the higher one's anyway. On the
    /// other passes, the highest class's queues are taken only if their watched available
    /// indices moved ([`Doorbells::worth_taking`]), a load per queue.
    fn poll_doorbells(&mut self) -> bool {
        self.poll_passes = self.poll_passes.wrapping_add(1);
        let everyone = self.poll_passes % LOWER_CLASS_POLL_EVERY == 0;
        let mut any = false;
        for e in self.entries.iter().filter(|e| e.polled) {
            // Every few passes each polled VM's queues are taken whatever their watched
            // indices say, so a watch gone stale (a ring moved without the device being told)
            // costs a few passes, not the VM's traffic.
            if everyone || (e.class == self.highest && e.doorbells.worth_taking()) {
                any |= e.doorbells.take();
            }
        }
        any
    }

    /// Stops polling the VMs that have had no work for the window: their drivers kick again.
    /// Returns whether doorbells came while kicks were off (they are taken now; nobody would
    /// announce them).
    fn expire_polling(&mut self) -> bool {
        let now = Instant::now();
        let mut pending = false;
        for i in 0..self.entries.len() {
            let e = &self.entries[i];
            if e.polled && now.duration_since(e.last_work) >= self.poll_window {
                pending |= self.set_polling(i, false);
            }
        }
        pending
    }

    /// Tells VM `i`'s driver to stop kicking while the scheduler polls it (`on`), or to kick
    /// again. Returns whether doorbells arrived while kicks were off, which it takes.
    fn set_polling(&mut self, i: usize, on: bool) -> bool {
        let e = &mut self.entries[i];
        if e.polled == on {
            return false;
        }
        e.polled = on;
        if on && e.muted {
            // It works: its doorbells are polled now, and when polling ends its kicks count.
            self.set_muted(i, false);
        }
        let e = &mut self.entries[i];
        if on {
            self.polled += 1;
        } else {
            self.polled -= 1;
        }
        self.stats
            .polled_vms
            .store(self.polled as u64, Ordering::Relaxed);
        e.doorbells.set_kicks(!on) && e.doorbells.take()
    }

    fn position(&self, vm_id: u64) -> Option<usize> {
        self.entries.iter().position(|e| e.vm.id == vm_id)
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Attach(vm, doorbells) => {
                info!("vm {}: attached to the fabric as {}", vm.name, vm.gid);
                // Kicks that came before are not reported again.
                doorbells.take_kicked();
                self.fabric.attach(&vm);
                self.served.reserve(CLASSES * (self.entries.len() + 1));
                self.order.reserve(CLASSES * (self.entries.len() + 1));
                self.entries.push(Entry {
                    buckets: {
                        let (max_bw, max_msg_rate) = vm.share.caps();
                        Buckets::new(max_bw, max_msg_rate)
                    },
                    caps_generation: vm.share.caps_generation(),
                    // Read before the class: a change between the two is seen next round.
                    classes_generation: vm.share.classes_generation(),
                    class: vm.share.class(),
                    vm,
                    doorbells,
                    deficit: [0; CLASSES],
                    waiting_since: [None; CLASSES],
                    polled: false,
                    last_work: Instant::now(),
                    paused: false,
                    stalled: [false; CLASSES],
                    empty_kicks: 0,
                    good_kicks: 0,
                    kick_strikes: 0,
                    last_mute: None,
                    rewatched: false,
                    muted: false,
                });
            }
            Control::Detach(id, done, moved) => {
                if let Some(i) = self.position(id) {
                    let e = self.entries.remove(i);
                    if e.muted {
                        self.muted -= 1;
                        self.stats
                            .muted_vms
                            .store(self.muted as u64, Ordering::Relaxed);
                    }
                    if e.polled {
                        self.polled -= 1;
                        self.stats
                            .polled_vms
                            .store(self.polled as u64, Ordering::Relaxed);
                    }
                    self.fabric.detach(&e.vm);
                    if moved {
                        self.fabric.moved_away(&e.vm);
                    }
                    self.error_qps.retain(|&(p, _)| p != id);
                    self.peer_failures.retain(|f| f.vm != id);
                    if moved {
                        info!("vm {}: moved to another daemon; detached", e.vm.name);
                    } else {
                        self.fail_peers_of(&e.vm);
                        info!("vm {}: detached from the fabric", e.vm.name);
                    }
                }
                let _ = done.send(());
            }
            Control::Pause(id, done) => {
                if let Some(i) = self.position(id) {
                    self.entries[i].paused = true;
                    self.entries[i].deficit = [0; CLASSES];
                    self.fabric.pause(id);
                    info!("vm {}: paused", self.entries[i].vm.name);
                }
                let _ = done.send(());
            }
            Control::Resume(id, arrived) => {
                if let Some(i) = self.position(id) {
                    if std::mem::take(&mut self.entries[i].paused) {
                        info!("vm {}: resumed", self.entries[i].vm.name);
                    }
                    self.fabric.resume(id);
                    if arrived {
                        self.arrivals.push(id);
                    }
                }
            }
        }
    }

    /// Moves every RC QP connected to `gone` that has send work outstanding to the error state,
    /// completing its work request in progress with RETRY_EXC_ERR and flushing the rest, as a
    /// requester whose partner vanished ends up on hardware once its retries run out. A QP with
    /// nothing to send is left alone, as on hardware, where it would not notice until its next
    /// send: failing it at once would flush the receives of a guest that had just finished its
    /// exchange with the peer and was still polling. A VM whose objects are busy is done later.
    fn fail_peers_of(&mut self, gone: &Vm) {
        for e in &self.entries {
            self.peer_failures.push(PeerFailure {
                vm: e.vm.id,
                gone_gid: gone.gid,
                gone_id: gone.id,
            });
        }
        self.fail_pending_peers();
    }

    /// Lets each VM that arrived by migration tell its peers, once its objects are free.
    fn announce_arrivals(&mut self) {
        let mut k = 0;
        while k < self.arrivals.len() {
            let Some(i) = self.position(self.arrivals[k]) else {
                self.arrivals.swap_remove(k);
                continue;
            };
            let vm = self.entries[i].vm.clone();
            let Some(mut objects) = vm.try_lock() else {
                k += 1;
                continue;
            };
            self.arrivals.swap_remove(k);
            let rewound = self.fabric.announce(&vm, &mut objects);
            drop(objects);
            for qpn in rewound {
                vm.enqueue(qpn);
            }
        }
    }

    /// Fails the peers of departed VMs in every VM whose objects are free now.
    fn fail_pending_peers(&mut self) {
        let mut k = 0;
        while k < self.peer_failures.len() {
            let f = self.peer_failures[k];
            let Some(i) = self.position(f.vm) else {
                self.peer_failures.swap_remove(k);
                continue;
            };
            let vm = self.entries[i].vm.clone();
            let Some(mut objects) = vm.try_lock() else {
                k += 1;
                continue;
            };
            self.peer_failures.swap_remove(k);
            let mem = vm.mem.memory();
            // A detach is control path: collecting the QPs is fine here.
            let peers: Vec<u32> = objects
                .qps
                .iter()
                .filter(|(_, qp)| {
                    qp.qp_type() == qp::Type::Rc
                        && qp.attr.ah_attr.dgid == f.gone_gid
                        && qp.responds()
                        && (qp.rt.inflight.active
                            || load_producer(&mem, qp.sq_ring_addr)
                                .is_some_and(|p| p != qp.rt.sq_head))
                })
                .map(|(qpn, _)| qpn)
                .collect();
            for qpn in peers {
                if let Some(qp) = objects.qps.get_mut(qpn) {
                    if qp.rt.rx_owner.is_some_and(|(p, _, _)| p == f.gone_id) {
                        qp.rt.rx_owner = None;
                    }
                }
                fail_wr(
                    &mut objects,
                    &vm,
                    &mem,
                    qpn,
                    Status::RetryExcErr,
                    VendorErr::PeerUnreachable,
                );
                self.watch_error(vm.id, qpn);
            }
            drop(objects);
            vm.deliver_events();
        }
    }

    /// Puts a QP on the list revisited every `FLUSH_TICK`, once: a guest ringing doorbells on
    /// a QP in ERR must not grow the scheduler's work.
    fn watch_error(&mut self, vm_id: u64, qpn: u32) {
        if !self.error_qps.contains(&(vm_id, qpn)) {
            self.error_qps.push((vm_id, qpn));
        }
    }

    /// Hands the QPs whose timers are due back to their VMs' ready lists; the step finds what
    /// is due. Takes no VM's lock.
    fn fire_timers(&mut self) {
        if self.timers.is_empty() {
            return;
        }
        let now = Instant::now();
        while let Some(Reverse((at, vm_id, qpn))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(i) = self.position(vm_id) {
                self.entries[i].vm.enqueue(qpn);
            }
        }
    }

    fn flush_error_qps(&mut self) {
        self.last_flush = Instant::now();
        let mut k = 0;
        while k < self.error_qps.len() {
            let (vm_id, qpn) = self.error_qps[k];
            let Some(i) = self.position(vm_id) else {
                self.error_qps.swap_remove(k);
                continue;
            };
            let e = &self.entries[i];
            if e.paused {
                k += 1;
                continue;
            }
            let vm = e.vm.clone();
            let Some(mut objects) = vm.try_lock() else {
                k += 1;
                continue;
            };
            let mem = vm.mem.memory();
            let keep = match objects.qps.get(qpn).map(|q| q.state()) {
                Some(qp::State::Err) => {
                    flush(&mut objects, &vm, &mem, qpn, true, true);
                    true
                }
                Some(qp::State::Sqe) => {
                    flush(&mut objects, &vm, &mem, qpn, true, false);
                    true
                }
                _ => false,
            };
            drop(objects);
            vm.deliver_events();
            if keep {
                k += 1;
            } else {
                self.error_qps.swap_remove(k);
            }
        }
    }

    /// One round over the VMs with work: the priority classes in order (a class owed its
    /// minimum share first), deficit round robin within each. Returns whether anything moved,
    /// a VM with work waits only for its deficit to be paid off, or a higher class's work cut
    /// a turn short (so the next round is due now).
    fn round(&mut self) -> bool {
        let mut any = false;
        let mut owing = false;
        self.served.clear();
        // Read the clock only for rate-limited VMs: most rounds have none.
        let mut clock: Option<Instant> = None;
        self.rate_wake = None;
        self.retry_soon = false;
        self.fabric_full = false;
        self.taken_in_round = false;
        let guaranteed = self.order_by_class();
        self.guaranteed = guaranteed;
        let highest = self.highest;
        let mut cost_by_class = [0u64; CLASSES];
        let mut preempted = false;
        let mut pos = 0;
        'round: while pos < self.order.len() {
            let class = self.order[pos].1;
            let c = class.index();
            let mut end = pos;
            while end < self.order.len() && self.order[end].1 == class {
                end += 1;
            }
            // Whether this class's turns may be cut short for a higher class: not at the top,
            // nor while it takes the share it is owed (once it has, it may again).
            let mut preemptible = guaranteed != Some(class) && class > highest;
            // A class served first for its share becomes preemptible once it has taken it.
            let paying_off = guaranteed == Some(class) && class > highest;
            let owed = self.owed[class.index()];
            // Strict priority: a class waits while one above it still has work (it has had
            // its pass in this round). Where its pass stopped is kept for when it gets one.
            // The next round is due at once even if nothing moved in this one: the check may
            // have just taken that work from a polled VM's doorbells, and a round that said
            // "nothing moved" would let the loop stop polling and sleep with it waiting.
            if preemptible && self.higher_class_waiting(class) {
                preempted = true;
                break 'round;
            }
            // A class's pass cut short (a higher class's work, or a full fabric) goes on where
            // it stopped: the VMs before that one have had their turn in it, and that one
            // keeps what is left of its quantum if it was mid-turn.
            let resumed = self.resume[class.index()]
                .take()
                .and_then(|(id, mid_turn)| {
                    let p = (pos..end).find(|&p| self.entries[self.order[p].0].vm.id == id)?;
                    Some((p, mid_turn))
                });
            for p in resumed.map_or(pos, |r| r.0)..end {
                let i = self.order[p].0;
                let mid_turn = resumed == Some((p, true));
                preemptible |= paying_off && cost_by_class[class.index()] as i64 >= owed;
                // A higher class's work waits for no further turn of this class.
                if preemptible && p > pos && self.higher_class_waiting(class) {
                    self.resume[class.index()] = Some((self.entries[i].vm.id, mid_turn));
                    self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
                    preempted = true;
                    break 'round;
                }
                let e = &mut self.entries[i];
                if e.paused {
                    continue;
                }
                if !e.vm.has_work_in(class) {
                    e.deficit[c] = 0;
                    e.stalled[c] = false;
                    if !e.vm.has_work.load(Ordering::Acquire) {
                        e.stalled = [false; CLASSES];
                        // Idle: what it earns from here on is a burst, bounded as such.
                        e.buckets.unhold();
                    }
                    self.account_wait(i, class, false);
                    continue;
                }
                let generation = e.vm.share.caps_generation();
                if generation != e.caps_generation {
                    let (max_bw, max_msg_rate) = e.vm.share.caps();
                    e.buckets.set_caps(max_bw, max_msg_rate);
                    e.caps_generation = generation;
                }
                let limited = e.buckets.limited();
                if limited {
                    let now = *clock.get_or_insert_with(Instant::now);
                    e.buckets.refill(now);
                    if let Some(wait) = e.buckets.wait() {
                        // Over its limit: not its turn, and no deficit saved up for later.
                        e.deficit[c] = 0;
                        e.buckets.hold();
                        let at = now + wait;
                        self.rate_wake = Some(self.rate_wake.map_or(at, |w| w.min(at)));
                        continue;
                    }
                }
                if !mid_turn {
                    e.deficit[c] += i64::from(QUANTUM) * i64::from(e.vm.share.weight());
                }
                // Still paying for a work request larger than its quantum (a NIC fabric posts
                // a whole request in one step): its turn is skipped, and the next round must
                // come at once, not after a sleep, or a 4 MiB request would cost a sleep per
                // 64 KiB.
                if e.deficit[c] <= 0 {
                    owing = true;
                }
                let vm = e.vm.clone();
                let mut served = false;
                let mut extra_quanta = 0;
                while self.entries[i].deficit[c] > 0 {
                    let e = &mut self.entries[i];
                    if limited && e.buckets.wait().is_some() {
                        e.buckets.hold();
                        break;
                    }
                    let Some(queued) = vm.pop_ready_in(class) else {
                        e.deficit[c] = 0;
                        break;
                    };
                    let mut budget = u32::try_from(e.deficit[c])
                        .unwrap_or(u32::MAX)
                        .clamp(1, e.buckets.byte_budget());
                    // Below a higher class, with `--step-time-us`, a step lasts about that
                    // long: that class's next message waits behind no more of this VM's
                    // copying, however slow the host's memory.
                    if let Some(time) = self.step_time.filter(|_| preemptible) {
                        budget = budget.min(self.copy_rate.bytes_in(time, MIN_TIMED_STEP));
                    }
                    // Below a higher class, a step's copy is asked every microsecond or so
                    // whether that class's work arrived, and ends early if it did; the copy
                    // rate that sizes those pieces is measured on these steps.
                    let cut_every = (preemptible && self.cut_can_find_work(class))
                        .then(|| self.copy_rate.bytes_in(CUT_EVERY, MIN_CUT));
                    let timed = if preemptible {
                        Some(self.clock())
                    } else {
                        // Its copying makes any earlier reading stale.
                        self.recent = None;
                        None
                    };
                    let Some((qpn, outcome)) = self.step(&vm, queued, class, budget, cut_every)
                    else {
                        // The VM's control path holds its objects; its turn waits, its
                        // deficit stays.
                        vm.enqueue_in(queued, class);
                        self.retry_soon = true;
                        self.entries[i].stalled[c] = true;
                        break;
                    };
                    // The step's end, read once: the copy rate, the look for a higher class's
                    // work below and the next step's start all take it.
                    if let Some(t0) = timed {
                        let now = Instant::now();
                        self.copy_rate.observe(outcome.bytes, now - t0);
                        self.recent = Some(now);
                    }
                    let e = &mut self.entries[i];
                    if limited {
                        e.buckets
                            .charge(u64::from(outcome.bytes), u64::from(outcome.wrs));
                    }
                    if outcome.bytes > 0 {
                        vm.counters
                            .bytes
                            .fetch_add(u64::from(outcome.bytes), Ordering::Relaxed);
                        vm.counters.bytes_by_class[c]
                            .fetch_add(u64::from(outcome.bytes), Ordering::Relaxed);
                    }
                    if let Some(at) = outcome.timer {
                        self.timers.push(Reverse((at, vm.id, qpn)));
                    }
                    match outcome.step {
                        Step::Idle => {
                            // It found nothing, but took the scheduler's time: its turn and its
                            // class pay for it, and the classes below earn their share of it.
                            let e = &mut self.entries[i];
                            e.stalled[c] = false;
                            e.deficit[c] -= i64::from(IDLE_STEP_COST);
                            cost_by_class[c] += u64::from(IDLE_STEP_COST);
                            // A turn that idle steps end (a list of mostly idle QPs, as after
                            // a drain or a restore wakes them all) leaves the rest for the next
                            // round, which must come at once: nothing moved, and the loop
                            // would otherwise sleep with them queued.
                            if e.deficit[c] <= 0 {
                                owing = true;
                            }
                        }
                        Step::Progress { cost, more } => {
                            self.entries[i].stalled[c] = false;
                            self.entries[i].deficit[c] -= i64::from(cost);
                            cost_by_class[c] += u64::from(cost);
                            served = true;
                            any = true;
                            if more {
                                vm.enqueue_in(qpn, class);
                            }
                        }
                        Step::Blocked => {
                            vm.enqueue_in(qpn, class);
                            self.retry_soon = true;
                            self.entries[i].stalled[c] = true;
                            break;
                        }
                        Step::Full => {
                            vm.enqueue_in(qpn, class);
                            self.resume[class.index()] = Some((vm.id, true));
                            self.fabric_full = true;
                            break;
                        }
                    }
                    preemptible |= paying_off && cost_by_class[class.index()] as i64 >= owed;
                    if preemptible
                        && self.entries[i].deficit[c] > 0
                        && self.higher_class_waiting(class)
                    {
                        self.resume[class.index()] = Some((vm.id, true));
                        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
                        preempted = true;
                        break;
                    }
                    // Its quantum spent, a VM with nobody else's work waiting takes another at
                    // once: a round for every 64 KiB step cost a VM alone about a tenth of its
                    // throughput. Another VM's work is seen at the same points as by a round
                    // (after the step; kicks every KICK_LOOK), so it waits no longer.
                    if self.entries[i].deficit[c] <= 0
                        && extra_quanta < self.alone_extra_quanta
                        && !limited
                        && matches!(outcome.step, Step::Progress { more: true, .. })
                        && self.alone_with_work(i, class)
                    {
                        extra_quanta += 1;
                        self.stats.alone_quanta.fetch_add(1, Ordering::Relaxed);
                        self.entries[i].deficit[c] +=
                            i64::from(QUANTUM) * i64::from(vm.share.weight());
                    }
                }
                self.account_wait(i, class, !served);
                if served {
                    self.served.push(i);
                }
                if self.fabric_full || preempted {
                    break 'round;
                }
            }
            pos = end;
        }
        self.settle_shares(&cost_by_class);
        any || owing || preempted || self.taken_in_round
    }

    /// Puts the VMs' indices in `order`, class by class, highest first; a class owed its
    /// minimum share comes before the rest, and is returned. Refreshes each entry's class
    /// (an operator may have changed it).
    fn order_by_class(&mut self) -> Option<PriorityClass> {
        for e in &mut self.entries {
            let generation = e.vm.share.classes_generation();
            if generation != e.classes_generation {
                // An operator changed its class or its service levels': its turns in the old
                // classes' passes are over, and what is queued goes on from its class's list.
                e.classes_generation = generation;
                e.deficit = [0; CLASSES];
                e.stalled = [false; CLASSES];
                e.class = e.vm.share.class();
                e.vm.regroup();
            }
        }
        self.highest = self
            .entries
            .iter()
            .map(|e| e.class)
            .min()
            .unwrap_or(PriorityClass::Normal);
        let guaranteed = PriorityClass::ALL
            .into_iter()
            .filter(|c| self.owed[c.index()] >= i64::from(QUANTUM))
            .max_by_key(|c| self.owed[c.index()]);
        self.order.clear();
        for class in guaranteed.into_iter().chain(
            PriorityClass::ALL
                .into_iter()
                .filter(|&c| Some(c) != guaranteed),
        ) {
            // A VM takes part in its own class's pass, and in another's while it has something
            // there: its QPs on service levels that put them below its class, work queued
            // above it before an operator lowered its class (that pass moves it down), or a
            // turn or a wait to close. Few VMs have QPs below their class, and each visit
            // costs the round a little, which a VM alone with 64 KiB turns would feel.
            for (i, e) in self.entries.iter().enumerate() {
                let c = class.index();
                if e.class == class
                    || e.vm.has_work_in(class)
                    || e.deficit[c] != 0
                    || e.waiting_since[c].is_some()
                {
                    self.order.push((i, class));
                }
            }
        }
        guaranteed
    }

    /// Whether VM `i`, with work in `class`, may take another quantum without a round: no
    /// other VM has work (queued, or in a polled VM's doorbells), it has none in another
    /// class, and nothing else a pass does is due (a look for kicks, a timer, a flush,
    /// arrivals, muted VMs' looks, failed peers, a stalled or full fabric to retry).
    fn alone_with_work(&mut self, i: usize, class: PriorityClass) -> bool {
        if self.muted > 0
            || self.retry_soon
            || self.fabric_full
            || !self.peer_failures.is_empty()
            || !self.arrivals.is_empty()
            || !self.error_qps.is_empty()
        {
            return false;
        }
        let vm = &self.entries[i].vm;
        if PriorityClass::ALL
            .into_iter()
            .any(|other| other != class && vm.has_work_in(other))
        {
            return false;
        }
        let now = self.clock();
        if self.kick_look_due(now)
            || self
                .timers
                .peek()
                .is_some_and(|Reverse((at, _, _))| *at <= now)
        {
            return false;
        }
        let has_work = |e: &Entry| {
            e.vm.has_work.load(Ordering::Acquire) || (e.polled && e.doorbells.worth_taking())
        };
        self.entries
            .iter()
            .enumerate()
            .all(|(k, e)| k == i || e.paused || !has_work(e))
    }

    /// Whether a step below the classes above `class` could find their work by asking between
    /// the pieces of its copy: a VM of theirs is polled (its doorbells show in its rings), or
    /// the fabric's own threads give VMs work. Otherwise their work comes by a kick or a
    /// control path, which a cut does not see (kicks are looked for between steps), and the
    /// pieces would be questions without an answer, a few percent of the copy's time.
    fn cut_can_find_work(&self, class: PriorityClass) -> bool {
        self.fabric.gives_work_from_its_threads()
            || self.entries.iter().any(|e| e.outranks(class) && e.polled)
    }

    /// Whether the loop, awake at `now`, is due to look for kicks (every `KICK_LOOK`).
    fn kick_look_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.kicks_seen_at) >= KICK_LOOK
    }

    /// A recent clock reading (see `recent`), or a new one. Steps below a higher class take
    /// it for their start: what comes between the reading and the step, bookkeeping of a few
    /// tens of nanoseconds, then counts as copying, and the copy rate comes out a little low,
    /// so that pieces are a little shorter than `CUT_EVERY`, never longer. Two readings per
    /// step instead of four: on a host whose clock costs 30 ns, 2% of a 64 KiB step.
    fn clock(&mut self) -> Instant {
        *self.recent.get_or_insert_with(Instant::now)
    }

    /// Whether a VM of a class above `class` has work it may do now: its doorbells, if they
    /// are polled and their watched indices moved, are taken first, so that a latency VM's
    /// message cuts a bulk VM's turn short even while kicks are off; and kicks are looked at
    /// if it is time, so that a kick cuts it short too (nothing else takes a kick while the
    /// loop is busy). Whatever it takes makes the round's next one due (`taken_in_round`).
    /// The time comes from `clock`: usually the step's end, read already.
    fn higher_class_waiting(&mut self, class: PriorityClass) -> bool {
        let now = self.clock();
        if self.kick_look_due(now) {
            self.look_for_kicks();
        }
        let mut taken = false;
        let waiting = self.entries.iter().any(|e| {
            if !e.outranks(class) {
                return false;
            }
            if e.polled && e.doorbells.worth_taking() {
                taken |= e.doorbells.take();
            }
            e.movable_above(class) && !e.held_by_limit()
        });
        self.taken_in_round |= taken;
        waiting
    }

    /// Updates what each class below the first is owed of its minimum share after a round in
    /// which the classes moved `cost_by_class`: a class with work waiting is owed
    /// `1 / (MIN_SHARE_PARTS - 1)` of what the classes above it moved, less what it moved
    /// itself while they had work or it took its share, so that it gets `1 / MIN_SHARE_PARTS`
    /// of the fabric while they are busy (what a turn takes beyond that is paid back), and all
    /// of it while they are idle; a class without work is owed nothing.
    fn settle_shares(&mut self, cost_by_class: &[u64; CLASSES]) {
        let mut above = 0u64;
        for class in PriorityClass::ALL {
            let c = class.index();
            let waiting = self
                .entries
                .iter()
                .any(|e| e.class <= class && !e.paused && e.vm.has_work_in(class));
            let counted = above > 0 || self.guaranteed == Some(class);
            self.owed[c] = if !waiting || c == 0 {
                0
            } else if counted {
                let earned = i64::try_from(above / (MIN_SHARE_PARTS - 1)).unwrap_or(MAX_OWED);
                let took = i64::try_from(cost_by_class[c]).unwrap_or(MAX_OWED);
                (self.owed[c] + earned - took).clamp(-MAX_OWED, MAX_OWED)
            } else {
                self.owed[c]
            };
            above += cost_by_class[c];
        }
    }

    /// Starts or ends the wait of VM `i`'s work in class `class`'s pass (its waits in each
    /// class add up in its `wait_ns`).
    fn account_wait(&mut self, i: usize, class: PriorityClass, waiting: bool) {
        let e = &mut self.entries[i];
        let since = &mut e.waiting_since[class.index()];
        let waiting = waiting && e.vm.has_work_in(class);
        match (waiting, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, Some(at)) => {
                let ns = u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX);
                e.vm.counters.wait_ns.fetch_add(ns, Ordering::Relaxed);
                *since = None;
            }
            _ => {}
        }
    }

    /// Advances the QP that `queued`'s slot holds now by at most `budget` payload bytes, and
    /// returns its QPN with what the step did, or returns `None` without touching it if the
    /// VM's objects are busy. A QP that will not be looked at again (idle, or no more work)
    /// has its polling word cleared first, and if work was posted meanwhile without a
    /// doorbell, it stays in the rotation.
    ///
    /// The ready list keeps one entry per slot, and what queued it may be older than the QP
    /// there now (a destroyed QP's ACK timer, or a receive thread's late wake-up, fires after
    /// the guest created another QP in the slot and rang its doorbell): the entry stands for
    /// the slot, so that it can never hide the new QP's doorbell.
    fn step(
        &mut self,
        vm: &Arc<Vm>,
        queued: u32,
        class: PriorityClass,
        budget: u32,
        cut_every: Option<u32>,
    ) -> Option<(u32, StepOutcome)> {
        let mut objects = vm.try_lock()?;
        let Some(qpn) = objects.qps.live_in_slot(queued) else {
            return Some((queued, StepOutcome::IDLE));
        };
        // Its class may not be the one whose list it came off (its doorbell's guide was stale:
        // a new QP in the slot, a new path's service level, an operator's change): it moves to
        // its class's list and waits for that class's pass.
        let qp_class = objects
            .qps
            .get(qpn)
            .map_or(class, |q| vm.share.qp_class(q.qp_type(), q.attr.ah_attr.sl));
        if qp_class != class {
            drop(objects);
            vm.enqueue_in(qpn, qp_class);
            // Bookkeeping, not the VM's doing: it costs nothing, and counts as progress so
            // that the next round comes at once (that class's pass may be behind this one).
            return Some((qpn, StepOutcome::progress(0, false, 0, 0)));
        }
        let mem = vm.mem.memory();
        let entries = &self.entries;
        let arrived = || higher_class_arrived(entries, class);
        let cut = cut_every.map(|every| CopyCut {
            every,
            stop: &arrived,
        });
        let mut outcome = match examine(&mut objects, vm, &mem, qpn) {
            Examined::Send => self.fabric.step(vm, &mut objects, &mem, qpn, budget, cut),
            Examined::Flushed => {
                self.watch_error(vm.id, qpn);
                StepOutcome::IDLE
            }
            Examined::Idle => StepOutcome::IDLE,
        };
        let going_idle = matches!(
            outcome.step,
            Step::Idle | Step::Progress { more: false, .. }
        ) && objects.qps.get(qpn).is_some_and(|q| q.rt.sq_polling);
        if going_idle && set_sq_polling(&mut objects, &mem, qpn, false) {
            outcome.step = match outcome.step {
                Step::Progress { cost, .. } => Step::Progress { cost, more: true },
                _ => Step::Progress {
                    cost: 0,
                    more: true,
                },
            };
        }
        drop(objects);
        vm.deliver_events();
        Some((qpn, outcome))
    }
}

/// Whether a VM of a class above `class` has work that arrived since the step in progress
/// began (that step's cut asks): what is cheap to see without the VM's lock or a system call,
/// its ready-list flags and, if it is polled, its doorbell rings' indices. A kick is not
/// looked for; it waits for the step's end.
fn higher_class_arrived(entries: &[Entry], class: PriorityClass) -> bool {
    entries.iter().any(|e| {
        if !e.outranks(class) || e.held_by_limit() {
            return false;
        }
        (e.polled && e.doorbells.arrived()) || e.movable_above(class)
    })
}

/// The scheduler run by hand, on the test's own thread: what tests of the layers together
/// drive traffic with.
#[cfg(test)]
pub(crate) struct ManualScheduler {
    turns: Turns,
    _tx: SyncSender<Control>,
}

/// A sleeper on a bell of its own, for schedulers run by hand.
#[cfg(test)]
fn test_sleeper() -> Sleeper {
    Sleeper::new(Bell::new().expect("an epoll and an eventfd")).expect("a timerfd")
}

#[cfg(test)]
impl ManualScheduler {
    /// A scheduler carrying work on `fabric`. A VM alone with work takes one quantum a pass,
    /// as with others beside it, so that what a pass does does not hang on whether a look
    /// for kicks fell due (`sched::tests` covers taking more).
    pub fn new(fabric: Box<dyn Fabric>) -> Self {
        let (tx, rx) = sync_channel(16);
        let mut turns = Turns::new(rx, fabric, test_sleeper());
        turns.alone_extra_quanta = 0;
        ManualScheduler { turns, _tx: tx }
    }

    /// Serves `vm`, whose doorbells the test rings by putting QPs on its ready list.
    pub fn attach(&mut self, vm: &Arc<Vm>) {
        self.turns.control(Control::Attach(
            vm.clone(),
            Arc::new(doorbells::NoDoorbells),
        ));
    }

    /// Serves `vm` with the doorbell queues `doorbells`, polled (its driver told not to kick),
    /// as the scheduler does once it has served a VM.
    pub fn attach_polled(&mut self, vm: &Arc<Vm>, doorbells: Arc<dyn Doorbells>) {
        self.turns.control(Control::Attach(vm.clone(), doorbells));
        let i = self.turns.position(vm.id).expect("just attached");
        self.turns.set_polling(i, true);
    }

    /// One step of `vm`'s QP `qpn` in its class's pass below a higher class: its copy asks
    /// every `every` bytes whether a higher class's work arrived, the scheduler's own question
    /// over the VMs attached (`higher_class_arrived`). Outside the rounds: the QP is not put
    /// back on a list, and the outcome's bytes, `more` and timer are the caller's.
    pub fn step_below_a_higher_class(&mut self, vm: &Arc<Vm>, qpn: u32, every: u32) -> StepOutcome {
        self.turns.order_by_class();
        let class = vm.share.class();
        let step = self.turns.step(vm, qpn, class, CHUNK, Some(every));
        step.map_or(StepOutcome::IDLE, |(_, outcome)| outcome)
    }

    /// One pass of the scheduler's loop, without sleeping: timers, flushes, one round.
    pub fn pass(&mut self) -> bool {
        self.turns.recent = None;
        self.turns.fire_timers();
        self.turns.fail_pending_peers();
        if !self.turns.error_qps.is_empty() {
            self.turns.flush_error_qps();
        }
        self.turns.round()
    }

    /// One step of `vm`'s QP `qpn`, outside the rounds, whose copy is cut after its first
    /// piece of `every` bytes, as if a higher class's work arrived at every question: what a
    /// fabric does with a cut, shown on the layers together.
    pub fn step_cut_at_every_piece(&mut self, vm: &Arc<Vm>, qpn: u32, every: u32) -> StepOutcome {
        let mut objects = vm.lock();
        let mem = vm.mem.memory();
        let stop = || true;
        let cut = CopyCut { every, stop: &stop };
        let outcome = match examine(&mut objects, vm, &mem, qpn) {
            Examined::Send => self
                .turns
                .fabric
                .step(vm, &mut objects, &mem, qpn, CHUNK, Some(cut)),
            Examined::Flushed | Examined::Idle => StepOutcome::IDLE,
        };
        drop(objects);
        vm.deliver_events();
        outcome
    }

    /// Passes until `done` holds; panics if it has not after 10 s.
    pub fn run_until(&mut self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            if !self.pass() {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use vrdma_proto::mr::Access;
    use vrdma_proto::wqe::{self, Data, SendFlags};

    use super::doorbells::NoDoorbells;
    use super::*;
    use crate::config::SlClasses;
    use crate::fabric::mock::{MockFabric, MockStep, Plan};
    use crate::testing::{TestQp, TestVm, send_header};
    use zerocopy::IntoBytes;

    /// A scheduler on `fabric`, run by hand: the test calls its rounds. A VM alone with
    /// work takes one quantum a round, as with others beside it, so that what a round does
    /// does not hang on whether a look for kicks fell due (the tests of taking more set
    /// `alone_extra_quanta` back).
    fn turns(fabric: Box<dyn Fabric>) -> (Turns, SyncSender<Control>) {
        let (tx, rx) = sync_channel(16);
        let mut t = Turns::new(rx, fabric, test_sleeper());
        t.alone_extra_quanta = 0;
        (t, tx)
    }

    fn attach(t: &mut Turns, vm: &TestVm) {
        t.control(Control::Attach(vm.vm.clone(), Arc::new(NoDoorbells)));
    }

    /// An RC QP of `vm` in RTS, connected to QP `dest` of the port `peer`.
    fn rts_qp(vm: &mut TestVm, peer: Gid, dest: u32) -> TestQp {
        let pd = vm.pd();
        let qp = vm.qp(pd, qp::Type::Rc, 16, 64);
        vm.connect(qp.qpn, peer, dest, (7, 7, 1));
        qp
    }

    /// Bytes the scheduler counted for each VM.
    fn bytes(vm: &TestVm) -> u64 {
        vm.vm.counters.bytes.load(Ordering::Relaxed)
    }

    /// A fabric that fills up (a NIC's queue) hands its room back one step at a time; who
    /// takes it is the scheduler's choice, so 3:1 weights still give 3:1 shares, whichever VM
    /// comes first in the scheduler's order.
    #[test]
    fn weights_hold_when_the_fabric_is_full() {
        for first_heavy in [true, false] {
            let mock = MockFabric::default();
            mock.state().room = Some(0);
            let (mut t, _tx) = turns(Box::new(mock.clone()));
            let weights = if first_heavy { (3, 1) } else { (1, 3) };
            let (mut a, mut b) = (TestVm::new(1, weights.0), TestVm::new(2, weights.1));
            let qa = rts_qp(&mut a, b.gid(), 1);
            let qb = rts_qp(&mut b, a.gid(), 1);
            for (vm, qp) in [(&a, &qa), (&b, &qb)] {
                attach(&mut t, vm);
                let plan = Plan::Bulk {
                    message: QUANTUM,
                    done: 0,
                };
                mock.state().plans.insert((vm.vm.id, qp.qpn), plan);
                vm.vm.enqueue(qp.qpn);
            }
            for _ in 0..4000 {
                // One completion's worth of room, then the scheduler runs.
                *mock.state().room.as_mut().unwrap() += 1;
                t.round();
            }
            let (heavy, light) = if first_heavy {
                (bytes(&a), bytes(&b))
            } else {
                (bytes(&b), bytes(&a))
            };
            let ratio = heavy as f64 / light as f64;
            assert!(
                (2.7..=3.3).contains(&ratio),
                "first_heavy={first_heavy}: {heavy} / {light} = {ratio:.2}"
            );
        }
    }

    /// Gives `b`'s QP `qb` endless 1 MiB writes and `l`'s QP `ql` one 64-byte message once
    /// the fabric has taken `after` steps in all, then runs three rounds.
    fn bulk_with_an_arrival(
        t: &mut Turns,
        mock: &MockFabric,
        (b, qb): (&TestVm, &TestQp),
        (l, ql): (&TestVm, &TestQp),
        after: usize,
    ) {
        let bulk = Plan::Bulk {
            message: 1 << 20,
            done: 0,
        };
        mock.state().plans.insert((b.vm.id, qb.qpn), bulk);
        b.vm.enqueue(qb.qpn);
        let message = Plan::Messages { left: 1, size: 64 };
        mock.state()
            .arrivals
            .push((after, l.vm.clone(), ql.qpn, message));
        for _ in 0..3 {
            t.round();
        }
    }

    /// Bulk VM `b` (weight 4: a turn of four steps) has work; latency VM `l`'s one message
    /// arrives after `b`'s first step. With `classes`, it is carried next and `b`'s turn goes
    /// on after it, nothing of it lost; without, it waits for `b`'s whole turn. With
    /// `bytes_per_ns`, the scheduler starts from that copy rate. Returns the steps taken.
    fn arrival_during_a_turn(
        classes: bool,
        bytes_per_ns: Option<f64>,
    ) -> (Vec<MockStep>, u64, (TestVm, TestVm)) {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        t.copy_rate = CopyRate { bytes_per_ns };
        let (mut b, mut l) = (TestVm::new(1, 4), TestVm::new(2, 1));
        if classes {
            b.vm.share.set_class(PriorityClass::Bulk);
            l.vm.share.set_class(PriorityClass::Latency);
        }
        let qb = rts_qp(&mut b, l.gid(), 1);
        let ql = rts_qp(&mut l, b.gid(), 1);
        attach(&mut t, &b);
        attach(&mut t, &l);
        // Connecting the QPs put them on their ready lists: start from none.
        while b.vm.pop_ready().is_some() || l.vm.pop_ready().is_some() {}
        bulk_with_an_arrival(&mut t, &mock, (&b, &qb), (&l, &ql), 1);
        let steps = mock.state().steps.clone();
        let preemptions = t.stats.preemptions.load(Ordering::Relaxed);
        (steps, preemptions, (b, l))
    }

    #[test]
    fn a_higher_class_cuts_a_lower_class_turn_short_after_one_step() {
        let vms = |steps: Vec<MockStep>| steps.iter().map(|s| s.vm).collect::<Vec<_>>();
        let (steps, preemptions, (b, l)) = arrival_during_a_turn(true, None);
        let (order, b, l) = (vms(steps), b.vm.id, l.vm.id);
        assert_eq!(&order[..6], [b, l, b, b, b, b], "{order:?}");
        assert_eq!(preemptions, 1);
        let (steps, preemptions, (b, l)) = arrival_during_a_turn(false, None);
        let (order, b, l) = (vms(steps), b.vm.id, l.vm.id);
        assert_eq!(&order[..5], [b, b, b, b, l], "one class: {order:?}");
        assert_eq!(preemptions, 0);
    }

    /// A higher class's message that arrives while a lower class's step copies ends that
    /// copy at the next piece (about a microsecond of copying at the measured rate), not at
    /// the step's end: the step moves one piece, the message goes next, and the bulk VM then
    /// goes on from where its copy stopped. A step with no higher class above it, or with no
    /// arrival, is never cut.
    #[test]
    fn a_higher_class_message_cuts_a_lower_class_copy_at_the_next_piece() {
        // Copies move 8 bytes a nanosecond here: a piece of a microsecond is 8000 bytes.
        let (steps, _, (b, l)) = arrival_during_a_turn(true, Some(8.0));
        let first = steps[0];
        assert_eq!((first.vm, first.cut_every), (b.vm.id, Some(8000)));
        assert_eq!(first.moved, 8000, "one piece, then the cut: {steps:?}");
        assert_eq!(steps[1].vm, l.vm.id, "the message next: {steps:?}");
        assert_eq!(steps[2].vm, b.vm.id);
        // The bulk VM's other steps had a cut too, and nothing arrived: each moved its whole
        // budget, and the message lost nothing.
        let rest: Vec<&MockStep> = steps[2..].iter().filter(|s| s.vm == b.vm.id).collect();
        assert!(rest.len() >= 3, "{steps:?}");
        for s in &rest {
            assert!(s.cut_every.is_some(), "{s:?}");
            assert_eq!(s.moved, s.budget.min(CHUNK), "{s:?}");
        }
        let moved: u64 = steps.iter().map(|s| u64::from(s.moved)).sum();
        assert_eq!(bytes(&b), moved, "every byte moved counted once");

        // One class: no step has a cut.
        let (steps, _, _) = arrival_during_a_turn(false, Some(8.0));
        assert!(steps.iter().all(|s| s.cut_every.is_none()), "{steps:?}");
        assert_eq!(steps[0].moved, QUANTUM, "{steps:?}");
    }

    /// Bulk VM `b` (weight `b_weight`) and latency VM `l`, whose QPs on service level 1 are in
    /// bulk.
    fn bulk_beside_latency_with_sl1_in_bulk(b_weight: u32) -> (TestVm, TestVm) {
        let (b, l) = (TestVm::new(1, b_weight), TestVm::new(2, 1));
        b.vm.share.set_class(PriorityClass::Bulk);
        l.vm.share.set_class(PriorityClass::Latency);
        let mut sls = SlClasses::default();
        sls.0[1] = Some(PriorityClass::Bulk);
        l.vm.share.set_sl_classes(&sls);
        (b, l)
    }

    /// A VM's QP that cannot move in one class (put in bulk by its service level, its peer
    /// busy) does not hide the VM's work in another: the VM's latency message still cuts a
    /// bulk VM's turn short after one step.
    #[test]
    fn a_blocked_qp_in_one_class_hides_no_work_of_its_vm_in_another() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let (mut b, mut l) = bulk_beside_latency_with_sl1_in_bulk(4);
        let qb = qp_on_sl(&mut b, l.gid(), 0);
        let ql = qp_on_sl(&mut l, b.gid(), 0);
        let stuck = qp_on_sl(&mut l, b.gid(), 1);
        attach(&mut t, &b);
        attach(&mut t, &l);
        while b.vm.pop_ready().is_some() || l.vm.pop_ready().is_some() {}
        mock.state()
            .plans
            .insert((l.vm.id, stuck.qpn), Plan::Blocked);
        l.vm.enqueue(stuck.qpn);
        // A first round moves it to bulk (its doorbell went to l's class), a second steps it.
        t.round();
        t.round();
        assert_eq!(
            mock.state().steps.len(),
            1,
            "l's QP in bulk tried and blocked"
        );
        // l's latency message arrives after b's first step.
        bulk_with_an_arrival(&mut t, &mock, (&b, &qb), (&l, &ql), 2);
        let steps: Vec<(u64, u32)> = mock.state().steps.iter().map(|s| (s.vm, s.qpn)).collect();
        assert_eq!(
            &steps[..3],
            [(l.vm.id, stuck.qpn), (b.vm.id, qb.qpn), (l.vm.id, ql.qpn)],
            "{steps:?}"
        );
    }

    /// A latency VM whose work cannot move (its peer is always busy) holds no lower class
    /// back: the bulk VM moves as if it were alone.
    #[test]
    fn a_higher_class_that_cannot_move_holds_no_one_back() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let (mut l, mut b) = (TestVm::new(1, 1), TestVm::new(2, 1));
        l.vm.share.set_class(PriorityClass::Latency);
        b.vm.share.set_class(PriorityClass::Bulk);
        let ql = rts_qp(&mut l, b.gid(), 1);
        let qb = rts_qp(&mut b, l.gid(), 1);
        attach(&mut t, &l);
        attach(&mut t, &b);
        mock.state().plans.insert((l.vm.id, ql.qpn), Plan::Blocked);
        let bulk = Plan::Bulk {
            message: 1 << 20,
            done: 0,
        };
        mock.state().plans.insert((b.vm.id, qb.qpn), bulk);
        l.vm.enqueue(ql.qpn);
        b.vm.enqueue(qb.qpn);
        for _ in 0..100 {
            t.round();
        }
        assert!(
            l.vm.has_work.load(Ordering::Relaxed),
            "the latency VM still waits"
        );
        assert_eq!(bytes(&l), 0);
        assert!(
            bytes(&b) >= 99 * u64::from(QUANTUM),
            "the bulk VM moved {} in 100 rounds",
            bytes(&b)
        );
    }

    /// A latency VM that rings doorbells for a QP with nothing to do, as fast as the
    /// scheduler takes them, moves nothing, yet has work on its list at every round: the bulk
    /// VM below it still gets its guaranteed share, since a step that finds nothing costs the
    /// class something too.
    #[test]
    fn a_higher_class_ringing_for_nothing_does_not_starve_a_lower_one() {
        let mock = MockFabric::default();
        // Every look at l's queues finds a new doorbell for its QP.
        let (mut t, (b, _), (l, ql), _doorbells) = bulk_beside_polled_latency(&mock, 1, true);
        mock.state().plans.insert((l.vm.id, ql.qpn), Plan::Idle);
        let rounds = 2000;
        for _ in 0..rounds {
            t.poll_doorbells();
            t.round();
        }
        let idle_steps = mock
            .state()
            .steps
            .iter()
            .filter(|s| s.vm == l.vm.id)
            .count();
        assert!(idle_steps >= rounds * 9 / 10, "{idle_steps} idle steps");
        // Each idle step costs IDLE_STEP_COST; the bulk class is owed a ninth of that.
        let share = idle_steps as u64 * u64::from(IDLE_STEP_COST) / (MIN_SHARE_PARTS - 1);
        assert!(
            bytes(&b) >= share / 2,
            "the bulk VM moved {} next to {idle_steps} idle steps (its share: {share})",
            bytes(&b)
        );
    }

    /// A QP found on its VM's list in a class that is no longer its own (its doorbell went to
    /// the VM's class, its service level puts it in bulk) moves to its class's list at no
    /// cost, and the round says so: that pass may have gone by, and a round that said "nothing
    /// moved" would let the loop sleep with it queued.
    #[test]
    fn a_qp_moved_to_its_class_leaves_the_next_round_due() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let (b, mut l) = bulk_beside_latency_with_sl1_in_bulk(1);
        let in_bulk = qp_on_sl(&mut l, b.gid(), 1);
        attach(&mut t, &l);
        while l.vm.pop_ready().is_some() {}
        let message = Plan::Messages { left: 1, size: 64 };
        mock.state().plans.insert((l.vm.id, in_bulk.qpn), message);
        l.vm.enqueue(in_bulk.qpn);
        assert!(
            l.vm.has_work_in(PriorityClass::Latency),
            "the doorbell's guess"
        );
        assert!(t.round(), "moved: the next round is due");
        assert!(mock.state().steps.is_empty(), "moving is not a step");
        assert!(l.vm.has_work_in(PriorityClass::Bulk));
        t.round();
        assert_eq!(bytes(&l), 64);
    }

    /// A turn ended by idle steps (a list of mostly idle QPs, as after a drain wakes them all)
    /// leaves the rest for the next round, which is due at once: the QP with a message behind
    /// 40 idle ones moves within two rounds, each reporting that work remains.
    #[test]
    fn idle_steps_that_end_a_turn_leave_the_next_round_due() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let (mut a, b) = (TestVm::new(1, 1), TestVm::new(2, 1));
        let idle: Vec<TestQp> = (0..40).map(|_| rts_qp(&mut a, b.gid(), 1)).collect();
        let busy = rts_qp(&mut a, b.gid(), 1);
        attach(&mut t, &a);
        while a.vm.pop_ready().is_some() {}
        for q in &idle {
            mock.state().plans.insert((a.vm.id, q.qpn), Plan::Idle);
            a.vm.enqueue(q.qpn);
        }
        let message = Plan::Messages { left: 1, size: 64 };
        mock.state().plans.insert((a.vm.id, busy.qpn), message);
        a.vm.enqueue(busy.qpn);
        let mut rounds = 0;
        while bytes(&a) == 0 {
            assert!(t.round(), "work remains: the next round is due");
            rounds += 1;
            assert!(rounds <= 2, "the message waited {rounds} rounds");
        }
        let idle_steps = mock.state().steps.len() - 1;
        assert_eq!(idle_steps, 40);
    }

    /// VMs `b` (class `classes.0`) and `l` (class `classes.1`), one connected RC QP each,
    /// attached to `t` with nothing queued but `b`'s QP, which has endless writes (1 GiB
    /// messages). Returns them and `l`'s QP.
    fn bulk_writer_beside(
        t: &mut Turns,
        mock: &MockFabric,
        classes: (PriorityClass, PriorityClass),
    ) -> (TestVm, TestVm, TestQp) {
        let (mut b, mut l) = (TestVm::new(1, 1), TestVm::new(2, 1));
        b.vm.share.set_class(classes.0);
        l.vm.share.set_class(classes.1);
        let qb = rts_qp(&mut b, l.gid(), 1);
        let ql = rts_qp(&mut l, b.gid(), 1);
        attach(t, &b);
        attach(t, &l);
        while b.vm.pop_ready().is_some() || l.vm.pop_ready().is_some() {}
        let bulk = Plan::Bulk {
            message: 1 << 30,
            done: 0,
        };
        mock.state().plans.insert((b.vm.id, qb.qpn), bulk);
        b.vm.enqueue(qb.qpn);
        (b, l, ql)
    }

    /// A step below a higher class is cut into pieces only where a cut could find that
    /// class's work: not while the latency VM is unpolled on a fabric whose threads give no
    /// VM work (its message would come by a kick, looked for between steps), and again once
    /// it is polled.
    #[test]
    fn a_lower_class_step_is_cut_only_where_the_cut_can_find_work() {
        let mock = MockFabric::default();
        mock.state().no_work_from_its_threads = true;
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let classes = (PriorityClass::Bulk, PriorityClass::Latency);
        let (_b, l, _) = bulk_writer_beside(&mut t, &mock, classes);
        assert!(t.round());
        let unpolled = mock.state().steps.clone();
        assert!(!unpolled.is_empty());
        assert!(
            unpolled.iter().all(|s| s.cut_every.is_none()),
            "{unpolled:?}"
        );

        let i = t.position(l.vm.id).expect("attached");
        t.set_polling(i, true);
        mock.state().steps.clear();
        assert!(t.round());
        let polled = mock.state().steps.clone();
        assert!(!polled.is_empty());
        assert!(polled.iter().all(|s| s.cut_every.is_some()), "{polled:?}");
    }

    /// A VM alone with work takes its quantum and up to `ALONE_EXTRA_QUANTA` more in one
    /// round; another VM's work, arriving during its third step of the next round, ends that
    /// after the step, and the other VM's step comes next, as after a round.
    #[test]
    fn a_vm_alone_takes_more_quanta_until_another_has_work() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        t.alone_extra_quanta = ALONE_EXTRA_QUANTA;
        // No look for kicks falls due during the test, however slowly it runs.
        t.kicks_seen_at = Instant::now() + Duration::from_secs(3600);
        let normal = (PriorityClass::Normal, PriorityClass::Normal);
        let (b, l, ql) = bulk_writer_beside(&mut t, &mock, normal);
        assert!(t.round());
        let steps = mock.state().steps.clone();
        assert_eq!(steps.len(), 1 + ALONE_EXTRA_QUANTA as usize, "{steps:?}");
        assert!(steps.iter().all(|s| s.vm == b.vm.id && s.moved == QUANTUM));
        assert_eq!(
            t.stats.alone_quanta.load(Ordering::Relaxed),
            u64::from(ALONE_EXTRA_QUANTA)
        );

        mock.state().steps.clear();
        let message = Plan::Messages { left: 1, size: 64 };
        mock.state()
            .arrivals
            .push((3, l.vm.clone(), ql.qpn, message));
        assert!(t.round());
        let order: Vec<u64> = mock.state().steps.iter().map(|s| s.vm).collect();
        let (b, l) = (b.vm.id, l.vm.id);
        assert_eq!(order, [b, b, b, l], "b's turn ends at l's work");
    }

    /// Bytes `vms` moved while all of them always have work, over `rounds` rounds.
    fn shares(vms: &[(u32, PriorityClass)], rounds: usize) -> Vec<u64> {
        shares_on(vms, rounds).0
    }

    /// As [`shares`], with the mock fabric the rounds ran on.
    fn shares_on(vms: &[(u32, PriorityClass)], rounds: usize) -> (Vec<u64>, MockFabric) {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let mut all: Vec<TestVm> = (0..vms.len())
            .map(|k| TestVm::new(k as u8 + 1, vms[k].0))
            .collect();
        let peer = all[0].gid();
        for (vm, &(_, class)) in all.iter_mut().zip(vms) {
            vm.vm.share.set_class(class);
            let qp = rts_qp(vm, peer, 1);
            attach(&mut t, vm);
            let plan = Plan::Bulk {
                message: 1 << 20,
                done: 0,
            };
            mock.state().plans.insert((vm.vm.id, qp.qpn), plan);
            vm.vm.enqueue(qp.qpn);
        }
        for _ in 0..rounds {
            assert!(t.round(), "every VM always has work");
        }
        (all.iter().map(bytes).collect(), mock)
    }

    #[test]
    fn a_lower_class_keeps_its_minimum_share_and_weights_hold_within_a_class() {
        use PriorityClass::{Bulk, Latency, Normal};
        // A busy latency VM leaves a bulk one its tenth, no more.
        let moved = shares(&[(1, Latency), (1, Bulk)], 3000);
        let bulk = moved[1] as f64 / (moved[0] + moved[1]) as f64;
        assert!(
            (0.09..=0.115).contains(&bulk),
            "bulk took {bulk:.3} of the fabric: {moved:?}"
        );
        // Many bulk VMs share their class's tenth among themselves: a class owed its share
        // takes that, not a turn for each of its VMs.
        let moved = shares(
            &[(1, Latency), (1, Bulk), (1, Bulk), (1, Bulk), (1, Bulk)],
            6000,
        );
        let total: u64 = moved.iter().sum();
        let bulk: u64 = moved[1..].iter().sum();
        let part = bulk as f64 / total as f64;
        assert!(
            (0.09..=0.125).contains(&part),
            "four bulk VMs took {part:.3}: {moved:?}"
        );
        let (least, most) = (moved[1..].iter().min(), moved[1..].iter().max());
        let spread = *least.unwrap() as f64 / *most.unwrap() as f64;
        assert!(spread > 0.8, "within the class by weight: {moved:?}");
        // Three classes: latency VMs 3:1 by weight among themselves; normal keeps a tenth of
        // what is above it, bulk a tenth of all.
        let moved = shares(&[(3, Latency), (1, Latency), (1, Normal), (1, Bulk)], 6000);
        let total: u64 = moved.iter().sum();
        let ratio = moved[0] as f64 / moved[1] as f64;
        assert!(
            (2.9..=3.1).contains(&ratio),
            "weights within latency: {ratio:.2}"
        );
        let part = |k: usize| moved[k] as f64 / total as f64;
        assert!(
            (0.08..=0.115).contains(&part(2)),
            "normal took {:.3}: {moved:?}",
            part(2)
        );
        assert!(
            (0.09..=0.115).contains(&part(3)),
            "bulk took {:.3}: {moved:?}",
            part(3)
        );
    }

    /// An RC QP of `vm` in RTS, connected to QP 1 of the port `peer` by a path of service
    /// level `sl`.
    fn qp_on_sl(vm: &mut TestVm, peer: Gid, sl: u8) -> TestQp {
        let pd = vm.pd();
        let qp = vm.qp(pd, qp::Type::Rc, 16, 64);
        let path = qp::AhAttr {
            dgid: peer,
            port_num: 1,
            is_global: 1,
            sl,
            ..qp::AhAttr::default()
        };
        vm.connect_by(qp.qpn, path, 1, (7, 7, 1));
        qp
    }

    /// A latency VM's QP on a service level that gives bulk runs in the bulk class, below the
    /// normal VM beside it, while the VM's other QP runs above both; an SL never lifts a QP
    /// above its VM's class; and an operator's change of the SL's class moves the QP at its
    /// next step.
    #[test]
    fn a_service_level_puts_a_qp_in_a_lower_class_never_a_higher_one() {
        use PriorityClass::{Bulk, Latency, Normal};
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let (mut a, mut b) = (TestVm::new(1, 1), TestVm::new(2, 1));
        let mut sls = SlClasses::default();
        sls.0[1] = Some(Bulk);
        sls.0[2] = Some(Latency);
        for (vm, class) in [(&a, Latency), (&b, Normal)] {
            vm.vm.share.set_class(class);
            vm.vm.share.set_sl_classes(&sls);
        }
        let peer = b.gid();
        let fast = qp_on_sl(&mut a, peer, 0);
        let slow = qp_on_sl(&mut a, peer, 1);
        // SL 2 gives latency, above b's class: b's QP stays in normal.
        let lifted = qp_on_sl(&mut b, peer, 2);
        attach(&mut t, &a);
        attach(&mut t, &b);
        for (vm, qp) in [(&a, &fast), (&a, &slow), (&b, &lifted)] {
            let plan = Plan::Bulk {
                message: 1 << 20,
                done: 0,
            };
            mock.state().plans.insert((vm.vm.id, qp.qpn), plan);
            vm.vm.enqueue(qp.qpn);
        }
        let by_class = |vm: &TestVm| vm.vm.counters.class_bytes();
        for _ in 0..6000 {
            assert!(t.round(), "every QP always has work");
        }
        let (a_moved, b_moved) = (by_class(&a), by_class(&b));
        let total = (a_moved.iter().sum::<u64>() + b_moved.iter().sum::<u64>()) as f64;
        let part = |bytes: u64| bytes as f64 / total;
        assert_eq!(a_moved[Normal.index()], 0, "a has no QP in normal");
        assert_eq!(
            b_moved[Latency.index()],
            0,
            "SL 2 lifted b's QP: {b_moved:?}"
        );
        assert_eq!(b_moved[Bulk.index()], 0, "b has no QP in bulk");
        assert!(
            (0.77..=0.83).contains(&part(a_moved[Latency.index()])),
            "a's QP on SL 0, in latency: {a_moved:?} {b_moved:?}"
        );
        assert!(
            (0.08..=0.115).contains(&part(b_moved[Normal.index()])),
            "b's QP, in normal, kept its tenth: {a_moved:?} {b_moved:?}"
        );
        assert!(
            (0.08..=0.115).contains(&part(a_moved[Bulk.index()])),
            "a's QP on SL 1, in bulk, kept its tenth: {a_moved:?} {b_moved:?}"
        );
        // Back in a's class: the QP moves to the latency pass, and moves nothing in bulk.
        sls.0[1] = None;
        a.vm.share.set_sl_classes(&sls);
        let before = (by_class(&a), mock.state().steps.len());
        for _ in 0..2000 {
            assert!(t.round(), "every QP always has work");
        }
        let after = by_class(&a);
        assert_eq!(
            after[Bulk.index()],
            before.0[Bulk.index()],
            "nothing in bulk"
        );
        let slow_steps = mock.state().steps[before.1..]
            .iter()
            .filter(|s| (s.vm, s.qpn) == (a.vm.id, slow.qpn))
            .count();
        let fast_steps = mock.state().steps[before.1..]
            .iter()
            .filter(|s| (s.vm, s.qpn) == (a.vm.id, fast.qpn))
            .count();
        assert!(
            slow_steps * 10 > fast_steps * 9,
            "the QP went on in latency, beside its VM's other: {slow_steps} and {fast_steps} steps"
        );
    }

    /// Work queued in a VM's class goes on after an operator lowers the class: the QPs on the
    /// old class's list move to the new one's.
    #[test]
    fn work_queued_before_a_vm_is_moved_down_goes_on_in_its_new_class() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let mut a = TestVm::new(1, 1);
        a.vm.share.set_class(PriorityClass::Latency);
        let peer = a.gid();
        let qa = qp_on_sl(&mut a, peer, 0);
        attach(&mut t, &a);
        mock.state()
            .plans
            .insert((a.vm.id, qa.qpn), Plan::Messages { left: 4, size: 64 });
        a.vm.enqueue(qa.qpn);
        // One message in latency teaches the ready lists the QP's class.
        mock.state().room = Some(1);
        t.round();
        assert!(
            a.vm.has_work_in(PriorityClass::Latency),
            "three messages queued"
        );
        a.vm.share.set_class(PriorityClass::Bulk);
        mock.state().room = None;
        for _ in 0..4 {
            t.round();
        }
        let moved = a.vm.counters.class_bytes();
        assert_eq!(
            moved,
            [64, 0, 3 * 64],
            "one message in latency, three in bulk"
        );
        assert!(
            !a.vm.has_work.load(Ordering::Acquire),
            "nothing left behind"
        );
    }

    /// Work queued in a VM's class goes on in its new class after an operator raises it: the
    /// QPs queued on the old class's list move to the new one's at once, not when the old
    /// class's share next falls due.
    #[test]
    fn work_queued_before_a_vm_is_moved_up_goes_on_in_its_new_class_at_once() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let (mut x, mut y) = (TestVm::new(1, 1), TestVm::new(2, 1));
        x.vm.share.set_class(PriorityClass::Bulk);
        y.vm.share.set_class(PriorityClass::Latency);
        let peer = y.gid();
        let (qx, qy) = (qp_on_sl(&mut x, peer, 0), qp_on_sl(&mut y, peer, 0));
        attach(&mut t, &x);
        attach(&mut t, &y);
        while x.vm.pop_ready().is_some() || y.vm.pop_ready().is_some() {}
        mock.state()
            .plans
            .insert((x.vm.id, qx.qpn), Plan::Messages { left: 3, size: 64 });
        let bulk = Plan::Bulk {
            message: 1 << 20,
            done: 0,
        };
        mock.state().plans.insert((y.vm.id, qy.qpn), bulk);
        x.vm.enqueue(qx.qpn);
        y.vm.enqueue(qy.qpn);
        assert!(
            x.vm.has_work_in(PriorityClass::Bulk),
            "x's QP waits in bulk"
        );
        x.vm.share.set_class(PriorityClass::Latency);
        assert!(t.round());
        let moved = x.vm.counters.class_bytes();
        assert_eq!(
            moved,
            [3 * 64, 0, 0],
            "x's three messages in latency, in one round"
        );
    }

    /// Doorbell queues whose every look finds doorbells or none, as the test says, and that
    /// record what the scheduler asks of their kicks.
    #[derive(Default)]
    struct ScriptedDoorbells {
        ringing: std::sync::atomic::AtomicBool,
        mutes: std::sync::Mutex<Vec<bool>>,
    }

    impl Doorbells for ScriptedDoorbells {
        fn take(&self) -> bool {
            self.ringing.load(Ordering::Relaxed)
        }

        fn set_kicks(&self, _on: bool) -> bool {
            false
        }

        fn mute_kicks(&self, muted: bool) {
            self.mutes.lock().unwrap().push(muted);
        }
    }

    /// A kick that brings doorbells while the loop is busy starts polling the VM, even with
    /// the polling window shut (it adapts only when the loop sleeps); one found by waking, or
    /// one that brings nothing, does not; and the VM stops being polled once the loop runs out
    /// of work.
    #[test]
    fn a_kick_found_while_busy_starts_polling() {
        let (mut t, _tx) = turns(Box::new(MockFabric::default()));
        assert!(t.poll_window.is_zero());
        let a = TestVm::new(1, 1);
        let doorbells = Arc::new(ScriptedDoorbells::default());
        t.control(Control::Attach(a.vm.clone(), doorbells.clone()));
        let token = kick_token(a.vm.id, 0).unwrap();
        let polled = |t: &Turns| t.entries[0].polled;
        doorbells.ringing.store(true, Ordering::Relaxed);
        t.take_kicked(&mut vec![token], false);
        assert!(!polled(&t), "woken by the kick: the window decides");
        doorbells.ringing.store(false, Ordering::Relaxed);
        t.take_kicked(&mut vec![token], true);
        assert!(!polled(&t), "a kick that brought nothing");
        doorbells.ringing.store(true, Ordering::Relaxed);
        t.take_kicked(&mut vec![token], true);
        assert!(polled(&t), "found while busy");
        assert_eq!(t.polled, 1);
        doorbells.ringing.store(false, Ordering::Relaxed);
        assert!(!t.expire_polling(), "nothing came meanwhile");
        assert!(!polled(&t), "out of work: kicks again");
    }

    /// Doorbell queues of a polled VM whose next look finds a doorbell for QP `qpn` (once
    /// armed), as a driver that posts while the scheduler is busy and does not kick.
    struct ArrivingDoorbells {
        vm: Arc<Vm>,
        qpn: u32,
        armed: std::sync::atomic::AtomicBool,
        /// Every take finds one while armed, not only the next.
        always: bool,
    }

    impl Doorbells for ArrivingDoorbells {
        fn take(&self) -> bool {
            let rung = if self.always {
                self.armed.load(Ordering::Relaxed)
            } else {
                self.armed.swap(false, Ordering::Relaxed)
            };
            if rung {
                self.vm.enqueue(self.qpn);
            }
            rung
        }

        fn set_kicks(&self, _on: bool) -> bool {
            false
        }
    }

    /// A doorbell taken between steps for work this round has passed (a latency VM's QP that
    /// its service level puts in bulk, taken at the start of the bulk pass, where that VM had
    /// no turn) makes the next round due, though nothing moved: said "nothing moved", the
    /// loop would stop polling and sleep with it on the list.
    #[test]
    fn a_doorbell_taken_for_a_passed_list_makes_the_next_round_due() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let (mut b, mut l) = bulk_beside_latency_with_sl1_in_bulk(1);
        let qb = qp_on_sl(&mut b, l.gid(), 0);
        let in_bulk = qp_on_sl(&mut l, b.gid(), 1);
        let doorbells = Arc::new(ArrivingDoorbells {
            vm: l.vm.clone(),
            qpn: in_bulk.qpn,
            armed: false.into(),
            always: false,
        });
        attach(&mut t, &b);
        t.control(Control::Attach(l.vm.clone(), doorbells.clone()));
        while b.vm.pop_ready().is_some() || l.vm.pop_ready().is_some() {}
        let li = t.position(l.vm.id).unwrap();
        t.set_polling(li, true);
        // The scheduler finds l's QP in bulk (a first round moves it there from l's own
        // class, a second carries its message), so its next doorbells go to bulk's list.
        let message = Plan::Messages { left: 1, size: 64 };
        mock.state().plans.insert((l.vm.id, in_bulk.qpn), message);
        l.vm.enqueue(in_bulk.qpn);
        for _ in 0..3 {
            t.round();
        }
        assert_eq!(bytes(&l), 64);
        // The bulk VM's QP cannot move (its peer is busy): a round moves nothing.
        mock.state().plans.insert((b.vm.id, qb.qpn), Plan::Blocked);
        b.vm.enqueue(qb.qpn);
        assert!(!t.round(), "nothing moved, nothing came");
        mock.state().plans.insert((l.vm.id, in_bulk.qpn), message);
        doorbells.armed.store(true, Ordering::Relaxed);
        assert!(t.round(), "taken between steps: the next round is due now");
        assert_eq!(bytes(&l), 64, "its list was passed in that round");
        t.round();
        assert_eq!(bytes(&l), 128, "carried in the next");
    }

    /// Doorbell queues that count the takes, and whose watched indices say whether a take is
    /// worth it as the test sets.
    #[derive(Default)]
    struct CountedDoorbells {
        worth: std::sync::atomic::AtomicBool,
        takes: std::sync::atomic::AtomicU32,
    }

    impl Doorbells for CountedDoorbells {
        fn take(&self) -> bool {
            self.takes.fetch_add(1, Ordering::Relaxed);
            false
        }

        fn worth_taking(&self) -> bool {
            self.worth.load(Ordering::Relaxed)
        }

        fn set_kicks(&self, _on: bool) -> bool {
            false
        }
    }

    /// A polled VM's queues are taken on a pass only when their watched indices moved
    /// (`worth_taking`): a take costs a lock and address translations per queue, and the
    /// scheduler polls on every pass. Every `LOWER_CLASS_POLL_EVERY` passes they are taken
    /// regardless, so a watch gone stale costs a few passes, not the VM's traffic.
    #[test]
    fn a_polled_vm_is_taken_when_its_indices_moved_and_every_few_passes() {
        let (mut t, _tx) = turns(Box::new(MockFabric::default()));
        let a = TestVm::new(1, 1);
        let doorbells = Arc::new(CountedDoorbells::default());
        t.control(Control::Attach(a.vm.clone(), doorbells.clone()));
        t.set_polling(0, true);
        // Attaching took what had come before.
        let attached = doorbells.takes.load(Ordering::Relaxed);
        let takes = || doorbells.takes.load(Ordering::Relaxed) - attached;
        let passes = LOWER_CLASS_POLL_EVERY * 4;
        for _ in 0..passes {
            t.poll_doorbells();
        }
        assert_eq!(takes(), 4, "only every {LOWER_CLASS_POLL_EVERY} passes");
        doorbells.worth.store(true, Ordering::Relaxed);
        for _ in 0..passes {
            t.poll_doorbells();
        }
        assert_eq!(takes(), 4 + passes, "every pass while the indices moved");
    }

    /// A scheduler on `mock` with bulk VM `b` (weight `b_weight`), whose QP has endless 1 MiB
    /// writes queued, and polled latency VM `l`, whose queues find a doorbell for its QP at the
    /// next take once armed (at every take with `always`, armed from the start). Returns the
    /// turns, each VM with its QP, and `l`'s queues.
    #[allow(clippy::type_complexity)]
    fn bulk_beside_polled_latency(
        mock: &MockFabric,
        b_weight: u32,
        always: bool,
    ) -> (
        Turns,
        (TestVm, TestQp),
        (TestVm, TestQp),
        Arc<ArrivingDoorbells>,
    ) {
        // Rounds run by hand read no control messages: the sender may go.
        let (mut t, _) = turns(Box::new(mock.clone()));
        let (mut b, mut l) = (TestVm::new(1, b_weight), TestVm::new(2, 1));
        b.vm.share.set_class(PriorityClass::Bulk);
        l.vm.share.set_class(PriorityClass::Latency);
        let qb = rts_qp(&mut b, l.gid(), 1);
        let ql = rts_qp(&mut l, b.gid(), 1);
        let doorbells = Arc::new(ArrivingDoorbells {
            vm: l.vm.clone(),
            qpn: ql.qpn,
            armed: always.into(),
            always,
        });
        attach(&mut t, &b);
        t.control(Control::Attach(l.vm.clone(), doorbells.clone()));
        // Connecting the QPs put them on their ready lists: start from none.
        while b.vm.pop_ready().is_some() || l.vm.pop_ready().is_some() {}
        let li = t.position(l.vm.id).unwrap();
        t.set_polling(li, true);
        let bulk = Plan::Bulk {
            message: 1 << 20,
            done: 0,
        };
        mock.state().plans.insert((b.vm.id, qb.qpn), bulk);
        b.vm.enqueue(qb.qpn);
        (t, (b, qb), (l, ql), doorbells)
    }

    /// A polled latency VM's doorbell found by the check at the start of the bulk class's
    /// pass, in a round that had moved nothing yet, makes the next round due at once: the
    /// message is on the VM's ready list, its driver kicks for nothing while polled, and a
    /// round that said "nothing moved" let the loop stop polling and sleep up to 100 ms with
    /// it (and the bulk VM's work) waiting.
    #[test]
    fn a_doorbell_found_before_a_lower_class_pass_makes_the_next_round_due() {
        let mock = MockFabric::default();
        let (mut t, _, (l, ql), doorbells) = bulk_beside_polled_latency(&mock, 4, false);
        mock.state()
            .plans
            .insert((l.vm.id, ql.qpn), Plan::Messages { left: 1, size: 64 });
        doorbells.armed.store(true, Ordering::Relaxed);
        assert!(t.round(), "the message waits: the next round is due now");
        assert!(mock.state().steps.is_empty(), "strict priority: b waited");
        assert!(t.round());
        let steps: Vec<u64> = mock.state().steps.iter().map(|s| s.vm).collect();
        assert_eq!(
            steps.first(),
            Some(&l.vm.id),
            "the message first: {steps:?}"
        );
        assert_eq!(bytes(&l), 64);
    }

    /// 64 kicks in a row that bring nothing mute a VM's kicks; one that brings a doorbell
    /// unmutes them; each mute halves the next threshold, down to 8, so a guest that rings now
    /// and then while it kicks in a loop is muted again soon; 64 good kicks in a row, or a
    /// second without a mute, restore the threshold. The report a kick fd gives as soon as it
    /// is watched again does not count, nor do kicks while the VM is polled; and a look at
    /// several of a VM's queues is one kick.
    #[test]
    fn empty_kicks_mute_sooner_after_each_mute_until_the_vm_behaves() {
        let (mut t, _tx) = turns(Box::new(MockFabric::default()));
        let a = TestVm::new(1, 1);
        let doorbells = Arc::new(ScriptedDoorbells::default());
        t.control(Control::Attach(a.vm.clone(), doorbells.clone()));
        let token = kick_token(a.vm.id, 0).unwrap();
        let kick = |t: &mut Turns, ringing: bool, queues: u64| {
            doorbells.ringing.store(ringing, Ordering::Relaxed);
            let mut tokens: Vec<u64> = (0..queues).map(|q| token + q).collect();
            t.take_kicked(&mut tokens, false);
        };
        let kicks_to_mute = |t: &mut Turns, queues: u64| {
            let mut n = 0;
            while t.muted == 0 {
                kick(t, false, queues);
                n += 1;
                assert!(n <= KICK_STORM, "never muted");
            }
            n
        };
        let mut before_mute = Vec::new();
        for _ in 0..6 {
            before_mute.push(kicks_to_mute(&mut t, 1));
            kick(&mut t, true, 1);
            assert_eq!(t.muted, 0, "a kick with doorbells unmutes");
            // The kick fd, watched again, reports at once: not a kick.
            kick(&mut t, false, 1);
            assert_eq!(t.entries[0].empty_kicks, 0, "the fd's first report counted");
        }
        assert_eq!(before_mute, [64, 32, 16, 8, 8, 8]);
        // Behaving again: 64 good kicks, and the threshold is back; four queues per look
        // count as one kick.
        for _ in 0..KICK_STORM {
            kick(&mut t, true, 1);
        }
        assert_eq!(kicks_to_mute(&mut t, 4), KICK_STORM);
        kick(&mut t, true, 1);
        kick(&mut t, false, 1);
        // Strikes wear off: a mute a second after the last starts again from the first.
        assert_eq!(kicks_to_mute(&mut t, 1), 32);
        kick(&mut t, true, 1);
        kick(&mut t, false, 1);
        t.entries[0].last_mute = Some(Instant::now() - STRIKES_FORGOTTEN);
        assert_eq!(
            kicks_to_mute(&mut t, 1),
            16,
            "this mute still at its threshold"
        );
        kick(&mut t, true, 1);
        kick(&mut t, false, 1);
        assert_eq!(
            kicks_to_mute(&mut t, 1),
            32,
            "the strikes before it forgotten"
        );
        kick(&mut t, true, 1);
        // A polled VM's kicks find what polling left: none counts.
        t.entries[0].polled = true;
        for _ in 0..2 * KICK_STORM {
            kick(&mut t, false, 1);
        }
        assert_eq!(t.muted, 0, "a polled VM is never muted");
        assert_eq!(t.stats.kick_mutes.load(Ordering::Relaxed), 10);
        assert_eq!(t.stats.muted_vms.load(Ordering::Relaxed), 0);
        let mutes = doorbells.mutes.lock().unwrap().clone();
        assert_eq!(mutes.len(), 20, "10 mutes, each undone: {mutes:?}");
        assert!(mutes.iter().step_by(2).all(|&m| m), "{mutes:?}");
    }

    /// `--step-time-us` sizes a step from the copy rate measured on the big ones: 64 KiB in
    /// 4 us makes a 1 us step 16 KiB; small steps (overhead, not copying) do not count, and
    /// no step is smaller than 8 KiB or larger than a chunk.
    #[test]
    fn a_step_time_becomes_bytes_at_the_measured_copy_rate() {
        let mut rate = CopyRate::default();
        assert_eq!(
            rate.bytes_in(Duration::from_micros(1), MIN_TIMED_STEP),
            CHUNK,
            "nothing measured yet"
        );
        rate.observe(CHUNK, Duration::from_micros(4));
        rate.observe(64, Duration::from_micros(3));
        assert_eq!(
            rate.bytes_in(Duration::from_micros(1), MIN_TIMED_STEP),
            16 * 1024
        );
        assert_eq!(
            rate.bytes_in(Duration::from_nanos(100), MIN_TIMED_STEP),
            MIN_TIMED_STEP
        );
        assert_eq!(
            rate.bytes_in(Duration::from_micros(100), MIN_TIMED_STEP),
            CHUNK
        );
        // A slower host's copies pull the estimate down.
        for _ in 0..64 {
            rate.observe(CHUNK, Duration::from_micros(8));
        }
        let step = rate.bytes_in(Duration::from_micros(1), MIN_TIMED_STEP);
        assert!((8 * 1024..8 * 1024 + 64).contains(&step), "{step}");
    }

    #[test]
    fn weights_share_the_fabric_in_proportion() {
        let normal = PriorityClass::Normal;
        let (moved, mock) = shares_on(&[(3, normal), (1, normal)], 2000);
        let (ba, bb) = (moved[0], moved[1]);
        let ratio = ba as f64 / bb as f64;
        assert!(
            (ratio - 3.0).abs() < 0.01,
            "weights 3:1 moved {ba} and {bb} bytes: {ratio:.4}:1"
        );
        // Every step of every VM was at most one chunk.
        assert!(mock.state().steps.iter().all(|s| s.budget <= CHUNK));
    }

    /// A VM's rate limit and byte counter are charged what its steps moved, not what other
    /// threads counted for it meanwhile (the RoCEv2 receive threads count acknowledged bytes
    /// while the VM's step runs).
    #[test]
    fn rate_limits_charge_what_a_step_moved() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        // 1 MiB/s; the bucket holds at most one chunk.
        let mut a = TestVm::limited(1, 1, Some(1 << 20), None);
        let qa = rts_qp(&mut a, Gid::from_ipv4([10, 0, 0, 9]), 1);
        attach(&mut t, &a);
        let plan = Plan::Bulk {
            message: 1 << 30,
            done: 0,
        };
        {
            let mut m = mock.state();
            m.plans.insert((a.vm.id, qa.qpn), plan);
            // 10 MiB "acknowledged" behind the scheduler's back at every step: charged for
            // them, the VM could move one chunk every ten seconds.
            m.concurrent_bytes = 10 << 20;
        }
        a.vm.enqueue(qa.qpn);
        let want = 256 << 10;
        let deadline = Instant::now() + Duration::from_secs(10);
        let moved = |m: &MockFabric| -> u64 {
            // Each step moves its whole budget (the message never ends).
            m.state().steps.iter().map(|s| u64::from(s.budget)).sum()
        };
        while moved(&mock) < want {
            assert!(
                Instant::now() < deadline,
                "a 1 MiB/s VM moved {} bytes in 10 s: it was charged for bytes it did not move",
                moved(&mock)
            );
            t.round();
            std::thread::yield_now();
        }
        let steps = mock.state().steps.len() as u64;
        assert_eq!(
            bytes(&a),
            moved(&mock) + steps * (10 << 20),
            "the byte counter is what the steps moved, plus what others counted"
        );
    }

    /// Holds `vm`'s objects on another thread until told to let go or 10 s pass. The handle
    /// reports whether it was told in time.
    fn hold_lock(vm: &Arc<Vm>) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<bool>) {
        let (locked_tx, locked_rx) = channel();
        let (release_tx, release_rx) = channel::<()>();
        let vm = vm.clone();
        let holder = std::thread::spawn(move || {
            let _guard = vm.lock();
            locked_tx.send(()).unwrap();
            release_rx.recv_timeout(Duration::from_secs(10)).is_ok()
        });
        locked_rx.recv().unwrap();
        (release_tx, holder)
    }

    /// The scheduler never waits for one VM's lock: with VM c's objects held (as its control
    /// path holds them while registering a large MR), its due timers, the failure of its QPs
    /// whose peer departed, and the other VMs' traffic all go on.
    #[test]
    fn a_vm_whose_objects_are_held_stalls_nobody() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let (mut a, mut b, mut c, d) = (
            TestVm::new(1, 1),
            TestVm::new(2, 1),
            TestVm::new(3, 1),
            TestVm::new(4, 1),
        );
        let qa = rts_qp(&mut a, b.gid(), 1);
        let _qb = rts_qp(&mut b, a.gid(), qa.qpn);
        // c's QP is connected to d and has a send outstanding when d goes.
        let qc = rts_qp(&mut c, d.gid(), 1);
        let pd = c.pd();
        let mr = c.mr(pd, 4096, Access::LOCAL_WRITE);
        let src = [wqe::Sge::new(mr.addr, 8, mr.lkey)];
        c.post_send(
            &qc,
            send_header(wqe::Opcode::Send, 7, SendFlags::SIGNALED),
            Data::Sges(&src),
        );
        for vm in [&a, &b, &c, &d] {
            attach(&mut t, vm);
        }
        // c's QP has nothing to step on the mock; let the ready list settle first.
        c.vm.pop_ready();
        let bulk = Plan::Bulk {
            message: 4096,
            done: 0,
        };
        mock.state().plans.insert((a.vm.id, qa.qpn), bulk);
        a.vm.enqueue(qa.qpn);
        t.timers.push(Reverse((Instant::now(), c.vm.id, qc.qpn)));

        let (release, holder) = hold_lock(&c.vm);
        t.fire_timers();
        assert!(c.vm.has_work.load(Ordering::Acquire), "c's due timer fired");
        t.control(Control::Detach(d.vm.id, sync_channel(1).0, false));
        // a's and b's objects were free: only c's peers wait for theirs.
        let waiting: Vec<u64> = t.peer_failures.iter().map(|f| f.vm).collect();
        assert_eq!(waiting, vec![c.vm.id]);
        let steps_before = mock.state().steps.len();
        for _ in 0..10 {
            t.round();
        }
        let a_steps = mock.state().steps[steps_before..]
            .iter()
            .filter(|s| s.vm == a.vm.id)
            .count();
        assert!(
            a_steps >= 10,
            "a's traffic went on while c was held: {a_steps} steps in 10 rounds"
        );
        release.send(()).unwrap();
        assert!(
            holder.join().unwrap(),
            "the scheduler waited for c's objects"
        );

        // Once c's objects are free, its QP whose peer departed fails as on hardware; its
        // request had not started (the mock carries nothing), so it is flushed.
        t.fail_pending_peers();
        assert!(t.peer_failures.is_empty());
        let objects = c.vm.lock();
        assert_eq!(
            objects.qps.get(qc.qpn).map(|q| q.state()),
            Some(qp::State::Err)
        );
        drop(objects);
        let completions = c.completions(qc.cq_ring, 64);
        assert_eq!(completions[0].wr_id.get(), 7);
        assert_eq!(completions[0].status, Status::WrFlushErr.raw());
    }

    /// A QP's slot outlives it, and so may the QP's ACK timer: when the guest destroys a QP,
    /// creates another in the same slot and rings its doorbell, and the old QP's timer fires
    /// before the scheduler gets to the doorbell, the new QP is still stepped.
    #[test]
    fn a_late_timer_of_a_destroyed_qp_hides_no_doorbell_of_its_slot() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let mut a = TestVm::new(1, 1);
        let peer = Gid::from_ipv4([10, 0, 0, 9]);
        let old = rts_qp(&mut a, peer, 1);
        attach(&mut t, &a);
        // Its ACK timer is armed when it sends; it completes, and the guest destroys it.
        t.timers.push(Reverse((Instant::now(), a.vm.id, old.qpn)));
        a.exec(
            vrdma_proto::cmd::Opcode::DestroyQp,
            vrdma_proto::cmd::Handle {
                handle: old.qpn.into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        );
        let new = rts_qp(&mut a, peer, 1);
        let slot = |qpn: u32| qpn & ((1 << crate::limits::QPN_INDEX_BITS) - 1);
        assert_ne!(new.qpn, old.qpn);
        assert_eq!(
            slot(new.qpn),
            slot(old.qpn),
            "the new QP took the old one's slot"
        );
        while a.vm.pop_ready().is_some() {}
        let bulk = Plan::Bulk {
            message: 4096,
            done: 0,
        };
        mock.state().plans.insert((a.vm.id, new.qpn), bulk);
        a.vm.enqueue(new.qpn);
        t.fire_timers();
        t.round();
        let stepped: Vec<u32> = mock.state().steps.iter().map(|s| s.qpn).collect();
        assert!(
            !stepped.is_empty() && stepped.iter().all(|&q| q == new.qpn),
            "the live QP of the slot, {:#x}, is served, and only it: {stepped:x?}",
            new.qpn
        );
    }

    #[test]
    fn a_paused_vm_is_not_served_until_it_resumes() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let mut a = TestVm::new(1, 1);
        let qa = rts_qp(&mut a, Gid::from_ipv4([10, 0, 0, 9]), 1);
        attach(&mut t, &a);
        let bulk = Plan::Bulk {
            message: 4096,
            done: 0,
        };
        mock.state().plans.insert((a.vm.id, qa.qpn), bulk);
        a.vm.enqueue(qa.qpn);
        t.control(Control::Pause(a.vm.id, sync_channel(1).0));
        assert_eq!(mock.state().paused, vec![a.vm.id], "the fabric was told");
        for _ in 0..5 {
            assert!(!t.round(), "a paused VM moves nothing");
        }
        assert!(mock.state().steps.is_empty());
        assert!(a.vm.has_work.load(Ordering::Acquire), "its work waits");
        t.control(Control::Resume(a.vm.id, false));
        assert!(mock.state().paused.is_empty());
        assert!(t.round(), "served again");
        assert!(!mock.state().steps.is_empty());
    }

    #[test]
    fn a_blocked_step_keeps_the_qp_ready_and_retries_soon() {
        let mock = MockFabric::default();
        let (mut t, _tx) = turns(Box::new(mock.clone()));
        let mut a = TestVm::new(1, 1);
        let qa = rts_qp(&mut a, Gid::from_ipv4([10, 0, 0, 9]), 1);
        attach(&mut t, &a);
        mock.state().plans.insert((a.vm.id, qa.qpn), Plan::Blocked);
        a.vm.enqueue(qa.qpn);
        assert!(!t.round(), "nothing moved");
        assert!(t.retry_soon);
        assert!(t.sleep_for(Instant::now()) <= RETRY_BUSY);
        assert_eq!(a.vm.pop_ready(), Some(qa.qpn), "the QP is still ready");
        // A timer instead: the QP waits for it, and the scheduler sleeps until then.
        let at = Instant::now() + Duration::from_secs(5);
        mock.state()
            .plans
            .insert((a.vm.id, qa.qpn), Plan::WaitUntil(at));
        a.vm.enqueue(qa.qpn);
        assert!(!t.round());
        assert!(!t.retry_soon);
        assert_eq!(a.vm.pop_ready(), None, "not ready before its timer");
        let sleep = t.sleep_for(Instant::now());
        assert!(sleep > Duration::from_secs(4) || sleep == Duration::from_millis(100));
    }
}
