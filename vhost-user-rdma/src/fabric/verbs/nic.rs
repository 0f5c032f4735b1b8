//! The host's RDMA NIC through libibverbs (rdma-sys): the one module of the daemon that calls
//! it, so every `unsafe` of the verbs fabric is here.
//!
//! Each object holds what it was made from ([`Pd`] the device, [`Mr`] and [`Qp`] their PD, a
//! [`Qp`] its CQs), so drops destroy them in the order verbs requires whatever order the
//! caller drops them in. Nothing here knows of guests: the fabric above decides what to
//! register and post.

use std::ffi::{CStr, c_int};
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::*;

/// Why the NIC could not be used; every message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libibverbs found no device at all.
    #[error(
        "no RDMA device: libibverbs found none on this host; load the NIC's RDMA \
         driver (mlx5_ib, irdma, bnxt_re, rdma_rxe, ...) and check `ibv_devices`, or run with \
         --fabric soft"
    )]
    NoDevice {
        /// errno of `ibv_get_device_list` (ENOSYS without kernel RDMA support).
        #[source]
        source: std::io::Error,
    },
    /// Devices exist, but none by that name.
    #[error(
        "no RDMA device named {name}: this host has {available}; name one in --fabric verbs:NAME"
    )]
    NotFound {
        /// The name asked for.
        name: String,
        /// The names found.
        available: String,
    },
    /// The port cannot be queried: most likely the device has no such port.
    #[error(
        "RDMA device {device} has no port {port} that libibverbs can query: ports are \
         numbered from 1, and `ibv_devinfo -d {device}` lists them; pick one with port=N"
    )]
    NoPort {
        /// The device's name.
        device: String,
        /// The port asked for.
        port: u8,
        /// errno of `ibv_query_port`.
        #[source]
        source: std::io::Error,
    },
    /// The port has no GID at the index asked for.
    #[error(
        "port {port} of RDMA device {device} has no GID at index {index}: `ibv_devinfo -v -d \
         {device}` lists its GID table; pick one with gid-index=N"
    )]
    NoGid {
        /// The device's name.
        device: String,
        /// The port.
        port: u8,
        /// The GID index asked for.
        index: u8,
    },
    /// A work request with more scatter/gather entries than a post here carries.
    #[error(
        "a work request of {count} scatter/gather entries for RDMA device {device}: the \
         verbs fabric posts at most {MAX_SGE}"
    )]
    TooManySges {
        /// The device's name.
        device: String,
        /// Entries asked for.
        count: usize,
    },
    /// A verb failed.
    #[error("{what} failed on RDMA device {device}")]
    Verb {
        /// The verb and its object.
        what: &'static str,
        /// The device's name.
        device: String,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// The port is not up.
    #[error(
        "port {port} of RDMA device {device} is {state}, not active: bring its link up \
         (`ibv_devinfo -d {device}` shows the state)"
    )]
    PortDown {
        /// The device's name.
        device: String,
        /// The port.
        port: u8,
        /// Its state, as libibverbs names it.
        state: String,
    },
}

impl Error {
    /// The errno a failed verb gave, if one did.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Verb { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the host or the command line is at fault (no such device, port or GID) rather
    /// than the NIC misbehaving: the daemon exits 2 for those, as for a bad option.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Error::NoDevice { .. }
                | Error::NotFound { .. }
                | Error::NoPort { .. }
                | Error::NoGid { .. }
        )
    }
}

/// `IBV_LINK_LAYER_ETHERNET` (an anonymous enum in verbs.h that rdma-sys does not bind).
const LINK_LAYER_ETHERNET: u8 = 2;

/// An errno from a verb: the return value if positive (the modify and post calls return it),
/// else errno.
fn errno_of(rc: c_int) -> std::io::Error {
    if rc > 0 {
        std::io::Error::from_raw_os_error(rc)
    } else {
        std::io::Error::last_os_error()
    }
}

/// An open device; closed when the last object made from it goes.
#[derive(Debug)]
struct Device {
    ctx: NonNull<ibv_context>,
    name: String,
}

// SAFETY: libibverbs contexts and the objects made from them may be used from any thread
// (verbs are thread-safe per the libibverbs documentation); the daemon serialises nothing
// through them that the library does not already.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: the context came from ibv_open_device and every object made from it holds
        // this Device, so none is left when it closes.
        unsafe { ibv_close_device(self.ctx.as_ptr()) };
    }
}

impl Device {
    fn failed(&self, what: &'static str, rc: c_int) -> Error {
        Error::Verb {
            what,
            device: self.name.clone(),
            source: errno_of(rc),
        }
    }
}

/// A libibverbs object, what it was made from (`parent`, kept alive until this is
/// destroyed), and the verb that destroys it. Every object type below is one of these, so
/// the order verbs requires (QPs and MRs before their PD, QPs before their CQs, everything
/// before the device) holds whatever order the caller drops things in.
struct Owned<T, P> {
    ptr: NonNull<T>,
    parent: P,
    destroy: unsafe extern "C" fn(*mut T) -> c_int,
}

// By hand: the libibverbs structs themselves have no Debug.
impl<T, P: std::fmt::Debug> std::fmt::Debug for Owned<T, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owned")
            .field("ptr", &self.ptr)
            .field("parent", &self.parent)
            .finish()
    }
}

// SAFETY: see Device: libibverbs objects may be used from any thread.
unsafe impl<T, P: Send> Send for Owned<T, P> {}
// SAFETY: as above.
unsafe impl<T, P: Sync> Sync for Owned<T, P> {}

impl<T, P> Drop for Owned<T, P> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from the verb that made it, `destroy` is that object's destroy
        // verb, and it runs once; whatever was made from this object holds it, so nothing is
        // left that uses it.
        unsafe { (self.destroy)(self.ptr.as_ptr()) };
    }
}

/// The names of the host's RDMA devices.
pub fn device_names() -> Result<Vec<String>, Error> {
    with_devices(|list| Ok(list.iter().map(|(name, _)| name.clone()).collect()))
}

/// Runs `f` on the device list (names and handles), freed afterwards.
fn with_devices<T>(
    f: impl FnOnce(&[(String, *mut ibv_device)]) -> Result<T, Error>,
) -> Result<T, Error> {
    let mut count: c_int = 0;
    // SAFETY: count is a valid out-pointer; the list is freed below.
    let list = unsafe { ibv_get_device_list(&mut count) };
    if list.is_null() {
        return Err(Error::NoDevice {
            source: std::io::Error::last_os_error(),
        });
    }
    let devices: Vec<(String, *mut ibv_device)> = (0..usize::try_from(count).unwrap_or(0))
        .map(|i| {
            // SAFETY: the list holds `count` device pointers, each with a NUL-terminated name
            // that lives as long as the list.
            unsafe {
                let dev = *list.add(i);
                (owned(ibv_get_device_name(dev)), dev)
            }
        })
        .collect();
    let result = if devices.is_empty() {
        Err(Error::NoDevice {
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        })
    } else {
        f(&devices)
    };
    // SAFETY: the list came from ibv_get_device_list; contexts opened from it stay valid.
    unsafe { ibv_free_device_list(list) };
    result
}

/// What the fabric needs of the NIC's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortInfo {
    /// The port number.
    pub port: u8,
    /// Active MTU in bytes.
    pub active_mtu: u32,
    /// `IBV_MTU_*` of the active MTU, for QP attributes.
    pub active_mtu_enum: u32,
    /// The LID (0 on RoCE).
    pub lid: u16,
    /// Ethernet (RoCE) rather than InfiniBand.
    pub ethernet: bool,
    /// The GID at the chosen index.
    pub gid: [u8; 16],
    /// That index.
    pub gid_index: u8,
}

/// An open NIC and the port the fabric uses.
#[derive(Debug, Clone)]
pub struct Nic {
    dev: Arc<Device>,
    port: PortInfo,
}

impl Nic {
    /// Opens device `name` and checks that `port` is active; `gid_index` picks the GID the
    /// fabric's QPs use (on RoCE, index 0 is usually the link-local or first IP address).
    pub fn open(name: &str, port: u8, gid_index: u8) -> Result<Nic, Error> {
        let dev = with_devices(|list| {
            let Some(&(_, handle)) = list.iter().find(|(n, _)| n == name) else {
                return Err(Error::NotFound {
                    name: name.to_owned(),
                    available: list
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            // SAFETY: `handle` is a device of the live list.
            let ctx = unsafe { ibv_open_device(handle) };
            let ctx = NonNull::new(ctx).ok_or_else(|| Error::Verb {
                what: "ibv_open_device",
                device: name.to_owned(),
                source: std::io::Error::last_os_error(),
            })?;
            Ok(Device {
                ctx,
                name: name.to_owned(),
            })
        })?;
        let dev = Arc::new(dev);
        // SAFETY: ibv_port_attr is plain C data for which all-zero is a valid value.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and attr a valid out-pointer of the size passed.
        let rc = unsafe { ___ibv_query_port(dev.ctx.as_ptr(), port, &mut attr) };
        if rc != 0 {
            return Err(Error::NoPort {
                device: name.to_owned(),
                port,
                source: errno_of(rc),
            });
        }
        if attr.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(Error::PortDown {
                device: name.to_owned(),
                port,
                // SAFETY: ibv_port_state_str returns a static string for every value.
                state: unsafe { owned(ibv_port_state_str(attr.state)) },
            });
        }
        // SAFETY: ibv_gid is 16 plain bytes.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and gid a valid out-pointer.
        let rc = unsafe { ibv_query_gid(dev.ctx.as_ptr(), port, c_int::from(gid_index), &mut gid) };
        // An index past the table fails, and an empty entry reads as all zeros.
        // SAFETY: every bit pattern of the union is a valid byte array.
        if rc != 0 || unsafe { gid.raw } == [0; 16] {
            return Err(Error::NoGid {
                device: name.to_owned(),
                port,
                index: gid_index,
            });
        }
        Ok(Nic {
            port: PortInfo {
                port,
                active_mtu: mtu_bytes(attr.active_mtu),
                active_mtu_enum: attr.active_mtu,
                lid: attr.lid,
                ethernet: attr.link_layer == LINK_LAYER_ETHERNET,
                // SAFETY: every bit pattern of the union is a valid byte array.
                gid: unsafe { gid.raw },
                gid_index,
            },
            dev,
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.dev.name
    }

    /// The port in use.
    pub fn port(&self) -> PortInfo {
        self.port
    }

    /// A protection domain.
    pub fn alloc_pd(&self) -> Result<Pd, Error> {
        // SAFETY: the context is open.
        let pd = unsafe { ibv_alloc_pd(self.dev.ctx.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| self.dev.failed("ibv_alloc_pd", -1))?;
        Ok(Pd(Arc::new(Owned {
            ptr: pd,
            parent: self.dev.clone(),
            destroy: ibv_dealloc_pd,
        })))
    }

    /// A completion queue of at least `entries` entries, without a channel (the fabric polls).
    pub fn create_cq(&self, entries: u32) -> Result<Cq, Error> {
        self.make_cq(entries, None, 0)
    }

    /// A completion queue of at least `entries` entries whose events go to `channel`, where
    /// [`CompChannel::take_event`] names it by `cookie`.
    pub fn create_cq_on(
        &self,
        entries: u32,
        channel: &CompChannel,
        cookie: usize,
    ) -> Result<Cq, Error> {
        self.make_cq(entries, Some(channel.0.clone()), cookie)
    }

    fn make_cq(
        &self,
        entries: u32,
        channel: Option<Arc<ChannelInner>>,
        cookie: usize,
    ) -> Result<Cq, Error> {
        let entries = c_int::try_from(entries).unwrap_or(c_int::MAX);
        let channel_ptr = channel
            .as_ref()
            .map_or(std::ptr::null_mut(), |c| c.ptr.as_ptr());
        // SAFETY: the context is open and the channel (if any) is live and kept alive by the
        // CQ; the context pointer is an opaque cookie libibverbs only hands back.
        let cq = unsafe {
            ibv_create_cq(
                self.dev.ctx.as_ptr(),
                entries,
                cookie as *mut std::ffi::c_void,
                channel_ptr,
                0,
            )
        };
        let cq = NonNull::new(cq).ok_or_else(|| self.dev.failed("ibv_create_cq", -1))?;
        Ok(Cq(Arc::new(Owned {
            ptr: cq,
            parent: (self.dev.clone(), channel),
            destroy: ibv_destroy_cq,
        })))
    }

    /// A completion channel: a file descriptor that becomes readable when a CQ made on it
    /// and armed has a completion.
    pub fn create_channel(&self) -> Result<CompChannel, Error> {
        // SAFETY: the context is open.
        let ch = unsafe { ibv_create_comp_channel(self.dev.ctx.as_ptr()) };
        let ch = NonNull::new(ch).ok_or_else(|| self.dev.failed("ibv_create_comp_channel", -1))?;
        Ok(CompChannel(Arc::new(Owned {
            ptr: ch,
            parent: self.dev.clone(),
            destroy: ibv_destroy_comp_channel,
        })))
    }
}

type ChannelInner = Owned<ibv_comp_channel, Arc<Device>>;

/// A completion channel; destroyed after the last CQ made on it.
#[derive(Debug, Clone)]
pub struct CompChannel(Arc<ChannelInner>);

impl CompChannel {
    /// The descriptor to wait on (`poll` for readable).
    pub fn fd(&self) -> std::os::fd::RawFd {
        // SAFETY: the channel is live; fd never changes.
        unsafe { (*self.0.ptr.as_ptr()).fd }
    }

    /// Takes one completion event, waiting for it if none is pending, acknowledges it, and
    /// returns the cookie of the CQ it is for (that CQ is disarmed until armed again).
    pub fn take_event(&self) -> Result<usize, Error> {
        let mut cq: *mut ibv_cq = std::ptr::null_mut();
        let mut cookie: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: the channel is live and both out-pointers valid.
        let rc = unsafe { ibv_get_cq_event(self.0.ptr.as_ptr(), &mut cq, &mut cookie) };
        if rc != 0 || cq.is_null() {
            return Err(self.0.parent.failed("ibv_get_cq_event", rc));
        }
        // SAFETY: `cq` is the live CQ the event is for (a CQ with unacknowledged events
        // cannot be destroyed, so it is still there); acknowledging at once keeps that true
        // for every later destroy.
        unsafe { ibv_ack_cq_events(cq, 1) };
        Ok(cookie as usize)
    }
}

/// A string libibverbs returned, as an owned String.
///
/// # Safety
///
/// `s` must point to a NUL-terminated string that stays valid during the call.
unsafe fn owned(s: *const std::ffi::c_char) -> String {
    // SAFETY: the caller's contract.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

/// libibverbs' name of work completion status `status` (`ibv_wc_status_str`).
pub fn status_text(status: u32) -> String {
    // SAFETY: ibv_wc_status_str returns a static string for every value ("unknown" past its
    // table).
    unsafe { owned(ibv_wc_status_str(status)) }
}

fn mtu_bytes(mtu: u32) -> u32 {
    match mtu {
        ibv_mtu::IBV_MTU_256 => 256,
        ibv_mtu::IBV_MTU_512 => 512,
        ibv_mtu::IBV_MTU_1024 => 1024,
        ibv_mtu::IBV_MTU_2048 => 2048,
        ibv_mtu::IBV_MTU_4096 => 4096,
        _ => 0,
    }
}

type PdInner = Owned<ibv_pd, Arc<Device>>;

/// A protection domain.
#[derive(Debug, Clone)]
pub struct Pd(Arc<PdInner>);

/// Access rights of a memory registration, as verbs names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// The NIC may write it for a local work request (receives, READ and atomic results).
    pub local_write: bool,
    /// Peers may WRITE it.
    pub remote_write: bool,
    /// Peers may READ it.
    pub remote_read: bool,
    /// Peers may run atomics on it.
    pub remote_atomic: bool,
}

impl Access {
    /// Everything.
    pub const ALL: Access = Access {
        local_write: true,
        remote_write: true,
        remote_read: true,
        remote_atomic: true,
    };

    fn flags(self) -> c_int {
        let mut f = 0u32;
        for (on, flag) in [
            (self.local_write, ibv_access_flags::IBV_ACCESS_LOCAL_WRITE),
            (self.remote_write, ibv_access_flags::IBV_ACCESS_REMOTE_WRITE),
            (self.remote_read, ibv_access_flags::IBV_ACCESS_REMOTE_READ),
            (
                self.remote_atomic,
                ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC,
            ),
        ] {
            if on {
                f |= flag.0;
            }
        }
        c_int::try_from(f).unwrap_or(0)
    }
}

impl Pd {
    /// An address handle for UD sends to the port with GID `gid` (and LID `lid`) through
    /// `port`.
    pub fn create_ah(&self, port: &PortInfo, gid: [u8; 16], lid: u16) -> Result<Ah, Error> {
        self.create_ah_to(
            port,
            &Path {
                gid,
                lid,
                ..Path::default()
            },
        )
    }

    /// Registers `len` bytes at `addr` with the NIC.
    ///
    /// # Safety
    ///
    /// The range must stay mapped, and must not be given back to the allocator or unmapped,
    /// for as long as the returned [`Mr`] lives: the NIC reads and writes it directly.
    pub unsafe fn register(&self, addr: *mut u8, len: usize, access: Access) -> Result<Mr, Error> {
        // SAFETY: the PD is live; the caller keeps the range mapped for the MR's life.
        let mr = unsafe { ibv_reg_mr(self.0.ptr.as_ptr(), addr.cast(), len, access.flags()) };
        let mr = NonNull::new(mr).ok_or_else(|| self.0.parent.failed("ibv_reg_mr", -1))?;
        Ok(Mr(Owned {
            ptr: mr,
            parent: self.0.clone(),
            destroy: ibv_dereg_mr,
        }))
    }
}

impl Pd {
    /// An address handle for UD sends along `path` through `port`.
    pub fn create_ah_to(&self, port: &PortInfo, path: &Path) -> Result<Ah, Error> {
        let mut attr = path.ah_attr(port);
        // SAFETY: the PD is live and attr a valid attribute block.
        let ah = unsafe { ibv_create_ah(self.0.ptr.as_ptr(), &mut attr) };
        let ah = NonNull::new(ah).ok_or_else(|| self.0.parent.failed("ibv_create_ah", -1))?;
        Ok(Ah(Owned {
            ptr: ah,
            parent: self.0.clone(),
            destroy: ibv_destroy_ah,
        }))
    }

    /// Registers `len` bytes at `addr` with the NIC, named `iova` by work requests and peers.
    ///
    /// # Safety
    ///
    /// As [`Pd::register`]: the range must stay mapped for as long as the returned [`Mr`]
    /// lives.
    pub unsafe fn register_iova(
        &self,
        addr: *mut u8,
        len: usize,
        iova: u64,
        access: Access,
    ) -> Result<Mr, Error> {
        // SAFETY: the PD is live; the caller keeps the range mapped for the MR's life.
        let mr = unsafe {
            ibv_reg_mr_iova2(
                self.0.ptr.as_ptr(),
                addr.cast(),
                len,
                iova,
                access.flags() as u32,
            )
        };
        let mr = NonNull::new(mr).ok_or_else(|| self.0.parent.failed("ibv_reg_mr_iova2", -1))?;
        Ok(Mr(Owned {
            ptr: mr,
            parent: self.0.clone(),
            destroy: ibv_dereg_mr,
        }))
    }
}

type SrqInner = Owned<ibv_srq, Arc<PdInner>>;

/// A shared receive queue.
#[derive(Debug, Clone)]
pub struct Srq(Arc<SrqInner>);

impl Pd {
    /// A shared receive queue of `max_wr` receives of up to `max_sge` SGEs each.
    pub fn create_srq(&self, max_wr: u32, max_sge: u32) -> Result<Srq, Error> {
        // SAFETY: plain C data, all-zero valid.
        let mut init: ibv_srq_init_attr = unsafe { std::mem::zeroed() };
        init.attr.max_wr = max_wr;
        init.attr.max_sge = max_sge.max(1);
        // SAFETY: the PD is live and init a valid attribute block.
        let srq = unsafe { ibv_create_srq(self.0.ptr.as_ptr(), &mut init) };
        let srq = NonNull::new(srq).ok_or_else(|| self.0.parent.failed("ibv_create_srq", -1))?;
        Ok(Srq(Arc::new(Owned {
            ptr: srq,
            parent: self.0.clone(),
            destroy: ibv_destroy_srq,
        })))
    }
}

impl Srq {
    /// Posts one receive of `sges` with id `wr_id`.
    pub fn post_recv(&self, wr_id: u64, sges: &[Sge]) -> Result<(), Error> {
        let srq = self.0.ptr.as_ptr();
        post_receive(
            &self.0.parent.parent,
            wr_id,
            sges,
            "ibv_post_srq_recv",
            |wr, bad| {
                // SAFETY: the SRQ is live; the call copies the request and its list.
                unsafe { ibv_post_srq_recv(srq, wr, bad) }
            },
        )
    }
}

/// An address handle: where a UD send goes. A send naming it borrows it for the post only,
/// after which the NIC has copied what it needs.
#[derive(Debug)]
pub struct Ah(Owned<ibv_ah, Arc<PdInner>>);

/// A memory registration.
#[derive(Debug)]
pub struct Mr(Owned<ibv_mr, Arc<PdInner>>);

impl Mr {
    /// The key local work requests name it by.
    pub fn lkey(&self) -> u32 {
        // SAFETY: the MR is live; lkey never changes.
        unsafe { (*self.0.ptr.as_ptr()).lkey }
    }

    /// The key peers name it by.
    pub fn rkey(&self) -> u32 {
        // SAFETY: as lkey.
        unsafe { (*self.0.ptr.as_ptr()).rkey }
    }
}

type CqInner = Owned<ibv_cq, (Arc<Device>, Option<Arc<ChannelInner>>)>;

/// A completion queue.
#[derive(Debug, Clone)]
pub struct Cq(Arc<CqInner>);

/// A completion, as the fabric reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Completion {
    /// The work request's id.
    pub wr_id: u64,
    /// `IBV_WC_*` status (0 is success).
    pub status: u32,
    /// `IBV_WC_*` opcode.
    pub opcode: u32,
    /// Bytes received (receives).
    pub byte_len: u32,
    /// The QP it belongs to.
    pub qp_num: u32,
    /// Immediate data in host order, if any.
    pub imm: Option<u32>,
    /// The sender's QP (receives).
    pub src_qp: u32,
    /// A GRH is in the receive buffer's first 40 bytes (UD receives).
    pub grh: bool,
    /// Service level of the received packet.
    pub sl: u8,
}

impl Cq {
    /// Arms the CQ: its channel gets an event at the next completion.
    pub fn arm(&self) -> Result<(), Error> {
        // SAFETY: the CQ is live.
        let rc = unsafe { ibv_req_notify_cq(self.0.ptr.as_ptr(), 0) };
        if rc != 0 {
            return Err(self.0.parent.0.failed("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    /// Takes up to `out.len()` completions; returns how many.
    pub fn poll(&self, out: &mut [Completion]) -> Result<usize, Error> {
        const BATCH: usize = 16;
        let mut wcs = [const { std::mem::MaybeUninit::<ibv_wc>::uninit() }; BATCH];
        let want = out.len().min(BATCH);
        // SAFETY: the CQ is live and wcs has room for `want` entries, which ibv_poll_cq
        // fills (only the `n` it returns are read below).
        let n = unsafe { ibv_poll_cq(self.0.ptr.as_ptr(), want as c_int, wcs[0].as_mut_ptr()) };
        if n < 0 {
            return Err(self.0.parent.0.failed("ibv_poll_cq", n));
        }
        let n = (n as usize).min(want);
        for (o, wc) in out.iter_mut().zip(&wcs[..n]) {
            // SAFETY: ibv_poll_cq wrote the first `n` entries.
            let wc = unsafe { wc.assume_init_ref() };
            *o = Completion {
                wr_id: wc.wr_id,
                status: wc.status,
                opcode: wc.opcode,
                byte_len: wc.byte_len,
                qp_num: wc.qp_num,
                imm: (wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0)
                    // SAFETY: with IBV_WC_WITH_IMM the union holds the immediate data.
                    .then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })),
                src_qp: wc.src_qp,
                grh: wc.wc_flags & ibv_wc_flags::IBV_WC_GRH.0 != 0,
                sl: wc.sl,
            };
        }
        Ok(n)
    }
}

/// The transport of a QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpKind {
    /// Reliable connected.
    Rc,
    /// Unreliable datagram.
    Ud,
}

/// Queue sizes of a QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Send queue entries.
    pub send_wr: u32,
    /// Receive queue entries.
    pub recv_wr: u32,
    /// Scatter/gather entries per work request.
    pub sge: u32,
}

/// Where an RC QP's peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteQp {
    /// Its QP number.
    pub qpn: u32,
    /// The first PSN it expects.
    pub psn: u32,
    /// Its port's GID.
    pub gid: [u8; 16],
    /// Its LID (0 on RoCE).
    pub lid: u16,
}

/// A QP's state, as verbs names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    /// RESET.
    Reset,
    /// INIT.
    Init,
    /// Ready to receive.
    Rtr,
    /// Ready to send.
    Rts,
    /// Send queue drained.
    Sqd,
    /// Send queue error (UD).
    Sqe,
    /// Error.
    Err,
}

impl QpState {
    fn raw(self) -> u32 {
        match self {
            QpState::Reset => ibv_qp_state::IBV_QPS_RESET,
            QpState::Init => ibv_qp_state::IBV_QPS_INIT,
            QpState::Rtr => ibv_qp_state::IBV_QPS_RTR,
            QpState::Rts => ibv_qp_state::IBV_QPS_RTS,
            QpState::Sqd => ibv_qp_state::IBV_QPS_SQD,
            QpState::Sqe => ibv_qp_state::IBV_QPS_SQE,
            QpState::Err => ibv_qp_state::IBV_QPS_ERR,
        }
    }

    fn from_raw(raw: u32) -> QpState {
        match raw {
            ibv_qp_state::IBV_QPS_RESET => QpState::Reset,
            ibv_qp_state::IBV_QPS_INIT => QpState::Init,
            ibv_qp_state::IBV_QPS_RTR => QpState::Rtr,
            ibv_qp_state::IBV_QPS_RTS => QpState::Rts,
            ibv_qp_state::IBV_QPS_SQD => QpState::Sqd,
            ibv_qp_state::IBV_QPS_SQE => QpState::Sqe,
            _ => QpState::Err,
        }
    }
}

/// Where a connected QP sends, or an address handle leads: the peer's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Path {
    /// The peer port's GID.
    pub gid: [u8; 16],
    /// Its LID (0 on RoCE).
    pub lid: u16,
    /// IPv6 hop limit (IP TTL).
    pub hop_limit: u8,
    /// Traffic class (DSCP and ECN).
    pub traffic_class: u8,
    /// Flow label.
    pub flow_label: u32,
    /// Service level.
    pub sl: u8,
}

impl Path {
    fn ah_attr(&self, port: &PortInfo) -> ibv_ah_attr {
        // SAFETY: plain C data, all-zero valid.
        let mut attr: ibv_ah_attr = unsafe { std::mem::zeroed() };
        attr.dlid = self.lid;
        attr.sl = self.sl;
        attr.port_num = port.port;
        attr.is_global = 1;
        attr.grh.dgid = ibv_gid { raw: self.gid };
        attr.grh.sgid_index = port.gid_index;
        attr.grh.hop_limit = if self.hop_limit == 0 {
            64
        } else {
            self.hop_limit
        };
        attr.grh.traffic_class = self.traffic_class;
        attr.grh.flow_label = self.flow_label;
        attr
    }
}

/// Attributes to change with one `ibv_modify_qp`; `None` leaves an attribute alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct Modify {
    /// The state to move to.
    pub state: Option<QpState>,
    /// Remote access (RC).
    pub access: Option<Access>,
    /// Q_Key (UD).
    pub qkey: Option<u32>,
    /// P_Key index.
    pub pkey_index: Option<u16>,
    /// Port: always the fabric's port, set whenever the guest names one.
    pub port: bool,
    /// The peer (RC).
    pub path: Option<Path>,
    /// Path MTU, `IBV_MTU_*`.
    pub path_mtu: Option<u32>,
    /// The peer's QP number (RC).
    pub dest_qpn: Option<u32>,
    /// First PSN expected.
    pub rq_psn: Option<u32>,
    /// First PSN sent.
    pub sq_psn: Option<u32>,
    /// ACK timeout, as verbs encodes it.
    pub timeout: Option<u8>,
    /// Transport retries.
    pub retry_cnt: Option<u8>,
    /// RNR retries (7 is infinite).
    pub rnr_retry: Option<u8>,
    /// READs and atomics outstanding as requester.
    pub max_rd_atomic: Option<u8>,
    /// READs and atomics outstanding as responder.
    pub max_dest_rd_atomic: Option<u8>,
    /// RNR NAK timer, as verbs encodes it.
    pub min_rnr_timer: Option<u8>,
}

/// A QP holds its PD, its send and receive CQs and its SRQ.
type QpInner = Owned<ibv_qp, (Arc<PdInner>, [Arc<CqInner>; 2], Option<Arc<SrqInner>>)>;

/// A queue pair.
#[derive(Debug, Clone)]
pub struct Qp(Arc<QpInner>);

/// One scatter/gather entry: bytes at `addr` of a registration whose key is `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    /// The address (in the registration's address space).
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// The registration's local key.
    pub lkey: u32,
}

/// What a send work request does.
#[derive(Debug, Clone, Copy)]
pub enum SendOp<'a> {
    /// SEND, with immediate data if given.
    Send {
        /// Immediate data (host order).
        imm: Option<u32>,
    },
    /// A UD SEND to QP `qpn` with `qkey` at the port `ah` leads to, with immediate data if
    /// given.
    Datagram {
        /// Where it goes.
        ah: &'a Ah,
        /// The destination QP.
        qpn: u32,
        /// Its Q_Key.
        qkey: u32,
        /// Immediate data (host order).
        imm: Option<u32>,
    },
    /// RDMA WRITE to the peer's `addr` under `rkey`, with immediate data if given.
    Write {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
        /// Immediate data (host order).
        imm: Option<u32>,
    },
    /// RDMA READ of the peer's `addr` under `rkey`.
    Read {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
    },
    /// 8-byte atomic compare-and-swap at the peer's `addr`.
    CompareSwap {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
        /// The value compared.
        compare: u64,
        /// The value stored if equal.
        swap: u64,
    },
    /// 8-byte atomic fetch-and-add at the peer's `addr`.
    FetchAdd {
        /// Remote address.
        addr: u64,
        /// Remote key.
        rkey: u32,
        /// The value added.
        add: u64,
    },
}

/// The most scatter/gather entries one posted request may carry here (the stack array the
/// post builds).
pub const MAX_SGE: usize = crate::limits::MAX_SGE as usize;

/// `sges` as the stack array a post hands libibverbs, and how many there are.
fn sge_list(device: &Device, sges: &[Sge]) -> Result<([ibv_sge; MAX_SGE], usize), Error> {
    if sges.len() > MAX_SGE {
        return Err(Error::TooManySges {
            device: device.name.clone(),
            count: sges.len(),
        });
    }
    let mut list = [ibv_sge {
        addr: 0,
        length: 0,
        lkey: 0,
    }; MAX_SGE];
    for (d, s) in list.iter_mut().zip(sges) {
        *d = ibv_sge {
            addr: s.addr,
            length: s.len,
            lkey: s.lkey,
        };
    }
    Ok((list, sges.len()))
}

/// Builds one receive of `sges` with id `wr_id` and hands it to `post` (`ibv_post_recv` or
/// `ibv_post_srq_recv`, which copy it), reporting a failure as verb `what` of `device`.
fn post_receive(
    device: &Device,
    wr_id: u64,
    sges: &[Sge],
    what: &'static str,
    post: impl FnOnce(*mut ibv_recv_wr, *mut *mut ibv_recv_wr) -> c_int,
) -> Result<(), Error> {
    let (mut list, n) = sge_list(device, sges)?;
    let mut wr = ibv_recv_wr {
        wr_id,
        next: std::ptr::null_mut(),
        sg_list: list.as_mut_ptr(),
        num_sge: n as c_int,
    };
    let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
    let rc = post(&mut wr, &mut bad);
    if rc != 0 {
        return Err(device.failed(what, rc));
    }
    Ok(())
}

/// Send flags besides SIGNALED (every request the fabric posts is signalled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PostFlags {
    /// The receiver's completion is solicited.
    pub solicited: bool,
    /// Wait for earlier READs and atomics to complete first.
    pub fence: bool,
}

impl Qp {
    /// Creates a QP of `kind` on `pd` with `send_cq` and `recv_cq`, taking its receives from
    /// `srq` if given.
    pub fn create(
        pd: &Pd,
        send_cq: &Cq,
        recv_cq: &Cq,
        srq: Option<&Srq>,
        kind: QpKind,
        caps: QpCaps,
    ) -> Result<Qp, Error> {
        // SAFETY: plain C data, all-zero valid.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = send_cq.0.ptr.as_ptr();
        init.recv_cq = recv_cq.0.ptr.as_ptr();
        init.cap.max_send_wr = caps.send_wr;
        init.cap.max_recv_wr = caps.recv_wr;
        init.cap.max_send_sge = caps.sge;
        init.cap.max_recv_sge = caps.sge;
        if let Some(srq) = srq {
            init.srq = srq.0.ptr.as_ptr();
            init.cap.max_recv_wr = 0;
            init.cap.max_recv_sge = 0;
        }
        init.qp_type = match kind {
            QpKind::Rc => ibv_qp_type::IBV_QPT_RC,
            QpKind::Ud => ibv_qp_type::IBV_QPT_UD,
        };
        // SAFETY: the PD and CQs are live (the QP holds them from now on).
        let qp = unsafe { ibv_create_qp(pd.0.ptr.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| pd.0.parent.failed("ibv_create_qp", -1))?;
        Ok(Qp(Arc::new(Owned {
            ptr: qp,
            parent: (
                pd.0.clone(),
                [send_cq.0.clone(), recv_cq.0.clone()],
                srq.map(|s| s.0.clone()),
            ),
            destroy: ibv_destroy_qp,
        })))
    }

    fn device(&self) -> &Device {
        &self.0.parent.0.parent
    }

    /// The QP number peers address it by.
    pub fn qpn(&self) -> u32 {
        // SAFETY: the QP is live; qp_num never changes.
        unsafe { (*self.0.ptr.as_ptr()).qp_num }
    }

    fn modify(
        &self,
        attr: &mut ibv_qp_attr,
        mask: ibv_qp_attr_mask,
        what: &'static str,
    ) -> Result<(), Error> {
        // SAFETY: the QP is live and attr a valid attribute block for `mask`.
        let rc = unsafe { ibv_modify_qp(self.0.ptr.as_ptr(), attr, mask.0 as c_int) };
        if rc != 0 {
            return Err(self.device().failed(what, rc));
        }
        Ok(())
    }

    /// Changes the attributes `m` names, through the fabric's `port`.
    pub fn modify_with(&self, port: &PortInfo, m: &Modify) -> Result<(), Error> {
        use ibv_qp_attr_mask as M;
        // SAFETY: plain C data, all-zero valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        let mut mask = M(0);
        // Each attribute given goes into `attr`, with its bit in `mask`.
        macro_rules! set {
            ($($given:expr => $field:ident, $bit:ident;)*) => {
                $(if let Some(v) = $given {
                    attr.$field = v;
                    mask |= M::$bit;
                })*
            };
        }
        set! {
            m.state.map(QpState::raw) => qp_state, IBV_QP_STATE;
            m.access.map(|a| a.flags() as u32) => qp_access_flags, IBV_QP_ACCESS_FLAGS;
            m.qkey => qkey, IBV_QP_QKEY;
            m.pkey_index => pkey_index, IBV_QP_PKEY_INDEX;
            m.port.then_some(port.port) => port_num, IBV_QP_PORT;
            m.path.map(|p| p.ah_attr(port)) => ah_attr, IBV_QP_AV;
            m.path_mtu.map(|mtu| mtu.min(port.active_mtu_enum)) => path_mtu, IBV_QP_PATH_MTU;
            m.dest_qpn => dest_qp_num, IBV_QP_DEST_QPN;
            m.rq_psn => rq_psn, IBV_QP_RQ_PSN;
            m.sq_psn => sq_psn, IBV_QP_SQ_PSN;
            m.timeout => timeout, IBV_QP_TIMEOUT;
            m.retry_cnt => retry_cnt, IBV_QP_RETRY_CNT;
            m.rnr_retry => rnr_retry, IBV_QP_RNR_RETRY;
            m.max_rd_atomic => max_rd_atomic, IBV_QP_MAX_QP_RD_ATOMIC;
            m.max_dest_rd_atomic => max_dest_rd_atomic, IBV_QP_MAX_DEST_RD_ATOMIC;
            m.min_rnr_timer => min_rnr_timer, IBV_QP_MIN_RNR_TIMER;
        }
        self.modify(&mut attr, mask, "ibv_modify_qp")
    }

    /// Moves the QP to ERR from any state: the NIC flushes what it holds.
    pub fn to_error(&self) -> Result<(), Error> {
        // SAFETY: plain C data, all-zero valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_ERR;
        self.modify(
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE,
            "ibv_modify_qp to ERR",
        )
    }

    /// The QP's current state, as the NIC sees it (it moves to ERR by itself on a transport
    /// or responder error).
    pub fn state(&self) -> Result<QpState, Error> {
        // SAFETY: plain C data, all-zero valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: plain C data, all-zero valid.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the QP is live and both blocks valid out-pointers.
        let rc = unsafe {
            ibv_query_qp(
                self.0.ptr.as_ptr(),
                &mut attr,
                ibv_qp_attr_mask::IBV_QP_STATE.0 as c_int,
                &mut init,
            )
        };
        if rc != 0 {
            return Err(self.device().failed("ibv_query_qp", rc));
        }
        Ok(QpState::from_raw(attr.qp_state))
    }

    /// RESET to INIT on `port` with remote `access` (RC) or `qkey` (UD).
    pub fn to_init(&self, port: &PortInfo, access: Access, qkey: Option<u32>) -> Result<(), Error> {
        self.modify_with(
            port,
            &Modify {
                state: Some(QpState::Init),
                pkey_index: Some(0),
                port: true,
                access: qkey.is_none().then_some(access),
                qkey,
                ..Modify::default()
            },
        )
    }

    /// An RC QP from INIT to RTR, connected to `remote` through `port`.
    pub fn to_rtr(&self, port: &PortInfo, remote: &RemoteQp) -> Result<(), Error> {
        self.modify_with(
            port,
            &Modify {
                state: Some(QpState::Rtr),
                path: Some(Path {
                    gid: remote.gid,
                    lid: remote.lid,
                    ..Path::default()
                }),
                path_mtu: Some(port.active_mtu_enum),
                dest_qpn: Some(remote.qpn),
                rq_psn: Some(remote.psn),
                max_dest_rd_atomic: Some(16),
                min_rnr_timer: Some(12),
                ..Modify::default()
            },
        )
    }

    /// A UD QP from INIT to RTR, then to RTS sending from `psn`.
    pub fn ud_to_rts(&self, port: &PortInfo, psn: u32) -> Result<(), Error> {
        self.modify_with(
            port,
            &Modify {
                state: Some(QpState::Rtr),
                ..Modify::default()
            },
        )?;
        self.modify_with(
            port,
            &Modify {
                state: Some(QpState::Rts),
                sq_psn: Some(psn),
                ..Modify::default()
            },
        )
    }

    /// An RC QP from RTR to RTS, sending from `psn`.
    pub fn to_rts(&self, port: &PortInfo, psn: u32) -> Result<(), Error> {
        self.modify_with(
            port,
            &Modify {
                state: Some(QpState::Rts),
                sq_psn: Some(psn),
                timeout: Some(14),
                retry_cnt: Some(7),
                rnr_retry: Some(7),
                max_rd_atomic: Some(16),
                ..Modify::default()
            },
        )
    }

    fn sge_list(&self, sges: &[Sge]) -> Result<([ibv_sge; MAX_SGE], usize), Error> {
        sge_list(self.device(), sges)
    }

    /// Posts one signalled send work request `op` of `sges` with id `wr_id`.
    ///
    /// Safe: the NIC reaches memory only through registrations whose keys the request names,
    /// and a [`Mr`] keeps its range registered (its `register` made the caller promise the
    /// range stays mapped); a request naming a wrong key or range completes with an error.
    pub fn post_send(&self, wr_id: u64, sges: &[Sge], op: SendOp<'_>) -> Result<(), Error> {
        self.post_send_with(wr_id, sges, op, PostFlags::default())
    }

    /// As [`Qp::post_send`], with `flags`.
    pub fn post_send_with(
        &self,
        wr_id: u64,
        sges: &[Sge],
        op: SendOp<'_>,
        flags: PostFlags,
    ) -> Result<(), Error> {
        let (mut list, n) = self.sge_list(sges)?;
        // SAFETY: plain C data (pointers null, unions zero), all-zero valid.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = list.as_mut_ptr();
        wr.num_sge = n as c_int;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        if flags.solicited {
            wr.send_flags |= ibv_send_flags::IBV_SEND_SOLICITED.0;
        }
        if flags.fence {
            wr.send_flags |= ibv_send_flags::IBV_SEND_FENCE.0;
        }
        let imm_be = |imm: u32| imm.to_be();
        match op {
            SendOp::Send { imm } => {
                wr.opcode = match imm {
                    Some(_) => ibv_wr_opcode::IBV_WR_SEND_WITH_IMM,
                    None => ibv_wr_opcode::IBV_WR_SEND,
                };
                wr.imm_data_invalidated_rkey_union.imm_data = imm.map_or(0, imm_be);
            }
            SendOp::Datagram { ah, qpn, qkey, imm } => {
                wr.opcode = match imm {
                    Some(_) => ibv_wr_opcode::IBV_WR_SEND_WITH_IMM,
                    None => ibv_wr_opcode::IBV_WR_SEND,
                };
                wr.imm_data_invalidated_rkey_union.imm_data = imm.map_or(0, imm_be);
                wr.wr.ud = ud_t {
                    ah: ah.0.ptr.as_ptr(),
                    remote_qpn: qpn,
                    remote_qkey: qkey,
                };
            }
            SendOp::Write { addr, rkey, imm } => {
                wr.opcode = match imm {
                    Some(_) => ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
                    None => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                };
                wr.imm_data_invalidated_rkey_union.imm_data = imm.map_or(0, imm_be);
                wr.wr.rdma = rdma_t {
                    remote_addr: addr,
                    rkey,
                };
            }
            SendOp::Read { addr, rkey } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
                wr.wr.rdma = rdma_t {
                    remote_addr: addr,
                    rkey,
                };
            }
            SendOp::CompareSwap {
                addr,
                rkey,
                compare,
                swap,
            } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP;
                wr.wr.atomic = atomic_t {
                    remote_addr: addr,
                    compare_add: compare,
                    swap,
                    rkey,
                };
            }
            SendOp::FetchAdd { addr, rkey, add } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD;
                wr.wr.atomic = atomic_t {
                    remote_addr: addr,
                    compare_add: add,
                    swap: 0,
                    rkey,
                };
            }
        }
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is live; wr and its sg_list live on this stack frame for the call,
        // which copies them into the send queue.
        let rc = unsafe { ibv_post_send(self.0.ptr.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(self.device().failed("ibv_post_send", rc));
        }
        Ok(())
    }

    /// Posts one receive work request of `sges` with id `wr_id`.
    pub fn post_recv(&self, wr_id: u64, sges: &[Sge]) -> Result<(), Error> {
        let qp = self.0.ptr.as_ptr();
        post_receive(self.device(), wr_id, sges, "ibv_post_recv", |wr, bad| {
            // SAFETY: the QP is live; the call copies the request and its list.
            unsafe { ibv_post_recv(qp, wr, bad) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_statuses_are_named_as_libibverbs_names_them() {
        assert_eq!(status_text(ibv_wc_status::IBV_WC_SUCCESS), "success");
        assert!(
            status_text(ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR).contains("RNR"),
            "{}",
            status_text(ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR)
        );
        assert_eq!(status_text(9999), "unknown");
    }
}
