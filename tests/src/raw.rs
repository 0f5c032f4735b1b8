//! A driver that speaks the device's protocol itself instead of through the `vrdma` library:
//! raw control commands, rings it lays out and doorbells it rings. The hostile-driver tests
//! use it to send what the library never would; the registration tests use it for page lists
//! the library would not choose (it always picks the largest page size a buffer allows).

use std::path::Path;
use std::sync::Arc;

use vrdma::Context;
use vrdma::mem::DmaBuf;
use vrdma::transport::{Options, Transport, VirtioUser};
use vrdma_proto::cmd::{self, Opcode, RespHeader, Status};
use vrdma_proto::doorbell::{self, Doorbell};
use vrdma_proto::{cqe, mr, qp, ring, wqe};
use zerocopy::{FromBytes, IntoBytes};

use crate::read;

/// A guest driving its device with raw commands over its own virtio-user connection.
#[derive(Debug)]
pub struct Raw {
    /// The connection, shared with any library [`Context`] made by [`Raw::context`].
    pub v: Arc<VirtioUser>,
}

impl Raw {
    /// Connects to the VM behind `socket` as its guest.
    pub fn connect(socket: impl AsRef<Path>, options: Options) -> Raw {
        Raw {
            v: Arc::new(VirtioUser::connect(socket, options).expect("connect")),
        }
    }

    /// The `vrdma` library over the same connection, for the objects a test makes the
    /// ordinary way on the device it also drives by hand.
    pub fn context(&self) -> Context {
        Context::from_transport(self.v.clone())
    }

    /// Sends command `op` with `body`; the device's status and response body.
    pub fn command(&self, op: Opcode, body: &[u8]) -> (Status, Vec<u8>) {
        let mut req = cmd::header(op).as_bytes().to_vec();
        req.extend_from_slice(body);
        let mut resp = vec![0u8; 8 + op.response_len()];
        let n = self.v.control(&req, &mut resp).expect("control");
        let (_, status) = RespHeader::decode(&resp[..n]).expect("response header");
        (status, resp[8..n].to_vec())
    }

    /// Sends command `op`, failing the test unless the device answers OK; the response body.
    pub fn ok(&self, op: Opcode, body: &[u8]) -> Vec<u8> {
        let (status, resp) = self.command(op, body);
        assert_eq!(status, Status::Ok, "{op:?}");
        resp
    }

    /// Memory for a ring of `depth` entries of `stride` bytes.
    pub fn ring(&self, depth: u32, stride: u32) -> DmaBuf {
        let g = ring::Geometry::new(depth, stride).unwrap();
        self.v
            .dma()
            .alloc_aligned(g.byte_len() as usize, 64)
            .expect("ring memory")
    }

    /// A new PD.
    pub fn alloc_pd(&self) -> u32 {
        cmd::Handle::read_from_bytes(&self.ok(Opcode::AllocPd, &[]))
            .unwrap()
            .handle
            .get()
    }

    /// A PD, a 16-entry CQ and an RC QP of depth 4 in RTS towards a GID nobody has:
    /// (QPN, send ring, CQ ring).
    pub fn qp(&self) -> (u32, DmaBuf, DmaBuf) {
        let pdn = self.alloc_pd();
        let cq_ring = self.ring(16, cqe::SIZE);
        let cq = cmd::CreateCq {
            cqe: 16.into(),
            reserved: 0.into(),
            ring_addr: cq_ring.addr().into(),
        };
        let cqn = cmd::CreateCqResp::read_from_bytes(&self.ok(Opcode::CreateCq, cq.as_bytes()))
            .unwrap()
            .cqn;
        let sq_ring = self.ring(4, wqe::send_stride(1, 0));
        let rq_ring = self.ring(4, wqe::recv_stride(1));
        let create = cmd::CreateQp {
            pdn: pdn.into(),
            qp_type: qp::Type::Rc.raw(),
            sq_sig_all: 1,
            reserved: 0.into(),
            send_cqn: cqn,
            recv_cqn: cqn,
            cap: qp::Caps {
                max_send_wr: 4.into(),
                max_recv_wr: 4.into(),
                max_send_sge: 1.into(),
                max_recv_sge: 1.into(),
                max_inline_data: 0.into(),
                reserved: 0.into(),
            },
            sq_ring_addr: sq_ring.addr().into(),
            rq_ring_addr: rq_ring.addr().into(),
            srqn: 0.into(),
            reserved1: 0.into(),
        };
        let qpn = cmd::CreateQpResp::read_from_bytes(&self.ok(Opcode::CreateQp, create.as_bytes()))
            .unwrap()
            .qpn
            .get();
        let steps: [(qp::State, qp::AttrMask); 3] = [
            (
                qp::State::Init,
                qp::AttrMask::PKEY_INDEX | qp::AttrMask::PORT | qp::AttrMask::ACCESS_FLAGS,
            ),
            (
                qp::State::Rtr,
                qp::AttrMask::AV
                    | qp::AttrMask::PATH_MTU
                    | qp::AttrMask::DEST_QPN
                    | qp::AttrMask::RQ_PSN
                    | qp::AttrMask::MAX_DEST_RD_ATOMIC
                    | qp::AttrMask::MIN_RNR_TIMER,
            ),
            (
                qp::State::Rts,
                qp::AttrMask::TIMEOUT
                    | qp::AttrMask::RETRY_CNT
                    | qp::AttrMask::RNR_RETRY
                    | qp::AttrMask::SQ_PSN
                    | qp::AttrMask::MAX_QP_RD_ATOMIC,
            ),
        ];
        for (state, mask) in steps {
            let mut attr = qp::Attr {
                qp_state: state.raw(),
                path_mtu: vrdma_proto::config::Mtu::Mtu1024.raw(),
                port_num: 1,
                max_rd_atomic: 1,
                max_dest_rd_atomic: 1,
                dest_qp_num: 2.into(),
                ..qp::Attr::default()
            };
            attr.ah_attr = qp::AhAttr {
                dgid: vrdma_proto::Gid::from_ipv4([10, 9, 9, 9]),
                is_global: 1,
                port_num: 1,
                ..qp::AhAttr::default()
            };
            let body = cmd::ModifyQp {
                qpn: qpn.into(),
                attr_mask: (mask | qp::AttrMask::STATE).bits().into(),
                attr,
            };
            self.ok(Opcode::ModifyQp, body.as_bytes());
        }
        (qpn, sq_ring, cq_ring)
    }

    /// QP `qpn`'s state as the device reports it.
    pub fn state(&self, qpn: u32) -> qp::State {
        let body = cmd::Handle {
            handle: qpn.into(),
            reserved: 0.into(),
        };
        let resp =
            cmd::QueryQpResp::read_from_bytes(&self.ok(Opcode::QueryQp, body.as_bytes())).unwrap();
        qp::State::from_raw(resp.attr.qp_state).unwrap()
    }

    /// Rings QP `qpn`'s send doorbell on doorbell queue 0.
    pub fn doorbell(&self, qpn: u32) {
        self.v
            .ring_doorbells(0, &[Doorbell::new(doorbell::Kind::Send, qpn)])
            .expect("doorbell");
    }

    /// Registers an MR as `body` (from [`reg_mr_body`]) says; its lkey. Fails the test if the
    /// device refuses.
    pub fn reg_mr(&self, body: &[u8]) -> u32 {
        let resp = cmd::RegMrResp::read_from_bytes(&self.ok(Opcode::RegMr, body)).unwrap();
        resp.lkey.get()
    }

    /// Deregisters the MR whose lkey is `lkey`.
    pub fn dereg_mr(&self, lkey: u32) {
        let body = cmd::Handle {
            handle: lkey.into(),
            reserved: 0.into(),
        };
        self.ok(Opcode::DeregMr, body.as_bytes());
    }
}

/// The body of a `REG_MR` of whole pages: `pages` of `1 << page_shift` bytes, the MR's iova
/// being the first page's address. Build it once to register the same pages many times.
pub fn reg_mr_body(pdn: u32, access: mr::Access, page_shift: u8, pages: &[u64]) -> Vec<u8> {
    let first = *pages.first().expect("at least one page");
    let head = cmd::RegMr {
        pdn: pdn.into(),
        access: access.bits().into(),
        iova: first.into(),
        length: ((pages.len() as u64) << page_shift).into(),
        first_page_offset: 0.into(),
        npages: u32::try_from(pages.len()).expect("page count").into(),
        page_shift,
        reserved: [0; 7],
    };
    let mut body = Vec::with_capacity(size_of::<cmd::RegMr>() + pages.len() * 8);
    body.extend_from_slice(head.as_bytes());
    for page in pages {
        body.extend_from_slice(&page.to_le_bytes());
    }
    body
}

/// Stores `value` as `ring`'s producer index, as a driver does after writing entries.
pub fn set_producer(ring: &DmaBuf, value: u32) {
    ring.write_at(ring::PRODUCER_OFFSET as usize, &value.to_le_bytes())
        .unwrap();
}

/// The little-endian word at `offset` of `ring` (a producer or consumer index).
pub fn word(ring: &DmaBuf, offset: u64) -> u32 {
    u32::from_le_bytes(read(ring, offset as usize, 4).try_into().unwrap())
}
