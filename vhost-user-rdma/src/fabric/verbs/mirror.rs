//! Each VM's objects mirrored on the NIC: a NIC PD per PD, a NIC MR per MR (registered over
//! the guest's own pages, or a window of them), a NIC CQ per CQ, a NIC QP per QP (numbered by
//! the NIC: the guest sees the NIC's QP number, which is what peers put in their packets), a
//! NIC SRQ per SRQ, a NIC AH per AH.
//!
//! The VMs' control paths change these through [`NicHooks`], under the VM's lock, then the
//! lock of the VM's [`super::objects::NicState`]; the scheduler (posting) and the VM's
//! completion thread take the two in the same order, so none waits on another in the
//! opposite order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vrdma_proto::cmd::Status;
use vrdma_proto::mr::Access as GuestAccess;
use vrdma_proto::qp;

use super::nic::{self, Nic};
use super::objects::{NicMr, NicQp, NicSrq, PostedRecv, Room, Track, VmNic, error_chain};
use crate::model::control::in_one_region;
use crate::model::hooks::ObjectHooks;
use crate::model::memory::GuestMem;
use crate::model::objects::{Ah, Cq, Mr, Qp, Srq, VmObjects};

/// How many fresh NIC QPs a create tries for a number the VM's table can take (a NIC
/// numbers QPs across all VMs, and two may share the low bits that name a table slot).
const QPN_TRIES: usize = 8;

/// The NIC and the VMs on it, as the control paths reach them.
#[derive(Debug)]
pub struct NicHooks {
    /// The NIC.
    pub nic: Nic,
    /// Room for sends on the NIC, shared by every VM.
    pub room: Arc<Room>,
    vms: Mutex<HashMap<u64, Arc<VmNic>>>,
}

impl NicHooks {
    /// Hooks for VMs on `nic`.
    pub fn new(nic: Nic) -> Self {
        NicHooks {
            nic,
            room: Arc::new(Room::default()),
            vms: Mutex::new(HashMap::new()),
        }
    }

    /// VM `vm` on the NIC, made on first use: its guest may make objects before the
    /// scheduler has attached it (attaching is a message to the scheduler's thread), and
    /// whoever comes first makes it.
    pub fn vm_or_new(&self, vm: u64) -> Result<Arc<VmNic>, nic::Error> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = vms.get(&vm) {
            return Ok(v.clone());
        }
        let made = Arc::new(VmNic::new(format!("#{vm}"), self.nic.create_channel()?));
        vms.insert(vm, made.clone());
        Ok(made)
    }

    /// Forgets VM `vm`; its NIC objects go with the last reference.
    pub fn remove(&self, vm: u64) -> Option<Arc<VmNic>> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vm)
    }

    /// VM `vm`, for a hook that makes something: made if this is its first object.
    fn vm(&self, vm: u64) -> Result<Arc<VmNic>, Status> {
        self.vm_or_new(vm).map_err(|e| {
            warn!(
                "vm #{vm}: the NIC gave no completion channel: {}",
                error_chain(&e)
            );
            Status::NoResources
        })
    }

    /// VM `vm`, for a hook that destroys something: never made again once removed.
    fn existing(&self, vm: u64) -> Option<Arc<VmNic>> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vm)
            .cloned()
    }

    fn refused(&self, vm: &VmNic, what: &str, e: &nic::Error) -> Status {
        warn!(
            "vm {}: the NIC refused to {what}: {}",
            vm.name,
            error_chain(e)
        );
        match e.errno() {
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Status::InvalidArgument,
            Some(libc::EFAULT) => Status::BadAddress,
            _ => Status::NoResources,
        }
    }
}

/// The NIC's access flags for the guest's.
pub fn nic_access(a: GuestAccess) -> nic::Access {
    nic::Access {
        local_write: a.contains(GuestAccess::LOCAL_WRITE),
        remote_write: a.contains(GuestAccess::REMOTE_WRITE),
        remote_read: a.contains(GuestAccess::REMOTE_READ),
        remote_atomic: a.contains(GuestAccess::REMOTE_ATOMIC),
    }
}

/// The NIC path for a guest's address vector.
pub fn nic_path(ah: &qp::AhAttr) -> nic::Path {
    nic::Path {
        gid: ah.dgid.0,
        lid: ah.dlid.get(),
        hop_limit: ah.hop_limit,
        traffic_class: ah.traffic_class,
        flow_label: ah.flow_label.get(),
        sl: ah.sl,
    }
}

fn nic_state(s: qp::State) -> nic::QpState {
    match s {
        qp::State::Reset => nic::QpState::Reset,
        qp::State::Init => nic::QpState::Init,
        qp::State::Rtr => nic::QpState::Rtr,
        qp::State::Rts => nic::QpState::Rts,
        qp::State::Sqd => nic::QpState::Sqd,
        qp::State::Sqe => nic::QpState::Sqe,
        qp::State::Err => nic::QpState::Err,
    }
}

/// Registers `len` bytes of guest memory at guest-physical `gpa` (in one region) with `pd`,
/// named `iova`.
fn register_guest(
    pd: &nic::Pd,
    mem: &GuestMem,
    gpa: u64,
    len: u64,
    iova: u64,
    access: nic::Access,
) -> Result<Result<NicMr, nic::Error>, Status> {
    if !in_one_region(mem, gpa, len.max(1)) {
        return Err(Status::BadAddress);
    }
    let host = mem
        .get_host_address(GuestAddress(gpa))
        .map_err(|_| Status::BadAddress)?;
    let len = usize::try_from(len).map_err(|_| Status::InvalidArgument)?;
    // SAFETY: the range lies in one region of `mem`, whose mapping the returned NicMr keeps
    // alive (it holds `mem`) for as long as the registration exists.
    let mr = unsafe { pd.register_iova(host, len, iova, access) };
    Ok(mr.map(|mr| NicMr::new(mr, mem)))
}

/// Why an MR's window could not be registered.
enum WindowRefused {
    /// The pages could not be mapped.
    Window(super::window::Error),
    /// The NIC refused the range.
    Nic(nic::Error),
}

/// Registers guest MR `mr`, whose pages are scattered (or span regions), through a window
/// that maps them back to back.
fn register_window(pd: &nic::Pd, mr: &Mr, mem: &GuestMem) -> Result<NicMr, WindowRefused> {
    let window = super::window::Window::map(mr, mem).map_err(WindowRefused::Window)?;
    let len = usize::try_from(mr.length)
        .map_err(|_| WindowRefused::Window(super::window::Error::NotInMemory { gpa: mr.iova }))?;
    // SAFETY: the window maps the MR's pages for as long as the returned NicMr holds it,
    // and the NicMr drops the registration before the window.
    let registered =
        unsafe { pd.register_iova(window.start(mr), len, mr.iova, nic_access(mr.access())) }
            .map_err(WindowRefused::Nic)?;
    Ok(NicMr::in_window(registered, window, mem))
}

impl ObjectHooks for NicHooks {
    fn alloc_pd(&self, vm: u64, pdn: u32) -> Result<(), Status> {
        let v = self.vm(vm)?;
        let pd = self
            .nic
            .alloc_pd()
            .map_err(|e| self.refused(&v, "allocate a PD", &e))?;
        v.state().pds.insert(pdn, pd);
        Ok(())
    }

    fn dealloc_pd(&self, vm: u64, pdn: u32) {
        if let Some(v) = self.existing(vm) {
            v.state().pds.remove(&pdn);
        }
    }

    fn register_mr(
        &self,
        vm: u64,
        lkey: u32,
        mr: &Mr,
        mem: &GuestMem,
    ) -> Result<Option<u32>, Status> {
        let v = self.vm(vm)?;
        let mut st = v.state();
        let pd = st.pds.get(&mr.pdn).ok_or(Status::InvalidHandle)?.clone();
        let first = mr.pages.first().copied().ok_or(Status::InvalidArgument)?;
        let start = first + mr.first_page_offset;
        let registered = if mr.is_contiguous() && in_one_region(mem, start, mr.length.max(1)) {
            // One range of the daemon's own mapping of the region already.
            register_guest(&pd, mem, start, mr.length, mr.iova, nic_access(mr.access()))?
                .map_err(|e| self.refused(&v, "register an MR", &e))?
        } else {
            register_window(&pd, mr, mem).map_err(|e| match e {
                WindowRefused::Window(e) => {
                    warn!(
                        "vm {}: an MR of {} pages cannot be given to the NIC: {}",
                        v.name,
                        mr.pages.len(),
                        error_chain(&e)
                    );
                    Status::BadAddress
                }
                WindowRefused::Nic(e) => self.refused(&v, "register an MR", &e),
            })?
        };
        let rkey = registered.mr.rkey();
        st.mrs.insert(lkey, registered);
        Ok(Some(rkey))
    }

    fn deregister_mr(&self, vm: u64, lkey: u32, _mr: &Mr) {
        if let Some(v) = self.existing(vm) {
            v.state().mrs.remove(&lkey);
        }
    }

    fn create_cq(&self, vm: u64, cqn: u32, cq: &Cq) -> Result<(), Status> {
        let v = self.vm(vm)?;
        let made = self
            .nic
            .create_cq_on(cq.depth, &v.channel, cqn as usize)
            .and_then(|c| c.arm().map(|()| c))
            .map_err(|e| self.refused(&v, "create a CQ", &e))?;
        v.state().cqs.insert(cqn, made);
        Ok(())
    }

    fn destroy_cq(&self, vm: u64, cqn: u32) {
        if let Some(v) = self.existing(vm) {
            v.state().cqs.remove(&cqn);
        }
    }

    fn create_qp(
        &self,
        vm: u64,
        record: &Qp,
        mem: &GuestMem,
        fits: &dyn Fn(u32) -> bool,
    ) -> Result<Option<u32>, Status> {
        let v = self.vm(vm)?;
        let mut st = v.state();
        let srq = match record.has_srq() {
            true => Some(
                st.srqs
                    .get(&record.srqn)
                    .ok_or(Status::InvalidHandle)?
                    .srq
                    .clone(),
            ),
            false => None,
        };
        let pd = st
            .pds
            .get(&record.pdn)
            .ok_or(Status::InvalidHandle)?
            .clone();
        let send_cq = st.cqs.get(&record.send_cqn).ok_or(Status::InvalidHandle)?;
        let recv_cq = st.cqs.get(&record.recv_cqn).ok_or(Status::InvalidHandle)?;
        let kind = match record.qp_type() {
            qp::Type::Ud => nic::QpKind::Ud,
            _ => nic::QpKind::Rc,
        };
        let sq = record.sq_geometry().ok_or(Status::InvalidArgument)?;
        let rq_depth = record.rq_geometry().map_or(1, |g| g.depth());
        let caps = nic::QpCaps {
            send_wr: sq.depth(),
            recv_wr: rq_depth,
            sge: record
                .caps
                .max_send_sge
                .get()
                .max(record.caps.max_recv_sge.get())
                .max(1),
        };
        let ring = register_guest(
            &pd,
            mem,
            record.sq_ring_addr,
            sq.byte_len(),
            record.sq_ring_addr,
            nic::Access::default(),
        )?
        .map_err(|e| self.refused(&v, "register a send ring", &e))?;
        // Refused numbers stay alive until the end, so the NIC cannot hand one back.
        let mut refused = Vec::new();
        for _ in 0..QPN_TRIES {
            let made = nic::Qp::create(&pd, send_cq, recv_cq, srq.as_ref(), kind, caps)
                .map_err(|e| self.refused(&v, "create a QP", &e))?;
            let qpn = made.qpn();
            if fits(qpn) {
                st.qps.insert(
                    qpn,
                    NicQp {
                        qp: made,
                        ring,
                        epoch: 0,
                        send: Track::default(),
                        recv: Track::default(),
                        sends: vec![None; sq.depth() as usize],
                        recvs: vec![PostedRecv::default(); rq_depth as usize],
                        fault: None,
                        stalled: false,
                        stopped: false,
                    },
                );
                return Ok(Some(qpn));
            }
            debug!("vm {}: NIC QP {qpn:#x} does not fit a free slot", v.name);
            refused.push(made);
        }
        Err(Status::NoResources)
    }

    fn modify_qp(
        &self,
        vm: u64,
        qpn: u32,
        before: &Qp,
        mask: qp::AttrMask,
        attr: &qp::Attr,
        next: qp::State,
    ) -> Result<(), Status> {
        use qp::AttrMask as M;
        let v = self.existing(vm).ok_or(Status::InvalidHandle)?;
        let mut guard = v.state();
        let st = &mut *guard;
        let nq = st.qps.get_mut(&qpn).ok_or(Status::InvalidHandle)?;
        let has = |m: M| mask.contains(m);
        let m = nic::Modify {
            state: has(M::STATE).then_some(nic_state(next)),
            access: has(M::ACCESS_FLAGS)
                .then(|| nic_access(GuestAccess::from_bits_truncate(attr.qp_access_flags.get()))),
            qkey: has(M::QKEY).then_some(attr.qkey.get()),
            pkey_index: has(M::PKEY_INDEX).then_some(attr.pkey_index.get()),
            port: has(M::PORT),
            path: has(M::AV).then(|| nic_path(&attr.ah_attr)),
            path_mtu: has(M::PATH_MTU).then_some(u32::from(attr.path_mtu)),
            dest_qpn: has(M::DEST_QPN).then_some(attr.dest_qp_num.get()),
            rq_psn: has(M::RQ_PSN).then_some(attr.rq_psn.get()),
            sq_psn: has(M::SQ_PSN).then_some(attr.sq_psn.get()),
            timeout: has(M::TIMEOUT).then_some(attr.timeout),
            retry_cnt: has(M::RETRY_CNT).then_some(attr.retry_cnt),
            rnr_retry: has(M::RNR_RETRY).then_some(attr.rnr_retry),
            max_rd_atomic: has(M::MAX_QP_RD_ATOMIC).then_some(attr.max_rd_atomic),
            max_dest_rd_atomic: has(M::MAX_DEST_RD_ATOMIC).then_some(attr.max_dest_rd_atomic),
            min_rnr_timer: has(M::MIN_RNR_TIMER).then_some(attr.min_rnr_timer),
        };
        nq.qp
            .modify_with(&self.nic.port(), &m)
            .map_err(|e| self.refused(&v, "modify a QP", &e))?;
        if next == qp::State::Reset && before.state() != qp::State::Reset {
            // The NIC drops what it held without completing it, as the guest's rings do.
            self.room.give(nq.send.in_flight);
            nq.epoch = nq.epoch.wrapping_add(1);
            nq.send = Track::default();
            nq.recv = Track::default();
            nq.fault = None;
            nq.stalled = false;
        }
        if next != qp::State::Err {
            nq.stopped = false;
        }
        Ok(())
    }

    fn sends_in_flight(&self, vm: u64) -> u32 {
        self.existing(vm).map_or(0, |v| {
            v.state().qps.values().map(|nq| nq.send.in_flight).sum()
        })
    }

    fn failed_qp(&self, vm: u64, qpn: u32, _qp: &Qp) -> bool {
        let Some(v) = self.existing(vm) else {
            return false;
        };
        let st = v.state();
        st.qps
            .get(&qpn)
            .is_some_and(|nq| matches!(nq.qp.state(), Ok(nic::QpState::Err) | Err(_)))
    }

    fn post_receives(&self, vm: u64, objects: &mut VmObjects, mem: &GuestMem, qpn: u32) {
        if let Some(v) = self.existing(vm) {
            let mut st = v.state();
            super::post::post_receives(objects, &mut st, mem, qpn);
        }
    }

    fn destroy_qp(&self, vm: u64, qpn: u32, _qp: &Qp) {
        if let Some(v) = self.existing(vm) {
            let mut st = v.state();
            if let Some(nq) = st.qps.remove(&qpn) {
                self.room.give(nq.send.in_flight);
            }
        }
    }

    fn create_srq(&self, vm: u64, srqn: u32, srq: &Srq) -> Result<(), Status> {
        let v = self.vm(vm)?;
        let mut st = v.state();
        let pd = st.pds.get(&srq.pdn).ok_or(Status::InvalidHandle)?;
        let made = pd
            .create_srq(srq.depth, srq.max_sge)
            .map_err(|e| self.refused(&v, "create a shared receive queue", &e))?;
        st.srqs.insert(
            srqn,
            NicSrq {
                srq: made,
                posted: vec![None; srq.depth as usize],
                free: (0..srq.depth).rev().collect(),
            },
        );
        Ok(())
    }

    fn destroy_srq(&self, vm: u64, srqn: u32) {
        if let Some(v) = self.existing(vm) {
            v.state().srqs.remove(&srqn);
        }
    }

    fn post_srq_receives(&self, vm: u64, objects: &mut VmObjects, mem: &GuestMem, srqn: u32) {
        if let Some(v) = self.existing(vm) {
            let mut st = v.state();
            if super::post::post_srq_receives(objects, &mut st, mem, srqn) {
                objects
                    .raised
                    .push((vrdma_proto::event::Kind::SrqErr, srqn));
            }
        }
    }

    fn create_ah(&self, vm: u64, handle: u32, ah: &Ah) -> Result<(), Status> {
        let v = self.vm(vm)?;
        let mut st = v.state();
        let pd = st.pds.get(&ah.pdn).ok_or(Status::InvalidHandle)?;
        let made = pd
            .create_ah_to(&self.nic.port(), &nic_path(&ah.attr))
            .map_err(|e| self.refused(&v, "create an address handle", &e))?;
        st.ahs.insert(handle, made);
        Ok(())
    }

    fn destroy_ah(&self, vm: u64, handle: u32) {
        if let Some(v) = self.existing(vm) {
            v.state().ahs.remove(&handle);
        }
    }
}
