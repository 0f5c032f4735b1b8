//! The scheduler and the soft fabric's execution of work requests.
//!
//! Every VM's work meets here. One thread serves the VMs by deficit round robin on bytes,
//! weighted by each VM's configured weight, and moves at most [`CHUNK`] bytes of one QP's
//! current work request per step, so a bulk transfer cannot hold back another VM's small
//! messages. Within a VM, QPs take turns; within a QP, work requests run in order, as on an
//! RNIC.
//!
//! The hot path (doorbell → work request → copy → completion) allocates nothing and takes no
//! lock shared between VMs: the scheduler owns its tables, and per chunk locks the sender VM
//! and, with `try_lock`, the receiver VM.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::Thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vrdma_proto::cqe::{self, Status, VendorErr};
use vrdma_proto::mr::Access;
use vrdma_proto::wqe::{self, Opcode, Payload, SendFlags, Sge};
use vrdma_proto::{Gid, event, qp};
use zerocopy::FromBytes;

use crate::completion::{self, Completion, load_producer, publish_consumer};
use crate::port::VmPort;
use crate::vm::{GuestMem, Vm};
use crate::wire::{self, Fabric, TxBuffers};
use crate::xfer::{self, CHUNK, Runs};

/// Bytes of the largest send ring slot a QP can have.
pub const MAX_SEND_SLOT: usize =
    wqe::send_stride(crate::limits::MAX_SGE, crate::limits::MAX_INLINE) as usize;
/// Bytes charged per work request on top of its payload, so that a VM sending tiny messages
/// pays for the scheduler time each one takes (decoding, checks, a completion), not just for
/// its few payload bytes. 8 KiB is about what one work request's processing costs in memcpy
/// time on a current core; without it, 64-byte messages at equal weight would take most of
/// the scheduler's time from a bulk neighbour.
pub const WR_COST: u32 = 8 * 1024;
/// Deficit a weight-1 VM earns per round.
pub const QUANTUM: u32 = CHUNK;
/// How long a requester may leave a message half-received before another may start one.
const OWNER_STALE: Duration = Duration::from_millis(100);
/// How soon work skipped because a VM's objects were locked is tried again.
const RETRY_BUSY: Duration = Duration::from_micros(50);
/// How often QPs in the error state are checked for newly posted work to flush.
const FLUSH_TICK: Duration = Duration::from_millis(1);
/// Longest the scheduler polls the doorbell queues after its last work before it sleeps, as
/// KVM's halt polling (whose default this is): a wake-up costs tens of microseconds on a
/// virtual machine, more than a small message takes end to end.
const POLL_MAX: Duration = Duration::from_micros(200);
/// The first polling window once sleeping has proved too slow; it doubles up to
/// [`POLL_MAX`] each time work arrives soon after the scheduler went to sleep, and halves (to
/// nothing) each time the scheduler sleeps longer than [`POLL_MAX`], so VMs that are idle or
/// talk rarely cost no CPU.
const POLL_START: Duration = Duration::from_micros(10);
/// Size of the GRH a UD receive buffer starts with.
pub const GRH_SIZE: u32 = 40;

/// A receive work request the responder has taken for a message in progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecvCopy {
    /// Its `wr_id`.
    pub wr_id: u64,
    /// SGEs in use.
    pub n: usize,
    /// The SGEs, copied so the guest cannot change them mid-message.
    pub sges: [Sge; crate::limits::MAX_SGE as usize],
    /// Room in bytes.
    pub room: u32,
}

/// The work request a QP is executing.
#[derive(Debug, Clone, Copy)]
pub struct Inflight {
    /// Whether a work request is in progress.
    pub active: bool,
    /// Its ring slot, copied when it started.
    pub slot: [u8; MAX_SEND_SLOT],
    /// Payload bytes done.
    pub done: u32,
    /// Transport retries left (no responder).
    pub retries_left: u8,
    /// RNR retries left.
    pub rnr_left: u8,
    /// Do not try again before this.
    pub wait_until: Option<Instant>,
}

impl Default for Inflight {
    fn default() -> Self {
        Inflight {
            active: false,
            slot: [0; MAX_SEND_SLOT],
            done: 0,
            retries_left: 0,
            rnr_left: 0,
            wait_until: None,
        }
    }
}

/// A QP's data-path state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QpRuntime {
    /// Index of the oldest send work request not yet completed.
    pub sq_head: u32,
    /// Receive work requests completed (the receive ring's consumer index).
    pub rq_done: u32,
    /// The SQD drained event has been raised.
    pub sqd_notified: bool,
    /// The send ring was found overrun: nothing in it is trusted, not even to flush, until the
    /// QP is reset.
    pub sq_dead: bool,
    /// The send ring's polling word is set: the driver skips doorbells because the scheduler
    /// will look at the ring again before the QP goes idle.
    #[serde(default)]
    pub sq_polling: bool,
    /// The current work request; must be idle before the state is saved.
    #[serde(skip)]
    pub inflight: Inflight,
    /// The requester whose message this QP is receiving (RC), and when it last moved a piece,
    /// so two cannot interleave; one silent for `OWNER_STALE` has gone and is replaced.
    #[serde(skip)]
    pub rx_owner: Option<(u64, u32, Instant)>,
    /// Where the QP stands in PSN space on the inter-host fabric.
    #[serde(default)]
    pub psns: crate::wire::Psns,
    /// The QP's transport on the inter-host fabric; must be idle before the state is saved.
    #[serde(skip)]
    pub wire: crate::wire::Transport,
}

impl QpRuntime {
    /// A runtime whose rings start at these indices (after a reset).
    pub fn at(sq_head: u32, rq_done: u32) -> Self {
        QpRuntime {
            sq_head,
            rq_done,
            ..QpRuntime::default()
        }
    }
}

enum Control {
    Attach(Arc<VmPort>),
    Detach(u64, SyncSender<()>),
}

/// The handle the devices and servers use to reach the scheduler.
#[derive(Debug, Clone)]
pub struct Scheduler {
    tx: SyncSender<Control>,
    thread: Thread,
}

impl Scheduler {
    /// Starts the scheduler thread; `fabric` carries work to VMs on other hosts.
    pub fn start(fabric: Option<Arc<Fabric>>) -> std::io::Result<Scheduler> {
        let (tx, rx) = sync_channel(256);
        let engine_fabric = fabric.clone();
        let handle = std::thread::Builder::new()
            .name("vrdma-scheduler".into())
            .spawn(move || Engine::new(rx, engine_fabric).run())?;
        if let Some(f) = &fabric {
            f.set_scheduler(handle.thread().clone());
        }
        Ok(Scheduler {
            tx,
            thread: handle.thread().clone(),
        })
    }

    /// Adds a connected VM to the fabric.
    pub fn attach(&self, port: Arc<VmPort>) {
        if self.tx.send(Control::Attach(port)).is_ok() {
            self.wake();
        }
    }

    /// Removes a VM from the fabric; its peers' QPs go to the error state. Returns once the
    /// scheduler holds no reference to it.
    pub fn detach(&self, port_id: u64) {
        let (done_tx, done_rx) = sync_channel(1);
        if self.tx.send(Control::Detach(port_id, done_tx)).is_ok() {
            self.wake();
            if done_rx.recv_timeout(Duration::from_secs(10)).is_err() {
                warn!("the scheduler did not release VM port {port_id} within 10 s");
            }
        }
    }

    /// Tells the scheduler there is work.
    pub fn wake(&self) {
        self.thread.unpark();
    }
}

/// What one step of one QP achieved.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// Nothing to do until the next doorbell.
    Idle,
    /// Moved bytes; `more` if the QP has more work right now.
    Progress { cost: u32, more: bool },
    /// The receiver VM is busy; try again next round.
    Blocked,
    /// Waiting for a timer.
    Waiting(Instant),
}

/// What the responder did with a chunk.
pub(crate) enum Resp {
    /// Applied; `last` if the message is complete.
    Done,
    /// No receive posted: retry after this many microseconds.
    Rnr(u32),
    /// No QP ready to answer (wrong GID or QPN, or not in RTR/RTS).
    NoResponder,
    /// The responder refused; the requester completes with this status.
    Nak(Status, VendorErr),
    /// Another requester's message is in progress.
    Busy,
    /// UD datagram dropped.
    Dropped,
    /// The requester's own memory failed (its memory table changed under it).
    LocalFault(VendorErr),
}

/// A VM's token buckets for its bandwidth and message-rate limits. Each holds at most 10 ms
/// of its rate (but never less than one chunk or one message), so a limited VM cannot save up
/// a burst that would hold back the others.
#[derive(Debug, Clone, Copy)]
struct Buckets {
    bytes: f64,
    msgs: f64,
    last: Instant,
}

impl Buckets {
    fn new() -> Self {
        Buckets {
            bytes: 0.0,
            msgs: 0.0,
            last: Instant::now(),
        }
    }

    fn byte_cap(bw: u64) -> f64 {
        (bw as f64 / 100.0).max(f64::from(CHUNK))
    }

    fn msg_cap(rate: u64) -> f64 {
        (rate as f64 / 100.0).max(1.0)
    }

    fn refill(&mut self, port: &VmPort, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        if let Some(bw) = port.max_bw {
            self.bytes = (self.bytes + bw as f64 * dt).min(Self::byte_cap(bw));
        }
        if let Some(rate) = port.max_msg_rate {
            self.msgs = (self.msgs + rate as f64 * dt).min(Self::msg_cap(rate));
        }
    }

    /// How long until the VM may move again, or `None` if it may now.
    fn wait(&self, port: &VmPort) -> Option<Duration> {
        let mut wait: Option<f64> = None;
        if let Some(bw) = port.max_bw.filter(|_| self.bytes <= 0.0) {
            wait = Some((-self.bytes + 1.0) / bw as f64);
        }
        if let Some(rate) = port.max_msg_rate.filter(|_| self.msgs < 1.0) {
            let w = (1.0 - self.msgs) / rate as f64;
            wait = Some(wait.map_or(w, |x| x.max(w)));
        }
        wait.map(Duration::from_secs_f64)
    }

    /// The most payload bytes the VM may move in its next step.
    fn byte_budget(&self, port: &VmPort) -> u32 {
        match port.max_bw {
            Some(_) => self.bytes.clamp(1.0, f64::from(CHUNK)) as u32,
            None => CHUNK,
        }
    }

    fn charge(&mut self, bytes: u64, msgs: u64) {
        self.bytes -= bytes as f64;
        self.msgs -= msgs as f64;
    }
}

struct Engine {
    rx: Receiver<Control>,
    ports: Vec<Arc<VmPort>>,
    deficits: Vec<i64>,
    buckets: Vec<Buckets>,
    /// When the earliest rate-limited VM may move again.
    rate_wake: Option<Instant>,
    /// Work was skipped because a VM's lock was busy; nobody will unpark the scheduler when it
    /// frees, so look again soon.
    retry_soon: bool,
    waiting_since: Vec<Option<Instant>>,
    by_gid: HashMap<Gid, Arc<VmPort>>,
    timers: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    error_qps: Vec<(u64, u32)>,
    last_flush: Instant,
    poll: Polling,
    /// The inter-host fabric, if the daemon runs one.
    fabric: Option<Arc<Fabric>>,
    /// Packet buffers for the inter-host fabric.
    tx: TxBuffers,
}

/// The scheduler's adaptive polling of the doorbell queues. Each VM is polled only while it
/// has had work within the window, so the cost of a pass grows with the VMs that are busy,
/// not with all those connected.
#[derive(Debug)]
struct Polling {
    /// How long to keep polling a VM after its last work.
    window: Duration,
    /// VMs being polled (their drivers told not to kick, `VRING_USED_F_NO_NOTIFY`).
    ports: usize,
    /// Per VM (in `Engine::ports` order): whether it is polled, and when it last had work.
    state: Vec<(bool, Instant)>,
    /// VMs the last round served, by index (capacity for every VM, so no allocation).
    served: Vec<usize>,
}

impl Engine {
    fn new(rx: Receiver<Control>, fabric: Option<Arc<Fabric>>) -> Self {
        Engine {
            rx,
            ports: Vec::new(),
            deficits: Vec::new(),
            buckets: Vec::new(),
            rate_wake: None,
            retry_soon: false,
            waiting_since: Vec::new(),
            by_gid: HashMap::new(),
            timers: BinaryHeap::with_capacity(4096),
            error_qps: Vec::with_capacity(256),
            last_flush: Instant::now(),
            poll: Polling {
                window: Duration::ZERO,
                ports: 0,
                state: Vec::new(),
                served: Vec::new(),
            },
            fabric,
            tx: TxBuffers::default(),
        }
    }

    fn run(mut self) {
        loop {
            loop {
                match self.rx.try_recv() {
                    Ok(c) => self.control(c),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                }
            }
            self.fire_timers();
            if !self.error_qps.is_empty() && self.last_flush.elapsed() >= FLUSH_TICK {
                self.flush_error_qps();
            }
            // While kicks are off, doorbells are only seen here: look on every pass, busy or
            // not, so a VM never waits behind a neighbour's backlog for more than a chunk.
            let polled = self.poll.ports > 0 && self.poll_doorbells();
            if self.round() {
                if !self.poll.window.is_zero() {
                    let now = Instant::now();
                    for k in 0..self.poll.served.len() {
                        let i = self.poll.served[k];
                        self.poll.state[i].1 = now;
                        if !self.poll.state[i].0 {
                            self.set_polling(i, true);
                        }
                    }
                }
                continue;
            }
            if self.poll.ports > 0 {
                if polled {
                    continue;
                }
                if self.expire_polling() {
                    // Posted while kicks were off: no kick will announce them.
                    continue;
                }
                if self.poll.ports > 0 {
                    // Polling must not keep a guest's own thread off a shared core.
                    std::thread::yield_now();
                    continue;
                }
            }
            let now = Instant::now();
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
            if self.retry_soon {
                sleep = sleep.min(RETRY_BUSY);
            }
            std::thread::park_timeout(sleep);
            if self
                .ports
                .iter()
                .any(|p| p.has_work.load(Ordering::Relaxed))
            {
                self.adapt_polling(now.elapsed());
            }
        }
    }

    /// Grows or shrinks the polling window after a sleep that a guest's doorbell ended.
    fn adapt_polling(&mut self, slept: Duration) {
        let w = &mut self.poll.window;
        if slept <= POLL_MAX {
            *w = (*w * 2).clamp(POLL_START, POLL_MAX);
        } else {
            *w /= 2;
            if *w < POLL_START {
                *w = Duration::ZERO;
            }
        }
    }

    /// Takes doorbells straight from the doorbell queues of the VMs being polled. Returns
    /// whether any came.
    fn poll_doorbells(&self) -> bool {
        let mut any = false;
        for (port, &(polled, _)) in self.ports.iter().zip(&self.poll.state) {
            if !polled {
                continue;
            }
            if port.new_doorbell_vring.swap(false, Ordering::AcqRel) {
                // A queue first kicked while its VM was polled: it must stop kicking too, or
                // each of its doorbells would wake a worker thread (on a busy daemon, on the
                // scheduler's own core).
                set_kicks(port, false);
            }
            any |= drain_pending(port);
        }
        any
    }

    /// Stops polling the VMs that have had no work for the window: their drivers kick again.
    /// Returns whether doorbells came while kicks were off (they are taken now; nobody would
    /// announce them).
    fn expire_polling(&mut self) -> bool {
        let now = Instant::now();
        let mut pending = false;
        for i in 0..self.ports.len() {
            let (polled, last) = self.poll.state[i];
            if polled && now.duration_since(last) >= self.poll.window {
                pending |= self.set_polling(i, false);
            }
        }
        pending
    }

    /// Tells VM `i`'s driver to stop kicking while the scheduler polls it (`on`), or to kick
    /// again. Returns whether doorbells arrived while kicks were off, which it takes.
    fn set_polling(&mut self, i: usize, on: bool) -> bool {
        let state = &mut self.poll.state[i];
        if state.0 == on {
            return false;
        }
        state.0 = on;
        if on {
            self.poll.ports += 1;
        } else {
            self.poll.ports -= 1;
        }
        let port = &self.ports[i];
        set_kicks(port, !on) && drain_pending(port)
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Attach(port) => {
                info!("vm {}: attached to the fabric as {}", port.name, port.gid);
                if let Some(f) = &self.fabric {
                    f.attach(&port.gid, Some(port.clone()));
                }
                self.by_gid.insert(port.gid, port.clone());
                self.ports.push(port);
                self.deficits.push(0);
                self.buckets.push(Buckets::new());
                self.waiting_since.push(None);
                self.poll.state.push((false, Instant::now()));
                self.poll.served.reserve(self.ports.len());
            }
            Control::Detach(id, done) => {
                if let Some(i) = self.ports.iter().position(|p| p.id == id) {
                    let port = self.ports.remove(i);
                    self.deficits.remove(i);
                    self.buckets.remove(i);
                    self.waiting_since.remove(i);
                    if self.poll.state.remove(i).0 {
                        self.poll.ports -= 1;
                    }
                    if self.by_gid.get(&port.gid).is_some_and(|p| p.id == id) {
                        self.by_gid.remove(&port.gid);
                        if let Some(f) = &self.fabric {
                            f.attach(&port.gid, None);
                        }
                    }
                    self.error_qps.retain(|&(p, _)| p != id);
                    self.fail_peers_of(&port);
                    info!("vm {}: detached from the fabric", port.name);
                }
                let _ = done.send(());
            }
        }
    }

    /// Moves every RC QP connected to `gone` that has send work outstanding to the error state,
    /// completing its work request in progress with RETRY_EXC_ERR and flushing the rest, as a
    /// requester whose partner vanished ends up on hardware once its retries run out. A QP with
    /// nothing to send is left alone, as on hardware, where it would not notice until its next
    /// send: failing it at once would flush the receives of a guest that had just finished its
    /// exchange with the peer and was still polling.
    fn fail_peers_of(&mut self, gone: &VmPort) {
        // A detach is control path: copying the list of ports is fine here.
        for port in self.ports.clone() {
            let mem = port.mem.memory();
            let mut vm = port.lock();
            let peers: Vec<u32> = vm
                .qps
                .iter()
                .filter(|(_, qp)| {
                    qp.qp_type() == qp::Type::Rc
                        && qp.attr.ah_attr.dgid == gone.gid
                        && matches!(qp.state(), qp::State::Rtr | qp::State::Rts | qp::State::Sqd)
                        && (qp.rt.inflight.active
                            || load_producer(&mem, qp.sq_ring_addr)
                                .is_some_and(|p| p != qp.rt.sq_head))
                })
                .map(|(qpn, _)| qpn)
                .collect();
            for qpn in peers {
                if let Some(qp) = vm.qps.get_mut(qpn) {
                    if qp.rt.rx_owner.is_some_and(|(p, _, _)| p == gone.id) {
                        qp.rt.rx_owner = None;
                    }
                }
                fail_wr(
                    &mut vm,
                    &port,
                    &mem,
                    qpn,
                    Status::RetryExcErr,
                    VendorErr::PeerUnreachable,
                );
                self.watch_error(port.id, qpn);
            }
            drop(vm);
            port.deliver_events();
        }
    }

    /// Puts a QP on the list revisited every `FLUSH_TICK`, once: a guest ringing doorbells on
    /// a QP in ERR must not grow the scheduler's work.
    fn watch_error(&mut self, port_id: u64, qpn: u32) {
        if !self.error_qps.contains(&(port_id, qpn)) {
            self.error_qps.push((port_id, qpn));
        }
    }

    fn port(&self, id: u64) -> Option<Arc<VmPort>> {
        self.ports.iter().find(|p| p.id == id).cloned()
    }

    fn fire_timers(&mut self) {
        if self.timers.is_empty() {
            return;
        }
        let now = Instant::now();
        while let Some(Reverse((at, port_id, qpn))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(port) = self.port(port_id) else {
                continue;
            };
            let mut vm = port.lock();
            if let Some(qp) = vm.qps.get_mut(qpn) {
                qp.rt.inflight.wait_until = None;
            }
            drop(vm);
            port.enqueue(qpn);
        }
    }

    fn flush_error_qps(&mut self) {
        self.last_flush = Instant::now();
        let mut keep = Vec::new();
        for &(port_id, qpn) in &self.error_qps {
            let Some(port) = self.port(port_id) else {
                continue;
            };
            let mem = port.mem.memory();
            let Some(mut vm) = port.try_lock() else {
                keep.push((port_id, qpn));
                continue;
            };
            match vm.qps.get(qpn).map(|q| q.state()) {
                Some(qp::State::Err) => {
                    completion::flush(&mut vm, &port, &mem, qpn, true, true);
                    keep.push((port_id, qpn));
                }
                Some(qp::State::Sqe) => {
                    completion::flush(&mut vm, &port, &mem, qpn, true, false);
                    keep.push((port_id, qpn));
                }
                _ => {}
            }
            drop(vm);
            port.deliver_events();
        }
        self.error_qps = keep;
    }

    /// One deficit-round-robin round over the VMs with work. Returns whether anything moved.
    fn round(&mut self) -> bool {
        let mut any = false;
        self.poll.served.clear();
        // Read the clock only for rate-limited VMs: most rounds have none.
        let mut clock: Option<Instant> = None;
        self.rate_wake = None;
        self.retry_soon = false;
        for i in 0..self.ports.len() {
            let port = self.ports[i].clone();
            if !port.has_work.load(Ordering::Acquire) {
                self.deficits[i] = 0;
                self.account_wait(i, false);
                continue;
            }
            let limited = port.max_bw.is_some() || port.max_msg_rate.is_some();
            if limited {
                let now = *clock.get_or_insert_with(Instant::now);
                self.buckets[i].refill(&port, now);
                if let Some(wait) = self.buckets[i].wait(&port) {
                    // Over its limit: not its turn, and no deficit saved up for later.
                    self.deficits[i] = 0;
                    let at = now + wait;
                    self.rate_wake = Some(self.rate_wake.map_or(at, |w| w.min(at)));
                    continue;
                }
            }
            self.deficits[i] += i64::from(QUANTUM) * i64::from(port.weight);
            let mut served = false;
            while self.deficits[i] > 0 {
                if limited && self.buckets[i].wait(&port).is_some() {
                    break;
                }
                let Some(qpn) = port.pop_ready() else {
                    self.deficits[i] = 0;
                    break;
                };
                let Some(mut vm) = port.try_lock() else {
                    // The VM's control path holds its objects; its turn waits, its deficit stays.
                    port.enqueue(qpn);
                    self.retry_soon = true;
                    break;
                };
                let budget = u32::try_from(self.deficits[i])
                    .unwrap_or(u32::MAX)
                    .clamp(1, self.buckets[i].byte_budget(&port));
                let (bytes_before, wrs_before) = (
                    port.counters.bytes.load(Ordering::Relaxed),
                    port.counters.wrs.load(Ordering::Relaxed),
                );
                let step = self.step(&port, &mut vm, qpn, budget);
                if limited {
                    self.buckets[i].charge(
                        port.counters.bytes.load(Ordering::Relaxed) - bytes_before,
                        port.counters.wrs.load(Ordering::Relaxed) - wrs_before,
                    );
                }
                match step {
                    Step::Idle => {}
                    Step::Progress { cost, more } => {
                        self.deficits[i] -= i64::from(cost);
                        served = true;
                        any = true;
                        if more {
                            port.enqueue(qpn);
                        }
                    }
                    Step::Blocked => {
                        port.enqueue(qpn);
                        self.retry_soon = true;
                        drop(vm);
                        port.deliver_events();
                        break;
                    }
                    Step::Waiting(at) => {
                        self.timers.push(Reverse((at, port.id, qpn)));
                    }
                }
                drop(vm);
                port.deliver_events();
            }
            self.account_wait(i, !served);
            if served {
                self.poll.served.push(i);
            }
        }
        any
    }

    fn account_wait(&mut self, i: usize, waiting: bool) {
        let port = &self.ports[i];
        let waiting = waiting && port.has_work.load(Ordering::Relaxed);
        match (waiting, self.waiting_since[i]) {
            (true, None) => self.waiting_since[i] = Some(Instant::now()),
            (false, Some(since)) => {
                let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
                port.counters.wait_ns.fetch_add(ns, Ordering::Relaxed);
                self.waiting_since[i] = None;
            }
            _ => {}
        }
    }

    /// Advances QP `qpn` of `a` by at most `budget` payload bytes. A QP that will not be
    /// looked at again (idle, or no more work) has its polling word cleared first, and if work
    /// was posted meanwhile without a doorbell, it stays in the rotation.
    fn step(&mut self, a: &Arc<VmPort>, av: &mut Vm, qpn: u32, budget: u32) -> Step {
        let step = self.step_qp(a, av, qpn, budget);
        let going_idle = matches!(step, Step::Idle | Step::Progress { more: false, .. })
            && av.qps.get(qpn).is_some_and(|q| q.rt.sq_polling);
        if going_idle && set_sq_polling(av, &a.mem.memory(), qpn, false) {
            return match step {
                Step::Progress { cost, .. } => Step::Progress { cost, more: true },
                _ => Step::Progress {
                    cost: 0,
                    more: true,
                },
            };
        }
        step
    }

    fn step_qp(&mut self, a: &Arc<VmPort>, av: &mut Vm, qpn: u32, budget: u32) -> Step {
        let a_mem = a.mem.memory();
        let Some(qp) = av.qps.get(qpn) else {
            return Step::Idle;
        };
        let state = qp.state();
        match state {
            qp::State::Err => {
                // Doorbells tell the device about new work to flush; nobody will poll for it.
                set_sq_polling(av, &a_mem, qpn, false);
                completion::flush(av, a, &a_mem, qpn, true, true);
                self.watch_error(a.id, qpn);
                return Step::Idle;
            }
            qp::State::Sqe => {
                set_sq_polling(av, &a_mem, qpn, false);
                completion::flush(av, a, &a_mem, qpn, true, false);
                self.watch_error(a.id, qpn);
                return Step::Idle;
            }
            qp::State::Rts | qp::State::Sqd => {}
            _ => return Step::Idle,
        }
        if let Some(fabric) = &self.fabric {
            let dgid = qp.attr.ah_attr.dgid;
            // A QP that has used the wire stays on it even if its peer's VM attaches here
            // later (its packets then come back to this daemon's own address): its packets in
            // flight and PSNs belong to the wire, and switching would lose them.
            let remote = qp.rt.wire.is_started() || !self.by_gid.contains_key(&dgid);
            if qp.qp_type() == qp::Type::Rc && remote {
                let out = wire::step_rc(fabric, &mut self.tx, a, av, &a_mem, qpn, budget);
                self.tx.batch.flush();
                if let Some(at) = out.timer {
                    self.timers.push(Reverse((at, a.id, qpn)));
                }
                return out.step;
            }
        }
        if !qp.rt.inflight.active {
            if state == qp::State::Sqd {
                let notify = qp.attr.en_sqd_async_notify == 1 && !qp.rt.sqd_notified;
                if notify {
                    if let Some(q) = av.qps.get_mut(qpn) {
                        q.rt.sqd_notified = true;
                    }
                    a.push_event(event::Kind::SqDrained, qpn);
                }
                return Step::Idle;
            }
            match start_wr(av, a, &a_mem, qpn) {
                Start::Started => {
                    set_sq_polling(av, &a_mem, qpn, true);
                }
                Start::Empty => return Step::Idle,
                Start::Failed => {
                    return Step::Progress {
                        cost: WR_COST,
                        more: false,
                    };
                }
            }
        }
        let Some(qp) = av.qps.get(qpn) else {
            return Step::Idle;
        };
        if let Some(at) = qp.rt.inflight.wait_until {
            if at > Instant::now() {
                return Step::Waiting(at);
            }
        }
        self.execute(a, av, &a_mem, qpn, budget)
    }

    fn execute(
        &mut self,
        a: &Arc<VmPort>,
        av: &mut Vm,
        a_mem: &GuestMem,
        qpn: u32,
        budget: u32,
    ) -> Step {
        let Some(qp) = av.qps.get(qpn) else {
            return Step::Idle;
        };
        let limits = qp.send_limits();
        let slot = qp.rt.inflight.slot;
        let Ok(wr) = wqe::decode_send(&slot, limits) else {
            // Decoded once already when the work request started; the copy cannot change.
            fail_wr(
                av,
                a,
                a_mem,
                qpn,
                Status::LocQpOpErr,
                VendorErr::MalformedWqe,
            );
            return Step::Progress {
                cost: WR_COST,
                more: false,
            };
        };
        let qp_type = qp.qp_type();
        let done = qp.rt.inflight.done;
        let pdn = qp.pdn;
        // Where the message goes.
        let (dgid, dest_qpn, qkey) = if qp_type == qp::Type::Ud {
            let Some(ah) = av.ahs.get(wr.header.ah.get()) else {
                fail_wr(av, a, a_mem, qpn, Status::LocQpOpErr, VendorErr::BadAh);
                return Step::Progress {
                    cost: WR_COST,
                    more: false,
                };
            };
            if ah.pdn != pdn {
                fail_wr(av, a, a_mem, qpn, Status::LocQpOpErr, VendorErr::PdMismatch);
                return Step::Progress {
                    cost: WR_COST,
                    more: false,
                };
            }
            let wr_qkey = wr.header.remote_qkey.get();
            // Verbs: a Q_Key with the high bit set means "use the QP's own".
            let qkey = if wr_qkey & 0x8000_0000 != 0 {
                qp.attr.qkey.get()
            } else {
                wr_qkey
            };
            (ah.attr.dgid, wr.header.remote_qpn.get(), qkey)
        } else {
            (qp.attr.ah_attr.dgid, qp.attr.dest_qp_num.get(), 0)
        };
        let len = wr.byte_len;
        // A datagram and an atomic are indivisible; only RC data moves in pieces.
        let n = if qp_type == qp::Type::Ud || wr.opcode.is_atomic() {
            len - done
        } else {
            (len - done).min(budget)
        };
        // The requester's side of this chunk: where its bytes come from or go to.
        let mut a_runs = Runs::default();
        let mut inline = [0u8; crate::limits::MAX_INLINE as usize];
        let mut inline_len = 0usize;
        match wr.payload {
            Payload::Inline(bytes) => {
                let chunk = &bytes[done as usize..(done + n) as usize];
                inline[..chunk.len()].copy_from_slice(chunk);
                inline_len = chunk.len();
            }
            Payload::Sges(sges) => {
                if let Err(v) = xfer::sge_runs(&av.mrs, sges, done, n, &mut a_runs) {
                    fail_wr(av, a, a_mem, qpn, Status::LocProtErr, v);
                    return Step::Progress {
                        cost: WR_COST,
                        more: false,
                    };
                }
            }
        }
        let Some(b) = self.by_gid.get(&dgid).cloned() else {
            if let (Some(fabric), qp::Type::Ud) = (&self.fabric, qp_type) {
                // UD packets carry PSNs too, one per datagram (receivers ignore them).
                let psn = av.qps.get_mut(qpn).map_or(0, |q| {
                    let psn = q.rt.psns.next;
                    q.rt.psns.next = (psn + 1) & qp::MAX_PSN;
                    psn
                });
                let sent = wire::send_ud(
                    fabric,
                    &mut self.tx,
                    a,
                    av,
                    a_mem,
                    &wr,
                    dgid,
                    dest_qpn,
                    qkey,
                    qpn,
                    psn,
                );
                self.tx.batch.flush();
                if let Err(v) = sent {
                    fail_wr(av, a, a_mem, qpn, Status::LocProtErr, v);
                    return Step::Progress {
                        cost: WR_COST,
                        more: false,
                    };
                }
                a.counters
                    .bytes
                    .fetch_add(u64::from(len), Ordering::Relaxed);
                let more = complete_wr(av, a, a_mem, qpn, &wr, Status::Success, VendorErr::None);
                return Step::Progress {
                    cost: len + WR_COST,
                    more,
                };
            }
            return self.no_responder(a, av, a_mem, qpn, qp_type);
        };
        let same = b.id == a.id;
        let b_mem_guard;
        let b_mem: &GuestMem = if same {
            a_mem
        } else {
            b_mem_guard = b.mem.memory();
            &b_mem_guard
        };
        let mut b_lock = if same {
            None
        } else {
            match b.try_lock() {
                Some(g) => Some(g),
                None => return Step::Blocked,
            }
        };
        let bv: &mut Vm = match b_lock.as_mut() {
            Some(g) => g,
            None => av,
        };
        let ctx = Chunk {
            a_id: a.id,
            a_gid: a.gid,
            a_qpn: qpn,
            qp_type,
            opcode: wr.opcode,
            header: &wr.header,
            solicited: wr.flags.contains(SendFlags::SOLICITED),
            len,
            done,
            n,
            last: done + n == len,
            qkey,
            a_runs: &a_runs,
            inline: &inline[..inline_len],
            is_inline: matches!(wr.payload, Payload::Inline(_)),
            a_mem,
            b_mem,
        };
        let mut atomic_result = 0u64;
        let resp = respond(bv, &b, dest_qpn, &ctx, &mut atomic_result);
        if let Some(g) = b_lock.take() {
            drop(g);
            b.deliver_events();
        }
        // Back on the requester's side (if `same`, `bv` was `av` and its borrow has ended).
        match resp {
            Resp::Done | Resp::Dropped => {
                if matches!(
                    wr.opcode,
                    Opcode::AtomicCmpAndSwp | Opcode::AtomicFetchAndAdd
                ) && xfer::write_runs(&atomic_result.to_ne_bytes(), a_mem, a_runs.as_slice())
                    .is_err()
                {
                    fail_wr(
                        av,
                        a,
                        a_mem,
                        qpn,
                        Status::LocProtErr,
                        VendorErr::GuestMemory,
                    );
                    return Step::Progress {
                        cost: WR_COST + n,
                        more: false,
                    };
                }
                a.counters.bytes.fetch_add(u64::from(n), Ordering::Relaxed);
                let Some(qp) = av.qps.get_mut(qpn) else {
                    return Step::Idle;
                };
                qp.rt.inflight.done = done + n;
                if qp.rt.inflight.done < len && !matches!(resp, Resp::Dropped) {
                    return Step::Progress {
                        cost: n,
                        more: true,
                    };
                }
                let more = complete_wr(av, a, a_mem, qpn, &wr, Status::Success, VendorErr::None);
                Step::Progress {
                    cost: n + WR_COST,
                    more,
                }
            }
            Resp::Busy => Step::Blocked,
            Resp::LocalFault(v) => {
                fail_wr(av, a, a_mem, qpn, Status::LocProtErr, v);
                Step::Progress {
                    cost: WR_COST,
                    more: false,
                }
            }
            Resp::NoResponder => self.no_responder(a, av, a_mem, qpn, qp_type),
            Resp::Rnr(micros) => {
                let Some(qp) = av.qps.get_mut(qpn) else {
                    return Step::Idle;
                };
                if !take_rnr_retry(qp.attr.rnr_retry, &mut qp.rt.inflight.rnr_left) {
                    fail_wr(
                        av,
                        a,
                        a_mem,
                        qpn,
                        Status::RnrRetryExcErr,
                        VendorErr::RnrExhausted,
                    );
                    return Step::Progress {
                        cost: WR_COST,
                        more: false,
                    };
                }
                let at = Instant::now() + Duration::from_micros(micros.into());
                qp.rt.inflight.wait_until = Some(at);
                Step::Waiting(at)
            }
            Resp::Nak(status, vendor) => {
                fail_wr(av, a, a_mem, qpn, status, vendor);
                Step::Progress {
                    cost: WR_COST,
                    more: false,
                }
            }
        }
    }

    /// Nobody answered: UD drops the datagram and completes; RC retries after its ACK timeout
    /// and gives up with RETRY_EXC_ERR after `retry_cnt` retries, as an RNIC does.
    fn no_responder(
        &mut self,
        a: &VmPort,
        av: &mut Vm,
        a_mem: &GuestMem,
        qpn: u32,
        qp_type: qp::Type,
    ) -> Step {
        if qp_type == qp::Type::Ud {
            a.counters.ud_dropped.fetch_add(1, Ordering::Relaxed);
            let Some(qp) = av.qps.get(qpn) else {
                return Step::Idle;
            };
            let limits = qp.send_limits();
            let slot = qp.rt.inflight.slot;
            let Ok(wr) = wqe::decode_send(&slot, limits) else {
                return Step::Idle;
            };
            let more = complete_wr(av, a, a_mem, qpn, &wr, Status::Success, VendorErr::None);
            return Step::Progress {
                cost: WR_COST,
                more,
            };
        }
        let Some(qp) = av.qps.get_mut(qpn) else {
            return Step::Idle;
        };
        if qp.rt.inflight.retries_left == 0 {
            fail_wr(
                av,
                a,
                a_mem,
                qpn,
                Status::RetryExcErr,
                VendorErr::PeerUnreachable,
            );
            return Step::Progress {
                cost: WR_COST,
                more: false,
            };
        }
        qp.rt.inflight.retries_left -= 1;
        let wait = qp::ack_timeout_micros(qp.attr.timeout)
            .unwrap_or(10_000)
            .clamp(100, 1_000_000);
        let at = Instant::now() + Duration::from_micros(wait);
        qp.rt.inflight.wait_until = Some(at);
        debug!(
            "vm {}: QP {qpn:#x} has no responder; retrying in {wait} µs",
            a.name
        );
        Step::Waiting(at)
    }
}

/// Takes one RNR retry from `left` for a QP whose `rnr_retry` attribute is `rnr_retry` (7 is
/// infinite). Returns false when none is left: the work request fails with
/// RNR_RETRY_EXC_ERR.
pub(crate) fn take_rnr_retry(rnr_retry: u8, left: &mut u8) -> bool {
    if rnr_retry == qp::RNR_RETRY_INFINITE {
        return true;
    }
    let Some(fewer) = left.checked_sub(1) else {
        return false;
    };
    *left = fewer;
    true
}

/// Sets or clears QP `qpn`'s send-ring polling word (`ring::SEND_POLLING_OFFSET`), writing
/// guest memory only when it changes. Clearing returns whether work was posted meanwhile: the
/// driver stores its producer index, fences and loads the word, and the device clears the
/// word, fences and loads the producer index, so one of the two always sees the other (as
/// with virtio's `NO_NOTIFY`).
pub(crate) fn set_sq_polling(av: &mut Vm, mem: &GuestMem, qpn: u32, on: bool) -> bool {
    let Some(qp) = av.qps.get_mut(qpn) else {
        return false;
    };
    if qp.rt.sq_polling == on {
        return false;
    }
    qp.rt.sq_polling = on;
    let word = GuestAddress(qp.sq_ring_addr + vrdma_proto::ring::SEND_POLLING_OFFSET);
    let _ = mem.store(u32::from(on), word, Ordering::SeqCst);
    if on {
        return false;
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    load_producer(mem, qp.sq_ring_addr).is_some_and(|p| p != qp.rt.sq_head)
}

enum Start {
    Started,
    Empty,
    Failed,
}

/// Turns `port`'s doorbell kicks on or off. With `on`, returns whether doorbells arrived
/// while they were off.
fn set_kicks(port: &VmPort, on: bool) -> bool {
    let mem = port.mem.memory();
    let mut pending = false;
    for vring in port.doorbell_vrings() {
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
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

/// Takes the doorbells waiting on `port`'s doorbell queues. Returns whether there were any.
fn drain_pending(port: &VmPort) -> bool {
    let mem = port.mem.memory();
    let mut any = false;
    for vring in port.doorbell_vrings() {
        if has_pending(vring, &mem) {
            any |= port.drain_doorbells(vring) > 0;
        }
    }
    any
}

/// Whether `vring` is ready and has doorbells the daemon has not taken. Checked before locking
/// the vring for writing, so an idle poll costs two loads; a driver whose available index is
/// impossible gets nothing polled (its kicks still reach the worker, which reports it).
fn has_pending(vring: &crate::port::Vring, mem: &GuestMem) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    if !queue.ready() {
        return false;
    }
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => {
            let ahead = idx.0.wrapping_sub(queue.next_avail());
            ahead != 0 && ahead <= queue.size()
        }
        Err(_) => false,
    }
}

/// Takes the next send work request of QP `qpn` off its ring, checks it, and makes it the one
/// in progress.
fn start_wr(av: &mut Vm, a: &VmPort, a_mem: &GuestMem, qpn: u32) -> Start {
    let Some(qp) = av.qps.get(qpn) else {
        return Start::Empty;
    };
    let Some(geometry) = qp.sq_geometry() else {
        return Start::Empty;
    };
    let Some(producer) = load_producer(a_mem, qp.sq_ring_addr) else {
        ring_fatal(av, a, a_mem, qpn, VendorErr::GuestMemory);
        return Start::Failed;
    };
    match geometry.occupancy(producer, qp.rt.sq_head) {
        Ok(0) => return Start::Empty,
        Ok(_) => {}
        Err(_) => {
            ring_fatal(av, a, a_mem, qpn, VendorErr::RingOverrun);
            return Start::Failed;
        }
    }
    let stride = geometry.stride() as usize;
    let at = GuestAddress(qp.sq_ring_addr + geometry.entry_offset(qp.rt.sq_head));
    let mut slot = [0u8; MAX_SEND_SLOT];
    if stride > MAX_SEND_SLOT || a_mem.read_slice(&mut slot[..stride], at).is_err() {
        ring_fatal(av, a, a_mem, qpn, VendorErr::GuestMemory);
        return Start::Failed;
    }
    let limits = qp.send_limits();
    let (retry, rnr) = (qp.attr.retry_cnt, qp.attr.rnr_retry);
    let (pdn, qp_type) = (qp.pdn, qp.qp_type());
    let checked = match wqe::decode_send(&slot[..stride], limits) {
        Err(_) => Err((Status::LocQpOpErr, VendorErr::MalformedWqe)),
        Ok(wr) => check_wr(av, pdn, qp_type, &wr),
    };
    let Some(qp) = av.qps.get_mut(qpn) else {
        return Start::Empty;
    };
    let inflight = &mut qp.rt.inflight;
    inflight.slot = slot;
    inflight.active = true;
    inflight.done = 0;
    inflight.retries_left = retry;
    inflight.rnr_left = rnr;
    inflight.wait_until = None;
    match checked {
        Ok(()) => Start::Started,
        Err((status, vendor)) => {
            fail_wr(av, a, a_mem, qpn, status, vendor);
            Start::Failed
        }
    }
}

/// The requester-side checks of a work request, before any byte moves.
pub(crate) fn check_wr(
    av: &Vm,
    pdn: u32,
    qp_type: qp::Type,
    wr: &wqe::SendWr<'_>,
) -> Result<(), (Status, VendorErr)> {
    if qp_type == qp::Type::Ud && !wr.opcode.allowed_on_ud() {
        return Err((Status::LocQpOpErr, VendorErr::BadOpcodeForQp));
    }
    if wr.byte_len > crate::limits::MAX_MSG_SIZE {
        return Err((Status::LocLenErr, VendorErr::MessageTooLong));
    }
    if qp_type == qp::Type::Ud && wr.byte_len > vrdma_proto::config::Mtu::Mtu4096.bytes() {
        return Err((Status::LocLenErr, VendorErr::MessageTooLong));
    }
    if wr.opcode.is_atomic() && wr.byte_len != wqe::ATOMIC_SIZE {
        return Err((Status::LocLenErr, VendorErr::BadAtomic));
    }
    if let Payload::Sges(sges) = wr.payload {
        let need = if wr.opcode.writes_local() {
            Access::LOCAL_WRITE
        } else {
            Access::empty()
        };
        for sge in sges.iter() {
            xfer::check_local(&av.mrs, pdn, &sge, need).map_err(|(access, v)| {
                (
                    if access {
                        Status::LocAccessErr
                    } else {
                        Status::LocProtErr
                    },
                    v,
                )
            })?;
        }
    }
    Ok(())
}

/// Everything the responder needs about one chunk.
pub(crate) struct Chunk<'a> {
    pub(crate) a_id: u64,
    pub(crate) a_gid: Gid,
    pub(crate) a_qpn: u32,
    pub(crate) qp_type: qp::Type,
    pub(crate) opcode: Opcode,
    pub(crate) header: &'a wqe::SendHeader,
    pub(crate) solicited: bool,
    pub(crate) len: u32,
    pub(crate) done: u32,
    pub(crate) n: u32,
    /// Whether this chunk ends the message.
    pub(crate) last: bool,
    pub(crate) qkey: u32,
    pub(crate) a_runs: &'a Runs,
    pub(crate) inline: &'a [u8],
    pub(crate) is_inline: bool,
    pub(crate) a_mem: &'a GuestMem,
    pub(crate) b_mem: &'a GuestMem,
}

impl Chunk<'_> {
    fn last(&self) -> bool {
        self.last
    }

    /// Copies this chunk's payload from the requester into `dst`; an error names whose memory
    /// failed (`Side::Source` is the requester's).
    fn copy_into(&self, dst: &Runs) -> Result<(), (xfer::Side, VendorErr)> {
        if self.is_inline {
            xfer::write_runs(self.inline, self.b_mem, dst.as_slice())
                .map_err(|v| (xfer::Side::Destination, v))
        } else {
            xfer::copy_runs(
                self.a_mem,
                self.a_runs.as_slice(),
                self.b_mem,
                dst.as_slice(),
            )
            .map(|_| ())
        }
    }
}

/// The responder: applies one chunk to QP `dest_qpn` of VM `bv`.
pub(crate) fn respond(
    bv: &mut Vm,
    b: &VmPort,
    dest_qpn: u32,
    c: &Chunk<'_>,
    atomic_result: &mut u64,
) -> Resp {
    // Nobody to take the message: a datagram is lost (and counted), an RC request unanswered.
    let unanswered = || {
        if c.qp_type == qp::Type::Ud {
            b.counters.ud_dropped.fetch_add(1, Ordering::Relaxed);
            Resp::Dropped
        } else {
            Resp::NoResponder
        }
    };
    let Some(qp) = bv.qps.get(dest_qpn) else {
        return unanswered();
    };
    if qp.qp_type() != c.qp_type {
        return unanswered();
    }
    let ready = match qp.state() {
        qp::State::Rtr | qp::State::Rts | qp::State::Sqd => true,
        qp::State::Sqe => c.qp_type == qp::Type::Ud,
        _ => false,
    };
    if !ready {
        return unanswered();
    }
    if c.qp_type == qp::Type::Ud {
        return respond_ud(bv, b, dest_qpn, c);
    }
    // An RC QP answers only the QP it is connected to: anything else could be another tenant
    // injecting into the connection, and gets no answer, as a packet for another connection.
    if qp.attr.dest_qp_num.get() != c.a_qpn || qp.attr.ah_attr.dgid != c.a_gid {
        return unanswered();
    }
    if let Some((port_id, qpn, at)) = qp.rt.rx_owner {
        if (port_id, qpn) != (c.a_id, c.a_qpn) && at.elapsed() < OWNER_STALE {
            return Resp::Busy;
        }
    }
    let b_pdn = qp.pdn;
    let b_access = Access::from_bits_truncate(qp.attr.qp_access_flags.get());
    let min_rnr = qp::rnr_timer_micros(qp.attr.min_rnr_timer);
    let remote_need = match c.opcode {
        Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => Some(Access::REMOTE_WRITE),
        Opcode::RdmaRead => Some(Access::REMOTE_READ),
        Opcode::AtomicCmpAndSwp | Opcode::AtomicFetchAndAdd => Some(Access::REMOTE_ATOMIC),
        Opcode::Send | Opcode::SendWithImm => None,
    };
    let consumes_recv = matches!(
        c.opcode,
        Opcode::Send | Opcode::SendWithImm | Opcode::RdmaWriteWithImm
    );
    // Take the receive at the message's first chunk and keep it to its last.
    let mut recv = RecvCopy::default();
    if consumes_recv {
        match take_recv(bv, dest_qpn, c.b_mem) {
            Ok(Some(r)) => recv = r,
            Ok(None) => return Resp::Rnr(min_rnr),
            Err(v) => {
                responder_error(bv, b, c.b_mem, dest_qpn, None, v);
                return Resp::Nak(Status::RemOpErr, v);
            }
        }
        if c.opcode != Opcode::RdmaWriteWithImm && recv.room < c.len {
            responder_error(
                bv,
                b,
                c.b_mem,
                dest_qpn,
                Some((recv.wr_id, Status::LocLenErr)),
                VendorErr::RecvTooSmall,
            );
            return Resp::Nak(Status::RemInvReqErr, VendorErr::RecvTooSmall);
        }
        if let Some(qp) = bv.qps.get_mut(dest_qpn) {
            qp.rt.rx_owner = Some((c.a_id, c.a_qpn, Instant::now()));
        }
    }
    let mut b_runs = Runs::default();
    // A zero-length RDMA operation names no memory: its R_Key and address are not checked
    // (IBA C9-88), so a 0-byte WRITE with immediate works as a doorbell with any R_Key.
    let names_memory = c.len > 0 || c.opcode.is_atomic();
    if let Some(need) = remote_need.filter(|_| names_memory) {
        let rkey = c.header.rkey.get();
        let raddr = c.header.remote_addr.get();
        let check = bv.mrs.get(rkey).ok_or(VendorErr::BadRkey).and_then(|mr| {
            if mr.pdn != b_pdn {
                Err(VendorErr::PdMismatch)
            } else if !mr.access().contains(need) || !b_access.contains(need) {
                Err(VendorErr::RemoteAccess)
            } else if !mr.contains(raddr, c.len.into()) {
                Err(VendorErr::RemoteOutOfBounds)
            } else {
                Ok(mr)
            }
        });
        let mr = match check {
            Ok(mr) => mr,
            Err(v) => {
                responder_error(bv, b, c.b_mem, dest_qpn, None, v);
                b.push_event(event::Kind::QpAccessErr, dest_qpn);
                return Resp::Nak(Status::RemAccessErr, v);
            }
        };
        if c.opcode.is_atomic() && raddr % 8 != 0 {
            responder_error(bv, b, c.b_mem, dest_qpn, None, VendorErr::BadAtomic);
            b.push_event(event::Kind::QpReqErr, dest_qpn);
            return Resp::Nak(Status::RemInvReqErr, VendorErr::BadAtomic);
        }
        if let Err(v) = xfer::mr_runs(mr, raddr + u64::from(c.done), c.n, &mut b_runs) {
            return Resp::Nak(Status::RemAccessErr, v);
        }
    } else if let Err(v) = xfer::sge_iter_runs(
        &bv.mrs,
        recv.sges[..recv.n].iter().copied(),
        c.done,
        c.n,
        &mut b_runs,
    ) {
        responder_error(
            bv,
            b,
            c.b_mem,
            dest_qpn,
            Some((recv.wr_id, Status::LocProtErr)),
            v,
        );
        return Resp::Nak(Status::RemOpErr, v);
    }
    // Move the bytes.
    // Move the bytes. `Ok(Err(side))` names whose memory failed: the requester's own memory is
    // its local protection error and leaves the responder alone.
    let requester_side = |side: xfer::Side, requester_is_source: bool| {
        (side == xfer::Side::Source) == requester_is_source
    };
    let moved: Result<(), (bool, VendorErr)> = match c.opcode {
        Opcode::Send | Opcode::SendWithImm | Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => c
            .copy_into(&b_runs)
            .map_err(|(side, v)| (requester_side(side, true), v)),
        Opcode::RdmaRead => {
            xfer::copy_runs(c.b_mem, b_runs.as_slice(), c.a_mem, c.a_runs.as_slice())
                .map(|_| ())
                .map_err(|(side, v)| (requester_side(side, false), v))
        }
        Opcode::AtomicCmpAndSwp | Opcode::AtomicFetchAndAdd => {
            let gpa = b_runs.as_slice().first().map(|r| r.gpa).unwrap_or(0);
            let (compare_add, swap) = (c.header.compare_add.get(), c.header.swap.get());
            xfer::with_atomic(c.b_mem, gpa, |atomic| {
                *atomic_result = if c.opcode == Opcode::AtomicCmpAndSwp {
                    xfer::compare_swap(atomic, compare_add, swap)
                } else {
                    atomic.fetch_add(compare_add, Ordering::SeqCst)
                };
            })
            .map_err(|v| (false, v))
        }
    };
    match moved {
        Ok(()) => {}
        Err((true, v)) => {
            // The responder keeps its receive for the next message.
            if let Some(qp) = bv.qps.get_mut(dest_qpn) {
                qp.rt.rx_owner = None;
            }
            return Resp::LocalFault(v);
        }
        Err((false, v)) => {
            responder_error(
                bv,
                b,
                c.b_mem,
                dest_qpn,
                consumes_recv.then_some((recv.wr_id, Status::LocProtErr)),
                v,
            );
            return Resp::Nak(Status::RemAccessErr, v);
        }
    }
    if consumes_recv && c.last() {
        let (opcode, byte_len) = if c.opcode == Opcode::RdmaWriteWithImm {
            (cqe::Opcode::RecvRdmaWithImm, c.len)
        } else {
            (cqe::Opcode::Recv, c.len)
        };
        let mut done = Completion::new(
            recv.wr_id,
            dest_qpn,
            Status::Success,
            opcode,
            VendorErr::None,
        );
        done.cqe.byte_len = byte_len.into();
        done.cqe.src_qp = c.a_qpn.into();
        if c.opcode.has_imm() {
            done.cqe.imm_data = c.header.imm_data;
            done.cqe.wc_flags = cqe::Flags::WITH_IMM.bits();
        }
        done.solicited = c.solicited;
        finish_recv(bv, b, c.b_mem, dest_qpn, &done);
    }
    Resp::Done
}

/// UD: the whole datagram in one step, or dropped as an unreliable network would.
fn respond_ud(bv: &mut Vm, b: &VmPort, dest_qpn: u32, c: &Chunk<'_>) -> Resp {
    let Some(qp) = bv.qps.get(dest_qpn) else {
        return Resp::Dropped;
    };
    if qp.attr.qkey.get() != c.qkey {
        b.counters.ud_dropped.fetch_add(1, Ordering::Relaxed);
        return Resp::Dropped;
    }
    let recv = match take_recv(bv, dest_qpn, c.b_mem) {
        Ok(Some(r)) => r,
        Ok(None) | Err(_) => {
            b.counters.ud_dropped.fetch_add(1, Ordering::Relaxed);
            return Resp::Dropped;
        }
    };
    let total = c.len + GRH_SIZE;
    if recv.room < total {
        let mut bad = Completion::new(
            recv.wr_id,
            dest_qpn,
            Status::LocLenErr,
            cqe::Opcode::Recv,
            VendorErr::RecvTooSmall,
        );
        bad.solicited = true;
        finish_recv(bv, b, c.b_mem, dest_qpn, &bad);
        return Resp::Done;
    }
    let mut b_runs = Runs::default();
    let grh = grh(c.a_gid, b.gid, c.len);
    let result = xfer::sge_iter_runs(
        &bv.mrs,
        recv.sges[..recv.n].iter().copied(),
        0,
        total,
        &mut b_runs,
    )
    .and_then(|()| {
        let mut head = Runs::default();
        xfer::sge_iter_runs(
            &bv.mrs,
            recv.sges[..recv.n].iter().copied(),
            0,
            GRH_SIZE,
            &mut head,
        )?;
        xfer::write_runs(&grh, c.b_mem, head.as_slice())?;
        let mut body = Runs::default();
        xfer::sge_iter_runs(
            &bv.mrs,
            recv.sges[..recv.n].iter().copied(),
            GRH_SIZE,
            c.len,
            &mut body,
        )?;
        c.copy_into(&body).map_err(|(_, v)| v)
    });
    let mut done = match result {
        Ok(()) => {
            let mut ok = Completion::new(
                recv.wr_id,
                dest_qpn,
                Status::Success,
                cqe::Opcode::Recv,
                VendorErr::None,
            );
            ok.cqe.byte_len = total.into();
            ok.cqe.src_qp = c.a_qpn.into();
            ok.cqe.sgid = c.a_gid;
            let mut flags = cqe::Flags::GRH;
            if c.opcode.has_imm() {
                ok.cqe.imm_data = c.header.imm_data;
                flags |= cqe::Flags::WITH_IMM;
            }
            ok.cqe.wc_flags = flags.bits();
            ok.solicited = c.solicited;
            ok
        }
        Err(v) => Completion::new(
            recv.wr_id,
            dest_qpn,
            Status::LocProtErr,
            cqe::Opcode::Recv,
            v,
        ),
    };
    done.cqe.qp_num = dest_qpn.into();
    finish_recv(bv, b, c.b_mem, dest_qpn, &done);
    Resp::Done
}

/// The 40-byte GRH a UD receive buffer starts with, in IPv6 form (RoCEv2 over IPv4 puts its
/// IPv4 header in the last 20 bytes instead; vrdma always writes the GID form).
fn grh(sgid: Gid, dgid: Gid, payload: u32) -> [u8; GRH_SIZE as usize] {
    let mut h = [0u8; GRH_SIZE as usize];
    h[0] = 0x60; // IP version 6
    let len = u16::try_from(payload).unwrap_or(u16::MAX).to_be_bytes();
    h[4..6].copy_from_slice(&len);
    h[6] = 0x1b; // next header: IB BTH
    h[7] = 64; // hop limit
    h[8..24].copy_from_slice(&sgid.0);
    h[24..40].copy_from_slice(&dgid.0);
    h
}

/// Reads the receive work request at the head of QP `qpn`'s receive ring without consuming it,
/// with its SGEs checked against the QP's PD and local-write rights.
pub(crate) fn take_recv(bv: &Vm, qpn: u32, mem: &GuestMem) -> Result<Option<RecvCopy>, VendorErr> {
    let Some(qp) = bv.qps.get(qpn) else {
        return Ok(None);
    };
    let Some(geometry) = qp.rq_geometry() else {
        return Ok(None);
    };
    let producer = load_producer(mem, qp.rq_ring_addr).ok_or(VendorErr::GuestMemory)?;
    match geometry.occupancy(producer, qp.rt.rq_done) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(_) => return Err(VendorErr::RingOverrun),
    }
    let stride = geometry.stride() as usize;
    let mut slot = [0u8; wqe::recv_stride(crate::limits::MAX_SGE) as usize];
    let at = GuestAddress(qp.rq_ring_addr + geometry.entry_offset(qp.rt.rq_done));
    if stride > slot.len() || mem.read_slice(&mut slot[..stride], at).is_err() {
        return Err(VendorErr::GuestMemory);
    }
    let wr = wqe::decode_recv(&slot[..stride], qp.caps.max_recv_sge.get())
        .map_err(|_| VendorErr::MalformedWqe)?;
    let mut copy = RecvCopy {
        wr_id: wr.wr_id,
        n: wr.sges.len(),
        room: wr.byte_len,
        ..RecvCopy::default()
    };
    for (i, sge) in wr.sges.iter().enumerate() {
        copy.sges[i] = sge;
        xfer::check_local(&bv.mrs, qp.pdn, &sge, Access::LOCAL_WRITE).map_err(|(_, v)| v)?;
    }
    Ok(Some(copy))
}

/// Completes the receive at the head of QP `qpn`'s ring with `c` and consumes it.
pub(crate) fn finish_recv(bv: &mut Vm, b: &VmPort, mem: &GuestMem, qpn: u32, c: &Completion) {
    let Some(qp) = bv.qps.get_mut(qpn) else {
        return;
    };
    let (cqn, ring_addr) = (qp.recv_cqn, qp.rq_ring_addr);
    qp.rt.rq_done = qp.rt.rq_done.wrapping_add(1);
    qp.rt.rx_owner = None;
    // As for sends: the slot is free before the completion says so.
    publish_consumer(mem, ring_addr, qp.rt.rq_done);
    if !completion::post(bv, b, mem, cqn, c) {
        set_error(bv, b, qpn);
    }
}

/// The responder found an error: complete its receive (if it has taken one) with `recv_status`,
/// and move its QP to the error state.
pub(crate) fn responder_error(
    bv: &mut Vm,
    b: &VmPort,
    mem: &GuestMem,
    qpn: u32,
    recv: Option<(u64, Status)>,
    v: VendorErr,
) {
    if let Some((wr_id, status)) = recv {
        let c = Completion::new(wr_id, qpn, status, cqe::Opcode::Recv, v);
        finish_recv(bv, b, mem, qpn, &c);
    }
    set_error(bv, b, qpn);
}

/// Moves QP `qpn` to ERR and queues it, so the scheduler flushes it and keeps flushing what
/// the driver posts later, whatever path took it there.
pub(crate) fn set_error(vm: &mut Vm, port: &VmPort, qpn: u32) {
    if let Some(qp) = vm.qps.get_mut(qpn) {
        qp.attr.qp_state = qp::State::Err.raw();
        qp.rt.rx_owner = None;
        port.enqueue(qpn);
    }
}

/// Completes QP `qpn`'s work request in progress and consumes it. Returns whether more work
/// requests are waiting.
pub(crate) fn complete_wr(
    av: &mut Vm,
    a: &VmPort,
    mem: &GuestMem,
    qpn: u32,
    wr: &wqe::SendWr<'_>,
    status: Status,
    v: VendorErr,
) -> bool {
    let Some(qp) = av.qps.get_mut(qpn) else {
        return false;
    };
    let signaled =
        qp.sq_sig_all || wr.flags.contains(SendFlags::SIGNALED) || status != Status::Success;
    let (cqn, ring_addr) = (qp.send_cqn, qp.sq_ring_addr);
    qp.rt.inflight.active = false;
    qp.rt.sq_head = qp.rt.sq_head.wrapping_add(1);
    let head = qp.rt.sq_head;
    // The slot is free before its completion is visible: a driver that polls the completion
    // and posts at once must find room, as on hardware. The CQ producer's release store
    // carries this store to the driver's acquire load.
    publish_consumer(mem, ring_addr, head);
    a.counters.wrs.fetch_add(1, Ordering::Relaxed);
    if signaled {
        let mut c = Completion::new(
            wr.header.wr_id.get(),
            qpn,
            status,
            cqe::Opcode::of_send(wr.opcode),
            v,
        );
        if status == Status::Success {
            let byte_len = if wr.opcode.is_atomic() {
                wqe::ATOMIC_SIZE
            } else {
                wr.byte_len
            };
            c.cqe.byte_len = byte_len.into();
        }
        if !completion::post(av, a, mem, cqn, &c) {
            set_error(av, a, qpn);
            return true;
        }
    }
    // In SQD the QP must be looked at once more, to raise SqDrained once it is idle.
    let draining = av.qps.get(qpn).is_some_and(|q| q.state() == qp::State::Sqd);
    draining || load_producer(mem, ring_addr).is_some_and(|p| p != head)
}

/// Fails QP `qpn`'s work request in progress with `status` and takes the QP to the error state
/// (SQE for UD), flushing what remains.
pub(crate) fn fail_wr(
    av: &mut Vm,
    a: &VmPort,
    mem: &GuestMem,
    qpn: u32,
    status: Status,
    v: VendorErr,
) {
    let Some(qp) = av.qps.get(qpn) else { return };
    let (qp_type, active) = (qp.qp_type(), qp.rt.inflight.active);
    if active {
        let limits = qp.send_limits();
        let slot = qp.rt.inflight.slot;
        let header = wqe::SendHeader::read_from_prefix(&slot)
            .map(|(h, _)| h)
            .unwrap_or_default();
        let opcode = wqe::Opcode::from_raw(header.opcode).unwrap_or(Opcode::Send);
        match wqe::decode_send(&slot, limits) {
            Ok(wr) => {
                complete_wr(av, a, mem, qpn, &wr, status, v);
            }
            Err(_) => {
                // A malformed request still completes, with what can be read of it.
                let c = Completion::new(
                    header.wr_id.get(),
                    qpn,
                    status,
                    cqe::Opcode::of_send(opcode),
                    v,
                );
                let cqn = qp.send_cqn;
                let ring_addr = qp.sq_ring_addr;
                // As for every completion: the slot is free before the completion says so.
                if let Some(qp) = av.qps.get_mut(qpn) {
                    qp.rt.inflight.active = false;
                    qp.rt.sq_head = qp.rt.sq_head.wrapping_add(1);
                    publish_consumer(mem, ring_addr, qp.rt.sq_head);
                }
                completion::post(av, a, mem, cqn, &c);
            }
        }
    }
    debug!(
        "vm {}: QP {qpn:#x} failed a work request: {status:?} ({v:?})",
        a.name
    );
    let Some(qp) = av.qps.get_mut(qpn) else {
        return;
    };
    qp.rt.inflight.active = false;
    if qp_type == qp::Type::Ud {
        qp.attr.qp_state = qp::State::Sqe.raw();
        a.enqueue(qpn);
        completion::flush(av, a, mem, qpn, true, false);
    } else {
        set_error(av, a, qpn);
        completion::flush(av, a, mem, qpn, true, true);
    }
}

/// The QP's ring is unusable (overrun or unmapped): error state and a QP_FATAL event.
pub(crate) fn ring_fatal(av: &mut Vm, a: &VmPort, mem: &GuestMem, qpn: u32, v: VendorErr) {
    warn!(
        "vm {}: QP {qpn:#x}'s send ring is unusable ({v:?}); the QP goes to the error state",
        a.name
    );
    set_error(av, a, qpn);
    if let Some(qp) = av.qps.get_mut(qpn) {
        qp.rt.sq_dead = true;
        qp.rt.inflight.active = false;
    }
    a.push_event(event::Kind::QpFatal, qpn);
    completion::flush(av, a, mem, qpn, false, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    #[test]
    fn rnr_retries_run_out_unless_infinite() {
        let mut left = 2;
        assert!(take_rnr_retry(2, &mut left));
        assert!(take_rnr_retry(2, &mut left));
        assert!(!take_rnr_retry(2, &mut left), "two retries, then none");
        assert_eq!(left, 0);
        let mut none = 0;
        for _ in 0..100 {
            assert!(take_rnr_retry(qp::RNR_RETRY_INFINITE, &mut none));
        }
    }

    #[test]
    fn grh_carries_both_gids_and_the_payload_length() {
        let s = Gid::from_ipv4([10, 0, 0, 1]);
        let d = Gid::from_ipv4([10, 0, 0, 2]);
        let h = grh(s, d, 300);
        assert_eq!(h[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), 300);
        assert_eq!(&h[8..24], s.as_bytes());
        assert_eq!(&h[24..40], d.as_bytes());
    }
}
