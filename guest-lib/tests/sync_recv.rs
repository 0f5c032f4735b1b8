//! Synchronous receives between the library and the daemon over a real socket: a daemon
//! whose fabric posts receives ahead of arrival (`VmServer::start` with `sync_receives`)
//! offers `SYNC_RECV`, the library accepts it and sends one `POST_RECV` (`POST_SRQ_RECV`) per
//! post of receives, which the daemon executes, and a driver that declines it is refused; a
//! daemon that reads receive rings on arrival gets no such command.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use vhost_user_rdma::config::{Args, Config};
use vhost_user_rdma::fabric::soft::SoftFabric;
use vhost_user_rdma::sched::Scheduler;
use vhost_user_rdma::vhost::server::VmServer;
use vmm_sys_util::tempdir::TempDir;
use vrdma::transport::{Options, Transport, VirtioUser};
use vrdma::{
    CompletionQueue, Context, ProtectionDomain, QpCap, QpInitAttr, QpType, QueuePair, RecvWr,
    SendWr, SharedReceiveQueue, SrqAttr,
};
use vrdma_proto::features;

/// One VM's server on the soft fabric, told whether its fabric posts receives ahead of
/// arrival.
struct Server {
    _dir: TempDir,
    socket: PathBuf,
    server: Option<VmServer>,
}

impl Server {
    fn start(sync_receives: bool) -> Server {
        let dir = TempDir::new_with_prefix("/tmp/vrdma-sync-recv-").unwrap();
        let socket = dir.as_path().join("vm.sock");
        let argv = [
            "vhost-user-rdma".to_owned(),
            "--vm".to_owned(),
            format!("name=vm,socket={},gid=10.0.0.3", socket.display()),
        ];
        let cfg = Config::from_args(&Args::parse_from(argv))
            .unwrap()
            .vms
            .remove(0);
        let scheduler = Scheduler::start(|| Box::new(SoftFabric::new(None))).unwrap();
        let listeners = vhost_user_rdma::vhost::listen::Listeners::start().unwrap();
        let server = VmServer::start(cfg, 0x300, scheduler, sync_receives, &listeners).unwrap();
        Server {
            _dir: dir,
            socket,
            server: Some(server),
        }
    }

    fn server(&self) -> &VmServer {
        self.server.as_ref().unwrap()
    }

    /// Doorbells of every kind the connected guest's device has taken so far.
    fn doorbells(&self) -> u64 {
        self.server()
            .device()
            .map_or(0, |d| d.vm().counters.doorbells.load(Ordering::Relaxed))
    }

    /// Commands the connected guest's device executed successfully so far, and those it
    /// refused. Both are counted before the response is written, so they are exact once the
    /// guest's call has returned.
    fn commands(&self) -> (u64, u64) {
        self.server().device().map_or((0, 0), |d| {
            let c = &d.vm().counters;
            (
                c.commands_ok.load(Ordering::Relaxed),
                c.commands_failed.load(Ordering::Relaxed),
            )
        })
    }

    fn wait_for_doorbells(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.doorbells() < count {
            assert!(
                Instant::now() < deadline,
                "{} doorbells, expected {count}",
                self.doorbells()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(self.doorbells(), count);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop(Duration::from_secs(5));
        }
    }
}

fn options(features: u64) -> Options {
    Options {
        queue_size: 16,
        memory_size: 1 << 20,
        features,
        ..Options::default()
    }
}

/// A context on `server`, accepting `features`, and the features negotiated.
fn open(server: &Server, features: u64) -> (Context, u64) {
    let transport = Arc::new(VirtioUser::connect(&server.socket, options(features)).unwrap());
    let negotiated = transport.features();
    (Context::from_transport(transport), negotiated)
}

/// Creates a QP and an SRQ, posts receives to the QP (twice) and to the SRQ, then one send on
/// the QP; returns the commands (executed, refused) the posts alone added.
fn post_receives_then_a_send(server: &Server, ctx: &Context) -> (u64, u64) {
    let pd = ProtectionDomain::new(ctx).unwrap();
    let cq = CompletionQueue::new(ctx, 16).unwrap();
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
    let receives = [RecvWr {
        wr_id: 1,
        sg_list: &[],
    }; 2];
    let send = SendWr::send(2, &[]);
    let (ok, failed) = server.commands();
    // SAFETY: no work request names memory. The QP is in RESET, so the device runs none of
    // them; the commands and the doorbell are all that happens.
    unsafe {
        qp.post_recv(&receives).unwrap();
        qp.post_recv(&receives[..1]).unwrap();
        srq.post_recv(&receives).unwrap();
        qp.post_send(&[send]).unwrap();
    }
    let (ok_after, failed_after) = server.commands();
    (ok_after - ok, failed_after - failed)
}

#[test]
fn receives_are_posted_by_command_where_the_fabric_posts_them_ahead_of_arrival() {
    let server = Server::start(true);
    let (ctx, negotiated) = open(&server, features::ALL_DEVICE);
    assert_ne!(negotiated & features::SYNC_RECV, 0);
    // Two POST_RECV, one POST_SRQ_RECV, all executed by the time each post returned.
    assert_eq!(post_receives_then_a_send(&server, &ctx), (3, 0));
    // The Send doorbell alone: receives ring none.
    server.wait_for_doorbells(1);
}

#[test]
fn receives_send_no_command_where_the_fabric_reads_rings_on_arrival() {
    let server = Server::start(false);
    let (ctx, negotiated) = open(&server, features::ALL_DEVICE);
    assert_eq!(negotiated & features::SYNC_RECV, 0);
    assert_eq!(post_receives_then_a_send(&server, &ctx), (0, 0));
    // The Send doorbell alone.
    server.wait_for_doorbells(1);
}

#[test]
fn a_driver_declining_sync_receives_is_refused_where_the_fabric_needs_them() {
    let server = Server::start(true);
    let declined = VirtioUser::connect(
        &server.socket,
        options(features::ALL_DEVICE & !features::SYNC_RECV),
    );
    assert!(declined.is_err(), "{declined:?}");
    // The daemon lives on and serves a driver that accepts it.
    let (_ctx, negotiated) = open(&server, features::ALL_DEVICE);
    assert_ne!(negotiated & features::SYNC_RECV, 0);
}
