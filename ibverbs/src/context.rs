//! The open device (`ibv_context`), its completion channels and its asynchronous events.
//!
//! One vhost-user connection carries every event of a context (CQ events and asynchronous
//! events) on one file descriptor, the transport's event fd. A router thread per context
//! waits on it, drains the device's events and routes each to the queue of its CQ's
//! completion channel or to the context's asynchronous queue. Each queue has an eventfd in
//! semaphore mode that counts its events: that is the channel's `fd` (and the context's
//! `async_fd`), so it is readable exactly while the queue has events, as a kernel
//! completion channel is. `ibv_get_cq_event` reads one count from it and takes one event, so
//! a blocking wait is a `read()`, which a signal interrupts with EINTR or restarts as its
//! handler's `SA_RESTART` says, and a program that makes the fd non-blocking gets EAGAIN, all
//! as with libibverbs. When the device goes away (the vhost-user socket hangs up), every
//! waiter wakes and fails with EIO.

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vrdma_proto::Gid;
use vrdma_proto::event::Kind;

use crate::abi::*;
use crate::app_memory::DeviceMemory;
use crate::device::DeviceEntry;
use crate::{guard, identity, null_with, set_errno};

/// Everything behind an `ibv_context *`.
#[repr(C)]
pub(crate) struct Context {
    /// First, so an `ibv_context *` is a `Context *`.
    pub(crate) ibv: ibv_context,
    /// Declared (so dropped) before what it uses: stops the router thread first.
    router: Router,
    pub(crate) device: &'static DeviceEntry,
    pub(crate) vrdma: vrdma::Context,
    pub(crate) memory: DeviceMemory,
    pub(crate) port: Port,
    events: Arc<Events>,
    /// The process that opened the context: a forked child must not use it (the device
    /// connection and the shared memory belong to the parent).
    pid: u32,
}

/// The port as programs see it.
pub(crate) struct Port {
    pub(crate) gid: Gid,
    pub(crate) lid: u16,
}

impl Port {
    /// The GID a program's address vector names: its GRH's, or its LID's.
    pub(crate) fn dgid(&self, ah: &ibv_ah_attr) -> Option<Gid> {
        if ah.is_global != 0 {
            Some(Gid(ah.grh.dgid.raw))
        } else {
            identity::gid_of_lid(&self.gid, ah.dlid)
        }
    }
}

/// The context's events, shared with its router thread.
struct Events {
    /// The device's event stream; only the router thread drains it.
    device: vrdma::CompletionChannel,
    /// The context's `async_fd`: counts `Routes::async_events`.
    async_fd: OwnedFd,
    routes: Mutex<Routes>,
    /// The device went away: every wait fails with EIO.
    dead: AtomicBool,
}

/// The router thread, stopped and joined on drop.
struct Router {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Router {
    fn drop(&mut self) {
        post(self.stop.as_raw_fd(), 1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A completion channel's queue.
struct ChannelQueue {
    /// The channel's fd: counts `cqs`.
    fd: RawFd,
    /// The CQs with an event not yet taken, oldest first.
    cqs: VecDeque<usize>,
}

#[derive(Default)]
struct Routes {
    /// CQ number to (channel, CQ) for CQs made with a channel.
    cq_channel: HashMap<u32, (usize, usize)>,
    /// The channels' queues.
    channels: HashMap<usize, ChannelQueue>,
    /// Asynchronous events not yet taken: (type, element).
    async_events: VecDeque<(c_int, usize)>,
    /// Objects by handle, to name them in asynchronous events.
    qps: HashMap<u32, usize>,
    cqs: HashMap<u32, usize>,
    srqs: HashMap<u32, usize>,
    /// Every object made in the context, to free what the program leaves when it closes it.
    owned: HashMap<usize, (Rank, Free)>,
}

/// Frees one object of the context (its module's destroy, without the checks).
pub(crate) type Free = unsafe fn(*mut c_void);

/// The order in which `ibv_close_device` frees what is left: users before what they use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Rank {
    Qp,
    Srq,
    Ah,
    Mr,
    Cq,
    Channel,
    Pd,
}

/// An eventfd in semaphore mode: each read takes one of the counts writes add.
pub(crate) fn semaphore() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_SEMAPHORE | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds `n` to an eventfd's count.
fn post(fd: RawFd, n: u64) {
    // SAFETY: writing 8 bytes from a local to an eventfd.
    let _ = unsafe { libc::write(fd, (&n as *const u64).cast::<c_void>(), 8) };
}

/// Takes one count from a semaphore eventfd, waiting for one unless the program made it
/// non-blocking: `Err(errno)` for EINTR (a signal without `SA_RESTART`), EAGAIN and the
/// like.
fn take(fd: RawFd) -> Result<(), c_int> {
    let mut count = 0u64;
    // SAFETY: reading 8 bytes into a local.
    let n = unsafe { libc::read(fd, (&mut count as *mut u64).cast::<c_void>(), 8) };
    if n == 8 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    }
}

/// The router thread: waits for device events (or the device hanging up, or the context
/// closing) and routes them.
fn route(events: Arc<Events>, transport: RawFd, hangup: Option<RawFd>, stop: RawFd, name: String) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: transport,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: hangup.unwrap_or(-1),
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: three valid pollfds (a negative fd is ignored).
        if unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::warn!("{name}: waiting for device events failed: {e}");
            events.die();
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[2].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            log::warn!(
                "{name}: the daemon closed the connection; the device is gone (its verbs fail \
                 with EIO)"
            );
            events.die();
            return;
        }
        let mut r = events.lock();
        if let Err(errno) = events.pump(&mut r) {
            drop(r);
            log::warn!("{name}: the device's events cannot be read (errno {errno})");
            events.die();
            return;
        }
    }
}

impl Events {
    fn lock(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the device gone and wakes every waiter.
    fn die(&self) {
        self.dead.store(true, Ordering::Release);
        let r = self.lock();
        for q in r.channels.values() {
            post(q.fd, 1 << 32);
        }
        post(self.async_fd.as_raw_fd(), 1 << 32);
    }

    /// Moves the device's events into the routes, counting each on its queue's fd. One pass
    /// over the device's event queue: a second one (for the asynchronous events) would reset
    /// the device's fd and leave the completion events it found unrouted, with nothing to wake
    /// the router for them (ib_send_lat -e hung so, about one run in ten).
    fn pump(&self, r: &mut Routes) -> Result<(), c_int> {
        let vrdma::ChannelEvents {
            completions,
            asynchronous,
        } = self.device.take_all_events().map_err(|e| {
            log::warn!("ibv_get_cq_event: {}", vrdma::error_chain(&e));
            e.errno()
        })?;
        for cqn in completions {
            if let Some(&(ch, cq)) = r.cq_channel.get(&cqn)
                && let Some(q) = r.channels.get_mut(&ch)
            {
                q.cqs.push_back(cq);
                post(q.fd, 1);
            }
        }
        for (kind, handle) in asynchronous {
            if let Some(ev) = translate_async(r, kind, handle) {
                r.async_events.push_back(ev);
                post(self.async_fd.as_raw_fd(), 1);
            }
        }
        Ok(())
    }
}

impl Context {
    /// Opens the device (connects to its socket, or drives its PCI function) and builds the
    /// `ibv_context`.
    pub(crate) fn open(device: &'static DeviceEntry) -> Result<*mut ibv_context, i32> {
        let vrdma = device.device.open().map_err(|e| {
            log::warn!(
                "ibv_open_device {}: cannot open {}: {}",
                device.name(),
                device.device.path.display(),
                vrdma::error_chain(&e)
            );
            match e.errno() {
                libc::EIO => libc::ENODEV,
                other => other,
            }
        })?;
        let gid = vrdma.gid();
        *device.gid.lock().unwrap_or_else(|p| p.into_inner()) = Some(gid);
        let lid = identity::lid_of(&gid);
        if lid == 0 {
            log::warn!(
                "{}: GID {gid} has no unicast LID (its low 16 bits are 0 or a multicast LID); \
                 peers must address it by GID (perftest -x 0, ibv_rc_pingpong -g 0)",
                device.name()
            );
        }
        let device_events = vrdma::CompletionChannel::new(&vrdma).map_err(|e| {
            log::warn!(
                "ibv_open_device {}: {}",
                device.name(),
                vrdma::error_chain(&e)
            );
            e.errno()
        })?;
        let fds = semaphore().and_then(|a| Ok((a, semaphore()?)));
        let (async_fd, stop) = fds.map_err(|e| {
            log::warn!(
                "ibv_open_device {}: cannot make the event fds: {e}",
                device.name()
            );
            e.raw_os_error().unwrap_or(libc::EMFILE)
        })?;
        let events = Arc::new(Events {
            device: device_events,
            async_fd,
            routes: Mutex::new(Routes::default()),
            dead: AtomicBool::new(false),
        });
        let thread = {
            let events = events.clone();
            let (transport, hangup) = (vrdma.event_fd(), vrdma.hangup_fd());
            let stop = stop.as_raw_fd();
            let name = device.name();
            std::thread::Builder::new()
                .name(format!("vrdma-events-{name}"))
                .spawn(move || route(events, transport, hangup, stop, name))
                .map_err(|e| {
                    log::warn!(
                        "ibv_open_device {}: cannot start its event thread: {e}",
                        device.name()
                    );
                    libc::EAGAIN
                })?
        };
        let router = Router {
            stop,
            thread: Some(thread),
        };
        let memory = DeviceMemory::new(vrdma.clone());
        let ctx = Box::new(Context {
            ibv: ibv_context {
                device: (&device.ibv as *const ibv_device).cast_mut(),
                ops: crate::ops(),
                cmd_fd: -1,
                async_fd: events.async_fd.as_raw_fd(),
                num_comp_vectors: 1,
                // SAFETY: an all-zero pthread_mutex_t is PTHREAD_MUTEX_INITIALIZER on glibc.
                mutex: unsafe { std::mem::zeroed() },
                abi_compat: std::ptr::null_mut(),
            },
            router,
            device,
            vrdma,
            memory,
            port: Port { gid, lid },
            events,
            pid: std::process::id(),
        });
        Ok(Box::into_raw(ctx).cast::<ibv_context>())
    }

    /// Closes a context.
    ///
    /// # Safety
    ///
    /// `context` must come from [`Context::open`] and not be used afterwards.
    pub(crate) unsafe fn close(context: *mut ibv_context) -> c_int {
        // SAFETY: the caller's contract.
        let Some(ctx) = (unsafe { Context::from_ptr(context) }) else {
            return libc::EINVAL;
        };
        // What the program left is freed, as the kernel frees a closed context's objects:
        // each holds the connection open, which the next guest of this VM needs.
        let mut left: Vec<(usize, (Rank, Free))> = ctx.routes().owned.drain().collect();
        if !left.is_empty() {
            log::debug!(
                "ibv_close_device {}: freeing {} objects the program left",
                ctx.device.name(),
                left.len()
            );
        }
        left.sort_by_key(|&(_, (rank, _))| rank);
        for (ptr, (_, free)) in left {
            // SAFETY: a live object of this context (destroying one disowns it first), freed
            // after everything that uses it.
            unsafe { free(ptr as *mut c_void) };
        }
        // SAFETY: made by Box::into_raw in `open`; the caller gives it up.
        drop(unsafe { Box::from_raw(context.cast::<Context>()) });
        0
    }

    /// The context behind a pointer a program passed, or `None` for NULL. In a forked child
    /// the parent's contexts are unusable (errno EIO on their verbs, logged once).
    ///
    /// # Safety
    ///
    /// A non-NULL `context` must come from [`Context::open`] and still be open.
    pub(crate) unsafe fn from_ptr<'a>(context: *mut ibv_context) -> Option<&'a Context> {
        if context.is_null() {
            return None;
        }
        // SAFETY: the caller's contract: it points at a live Context (ibv is its first field).
        let ctx = unsafe { &*context.cast::<Context>() };
        if ctx.pid != std::process::id() {
            log::warn!(
                "a verbs context was used in a child process (pid {}) forked from its owner \
                 (pid {}); open the device again in the child",
                std::process::id(),
                ctx.pid
            );
            return None;
        }
        Some(ctx)
    }

    /// Whether `context` is a context of the process that forked this one: its objects must
    /// not be touched (destroying one would drive the parent's device connection).
    ///
    /// # Safety
    ///
    /// A non-NULL `context` must come from [`Context::open`] and still be open.
    pub(crate) unsafe fn foreign(context: *mut ibv_context) -> bool {
        // SAFETY: the caller's contract.
        !context.is_null() && unsafe { (*context.cast::<Context>()).pid } != std::process::id()
    }

    pub(crate) fn as_ptr(&self) -> *mut ibv_context {
        (&self.ibv as *const ibv_context).cast_mut()
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.events.lock()
    }

    pub(crate) fn device_attr(&self) -> ibv_device_attr {
        let caps = self.vrdma.device_attr();
        let int = |v: u32| v.min(i32::MAX as u32) as c_int;
        let mut fw_ver = [0; 64];
        crate::fill_c_string(&mut fw_ver, concat!("vrdma ", env!("CARGO_PKG_VERSION")));
        let srq = self.vrdma.srq_caps();
        let (max_srq, max_srq_wr, max_srq_sge) = (
            int(srq.max_srq.get()),
            int(srq.max_srq_wr.get()),
            int(srq.max_srq_sge.get()),
        );
        ibv_device_attr {
            fw_ver,
            node_guid: caps.node_guid.get().to_be(),
            sys_image_guid: caps.sys_image_guid.get().to_be(),
            max_mr_size: caps.max_mr_size.get(),
            page_size_cap: caps.page_size_cap.get(),
            vendor_id: caps.vendor_id.get(),
            vendor_part_id: caps.vendor_part_id.get(),
            hw_ver: caps.hw_ver.get(),
            max_qp: int(caps.max_qp.get()),
            max_qp_wr: int(caps.max_qp_wr.get()),
            // Resizing queues and port changes are not supported, and there is no special
            // QP; RNR NAKs are generated (IBV_DEVICE_RC_RNR_NAK_GEN).
            device_cap_flags: 1 << 12,
            max_sge: int(caps.max_sge.get()),
            max_sge_rd: int(caps.max_sge.get()),
            max_cq: int(caps.max_cq.get()),
            max_cqe: int(caps.max_cqe.get()),
            max_mr: int(caps.max_mr.get()),
            max_pd: int(caps.max_pd.get()),
            max_qp_rd_atom: int(caps.max_qp_rd_atom.get()),
            max_ee_rd_atom: 0,
            max_res_rd_atom: int(caps.max_qp_rd_atom.get().saturating_mul(caps.max_qp.get())),
            max_qp_init_rd_atom: int(caps.max_qp_init_rd_atom.get()),
            max_ee_init_rd_atom: 0,
            atomic_cap: c_int::from(caps.atomic_cap),
            max_ee: 0,
            max_rdd: 0,
            max_mw: 0,
            max_raw_ipv6_qp: 0,
            max_raw_ethy_qp: 0,
            max_mcast_grp: 0,
            max_mcast_qp_attach: 0,
            max_total_mcast_qp_attach: 0,
            max_ah: int(caps.max_ah.get()),
            max_fmr: 0,
            max_map_per_fmr: 0,
            max_srq,
            max_srq_wr,
            max_srq_sge,
            max_pkeys: 1,
            local_ca_ack_delay: 15,
            phys_port_cnt: caps.phys_port_cnt,
        }
    }

    pub(crate) fn port_attr(&self, port_num: u8) -> Result<ibv_port_attr, c_int> {
        if port_num != 1 {
            return Err(libc::EINVAL);
        }
        let p = self.vrdma.query_port(port_num).map_err(|e| {
            log::warn!("ibv_query_port: {}", vrdma::error_chain(&e));
            e.errno()
        })?;
        Ok(ibv_port_attr {
            state: c_int::from(p.state),
            max_mtu: c_int::from(p.max_mtu),
            active_mtu: c_int::from(p.active_mtu),
            gid_tbl_len: c_int::from(p.gid_tbl_len.get()),
            port_cap_flags: p.port_cap_flags.get(),
            max_msg_sz: p.max_msg_sz.get(),
            bad_pkey_cntr: 0,
            qkey_viol_cntr: 0,
            pkey_tbl_len: 1,
            lid: self.port.lid,
            // A subnet manager's LID: programs print it; none exists, report our own.
            sm_lid: self.port.lid,
            lmc: 0,
            max_vl_num: 1,
            sm_sl: 0,
            subnet_timeout: 0,
            init_type_reply: 0,
            active_width: p.active_width,
            active_speed: p.active_speed,
            phys_state: p.phys_state,
            // See the identity module: an InfiniBand port with a LID, so programs connect
            // by LID without GID flags.
            link_layer: IBV_LINK_LAYER_INFINIBAND,
            flags: 0,
            port_cap_flags2: 0,
        })
    }

    /// Records an object made in the context.
    pub(crate) fn adopt(&self, object: *mut c_void, rank: Rank, free: Free) {
        self.routes().owned.insert(object as usize, (rank, free));
    }

    /// Forgets an object the program is destroying.
    pub(crate) fn disown(&self, object: *mut c_void) {
        self.routes().owned.remove(&(object as usize));
    }

    pub(crate) fn register_cq(&self, cqn: u32, cq: usize, channel: Option<usize>) {
        let mut r = self.routes();
        r.cqs.insert(cqn, cq);
        if let Some(ch) = channel {
            r.cq_channel.insert(cqn, (ch, cq));
        }
    }

    /// Forgets a CQ; its events not yet taken are dropped (the program destroyed it).
    pub(crate) fn unregister_cq(&self, cqn: u32) {
        let mut r = self.routes();
        if let Some((ch, cq)) = r.cq_channel.remove(&cqn)
            && let Some(q) = r.channels.get_mut(&ch)
        {
            // Their counts stay on the channel's fd: a waiter that takes one finds no event
            // and waits again (a spurious wake-up, never a lost one).
            q.cqs.retain(|&c| c != cq);
        }
        if let Some(&cq) = r.cqs.get(&cqn) {
            r.async_events.retain(|&(_, e)| e != cq);
        }
        r.cqs.remove(&cqn);
    }

    pub(crate) fn register_qp(&self, qpn: u32, qp: usize) {
        self.routes().qps.insert(qpn, qp);
    }

    pub(crate) fn unregister_qp(&self, qpn: u32) {
        let mut r = self.routes();
        if let Some(qp) = r.qps.remove(&qpn) {
            // Its events not yet taken would name a freed QP.
            r.async_events.retain(|&(_, e)| e != qp);
        }
    }

    pub(crate) fn register_srq(&self, srqn: u32, srq: usize) {
        self.routes().srqs.insert(srqn, srq);
    }

    pub(crate) fn unregister_srq(&self, srqn: u32) {
        let mut r = self.routes();
        if let Some(srq) = r.srqs.remove(&srqn) {
            r.async_events.retain(|&(_, e)| e != srq);
        }
    }

    /// Whether a channel still has CQs.
    pub(crate) fn channel_in_use(&self, channel: usize) -> bool {
        self.routes()
            .cq_channel
            .values()
            .any(|&(ch, _)| ch == channel)
    }

    /// Starts routing events to a channel whose fd is `fd`.
    pub(crate) fn add_channel(&self, channel: usize, fd: RawFd) {
        self.routes().channels.insert(
            channel,
            ChannelQueue {
                fd,
                cqs: VecDeque::new(),
            },
        );
    }

    pub(crate) fn forget_channel(&self, channel: usize) {
        self.routes().channels.remove(&channel);
    }

    /// Takes the next CQ event of `channel` (whose fd is `fd`), waiting as the fd's mode
    /// says.
    pub(crate) fn next_cq_event(&self, channel: usize, fd: RawFd) -> Result<usize, c_int> {
        loop {
            if self.events.dead.load(Ordering::Acquire) {
                return Err(libc::EIO);
            }
            take(fd)?;
            if let Some(cq) = self
                .routes()
                .channels
                .get_mut(&channel)
                .and_then(|q| q.cqs.pop_front())
            {
                return Ok(cq);
            }
        }
    }

    /// Takes the next asynchronous event, waiting as the async fd's mode says.
    pub(crate) fn next_async_event(&self) -> Result<(c_int, usize), c_int> {
        loop {
            if self.events.dead.load(Ordering::Acquire) {
                return Err(libc::EIO);
            }
            take(self.events.async_fd.as_raw_fd())?;
            if let Some(ev) = self.routes().async_events.pop_front() {
                return Ok(ev);
            }
        }
    }
}

/// The `ibv_async_event` of a device event, or `None` for an object the program no longer
/// has.
fn translate_async(r: &Routes, kind: Kind, handle: u32) -> Option<(c_int, usize)> {
    let qp = |t| r.qps.get(&handle).map(|&p| (t, p));
    match kind {
        Kind::QpFatal => qp(IBV_EVENT_QP_FATAL),
        Kind::QpReqErr => qp(IBV_EVENT_QP_REQ_ERR),
        Kind::QpAccessErr => qp(IBV_EVENT_QP_ACCESS_ERR),
        Kind::CommEst => qp(IBV_EVENT_COMM_EST),
        Kind::SqDrained => qp(IBV_EVENT_SQ_DRAINED),
        Kind::QpLastWqeReached => qp(IBV_EVENT_QP_LAST_WQE_REACHED),
        Kind::CqErr => r.cqs.get(&handle).map(|&p| (IBV_EVENT_CQ_ERR, p)),
        Kind::DeviceFatal => Some((IBV_EVENT_DEVICE_FATAL, 0)),
        Kind::PortActive => Some((IBV_EVENT_PORT_ACTIVE, handle as usize)),
        Kind::PortErr => Some((IBV_EVENT_PORT_ERR, handle as usize)),
        Kind::SrqErr => r.srqs.get(&handle).map(|&p| (IBV_EVENT_SRQ_ERR, p)),
        Kind::SrqLimitReached => r
            .srqs
            .get(&handle)
            .map(|&p| (IBV_EVENT_SRQ_LIMIT_REACHED, p)),
        Kind::CqCompletion => None,
    }
}

/// A completion channel.
#[repr(C)]
pub(crate) struct Channel {
    /// First, so an `ibv_comp_channel *` is a `Channel *`.
    pub(crate) ibv: ibv_comp_channel,
    /// `ibv.fd`: counts the channel's queued events.
    _fd: OwnedFd,
}

/// `ibv_create_comp_channel`.
///
/// # Safety
///
/// `context` must be an open context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_create_comp_channel(
    context: *mut ibv_context,
) -> *mut ibv_comp_channel {
    guard(
        "ibv_create_comp_channel",
        || null_with(libc::EIO),
        || {
            // SAFETY: the caller's contract.
            let Some(ctx) = (unsafe { Context::from_ptr(context) }) else {
                return null_with(libc::EINVAL);
            };
            let fd = match semaphore() {
                Ok(fd) => fd,
                Err(e) => {
                    log::warn!("ibv_create_comp_channel: {e}");
                    return null_with(e.raw_os_error().unwrap_or(libc::EMFILE));
                }
            };
            let ch = Box::new(Channel {
                ibv: ibv_comp_channel {
                    context,
                    fd: fd.as_raw_fd(),
                    refcnt: 0,
                },
                _fd: fd,
            });
            let ptr = Box::into_raw(ch);
            // SAFETY: just made; its fd lives as long as it.
            ctx.add_channel(ptr as usize, unsafe { (*ptr).ibv.fd });
            ctx.adopt(ptr.cast(), Rank::Channel, free_channel);
            ptr.cast::<ibv_comp_channel>()
        },
    )
}

/// Frees a channel.
///
/// # Safety
///
/// `channel` must be a live channel, not used afterwards.
unsafe fn free_channel(channel: *mut c_void) {
    // SAFETY: the caller's contract; a channel's context outlives it.
    unsafe {
        let ch = Box::from_raw(channel.cast::<Channel>());
        if let Some(ctx) = Context::from_ptr(ch.ibv.context) {
            ctx.forget_channel(channel as usize);
        }
        drop(ch);
    }
}

/// `ibv_destroy_comp_channel`: EBUSY while CQs use it.
///
/// # Safety
///
/// `channel` must come from [`ibv_create_comp_channel`] and not be used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_destroy_comp_channel(channel: *mut ibv_comp_channel) -> c_int {
    guard(
        "ibv_destroy_comp_channel",
        || libc::EIO,
        || {
            if channel.is_null() {
                return libc::EINVAL;
            }
            // SAFETY: the caller's contract: a live channel.
            let context = unsafe { (*channel).context };
            // SAFETY: a channel's context outlives it.
            let Some(ctx) = (unsafe { Context::from_ptr(context) }) else {
                return libc::EINVAL;
            };
            if ctx.channel_in_use(channel as usize) {
                return libc::EBUSY;
            }
            ctx.disown(channel.cast());
            // SAFETY: a live channel the caller gives up.
            unsafe { free_channel(channel.cast()) };
            0
        },
    )
}

/// `ibv_get_cq_event`: -1 with errno (EINTR when a signal interrupts the wait, EAGAIN when
/// the channel's fd is non-blocking and nothing is queued).
///
/// # Safety
///
/// `channel` must be a live channel; `cq` and `cq_context` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_get_cq_event(
    channel: *mut ibv_comp_channel,
    cq: *mut *mut ibv_cq,
    cq_context: *mut *mut c_void,
) -> c_int {
    guard(
        "ibv_get_cq_event",
        || -1,
        || {
            if channel.is_null() || cq.is_null() || cq_context.is_null() {
                set_errno(libc::EINVAL);
                return -1;
            }
            // SAFETY: the caller's contract: a live channel, whose context outlives it.
            let Some(ctx) = (unsafe { Context::from_ptr((*channel).context) }) else {
                set_errno(libc::EINVAL);
                return -1;
            };
            // SAFETY: a live channel (checked non-NULL above).
            let fd = unsafe { (*channel).fd };
            match ctx.next_cq_event(channel as usize, fd) {
                Ok(got) => {
                    let got = got as *mut ibv_cq;
                    // SAFETY: `got` is a live CQ (destroying one removes its queued events);
                    // the out pointers are valid (the caller's contract).
                    unsafe {
                        *cq = got;
                        *cq_context = (*got).cq_context;
                    }
                    0
                }
                Err(errno) => {
                    set_errno(errno);
                    -1
                }
            }
        },
    )
}

/// `ibv_ack_cq_events`.
///
/// # Safety
///
/// `cq` must be a live CQ.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_ack_cq_events(cq: *mut ibv_cq, nevents: u32) {
    if cq.is_null() {
        return;
    }
    // SAFETY: the caller's contract: a live CQ.
    unsafe {
        (*cq).comp_events_completed = (*cq).comp_events_completed.wrapping_add(nevents);
    }
}

/// `ibv_get_async_event`.
///
/// # Safety
///
/// `context` must be an open context and `event` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_get_async_event(
    context: *mut ibv_context,
    event: *mut ibv_async_event,
) -> c_int {
    guard(
        "ibv_get_async_event",
        || -1,
        || {
            // SAFETY: the caller's contract.
            let Some(ctx) = (unsafe { Context::from_ptr(context) }) else {
                set_errno(libc::EINVAL);
                return -1;
            };
            if event.is_null() {
                set_errno(libc::EINVAL);
                return -1;
            }
            match ctx.next_async_event() {
                Ok((event_type, element)) => {
                    // SAFETY: valid for writing (the caller's contract).
                    unsafe {
                        event.write(ibv_async_event {
                            element: element as *mut c_void,
                            event_type,
                        })
                    };
                    0
                }
                Err(errno) => {
                    set_errno(errno);
                    -1
                }
            }
        },
    )
}

/// `ibv_ack_async_event`: nothing to release.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_ack_async_event(_event: *mut ibv_async_event) {}
