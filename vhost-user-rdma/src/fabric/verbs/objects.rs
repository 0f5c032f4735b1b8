//! A VM's objects on the NIC as the verbs fabric keeps them: what each guest object's NIC
//! object is, what the fabric has posted and not yet seen complete, and the room for sends
//! that all VMs share. Plain data behind the VM's lock (taken first) and this module's own;
//! [`super::mirror`] makes and changes it from the control paths, [`super::post`] and
//! [`super::completions`] from the data path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::nic;
use crate::model::memory::GuestMem;
use crate::rnic::requester::Retired;

/// A registration and the guest memory it lies in, kept mapped while the NIC may reach it.
#[derive(Debug)]
pub struct NicMr {
    /// The NIC's registration (dropped before the window it covers).
    pub mr: nic::Mr,
    /// The range the guest's pages were mapped into for it, if they were not one range in
    /// the daemon's mappings already.
    _window: Option<super::window::Window>,
    /// The memory table it was registered from: holding it keeps the mapping alive even if
    /// the frontend replaces the table meanwhile.
    _mem: GuestMem,
}

impl NicMr {
    /// Registration `mr`, which lies in `mem`.
    pub fn new(mr: nic::Mr, mem: &GuestMem) -> Self {
        NicMr {
            mr,
            _window: None,
            _mem: mem.clone(),
        }
    }

    /// Registration `mr` over `window`, which maps pages of `mem`.
    pub fn in_window(mr: nic::Mr, window: super::window::Window, mem: &GuestMem) -> Self {
        NicMr {
            mr,
            _window: Some(window),
            _mem: mem.clone(),
        }
    }
}

/// One direction of a QP's work on the NIC.
#[derive(Debug, Clone, Copy, Default)]
pub struct Track {
    /// The ring index of the next entry to post, or `None` to start at the ring's head.
    pub next: Option<u32>,
    /// Entries posted and not yet completed by the NIC.
    pub in_flight: u32,
}

impl Track {
    /// The next index to post, given the ring's head (entries before the head are done, by
    /// a completion or a flush).
    pub fn next_from(&self, head: u32) -> u32 {
        match self.next {
            Some(n) if (n.wrapping_sub(head) as i32) >= 0 => n,
            _ => head,
        }
    }
}

/// A receive posted to the NIC: what its completion needs.
#[derive(Debug, Clone, Copy, Default)]
pub struct PostedRecv {
    /// The guest's `wr_id`.
    pub wr_id: u64,
    /// Its first SGE (lkey, address), where a UD receive's GRH lands.
    pub first: Option<(u32, u64)>,
}

/// A send the fabric could not post, waiting for the requests before it to complete so that
/// it fails in order.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    /// Its ring index.
    pub index: u32,
    /// What it completes as.
    pub retired: Retired,
    /// Its status.
    pub status: vrdma_proto::cqe::Status,
    /// Why.
    pub vendor: vrdma_proto::cqe::VendorErr,
}

/// A guest QP's NIC QP and its progress.
#[derive(Debug)]
pub struct NicQp {
    /// The NIC's QP.
    pub qp: nic::Qp,
    /// The send ring, registered so inline data goes out from the guest's own slot.
    pub ring: NicMr,
    /// Bumped at every reset: completions of an earlier life are ignored.
    pub epoch: u16,
    /// Sends.
    pub send: Track,
    /// Receives.
    pub recv: Track,
    /// What each posted send retires as, by ring slot.
    pub sends: Vec<Option<Retired>>,
    /// Each posted receive, by ring slot.
    pub recvs: Vec<PostedRecv>,
    /// A send that failed its checks behind requests still on the NIC.
    pub fault: Option<Fault>,
    /// Posting stopped for lack of room in the ring: a completion hands the QP back to the
    /// scheduler.
    pub stalled: bool,
    /// The NIC's QP was taken to ERR after the guest's (done once per entry into ERR).
    pub stopped: bool,
}

/// A guest SRQ's NIC SRQ and the receives posted to it. Receives leave the guest's ring as
/// they are posted (the NIC holds them from then on, and takes them in any order), at most
/// the ring's depth at once.
#[derive(Debug)]
pub struct NicSrq {
    /// The NIC's SRQ.
    pub srq: nic::Srq,
    /// Each receive on the NIC, by the slot its work request id names.
    pub posted: Vec<Option<PostedRecv>>,
    /// Slots free for the next receive.
    pub free: Vec<u32>,
}

/// A VM's objects on the NIC.
#[derive(Debug, Default)]
pub struct NicState {
    /// PDs, by the guest's PD number.
    pub pds: HashMap<u32, nic::Pd>,
    /// MRs, by the guest's lkey.
    pub mrs: HashMap<u32, NicMr>,
    /// CQs, by the guest's CQ number.
    pub cqs: HashMap<u32, nic::Cq>,
    /// QPs, by QP number (the NIC's and the guest's).
    pub qps: HashMap<u32, NicQp>,
    /// AHs, by the guest's handle.
    pub ahs: HashMap<u32, nic::Ah>,
    /// SRQs, by the guest's SRQ number.
    pub srqs: HashMap<u32, NicSrq>,
}

/// Send work requests on the NIC, of all VMs: bounded, so that the NIC's queues never hold
/// more than it needs to stay busy, and who posts next is the scheduler's choice (by weight)
/// rather than the NIC's (which serves its QPs in turn, whatever their VMs' weights).
#[derive(Debug, Default)]
pub struct Room {
    /// Sends posted and not completed.
    pub in_flight: AtomicU32,
    /// The scheduler found no room: the next completion unparks it.
    pub wanted: AtomicBool,
}

impl Room {
    /// Send work requests all VMs together may have on the NIC.
    pub const MAX_SENDS: u32 = 64;

    /// Takes room for one send, or says there is none (and asks to be woken when there is).
    pub fn take(&self) -> bool {
        if self.in_flight.load(Ordering::SeqCst) >= Self::MAX_SENDS {
            self.wanted.store(true, Ordering::SeqCst);
            // A completion between the load and the store did not see `wanted`: look again.
            if self.in_flight.load(Ordering::SeqCst) >= Self::MAX_SENDS {
                return false;
            }
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Gives back `n` sends' room; returns whether the scheduler waits for it.
    pub fn give(&self, n: u32) -> bool {
        if n == 0 {
            return false;
        }
        let _ = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(n))
            });
        self.wanted.swap(false, Ordering::SeqCst)
    }
}

/// One VM on the NIC.
#[derive(Debug)]
pub struct VmNic {
    /// The VM's name, for logs.
    pub name: String,
    /// Where its CQs' events arrive.
    pub channel: nic::CompChannel,
    state: Mutex<NicState>,
}

impl VmNic {
    /// A VM with nothing on the NIC yet.
    pub fn new(name: String, channel: nic::CompChannel) -> Self {
        VmNic {
            name,
            channel,
            state: Mutex::new(NicState::default()),
        }
    }

    /// The VM's NIC objects. Take the VM's own lock first, if at all.
    pub fn state(&self) -> MutexGuard<'_, NicState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
