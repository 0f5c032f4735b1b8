//! Receive doorbells (`features::SYNC_RECV`): posting receives rings one `Recv` doorbell
//! per call (one `Srq` doorbell for an SRQ) after the producer index is published, and none
//! when the bit was not negotiated.
//!
//! The device is [`RecordingDevice`], a transport in this process: it answers the create
//! commands with handles, remembers where each receive ring is, and records every doorbell
//! with the producer index its ring held when the doorbell was rung.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vrdma_proto::cmd::{self, Opcode, RespHeader, Status};
use vrdma_proto::config::Config;
use vrdma_proto::doorbell::{self, Doorbell};
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

/// A doorbell as the device saw it: its kind, its handle, and the producer index of the ring
/// it names at the moment it was rung.
type Rung = (doorbell::Kind, u32, u32);

#[derive(Debug)]
struct RecordingDevice {
    config: Config,
    features: u64,
    memory: Arc<SharedMemory>,
    allocator: DmaAllocator,
    /// Receive ring addresses by (kind, handle) of the doorbell that names them.
    rings: Mutex<HashMap<(doorbell::Kind, u32), u64>>,
    rung: Mutex<Vec<Rung>>,
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
        let memory = Arc::new(SharedMemory::new("vrdma-recv-doorbell-test", 1 << 20).unwrap());
        Arc::new(RecordingDevice {
            config,
            features: features::VERSION_1 | features,
            allocator: DmaAllocator::with_region(memory.clone()),
            memory,
            rings: Mutex::default(),
            rung: Mutex::default(),
        })
    }

    fn rung(&self) -> Vec<Rung> {
        self.rung.lock().unwrap().clone()
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
                    .insert((doorbell::Kind::Recv, QPN), create.rq_ring_addr.get());
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
                    .insert((doorbell::Kind::Srq, SRQN), create.ring_addr.get());
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
        let mut answer = RespHeader::new(Status::Ok, 0).as_bytes().to_vec();
        answer.extend(self.answer(opcode, body));
        response[..answer.len()].copy_from_slice(&answer);
        Ok(answer.len())
    }

    fn ring_doorbells(&self, _queue: u16, doorbells: &[Doorbell]) -> io::Result<()> {
        let rings = self.rings.lock().unwrap();
        let mut rung = self.rung.lock().unwrap();
        for db in doorbells {
            let kind = doorbell::Kind::from_raw(db.kind).unwrap();
            let producer = match rings.get(&(kind, db.handle.get())) {
                Some(&base) => {
                    let mut index = [0u8; 4];
                    self.memory
                        .read(base + ring::PRODUCER_OFFSET, &mut index)
                        .unwrap();
                    u32::from_le_bytes(index)
                }
                None => 0,
            };
            rung.push((kind, db.handle.get(), producer));
        }
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
fn receives_ring_no_doorbell_unless_the_device_asked_for_them() {
    let device = RecordingDevice::new(features::SRQ);
    let (qp, srq) = objects(&device);
    // SAFETY: the receives name no memory.
    unsafe {
        qp.post_recv(&receives(3)).unwrap();
        qp.post_recv(&receives(1)).unwrap();
        srq.post_recv(&receives(2)).unwrap();
    }
    assert_eq!(device.rung(), []);
}

#[test]
fn each_post_of_receives_rings_one_doorbell_after_publishing_them() {
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
    // One doorbell per call, each seeing every receive of its call already published.
    assert_eq!(
        device.rung(),
        [
            (doorbell::Kind::Recv, QPN, 3),
            (doorbell::Kind::Recv, QPN, 4),
            (doorbell::Kind::Srq, SRQN, 2),
        ]
    );
}

#[test]
fn receives_posted_before_a_failing_one_are_rung_for() {
    let device = RecordingDevice::new(features::SRQ | features::SYNC_RECV);
    let (qp, _srq) = objects(&device);
    // The receive queue holds 8: the ninth fails, the eight before it are posted.
    // SAFETY: the receives name no memory.
    let full = unsafe { qp.post_recv(&receives(9)) };
    assert!(
        matches!(full, Err(crate::Error::QueueFull { .. })),
        "{full:?}"
    );
    // Nothing fits now: no receive published, no doorbell.
    // SAFETY: as above.
    let still_full = unsafe { qp.post_recv(&receives(1)) };
    assert!(still_full.is_err());
    assert_eq!(device.rung(), [(doorbell::Kind::Recv, QPN, 8)]);
}
