//! What the unit tests build VMs from: a VM in memory with the guest's side done by hand
//! (rings written as a driver writes them), so the layers above the model can be tested in
//! process, without sockets or virtqueues.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vrdma_proto::cmd::{self, Opcode};
use vrdma_proto::cqe::{self, Cqe};
use vrdma_proto::mr::Access;
use vrdma_proto::qp::{self, AttrMask};
use vrdma_proto::wqe::{self, Data, SendHeader, Sge};
use vrdma_proto::{Gid, event, ring};
use zerocopy::{FromBytes, IntoBytes};

use crate::config::{Quotas, VmConfig};
use crate::model::control::ControlEnv;
use crate::model::hooks::{NoHooks, ObjectHooks};
use crate::model::memory::GuestMem;
use crate::model::objects::{Failure, VmObjects};
use crate::model::vm::{EventSink, Vm};

/// How much memory a test VM has. VM `id`'s starts at `id` × 256 MiB, so no two test VMs
/// share a guest-physical address and a write can only be one VM's.
pub const MEM_SIZE: usize = 8 << 20;

/// Events a VM raised, kept for the test to look at.
#[derive(Debug, Default)]
pub struct RecordedEvents(std::sync::Mutex<Vec<event::Event>>);

impl EventSink for RecordedEvents {
    fn deliver(&self, _vm: &Vm, backlog: &mut std::collections::VecDeque<event::Event>) {
        self.0.lock().unwrap().extend(backlog.drain(..));
    }
}

impl RecordedEvents {
    /// The kinds and handles of the events so far.
    pub fn kinds(&self) -> Vec<(u16, u32)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|e| (e.kind.get(), e.handle.get()))
            .collect()
    }
}

/// A test VM: its shared state, the events it raised, and a bump allocator over its memory.
#[derive(Debug)]
pub struct TestVm {
    /// The VM.
    pub vm: Arc<Vm>,
    /// Its events (none if they go elsewhere, see [`TestVm::with_events`]).
    pub events: Arc<RecordedEvents>,
    next_free: u64,
    end: u64,
}

/// A QP a test made, with where its rings are.
#[derive(Debug, Clone, Copy)]
pub struct TestQp {
    /// Its number.
    pub qpn: u32,
    /// Its send ring.
    pub sq: u64,
    /// Its receive ring.
    pub rq: u64,
    /// Its CQ's ring (one CQ for both queues).
    pub cq_ring: u64,
    /// Its CQ.
    pub cqn: u32,
    /// Its capacities.
    pub caps: qp::Caps,
}

/// An SRQ a test made, with where its ring is.
#[derive(Debug, Clone, Copy)]
pub struct TestSrq {
    /// Its number.
    pub srqn: u32,
    /// Its ring.
    pub ring: u64,
    /// Its depth.
    pub depth: u32,
    /// SGEs per work request.
    pub max_sge: u32,
}

/// An MR a test registered, covering guest memory one to one (iova = guest-physical address).
#[derive(Debug, Clone, Copy)]
pub struct TestMr {
    /// First byte.
    pub addr: u64,
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
}

fn command(op: Opcode, body: &[u8]) -> Vec<u8> {
    let mut out = cmd::header(op).as_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

impl TestVm {
    /// A VM numbered `id`, whose GID is 10.0.0.`id`, with `weight`.
    pub fn new(id: u8, weight: u32) -> Self {
        Self::limited(id, weight, None, None)
    }

    /// As [`TestVm::new`], limited to `max_bw` payload bytes and `max_msg_rate` work requests
    /// per second.
    pub fn limited(id: u8, weight: u32, max_bw: Option<u64>, max_msg_rate: Option<u64>) -> Self {
        let events = Arc::new(RecordedEvents::default());
        Self::build(id, weight, (max_bw, max_msg_rate), events.clone(), events)
    }

    /// As [`TestVm::new`], its events going to `sink`.
    pub fn with_events(id: u8, sink: Arc<dyn EventSink>) -> Self {
        Self::build(id, 1, (None, None), sink, Arc::default())
    }

    /// As [`TestVm::new`], with `quotas` instead of the defaults.
    pub fn with_quotas(id: u8, quotas: Quotas) -> Self {
        let events = Arc::new(RecordedEvents::default());
        Self::build_with(id, 1, (None, None), (events.clone(), events), quotas)
    }

    fn build(
        id: u8,
        weight: u32,
        limits: (Option<u64>, Option<u64>),
        sink: Arc<dyn EventSink>,
        events: Arc<RecordedEvents>,
    ) -> Self {
        Self::build_with(id, weight, limits, (sink, events), Quotas::default())
    }

    fn build_with(
        id: u8,
        weight: u32,
        (max_bw, max_msg_rate): (Option<u64>, Option<u64>),
        (sink, events): (Arc<dyn EventSink>, Arc<RecordedEvents>),
        quotas: Quotas,
    ) -> Self {
        let cfg = VmConfig {
            name: format!("vm{id}"),
            socket: "/nonexistent".into(),
            gid: Gid::from_ipv4([10, 0, 0, id]),
            weight,
            class: crate::config::PriorityClass::Normal,
            sl_classes: crate::config::SlClasses::default(),
            quotas,
            doorbell_queues: 1,
            active_mtu: vrdma_proto::config::Mtu::Mtu4096,
            roce: false,
            incoming: false,
            nic_qpns: false,
            socket_access: Default::default(),
        };
        let base = u64::from(id) << 28;
        let mem = GuestMem::from_ranges(&[(GuestAddress(base), MEM_SIZE)]).unwrap();
        let vm = Vm::new(
            u64::from(id),
            VmObjects::new(&cfg, 0x100 + u64::from(id)),
            weight,
            GuestMemoryAtomic::new(mem),
            sink,
        )
        .with_limits(max_bw, max_msg_rate);
        TestVm {
            vm: Arc::new(vm),
            events,
            next_free: base,
            end: base + MEM_SIZE as u64,
        }
    }

    /// The VM's GID.
    pub fn gid(&self) -> Gid {
        self.vm.gid
    }

    /// The VM's memory now.
    pub fn mem(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMem> {
        vm_memory::GuestAddressSpace::memory(&self.vm.mem)
    }

    /// `len` bytes of guest memory nobody uses yet, 4 KiB aligned.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next_free;
        self.next_free += len.div_ceil(4096).max(1) * 4096;
        assert!(self.next_free <= self.end, "test VM full");
        at
    }

    /// Runs a control command with `hooks`.
    pub fn exec_with(
        &self,
        op: Opcode,
        body: &[u8],
        hooks: &dyn ObjectHooks,
    ) -> Result<Vec<u8>, Failure> {
        let bytes = command(op, body);
        let request = cmd::decode(&bytes).expect("a well-formed command");
        let mem = self.mem();
        let env = ControlEnv {
            mem: &mem,
            hooks,
            vm: self.vm.id,
        };
        self.vm.execute(request, &env)
    }

    /// Runs a control command that must succeed.
    pub fn exec(&self, op: Opcode, body: &[u8]) -> Vec<u8> {
        self.exec_with(op, body, &NoHooks)
            .unwrap_or_else(|f| panic!("{op:?} failed: {f:?}"))
    }

    /// A new PD.
    pub fn pd(&self) -> u32 {
        cmd::Handle::read_from_bytes(&self.exec(Opcode::AllocPd, &[]))
            .unwrap()
            .handle
            .get()
    }

    /// The body of a REG_MR of `[addr, addr + len)` with `access`, page by page.
    pub fn reg_mr_body(pd: u32, addr: u64, len: u64, access: Access) -> Vec<u8> {
        let first = addr & !4095;
        let npages = (addr + len).div_ceil(4096) - first / 4096;
        let reg = cmd::RegMr {
            pdn: pd.into(),
            access: access.bits().into(),
            iova: addr.into(),
            length: len.into(),
            first_page_offset: ((addr - first) as u32).into(),
            npages: (npages as u32).into(),
            page_shift: 12,
            reserved: [0; 7],
        };
        let mut body = reg.as_bytes().to_vec();
        for p in 0..npages {
            body.extend_from_slice(&(first + p * 4096).to_le_bytes());
        }
        body
    }

    /// A new buffer of `len` bytes registered in `pd` with `access`.
    pub fn mr(&mut self, pd: u32, len: u64, access: Access) -> TestMr {
        let addr = self.alloc(len);
        let resp = self.exec(Opcode::RegMr, &Self::reg_mr_body(pd, addr, len, access));
        let keys = cmd::RegMrResp::read_from_bytes(&resp).unwrap();
        TestMr {
            addr,
            lkey: keys.lkey.get(),
            rkey: keys.rkey.get(),
        }
    }

    /// A new CQ of `depth` entries: its number and ring.
    pub fn cq(&mut self, depth: u32) -> (u32, u64) {
        let ring_addr = self.alloc(ring::HEADER_SIZE + u64::from(depth) * u64::from(cqe::SIZE));
        let create = cmd::CreateCq {
            cqe: depth.into(),
            reserved: 0.into(),
            ring_addr: ring_addr.into(),
        };
        let resp = self.exec(Opcode::CreateCq, create.as_bytes());
        let cqn = cmd::CreateCqResp::read_from_bytes(&resp).unwrap().cqn.get();
        (cqn, ring_addr)
    }

    /// A new QP of `qp_type` in `pd` whose queues complete into a new CQ of `cq_depth`.
    pub fn qp(&mut self, pd: u32, qp_type: qp::Type, depth: u32, cq_depth: u32) -> TestQp {
        self.make_qp(pd, qp_type, depth, cq_depth, 0)
    }

    /// As [`TestVm::qp`], the QP taking its receives from SRQ `srqn` (it has no receive ring).
    pub fn qp_on_srq(
        &mut self,
        pd: u32,
        qp_type: qp::Type,
        depth: u32,
        cq_depth: u32,
        srqn: u32,
    ) -> TestQp {
        self.make_qp(pd, qp_type, depth, cq_depth, srqn)
    }

    fn make_qp(
        &mut self,
        pd: u32,
        qp_type: qp::Type,
        depth: u32,
        cq_depth: u32,
        srqn: u32,
    ) -> TestQp {
        let (cqn, cq_ring) = self.cq(cq_depth);
        let (recv_wr, recv_sge) = if srqn == 0 { (depth, 2) } else { (0, 0) };
        let caps = qp::Caps {
            max_send_wr: depth.into(),
            max_recv_wr: recv_wr.into(),
            max_send_sge: 2.into(),
            max_recv_sge: recv_sge.into(),
            max_inline_data: 64.into(),
            reserved: 0.into(),
        };
        let sq_len = ring::Geometry::new(depth, wqe::send_stride(2, 64))
            .unwrap()
            .byte_len();
        let sq = self.alloc(sq_len);
        let rq = if srqn == 0 {
            let rq_len = ring::Geometry::new(depth, wqe::recv_stride(2))
                .unwrap()
                .byte_len();
            self.alloc(rq_len)
        } else {
            0
        };
        let create = cmd::CreateQp {
            pdn: pd.into(),
            qp_type: qp_type.raw(),
            sq_sig_all: 0,
            reserved: 0.into(),
            send_cqn: cqn.into(),
            recv_cqn: cqn.into(),
            cap: caps,
            sq_ring_addr: sq.into(),
            rq_ring_addr: rq.into(),
            srqn: srqn.into(),
            reserved1: 0.into(),
        };
        let resp = self.exec(Opcode::CreateQp, create.as_bytes());
        let qpn = cmd::CreateQpResp::read_from_bytes(&resp).unwrap().qpn.get();
        TestQp {
            qpn,
            sq,
            rq,
            cq_ring,
            cqn,
            caps,
        }
    }

    /// The body of a CREATE_SRQ in `pd` of `depth` entries of `max_sge` SGEs, armed with
    /// `limit`, its ring at `ring`.
    pub fn srq_body(pd: u32, depth: u32, max_sge: u32, limit: u32, ring: u64) -> cmd::CreateSrq {
        cmd::CreateSrq {
            pdn: pd.into(),
            max_wr: depth.into(),
            max_sge: max_sge.into(),
            srq_limit: limit.into(),
            ring_addr: ring.into(),
        }
    }

    /// A new SRQ in `pd` of `depth` entries of `max_sge` SGEs, armed with `limit`.
    pub fn srq(&mut self, pd: u32, depth: u32, max_sge: u32, limit: u32) -> TestSrq {
        let len = ring::Geometry::new(depth, wqe::recv_stride(max_sge))
            .unwrap()
            .byte_len();
        let ring = self.alloc(len);
        let body = Self::srq_body(pd, depth, max_sge, limit, ring);
        let resp = self.exec(Opcode::CreateSrq, body.as_bytes());
        let srqn = cmd::CreateSrqResp::read_from_bytes(&resp)
            .unwrap()
            .srqn
            .get();
        TestSrq {
            srqn,
            ring,
            depth,
            max_sge,
        }
    }

    /// Posts a receive of `sges` on `srq`, as a driver does (slot, then producer index).
    pub fn post_srq_recv(&self, srq: &TestSrq, wr_id: u64, sges: &[Sge]) {
        let stride = wqe::recv_stride(srq.max_sge);
        self.post(srq.ring, srq.depth, stride, |slot| {
            wqe::encode_recv(slot, wr_id, sges)
        });
    }

    /// The consumer index the device last published in the ring at `ring_addr`.
    pub fn consumer(&self, ring_addr: u64) -> u32 {
        self.mem()
            .load::<u32>(
                GuestAddress(ring_addr + ring::CONSUMER_OFFSET),
                Ordering::Acquire,
            )
            .unwrap()
    }

    /// MODIFY_QP of QP `qpn` with `attr` and `mask` (STATE added).
    pub fn modify(&self, qpn: u32, mask: AttrMask, attr: qp::Attr) -> Result<Vec<u8>, Failure> {
        self.modify_with(qpn, mask, attr, &NoHooks)
    }

    /// As [`TestVm::modify`], telling `hooks`.
    pub fn modify_with(
        &self,
        qpn: u32,
        mask: AttrMask,
        attr: qp::Attr,
        hooks: &dyn ObjectHooks,
    ) -> Result<Vec<u8>, Failure> {
        let m = cmd::ModifyQp {
            qpn: qpn.into(),
            attr_mask: (mask | AttrMask::STATE).bits().into(),
            attr,
        };
        self.exec_with(Opcode::ModifyQp, m.as_bytes(), hooks)
    }

    /// Takes RC QP `qpn` to RTS, connected to QP `dest_qpn` of the port `dgid`, accepting
    /// every remote operation, with `retry_cnt`, `rnr_retry` and `min_rnr_timer`.
    pub fn connect(&self, qpn: u32, dgid: Gid, dest_qpn: u32, retries: (u8, u8, u8)) {
        let path = qp::AhAttr {
            dgid,
            port_num: 1,
            is_global: 1,
            ..qp::AhAttr::default()
        };
        self.connect_by(qpn, path, dest_qpn, retries);
    }

    /// As [`TestVm::connect`], by the path `path` (its service level, say).
    pub fn connect_by(&self, qpn: u32, path: qp::AhAttr, dest_qpn: u32, retries: (u8, u8, u8)) {
        let (retry_cnt, rnr_retry, min_rnr_timer) = retries;
        let remote = Access::REMOTE_READ | Access::REMOTE_WRITE | Access::REMOTE_ATOMIC;
        let steps = [
            (
                AttrMask::PKEY_INDEX | AttrMask::PORT | AttrMask::ACCESS_FLAGS,
                qp::Attr {
                    qp_state: qp::State::Init.raw(),
                    port_num: 1,
                    qp_access_flags: remote.bits().into(),
                    ..qp::Attr::default()
                },
            ),
            (
                AttrMask::AV
                    | AttrMask::PATH_MTU
                    | AttrMask::DEST_QPN
                    | AttrMask::RQ_PSN
                    | AttrMask::MAX_DEST_RD_ATOMIC
                    | AttrMask::MIN_RNR_TIMER,
                qp::Attr {
                    qp_state: qp::State::Rtr.raw(),
                    path_mtu: vrdma_proto::config::Mtu::Mtu4096.raw(),
                    dest_qp_num: dest_qpn.into(),
                    max_dest_rd_atomic: 4,
                    min_rnr_timer,
                    ah_attr: path,
                    ..qp::Attr::default()
                },
            ),
            (
                AttrMask::TIMEOUT
                    | AttrMask::RETRY_CNT
                    | AttrMask::RNR_RETRY
                    | AttrMask::SQ_PSN
                    | AttrMask::MAX_QP_RD_ATOMIC,
                qp::Attr {
                    qp_state: qp::State::Rts.raw(),
                    timeout: 1,
                    retry_cnt,
                    rnr_retry,
                    max_rd_atomic: 4,
                    ..qp::Attr::default()
                },
            ),
        ];
        for (mask, attr) in steps {
            self.modify(qpn, mask, attr).expect("connect");
        }
    }

    fn producer(&self, ring_addr: u64) -> u32 {
        self.mem()
            .load::<u32>(
                GuestAddress(ring_addr + ring::PRODUCER_OFFSET),
                Ordering::Acquire,
            )
            .unwrap()
    }

    fn set_producer(&self, ring_addr: u64, value: u32) {
        self.mem()
            .store(
                value,
                GuestAddress(ring_addr + ring::PRODUCER_OFFSET),
                Ordering::Release,
            )
            .unwrap();
    }

    /// Posts a send work request on `qp` as a driver does (slot, then producer index) and
    /// puts the QP on the ready list as its doorbell would.
    pub fn post_send(&self, qp: &TestQp, header: SendHeader, data: Data<'_>) {
        let c = &qp.caps;
        let stride = wqe::send_stride(c.max_send_sge.get(), c.max_inline_data.get());
        self.post(qp.sq, c.max_send_wr.get(), stride, |slot| {
            wqe::encode_send(slot, header, data)
        });
        self.vm.enqueue(qp.qpn);
    }

    /// Posts a receive of `sges` on `qp`.
    pub fn post_recv(&self, qp: &TestQp, wr_id: u64, sges: &[Sge]) {
        let stride = wqe::recv_stride(qp.caps.max_recv_sge.get());
        self.post(qp.rq, qp.caps.max_recv_wr.get(), stride, |slot| {
            wqe::encode_recv(slot, wr_id, sges)
        });
    }

    /// Writes the next slot of the ring at `ring_addr` with `encode`, then its producer index.
    fn post(
        &self,
        ring_addr: u64,
        depth: u32,
        stride: u32,
        encode: impl FnOnce(&mut [u8]) -> Result<usize, vrdma_proto::DecodeError>,
    ) {
        let geometry = ring::Geometry::new(depth, stride).unwrap();
        let producer = self.producer(ring_addr);
        let mut slot = vec![0u8; stride as usize];
        encode(&mut slot).unwrap();
        let at = ring_addr + geometry.entry_offset(producer);
        self.mem().write_slice(&slot, GuestAddress(at)).unwrap();
        self.set_producer(ring_addr, producer.wrapping_add(1));
    }

    /// Every completion in CQ ring `ring_addr` so far (from the first, whatever the driver
    /// consumed).
    pub fn completions(&self, ring_addr: u64, depth: u32) -> Vec<Cqe> {
        let produced = self.producer(ring_addr);
        (0..produced)
            .map(|i| {
                let mut c = Cqe::default();
                let at =
                    ring_addr + ring::HEADER_SIZE + u64::from(i % depth) * u64::from(cqe::SIZE);
                self.mem()
                    .read_slice(c.as_mut_bytes(), GuestAddress(at))
                    .unwrap();
                c
            })
            .collect()
    }

    /// Fills `len` bytes at `addr` with `byte`.
    pub fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.mem()
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    /// The `len` bytes at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem().read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }
}

/// A send header with `opcode`, `wr_id` and `flags`.
pub fn send_header(opcode: wqe::Opcode, wr_id: u64, flags: wqe::SendFlags) -> SendHeader {
    SendHeader {
        wr_id: wr_id.into(),
        opcode: opcode.raw(),
        send_flags: flags.bits(),
        ..SendHeader::default()
    }
}
