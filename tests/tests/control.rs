//! The control path over real vhost-user sockets: every command on its happy path, and the
//! exact status (and `detail`) the device answers for bad handles, busy objects, quotas, the QP
//! state machine, malformed chains and guest addresses outside the VM's memory.
//!
//! Most tests drive one connection two ways: through the verbs API (`vrdma::Context`) and with
//! raw command bytes on the same transport (`Transport::control`), so that they can name
//! handles the verbs objects no longer own and send what no well-behaved driver would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vrdma::mem::DmaBuf;
use vrdma::transport::{Transport, VirtioUser};
use vrdma::{
    AccessFlags, AddressHandle, CompletionChannel, CompletionQueue, Context, MemoryRegion,
    ProtectionDomain, QpAttr, QpAttrMask, QpCap, QpInitAttr, QpState, QpType, QueuePair, SendWr,
    Sge,
};
use vrdma_proto::cmd::{self, NotifyFlags, Opcode, RespHeader, Status};
use vrdma_proto::config::{self, Config, Mtu};
use vrdma_proto::{Gid, cqe, qp, ring, wqe};
use vrdma_tests::{Endpoint, TestDaemon, all_access, connect_rc, poll_one, rc_pair};
use zerocopy::{FromBytes, IntoBytes};

// ---------------------------------------------------------------------------------------------
// A guest connection usable both through verbs and raw.
// ---------------------------------------------------------------------------------------------

/// A refused command: its status and `detail`.
type Refusal = (Status, u32);

/// A guest: the verbs context and the raw transport of the same connection.
#[derive(Debug)]
struct Guest {
    ctx: Context,
    dev: Arc<VirtioUser>,
}

/// Queue sizes of the QPs the tests create with raw commands.
fn raw_caps() -> qp::Caps {
    qp::Caps {
        max_send_wr: 4.into(),
        max_recv_wr: 4.into(),
        max_send_sge: 1.into(),
        max_recv_sge: 1.into(),
        max_inline_data: 0.into(),
        reserved: 0.into(),
    }
}

/// A command chain's device-readable bytes: a header with the given fields, then `body`.
fn request(opcode: u16, flags: u16, reserved: u32, body: &[u8]) -> Vec<u8> {
    let header = cmd::Header {
        opcode: opcode.into(),
        flags: flags.into(),
        reserved: reserved.into(),
    };
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

fn handle(h: u32) -> Vec<u8> {
    cmd::Handle {
        handle: h.into(),
        reserved: 0.into(),
    }
    .as_bytes()
    .to_vec()
}

/// The status of a raw command's outcome (`Ok` on success).
fn st<T>(r: Result<T, Refusal>) -> Status {
    match r {
        Ok(_) => Status::Ok,
        Err((status, _)) => status,
    }
}

/// The status and detail of a verbs call the device refused.
fn refused<T: std::fmt::Debug>(r: vrdma::Result<T>) -> Refusal {
    match r {
        Err(vrdma::Error::Device { status, detail, .. }) => (status, detail),
        other => panic!("expected the device to refuse, got {other:?}"),
    }
}

/// The page list of `len` bytes at `addr` in 4 KiB pages, as the library builds it.
fn pages_of(addr: u64, len: u64) -> (u32, Vec<u64>) {
    let first = addr & !4095;
    let offset = addr - first;
    let n = (offset + len).div_ceil(4096);
    (offset as u32, (0..n).map(|i| first + i * 4096).collect())
}

fn reg_mr_body(
    pdn: u32,
    access: AccessFlags,
    len: u64,
    offset: u32,
    npages: u32,
    shift: u8,
) -> cmd::RegMr {
    cmd::RegMr {
        pdn: pdn.into(),
        access: access.bits().into(),
        iova: 0x1_0000_0000u64.into(),
        length: len.into(),
        first_page_offset: offset.into(),
        npages: npages.into(),
        page_shift: shift,
        reserved: [0; 7],
    }
}

fn reg_mr_bytes(body: &cmd::RegMr, pages: &[u64]) -> Vec<u8> {
    let mut bytes = body.as_bytes().to_vec();
    for p in pages {
        bytes.extend_from_slice(&p.to_le_bytes());
    }
    bytes
}

impl Guest {
    fn connect(d: &TestDaemon, name: &str) -> Guest {
        let (ctx, dev) = d.open_shared(name);
        Guest { ctx, dev }
    }

    fn config(&self) -> &Config {
        Transport::config(&*self.dev)
    }

    /// Sends raw request bytes with a response buffer of `resp_len` bytes; returns the bytes
    /// the device wrote and the buffer.
    fn raw(&self, request: &[u8], resp_len: usize) -> (usize, Vec<u8>) {
        let mut resp = vec![0u8; resp_len];
        let n = Transport::control(&*self.dev, request, &mut resp).expect("control transport");
        (n, resp)
    }

    /// Decodes a response: the body on success, the status and detail otherwise.
    fn outcome(n: usize, resp: &[u8], body_len: usize) -> Result<Vec<u8>, Refusal> {
        assert!(
            n >= 8,
            "the device wrote {n} bytes, less than a response header"
        );
        let (header, status) = RespHeader::decode(&resp[..n]).expect("response header decodes");
        if status == Status::Ok {
            assert_eq!(n, 8 + body_len, "a success writes the header and the body");
            Ok(resp[8..n].to_vec())
        } else {
            assert_eq!(n, 8, "a failure writes only the response header");
            Err((status, header.detail.get()))
        }
    }

    /// Sends `opcode` with `body` and a response buffer of exactly the size the spec requires.
    fn call(&self, opcode: Opcode, body: &[u8]) -> Result<Vec<u8>, Refusal> {
        let len = opcode.response_len();
        let (n, resp) = self.raw(&request(opcode.raw(), 0, 0, body), 8 + len);
        Self::outcome(n, &resp, len)
    }

    fn call_as<T: FromBytes>(&self, opcode: Opcode, body: &[u8]) -> Result<T, Refusal> {
        self.call(opcode, body)
            .map(|b| T::read_from_bytes(&b).expect("response body has its size"))
    }

    /// Ring memory in the guest's DMA memory, 64-byte aligned.
    fn ring_buf(&self, len: u64) -> DmaBuf {
        Transport::alloc_dma(&*self.dev, len as usize, 4096).expect("ring memory")
    }

    fn cq_ring(&self, depth: u32) -> DmaBuf {
        self.ring_buf(ring::Geometry::new(depth, cqe::SIZE).unwrap().byte_len())
    }

    /// A send and a receive ring for a QP of [`raw_caps`].
    fn qp_rings(&self) -> (DmaBuf, DmaBuf) {
        let c = raw_caps();
        let sq = ring::Geometry::new(
            c.max_send_wr.get(),
            wqe::send_stride(c.max_send_sge.get(), c.max_inline_data.get()),
        )
        .unwrap();
        let rq = ring::Geometry::new(c.max_recv_wr.get(), wqe::recv_stride(c.max_recv_sge.get()))
            .unwrap();
        (self.ring_buf(sq.byte_len()), self.ring_buf(rq.byte_len()))
    }

    fn alloc_pd(&self) -> Result<u32, Refusal> {
        self.call_as::<cmd::HandleResp>(Opcode::AllocPd, &[])
            .map(|r| r.handle.get())
    }

    fn dealloc_pd(&self, pdn: u32) -> Result<(), Refusal> {
        self.call(Opcode::DeallocPd, &handle(pdn)).map(drop)
    }

    /// Registers `len` bytes at `addr` (in 4 KiB pages); returns (lkey, rkey).
    fn reg_mr(
        &self,
        pdn: u32,
        addr: u64,
        len: u64,
        access: AccessFlags,
    ) -> Result<(u32, u32), Refusal> {
        let (offset, pages) = pages_of(addr, len);
        let body = reg_mr_body(pdn, access, len, offset, pages.len() as u32, 12);
        self.call_as::<cmd::RegMrResp>(Opcode::RegMr, &reg_mr_bytes(&body, &pages))
            .map(|r| (r.lkey.get(), r.rkey.get()))
    }

    fn dereg_mr(&self, lkey: u32) -> Result<(), Refusal> {
        self.call(Opcode::DeregMr, &handle(lkey)).map(drop)
    }

    fn create_cq(&self, depth: u32, ring_addr: u64) -> Result<u32, Refusal> {
        let body = cmd::CreateCq {
            cqe: depth.into(),
            reserved: 0.into(),
            ring_addr: ring_addr.into(),
        };
        let resp: cmd::CreateCqResp = self.call_as(Opcode::CreateCq, body.as_bytes())?;
        assert_eq!(
            resp.cqe.get(),
            depth,
            "CREATE_CQ answers the depth asked for"
        );
        Ok(resp.cqn.get())
    }

    fn destroy_cq(&self, cqn: u32) -> Result<(), Refusal> {
        self.call(Opcode::DestroyCq, &handle(cqn)).map(drop)
    }

    fn req_notify(&self, cqn: u32, flags: u32) -> Result<u32, Refusal> {
        let body = cmd::ReqNotifyCq {
            cqn: cqn.into(),
            flags: flags.into(),
        };
        self.call_as::<cmd::ReqNotifyCqResp>(Opcode::ReqNotifyCq, body.as_bytes())
            .map(|r| r.pending.get())
    }

    fn create_qp_at(
        &self,
        pdn: u32,
        send_cqn: u32,
        recv_cqn: u32,
        sq_addr: u64,
        rq_addr: u64,
    ) -> Result<u32, Refusal> {
        let body = cmd::CreateQp {
            pdn: pdn.into(),
            qp_type: qp::Type::Rc.raw(),
            sq_sig_all: 0,
            reserved: 0.into(),
            send_cqn: send_cqn.into(),
            recv_cqn: recv_cqn.into(),
            cap: raw_caps(),
            sq_ring_addr: sq_addr.into(),
            rq_ring_addr: rq_addr.into(),
            srqn: 0.into(),
            reserved1: 0.into(),
        };
        let resp: cmd::CreateQpResp = self.call_as(Opcode::CreateQp, body.as_bytes())?;
        assert_eq!(resp.cap, raw_caps(), "CREATE_QP answers the caps asked for");
        Ok(resp.qpn.get())
    }

    /// Creates an RC QP with fresh rings (returned, to keep them alive).
    fn create_qp(
        &self,
        pdn: u32,
        send_cqn: u32,
        recv_cqn: u32,
    ) -> (Result<u32, Refusal>, (DmaBuf, DmaBuf)) {
        let rings = self.qp_rings();
        let r = self.create_qp_at(pdn, send_cqn, recv_cqn, rings.0.addr(), rings.1.addr());
        (r, rings)
    }

    fn modify_qp(&self, qpn: u32, mask: u32, attr: &qp::Attr) -> Result<(), Refusal> {
        let body = cmd::ModifyQp {
            qpn: qpn.into(),
            attr_mask: mask.into(),
            attr: *attr,
        };
        self.call(Opcode::ModifyQp, body.as_bytes()).map(drop)
    }

    fn query_qp(&self, qpn: u32) -> Result<cmd::QueryQpResp, Refusal> {
        self.call_as(Opcode::QueryQp, &handle(qpn))
    }

    fn destroy_qp(&self, qpn: u32) -> Result<(), Refusal> {
        self.call(Opcode::DestroyQp, &handle(qpn)).map(drop)
    }

    fn post_recv(&self, qpn: u32) -> Result<(), Refusal> {
        self.call(Opcode::PostRecv, &handle(qpn)).map(drop)
    }

    fn create_ah(&self, pdn: u32, attr: qp::AhAttr) -> Result<u32, Refusal> {
        let body = cmd::CreateAh {
            pdn: pdn.into(),
            reserved: 0.into(),
            attr,
        };
        self.call_as::<cmd::HandleResp>(Opcode::CreateAh, body.as_bytes())
            .map(|r| r.handle.get())
    }

    fn destroy_ah(&self, ah: u32) -> Result<(), Refusal> {
        self.call(Opcode::DestroyAh, &handle(ah)).map(drop)
    }
}

/// A MODIFY_QP attribute block that moves to `state`.
fn to_state(state: QpState) -> qp::Attr {
    qp::Attr {
        qp_state: state.raw(),
        ..qp::Attr::default()
    }
}

/// One object of each kind, by handle.
#[derive(Debug, Clone, Copy)]
struct Handles {
    pd: u32,
    cq: u32,
    qp: u32,
    lkey: u32,
    ah: u32,
}

impl Handles {
    /// Every handle with `f` applied (to forge them).
    fn map(self, f: impl Fn(u32, u32) -> u32) -> Handles {
        // PD, CQ, QP and AH handles keep their slot in the low 16 bits, MR keys in the low
        // 20 (this device's layout; drivers treat handles as opaque).
        Handles {
            pd: f(self.pd, 16),
            cq: f(self.cq, 16),
            qp: f(self.qp, 16),
            lkey: f(self.lkey, 20),
            ah: f(self.ah, 16),
        }
    }
}

/// Uses every handle of `h` in every command that names one, and returns each command's
/// status. `live` is a live PD and CQ of the guest, so that a CQ handle can be tested in
/// CREATE_QP on its own; `page` is a page of guest memory.
fn use_handles(
    g: &Guest,
    h: Handles,
    live: Option<(u32, u32)>,
    page: u64,
) -> Vec<(&'static str, Status)> {
    let mut out = Vec::new();
    let (sq, rq) = g.qp_rings();
    let (live_pd, live_cq) = live.unwrap_or((h.pd, h.cq));
    out.push(("DEALLOC_PD", st(g.dealloc_pd(h.pd))));
    out.push((
        "REG_MR pdn",
        st(g.reg_mr(h.pd, page, 4096, AccessFlags::LOCAL_WRITE)),
    ));
    out.push((
        "CREATE_AH pdn",
        st(g.create_ah(h.pd, AddressHandle::attr_for(g.ctx.gid()))),
    ));
    out.push((
        "CREATE_QP pdn",
        st(g.create_qp_at(h.pd, live_cq, live_cq, sq.addr(), rq.addr())),
    ));
    if live.is_some() {
        out.push((
            "CREATE_QP send_cqn",
            st(g.create_qp_at(live_pd, h.cq, live_cq, sq.addr(), rq.addr())),
        ));
        out.push((
            "CREATE_QP recv_cqn",
            st(g.create_qp_at(live_pd, live_cq, h.cq, sq.addr(), rq.addr())),
        ));
    }
    out.push(("DESTROY_CQ", st(g.destroy_cq(h.cq))));
    out.push(("REQ_NOTIFY_CQ", st(g.req_notify(h.cq, 0))));
    out.push(("QUERY_QP", st(g.query_qp(h.qp))));
    out.push((
        "MODIFY_QP",
        st(g.modify_qp(h.qp, QpAttrMask::STATE.bits(), &to_state(QpState::Reset))),
    ));
    out.push(("POST_RECV", st(g.post_recv(h.qp))));
    out.push(("DESTROY_QP", st(g.destroy_qp(h.qp))));
    out.push(("DEREG_MR", st(g.dereg_mr(h.lkey))));
    out.push(("DESTROY_AH", st(g.destroy_ah(h.ah))));
    out
}

fn assert_all_invalid(what: &str, results: &[(&'static str, Status)]) {
    for (command, status) in results {
        assert_eq!(
            *status,
            Status::InvalidHandle,
            "{what}: {command} must answer InvalidHandle"
        );
    }
}

/// Creates one object of each kind with raw commands (nothing destroys them on drop).
fn create_all(g: &Guest) -> (Handles, Vec<DmaBuf>) {
    let pd = g.alloc_pd().expect("ALLOC_PD");
    let ring = g.cq_ring(8);
    let cq = g.create_cq(8, ring.addr()).expect("CREATE_CQ");
    let (qpn, (sq, rq)) = g.create_qp(pd, cq, cq);
    let qp = qpn.expect("CREATE_QP");
    let buf = g.ring_buf(8192);
    let (lkey, _) = g
        .reg_mr(pd, buf.addr(), 8192, AccessFlags::LOCAL_WRITE)
        .expect("REG_MR");
    let ah = g
        .create_ah(pd, AddressHandle::attr_for(g.ctx.gid()))
        .expect("CREATE_AH");
    (
        Handles {
            pd,
            cq,
            qp,
            lkey,
            ah,
        },
        vec![ring, sq, rq, buf],
    )
}

/// Destroys what [`create_all`] made, checking each command succeeds.
fn destroy_all(g: &Guest, h: Handles) {
    g.destroy_ah(h.ah).expect("DESTROY_AH");
    g.dereg_mr(h.lkey).expect("DEREG_MR");
    g.destroy_qp(h.qp).expect("DESTROY_QP");
    g.destroy_cq(h.cq).expect("DESTROY_CQ");
    g.dealloc_pd(h.pd).expect("DEALLOC_PD");
}

fn small_cap() -> QpCap {
    QpCap {
        max_send_wr: 16,
        max_recv_wr: 16,
        max_send_sge: 2,
        max_recv_sge: 2,
        max_inline_data: 0,
    }
}

fn new_qp(
    pd: &ProtectionDomain,
    cq: &CompletionQueue,
    qp_type: QpType,
) -> vrdma::Result<QueuePair> {
    vrdma_tests::new_qp(pd, cq, qp_type, small_cap())
}

fn commands_failed(d: &TestDaemon, vm: &str) -> u64 {
    d.wait_connected(vm, true);
    d.vm(vm)
        .expect("VM connected")
        .counters
        .commands_failed
        .load(std::sync::atomic::Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Happy paths.
// ---------------------------------------------------------------------------------------------

#[test]
fn query_commands_answer_the_config_space_and_the_vms_quotas() {
    let d = TestDaemon::start(&[
        (
            "a",
            "max-qp=8,max-cq=5,max-mr=7,max-pd=3,max-ah=9,max-mr-bytes=64M",
        ),
        ("b", ""),
    ]);
    let a = Guest::connect(&d, "a");
    let config = *a.config();

    // QUERY_DEVICE: the same bytes as the config space's caps, holding a's quotas.
    let caps = a.ctx.query_device().expect("QUERY_DEVICE");
    assert_eq!(caps.as_bytes(), config.caps.as_bytes());
    assert_eq!(caps, a.ctx.device_attr());
    assert_eq!(caps.max_qp.get(), 8);
    assert_eq!(caps.max_cq.get(), 5);
    assert_eq!(caps.max_mr.get(), 7);
    assert_eq!(caps.max_pd.get(), 3);
    assert_eq!(caps.max_ah.get(), 9);
    assert_eq!(caps.max_registered_bytes.get(), 64 << 20);
    assert!(
        caps.max_mr_size.get() <= 64 << 20,
        "one MR cannot be larger than the VM's registration budget"
    );
    assert_eq!(caps.phys_port_cnt, 1);
    assert_eq!(caps.reserved, [0; 2]);
    assert!(caps.max_sge.get() >= 1 && caps.max_sge.get() <= wqe::MAX_SGE);
    assert!(caps.max_inline_data.get() <= wqe::MAX_INLINE);
    assert!(caps.max_qp_wr.get() >= 1 && caps.max_cqe.get() >= 1);
    assert!(caps.max_mr_pages.get() <= cmd::MAX_PAGE_LIST);
    assert_eq!(
        caps.page_size_cap.get() & !((1u64 << 31) - (1 << 12)),
        0,
        "only page sizes 2^12..2^30"
    );
    assert_ne!(caps.page_size_cap.get() & (1 << 12), 0, "4 KiB pages");
    assert_eq!(config.version.get(), vrdma_proto::PROTOCOL_VERSION);

    // Quotas are per VM: b was given none and sees the defaults, not a's.
    let b = d.open("b");
    let b_caps = b.query_device().expect("QUERY_DEVICE on b");
    assert_ne!(b_caps.max_qp.get(), 8);
    assert_eq!(b_caps, b.device_attr());
    assert_ne!(
        b_caps.node_guid.get(),
        caps.node_guid.get(),
        "each VM's device has its own node GUID"
    );

    // QUERY_PORT: active Ethernet port with a 4096-byte MTU, as in the config space.
    let port = a.ctx.query_port(1).expect("QUERY_PORT");
    assert_eq!(port.as_bytes(), config.port.as_bytes());
    assert_eq!(port.state, config::PortState::Active.raw());
    assert_eq!(port.link_layer, config::LinkLayer::Ethernet.raw());
    assert_eq!(port.active_mtu, Mtu::Mtu4096.raw());
    assert_eq!(port.max_mtu, Mtu::Mtu4096.raw());
    assert_eq!(port.pkey_tbl_len.get(), 1);
    assert_eq!(port.gid_tbl_len.get(), 1);
    assert_eq!((port.lid.get(), port.sm_lid.get()), (0, 0));
    for bad in [0, 2, 255] {
        assert_eq!(
            refused(a.ctx.query_port(bad)),
            (Status::InvalidArgument, 0),
            "QUERY_PORT port {bad}"
        );
    }

    // QUERY_GID: the configured GID (the harness gives VM a 10.0.0.1) as RoCEv2.
    let gid = a.ctx.query_gid(1, 0).expect("QUERY_GID");
    assert_eq!(gid, Gid::from_ipv4([10, 0, 0, 1]));
    assert_eq!(gid, config.gid);
    assert_eq!(b.query_gid(1, 0).unwrap(), Gid::from_ipv4([10, 0, 0, 2]));
    let body = cmd::QueryGid {
        port_num: 1,
        reserved: [0; 3],
        index: 0.into(),
    };
    let resp: cmd::QueryGidResp = a.call_as(Opcode::QueryGid, body.as_bytes()).unwrap();
    assert_eq!(resp.gid_type, config::GidType::RoceV2.raw());
    assert_eq!(resp.reserved, [0; 7]);
    assert_eq!(
        refused(a.ctx.query_gid(1, 1)),
        (Status::InvalidArgument, 0),
        "index 1 is past the GID table"
    );
    assert_eq!(
        refused(a.ctx.query_gid(1, u32::MAX)),
        (Status::InvalidArgument, 0)
    );
    assert_eq!(
        refused(a.ctx.query_gid(2, 0)),
        (Status::InvalidArgument, 0),
        "there is no port 2"
    );
    assert_eq!(commands_failed(&d, "a"), 6, "every refusal is counted");
}

#[test]
fn every_object_is_created_queried_and_destroyed() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let a = Guest::connect(&d, "a");
    let peer_gid = d.open("b").gid();
    {
        let pd = ProtectionDomain::new(&a.ctx).expect("ALLOC_PD");
        assert_ne!(pd.handle(), 0);
        let pd2 = ProtectionDomain::new(&a.ctx).expect("a second PD");
        assert_ne!(pd.handle(), pd2.handle());

        // MRs: rkey 0 without remote access, a usable one with it.
        let buf = a.ctx.alloc(1 << 16).unwrap();
        let local = MemoryRegion::register(&pd, &buf, AccessFlags::LOCAL_WRITE).expect("REG_MR");
        assert_ne!(local.lkey(), 0);
        assert_eq!(local.rkey(), 0, "no remote access, no rkey");
        let read_only = MemoryRegion::register(&pd, &buf, AccessFlags::empty()).unwrap();
        assert_eq!(read_only.rkey(), 0);
        let remote = MemoryRegion::register_range(
            &pd,
            buf.addr() + 100,
            5000,
            AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE,
        )
        .unwrap();
        assert_ne!(remote.rkey(), 0);
        assert_ne!(remote.lkey(), local.lkey());
        let reader = MemoryRegion::register(&pd, &buf, AccessFlags::REMOTE_READ).unwrap();
        assert_ne!(reader.rkey(), 0, "remote read alone gives an rkey");
        let atomics = MemoryRegion::register(&pd2, &buf, all_access()).unwrap();
        assert_ne!(atomics.rkey(), 0);

        // CQs.
        let scq = CompletionQueue::new(&a.ctx, 100).expect("CREATE_CQ");
        assert_eq!(scq.depth(), 128);
        let rcq = CompletionQueue::new(&a.ctx, 1).unwrap();
        assert_ne!(scq.handle(), 0);
        assert_ne!(scq.handle(), rcq.handle());

        // A QP through RESET, INIT, RTR and RTS; QUERY_QP returns what was set.
        let qp = QueuePair::new(
            &pd,
            &QpInitAttr {
                send_cq: &scq,
                recv_cq: &rcq,
                srq: None,
                cap: QpCap {
                    max_send_wr: 16,
                    max_recv_wr: 8,
                    max_send_sge: 2,
                    max_recv_sge: 3,
                    max_inline_data: 64,
                },
                qp_type: QpType::Rc,
                sq_sig_all: true,
            },
        )
        .expect("CREATE_QP");
        let qpn = qp.qp_num();
        assert!(qpn > 1 && qpn <= qp::MAX_QPN, "QPN {qpn:#x}");
        let (attr, cap) = qp.query().expect("QUERY_QP");
        assert_eq!(attr.qp_state, QpState::Reset);
        assert_eq!(
            cap,
            QpCap {
                max_send_wr: 16,
                max_recv_wr: 8,
                max_send_sge: 2,
                max_recv_sge: 3,
                max_inline_data: 64,
            }
        );
        let raw = a.query_qp(qpn).unwrap();
        assert_eq!(raw.qp_type, qp::Type::Rc.raw());
        assert_eq!(raw.sq_sig_all, 1);
        assert_eq!(raw.send_cqn.get(), scq.handle());
        assert_eq!(raw.recv_cqn.get(), rcq.handle());
        assert_eq!(raw.pdn.get(), pd.handle());
        assert_eq!(raw.attr.path_mig_state, qp::MigState::Migrated.raw());

        let access = AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE;
        qp.modify(
            &QpAttr {
                qp_state: QpState::Init,
                qp_access_flags: access,
                ..QpAttr::default()
            },
            QpAttrMask::RC_INIT,
        )
        .expect("RESET->INIT");
        let (attr, _) = qp.query().unwrap();
        assert_eq!(
            (attr.qp_state, attr.qp_access_flags, attr.port_num),
            (QpState::Init, access, 1)
        );
        let mut av = AddressHandle::attr_for(peer_gid);
        av.traffic_class = 3;
        av.flow_label = 0x12345.into();
        qp.modify(
            &QpAttr {
                qp_state: QpState::Rtr,
                path_mtu: Mtu::Mtu2048,
                dest_qp_num: 0x00ab_cdef,
                rq_psn: 0x12_3456,
                max_dest_rd_atomic: 4,
                min_rnr_timer: 12,
                ah_attr: av,
                ..QpAttr::default()
            },
            QpAttrMask::RC_RTR,
        )
        .expect("INIT->RTR");
        qp.modify(
            &QpAttr {
                qp_state: QpState::Rts,
                sq_psn: 0x65_4321,
                timeout: 14,
                retry_cnt: 5,
                rnr_retry: 6,
                max_rd_atomic: 3,
                ..QpAttr::default()
            },
            QpAttrMask::RC_RTS,
        )
        .expect("RTR->RTS");
        let (attr, _) = qp.query().unwrap();
        assert_eq!(attr.qp_state, QpState::Rts);
        assert_eq!(
            attr.cur_qp_state,
            QpState::Rts,
            "cur_qp_state reads the state"
        );
        assert_eq!(attr.qp_access_flags, access);
        assert_eq!(attr.path_mtu, Mtu::Mtu2048);
        assert_eq!(attr.dest_qp_num, 0x00ab_cdef);
        assert_eq!((attr.rq_psn, attr.sq_psn), (0x12_3456, 0x65_4321));
        assert_eq!((attr.max_dest_rd_atomic, attr.max_rd_atomic), (4, 3));
        assert_eq!(attr.min_rnr_timer, 12);
        assert_eq!((attr.timeout, attr.retry_cnt, attr.rnr_retry), (14, 5, 6));
        assert_eq!(attr.ah_attr, av);
        assert_eq!(attr.pkey_index, 0);

        // RTS->RTS without STATE changes one attribute and keeps the others.
        qp.modify(
            &QpAttr {
                qp_access_flags: AccessFlags::REMOTE_READ,
                min_rnr_timer: 3,
                ..QpAttr::default()
            },
            QpAttrMask::ACCESS_FLAGS | QpAttrMask::MIN_RNR_TIMER,
        )
        .expect("RTS->RTS");
        let (attr, _) = qp.query().unwrap();
        assert_eq!(attr.qp_state, QpState::Rts);
        assert_eq!(attr.qp_access_flags, AccessFlags::REMOTE_READ);
        assert_eq!(attr.min_rnr_timer, 3);
        assert_eq!(
            attr.sq_psn, 0x65_4321,
            "attributes not in the mask keep their values"
        );

        // RTS->SQD->RTS, ->ERR, ->RESET.
        qp.modify(
            &QpAttr {
                qp_state: QpState::Sqd,
                ..QpAttr::default()
            },
            QpAttrMask::STATE,
        )
        .expect("RTS->SQD");
        assert_eq!(qp.query().unwrap().0.qp_state, QpState::Sqd);
        qp.modify(
            &QpAttr {
                qp_state: QpState::Rts,
                ..QpAttr::default()
            },
            QpAttrMask::STATE,
        )
        .expect("SQD->RTS");
        qp.modify(
            &QpAttr {
                qp_state: QpState::Err,
                ..QpAttr::default()
            },
            QpAttrMask::STATE,
        )
        .expect("RTS->ERR");
        assert_eq!(qp.query().unwrap().0.qp_state, QpState::Err);
        qp.modify(
            &QpAttr {
                qp_state: QpState::Reset,
                ..QpAttr::default()
            },
            QpAttrMask::STATE,
        )
        .expect("ERR->RESET");
        assert_eq!(qp.query().unwrap().0.qp_state, QpState::Reset);

        // A UD QP and an AH.
        let ud = new_qp(&pd2, &rcq, QpType::Ud).expect("UD QP");
        ud.modify(
            &QpAttr {
                qp_state: QpState::Init,
                qkey: 0x1234,
                ..QpAttr::default()
            },
            QpAttrMask::STATE | QpAttrMask::PKEY_INDEX | QpAttrMask::PORT | QpAttrMask::QKEY,
        )
        .expect("UD RESET->INIT");
        assert_eq!(ud.query().unwrap().0.qkey, 0x1234);
        assert_eq!(a.query_qp(ud.qp_num()).unwrap().qp_type, qp::Type::Ud.raw());
        let ah = AddressHandle::new(&pd2, &AddressHandle::attr_for(peer_gid)).expect("CREATE_AH");
        assert_ne!(ah.handle(), 0);

        // REQ_NOTIFY_CQ on an empty CQ.
        assert_eq!(scq.req_notify_by_command(false).expect("REQ_NOTIFY_CQ"), 0);
        assert_eq!(rcq.req_notify_by_command(true).expect("REQ_NOTIFY_CQ"), 0);
        assert_eq!(commands_failed(&d, "a"), 0);
        // Everything is destroyed here, dependants first (DESTROY_AH, DEREG_MR, DESTROY_QP,
        // DESTROY_CQ, DEALLOC_PD); a refused destroy would be counted.
    }
    assert_eq!(
        commands_failed(&d, "a"),
        0,
        "every destroy command succeeded"
    );
    // And nothing is left: DESTROY_* and DEALLOC_PD freed every quota slot and handle, so a
    // VM-wide count of objects is back to zero.
    let port = d.vm("a").unwrap();
    let vm = port.lock();
    assert_eq!(
        (
            vm.pds.len(),
            vm.mrs.len(),
            vm.cqs.len(),
            vm.qps.len(),
            vm.ahs.len()
        ),
        (0, 0, 0, 0, 0)
    );
    assert_eq!(vm.registered_bytes, 0);
}

#[test]
fn req_notify_cq_reports_completions_already_in_the_ring() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, small_cap());
    let completions = || {
        d.vm("a")
            .unwrap()
            .counters
            .completions
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let src = [Sge::new(a.buf.addr(), 64, a.mr.lkey())];
    let wrs: Vec<SendWr<'_>> = (0..3)
        .map(|i| SendWr::rdma_write(i, &src, b.buf.addr() + i * 64, b.mr.rkey()))
        .collect();
    a.send(&wrs).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while completions() < 3 {
        assert!(Instant::now() < deadline, "the writes never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        a.cq.req_notify_by_command(false).unwrap(),
        3,
        "three completions wait, unpolled"
    );
    let mut wc = [vrdma_tests::empty_wc(); 2];
    assert_eq!(a.cq.poll(&mut wc).unwrap(), 2);
    assert_eq!(a.cq.req_notify_by_command(false).unwrap(), 1);
    assert_eq!(a.poll_one().wr_id, 2);
    assert_eq!(a.cq.req_notify_by_command(false).unwrap(), 0);

    // Armed with nothing pending: the next completion raises an event for this CQ.
    let channel = CompletionChannel::new(&ca).unwrap();
    a.send(&[SendWr::rdma_write(9, &src, b.buf.addr(), b.mr.rkey())])
        .unwrap();
    assert_eq!(
        channel.get_cq_event(Some(Duration::from_secs(10))).unwrap(),
        Some(a.cq.handle())
    );
    assert_eq!(poll_one(&a.cq).wr_id, 9);
}

#[test]
fn req_notify_cq_writes_the_arm_word_and_refuses_a_corrupt_consumer_index() {
    let d = TestDaemon::start(&[("a", "")]);
    let g = Guest::connect(&d, "a");
    let ring = g.cq_ring(4);
    let cqn = g.create_cq(4, ring.addr()).unwrap();
    let word = |offset: u64| {
        let mut w = [0u8; 4];
        ring.read_at(offset as usize, &mut w).unwrap();
        u32::from_le_bytes(w)
    };
    let set = |offset: u64, v: u32| ring.write_at(offset as usize, &v.to_le_bytes()).unwrap();

    assert_eq!(word(ring::ARM_OFFSET), 0);
    assert_eq!(g.req_notify(cqn, 0), Ok(0));
    assert_eq!(word(ring::ARM_OFFSET), ring::arm_word(1, false));
    assert_eq!(g.req_notify(cqn, NotifyFlags::SOLICITED_ONLY.bits()), Ok(0));
    assert_eq!(word(ring::ARM_OFFSET), ring::arm_word(2, true));

    // Undefined flag bits are malformed, and change nothing.
    assert_eq!(g.req_notify(cqn, 2), Err((Status::Malformed, 0)));
    assert_eq!(word(ring::ARM_OFFSET), ring::arm_word(2, true));

    // The producer index is the device's: a value the driver scribbles there is not believed.
    set(ring::PRODUCER_OFFSET, 3);
    assert_eq!(
        g.req_notify(cqn, 0),
        Ok(0),
        "pending comes from the device's producer index"
    );
    assert_eq!(word(ring::ARM_OFFSET), ring::arm_word(3, false));

    // A consumer index ahead of the producer (P - C > cqe) is corrupt: InvalidArgument, and
    // the arm word is left alone.
    set(ring::CONSUMER_OFFSET, 2);
    assert_eq!(g.req_notify(cqn, 0), Err((Status::InvalidArgument, 0)));
    assert_eq!(word(ring::ARM_OFFSET), ring::arm_word(3, false));
    set(ring::CONSUMER_OFFSET, 0);
    assert_eq!(g.req_notify(cqn, 0), Ok(0));
    assert_eq!(word(ring::ARM_OFFSET), ring::arm_word(4, false));

    g.destroy_cq(cqn).unwrap();
    assert_eq!(g.req_notify(cqn, 0), Err((Status::InvalidHandle, 0)));
}

#[test]
fn an_overflowed_cq_refuses_req_notify_and_new_qps_until_destroyed() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let channel = CompletionChannel::new(&ca).unwrap();
    let pd = ProtectionDomain::new(&ca).unwrap();
    let cq = CompletionQueue::new(&ca, 1).unwrap();
    assert_eq!(cq.depth(), 1);
    let qp = new_qp(&pd, &cq, QpType::Rc).unwrap();
    let buf = ca.alloc(1 << 16).unwrap();
    let mr = MemoryRegion::register(&pd, &buf, all_access()).unwrap();
    let a = Endpoint {
        ctx: ca.clone(),
        pd,
        cq,
        qp,
        buf,
        mr,
    };
    let b = Endpoint::new(&cb, QpType::Rc, 1 << 16, small_cap());
    connect_rc(&a.qp, cb.gid(), b.qp.qp_num(), 7, 7);
    connect_rc(&b.qp, ca.gid(), a.qp.qp_num(), 7, 7);

    // Two signalled writes into a one-entry CQ nobody polls: the second overflows it.
    let src = [Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    a.send(&[
        SendWr::rdma_write(1, &src, b.buf.addr(), b.mr.rkey()),
        SendWr::rdma_write(2, &src, b.buf.addr() + 8, b.mr.rkey()),
    ])
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let cqn = a.cq.handle();
    loop {
        let events = channel.take_async_events().unwrap();
        if events.contains(&(vrdma_proto::event::Kind::CqErr, cqn)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the CQ never reported its overflow"
        );
        std::thread::sleep(Duration::from_millis(1));
    }

    // The CQ is in error until destroyed.
    let failed = commands_failed(&d, "a");
    assert_eq!(
        refused(a.cq.req_notify_by_command(false)),
        (Status::InvalidArgument, 0),
        "REQ_NOTIFY_CQ on a CQ in error"
    );
    assert_eq!(
        refused(new_qp(&a.pd, &a.cq, QpType::Rc)),
        (Status::InvalidArgument, 0),
        "CREATE_QP naming a CQ in error"
    );
    let healthy = CompletionQueue::new(&ca, 4).unwrap();
    let _other = new_qp(&a.pd, &healthy, QpType::Rc).expect("a healthy CQ still works");
    assert_eq!(commands_failed(&d, "a"), failed + 2);
    // Its QP is destroyed first, then the CQ itself: both succeed.
    drop(a);
    assert_eq!(
        commands_failed(&d, "a"),
        failed + 2,
        "DESTROY_CQ of a CQ in error succeeds"
    );
}

// ---------------------------------------------------------------------------------------------
// Handles.
// ---------------------------------------------------------------------------------------------

#[test]
fn destroyed_handles_are_invalid_and_reused_slots_get_new_handles() {
    let d = TestDaemon::start(&[("a", "")]);
    let g = Guest::connect(&d, "a");
    let page = g.ring_buf(4096);
    let (h, _bufs) = create_all(&g);
    destroy_all(&g, h);
    // A live PD and CQ, so CREATE_QP can be tried with only the CQ stale.
    let live_pd = g.alloc_pd().unwrap();
    let live_ring = g.cq_ring(4);
    let live_cq = g.create_cq(4, live_ring.addr()).unwrap();
    let results = use_handles(&g, h, Some((live_pd, live_cq)), page.addr());
    assert_all_invalid("destroyed handles", &results);

    // A stale handle stays dead after its slot is reused; the new object gets another handle.
    let (h2, _bufs2) = create_all(&g);
    for (old, new) in [
        (h.cq, h2.cq),
        (h.qp, h2.qp),
        (h.lkey, h2.lkey),
        (h.ah, h2.ah),
    ] {
        assert_ne!(old, new, "a reused slot carries a new generation");
    }
    assert_eq!(st(g.query_qp(h.qp)), Status::InvalidHandle);
    assert_eq!(st(g.destroy_qp(h.qp)), Status::InvalidHandle);
    assert_eq!(st(g.dereg_mr(h.lkey)), Status::InvalidHandle);
    assert_eq!(st(g.destroy_cq(h.cq)), Status::InvalidHandle);
    assert_eq!(st(g.destroy_ah(h.ah)), Status::InvalidHandle);
    assert_eq!(
        g.query_qp(h2.qp).unwrap().attr.qp_state,
        QpState::Reset.raw()
    );
    // The stale attempts touched nothing: the new objects are destroyed normally.
    destroy_all(&g, h2);

    // PDs: free one, allocate again; the old number is dead.
    let p1 = g.alloc_pd().unwrap();
    g.dealloc_pd(p1).unwrap();
    let p2 = g.alloc_pd().unwrap();
    assert_ne!(p1, p2);
    assert_eq!(g.dealloc_pd(p1), Err((Status::InvalidHandle, 0)));
    g.dealloc_pd(p2).unwrap();
    g.destroy_cq(live_cq).unwrap();
    g.dealloc_pd(live_pd).unwrap();
}

#[test]
fn forged_handles_name_nothing_and_hurt_nothing() {
    let d = TestDaemon::start(&[("a", "")]);
    let g = Guest::connect(&d, "a");
    let page = g.ring_buf(4096);
    let (h, _bufs) = create_all(&g);
    let live = Some((h.pd, h.cq));

    let zero = Handles {
        pd: 0,
        cq: 0,
        qp: 0,
        lkey: 0,
        ah: 0,
    };
    assert_all_invalid("handle 0", &use_handles(&g, zero, live, page.addr()));
    // The generation bits changed (the slot is right, the generation is not).
    let regenerated = h.map(|v, slot_bits| v ^ (2 << slot_bits));
    assert_all_invalid(
        "another generation",
        &use_handles(&g, regenerated, live, page.addr()),
    );
    let high = h.map(|v, _| v | 0x8000_0000);
    assert_all_invalid("top bit set", &use_handles(&g, high, live, page.addr()));
    // The slot next to a live one, which was never allocated.
    let neighbour = h.map(|v, _| v + 1);
    assert_all_invalid(
        "neighbouring slot",
        &use_handles(&g, neighbour, live, page.addr()),
    );
    let all_ones = h.map(|_, _| u32::MAX);
    assert_all_invalid("0xffffffff", &use_handles(&g, all_ones, live, page.addr()));

    // None of that touched the real objects.
    let q = g.query_qp(h.qp).unwrap();
    assert_eq!(q.attr.qp_state, QpState::Reset.raw());
    assert_eq!((q.pdn.get(), q.send_cqn.get()), (h.pd, h.cq));
    destroy_all(&g, h);
}

#[test]
fn handles_are_private_to_their_vm() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let a = Guest::connect(&d, "a");
    let b = Guest::connect(&d, "b");
    // Two of everything in a; the second ones are used from b, which allocates at most one
    // object of each kind, so none of these numbers can name an object b created.
    let (_first, _bufs1) = create_all(&a);
    let (h, _bufs2) = create_all(&a);
    let page = b.ring_buf(4096);

    // b has nothing yet: every one of a's handles is invalid there.
    assert_all_invalid("a's handles in b", &use_handles(&b, h, None, page.addr()));

    // With a PD and CQ of its own, b still cannot name a's CQ in CREATE_QP (its own CQ is
    // in slot 0; a's is not).
    let b_pd = b.alloc_pd().unwrap();
    let b_ring = b.cq_ring(4);
    let b_cq = b.create_cq(4, b_ring.addr()).unwrap();
    assert_ne!(b_cq, h.cq);
    assert_ne!(b_pd, h.pd);
    assert_all_invalid(
        "a's handles in b, next to b's own",
        &use_handles(&b, h, Some((b_pd, b_cq)), page.addr()),
    );
    let (ok, _rings) = b.create_qp(b_pd, b_cq, b_cq);
    let b_qp = ok.expect("b's own objects work");
    assert_ne!(b_qp, h.qp);

    // a's objects are untouched by all of it.
    assert_eq!(a.query_qp(h.qp).unwrap().pdn.get(), h.pd);
    destroy_all(&a, h);
    b.destroy_qp(b_qp).unwrap();
    b.destroy_cq(b_cq).unwrap();
    b.dealloc_pd(b_pd).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Busy objects.
// ---------------------------------------------------------------------------------------------

#[test]
fn pds_and_cqs_in_use_are_busy_until_their_users_go() {
    let d = TestDaemon::start(&[("a", "")]);
    let g = Guest::connect(&d, "a");
    let pd = g.alloc_pd().unwrap();
    let buf = g.ring_buf(8192);

    // An MR keeps its PD.
    let (lkey, _) = g
        .reg_mr(pd, buf.addr(), 8192, AccessFlags::LOCAL_WRITE)
        .unwrap();
    assert_eq!(g.dealloc_pd(pd), Err((Status::Busy, 0)));
    // Busy changed nothing: the PD still takes new objects and the MR is still there.
    let (lkey2, _) = g
        .reg_mr(pd, buf.addr(), 4096, AccessFlags::empty())
        .unwrap();
    g.dereg_mr(lkey).unwrap();
    assert_eq!(g.dealloc_pd(pd), Err((Status::Busy, 0)), "one MR is left");
    g.dereg_mr(lkey2).unwrap();

    // An AH keeps its PD.
    let ah = g
        .create_ah(pd, AddressHandle::attr_for(g.ctx.gid()))
        .unwrap();
    assert_eq!(g.dealloc_pd(pd), Err((Status::Busy, 0)));
    g.destroy_ah(ah).unwrap();

    // A QP keeps its PD and both its CQs.
    let (sring, rring) = (g.cq_ring(4), g.cq_ring(4));
    let scq = g.create_cq(4, sring.addr()).unwrap();
    let rcq = g.create_cq(4, rring.addr()).unwrap();
    let (qpn, _rings) = g.create_qp(pd, scq, rcq);
    let qpn = qpn.unwrap();
    assert_eq!(g.dealloc_pd(pd), Err((Status::Busy, 0)));
    assert_eq!(g.destroy_cq(scq), Err((Status::Busy, 0)), "send CQ in use");
    assert_eq!(
        g.destroy_cq(rcq),
        Err((Status::Busy, 0)),
        "receive CQ in use"
    );
    // Two QPs on one CQ: busy until both are gone.
    let (qpn2, _rings2) = g.create_qp(pd, rcq, rcq);
    let qpn2 = qpn2.unwrap();
    g.destroy_qp(qpn).unwrap();
    g.destroy_cq(scq)
        .expect("the send CQ is free once its QP is gone");
    assert_eq!(g.destroy_cq(rcq), Err((Status::Busy, 0)));
    assert_eq!(g.dealloc_pd(pd), Err((Status::Busy, 0)));
    // The QP that kept them busy is unaffected by the refusals.
    assert_eq!(g.query_qp(qpn2).unwrap().recv_cqn.get(), rcq);
    g.destroy_qp(qpn2).unwrap();
    g.destroy_cq(rcq).unwrap();
    g.dealloc_pd(pd)
        .expect("the PD is free once its users are gone");
    assert_eq!(g.dealloc_pd(pd), Err((Status::InvalidHandle, 0)));
}

// ---------------------------------------------------------------------------------------------
// Quotas.
// ---------------------------------------------------------------------------------------------

#[test]
fn object_quotas_from_the_command_line_are_enforced_and_given_back() {
    let d = TestDaemon::start(&[
        ("a", "max-qp=2,max-pd=2,max-cq=3,max-mr=2,max-ah=2"),
        ("b", ""),
    ]);
    let ctx = d.open("a");
    let nores = (Status::NoResources, 0);

    // PDs.
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let pd2 = ProtectionDomain::new(&ctx).unwrap();
    assert_eq!(refused(ProtectionDomain::new(&ctx)), nores, "third PD");
    drop(pd2);
    let pd2 = ProtectionDomain::new(&ctx).expect("a freed PD is given back");

    // CQs.
    let cqs: Vec<_> = (0..3)
        .map(|_| CompletionQueue::new(&ctx, 4).unwrap())
        .collect();
    assert_eq!(refused(CompletionQueue::new(&ctx, 4)), nores, "fourth CQ");

    // QPs: max-qp=2, so the third CREATE_QP is refused.
    let qp1 = new_qp(&pd, &cqs[0], QpType::Rc).unwrap();
    let qp2 = new_qp(&pd2, &cqs[1], QpType::Ud).unwrap();
    assert_eq!(refused(new_qp(&pd, &cqs[2], QpType::Rc)), nores, "third QP");
    assert_eq!(refused(new_qp(&pd2, &cqs[0], QpType::Ud)), nores);
    drop(qp1);
    let qp3 = new_qp(&pd, &cqs[2], QpType::Rc).expect("a destroyed QP's slot is given back");
    assert_eq!(refused(new_qp(&pd, &cqs[2], QpType::Rc)), nores);

    // MRs.
    let buf = ctx.alloc(1 << 16).unwrap();
    let mr1 = MemoryRegion::register(&pd, &buf, AccessFlags::LOCAL_WRITE).unwrap();
    let mr2 = MemoryRegion::register(&pd2, &buf, AccessFlags::LOCAL_WRITE).unwrap();
    assert_eq!(
        refused(MemoryRegion::register(&pd, &buf, AccessFlags::LOCAL_WRITE)),
        nores,
        "third MR"
    );
    drop(mr1);
    let mr3 = MemoryRegion::register(&pd, &buf, AccessFlags::LOCAL_WRITE).unwrap();

    // AHs.
    let attr = AddressHandle::attr_for(ctx.gid());
    let ah1 = AddressHandle::new(&pd, &attr).unwrap();
    let ah2 = AddressHandle::new(&pd2, &attr).unwrap();
    assert_eq!(refused(AddressHandle::new(&pd, &attr)), nores, "third AH");
    drop(ah1);
    let ah3 = AddressHandle::new(&pd, &attr).unwrap();

    // Quotas are per VM: b, with the defaults, is unaffected by a being full.
    let b = d.open("b");
    let bpd = ProtectionDomain::new(&b).unwrap();
    let _more: Vec<_> = (0..3).map(|_| ProtectionDomain::new(&b).unwrap()).collect();
    let bcq = CompletionQueue::new(&b, 4).unwrap();
    let _bqps: Vec<_> = (0..3)
        .map(|_| new_qp(&bpd, &bcq, QpType::Rc).unwrap())
        .collect();

    // A refused creation had no side effect: once every object is gone, every PD and CQ can
    // be freed (no leaked user count) and all the quota is back.
    drop((qp2, qp3, mr2, mr3, ah2, ah3, cqs, pd, pd2));
    let pds: Vec<_> = (0..2)
        .map(|_| ProtectionDomain::new(&ctx).unwrap())
        .collect();
    let cqs: Vec<_> = (0..3)
        .map(|_| CompletionQueue::new(&ctx, 4).unwrap())
        .collect();
    let _qps: Vec<_> = (0..2)
        .map(|i| new_qp(&pds[i], &cqs[i], QpType::Rc).unwrap())
        .collect();
}

#[test]
fn registered_bytes_budget_is_enforced_and_given_back() {
    let d = TestDaemon::start(&[("a", "max-mr-bytes=1M")]);
    let ctx = d.open("a");
    let caps = ctx.device_attr();
    assert_eq!(caps.max_registered_bytes.get(), 1 << 20);
    assert_eq!(caps.max_mr_size.get(), 1 << 20);
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let buf = ctx.alloc(2 << 20).unwrap();
    let reg =
        |len: u64| MemoryRegion::register_range(&pd, buf.addr(), len, AccessFlags::LOCAL_WRITE);
    let nores = (Status::NoResources, 0);

    let big = reg(768 << 10).unwrap();
    assert_eq!(refused(reg(512 << 10)), nores, "768K + 512K is over 1M");
    let quarter = reg(256 << 10).expect("768K + 256K is exactly 1M");
    assert_eq!(refused(reg(1)), nores, "not one byte more");
    drop(big);
    let half = reg(512 << 10).expect("deregistering gives the bytes back");
    let rest = reg(256 << 10).unwrap();
    assert_eq!(refused(reg(1)), nores);
    drop((quarter, half, rest));
    let whole = reg(1 << 20).expect("the whole budget, once everything is deregistered");
    drop(whole);
    // One MR larger than max_mr_size is an invalid argument, not a quota matter.
    assert_eq!(refused(reg((1 << 20) + 1)), (Status::InvalidArgument, 0));
    let _whole = reg(1 << 20).expect("the refusal consumed nothing");
}

// ---------------------------------------------------------------------------------------------
// The QP state machine.
// ---------------------------------------------------------------------------------------------

#[test]
fn modify_qp_follows_the_state_machine_and_names_the_attributes_at_fault() {
    let d = TestDaemon::start(&[("a", "")]);
    let g = Guest::connect(&d, "a");
    let caps = g.ctx.device_attr();
    let pd = ProtectionDomain::new(&g.ctx).unwrap();
    let cq = CompletionQueue::new(&g.ctx, 16).unwrap();
    let qp = new_qp(&pd, &cq, QpType::Rc).unwrap();
    let state = || qp.query().unwrap().0.qp_state;
    let invalid = |bits: QpAttrMask| (Status::InvalidState, bits.bits());
    use QpAttrMask as M;
    let init_mask = M::STATE | M::PKEY_INDEX | M::PORT | M::ACCESS_FLAGS;
    let init = QpAttr {
        qp_state: QpState::Init,
        qp_access_flags: AccessFlags::LOCAL_WRITE,
        ..QpAttr::default()
    };

    // RESET -> RTR is not a transition.
    let rtr = QpAttr {
        qp_state: QpState::Rtr,
        ..QpAttr::default()
    };
    assert_eq!(refused(qp.modify(&rtr, M::STATE)), invalid(M::STATE));
    assert_eq!(
        refused(qp.modify(
            &QpAttr {
                qp_state: QpState::Err,
                ..init
            },
            M::STATE
        )),
        invalid(M::STATE),
        "RESET cannot be forced into ERR"
    );
    // RESET -> INIT on RC needs ACCESS_FLAGS (and PKEY_INDEX and PORT).
    assert_eq!(
        refused(qp.modify(&init, M::STATE | M::PKEY_INDEX | M::PORT)),
        invalid(M::ACCESS_FLAGS)
    );
    assert_eq!(
        refused(qp.modify(&init, M::STATE)),
        invalid(M::PKEY_INDEX | M::PORT | M::ACCESS_FLAGS)
    );
    // SQ_PSN is not allowed in RESET -> INIT.
    assert_eq!(
        refused(qp.modify(&init, init_mask | M::SQ_PSN)),
        invalid(M::SQ_PSN)
    );
    // CAP is never supported, and is answered before the state machine is asked (the
    // transitions below would be legal, or illegal, without it).
    assert_eq!(
        refused(qp.modify(&init, init_mask | M::CAP)),
        (Status::NotSupported, M::CAP.bits())
    );
    assert_eq!(
        refused(qp.modify(&rtr, M::STATE | M::CAP)),
        (Status::NotSupported, M::CAP.bits())
    );
    assert_eq!(
        refused(qp.modify(&init, M::CAP)),
        (Status::NotSupported, M::CAP.bits())
    );
    assert_eq!(state(), QpState::Reset, "no refusal moved the QP");
    // A modification without STATE is RESET -> RESET, which takes no attributes.
    assert_eq!(
        refused(qp.modify(&init, M::ACCESS_FLAGS)),
        invalid(M::ACCESS_FLAGS)
    );
    qp.modify(&init, M::empty())
        .expect("an empty mask is RESET -> RESET");

    qp.modify(&init, init_mask).expect("RESET -> INIT");
    assert_eq!(state(), QpState::Init);

    // INIT -> RTR: values beyond the device's limits.
    let peer = Gid::from_ipv4([10, 0, 0, 99]);
    let rtr = QpAttr {
        qp_state: QpState::Rtr,
        dest_qp_num: 0x42,
        max_dest_rd_atomic: 1,
        ah_attr: AddressHandle::attr_for(peer),
        ..QpAttr::default()
    };
    let rtr_mask = M::STATE
        | M::AV
        | M::PATH_MTU
        | M::DEST_QPN
        | M::RQ_PSN
        | M::MAX_DEST_RD_ATOMIC
        | M::MIN_RNR_TIMER;
    assert_eq!(
        refused(qp.modify(&rtr, rtr_mask - M::MIN_RNR_TIMER - M::AV)),
        invalid(M::MIN_RNR_TIMER | M::AV)
    );
    let too_deep = caps.max_qp_rd_atom.get() as u8 + 1;
    assert_eq!(
        refused(qp.modify(
            &QpAttr {
                max_dest_rd_atomic: too_deep,
                ..rtr
            },
            rtr_mask
        )),
        (Status::InvalidArgument, M::MAX_DEST_RD_ATOMIC.bits())
    );
    let mut other_sgid = rtr;
    other_sgid.ah_attr.sgid_index = 1;
    assert_eq!(
        refused(qp.modify(&other_sgid, rtr_mask)),
        (Status::InvalidArgument, M::AV.bits()),
        "sgid_index past the GID table"
    );
    assert_eq!(state(), QpState::Init);
    qp.modify(&rtr, rtr_mask).expect("INIT -> RTR");

    // RTR -> RTS: max_rd_atomic above the device's cap.
    let rts = QpAttr {
        qp_state: QpState::Rts,
        ..QpAttr::default()
    };
    let rts_mask =
        M::STATE | M::TIMEOUT | M::RETRY_CNT | M::RNR_RETRY | M::SQ_PSN | M::MAX_QP_RD_ATOMIC;
    let too_many = caps.max_qp_init_rd_atom.get() as u8 + 1;
    assert_eq!(
        refused(qp.modify(
            &QpAttr {
                max_rd_atomic: too_many,
                ..rts
            },
            rts_mask
        )),
        (Status::InvalidArgument, M::MAX_QP_RD_ATOMIC.bits())
    );
    // CUR_STATE must be the real state.
    assert_eq!(
        refused(qp.modify(
            &QpAttr {
                cur_qp_state: QpState::Init,
                ..rts
            },
            rts_mask | M::CUR_STATE
        )),
        invalid(M::CUR_STATE)
    );
    // path_mig_state other than MIGRATED: vrdma has no alternate path.
    let mut raw_rts = qp::Attr {
        qp_state: QpState::Rts.raw(),
        timeout: 14,
        retry_cnt: 7,
        rnr_retry: 7,
        max_rd_atomic: 1,
        path_mig_state: qp::MigState::Rearm.raw(),
        ..qp::Attr::default()
    };
    assert_eq!(
        g.modify_qp(qp.qp_num(), (rts_mask | M::PATH_MIG_STATE).bits(), &raw_rts),
        Err((Status::InvalidArgument, M::PATH_MIG_STATE.bits()))
    );
    // Values the protocol does not define are malformed whatever the state machine says.
    raw_rts.path_mig_state = 3;
    assert_eq!(
        g.modify_qp(qp.qp_num(), (rts_mask | M::PATH_MIG_STATE).bits(), &raw_rts),
        Err((Status::Malformed, 0))
    );
    raw_rts.path_mig_state = 0;
    raw_rts.qp_state = 7;
    assert_eq!(
        g.modify_qp(qp.qp_num(), rts_mask.bits(), &raw_rts),
        Err((Status::Malformed, 0)),
        "no state 7"
    );
    raw_rts.qp_state = QpState::Rts.raw();
    assert_eq!(
        g.modify_qp(qp.qp_num(), rts_mask.bits() | 1 << 21, &raw_rts),
        Err((Status::Malformed, 0)),
        "mask bit 21 is undefined"
    );
    raw_rts.reserved1 = [0, 1, 0];
    assert_eq!(
        g.modify_qp(qp.qp_num(), rts_mask.bits(), &raw_rts),
        Err((Status::Malformed, 0)),
        "reserved bytes count whatever the mask"
    );
    assert_eq!(state(), QpState::Rtr, "nothing above moved the QP");
    assert_eq!(
        qp.query().unwrap().0.max_rd_atomic,
        0,
        "nor set an attribute"
    );

    qp.modify(
        &QpAttr {
            cur_qp_state: QpState::Rtr,
            ..rts
        },
        rts_mask | M::CUR_STATE,
    )
    .expect("RTR -> RTS with the right CUR_STATE");
    assert_eq!(state(), QpState::Rts);
    // RTS -> INIT does not exist; ERR -> RTS neither.
    assert_eq!(refused(qp.modify(&init, M::STATE)), invalid(M::STATE));
    qp.modify(
        &QpAttr {
            qp_state: QpState::Err,
            ..rts
        },
        M::STATE,
    )
    .unwrap();
    assert_eq!(refused(qp.modify(&rts, M::STATE)), invalid(M::STATE));
    assert_eq!(state(), QpState::Err);

    // UD: RESET -> INIT needs QKEY instead of ACCESS_FLAGS.
    let ud = new_qp(&pd, &cq, QpType::Ud).unwrap();
    assert_eq!(
        refused(ud.modify(&init, init_mask)),
        invalid(M::QKEY),
        "UD needs QKEY"
    );
    assert_eq!(
        refused(ud.modify(&init, init_mask | M::QKEY)),
        invalid(M::ACCESS_FLAGS),
        "and does not take ACCESS_FLAGS"
    );

    // A destroyed QP's number answers InvalidHandle, whatever the mask.
    let qpn = ud.qp_num();
    drop(ud);
    assert_eq!(
        g.modify_qp(qpn, M::STATE.bits(), &to_state(QpState::Init)),
        Err((Status::InvalidHandle, 0))
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed chains.
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_control_messages_are_refused_without_side_effects() {
    let d = TestDaemon::start(&[("a", "max-pd=1"), ("b", "")]);
    let g = Guest::connect(&d, "a");
    let alloc_pd = request(Opcode::AllocPd.raw(), 0, 0, &[]);

    // A response buffer smaller than a RespHeader: nothing written, nothing executed.
    let (n, _) = g.raw(&alloc_pd, 7);
    assert_eq!(n, 0, "no room for a response header");
    let (n, _) = g.raw(&alloc_pd, 1);
    assert_eq!(n, 0);
    let (n, _) = g.raw(&alloc_pd, 0);
    assert_eq!(n, 0, "no writable descriptor at all");
    let mut failures = 3u64;
    let mut expect = |req: &[u8], resp_len: usize, want: Status, what: &str| {
        let (n, resp) = g.raw(req, resp_len);
        assert_eq!(
            Guest::outcome(n, &resp, 0).map(drop),
            Err((want, 0)),
            "{what}"
        );
        failures += 1;
    };
    // Room for the header but not for the body: Malformed, nothing executed.
    expect(
        &alloc_pd,
        8,
        Status::Malformed,
        "ALLOC_PD with 8 bytes of room",
    );
    expect(
        &alloc_pd,
        15,
        Status::Malformed,
        "ALLOC_PD with 15 bytes of room",
    );
    let query_device = request(Opcode::QueryDevice.raw(), 0, 0, &[]);
    expect(
        &query_device,
        8,
        Status::Malformed,
        "QUERY_DEVICE with 8 bytes",
    );
    expect(
        &query_device,
        111,
        Status::Malformed,
        "QUERY_DEVICE with 111 bytes",
    );

    // Truncated headers.
    expect(&alloc_pd[..4], 64, Status::Malformed, "4-byte header");
    expect(&alloc_pd[..7], 64, Status::Malformed, "7-byte header");
    expect(&[0x10], 64, Status::Malformed, "1-byte header");

    // Unknown opcodes, with and without a body.
    for op in [0x00u16, 0x04, 0x12, 0x45, 0x52, 0x65, 0xffff] {
        expect(
            &request(op, 0, 0, &[]),
            64,
            Status::UnknownOpcode,
            &format!("opcode {op:#x}"),
        );
    }
    expect(
        &request(0x99, 0, 0, &[1, 2, 3]),
        64,
        Status::UnknownOpcode,
        "unknown opcode with a body",
    );
    // Reserved header bits.
    expect(
        &request(Opcode::AllocPd.raw(), 1, 0, &[]),
        64,
        Status::Malformed,
        "flags = 1",
    );
    expect(
        &request(Opcode::AllocPd.raw(), 0x8000, 0, &[]),
        64,
        Status::Malformed,
        "flags = 0x8000",
    );
    expect(
        &request(Opcode::AllocPd.raw(), 0, 1 << 24, &[]),
        64,
        Status::Malformed,
        "reserved",
    );
    expect(
        &request(Opcode::QueryDevice.raw(), 0, 1, &[]),
        256,
        Status::Malformed,
        "reserved on QUERY_DEVICE",
    );

    // Bodies of the wrong size.
    expect(
        &request(Opcode::AllocPd.raw(), 0, 0, &[0]),
        64,
        Status::Malformed,
        "ALLOC_PD with a trailing byte",
    );
    expect(
        &request(Opcode::QueryDevice.raw(), 0, 0, &[0; 8]),
        256,
        Status::Malformed,
        "QUERY_DEVICE with a body",
    );
    expect(
        &request(Opcode::QueryPort.raw(), 0, 0, &[1, 0, 0, 0, 0, 0, 0]),
        64,
        Status::Malformed,
        "QUERY_PORT body one byte short",
    );
    expect(
        &request(Opcode::QueryPort.raw(), 0, 0, &[1, 0, 0, 0, 0, 0, 0, 0, 0]),
        64,
        Status::Malformed,
        "QUERY_PORT with a trailing byte",
    );
    expect(
        &request(Opcode::QueryPort.raw(), 0, 0, &[1, 0, 0, 0, 0, 0, 1, 0]),
        64,
        Status::Malformed,
        "QUERY_PORT reserved",
    );
    expect(
        &request(Opcode::DeallocPd.raw(), 0, 0, &[1, 0, 0, 0]),
        64,
        Status::Malformed,
        "DEALLOC_PD body short",
    );
    let mut long_handle = handle(1);
    long_handle.push(0);
    expect(
        &request(Opcode::DestroyQp.raw(), 0, 0, &long_handle),
        64,
        Status::Malformed,
        "DESTROY_QP with a trailing byte",
    );
    let bad_reserved = cmd::Handle {
        handle: 1.into(),
        reserved: 1.into(),
    };
    expect(
        &request(Opcode::DeregMr.raw(), 0, 0, bad_reserved.as_bytes()),
        64,
        Status::Malformed,
        "handle reserved",
    );
    expect(
        &request(Opcode::CreateQp.raw(), 0, 0, &[0; 55]),
        64,
        Status::Malformed,
        "CREATE_QP body short",
    );
    expect(
        &request(Opcode::ModifyQp.raw(), 0, 0, &[0; 81]),
        64,
        Status::Malformed,
        "MODIFY_QP body long",
    );

    // REG_MR page lists that do not match npages (the PD need not exist: decoding is first).
    let page = g.ring_buf(3 * 4096);
    let pages = [page.addr(), page.addr() + 4096, page.addr() + 8192];
    let lied = reg_mr_body(1, AccessFlags::LOCAL_WRITE, 8192, 0, 3, 12);
    expect(
        &request(Opcode::RegMr.raw(), 0, 0, &reg_mr_bytes(&lied, &pages)),
        64,
        Status::Malformed,
        "npages 3 for two pages' worth",
    );
    let two = reg_mr_body(1, AccessFlags::LOCAL_WRITE, 8192, 0, 2, 12);
    expect(
        &request(Opcode::RegMr.raw(), 0, 0, &reg_mr_bytes(&two, &pages[..1])),
        64,
        Status::Malformed,
        "a page list shorter than npages",
    );
    expect(
        &request(Opcode::RegMr.raw(), 0, 0, &reg_mr_bytes(&two, &pages)),
        64,
        Status::Malformed,
        "a page list longer than npages",
    );
    let mut two_and_a_bit = reg_mr_bytes(&two, &pages[..2]);
    two_and_a_bit.push(0);
    expect(
        &request(Opcode::RegMr.raw(), 0, 0, &two_and_a_bit),
        64,
        Status::Malformed,
        "a page list with a stray byte",
    );
    expect(
        &request(
            Opcode::RegMr.raw(),
            0,
            0,
            &reg_mr_bytes(&two, &[pages[0] + 8, pages[1]]),
        ),
        64,
        Status::Malformed,
        "a misaligned page",
    );
    let remote_without_local = reg_mr_body(1, AccessFlags::REMOTE_WRITE, 4096, 0, 1, 12);
    expect(
        &request(
            Opcode::RegMr.raw(),
            0,
            0,
            &reg_mr_bytes(&remote_without_local, &pages[..1]),
        ),
        64,
        Status::Malformed,
        "remote write without local write",
    );
    expect(
        &request(Opcode::RegMr.raw(), 0, 0, &[0; 39]),
        64,
        Status::Malformed,
        "REG_MR body short",
    );
    // A device-readable part longer than any command is refused without being copied.
    let mut huge = reg_mr_bytes(&two, &pages[..2]);
    huge.resize(8 + 40 + 8 * cmd::MAX_PAGE_LIST as usize + 1 - 8, 0);
    expect(
        &request(Opcode::RegMr.raw(), 0, 0, &huge),
        64,
        Status::Malformed,
        "longer than the longest REG_MR",
    );

    // Every refusal was counted, none executed: the one PD a may have is still free.
    assert_eq!(commands_failed(&d, "a"), failures);
    let pdn = g
        .alloc_pd()
        .expect("max-pd=1 and no PD was allocated by the garbage");
    assert_eq!(
        g.alloc_pd(),
        Err((Status::NoResources, 0)),
        "max-pd=1 holds"
    );
    g.dealloc_pd(pdn).unwrap();

    // The device still answers properly, and the daemon still serves another VM.
    let caps: config::DeviceCaps = g.call_as(Opcode::QueryDevice, &[]).unwrap();
    assert_eq!(caps.as_bytes(), g.config().caps.as_bytes());
    let (n, resp) = g.raw(&query_device, 4096);
    assert_eq!(
        n,
        8 + 104,
        "a larger buffer than needed is fine; the used length is exact"
    );
    assert_eq!(&resp[8..n], g.config().caps.as_bytes());
    let b = d.open("b");
    let bpd = ProtectionDomain::new(&b).expect("b is served");
    let _bcq = CompletionQueue::new(&b, 4).unwrap();
    drop(bpd);
}

// ---------------------------------------------------------------------------------------------
// Guest addresses.
// ---------------------------------------------------------------------------------------------

#[test]
fn guest_addresses_outside_the_vms_memory_are_bad_addresses() {
    let d = TestDaemon::start(&[("a", "max-qp=1,max-mr=1,max-cq=1,max-mr-bytes=1M")]);
    let g = Guest::connect(&d, "a");
    let bad = (Status::BadAddress, 0);
    let nowhere = 0x1000u64; // page-aligned, and never part of the process's shared memory
    let region = g.dev.regions().into_iter().next().expect("a memory region");
    let end = region.addr() + region.len() as u64;
    for addr in [nowhere, end] {
        assert!(
            !Transport::is_shared(&*g.dev, addr, 1),
            "{addr:#x} must not be guest memory for this test"
        );
    }

    // CREATE_CQ.
    assert_eq!(g.create_cq(4, nowhere), Err(bad));
    assert_eq!(
        g.create_cq(1, end - 64),
        Err(bad),
        "a ring running past the end of its memory slot"
    );
    assert_eq!(g.create_cq(1, end), Err(bad), "a ring just past the end");
    let cq_ring = g.cq_ring(4);
    let cqn = g
        .create_cq(4, cq_ring.addr())
        .expect("max-cq=1 was not used up");

    // CREATE_QP.
    let pd = g.alloc_pd().unwrap();
    let (sq, rq) = g.qp_rings();
    assert_eq!(g.create_qp_at(pd, cqn, cqn, nowhere, rq.addr()), Err(bad));
    assert_eq!(g.create_qp_at(pd, cqn, cqn, sq.addr(), nowhere), Err(bad));
    assert_eq!(g.create_qp_at(pd, cqn, cqn, sq.addr(), end - 64), Err(bad));
    let qpn = g
        .create_qp_at(pd, cqn, cqn, sq.addr(), rq.addr())
        .expect("max-qp=1 was not used up");
    g.destroy_qp(qpn).unwrap();
    // The refused QPs took no reference on the CQ or PD.
    g.destroy_cq(cqn).expect("the CQ has no users");

    // REG_MR with a page outside guest memory, alone or after a good one.
    let buf = g.ring_buf(8192);
    let one = reg_mr_body(pd, AccessFlags::LOCAL_WRITE, 4096, 0, 1, 12);
    let reg = |body: &cmd::RegMr, pages: &[u64]| {
        g.call_as::<cmd::RegMrResp>(Opcode::RegMr, &reg_mr_bytes(body, pages))
    };
    assert_eq!(reg(&one, &[nowhere]).map(drop), Err(bad));
    assert_eq!(
        reg(&one, &[end]).map(drop),
        Err(bad),
        "the page after the slot"
    );
    let two = reg_mr_body(pd, AccessFlags::LOCAL_WRITE, 8192, 0, 2, 12);
    assert_eq!(reg(&two, &[buf.addr(), nowhere]).map(drop), Err(bad));
    assert_eq!(reg(&two, &[nowhere, buf.addr()]).map(drop), Err(bad));
    // A large page that starts inside the slot but runs past its end.
    let crossing = (13u8..=30).find_map(|shift| {
        let size = 1u64 << shift;
        let start = (end - 1) & !(size - 1);
        (start >= region.addr() && start + size > end).then_some((shift, start))
    });
    if let Some((shift, start)) = crossing {
        let body = reg_mr_body(pd, AccessFlags::LOCAL_WRITE, 4096, 0, 1, shift);
        assert_eq!(
            reg(&body, &[start]).map(drop),
            Err(bad),
            "2^{shift}-byte page at {start:#x}"
        );
    }
    // None of the refusals used up the one MR or any of the 1M budget.
    let whole = g.ring_buf(1 << 20);
    let (lkey, _) = g
        .reg_mr(pd, whole.addr(), 1 << 20, AccessFlags::LOCAL_WRITE)
        .expect("max-mr=1 and 1M are all still available");
    g.dereg_mr(lkey).unwrap();
    g.dealloc_pd(pd).expect("and the PD has no users");
}

// ---------------------------------------------------------------------------------------------
// Reconnection.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_reconnected_guest_starts_from_an_empty_device() {
    let d = TestDaemon::start(&[(
        "a",
        "max-pd=1,max-qp=1,max-cq=1,max-mr=1,max-ah=1,max-mr-bytes=64K",
    )]);
    let g = Guest::connect(&d, "a");
    d.wait_connected("a", true);
    let first_port = d.vm("a").unwrap().id;
    // Fill every quota with objects made by raw commands, which nothing destroys: the guest
    // just goes away with them.
    let (h, bufs) = create_all(&g);
    assert_eq!(g.alloc_pd(), Err((Status::NoResources, 0)));
    let qp_state = qp::Attr {
        qp_state: QpState::Init.raw(),
        port_num: 1,
        qp_access_flags: AccessFlags::LOCAL_WRITE.bits().into(),
        ..qp::Attr::default()
    };
    g.modify_qp(h.qp, (QpAttrMask::RC_INIT).bits(), &qp_state)
        .unwrap();
    drop(bufs);
    drop(g);
    d.wait_connected("a", false);

    // A plain verbs guest gets the whole quota again.
    let ctx = d.open("a");
    d.wait_connected("a", true);
    assert_ne!(
        d.vm("a").unwrap().id,
        first_port,
        "a new connection, a new device"
    );
    {
        let pd = ProtectionDomain::new(&ctx).expect("max-pd=1 is free again");
        let cq = CompletionQueue::new(&ctx, 4).expect("max-cq=1 is free again");
        let qp = new_qp(&pd, &cq, QpType::Rc).expect("max-qp=1 is free again");
        assert_eq!(
            qp.query().unwrap().0.qp_state,
            QpState::Reset,
            "a new QP, in RESET"
        );
        let buf = ctx.alloc(64 << 10).unwrap();
        let _mr = MemoryRegion::register(&pd, &buf, AccessFlags::LOCAL_WRITE)
            .expect("max-mr=1 and the 64K budget are free again");
        let _ah = AddressHandle::new(&pd, &AddressHandle::attr_for(ctx.gid()))
            .expect("max-ah=1 is free again");
    }
    drop(ctx);
    d.wait_connected("a", false);

    // A raw guest: the old connection's handles name nothing in the new one. (The VM's
    // counters run on across connections: count this connection's refusals from here.)
    let g = Guest::connect(&d, "a");
    let failed_before = commands_failed(&d, "a");
    let page = g.ring_buf(4096);
    let results = use_handles(&g, h, None, page.addr());
    assert_all_invalid("old connection's handles", &results);
    // New objects may well get the same numbers (the namespace starts afresh), but they are
    // new objects: the QP the old guest moved to INIT is a fresh one in RESET.
    let (h2, _bufs) = create_all(&g);
    assert_eq!(
        g.query_qp(h2.qp).unwrap().attr.qp_state,
        QpState::Reset.raw()
    );
    destroy_all(&g, h2);
    assert_eq!(
        commands_failed(&d, "a") - failed_before,
        results.len() as u64
    );
}

#[test]
fn malformed_ah_and_modify_values_are_refused_before_handles() {
    let d = TestDaemon::start(&[("a", "")]);
    let g = Guest::connect(&d, "a");
    let pd = g.alloc_pd().unwrap();
    let good = AddressHandle::attr_for(Gid::from_ipv4([10, 0, 0, 7]));
    let mut no_grh = good;
    no_grh.is_global = 0;
    assert_eq!(g.create_ah(pd, no_grh), Err((Status::Malformed, 0)));
    assert_eq!(
        g.create_ah(0, no_grh),
        Err((Status::Malformed, 0)),
        "decoding comes before the handle"
    );
    let mut zero_gid = good;
    zero_gid.dgid = Gid::default();
    assert_eq!(g.create_ah(pd, zero_gid), Err((Status::Malformed, 0)));
    let mut sgid = good;
    sgid.sgid_index = 1;
    assert_eq!(g.create_ah(pd, sgid), Err((Status::InvalidArgument, 0)));
    assert_eq!(g.create_ah(0, good), Err((Status::InvalidHandle, 0)));
    let ah = g.create_ah(pd, good).unwrap();
    g.destroy_ah(ah).unwrap();
    assert_eq!(
        g.modify_qp(0, 1 << 25, &to_state(QpState::Init)),
        Err((Status::Malformed, 0)),
        "an undefined mask bit is malformed even for a QP that does not exist"
    );
    g.dealloc_pd(pd).unwrap();
}
