//! The control commands that create, change and destroy a VM's objects.
//!
//! Everything here is control path: it may allocate and it runs under the VM's own lock, never
//! a lock shared between VMs. Every value a guest sends is checked before it is stored, and
//! guest addresses are checked against the VM's memory table but never cached as host
//! pointers: the data path translates them again on every access. A fabric that mirrors
//! objects elsewhere (a NIC) is told through [`ObjectHooks`].

use std::sync::atomic::Ordering;

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vrdma_proto::cmd::{self, Request, Status};
use vrdma_proto::config::{self, Mtu};
use vrdma_proto::{mr, qp, ring};
use zerocopy::IntoBytes;

use super::hooks::ObjectHooks;
use super::memory::{self, GuestMem, WriteKind};
use super::objects::{Ah, Cq, Failure, Mr, Pd, Qp, Srq, VmObjects, port_attr};
use super::qp_state::{QpRuntime, RcTransport};

/// What a command returns: its response body, or why it failed.
pub type Outcome = Result<Vec<u8>, Failure>;

/// What a command runs against besides the VM's objects: its memory, and the fabric's hooks.
#[derive(Debug, Clone, Copy)]
pub struct ControlEnv<'a> {
    /// The VM's guest memory.
    pub mem: &'a GuestMem,
    /// The fabric's view of the VM's objects.
    pub hooks: &'a dyn ObjectHooks,
    /// The VM's id, as the fabric knows it.
    pub vm: u64,
}

impl VmObjects {
    /// Executes one decoded command against this VM's objects and guest memory.
    ///
    /// On failure nothing has changed.
    pub fn execute(&mut self, request: Request<'_>, env: &ControlEnv<'_>) -> Outcome {
        let mem = env.mem;
        match request {
            Request::QueryDevice => Ok(self.caps.as_bytes().to_vec()),
            Request::QueryPort(q) => {
                if q.port_num != 1 {
                    return Err(Status::InvalidArgument.into());
                }
                let mtu = Mtu::from_raw(self.active_mtu).unwrap_or(Mtu::Mtu4096);
                Ok(port_attr(mtu).as_bytes().to_vec())
            }
            Request::QueryGid(q) => {
                if q.port_num != 1 || q.index.get() != 0 {
                    return Err(Status::InvalidArgument.into());
                }
                let resp = cmd::QueryGidResp {
                    gid: self.gid,
                    gid_type: config::GidType::RoceV2.raw(),
                    reserved: [0; 7],
                };
                Ok(resp.as_bytes().to_vec())
            }
            Request::AllocPd => {
                let pdn = self
                    .pds
                    .insert(Pd::default())
                    .map_err(|_| Status::NoResources)?;
                if let Err(status) = env.hooks.alloc_pd(env.vm, pdn) {
                    self.pds.remove(pdn);
                    return Err(status.into());
                }
                Ok(handle_resp(pdn))
            }
            Request::DeallocPd(pdn) => {
                let pd = self.pds.get(pdn).ok_or(Status::InvalidHandle)?;
                if pd.users > 0 {
                    return Err(Status::Busy.into());
                }
                self.pds.remove(pdn);
                env.hooks.dealloc_pd(env.vm, pdn);
                Ok(Vec::new())
            }
            Request::RegMr { cmd, access, pages } => self.reg_mr(&cmd, access, pages, env),
            Request::DeregMr(lkey) => {
                let mr = self.mrs.remove(lkey).ok_or(Status::InvalidHandle)?;
                env.hooks.deregister_mr(env.vm, lkey, &mr);
                self.registered_bytes -= mr.length;
                self.unuse_pd(mr.pdn);
                Ok(Vec::new())
            }
            Request::CreateCq(c) => {
                let depth = c.cqe.get();
                if depth > self.caps.max_cqe.get() {
                    return Err(Status::InvalidArgument.into());
                }
                let geometry =
                    ring::Geometry::new(depth, vrdma_proto::cqe::SIZE).map_err(Status::from)?;
                check_ring(mem, c.ring_addr.get(), geometry.byte_len())?;
                let cqn = self
                    .cqs
                    .insert(Cq {
                        depth,
                        ring_addr: c.ring_addr.get(),
                        users: 0,
                        producer: 0,
                        notify_ack: 0,
                        overflowed: false,
                    })
                    .map_err(|_| Status::NoResources)?;
                let created = self
                    .cqs
                    .get(cqn)
                    .map_or(Ok(()), |cq| env.hooks.create_cq(env.vm, cqn, cq));
                if let Err(status) = created {
                    self.cqs.remove(cqn);
                    return Err(status.into());
                }
                init_ring_words(
                    mem,
                    c.ring_addr.get(),
                    &[
                        (ring::PRODUCER_OFFSET, WriteKind::RingIndex),
                        (ring::NOTIFY_ACK_OFFSET, WriteKind::ControlWord),
                    ],
                );
                Ok(cmd::CreateCqResp {
                    cqn: cqn.into(),
                    cqe: depth.into(),
                }
                .as_bytes()
                .to_vec())
            }
            Request::DestroyCq(cqn) => {
                let cq = self.cqs.get(cqn).ok_or(Status::InvalidHandle)?;
                if cq.users > 0 {
                    return Err(Status::Busy.into());
                }
                self.cqs.remove(cqn);
                env.hooks.destroy_cq(env.vm, cqn);
                Ok(Vec::new())
            }
            Request::ReqNotifyCq { cqn, flags } => self.req_notify_cq(cqn, flags, mem),
            Request::CreateQp { cmd, qp_type } => self.create_qp(&cmd, qp_type, env),
            Request::ModifyQp { cmd, mask } => self.modify_qp(&cmd, mask, env),
            Request::QueryQp(qpn) => {
                let qp = self.qps.get(qpn).ok_or(Status::InvalidHandle)?;
                // A NIC's QP goes to ERR by itself on a responder error, with no completion
                // to tell of it; the guest's QP follows when it looks, as on hardware.
                if qp.state() != qp::State::Err && env.hooks.failed_qp(env.vm, qpn, qp) {
                    if let Some(qp) = self.qps.get_mut(qpn) {
                        qp.attr.qp_state = qp::State::Err.raw();
                    }
                    self.wake.push(qpn);
                }
                let qp = self.qps.get(qpn).ok_or(Status::InvalidHandle)?;
                let mut attr = qp.attr;
                attr.cur_qp_state = attr.qp_state;
                let resp = cmd::QueryQpResp {
                    attr,
                    cap: qp.caps,
                    qp_type: qp.qp_type,
                    sq_sig_all: u8::from(qp.sq_sig_all),
                    reserved: 0.into(),
                    send_cqn: qp.send_cqn.into(),
                    recv_cqn: qp.recv_cqn.into(),
                    pdn: qp.pdn.into(),
                };
                Ok(resp.as_bytes().to_vec())
            }
            Request::DestroyQp(qpn) => {
                let qp = self.qps.remove(qpn).ok_or(Status::InvalidHandle)?;
                env.hooks.destroy_qp(env.vm, qpn, &qp);
                self.unuse_pd(qp.pdn);
                self.unuse_cq(qp.send_cqn);
                self.unuse_cq(qp.recv_cqn);
                if let Some(srq) = self.srqs.get_mut(qp.srqn) {
                    srq.users = srq.users.saturating_sub(1);
                }
                Ok(Vec::new())
            }
            Request::PostRecv(qpn) => {
                self.qps.get(qpn).ok_or(Status::InvalidHandle)?;
                env.hooks.post_receives(env.vm, self, env.mem, qpn);
                // Receives posted to a QP in ERR complete flushed, which is the scheduler's
                // work: it looks at the QPs in `wake`. The hook queues a QP it failed itself.
                let failed = self
                    .qps
                    .get(qpn)
                    .is_some_and(|qp| qp.state() == qp::State::Err);
                if failed && !self.wake.contains(&qpn) {
                    self.wake.push(qpn);
                }
                Ok(Vec::new())
            }
            Request::CreateAh(c) => {
                let pdn = c.pdn.get();
                self.pds.get(pdn).ok_or(Status::InvalidHandle)?;
                if c.attr.sgid_index != 0 {
                    return Err(Status::InvalidArgument.into());
                }
                let ah = self
                    .ahs
                    .insert(Ah { pdn, attr: c.attr })
                    .map_err(|_| Status::NoResources)?;
                let created = self
                    .ahs
                    .get(ah)
                    .map_or(Ok(()), |a| env.hooks.create_ah(env.vm, ah, a));
                if let Err(status) = created {
                    self.ahs.remove(ah);
                    return Err(status.into());
                }
                self.use_pd(pdn);
                Ok(handle_resp(ah))
            }
            Request::DestroyAh(handle) => {
                let ah = self.ahs.remove(handle).ok_or(Status::InvalidHandle)?;
                env.hooks.destroy_ah(env.vm, handle);
                self.unuse_pd(ah.pdn);
                Ok(Vec::new())
            }
            Request::CreateSrq(c) => self.create_srq(&c, env),
            Request::ModifySrq { cmd, mask } => self.modify_srq(&cmd, mask),
            Request::QuerySrq(srqn) => {
                let srq = self.srqs.get(srqn).ok_or(Status::InvalidHandle)?;
                Ok(cmd::QuerySrqResp {
                    max_wr: srq.depth.into(),
                    max_sge: srq.max_sge.into(),
                    srq_limit: srq.limit.into(),
                    reserved: 0.into(),
                }
                .as_bytes()
                .to_vec())
            }
            Request::PostSrqRecv(srqn) => {
                // A fabric that posts receives ahead of arrival (the NIC's) takes them now; an
                // SRQ's receives are never flushed, so there is nothing else to do.
                self.srqs.get(srqn).ok_or(Status::InvalidHandle)?;
                env.hooks.post_srq_receives(env.vm, self, mem, srqn);
                Ok(Vec::new())
            }
            Request::DestroySrq(srqn) => {
                let srq = self.srqs.get(srqn).ok_or(Status::InvalidHandle)?;
                // As ibv_destroy_srq's EBUSY: a QP still takes its receives from it.
                if srq.users > 0 {
                    return Err(Status::Busy.into());
                }
                let srq = self.srqs.remove(srqn).ok_or(Status::InvalidHandle)?;
                env.hooks.destroy_srq(env.vm, srqn);
                self.unuse_pd(srq.pdn);
                Ok(Vec::new())
            }
        }
    }

    fn create_srq(&mut self, c: &cmd::CreateSrq, env: &ControlEnv<'_>) -> Outcome {
        let mem = env.mem;
        let pdn = c.pdn.get();
        self.pds.get(pdn).ok_or(Status::InvalidHandle)?;
        let (depth, max_sge) = (c.max_wr.get(), c.max_sge.get());
        if depth > self.srq_caps.max_srq_wr.get() || max_sge > self.srq_caps.max_srq_sge.get() {
            return Err(Status::InvalidArgument.into());
        }
        let record = Srq {
            pdn,
            depth,
            max_sge,
            ring_addr: c.ring_addr.get(),
            limit: c.srq_limit.get(),
            consumer: 0,
            users: 0,
            fault: None,
        };
        let geometry = record.geometry().ok_or(Status::InvalidArgument)?;
        check_ring(mem, record.ring_addr, geometry.byte_len())?;
        let ring_addr = record.ring_addr;
        let srqn = self.srqs.insert(record).map_err(|_| Status::NoResources)?;
        let created = self
            .srqs
            .get(srqn)
            .map_or(Ok(()), |s| env.hooks.create_srq(env.vm, srqn, s));
        if let Err(status) = created {
            self.srqs.remove(srqn);
            return Err(status.into());
        }
        init_ring_words(
            mem,
            ring_addr,
            &[(ring::CONSUMER_OFFSET, WriteKind::RingIndex)],
        );
        self.use_pd(pdn);
        Ok(cmd::CreateSrqResp {
            srqn: srqn.into(),
            max_wr: depth.into(),
            max_sge: max_sge.into(),
            reserved: 0.into(),
        }
        .as_bytes()
        .to_vec())
    }

    fn modify_srq(&mut self, c: &cmd::ModifySrq, mask: cmd::SrqAttrMask) -> Outcome {
        use cmd::SrqAttrMask as M;
        let srq = self
            .srqs
            .get_mut(c.srqn.get())
            .ok_or(Status::InvalidHandle)?;
        // The ring is the driver's memory, sized when it was created: resizing a live ring
        // would mean moving entries the driver may be writing. Refused, as by most RNICs.
        if mask.contains(M::MAX_WR) {
            return Err(Failure {
                status: Status::NotSupported,
                detail: M::MAX_WR.bits(),
            });
        }
        if mask.contains(M::LIMIT) {
            let limit = c.srq_limit.get();
            if limit > srq.depth {
                return Err(Failure {
                    status: Status::InvalidArgument,
                    detail: M::LIMIT.bits(),
                });
            }
            // 0 disarms; any other value arms until the next time a receive taken leaves
            // fewer than it in the ring.
            srq.limit = limit;
        }
        Ok(Vec::new())
    }

    fn use_pd(&mut self, pdn: u32) {
        if let Some(pd) = self.pds.get_mut(pdn) {
            pd.users += 1;
        }
    }

    fn unuse_pd(&mut self, pdn: u32) {
        if let Some(pd) = self.pds.get_mut(pdn) {
            pd.users = pd.users.saturating_sub(1);
        }
    }

    fn unuse_cq(&mut self, cqn: u32) {
        if let Some(cq) = self.cqs.get_mut(cqn) {
            cq.users = cq.users.saturating_sub(1);
        }
    }

    fn reg_mr(
        &mut self,
        c: &cmd::RegMr,
        access: mr::Access,
        pages: cmd::PageList<'_>,
        env: &ControlEnv<'_>,
    ) -> Outcome {
        let mem = env.mem;
        let pdn = c.pdn.get();
        self.pds.get(pdn).ok_or(Status::InvalidHandle)?;
        let length = c.length.get();
        if length > self.caps.max_mr_size.get()
            || pages.len() as u64 > u64::from(self.caps.max_mr_pages.get())
        {
            return Err(Status::InvalidArgument.into());
        }
        if self.registered_bytes.saturating_add(length) > self.max_registered_bytes {
            return Err(Status::NoResources.into());
        }
        let page_size = 1u64 << pages.page_shift();
        for page in pages.iter() {
            if !in_one_region(env.mem, page, page_size) {
                return Err(Status::BadAddress.into());
            }
        }
        let record = Mr::new(
            pdn,
            access.bits(),
            c.iova.get(),
            length,
            c.first_page_offset.get().into(),
            pages.page_shift(),
            pages.iter().collect(),
        );
        let lkey = self.mrs.insert(record).map_err(|_| Status::NoResources)?;
        let registered = self
            .mrs
            .get(lkey)
            .map_or(Ok(None), |mr| env.hooks.register_mr(env.vm, lkey, mr, mem));
        let fabric_rkey = match registered {
            Ok(key) => key,
            Err(status) => {
                self.mrs.remove(lkey);
                return Err(status.into());
            }
        };
        self.registered_bytes += length;
        self.use_pd(pdn);
        let remote = access.intersects(
            mr::Access::REMOTE_READ | mr::Access::REMOTE_WRITE | mr::Access::REMOTE_ATOMIC,
        );
        let rkey = match (remote, fabric_rkey) {
            (false, _) => 0,
            (true, Some(key)) => key,
            (true, None) => lkey,
        };
        Ok(cmd::RegMrResp {
            lkey: lkey.into(),
            rkey: rkey.into(),
        }
        .as_bytes()
        .to_vec())
    }

    fn req_notify_cq(&mut self, cqn: u32, flags: cmd::NotifyFlags, mem: &GuestMem) -> Outcome {
        let cq = self.cqs.get(cqn).ok_or(Status::InvalidHandle)?;
        // A CQ that overflowed stays in error until destroyed (docs/protocol.md §18.5).
        if cq.overflowed {
            return Err(Status::InvalidArgument.into());
        }
        // The producer index is the device's own (the ring's copy is only ever written from
        // it, and the driver may scribble over that copy). The consumer index is the driver's:
        // more than `depth` entries behind the producer, or ahead of it, it is corrupt, and
        // then nothing is written.
        let consumer_addr = memory::ring_word(cq.ring_addr, ring::CONSUMER_OFFSET);
        let consumer =
            memory::load_u32(mem, consumer_addr, Ordering::Acquire).ok_or(Status::BadAddress)?;
        let pending = cq.producer.wrapping_sub(consumer);
        if pending > cq.depth {
            return Err(Status::InvalidArgument.into());
        }
        let arm_addr = memory::ring_word(cq.ring_addr, ring::ARM_OFFSET);
        let current =
            memory::load_u32(mem, arm_addr, Ordering::Acquire).ok_or(Status::BadAddress)?;
        let (sequence, _) = ring::split_arm_word(current);
        let word = ring::arm_word(
            sequence.wrapping_add(1),
            flags.contains(cmd::NotifyFlags::SOLICITED_ONLY),
        );
        memory::store_u32(
            mem,
            arm_addr,
            word,
            Ordering::SeqCst,
            WriteKind::ControlWord,
        )
        .map_err(|_| Status::BadAddress)?;
        Ok(cmd::ReqNotifyCqResp {
            pending: pending.into(),
            reserved: 0.into(),
        }
        .as_bytes()
        .to_vec())
    }

    fn create_qp(&mut self, c: &cmd::CreateQp, qp_type: qp::Type, env: &ControlEnv<'_>) -> Outcome {
        let mem = env.mem;
        let pdn = c.pdn.get();
        self.pds.get(pdn).ok_or(Status::InvalidHandle)?;
        let (send_cqn, recv_cqn) = (c.send_cqn.get(), c.recv_cqn.get());
        let send_cq = self.cqs.get(send_cqn).ok_or(Status::InvalidHandle)?;
        let recv_cq = self.cqs.get(recv_cqn).ok_or(Status::InvalidHandle)?;
        // A CQ in error (it overflowed) takes no new QPs (docs/protocol.md §18.5).
        if send_cq.overflowed || recv_cq.overflowed {
            return Err(Status::InvalidArgument.into());
        }
        let srqn = c.srqn.get();
        if srqn != 0 {
            let srq = self.srqs.get(srqn).ok_or(Status::InvalidHandle)?;
            // An SRQ in error gives no receives (docs/protocol.md §16.8).
            if srq.fault.is_some() {
                return Err(Status::InvalidArgument.into());
            }
        }
        let cap = &c.cap;
        let within = [
            (cap.max_send_wr.get(), self.caps.max_qp_wr.get()),
            (cap.max_recv_wr.get(), self.caps.max_qp_wr.get()),
            (cap.max_send_sge.get(), self.caps.max_sge.get()),
            (cap.max_recv_sge.get(), self.caps.max_sge.get()),
            (cap.max_inline_data.get(), self.caps.max_inline_data.get()),
        ];
        if within.iter().any(|&(v, max)| v > max) {
            return Err(Status::InvalidArgument.into());
        }
        let mut record = Qp {
            qp_type: qp_type.raw(),
            pdn,
            send_cqn,
            recv_cqn,
            sq_sig_all: c.sq_sig_all == 1,
            caps: c.cap,
            sq_ring_addr: c.sq_ring_addr.get(),
            rq_ring_addr: c.rq_ring_addr.get(),
            srqn,
            attr: qp::Attr::default(),
            rt: QpRuntime::default(),
        };
        // A QP's peer may be on another host only with the inter-host fabric.
        if self.roce && qp_type == qp::Type::Rc {
            record.rt.rc = RcTransport::with_records();
        }
        record.attr.qp_state = qp::State::Reset.raw();
        let sq = record.sq_geometry().ok_or(Status::InvalidArgument)?;
        check_ring(mem, record.sq_ring_addr, sq.byte_len())?;
        // A QP with an SRQ has no receive ring (decoding made sure it names none).
        if srqn == 0 {
            let rq = record.rq_geometry().ok_or(Status::InvalidArgument)?;
            check_ring(mem, record.rq_ring_addr, rq.byte_len())?;
        }
        let caps = record.caps;
        let (sq_addr, rq_addr) = (record.sq_ring_addr, record.rq_ring_addr);
        let qps = &self.qps;
        let chosen = env
            .hooks
            .create_qp(env.vm, &record, mem, &|qpn| qps.can_place(qpn))?;
        let placed = match chosen {
            Some(qpn) => self.qps.place(qpn, record).map_err(|r| (Some(qpn), r)),
            None => self.qps.insert(record).map_err(|r| (None, r)),
        };
        let qpn = match placed {
            Ok(qpn) => qpn,
            Err((made, record)) => {
                // The table is full, or refused the number the fabric chose (which it checked
                // with `fits`): the fabric's QP goes again.
                if let Some(qpn) = made {
                    env.hooks.destroy_qp(env.vm, qpn, &record);
                }
                return Err(Status::NoResources.into());
            }
        };
        init_ring_words(
            mem,
            sq_addr,
            &[
                (ring::CONSUMER_OFFSET, WriteKind::RingIndex),
                (ring::SEND_POLLING_OFFSET, WriteKind::ControlWord),
            ],
        );
        if srqn == 0 {
            init_ring_words(
                mem,
                rq_addr,
                &[(ring::CONSUMER_OFFSET, WriteKind::RingIndex)],
            );
        }
        self.use_pd(pdn);
        for cqn in [send_cqn, recv_cqn] {
            if let Some(cq) = self.cqs.get_mut(cqn) {
                cq.users += 1;
            }
        }
        if let Some(srq) = self.srqs.get_mut(srqn) {
            srq.users += 1;
        }
        Ok(cmd::CreateQpResp {
            qpn: qpn.into(),
            reserved: 0.into(),
            cap: caps,
        }
        .as_bytes()
        .to_vec())
    }

    fn modify_qp(
        &mut self,
        c: &cmd::ModifyQp,
        mask: qp::AttrMask,
        env: &ControlEnv<'_>,
    ) -> Outcome {
        use qp::AttrMask as M;
        let mem = env.mem;
        let caps = self.caps;
        let qpn = c.qpn.get();
        let record = self.qps.get(qpn).ok_or(Status::InvalidHandle)?;
        let a = &c.attr;
        let fail = |bits: M, status| Failure {
            status,
            detail: bits.bits(),
        };
        // Resizing is refused before the state machine is consulted (CAP is optional nowhere,
        // so the state machine would otherwise report it as InvalidState).
        if mask.contains(M::CAP) {
            return Err(fail(M::CAP, Status::NotSupported));
        }
        let next =
            qp::check_transition(record.qp_type(), record.state(), mask, &c.attr).map_err(|e| {
                Failure {
                    status: Status::InvalidState,
                    detail: e.offending_bits().bits(),
                }
            })?;
        if mask.contains(M::MAX_QP_RD_ATOMIC)
            && u32::from(a.max_rd_atomic) > caps.max_qp_init_rd_atom.get()
        {
            return Err(fail(M::MAX_QP_RD_ATOMIC, Status::InvalidArgument));
        }
        if mask.contains(M::MAX_DEST_RD_ATOMIC)
            && u32::from(a.max_dest_rd_atomic) > caps.max_qp_rd_atom.get()
        {
            return Err(fail(M::MAX_DEST_RD_ATOMIC, Status::InvalidArgument));
        }
        if mask.contains(M::PATH_MTU) && a.path_mtu > Mtu::Mtu4096.raw() {
            return Err(fail(M::PATH_MTU, Status::InvalidArgument));
        }
        if mask.contains(M::AV) && a.ah_attr.sgid_index != 0 {
            return Err(fail(M::AV, Status::InvalidArgument));
        }
        // There is no alternate path, so the only migration state is MIGRATED.
        if mask.contains(M::PATH_MIG_STATE) && a.path_mig_state != qp::MigState::Migrated.raw() {
            return Err(fail(M::PATH_MIG_STATE, Status::InvalidArgument));
        }
        if mask.contains(M::DEST_QPN) && a.dest_qp_num.get() > qp::MAX_QPN {
            return Err(fail(M::DEST_QPN, Status::InvalidArgument));
        }
        env.hooks
            .modify_qp(env.vm, qpn, record, mask, a, next)
            .map_err(Failure::from)?;
        let record = self.qps.get_mut(qpn).ok_or(Status::InvalidHandle)?;
        let t = &mut record.attr;
        if mask.contains(M::ACCESS_FLAGS) {
            t.qp_access_flags = a.qp_access_flags;
        }
        if mask.contains(M::PKEY_INDEX) {
            t.pkey_index = a.pkey_index;
        }
        if mask.contains(M::PORT) {
            t.port_num = a.port_num;
        }
        if mask.contains(M::QKEY) {
            t.qkey = a.qkey;
        }
        if mask.contains(M::AV) {
            t.ah_attr = a.ah_attr;
        }
        if mask.contains(M::PATH_MTU) {
            t.path_mtu = a.path_mtu;
        }
        if mask.contains(M::TIMEOUT) {
            t.timeout = a.timeout;
        }
        if mask.contains(M::RETRY_CNT) {
            t.retry_cnt = a.retry_cnt;
        }
        if mask.contains(M::RNR_RETRY) {
            t.rnr_retry = a.rnr_retry;
        }
        if mask.contains(M::RQ_PSN) {
            t.rq_psn = a.rq_psn;
        }
        if mask.contains(M::SQ_PSN) {
            t.sq_psn = a.sq_psn;
        }
        if mask.contains(M::MAX_QP_RD_ATOMIC) {
            t.max_rd_atomic = a.max_rd_atomic;
        }
        if mask.contains(M::MAX_DEST_RD_ATOMIC) {
            t.max_dest_rd_atomic = a.max_dest_rd_atomic;
        }
        if mask.contains(M::MIN_RNR_TIMER) {
            t.min_rnr_timer = a.min_rnr_timer;
        }
        if mask.contains(M::PATH_MIG_STATE) {
            t.path_mig_state = a.path_mig_state;
        }
        if mask.contains(M::DEST_QPN) {
            t.dest_qp_num = a.dest_qp_num;
        }
        if mask.contains(M::EN_SQD_ASYNC_NOTIFY) {
            t.en_sqd_async_notify = a.en_sqd_async_notify;
        }
        let from = qp::State::from_raw(t.qp_state).unwrap_or(qp::State::Err);
        t.qp_state = next.raw();
        if next == qp::State::Reset {
            // Hardware drops queued work without completions on reset; do the same by
            // catching each ring's consumer up with its producer.
            let sq = drain_ring(mem, record.sq_ring_addr);
            // A QP with an SRQ has no receive ring to drain; the receive it held, if any, is
            // dropped with the rest of its runtime (as rxe drops its SRQ WQE on reset).
            let rq = if record.has_srq() {
                0
            } else {
                drain_ring(mem, record.rq_ring_addr)
            };
            init_ring_words(
                mem,
                record.sq_ring_addr,
                &[(ring::SEND_POLLING_OFFSET, WriteKind::ControlWord)],
            );
            let rc = std::mem::take(&mut record.rt.rc).reset();
            record.rt = QpRuntime::at(sq, rq);
            record.rt.rc = rc;
        }
        // Every modify into SQD is an entry, SQD -> SQD included (docs/protocol.md §16.1): each
        // raises its own SqDrained.
        if next == qp::State::Sqd {
            record.rt.sqd_notified = false;
        }
        // The inter-host fabric numbers packets from here (RTR and RTS set them).
        if mask.contains(M::RQ_PSN) {
            record.rt.psns.expected = a.rq_psn.get() & qp::MAX_PSN;
        }
        if mask.contains(M::SQ_PSN) {
            record.rt.psns.next = a.sq_psn.get() & qp::MAX_PSN;
            record.rt.psns.una = record.rt.psns.next;
        }
        // ERR needs its flush, RTS may release queued sends, and SQD its drained event (once
        // per entry, so SQD -> SQD too): let the scheduler look.
        let wake = next == qp::State::Sqd
            || (next != from && matches!(next, qp::State::Err | qp::State::Rts | qp::State::Sqe));
        if wake {
            self.wake.push(qpn);
        }
        // Receives the driver posted while the QP was in RESET wait in its ring: a fabric that
        // posts receives ahead of arrival takes them now that the QP can hold them.
        if from == qp::State::Reset && next == qp::State::Init {
            env.hooks.post_receives(env.vm, self, mem, qpn);
        }
        Ok(Vec::new())
    }

    /// Destroys every object (the guest reset the device or disconnected), telling the fabric
    /// of the QPs and MRs that go.
    pub fn release_all(&mut self, hooks: &dyn ObjectHooks, vm: u64) {
        self.wake.clear();
        for (qpn, qp) in self.qps.drain() {
            hooks.destroy_qp(vm, qpn, &qp);
        }
        for (handle, _) in self.ahs.drain() {
            hooks.destroy_ah(vm, handle);
        }
        for (lkey, mr) in self.mrs.drain() {
            hooks.deregister_mr(vm, lkey, &mr);
        }
        for (srqn, _) in self.srqs.drain() {
            hooks.destroy_srq(vm, srqn);
        }
        for (cqn, _) in self.cqs.drain() {
            hooks.destroy_cq(vm, cqn);
        }
        for (pdn, _) in self.pds.drain() {
            hooks.dealloc_pd(vm, pdn);
        }
        self.registered_bytes = 0;
    }
}

fn handle_resp(handle: u32) -> Vec<u8> {
    cmd::Handle {
        handle: handle.into(),
        reserved: 0.into(),
    }
    .as_bytes()
    .to_vec()
}

/// Whether `[addr, addr + len)` lies inside one memory slot of the VM.
pub fn in_one_region(mem: &GuestMem, addr: u64, len: u64) -> bool {
    let Some(region) = mem.find_region(GuestAddress(addr)) else {
        return false;
    };
    let start = region.start_addr().raw_value();
    let end = start.saturating_add(region.len());
    addr.checked_add(len).is_some_and(|e| e <= end)
}

fn check_ring(mem: &GuestMem, addr: u64, len: u64) -> Result<(), Failure> {
    if in_one_region(mem, addr, len) {
        Ok(())
    } else {
        Err(Status::BadAddress.into())
    }
}

/// Zeroes the words of a new ring that the device owns, so they start from the device's
/// state rather than whatever the driver left there. The ring was checked to lie in guest
/// memory just before, under the same lock, so the stores cannot fail.
fn init_ring_words(mem: &GuestMem, base: u64, words: &[(u64, WriteKind)]) {
    for &(offset, kind) in words {
        let at = memory::ring_word(base, offset);
        let _ = memory::store_u32(mem, at, 0, Ordering::Release, kind);
    }
}

/// Sets a ring's consumer index to its producer index and returns it.
fn drain_ring(mem: &GuestMem, base: u64) -> u32 {
    // The ring was checked at creation; if its memory has since gone there is nothing to drain.
    let producer = memory::load_producer(mem, base).unwrap_or(0);
    memory::publish_consumer(mem, base, producer);
    producer
}
