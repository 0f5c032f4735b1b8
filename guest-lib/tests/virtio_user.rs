//! `VirtioUser` against a minimal vhost-user backend over a real Unix socket.
//!
//! The backend (`EchoDevice`, built on `vhost-user-backend`) offers what vhost-user-rdma offers,
//! serves a valid vrdma configuration space, echoes control commands behind an `Ok`
//! `RespHeader`, records doorbells and answers each with a `CqCompletion` event for the QP.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::tempdir::TempDir;
use vrdma::mem::SharedMemory;
use vrdma::transport::{DeviceEvent, Options, Transport, VirtioUser, VirtioUserError};
use vrdma_proto::cmd::{Header, Opcode, RespHeader, Status};
use vrdma_proto::config::Config;
use vrdma_proto::doorbell::{self, Doorbell};
use vrdma_proto::{event, features, queue};
use zerocopy::IntoBytes;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

fn valid_config(doorbell_queues: u16) -> Config {
    let mut c = Config {
        version: vrdma_proto::PROTOCOL_VERSION.into(),
        num_doorbell_queues: doorbell_queues.into(),
        ..Config::default()
    };
    c.caps.max_qp = 64.into();
    c.caps.node_guid = 0x1122_3344_5566_7788.into();
    c.caps.phys_port_cnt = 1;
    c.port.state = vrdma_proto::config::PortState::Active.raw();
    c.port.max_mtu = vrdma_proto::config::Mtu::Mtu4096.raw();
    c.port.active_mtu = vrdma_proto::config::Mtu::Mtu1024.raw();
    c.port.link_layer = vrdma_proto::config::LinkLayer::Ethernet.raw();
    c.gid = vrdma_proto::Gid::from_ipv4([10, 0, 0, 1]);
    Config::decode(c.as_bytes()).expect("the test config is valid");
    c
}

struct EchoDevice {
    features: u64,
    config: Vec<u8>,
    doorbell_queues: u16,
    mem: Mutex<Option<Mem>>,
    acked: AtomicU64,
    /// Leave control commands unanswered.
    silent: AtomicBool,
    doorbells: Mutex<Vec<(doorbell::Kind, u32)>>,
    pending_events: Mutex<VecDeque<event::Event>>,
}

impl EchoDevice {
    fn new(doorbell_queues: u16) -> Self {
        let mut device = features::ALL_DEVICE;
        if doorbell_queues == 1 {
            device &= !features::MULTI_DOORBELL;
        }
        EchoDevice {
            features: features::VERSION_1
                | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
                | device,
            config: valid_config(doorbell_queues).as_bytes().to_vec(),
            doorbell_queues,
            mem: Mutex::new(None),
            acked: AtomicU64::new(0),
            silent: AtomicBool::new(false),
            doorbells: Mutex::default(),
            pending_events: Mutex::default(),
        }
    }

    fn memory(&self) -> Mem {
        self.mem.lock().unwrap().clone().expect("memory table set")
    }

    /// Whether the device's memory table maps `addr`.
    fn maps(&self, addr: u64) -> bool {
        self.memory()
            .memory()
            .find_region(GuestAddress(addr))
            .is_some()
    }

    fn serve_control(&self, vring: &VringRwLock) {
        if self.silent.load(Ordering::SeqCst) {
            return;
        }
        let mem = self.memory();
        let mut state = vring.get_mut();
        while let Some(chain) = state.get_queue_mut().iter(mem.memory()).unwrap().next() {
            let head = chain.head_index();
            let mut request = Vec::new();
            let mut writable = Vec::new();
            for desc in chain {
                if desc.is_write_only() {
                    writable.push(desc);
                } else {
                    let mut part = vec![0u8; desc.len() as usize];
                    mem.memory().read_slice(&mut part, desc.addr()).unwrap();
                    request.extend(part);
                }
            }
            let mut answer = RespHeader::new(Status::Ok, 0).as_bytes().to_vec();
            answer.extend(&request);
            let mut written = 0usize;
            for desc in writable {
                let n = (desc.len() as usize).min(answer.len() - written);
                mem.memory()
                    .write_slice(&answer[written..written + n], desc.addr())
                    .unwrap();
                written += n;
            }
            state.add_used(head, written as u32).unwrap();
        }
        state.signal_used_queue().unwrap();
    }

    fn serve_doorbells(&self, vring: &VringRwLock) {
        let mem = self.memory();
        let mut state = vring.get_mut();
        while let Some(chain) = state.get_queue_mut().iter(mem.memory()).unwrap().next() {
            let head = chain.head_index();
            for desc in chain {
                let mut bytes = vec![0u8; desc.len() as usize];
                mem.memory().read_slice(&mut bytes, desc.addr()).unwrap();
                let batch: Vec<_> = doorbell::decode_batch(&bytes).unwrap().collect();
                let mut events = self.pending_events.lock().unwrap();
                for &(_, qpn) in &batch {
                    events.push_back(event::Event::new(event::Kind::CqCompletion, qpn));
                }
                self.doorbells.lock().unwrap().extend(batch);
            }
            state.add_used(head, 0).unwrap();
        }
        state.signal_used_queue().unwrap();
    }

    fn flush_events(&self, vring: &VringRwLock) {
        let mem = self.memory();
        let mut state = vring.get_mut();
        let mut pending = self.pending_events.lock().unwrap();
        let mut delivered = false;
        while !pending.is_empty() {
            let Some(chain) = state.get_queue_mut().iter(mem.memory()).unwrap().next() else {
                break;
            };
            let head = chain.head_index();
            let desc = chain.into_iter().next().unwrap();
            assert!(desc.is_write_only() && desc.len() as usize >= event::SIZE);
            let ev = pending.pop_front().unwrap();
            mem.memory()
                .write_slice(ev.as_bytes(), desc.addr())
                .unwrap();
            state.add_used(head, event::SIZE as u32).unwrap();
            delivered = true;
        }
        if delivered {
            state.signal_used_queue().unwrap();
        }
    }
}

impl VhostUserBackend for EchoDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        queue::count(self.doorbell_queues).into()
    }

    fn max_queue_size(&self) -> usize {
        queue::MAX_QUEUE_SIZE.into()
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::SeqCst);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        assert!(!enabled, "the driver never negotiates EVENT_IDX");
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = offset as usize;
        self.config
            .get(start..start + size as usize)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn update_memory(&self, mem: Mem) -> std::io::Result<()> {
        *self.mem.lock().unwrap() = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        match queue::role(device_event, self.doorbell_queues) {
            Some(queue::Role::Control) => self.serve_control(&vrings[0]),
            Some(queue::Role::Event) => {}
            Some(queue::Role::Doorbell(_)) => self.serve_doorbells(&vrings[device_event as usize]),
            None => return Ok(()),
        }
        self.flush_events(&vrings[usize::from(queue::EVENT)]);
        Ok(())
    }
}

struct Daemon {
    _dir: TempDir,
    socket: PathBuf,
    device: Arc<EchoDevice>,
}

fn start(device: EchoDevice) -> Daemon {
    let dir = TempDir::new_with_prefix("/tmp/vrdma-virtio-user-").unwrap();
    let socket = dir.as_path().join("vm.sock");
    let device = Arc::new(device);
    let mut listener = Listener::new(&socket, true).unwrap();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    let mut daemon = VhostUserDaemon::new("vrdma-echo".into(), device.clone(), mem).unwrap();
    thread::spawn(move || {
        daemon.start(&mut listener).unwrap();
        let _ = daemon.wait();
    });
    Daemon {
        _dir: dir,
        socket,
        device,
    }
}

fn options() -> Options {
    Options {
        queue_size: 16,
        timeout: Duration::from_secs(5),
        memory_size: 1 << 20,
        grow_size: 1 << 20,
        ..Options::default()
    }
}

fn command(opcode: Opcode, body: &[u8]) -> Vec<u8> {
    let header = Header {
        opcode: opcode.raw().into(),
        ..Header::default()
    };
    let mut req = header.as_bytes().to_vec();
    req.extend_from_slice(body);
    req
}

/// Waits for `fd` to become readable, for at most `timeout`.
fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    epoll.wait(timeout.as_millis() as i32, &mut events).unwrap() == 1
}

/// Collects events until `count` arrived or 5 s passed.
fn collect_events(dev: &VirtioUser, count: usize) -> Vec<DeviceEvent> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = Vec::new();
    while events.len() < count && Instant::now() < deadline {
        wait_readable(dev.event_fd(), Duration::from_millis(200));
        events.extend(dev.drain_events().unwrap());
    }
    events
}

#[test]
fn handshake_config_and_control_round_trip() {
    let daemon = start(EchoDevice::new(1));
    let dev = VirtioUser::connect(&daemon.socket, options()).unwrap();

    assert_eq!(dev.config(), &valid_config(1));
    assert_eq!(dev.read_config().unwrap(), valid_config(1));
    assert_eq!(dev.num_doorbell_queues(), 1);
    let expected = features::VERSION_1 | (features::ALL_DEVICE & !features::MULTI_DOORBELL);
    assert_eq!(dev.features(), expected);
    assert_eq!(
        daemon.device.acked.load(Ordering::SeqCst),
        expected | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    );
    assert!(dev.protocol_features().contains(
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS | VhostUserProtocolFeatures::REPLY_ACK
    ));
    // The device maps the transport's memory at GPA == VA.
    let region = dev.regions()[0].clone();
    assert!(daemon.device.maps(region.addr()));

    let request = command(Opcode::QueryPort, &[1, 0, 0, 0, 0, 0, 0, 0]);
    let mut response = [0u8; 64];
    let n = dev.control(&request, &mut response).unwrap();
    assert_eq!(n, 8 + request.len());
    let (_, status) = RespHeader::decode(&response[..n]).unwrap();
    assert_eq!(status, Status::Ok);
    assert_eq!(&response[8..n], &request[..]);

    // Commands larger than the standing buffers (a long REG_MR page list).
    let big: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let request = command(Opcode::RegMr, &big);
    let mut response = vec![0u8; request.len() + 8];
    let n = dev.control(&request, &mut response).unwrap();
    assert_eq!(n, request.len() + 8);
    assert_eq!(&response[8..], &request[..]);

    // A response buffer shorter than the answer: the device fills what fits.
    let mut short = [0u8; 8];
    assert_eq!(dev.control(&request, &mut short).unwrap(), 8);
    assert!(matches!(
        dev.control(&[], &mut short),
        Err(VirtioUserError::EmptyRequest)
    ));
}

#[test]
fn doorbells_reach_the_device_and_events_come_back() {
    let daemon = start(EchoDevice::new(2));
    let dev = VirtioUser::connect(&daemon.socket, options()).unwrap();
    assert_eq!(dev.num_doorbell_queues(), 2);

    dev.ring_doorbells(
        1,
        &[
            Doorbell::new(doorbell::Kind::Send, 7),
            Doorbell::new(doorbell::Kind::Recv, 9),
        ],
    )
    .unwrap();
    assert!(
        wait_readable(dev.event_fd(), Duration::from_secs(5)),
        "event interrupt"
    );
    let events = collect_events(&dev, 2);
    assert_eq!(
        events,
        [
            DeviceEvent {
                kind: event::Kind::CqCompletion,
                handle: 7
            },
            DeviceEvent {
                kind: event::Kind::CqCompletion,
                handle: 9
            },
        ]
    );
    assert_eq!(
        *daemon.device.doorbells.lock().unwrap(),
        [(doorbell::Kind::Send, 7), (doorbell::Kind::Recv, 9)]
    );

    // 300 doorbells: split into batches of 64, more batches than the queue has slots over
    // repeated calls, and more events than the 16-entry event queue holds at once, so its
    // buffers must be reposted.
    let many: Vec<Doorbell> = (0..300)
        .map(|q| Doorbell::new(doorbell::Kind::Send, q))
        .collect();
    for _ in 0..4 {
        dev.ring_doorbells(0, &many).unwrap();
    }
    let events = collect_events(&dev, 1200);
    assert_eq!(events.len(), 1200);
    let handles: Vec<u32> = events.iter().map(|e| e.handle).collect();
    let expected: Vec<u32> = (0..4).flat_map(|_| 0..300).collect();
    assert_eq!(handles, expected);
    assert_eq!(daemon.device.doorbells.lock().unwrap().len(), 1202);

    assert!(matches!(
        dev.ring_doorbells(2, &many[..1]),
        Err(VirtioUserError::NoSuchDoorbellQueue { queue: 2, count: 2 })
    ));
    dev.ring_doorbells(0, &[]).unwrap();
}

#[test]
fn memory_is_added_and_removed_at_run_time() {
    let daemon = start(EchoDevice::new(1));
    let dev = VirtioUser::connect(&daemon.socket, options()).unwrap();

    // Application memory registered explicitly.
    let app = Arc::new(SharedMemory::new("vrdma-app-buffers", 1 << 20).unwrap());
    let (base, len) = (app.addr(), app.len() as u64);
    assert!(!dev.is_shared(base, 1));
    assert!(!daemon.device.maps(base));
    dev.add_memory(app.clone()).unwrap();
    assert!(dev.is_shared(base, len));
    assert!(
        !dev.is_shared(base, len + 1),
        "a range may not run past the region"
    );
    assert!(daemon.device.maps(base));
    assert!(matches!(
        dev.add_memory(app.clone()),
        Err(VirtioUserError::AlreadyRegistered { .. })
    ));
    dev.remove_memory(base).unwrap();
    assert!(!dev.is_shared(base, 1));
    assert!(!daemon.device.maps(base));
    assert!(matches!(
        dev.remove_memory(base),
        Err(VirtioUserError::NotRegistered { .. })
    ));

    // DMA memory grows by registering a new region when the allocator runs out.
    let before = dev.regions().len();
    let big = dev.alloc_dma(3 << 20, 4096).unwrap();
    let grown = big.region().addr();
    assert_eq!(dev.regions().len(), before + 1);
    assert!(dev.is_shared(big.addr(), big.len() as u64));
    assert!(daemon.device.maps(big.addr()));
    assert!(matches!(
        dev.remove_memory(grown),
        Err(VirtioUserError::RegionInUse { live: 1, .. })
    ));
    drop(big);
    dev.remove_memory(grown).unwrap();
    assert!(!daemon.device.maps(grown));
    assert!(!dev.dma().contains(grown, 1));

    // The rings' region can never go.
    let rings = dev.regions()[0].addr();
    assert!(matches!(
        dev.remove_memory(rings),
        Err(VirtioUserError::RegionInUse { .. })
    ));
    // The device still works.
    let mut response = [0u8; 16];
    let request = command(Opcode::AllocPd, &[]);
    assert_eq!(dev.control(&request, &mut response).unwrap(), 16);

    // Memory the device cannot see is detectable.
    let private = [0u8; 64];
    assert!(!dev.is_shared(private.as_ptr() as u64, 64));
}

#[test]
fn an_unanswered_command_times_out_naming_the_socket() {
    let daemon = start(EchoDevice::new(1));
    let opts = Options {
        timeout: Duration::from_millis(300),
        ..options()
    };
    let dev = VirtioUser::connect(&daemon.socket, opts).unwrap();
    daemon.device.silent.store(true, Ordering::SeqCst);

    let started = Instant::now();
    let err = dev
        .control(&command(Opcode::QueryDevice, &[]), &mut [0u8; 256])
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        matches!(err, VirtioUserError::DeviceTimeout { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("did not answer"), "{msg}");
    assert!(msg.contains(&daemon.socket.display().to_string()), "{msg}");

    let err = dev
        .control(&command(Opcode::QueryDevice, &[]), &mut [0u8; 256])
        .unwrap_err();
    assert!(
        matches!(err, VirtioUserError::ControlQueueBroken { .. }),
        "{err}"
    );
}

#[test]
fn connecting_to_a_missing_socket_explains_what_to_check() {
    let dir = TempDir::new_with_prefix("/tmp/vrdma-virtio-user-").unwrap();
    let socket = dir.as_path().join("nobody-listens.sock");
    let err = VirtioUser::connect(&socket, options()).unwrap_err();
    assert!(matches!(err, VirtioUserError::Connect { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&socket.display().to_string()), "{msg}");
    assert!(msg.contains("is vhost-user-rdma running"), "{msg}");
    assert!(std::error::Error::source(&err).is_some());
    let chain = vrdma::error_chain(&err);
    assert!(chain.len() > msg.len(), "{chain}");
}

#[test]
fn a_backend_without_version_1_is_refused() {
    let mut device = EchoDevice::new(1);
    device.features &= !features::VERSION_1;
    let daemon = start(device);
    let err = VirtioUser::connect(&daemon.socket, options()).unwrap_err();
    assert!(
        matches!(
            err,
            VirtioUserError::MissingFeature {
                feature: "VIRTIO_F_VERSION_1",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_bad_config_space_is_refused() {
    let mut device = EchoDevice::new(1);
    device.config[0] = 2; // protocol version 2
    let daemon = start(device);
    let err = VirtioUser::connect(&daemon.socket, options()).unwrap_err();
    assert!(matches!(err, VirtioUserError::BadConfig { .. }), "{err}");
}

#[test]
fn invalid_options_are_refused_before_connecting() {
    let err = VirtioUser::connect(
        Path::new("/nonexistent"),
        Options {
            queue_size: 100,
            ..options()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            VirtioUserError::InvalidOption {
                option: "queue_size",
                ..
            }
        ),
        "{err}"
    );
}
