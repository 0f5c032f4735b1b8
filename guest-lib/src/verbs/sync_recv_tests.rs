//! Synchronous receives (`features::SYNC_RECV`): posting receives sends one `POST_RECV`
//! per call (one `POST_SRQ_RECV` for an SRQ) after the producer index is published, and none
//! when the bit was not negotiated; receives never ring a doorbell.
//!
//! The device is [`RecordingDevice`], a transport in this process: it answers the create
//! commands with handles, remembers where each receive ring is, and records every
//! `POST_RECV`/`POST_SRQ_RECV` with the producer index its ring held when the command came,
//! and every doorbell.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vrdma_proto::cmd::{self, Opcode, RespHeader, Status};
use vrdma_proto::config::Config;
use vrdma_proto::doorbell::Doorbell;
use vrdma_proto::{features, ring};
use zerocopy::{FromBytes, IntoBytes};

use crate::mem::{DmaAllocator, DmaBuf, SharedMemory};
use crate::transport::{DeviceEvent, Transport};
use crate::{
    CompletionQueue, Context, ProtectionDomain, QpCap, QpInitAttr, QpType, QueuePair, RecvWr,
    SharedReceiveQueue, SrqAttr,
};

const QPN: u32 = 0x12;
const SRQN: u32 = 0x34;

/// A command as the device saw it: its opcode, the handle it names, and the producer index
/// of that ring at the moment the command came.
type Posted = (Opcode, u32, u32);

#[derive(Debug)]
struct RecordingDevice {
    config: Config,
    features: u64,
    memory: Arc<SharedMemory>,
    allocator: DmaAllocator,
    /// Receive ring addresses by (opcode, handle) of the command that names them.
    rings: Mutex<HashMap<(Opcode, u32), u64>>,
    posted: Mutex<Vec<Posted>>,
    /// Doorbells of any kind, as (kind, handle).
    rung: Mutex<Vec<(u8, u32)>>,
    /// The status `POST_RECV` and `POST_SRQ_RECV` are answered with.
    post_status: Mutex<Status>,
}

impl RecordingDevice {
    fn new(features: u64) -> Arc<Self> {
        let mut config = Config {
            version: vrdma_proto::PROTOCOL_VERSION.into(),
            num_doorbell_queues: 1.into(),
            ..Config::default()
        };
        config.caps.max_qp_wr = 64.into();
        config.caps.max_sge = 4.into();
        config.caps.max_cqe = 64.into();
        config.srq.max_srq = 4.into();
        config.srq.max_srq_wr = 64.into();
        config.srq.max_srq_sge = 4.into();
        let memory = Arc::new(SharedMemory::new("vrdma-sync-recv-test", 1 << 20).unwrap());
        Arc::new(RecordingDevice {
            config,
            features: features::VERSION_1 | features,
            allocator: DmaAllocator::with_region(memory.clone()),
            memory,
            rings: Mutex::default(),
            posted: Mutex::default(),
            rung: Mutex::default(),
            post_status: Mutex::new(Status::Ok),
        })
    }

    fn posted(&self) -> Vec<Posted> {
        self.posted.lock().unwrap().clone()
    }

    fn rung(&self) -> Vec<(u8, u32)> {
        self.rung.lock().unwrap().clone()
    }

    /// Records a `POST_RECV` or `POST_SRQ_RECV` with the producer index of the ring it names.
    fn post(&self, opcode: Opcode, body: &[u8]) {
        let handle = cmd::Handle::read_from_bytes(body).unwrap().handle.get();
        let producer = match self.rings.lock().unwrap().get(&(opcode, handle)) {
            Some(&base) => {
                let mut index = [0u8; 4];
                self.memory
                    .read(base + ring::PRODUCER_OFFSET, &mut index)
                    .unwrap();
                u32::from_le_bytes(index)
            }
            None => 0,
        };
        self.posted.lock().unwrap().push((opcode, handle, producer));
    }

    /// The response body to `opcode`: the handles this test expects, a created object's
    /// sizes as asked for, zeros otherwise.
    fn answer(&self, opcode: Opcode, body: &[u8]) -> Vec<u8> {
        let mut answer = vec![0u8; opcode.response_len()];
        match opcode {
            Opcode::AllocPd | Opcode::CreateCq => answer[..4].copy_from_slice(&1u32.to_le_bytes()),
            Opcode::CreateQp => {
                let mut whole = [0u8; size_of::<cmd::CreateQp>()];
                whole[..body.len()].copy_from_slice(body);
                let create = cmd::CreateQp::read_from_bytes(&whole).unwrap();
                self.rings
                    .lock()
                    .unwrap()
                    .insert((Opcode::PostRecv, QPN), create.rq_ring_addr.get());
                let resp = cmd::CreateQpResp {
                    qpn: QPN.into(),
                    reserved: 0.into(),
                    cap: create.cap,
                };
                answer.copy_from_slice(resp.as_bytes());
            }
            Opcode::CreateSrq => {
                let create = cmd::CreateSrq::read_from_bytes(body).unwrap();
                self.rings
                    .lock()
                    .unwrap()
                    .insert((Opcode::PostSrqRecv, SRQN), create.ring_addr.get());
                let resp = cmd::CreateSrqResp {
                    srqn: SRQN.into(),
                    max_wr: create.max_wr,
                    max_sge: create.max_sge,
                    reserved: 0.into(),
                };
                answer.copy_from_slice(resp.as_bytes());
            }
            _ => {}
        }
        answer
    }
}

impl Transport for RecordingDevice {
    type Error = io::Error;

    fn config(&self) -> &Config {
        &self.config
    }

    fn read_config(&self) -> io::Result<Config> {
        Ok(self.config)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn num_doorbell_queues(&self) -> u16 {
        1
    }

    fn control(&self, request: &[u8], response: &mut [u8]) -> io::Result<usize> {
        let (header, body) = request.split_at(size_of::<cmd::Header>());
        let header = cmd::Header::read_from_bytes(header).unwrap();
        let opcode = Opcode::from_raw(header.opcode.get()).unwrap();
        if matches!(opcode, Opcode::PostRecv | Opcode::PostSrqRecv) {
            self.post(opcode, body);
            let status = *self.post_status.lock().unwrap();
            if status != Status::Ok {
                let answer = RespHeader::new(status, 0);
                response[..size_of::<RespHeader>()].copy_from_slice(answer.as_bytes());
                return Ok(size_of::<RespHeader>());
            }
        }
        let mut answer = RespHeader::new(Status::Ok, 0).as_bytes().to_vec();
        answer.extend(self.answer(opcode, body));
        response[..answer.len()].copy_from_slice(&answer);
        Ok(answer.len())
    }

    fn ring_doorbells(&self, _queue: u16, doorbells: &[Doorbell]) -> io::Result<()> {
        let mut rung = self.rung.lock().unwrap();
        rung.extend(doorbells.iter().map(|db| (db.kind, db.handle.get())));
        Ok(())
    }

    fn event_fd(&self) -> RawFd {
        -1
    }

    fn drain_events(&self) -> io::Result<Vec<DeviceEvent>> {
        Ok(Vec::new())
    }

    fn alloc_dma(&self, len: usize, align: usize) -> io::Result<DmaBuf> {
        self.allocator
            .alloc_aligned(len, align)
            .map_err(io::Error::other)
    }

    fn add_memory(&self, _mem: Arc<SharedMemory>) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    fn remove_memory(&self, _base: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    fn is_shared(&self, addr: u64, len: u64) -> bool {
        self.memory.contains(addr, len)
    }

    fn shared_region(&self, addr: u64) -> Option<(u64, u64)> {
        self.memory
            .contains(addr, 1)
            .then(|| (self.memory.addr(), self.memory.len() as u64))
    }

    fn device_addr(&self, addr: u64, len: u64) -> Option<u64> {
        self.is_shared(addr, len).then_some(addr)
    }
}

/// A QP with a receive queue of its own, and an SRQ, on a context over `device`.
fn objects(device: &Arc<RecordingDevice>) -> (QueuePair, SharedReceiveQueue) {
    let ctx = Context::from_transport(device.clone());
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let cq = CompletionQueue::new(&ctx, 16).unwrap();
    let qp = QueuePair::new(
        &pd,
        &QpInitAttr {
            send_cq: &cq,
            recv_cq: &cq,
            srq: None,
            cap: QpCap {
                max_send_wr: 4,
                max_recv_wr: 8,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: QpType::Rc,
            sq_sig_all: false,
        },
    )
    .unwrap();
    let srq = SharedReceiveQueue::new(
        &pd,
        &SrqAttr {
            max_wr: 8,
            max_sge: 1,
            srq_limit: 0,
        },
    )
    .unwrap();
    assert_eq!((qp.qp_num(), srq.srq_num()), (QPN, SRQN));
    (qp, srq)
}

/// `n` receives without buffers: nothing for the device to write, so nothing to keep alive.
fn receives(n: u64) -> Vec<RecvWr<'static>> {
    (0..n)
        .map(|wr_id| RecvWr {
            wr_id,
            sg_list: &[],
        })
        .collect()
}

#[test]
fn receives_send_no_command_unless_the_device_asked_for_them() {
    let device = RecordingDevice::new(features::SRQ);
    let (qp, srq) = objects(&device);
    // SAFETY: the receives name no memory.
    unsafe {
        qp.post_recv(&receives(3)).unwrap();
        qp.post_recv(&receives(1)).unwrap();
        srq.post_recv(&receives(2)).unwrap();
    }
    assert_eq!(device.posted(), []);
    assert_eq!(device.rung(), []);
}

#[test]
fn each_post_of_receives_sends_one_command_after_publishing_them() {
    let device = RecordingDevice::new(features::SRQ | features::SYNC_RECV);
    let (qp, srq) = objects(&device);
    // SAFETY: the receives name no memory.
    unsafe {
        qp.post_recv(&receives(3)).unwrap();
        qp.post_recv(&receives(1)).unwrap();
        srq.post_recv(&receives(2)).unwrap();
        // A call that posts nothing has nothing to announce.
        qp.post_recv(&[]).unwrap();
        srq.post_recv(&[]).unwrap();
    }
    // One command per call, each seeing every receive of its call already published.
    assert_eq!(
        device.posted(),
        [
            (Opcode::PostRecv, QPN, 3),
            (Opcode::PostRecv, QPN, 4),
            (Opcode::PostSrqRecv, SRQN, 2),
        ]
    );
    // The command replaces the doorbell: none is rung.
    assert_eq!(device.rung(), []);
}

#[test]
fn receives_posted_before_a_failing_one_are_announced() {
    let device = RecordingDevice::new(features::SRQ | features::SYNC_RECV);
    let (qp, _srq) = objects(&device);
    // The receive queue holds 8: the ninth fails, the eight before it are posted.
    // SAFETY: the receives name no memory.
    let full = unsafe { qp.post_recv(&receives(9)) };
    assert!(
        matches!(full, Err(crate::Error::QueueFull { .. })),
        "{full:?}"
    );
    // Nothing fits now: no receive published, no command.
    // SAFETY: as above.
    let still_full = unsafe { qp.post_recv(&receives(1)) };
    assert!(still_full.is_err());
    assert_eq!(device.posted(), [(Opcode::PostRecv, QPN, 8)]);
}

#[test]
fn a_refused_post_command_fails_the_post_with_its_errno() {
    let device = RecordingDevice::new(features::SRQ | features::SYNC_RECV);
    let (qp, srq) = objects(&device);
    *device.post_status.lock().unwrap() = Status::InvalidHandle;
    // SAFETY: the receives name no memory.
    let (refused, srq_refused) =
        unsafe { (qp.post_recv(&receives(1)), srq.post_recv(&receives(1))) };
    for (verb, result) in [
        ("ibv_post_recv", refused),
        ("ibv_post_srq_recv", srq_refused),
    ] {
        match result {
            Err(crate::Error::Device {
                verb: v,
                status: Status::InvalidHandle,
                errno,
                ..
            }) => assert_eq!((v, errno), (verb, Status::InvalidHandle.errno())),
            other => panic!("{verb}: {other:?}"),
        }
    }
}
