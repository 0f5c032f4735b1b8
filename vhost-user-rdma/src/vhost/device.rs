//! The vhost-user device of one VM: features, config space, and the virtqueues.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vrdma_proto::cmd::{self, RespHeader, Status};
use vrdma_proto::{config, features, queue};
use zerocopy::IntoBytes;

use super::queues::{DoorbellQueues, EventQueue, Vring, take_available};
use crate::config::VmConfig;
use crate::model::control::ControlEnv;
use crate::model::hooks::ObjectHooks;
use crate::model::memory::{self, GuestMem, GuestMemAtomic, WriteKind};
use crate::model::objects::{Failure, port_attr};
use crate::model::state::{self, BadRing};
use crate::model::vm::Vm;
use crate::rnic::completion::set_error;
use crate::sched::Scheduler;

/// The most device-readable bytes a control chain may carry: a `REG_MR` with the longest page
/// list. Anything longer is refused before it is copied.
const MAX_COMMAND_BYTES: usize =
    size_of::<cmd::Header>() + size_of::<cmd::RegMr>() + cmd::MAX_PAGE_LIST as usize * 8;

/// Why the device could not service a virtqueue.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The frontend kicked a queue the device does not have.
    #[error("kick on virtqueue {0}, which this device does not have")]
    UnknownQueue(u16),
    /// An event other than "readable" arrived on a kick eventfd.
    #[error("unexpected epoll event {0:?} on a virtqueue kick")]
    UnexpectedEvent(EventSet),
    /// No memory table has been received yet.
    #[error("the frontend kicked a queue before sending its memory table")]
    NoMemory,
    /// The frontend asked for a state transfer this device does not do.
    #[error(
        "device state transfer in phase {0:?} is not supported: vrdma transfers its state only with the VM stopped"
    )]
    TransferPhase(VhostTransferStatePhase),
    /// `CHECK_DEVICE_STATE` without a transfer before it.
    #[error("the frontend checked a device state transfer it never started")]
    NoTransfer,
    /// Saving or loading the device state failed.
    #[error("migrating VM {vm}: {reason}")]
    Migration {
        /// The VM.
        vm: String,
        /// What went wrong, with its causes.
        reason: String,
    },
    /// The virtqueue itself is broken (bad descriptor table or rings).
    #[error("virtqueue {queue} is unusable")]
    Queue {
        /// Which queue.
        queue: u16,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// The device offered `SYNC_RECV` and the driver did not accept it.
    #[error(
        "vm {vm}: the driver set the features to {acked:#x}, without SYNC_RECV: this \
         fabric posts receives to its NIC ahead of arrival and learns of them only from \
         POST_RECV commands, so the driver must support SYNC_RECV; refusing it (update the \
         guest's vrdma driver, or serve this VM from a daemon with the soft fabric)"
    )]
    SyncReceivesRefused {
        /// The VM.
        vm: String,
        /// The features the VMM set.
        acked: u64,
    },
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::other(e)
    }
}

/// One VM's device. A new one is made for each vhost-user connection, so nothing from a
/// previous connection survives into the next.
#[derive(Debug)]
pub struct VmDevice {
    name: String,
    doorbell_queues: u16,
    config_space: Vec<u8>,
    vm: Arc<Vm>,
    doorbells: Arc<DoorbellQueues>,
    events: Arc<EventQueue>,
    hooks: Arc<dyn ObjectHooks>,
    scheduler: Scheduler,
    event_idx: AtomicBool,
    exit_consumer: EventConsumer,
    exit_notifier: EventNotifier,
    cfg: VmConfig,
    /// The fabric posts receives ahead of arrival: the device offers `SYNC_RECV` and
    /// refuses a driver that does not accept it.
    sync_receives: bool,
    /// The features the VMM last set, `None` before it sets any.
    acked_features: Mutex<Option<u64>>,
    migration: Mutex<Migration>,
    /// Held by the vring worker while it serves a queue, so stopping a ring can wait until
    /// nothing the worker took from it is still being answered.
    serving: Mutex<()>,
    /// The vring worker's epoll set, from which the doorbell queues' kicks are taken once the
    /// scheduler watches them (weak: the library's handler owns the device).
    worker: OnceLock<Weak<VringEpollHandler<Arc<VmDevice>>>>,
}

/// Where the VM stands in the VMM's stop, start and state-transfer sequence.
#[derive(Debug, Default)]
struct Migration {
    /// The VMM stopped a ring (`GET_VRING_BASE`) or is loading state: the scheduler does not
    /// serve the VM and the fabric drops what arrives for it, until a ring starts again.
    stopped: bool,
    /// A restored VM's rings have not yet been checked against a memory table.
    rings_unchecked: bool,
    /// The thread saving or loading the device state, until `CHECK_DEVICE_STATE`.
    transfer: Option<JoinHandle<Result<(), String>>>,
    /// The device state was saved and checked: the VM lives on elsewhere now, unless the VMM
    /// restarts its rings.
    saved: bool,
    /// The scheduler has been told the VM runs (on its guest's first start).
    started: bool,
    /// When the VMM stopped the VM: its timers resume with what they had left then.
    stopped_at: Option<Instant>,
}

/// Longest blob a destination reads: the format's own bound plus its header.
const MAX_STATE_BYTES: u64 = state::codec::MAX_PAYLOAD + state::codec::HEADER_LEN as u64;

impl VmDevice {
    /// A device for `vm`, configured by `cfg`, whose doorbell and event queues are
    /// `doorbells` and `events`, and whose objects the fabric follows through `hooks`. With
    /// `sync_receives` (a fabric that posts receives ahead of arrival) it offers
    /// `SYNC_RECV` and refuses a driver that does not accept it.
    pub fn new(
        cfg: &VmConfig,
        vm: Arc<Vm>,
        doorbells: Arc<DoorbellQueues>,
        events: Arc<EventQueue>,
        hooks: Arc<dyn ObjectHooks>,
        scheduler: Scheduler,
        sync_receives: bool,
    ) -> io::Result<Self> {
        let (caps, srq) = {
            let objects = vm.lock();
            (objects.caps, objects.srq_caps)
        };
        let config_space = config::Config {
            version: vrdma_proto::PROTOCOL_VERSION.into(),
            num_doorbell_queues: cfg.doorbell_queues.into(),
            reserved: 0.into(),
            caps,
            port: port_attr(cfg.active_mtu),
            gid: cfg.gid,
            srq,
        }
        .as_bytes()
        .to_vec();
        let (exit_consumer, exit_notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        Ok(VmDevice {
            name: cfg.name.clone(),
            doorbell_queues: cfg.doorbell_queues,
            config_space,
            vm,
            doorbells,
            events,
            hooks,
            scheduler,
            event_idx: AtomicBool::new(false),
            exit_consumer,
            exit_notifier,
            cfg: cfg.clone(),
            sync_receives,
            acked_features: Mutex::new(None),
            migration: Mutex::new(Migration::default()),
            serving: Mutex::new(()),
            worker: OnceLock::new(),
        })
    }

    fn migration(&self) -> MutexGuard<'_, Migration> {
        self.migration.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses a driver that did not accept `SYNC_RECV` although the device offered it,
    /// as a device refuses one without `VIRTIO_F_VERSION_1` at `FEATURES_OK`: such a driver
    /// would post receives the fabric never hears of. A vhost-user backend cannot fail
    /// `SET_FEATURES` itself (the library's hook returns nothing), so this runs at the first
    /// requests after it that it can fail, `SET_MEM_TABLE` and a ring starting; the error ends
    /// the connection before the device serves the driver. Before the VMM sets any features
    /// there is nothing to judge yet.
    fn refuse_without_sync_receives(&self) -> io::Result<()> {
        if !self.sync_receives {
            return Ok(());
        }
        let acked = *self
            .acked_features
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match acked {
            Some(acked) if acked & features::SYNC_RECV == 0 => {
                let e = Error::SyncReceivesRefused {
                    vm: self.name.clone(),
                    acked,
                };
                // The library hands the frontend only success or failure: say why here.
                error!("{e}");
                Err(e.into())
            }
            _ => Ok(()),
        }
    }

    /// Whether the device state was saved and checked, so the VM now runs elsewhere (unless
    /// the VMM restarts it here).
    pub fn migrated_away(&self) -> bool {
        let m = self.migration();
        m.saved && m.stopped
    }

    /// Stops the VM for the VMM: the scheduler finishes the chunk under way and serves it no
    /// more, the fabric drops what arrives for it (its peers resend later), and, once this
    /// returns, no thread writes into its memory: the RoCEv2 receive threads check the pause
    /// under the VM's lock, which this takes once after the pause.
    fn quiesce(&self, m: &mut Migration) {
        if m.stopped {
            return;
        }
        m.stopped = true;
        m.stopped_at = Some(Instant::now());
        self.scheduler.pause(self.vm.id);
        drop(self.vm.lock());
        info!("vm {}: stopped by the VMM", self.name);
    }

    /// Serves the VM again once the VMM has started a ring with a memory table in place; a
    /// restored VM's rings are checked against that table first.
    fn resume_if_started(&self) {
        let mut m = self.migration();
        if self.vm.mem.memory().num_regions() == 0 {
            return;
        }
        if !m.stopped {
            if !std::mem::replace(&mut m.started, true) {
                // The guest's first start: the fabric takes the VM's address now if this
                // daemon does not hold it yet.
                self.scheduler.resume(self.vm.id);
            }
            return;
        }
        if let Some(t) = m.transfer.take() {
            // A ring restarted before CHECK_DEVICE_STATE: finish the transfer first, so a
            // load cannot race the VM it loads into.
            if let Err(e) = t
                .join()
                .unwrap_or_else(|_| Err("the transfer thread panicked".into()))
            {
                error!("vm {}: device state transfer failed: {e}", self.name);
            }
        }
        let arrived = std::mem::take(&mut m.rings_unchecked);
        let stopped_for = m.stopped_at.take().map(|t| t.elapsed());
        if arrived {
            // Its timers were restored with what they had left when the source saved them.
            self.fail_rings_outside_memory();
        } else if let Some(d) = stopped_for {
            self.freeze_timers(d);
        }
        m.stopped = false;
        m.saved = false;
        m.started = true;
        if arrived {
            self.scheduler.resume_arrived(self.vm.id);
        } else {
            self.scheduler.resume(self.vm.id);
        }
        if self.vm.has_work.load(Ordering::Acquire) {
            self.scheduler.wake();
        }
        info!("vm {}: started by the VMM", self.name);
    }

    /// Moves every timer of the VM `stopped_for` later: a VM the VMM stopped and restarted
    /// (a cancelled migration) resumes with what its timers had left, as if time had stood
    /// still for it, rather than with every ACK timeout expired at once.
    fn freeze_timers(&self, stopped_for: std::time::Duration) {
        let mut objects = self.vm.lock();
        let later = |t: &mut Option<Instant>| {
            if let Some(at) = t {
                *at += stopped_for;
            }
        };
        let qpns: Vec<u32> = objects.qps.iter().map(|(qpn, _)| qpn).collect();
        for qpn in qpns {
            if let Some(qp) = objects.qps.get_mut(qpn) {
                later(&mut qp.rt.inflight.wait_until);
                later(&mut qp.rt.rc.deadline);
                later(&mut qp.rt.rc.rnr_until);
                // The scheduler's timer for the old deadline fires and finds it later: it
                // arms a new one then.
            }
        }
    }

    /// Puts in error every restored object whose ring the memory table does not hold, as a
    /// device whose ring vanished would: the QP to ERR with a fatal event, the CQ and the SRQ
    /// in error with theirs.
    fn fail_rings_outside_memory(&self) {
        let mem = self.vm.mem.memory();
        let mut objects = self.vm.lock();
        for bad in state::check_rings(&objects, &mem) {
            match bad {
                BadRing::Qp(qpn) => {
                    error!(
                        "vm {}: restored QP {qpn:#x} has a ring outside the VM's memory; it goes to the error state",
                        self.name
                    );
                    set_error(&mut objects, &self.vm, qpn);
                    self.vm.push_event(vrdma_proto::event::Kind::QpFatal, qpn);
                }
                BadRing::Cq(cqn) => {
                    error!(
                        "vm {}: restored CQ {cqn:#x} has its ring outside the VM's memory; it is in error",
                        self.name
                    );
                    if let Some(cq) = objects.cqs.get_mut(cqn) {
                        cq.overflowed = true;
                    }
                    self.vm.push_event(vrdma_proto::event::Kind::CqErr, cqn);
                }
                BadRing::Srq(srqn) => {
                    error!(
                        "vm {}: restored SRQ {srqn:#x} has its ring outside the VM's memory; it is in error",
                        self.name
                    );
                    if let Some(srq) = objects.srqs.get_mut(srqn) {
                        srq.fault = Some(vrdma_proto::cqe::VendorErr::GuestMemory);
                    }
                    self.vm.push_event(vrdma_proto::event::Kind::SrqErr, srqn);
                }
            }
        }
    }

    fn start_transfer(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> Result<(), Error> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(Error::TransferPhase(phase));
        }
        let mut m = self.migration();
        // The VMM stops the rings before saving; a snapshot without that still gets a
        // consistent state. A load stops the VM so nothing runs on it half-restored.
        self.quiesce(&mut m);
        if let Some(old) = m.transfer.take() {
            let _ = old.join();
        }
        let vm = self.vm.clone();
        let name = self.name.clone();
        let thread = match direction {
            VhostTransferStateDirection::SAVE => {
                m.saved = false;
                std::thread::Builder::new()
                    .name(format!("save-{name}"))
                    .spawn(move || save_to(&vm, file))
            }
            VhostTransferStateDirection::LOAD => {
                m.rings_unchecked = true;
                let cfg = self.cfg.clone();
                std::thread::Builder::new()
                    .name(format!("load-{name}"))
                    .spawn(move || load_from(&vm, &cfg, file))
            }
        };
        let thread = thread.map_err(|e| Error::Migration {
            vm: self.name.clone(),
            reason: format!("cannot start the transfer thread: {e}"),
        })?;
        m.transfer = Some(thread);
        Ok(())
    }

    fn finish_transfer(&self) -> Result<(), Error> {
        let mut m = self.migration();
        let thread = m.transfer.take().ok_or(Error::NoTransfer)?;
        let outcome = thread
            .join()
            .unwrap_or_else(|_| Err("the transfer thread panicked".into()));
        match outcome {
            Ok(()) => {
                // Only a save leaves `rings_unchecked` clear; after it the VM lives elsewhere.
                m.saved = !m.rings_unchecked;
                Ok(())
            }
            Err(reason) => Err(Error::Migration {
                vm: self.name.clone(),
                reason,
            }),
        }
    }

    /// The config-space image the driver reads.
    pub fn config_space(&self) -> &[u8] {
        &self.config_space
    }

    /// Stops the vring worker thread (after the connection ended).
    pub fn stop_worker(&self) {
        if let Err(e) = self.exit_notifier.notify() {
            warn!("vm {}: cannot stop the vring worker: {e}", self.name);
        }
    }

    /// The virtio features the driver accepted, once the VMM has set them.
    pub fn negotiated_features(&self) -> Option<u64> {
        *self
            .acked_features
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The VM's doorbell queues.
    pub fn doorbells(&self) -> &Arc<DoorbellQueues> {
        &self.doorbells
    }

    /// Destroys every object of this VM.
    pub fn release_all(&self) {
        self.vm.clear_ready();
        self.vm.lock().release_all(self.hooks.as_ref(), self.vm.id);
        self.vm.clear_events();
    }

    fn process_control(&self, vring: &Vring) -> Result<(), Error> {
        let mem = self.vm.mem.memory();
        loop {
            // The library may hand over a queue the VMM has stopped or disabled since it became
            // ready, and the VMM may stop it at any time, even during a pass (GET_VRING_BASE
            // marks the ring not ready before stop_vring waits for the pass under way):
            // nothing to do until it restarts, and an error here would end the VM's vring
            // worker. `take_available` checks and takes under one lock.
            let Some(chains) = take_available(vring, &mem) else {
                break;
            };
            let chains = chains.map_err(|source| Error::Queue {
                queue: queue::CONTROL,
                source,
            })?;
            if chains.is_empty() {
                break;
            }
            for chain in chains {
                let head = chain.head_index();
                let written = self.execute_chain(chain, &mem);
                if let Err(e) = vring.add_used(head, written) {
                    warn!("vm {}: cannot return a control descriptor: {e}", self.name);
                }
            }
            if !self.event_idx.load(Ordering::Relaxed) {
                break;
            }
            if !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        if let Err(e) = vring.signal_used_queue() {
            warn!("vm {}: cannot interrupt the guest: {e}", self.name);
        }
        // Commands such as MODIFY_QP to ERR queue work for the scheduler.
        if self.vm.has_work.load(Ordering::Acquire) {
            self.scheduler.wake();
        }
        Ok(())
    }

    /// Executes one control chain and writes its response. Returns the bytes written.
    fn execute_chain<M>(&self, chain: DescriptorChain<M>, mem: &GuestMem) -> u32
    where
        M: std::ops::Deref<Target = GuestMem>,
    {
        let mut request = Vec::new();
        let mut writable = Vec::new();
        let mut well_formed = true;
        for desc in chain {
            if desc.is_write_only() {
                writable.push((desc.addr(), desc.len()));
            } else if !writable.is_empty()
                || request.len() + desc.len() as usize > MAX_COMMAND_BYTES
            {
                // Readable after writable breaks the virtio rule; oversize cannot be a command.
                well_formed = false;
            } else {
                let start = request.len();
                request.resize(start + desc.len() as usize, 0);
                if mem.read_slice(&mut request[start..], desc.addr()).is_err() {
                    well_formed = false;
                }
            }
        }
        let room: usize = writable.iter().map(|&(_, len)| len as usize).sum();
        if room < size_of::<RespHeader>() {
            debug!(
                "vm {}: control chain has no room for a response; ignored",
                self.name
            );
            self.vm
                .counters
                .commands_failed
                .fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let outcome = if well_formed {
            self.execute_bytes(&request, room, mem)
        } else {
            Err(Status::Malformed.into())
        };
        let (header, body) = match outcome {
            Ok(body) => {
                self.vm.counters.commands_ok.fetch_add(1, Ordering::Relaxed);
                (RespHeader::new(Status::Ok, 0), body)
            }
            Err(Failure { status, detail }) => {
                self.vm
                    .counters
                    .commands_failed
                    .fetch_add(1, Ordering::Relaxed);
                (RespHeader::new(status, detail), Vec::new())
            }
        };
        let mut response = header.as_bytes().to_vec();
        response.extend_from_slice(&body);
        let mut done = 0usize;
        for (addr, len) in writable {
            if done == response.len() {
                break;
            }
            let n = (len as usize).min(response.len() - done);
            let part = &response[done..done + n];
            if memory::write_bytes(mem, addr.0, part, WriteKind::Response).is_err() {
                warn!("vm {}: response buffer is not in guest memory", self.name);
                return done as u32;
            }
            done += n;
        }
        done as u32
    }

    fn execute_bytes(
        &self,
        request: &[u8],
        room: usize,
        mem: &GuestMem,
    ) -> Result<Vec<u8>, Failure> {
        let decoded = cmd::decode(request).map_err(|e| {
            debug!("vm {}: malformed command: {e}", self.name);
            Failure::from(Status::from(e))
        })?;
        let opcode = decoded.opcode();
        if room < size_of::<RespHeader>() + opcode.response_len() {
            debug!("vm {}: {opcode:?} response buffer too small", self.name);
            return Err(Status::Malformed.into());
        }
        let env = ControlEnv {
            mem,
            hooks: self.hooks.as_ref(),
            vm: self.vm.id,
        };
        let result = self.vm.execute(decoded, &env);
        if let Err(f) = &result {
            debug!(
                "vm {}: {opcode:?} failed: {:?} (detail {:#x})",
                self.name, f.status, f.detail
            );
        }
        result
    }

    /// The vring worker's epoll set (the library's `VhostUserDaemon::get_epoll_handlers`):
    /// with it, the worker hands a doorbell queue's kicks to the scheduler as the ring starts.
    pub fn set_worker(&self, worker: &Arc<VringEpollHandler<Arc<VmDevice>>>) {
        let _ = self.worker.set(Arc::downgrade(worker));
    }

    /// Hot path: hands the doorbells to the scheduler, waking it only if it sleeps on work
    /// it has not seen. It also hands the ring's kicks to the scheduler
    /// (`DoorbellQueues::hand_over_kicks`), so they reach it without this thread: once they
    /// are, the worker serves the ring only when the library registers its kick again, as the
    /// ring starts.
    fn process_doorbells(&self, queue_event: u16, index: u16, vring: &Vring) {
        self.doorbells.kicked(index, vring);
        if let Some(worker) = self.worker.get().and_then(Weak::upgrade) {
            self.doorbells.hand_over_kicks(index, vring, |fd| {
                worker.unregister_event(fd, EventSet::IN, u64::from(queue_event))
            });
        }
        if self.vm.has_work.load(Ordering::Acquire) {
            self.scheduler.wake();
        }
    }
}

impl VhostUserBackend for VmDevice {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        queue::count(self.doorbell_queues).into()
    }

    fn max_queue_size(&self) -> usize {
        queue::MAX_QUEUE_SIZE.into()
    }

    fn features(&self) -> u64 {
        let mut device = features::ALL_DEVICE;
        if self.doorbell_queues == 1 {
            device &= !features::MULTI_DOORBELL;
        }
        if !self.sync_receives {
            // The device reads receive rings when messages arrive: POST_RECV would only cost
            // the driver a virtqueue trip per post.
            device &= !features::SYNC_RECV;
        }
        // LOG_ALL: the device logs every page it writes (model::memory), so a VMM can migrate
        // the VM while it runs.
        (1 << VIRTIO_F_VERSION_1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | device
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::DEVICE_STATE
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn acked_features(&self, acked: u64) {
        // QEMU sets the features when the guest's driver starts the device (DRIVER_OK) and
        // when migration logging starts or stops: rare, and the first thing to look at when a
        // guest's driver does not get its device.
        info!(
            "vm {}: the VMM set the features to {acked:#x} (device-specific {:#x})",
            self.name,
            acked & features::ALL_DEVICE
        );
        *self
            .acked_features
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(acked);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = offset as usize;
        let end = start.saturating_add(size as usize);
        self.config_space
            .get(start..end)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> io::Result<()> {
        self.refuse_without_sync_receives()?;
        // The port holds the same GuestMemoryAtomic the library updates, so every access
        // after this sees the new table.
        #[cfg(feature = "xen")]
        let refused = memory::xen::refuse_mapped_per_access(&mem);
        #[cfg(not(feature = "xen"))]
        let _ = mem;
        // The scheduler's watched doorbell indices are in the old table (or, refused, in one
        // that has just been taken away).
        self.doorbells.forget_avail_indexes();
        #[cfg(feature = "xen")]
        refused.map_err(|e| {
            // The library hands the frontend only success or failure: say why here.
            error!("vm {}: {e}", self.name);
            io::Error::other(e)
        })?;
        Ok(())
    }

    fn reset_device(&self) {
        self.release_all();
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The library has marked the ring not ready; wait for the worker to finish what it
        // took from it, so every descriptor it consumed is answered before GET_VRING_BASE
        // returns the ring's index.
        drop(self.serving.lock().unwrap_or_else(|p| p.into_inner()));
        // After the wait: a kick the worker was serving may have handed the kicks over.
        if let Ok(Some(queue::Role::Doorbell(index))) =
            u16::try_from(queue_index).map(|q| queue::role(q, self.doorbell_queues))
        {
            self.doorbells.kicks_stopped(index);
            self.doorbells.forget_avail_indexes();
        }
        let mut m = self.migration();
        self.quiesce(&mut m);
        Ok(())
    }

    fn start_vring(&self, _queue_index: u32) -> io::Result<()> {
        self.refuse_without_sync_receives()?;
        self.resume_if_started();
        Ok(())
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        // The library hands QEMU only success or failure: say why here.
        self.start_transfer(direction, phase, file).map_err(|e| {
            error!("vm {}: {e}", self.name);
            io::Error::other(e)
        })?;
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        self.finish_transfer().map_err(|e| {
            error!("vm {}: {}", self.name, vrdma_proto::ErrorChain(&e));
            io::Error::other(e)
        })
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((
            self.exit_consumer.try_clone().ok()?,
            self.exit_notifier.try_clone().ok()?,
        ))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(Error::UnexpectedEvent(evset).into());
        }
        lower_worker_priority(&self.name);
        let _serving = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or(Error::UnknownQueue(device_event))?;
        match queue::role(device_event, self.doorbell_queues) {
            Some(queue::Role::Control) => self.process_control(vring)?,
            Some(queue::Role::Doorbell(index)) => {
                self.process_doorbells(device_event, index, vring)
            }
            Some(queue::Role::Event) => {
                self.events.kicked(vring);
                self.vm.deliver_events();
            }
            None => return Err(Error::UnknownQueue(device_event).into()),
        }
        Ok(())
    }
}

/// Saves `vm`'s state and writes it to `file` (the VMM reads the other end as it goes, so a
/// blob larger than a pipe holds does not block for good).
fn save_to(vm: &Vm, mut file: File) -> Result<(), String> {
    let started = Instant::now();
    let blob = {
        let objects = vm.lock();
        state::check_migratable(&objects).map_err(|e| e.to_string())?;
        state::save_vm(vm, &objects, Instant::now())
    };
    file.write_all(&blob)
        .map_err(|e| format!("cannot write the device state to the frontend: {e}"))?;
    info!(
        "vm {}: device state saved, {} bytes in {:?}",
        vm.name,
        blob.len(),
        started.elapsed()
    );
    Ok(())
}

/// Reads a device state from `file` until the VMM closes it, checks it, and installs it in
/// `vm`, or leaves `vm` as it was.
fn load_from(vm: &Vm, cfg: &VmConfig, file: File) -> Result<(), String> {
    let started = Instant::now();
    let mut blob = Vec::new();
    file.take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut blob)
        .map_err(|e| format!("cannot read the device state from the frontend: {e}"))?;
    let node_guid = vm.lock().caps.node_guid.get();
    state::load(&blob, cfg, node_guid, Instant::now())
        .and_then(|r| state::install(vm, r))
        .map_err(|e| vrdma_proto::ErrorChain(&e).to_string())?;
    info!(
        "vm {}: device state loaded, {} bytes in {:?}",
        vm.name,
        blob.len(),
        started.elapsed()
    );
    Ok(())
}

/// Runs the calling vring worker (the thread the vhost-user library starts for each VM's
/// connection) at the lowest CPU priority, once per thread. The worker carries the VM's
/// control path: a VM registering and deregistering gigabytes of memory in a loop otherwise
/// took most of the daemon's core from the scheduler, and a neighbouring pair's 8-byte
/// latency went from 2.4 µs to 620 µs (bench section `registering`). At the lowest priority
/// it gets the CPU the scheduler leaves; on a core with nothing else to run (a kick that
/// wakes an idle daemon) it runs at once, as before. Lowering one's own priority needs no
/// privilege.
fn lower_worker_priority(vm: &str) {
    thread_local! {
        static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if LOWERED.replace(true) {
        return;
    }
    if let Err(e) =
        thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min)
    {
        warn!(
            "vm {vm}: cannot lower the vring worker's priority: {e:?}; its control commands compete with the scheduler for the CPU"
        );
    }
}

/// Shares a device between the vhost-user library (which wants `Clone`) and the server loop.
pub type SharedDevice = Arc<VmDevice>;

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vrdma_proto::cmd::Opcode;

    use super::*;
    use crate::fabric::mock::MockFabric;
    use crate::model::memory::recorder;
    use crate::testing::TestVm;

    fn test_config(vm: &TestVm) -> VmConfig {
        VmConfig {
            name: vm.vm.name.clone(),
            socket: "/nonexistent".into(),
            gid: vm.vm.gid,
            weight: 1,
            class: crate::config::PriorityClass::Normal,
            sl_classes: crate::config::SlClasses::default(),
            quotas: crate::config::Quotas::default(),
            doorbell_queues: 1,
            active_mtu: vrdma_proto::config::Mtu::Mtu4096,
            roce: false,
            incoming: false,
            nic_qpns: false,
            socket_access: Default::default(),
        }
    }

    fn device(vm: &TestVm, scheduler: &Scheduler, sync_receives: bool) -> VmDevice {
        VmDevice::new(
            &test_config(vm),
            vm.vm.clone(),
            Arc::new(DoorbellQueues::new(vm.vm.clone())),
            Arc::new(EventQueue::default()),
            scheduler.hooks().clone(),
            scheduler.clone(),
            sync_receives,
        )
        .unwrap()
    }

    /// `SYNC_RECV` is offered only for a fabric that posts receives ahead of arrival, and then a
    /// driver that does not accept it is refused at the first request the device can fail
    /// (`SET_MEM_TABLE`, a ring starting), while one that accepts it is served.
    #[test]
    fn sync_receives_are_offered_only_when_the_fabric_needs_them_and_then_required() {
        let vm = TestVm::new(7, 1);
        let scheduler = Scheduler::start(|| Box::new(MockFabric::default())).unwrap();
        let soft = device(&vm, &scheduler, false);
        assert_eq!(soft.features() & features::SYNC_RECV, 0);
        assert_ne!(soft.features() & features::SRQ, 0);
        soft.acked_features(features::VERSION_1 | features::SRQ);
        soft.update_memory(vm.vm.mem.clone()).unwrap();
        soft.start_vring(0).unwrap();

        let nic = device(&vm, &scheduler, true);
        let offered = nic.features();
        assert_ne!(offered & features::SYNC_RECV, 0);
        assert_eq!(offered & !features::SYNC_RECV, soft.features());
        // Before the VMM sets features there is nothing to refuse.
        nic.update_memory(vm.vm.mem.clone()).unwrap();
        nic.acked_features(offered & !features::SYNC_RECV);
        let refused = nic.update_memory(vm.vm.mem.clone()).unwrap_err();
        assert!(
            refused.to_string().contains("must support SYNC_RECV"),
            "{refused}"
        );
        nic.start_vring(0).unwrap_err();
        nic.acked_features(offered);
        nic.update_memory(vm.vm.mem.clone()).unwrap();
        nic.start_vring(0).unwrap();
    }

    /// A control command's response reaches the driver's buffer through the one write path,
    /// and nothing else in the guest changes.
    #[test]
    fn control_responses_are_written_through_the_one_path() {
        let mut vm = TestVm::new(6, 1);
        let scheduler = Scheduler::start(|| Box::new(MockFabric::default())).unwrap();
        let device = device(&vm, &scheduler, false);
        let (ring, request, response) = (vm.alloc(16 << 10), vm.alloc(4096), vm.alloc(4096));
        let command = cmd::header(Opcode::AllocPd);
        vm.mem()
            .write_slice(command.as_bytes(), GuestAddress(request))
            .unwrap();
        let mem = vm.mem();
        let mock = MockSplitQueue::create(&*mem, GuestAddress(ring), 16);
        let chain = mock
            .build_desc_chain(&[
                RawDescriptor::from(SplitDescriptor::new(
                    request,
                    size_of::<cmd::Header>() as u32,
                    0,
                    0,
                )),
                RawDescriptor::from(SplitDescriptor::new(
                    response,
                    64,
                    VRING_DESC_F_WRITE as u16,
                    0,
                )),
            ])
            .unwrap();
        let before = recorder::snapshot(&mem);
        recorder::start();
        let written = device.execute_chain(chain, &mem);
        let writes = recorder::take();
        let after = recorder::snapshot(&mem);
        recorder::assert_covered_except(&before, &after, &writes, &[(ring, ring + (16 << 10))]);
        let expected = size_of::<RespHeader>() + size_of::<cmd::Handle>();
        assert_eq!(written as usize, expected);
        assert_eq!(
            writes
                .iter()
                .map(|w| (w.kind, w.gpa, w.len))
                .collect::<Vec<_>>(),
            vec![(WriteKind::Response, response, expected)]
        );
        assert_eq!(vm.vm.lock().pds.len(), 1, "the PD was made");
    }
}
