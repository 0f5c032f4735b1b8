//! Shared helpers for the integration tests: a daemon in a private directory, and guests
//! connected to it through the `vrdma` library's virtio-user transport (each guest is its own
//! vhost-user frontend with memfd memory, exactly as a VMM would be).

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use vhost_user_rdma::config::{Args, Config};
use vhost_user_rdma::daemon::Daemon;
use vhost_user_rdma::model::vm::Vm;
use vhost_user_rdma::vhost::queues::DoorbellQueues;
use vrdma::mem::{DmaBuf, SharedMemory};
use vrdma::transport::{DeviceEvent, Options, Transport, VirtioUser, VirtioUserError};
use vrdma::{
    AccessFlags, CompletionQueue, Context, MemoryRegion, ProtectionDomain, QpAttr, QpAttrMask,
    QpCap, QpInitAttr, QpState, QpType, QueuePair, WorkCompletion,
};
use vrdma_proto::Gid;
use vrdma_proto::doorbell::Doorbell;

pub mod artifacts;
pub mod chaos;
pub use vrdma_netns as netns;

pub mod raw;
pub mod regions;
pub mod scenarios;
pub mod srq;
pub mod vmm;

/// A new private temporary directory, `PREFIX-PID-N`, for a test daemon's sockets; turns the
/// tests' logging on too.
pub fn test_dir(prefix: &str) -> PathBuf {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The `--vm` entry of VM `name`, the `n`th, with its socket in `dir` and the extra keys
/// `extra`; its GID is 10.0.0.`n` unless `extra` names one.
pub fn vm_entry(dir: &Path, name: &str, n: usize, extra: &str) -> String {
    let mut spec = format!(
        "name={name},socket={}",
        dir.join(format!("{name}.sock")).display()
    );
    if !extra.contains("gid=") {
        spec.push_str(&format!(",gid=10.0.0.{n}"));
    }
    if !extra.is_empty() {
        spec.push(',');
        spec.push_str(extra);
    }
    spec
}

/// The configuration of a daemon serving `vms` (each `name` and extra keys, as
/// [`vm_entry`] makes them, the `n`th at 10.0.0.`n`) with their sockets in `dir`, and the
/// daemon options `options`.
pub fn daemon_config(dir: &Path, vms: &[(&str, &str)], options: &[&str]) -> Config {
    let mut argv = vec!["vhost-user-rdma".to_owned()];
    for (i, (name, extra)) in vms.iter().enumerate() {
        argv.push("--vm".into());
        argv.push(vm_entry(dir, name, i + 1, extra));
    }
    argv.extend(options.iter().map(|o| (*o).to_owned()));
    Config::from_args(&Args::parse_from(argv)).expect("valid test configuration")
}

/// A QP of `qp_type` on `pd` with `cq` for both queues and queues of `cap`, or the device's
/// refusal.
pub fn new_qp(
    pd: &vrdma::ProtectionDomain,
    cq: &CompletionQueue,
    qp_type: QpType,
    cap: QpCap,
) -> vrdma::Result<QueuePair> {
    QueuePair::new(
        pd,
        &vrdma::QpInitAttr {
            send_cq: cq,
            recv_cq: cq,
            srq: None,
            cap,
            qp_type,
            sq_sig_all: false,
        },
    )
}

/// A daemon serving VMs on sockets in a private temporary directory; stopped on drop.
#[derive(Debug)]
pub struct TestDaemon {
    daemon: Option<Daemon>,
    dir: PathBuf,
}

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

impl TestDaemon {
    /// Starts a daemon with one VM per entry: `name` plus extra `key=value` options.
    pub fn start(vms: &[(&str, &str)]) -> TestDaemon {
        Self::start_with(vms, &[])
    }

    /// As [`TestDaemon::start`], with more daemon options; a VM whose options name a `gid=`
    /// gets that one instead of the default 10.0.0.N.
    pub fn start_with(vms: &[(&str, &str)], options: &[&str]) -> TestDaemon {
        let dir = test_dir("vrdma-test");
        let daemon = Daemon::start(&daemon_config(&dir, vms, options)).expect("daemon starts");
        TestDaemon {
            daemon: Some(daemon),
            dir,
        }
    }

    /// The daemon.
    pub fn daemon(&self) -> &Daemon {
        self.daemon
            .as_ref()
            .expect("the daemon runs until the TestDaemon is dropped")
    }

    /// The socket of VM `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// Opens VM `name`'s device as its guest.
    pub fn open(&self, name: &str) -> Context {
        Context::open(self.socket(name)).expect("guest connects")
    }

    /// Opens VM `name`'s device as its guest, keeping the transport too: for raw commands,
    /// or to do to the device what the VMM would ([`VirtioUser::pause_rings`]).
    pub fn open_shared(&self, name: &str) -> (Context, Arc<VirtioUser>) {
        let dev = Arc::new(
            VirtioUser::connect(self.socket(name), Options::default()).expect("guest connects"),
        );
        (Context::from_transport(SharedTransport(dev.clone())), dev)
    }

    /// The daemon's view of VM `name` while a guest is connected.
    pub fn vm(&self, name: &str) -> Option<Arc<Vm>> {
        let server = self.daemon.as_ref()?.server(name)?;
        server.device().map(|d| d.vm().clone())
    }

    /// The doorbell queues of VM `name` while a guest is connected.
    pub fn doorbells(&self, name: &str) -> Option<Arc<DoorbellQueues>> {
        let server = self.daemon.as_ref()?.server(name)?;
        server.device().map(|d| d.doorbells().clone())
    }

    /// Waits until VM `name`'s socket has served `served` guests and released everything of
    /// the last: the daemon is back where it was before the first connected.
    pub fn wait_released(&self, name: &str, served: u64) {
        let server = self.daemon().server(name).expect("a configured VM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.times_waiting() < served + 1 {
            assert!(
                Instant::now() < deadline,
                "VM {name} did not release its guest number {served}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until VM `name` has a connected guest (or has none, with `connected` false).
    pub fn wait_connected(&self, name: &str, connected: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.vm(name).is_some() != connected {
            assert!(
                Instant::now() < deadline,
                "VM {name} never became connected={connected}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One connection's transport, shared between a `Context` (which owns its transport) and the
/// test, which also drives it directly.
#[derive(Debug, Clone)]
pub struct SharedTransport(pub Arc<VirtioUser>);

impl Transport for SharedTransport {
    type Error = VirtioUserError;

    fn config(&self) -> &vrdma_proto::config::Config {
        Transport::config(&*self.0)
    }
    fn read_config(&self) -> Result<vrdma_proto::config::Config, VirtioUserError> {
        Transport::read_config(&*self.0)
    }
    fn features(&self) -> u64 {
        Transport::features(&*self.0)
    }
    fn num_doorbell_queues(&self) -> u16 {
        Transport::num_doorbell_queues(&*self.0)
    }
    fn control(&self, request: &[u8], response: &mut [u8]) -> Result<usize, VirtioUserError> {
        Transport::control(&*self.0, request, response)
    }
    fn ring_doorbells(&self, queue: u16, doorbells: &[Doorbell]) -> Result<(), VirtioUserError> {
        Transport::ring_doorbells(&*self.0, queue, doorbells)
    }
    fn event_fd(&self) -> RawFd {
        Transport::event_fd(&*self.0)
    }
    fn hangup_fd(&self) -> Option<RawFd> {
        Transport::hangup_fd(&*self.0)
    }
    fn drain_events(&self) -> Result<Vec<DeviceEvent>, VirtioUserError> {
        Transport::drain_events(&*self.0)
    }
    fn alloc_dma(&self, len: usize, align: usize) -> Result<DmaBuf, VirtioUserError> {
        Transport::alloc_dma(&*self.0, len, align)
    }
    fn add_memory(&self, mem: Arc<SharedMemory>) -> Result<(), VirtioUserError> {
        Transport::add_memory(&*self.0, mem)
    }
    fn remove_memory(&self, base: u64) -> Result<(), VirtioUserError> {
        Transport::remove_memory(&*self.0, base)
    }
    fn is_shared(&self, addr: u64, len: u64) -> bool {
        Transport::is_shared(&*self.0, addr, len)
    }
    fn shared_region(&self, addr: u64) -> Option<(u64, u64)> {
        Transport::shared_region(&*self.0, addr)
    }

    fn device_addr(&self, addr: u64, len: u64) -> Option<u64> {
        Transport::device_addr(&*self.0, addr, len)
    }
}

/// Everything one side of a connection needs.
#[derive(Debug)]
pub struct Endpoint {
    /// The device.
    pub ctx: Context,
    /// Its PD.
    pub pd: ProtectionDomain,
    /// Send and receive CQ.
    pub cq: CompletionQueue,
    /// The QP.
    pub qp: QueuePair,
    /// A buffer, registered as `mr`.
    pub buf: DmaBuf,
    /// `buf`'s registration.
    pub mr: MemoryRegion,
}

/// All rights, as perftest registers its buffers.
pub fn all_access() -> AccessFlags {
    AccessFlags::LOCAL_WRITE
        | AccessFlags::REMOTE_WRITE
        | AccessFlags::REMOTE_READ
        | AccessFlags::REMOTE_ATOMIC
}

impl Endpoint {
    /// A PD, a CQ, an RC or UD QP and a registered buffer of `len` bytes on `ctx`.
    pub fn new(ctx: &Context, qp_type: QpType, len: usize, cap: QpCap) -> Endpoint {
        let pd = ProtectionDomain::new(ctx).expect("alloc pd");
        let cq = CompletionQueue::new(ctx, 1024).expect("create cq");
        let qp = QueuePair::new(
            &pd,
            &QpInitAttr {
                send_cq: &cq,
                recv_cq: &cq,
                srq: None,
                cap,
                qp_type,
                sq_sig_all: false,
            },
        )
        .expect("create qp");
        let buf = ctx.alloc(len).expect("alloc buffer");
        let mr = MemoryRegion::register(&pd, &buf, all_access()).expect("reg mr");
        Endpoint {
            ctx: ctx.clone(),
            pd,
            cq,
            qp,
            buf,
            mr,
        }
    }

    fn check_sges(&self, sges: &[vrdma::Sge]) {
        for sge in sges {
            let (start, len) = (sge.addr.get(), u64::from(sge.length.get()));
            assert!(
                start >= self.buf.addr() && start + len <= self.buf.addr() + self.buf.len() as u64,
                "test SGE {start:#x}+{len} is outside the endpoint's buffer"
            );
        }
    }

    /// Posts send requests whose SGEs lie in this endpoint's buffer (checked).
    pub fn send(&self, wrs: &[vrdma::SendWr<'_>]) -> vrdma::Result<()> {
        wrs.iter().for_each(|wr| self.check_sges(wr.sg_list));
        // SAFETY: every SGE lies in `self.buf` (checked above), which lives as long as the
        // endpoint; the tests read it only after polling the completions.
        unsafe { self.qp.post_send(wrs) }
    }

    /// Posts receives whose SGEs lie in this endpoint's buffer (checked).
    pub fn recv(&self, wrs: &[vrdma::RecvWr<'_>]) -> vrdma::Result<()> {
        wrs.iter().for_each(|wr| self.check_sges(wr.sg_list));
        // SAFETY: as for `send`.
        unsafe { self.qp.post_recv(wrs) }
    }

    /// Polls one completion, failing the test after 10 s.
    pub fn poll_one(&self) -> WorkCompletion {
        poll_one(&self.cq)
    }

    /// Asserts no completion arrives within `wait`.
    pub fn assert_no_completion(&self, wait: Duration) {
        let mut wc = [empty_wc(); 1];
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            assert_eq!(
                self.cq.poll(&mut wc).expect("poll"),
                0,
                "unexpected completion {:?}",
                wc[0]
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A zeroed completion, to fill poll arrays with.
pub fn empty_wc() -> WorkCompletion {
    WorkCompletion::default()
}

/// Polls one completion from `cq`, failing the test after 10 s.
pub fn poll_one(cq: &CompletionQueue) -> WorkCompletion {
    let mut wc = [empty_wc(); 1];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if cq.poll(&mut wc).expect("poll") == 1 {
            return wc[0];
        }
        assert!(
            Instant::now() < deadline,
            "no completion within 10 s on CQ {:#x}",
            cq.handle()
        );
        std::thread::yield_now();
    }
}

/// The far end of an RC connection and the transport settings towards it.
#[derive(Debug, Clone, Copy)]
pub struct RcPeer {
    /// The peer port's GID.
    pub gid: Gid,
    /// The peer QP.
    pub qpn: u32,
    /// Path MTU.
    pub mtu: vrdma_proto::config::Mtu,
    /// ACK timeout exponent.
    pub timeout: u8,
    /// Transport retries.
    pub retry_cnt: u8,
    /// RNR retries (7 = infinite).
    pub rnr_retry: u8,
}

/// Takes an RC QP through INIT, RTR and RTS towards `peer`, as `ibv_rc_pingpong` does. On
/// failure, names the state the QP could not reach.
pub fn try_connect_rc(qp: &QueuePair, peer: &RcPeer) -> Result<(), (QpState, vrdma::Error)> {
    try_connect_rc_via(qp, peer, vrdma::AddressHandle::attr_for(peer.gid))
}

/// [`try_connect_rc`] with the address `ah_attr` (a traffic class of its own, say) for the
/// peer.
pub fn try_connect_rc_via(
    qp: &QueuePair,
    peer: &RcPeer,
    ah_attr: vrdma_proto::qp::AhAttr,
) -> Result<(), (QpState, vrdma::Error)> {
    let init = QpAttr {
        qp_state: QpState::Init,
        qp_access_flags: all_access(),
        ..QpAttr::default()
    };
    let rtr = QpAttr {
        qp_state: QpState::Rtr,
        path_mtu: peer.mtu,
        dest_qp_num: peer.qpn,
        rq_psn: 0,
        max_dest_rd_atomic: 1,
        // 0.01 ms: a SEND that finds no receive is retried quickly.
        min_rnr_timer: 1,
        ah_attr,
        ..QpAttr::default()
    };
    let rts = QpAttr {
        qp_state: QpState::Rts,
        sq_psn: 0,
        timeout: peer.timeout,
        retry_cnt: peer.retry_cnt,
        rnr_retry: peer.rnr_retry,
        max_rd_atomic: 1,
        ..QpAttr::default()
    };
    let steps = [
        (
            init,
            QpAttrMask::PKEY_INDEX | QpAttrMask::PORT | QpAttrMask::ACCESS_FLAGS,
        ),
        (
            rtr,
            QpAttrMask::AV
                | QpAttrMask::PATH_MTU
                | QpAttrMask::DEST_QPN
                | QpAttrMask::RQ_PSN
                | QpAttrMask::MAX_DEST_RD_ATOMIC
                | QpAttrMask::MIN_RNR_TIMER,
        ),
        (
            rts,
            QpAttrMask::TIMEOUT
                | QpAttrMask::RETRY_CNT
                | QpAttrMask::RNR_RETRY
                | QpAttrMask::SQ_PSN
                | QpAttrMask::MAX_QP_RD_ATOMIC,
        ),
    ];
    for (attr, mask) in steps {
        qp.modify(&attr, QpAttrMask::STATE | mask)
            .map_err(|e| (attr.qp_state, e))?;
    }
    Ok(())
}

/// [`try_connect_rc`] with the tests' settings (MTU 1024, ACK timeout exponent 14, about
/// 67 ms, as ibv_rc_pingpong and perftest use), failing the test if the QP cannot be
/// connected. A shorter timeout (exponent 8 was about 1 ms, 32 ms over 7 retries) made the
/// cross-host tests fail with RETRY_EXC_ERR whenever a loaded host kept the peer daemon off
/// the CPU for longer than that: the transport then did what it must.
pub fn connect_rc(qp: &QueuePair, remote_gid: Gid, remote_qpn: u32, rnr_retry: u8, retry_cnt: u8) {
    let peer = RcPeer {
        gid: remote_gid,
        qpn: remote_qpn,
        mtu: vrdma_proto::config::Mtu::Mtu1024,
        timeout: 14,
        retry_cnt,
        rnr_retry,
    };
    if let Err((state, e)) = try_connect_rc(qp, &peer) {
        panic!("cannot move the QP to {state:?}: {e}");
    }
}

/// Connects RC QPs `qa` (on the port of `ga`) and `qb` (on `gb`) to each other as
/// `ibv_rc_pingpong` does, with MTU 1024, ACK timeout exponent `timeout`, 7 retries and
/// infinite RNR retries.
pub fn connect_rc_both(qa: &QueuePair, ga: Gid, qb: &QueuePair, gb: Gid, timeout: u8) {
    for (qp, gid, qpn) in [(qa, gb, qb.qp_num()), (qb, ga, qa.qp_num())] {
        let peer = RcPeer {
            gid,
            qpn,
            mtu: vrdma_proto::config::Mtu::Mtu1024,
            timeout,
            retry_cnt: 7,
            rnr_retry: 7,
        };
        try_connect_rc(qp, &peer)
            .unwrap_or_else(|(state, e)| panic!("connect fails in {state:?}: {e}"));
    }
}

/// Doorbells VM `vm` has rung so far: (all, taken by polling); the rest came with a kick.
pub fn doorbells_rung(vm: &Vm) -> (u64, u64) {
    let c = &vm.counters;
    (
        c.doorbells.load(Ordering::Relaxed),
        c.doorbells_polled.load(Ordering::Relaxed),
    )
}

/// One signalled 8-byte RDMA WRITE from `a` to `b`, waited for.
pub fn write_one(a: &Endpoint, b: &Endpoint) {
    let src = [vrdma::Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    let wr = [
        vrdma::SendWr::rdma_write(1, &src, b.buf.addr(), b.mr.rkey())
            .with_flags(vrdma::SendFlags::SIGNALED),
    ];
    a.send(&wr).expect("post write");
    assert_eq!(a.poll_one().status, vrdma::WcStatus::Success);
}

/// Two RC endpoints on `a` and `b`, connected to each other.
pub fn rc_pair(a: &Context, b: &Context, len: usize, cap: QpCap) -> (Endpoint, Endpoint) {
    let ea = Endpoint::new(a, QpType::Rc, len, cap);
    let eb = Endpoint::new(b, QpType::Rc, len, cap);
    connect_rc(&ea.qp, b.gid(), eb.qp.qp_num(), 7, 7);
    connect_rc(&eb.qp, a.gid(), ea.qp.qp_num(), 7, 7);
    (ea, eb)
}

/// Fills `buf` with a pattern derived from `seed`, so a misplaced byte shows.
pub fn pattern(buf: &DmaBuf, seed: u8) {
    let bytes: Vec<u8> = (0..buf.len())
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    buf.write_at(0, &bytes).expect("write pattern");
}

/// Reads `len` bytes at `offset` of `buf`.
pub fn read(buf: &DmaBuf, offset: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    buf.read_at(offset, &mut out).expect("read buffer");
    out
}

/// The load that keeps a VM's share defined while shares are measured: a share exists only
/// while every VM has work queued, so each keeps seconds of it queued (256 writes of 16 MiB;
/// the daemon moves a few GB/s here). A guest thread that a loaded host leaves off the CPU for
/// tens or hundreds of milliseconds, as on a two-core machine building something else, must
/// not let its VM run dry and lose its share, which would measure the guest's CPU instead of
/// the scheduler.
pub const SHARE_LOAD: Load = Load {
    msg: 16 << 20,
    depth: 256,
    batch: 8,
};

/// How a saturating guest loads the fabric.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Bytes per RDMA WRITE.
    pub msg: u32,
    /// Writes kept outstanding.
    pub depth: u32,
    /// Writes posted per doorbell.
    pub batch: usize,
}

/// Keeps `load.depth` writes outstanding from VM `from` to `sink` until `stop`, posting in
/// batches with one doorbell each, as a saturating application does (so the guest's own CPU
/// is not what limits it on a two-core machine). Returns the writes completed.
pub fn saturate(
    d: &TestDaemon,
    from: &str,
    sink: &Context,
    load: Load,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    saturate_from(d.open(from), sink, load, stop, progress)
}

/// As [`saturate`], from the guest `cf` (of any daemon), counting the writes completed so far
/// in `progress` as it goes.
pub fn saturate_from(
    cf: Context,
    sink: &Context,
    load: Load,
    stop: Arc<std::sync::atomic::AtomicBool>,
    progress: Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<u64> {
    let ct = sink.clone();
    std::thread::spawn(move || {
        let cap = QpCap {
            max_send_wr: load.depth,
            ..QpCap::default()
        };
        let (a, b) = rc_pair(&cf, &ct, load.msg.max(4096) as usize, cap);
        let src = [vrdma::Sge::new(a.buf.addr(), load.msg, a.mr.lkey())];
        let batch: Vec<vrdma::SendWr<'_>> = (0..load.batch as u64)
            .map(|id| {
                vrdma::SendWr::rdma_write(id, &src, b.buf.addr(), b.mr.rkey())
                    .with_flags(vrdma::SendFlags::SIGNALED)
            })
            .collect();
        for _ in 0..load.depth as usize / load.batch {
            a.send(&batch).expect("post writes");
        }
        let (mut done, mut owed) = (0u64, 0usize);
        let mut wc = [empty_wc(); 32];
        while !stop.load(Ordering::Relaxed) {
            let n = a.cq.poll(&mut wc).expect("poll");
            for w in &wc[..n] {
                assert_eq!(w.status, vrdma::WcStatus::Success);
            }
            done += n as u64;
            progress.fetch_add(n as u64, Ordering::Relaxed);
            owed += n;
            while owed >= load.batch {
                a.send(&batch).expect("post writes");
                owed -= load.batch;
            }
            if n == 0 {
                // Leave the CPU to the daemon: this machine has two cores.
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        done
    })
}

/// What each of `names` moved (payload bytes, work requests) over `window`, once all of them
/// have started moving and a short warm-up has passed.
pub fn measure(d: &TestDaemon, names: &[&str], window: Duration) -> Vec<(u64, u64)> {
    let read = |name: &str| {
        d.vm(name)
            .map(|p| {
                (
                    p.counters.bytes.load(Ordering::Relaxed),
                    p.counters.wrs.load(Ordering::Relaxed),
                )
            })
            .unwrap_or((0, 0))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while names.iter().any(|n| read(n).0 == 0) {
        assert!(Instant::now() < deadline, "traffic never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let before: Vec<_> = names.iter().map(|n| read(n)).collect();
    std::thread::sleep(window);
    names
        .iter()
        .zip(before)
        .map(|(n, (b0, w0))| {
            let (b1, w1) = read(n);
            (b1 - b0, w1 - w0)
        })
        .collect()
}
