//! The management socket (`vrdmactl`'s) of a running daemon: changes an operator makes while
//! guests run take effect at once and touch no other VM. A weight change shows in the shares
//! the VMs measurably get, a VM added serves its guest next to those already connected, a
//! drained VM starts no new work until it resumes (and loses none), quotas change for the
//! connected guest, counters reset on request and only then.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vhost_user_rdma::config::PriorityClass;
use vhost_user_rdma::daemon::Daemon;
use vhost_user_rdma::manage::{self, ControlPlaneThread, ControlSocket, Request, Response};
use vhost_user_rdma::vhost::server::VmStatus;
use vrdma::{CompletionQueue, Context, ProtectionDomain, QpCap, QpType};
use vrdma::{SendFlags, SendWr, Sge, WcStatus};
use vrdma_proto::cmd::Status;
use vrdma_tests::{pattern, rc_pair, read, saturate_from};

/// A daemon run with its control plane, as `vhost-user-rdma --control-socket` runs it, with
/// its VMs' sockets and the management socket in a private directory.
struct Managed {
    plane: Option<ControlPlaneThread>,
    dir: PathBuf,
}

impl Managed {
    /// VMs `name` with extra `--vm` keys, each at gid 10.0.0.N.
    fn start(vms: &[(&str, &str)]) -> Managed {
        let dir = vrdma_tests::test_dir("vrdma-manage");
        let control = dir.join("control.sock").display().to_string();
        let config = vrdma_tests::daemon_config(&dir, vms, &["--control-socket", &control]);
        let socket = ControlSocket::bind(config.control_socket.as_deref().unwrap())
            .expect("management socket");
        let daemon = Daemon::start(&config).expect("daemon starts");
        let plane = manage::spawn(daemon, socket).expect("control plane starts");
        Managed {
            plane: Some(plane),
            dir,
        }
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    fn open(&self, name: &str) -> Context {
        Context::open(self.socket(name)).expect("guest connects")
    }

    /// Sends `request`, which must be carried out.
    fn ask(&self, request: Request) -> Response {
        let response = self.try_ask(request.clone());
        assert!(response.ok, "{request:?} refused: {:?}", response.error);
        response
    }

    fn try_ask(&self, request: Request) -> Response {
        manage::request(&self.dir.join("control.sock"), &request).expect("the daemon answers")
    }

    fn status(&self, name: &str) -> VmStatus {
        let mut vms = self
            .ask(Request::List {
                vm: Some(name.into()),
            })
            .vms;
        assert_eq!(vms.len(), 1);
        vms.remove(0)
    }

    fn counter(&self, name: &str, counter: &str) -> u64 {
        let status = self.status(name);
        status
            .counters
            .iter()
            .find(|(n, _)| n == counter)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no counter {counter} in {status:?}"))
    }

    fn set(&self, name: &str, settings: &str) {
        self.ask(Request::Set {
            vm: name.into(),
            settings: settings.into(),
        });
    }

    /// Threads that keep each of `names` writing to `sink` with the load that keeps shares
    /// defined (`vrdma_tests::SHARE_LOAD`), until `stop` is set.
    fn saturate(
        &self,
        names: &[&str],
        sink: &str,
        stop: &Arc<AtomicBool>,
    ) -> Vec<std::thread::JoinHandle<u64>> {
        let sink = self.open(sink);
        names
            .iter()
            .map(|n| {
                saturate_from(
                    self.open(n),
                    &sink,
                    vrdma_tests::SHARE_LOAD,
                    stop.clone(),
                    Arc::new(AtomicU64::new(0)),
                )
            })
            .collect()
    }

    /// Bytes each of `names` moved over `window`, read through the management socket, once
    /// all of them are moving.
    fn measure(&self, names: &[&str], window: Duration) -> Vec<u64> {
        let bytes = |n: &str| self.counter(n, "bytes");
        let deadline = Instant::now() + Duration::from_secs(10);
        let started: Vec<u64> = names.iter().map(|n| bytes(n)).collect();
        while names.iter().zip(&started).any(|(n, s)| bytes(n) == *s) {
            assert!(Instant::now() < deadline, "traffic never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let before: Vec<u64> = names.iter().map(|n| bytes(n)).collect();
        std::thread::sleep(window);
        names
            .iter()
            .zip(before)
            .map(|(n, b)| bytes(n) - b)
            .collect()
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if let Some(plane) = self.plane.take() {
            plane.stop().expect("the control plane stops cleanly");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How long the caps are measured, as in limits.rs.
const WINDOW: Duration = Duration::from_millis(1000);

/// What `x` moved per byte `y` moved while both saturate the fabric.
fn ratio(d: &Managed) -> f64 {
    let moved = d.measure(&["x", "y"], Duration::from_millis(1500));
    moved[0] as f64 / moved[1] as f64
}

#[test]
fn a_weight_change_at_run_time_shows_in_the_measured_shares() {
    let d = Managed::start(&[("x", ""), ("y", ""), ("sink", "")]);
    let stop = Arc::new(AtomicBool::new(false));
    let threads = d.saturate(&["x", "y"], "sink", &stop);
    let even = ratio(&d);
    d.set("x", "weight=3");
    assert_eq!(d.status("x").weight, 3);
    let skewed = ratio(&d);
    // A cap set at run time holds at once, and lifting it gives the VM the fabric back.
    let cap = 200u64 << 20;
    d.set("x", "max-bw=200M");
    let capped = d.measure(&["x"], WINDOW)[0] as f64 / WINDOW.as_secs_f64();
    d.set("x", "max-bw=none");
    assert_eq!(d.status("x").max_bw, None);
    let lifted = d.measure(&["x"], WINDOW)[0] as f64 / WINDOW.as_secs_f64();
    // Classes set at run time: x's latency class goes first, y's bulk class keeps its tenth.
    d.set("x", "class=latency");
    d.set("y", "class=bulk");
    assert_eq!(d.status("y").class, PriorityClass::Bulk);
    let moved = d.measure(&["x", "y"], Duration::from_millis(1500));
    let bulk_part = moved[1] as f64 / (moved[0] + moved[1]) as f64;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("load thread");
    }
    let mib = (1u64 << 20) as f64;
    eprintln!(
        "weights 1:1 -> {even:.2}:1, then set to 3:1 at run time -> {skewed:.2}:1; x capped at 200 MiB/s: {:.0} MiB/s, cap lifted: {:.0} MiB/s",
        capped / mib,
        lifted / mib
    );
    assert!(
        (0.8..=1.25).contains(&even),
        "equal weights gave {even:.2}, not near 1"
    );
    assert!(
        (2.4..=3.6).contains(&skewed),
        "weights changed to 3:1 gave {skewed:.2}, not near 3"
    );
    // The tolerances of limits.rs, which checks caps given at start.
    let cap = cap as f64;
    assert!(
        (0.85 * cap..=1.1 * cap).contains(&capped),
        "x capped at run time moved {capped:.0} B/s"
    );
    assert!(lifted > 2.0 * cap, "x uncapped again moved {lifted:.0} B/s");
    eprintln!("x latency class, y bulk class: y took {bulk_part:.3} of the bytes");
    assert!(
        (0.05..=0.16).contains(&bulk_part),
        "the bulk class should keep about a tenth, took {bulk_part:.3}"
    );
}

/// Service levels choose a class at run time: a latency VM whose QPs are on SL 0, which
/// `sl.0=bulk` puts in the bulk class, keeps only the bulk class's tenth beside a normal VM;
/// `sl.0=vm` gives the QPs their VM's class back, and the normal VM its tenth. The daemon
/// counts each class's bytes.
#[test]
fn a_service_levels_class_set_at_run_time_moves_the_vms_qps() {
    let d = Managed::start(&[("x", "class=latency,sl.0=bulk"), ("y", ""), ("sink", "")]);
    let status = d.status("x");
    assert_eq!(status.sl_classes.of(0), Some(PriorityClass::Bulk));
    let stop = Arc::new(AtomicBool::new(false));
    let threads = d.saturate(&["x", "y"], "sink", &stop);
    let share_of_x = |moved: Vec<u64>| moved[0] as f64 / (moved[0] + moved[1]) as f64;
    let below = share_of_x(d.measure(&["x", "y"], Duration::from_millis(1500)));
    let by_class = d.status("x").bytes_by_class;
    d.set("x", "sl.0=vm");
    assert_eq!(d.status("x").sl_classes.of(0), None);
    let above = share_of_x(d.measure(&["x", "y"], Duration::from_millis(1500)));
    let by_class_after = d.status("x").bytes_by_class;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("load thread");
    }
    eprintln!(
        "x's QPs on SL 0: in bulk (sl.0=bulk) x took {below:.3}, in latency (sl.0=vm) {above:.3}; x's bytes by class {by_class:?}, then {by_class_after:?}"
    );
    assert_eq!(
        by_class[0], 0,
        "nothing of x in latency while SL 0 gives bulk"
    );
    assert!(by_class[2] > 0, "x's bytes counted in bulk");
    assert!(by_class_after[0] > 0, "x's bytes counted in latency");
    assert!(
        (0.05..=0.16).contains(&below),
        "x's QPs in bulk should keep about a tenth, took {below:.3}"
    );
    assert!(
        (0.84..=0.95).contains(&above),
        "x's QPs back in latency should leave y about a tenth, x took {above:.3}"
    );
}

/// Moves 4 KiB from `from` to `to` by an RDMA WRITE on a fresh RC pair and checks the bytes.
fn write_and_check(from: &Context, to: &Context, seed: u8) {
    let (a, b) = rc_pair(from, to, 4096, QpCap::default());
    pattern(&a.buf, seed);
    let sge = [Sge::new(a.buf.addr(), 4096, a.mr.lkey())];
    a.send(&[
        SendWr::rdma_write(7, &sge, b.buf.addr(), b.mr.rkey()).with_flags(SendFlags::SIGNALED)
    ])
    .expect("post");
    assert_eq!(a.poll_one().status, WcStatus::Success);
    assert_eq!(read(&b.buf, 0, 4096), read(&a.buf, 0, 4096));
}

#[test]
fn a_vm_added_at_run_time_serves_its_guest_while_the_others_keep_theirs() {
    let d = Managed::start(&[("a", ""), ("b", "")]);
    let (ga, gb) = (d.open("a"), d.open("b"));
    // A connection that must outlive the changes: its QPs keep working throughout.
    let (qa, qb) = rc_pair(&ga, &gb, 4096, QpCap::default());
    write_and_check(&ga, &gb, 1);
    let commands_before = d.counter("a", "commands_ok");

    let entry = vrdma_tests::vm_entry(&d.dir, "c", 3, "weight=2");
    d.ask(Request::Add { vm: entry.clone() });
    let c = d.status("c");
    assert!(!c.connected);
    assert_eq!(c.weight, 2);
    // A second VM of that name (or on that socket) is refused, and changes nothing.
    let again = d.try_ask(Request::Add { vm: entry });
    assert!(!again.ok);
    assert!(again.error.unwrap().contains("same name"));

    let gc = d.open("c");
    assert!(d.status("c").connected);
    write_and_check(&gc, &ga, 2);
    write_and_check(&gb, &gc, 3);
    // a and b kept their connections: the pair made before the add still works.
    pattern(&qa.buf, 4);
    let sge = [Sge::new(qa.buf.addr(), 4096, qa.mr.lkey())];
    qa.send(&[
        SendWr::rdma_write(9, &sge, qb.buf.addr(), qb.mr.rkey()).with_flags(SendFlags::SIGNALED)
    ])
    .unwrap();
    assert_eq!(qa.poll_one().status, WcStatus::Success);
    assert_eq!(read(&qb.buf, 0, 4096), read(&qa.buf, 0, 4096));
    assert!(d.counter("a", "commands_ok") > commands_before);

    // Removing c takes its device from its guest and its socket away; a and b go on.
    d.ask(Request::Remove { vm: "c".into() });
    assert!(!d.socket("c").exists(), "c's socket is removed");
    assert!(
        ProtectionDomain::new(&gc).is_err(),
        "c's guest must see its device gone"
    );
    let listed: Vec<String> = d
        .ask(Request::List { vm: None })
        .vms
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(listed, ["a", "b"]);
    write_and_check(&ga, &gb, 5);
    let unknown = d.try_ask(Request::Remove { vm: "c".into() });
    assert!(!unknown.ok && unknown.error.unwrap().contains("no VM called \"c\""));

    // The same VM again, on the same socket: served at once, its old socket's watch gone
    // with it (the removal did not wait for a thread stuck in accept, which it would have
    // for seconds).
    let entry = vrdma_tests::vm_entry(&d.dir, "c", 3, "");
    let started = Instant::now();
    d.ask(Request::Add { vm: entry });
    let gc = d.open("c");
    write_and_check(&gc, &ga, 6);
    drop(gc);
    d.ask(Request::Remove { vm: "c".into() });
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "add, connect and remove took {:?}",
        started.elapsed()
    );
    // A VM added without gid= takes the first default address no VM has: a's, once a goes.
    drop((qa, qb, ga));
    d.ask(Request::Remove { vm: "a".into() });
    let dir = d.dir.display().to_string();
    d.ask(Request::Add {
        vm: format!("name=e,socket={dir}/e.sock"),
    });
    assert!(
        d.status("e").gid.ends_with("0a00:0001"),
        "{:?}",
        d.status("e")
    );
    let ge = d.open("e");
    write_and_check(&ge, &gb, 7);
}

/// The management socket serves a bounded number of clients at once (the next waits until one
/// has gone), and takes a request its client ends by closing, without a newline.
#[test]
fn the_management_socket_bounds_its_clients_and_takes_a_request_ended_by_eof() {
    use std::io::{Read, Write};
    let d = Managed::start(&[("a", "")]);
    let control = d.dir.join("control.sock");
    let mut stream = std::os::unix::net::UnixStream::connect(&control).unwrap();
    stream.write_all(br#"{"command":"list"}"#).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let answer: Response = serde_json::from_str(&answer).unwrap();
    assert!(answer.ok && answer.vms[0].name == "a");
    let idle: Vec<_> = (0..16)
        .map(|_| std::os::unix::net::UnixStream::connect(&control).unwrap())
        .collect();
    let waiting = std::thread::spawn(move || {
        manage::request(&control, &Request::List { vm: None }).expect("an answer, later")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !waiting.is_finished(),
        "served while 16 clients were connected"
    );
    drop(idle);
    let answer = waiting.join().unwrap();
    assert!(answer.ok && answer.vms.len() == 1);
}

#[test]
fn a_drained_vm_starts_no_new_work_until_it_resumes_and_loses_none() {
    let d = Managed::start(&[("a", ""), ("b", "")]);
    let (ga, gb) = (d.open("a"), d.open("b"));
    let (a, b) = rc_pair(&ga, &gb, 1 << 16, QpCap::default());
    write_and_check(&ga, &gb, 1);
    d.ask(Request::Drain { vm: "a".into() });
    let status = d.status("a");
    assert!(status.draining);
    assert_eq!(status.sends_under_way, 0, "nothing was under way");

    // Posted while draining: it waits in the ring, not started and not failed.
    pattern(&a.buf, 9);
    let sge = [Sge::new(a.buf.addr(), 1 << 16, a.mr.lkey())];
    let writes: Vec<SendWr<'_>> = (0..4)
        .map(|i| {
            SendWr::rdma_write(i, &sge, b.buf.addr(), b.mr.rkey()).with_flags(SendFlags::SIGNALED)
        })
        .collect();
    a.send(&writes).expect("posting to a draining VM succeeds");
    a.assert_no_completion(Duration::from_millis(300));
    assert_ne!(
        read(&b.buf, 0, 1 << 16),
        read(&a.buf, 0, 1 << 16),
        "no byte of the drained VM's writes may have moved"
    );
    // b is not drained: its work goes on meanwhile.
    write_and_check(&gb, &ga, 2);

    d.ask(Request::Resume { vm: "a".into() });
    assert!(!d.status("a").draining);
    for i in 0..4 {
        let wc = a.poll_one();
        assert_eq!((wc.wr_id, wc.status), (i, WcStatus::Success));
    }
    assert_eq!(read(&b.buf, 0, 1 << 16), read(&a.buf, 0, 1 << 16));
}

fn refused<T: std::fmt::Debug>(r: vrdma::Result<T>) -> Status {
    match r {
        Err(vrdma::Error::Device { status, .. }) => status,
        other => panic!("expected the device to refuse, got {other:?}"),
    }
}

#[test]
fn quotas_changed_at_run_time_hold_for_the_connected_guest() {
    let d = Managed::start(&[("a", "max-pd=4,max-qp=2"), ("b", "")]);
    let ga = d.open("a");
    let pds: Vec<_> = (0..3)
        .map(|_| ProtectionDomain::new(&ga).unwrap())
        .collect();

    // Lowered below what is in use: those stay, no more are made. The device's attributes
    // stay as the driver read them (constant while it runs).
    d.set("a", "max-pd=2");
    assert_eq!(ga.query_device().unwrap().max_pd.get(), 4);
    assert_eq!(refused(ProtectionDomain::new(&ga)), Status::NoResources);
    let pd_use = d.status("a").objects.into_iter().find(|o| o.kind == "pd");
    let pd_use = pd_use.expect("pd in the list");
    assert_eq!((pd_use.in_use, pd_use.quota), (3, 2));
    drop(pds);
    let pds: Vec<_> = (0..2)
        .map(|_| ProtectionDomain::new(&ga).unwrap())
        .collect();
    assert_eq!(refused(ProtectionDomain::new(&ga)), Status::NoResources);
    drop(pds);

    // Raised beyond what the guest connected with: QPs in the new slots carry traffic (the
    // scheduler's ready list grew to tell them apart).
    d.set("a", "max-pd=16");
    let gb = d.open("b");
    let first: Vec<_> = (0..2)
        .map(|_| rc_pair(&ga, &gb, 4096, QpCap::default()))
        .collect();
    let pd = ProtectionDomain::new(&ga).unwrap();
    let cq = CompletionQueue::new(&ga, 4).unwrap();
    assert_eq!(
        refused(vrdma_tests::new_qp(&pd, &cq, QpType::Rc, QpCap::default())),
        Status::NoResources
    );
    d.set("a", "max-qp=16");
    assert_eq!(ga.query_device().unwrap(), ga.device_attr());
    let more: Vec<_> = (0..6)
        .map(|_| rc_pair(&ga, &gb, 4096, QpCap::default()))
        .collect();
    for (i, (x, y)) in first.iter().chain(&more).enumerate() {
        pattern(&x.buf, i as u8);
        let sge = [Sge::new(x.buf.addr(), 4096, x.mr.lkey())];
        x.send(&[
            SendWr::rdma_write(i as u64, &sge, y.buf.addr(), y.mr.rkey())
                .with_flags(SendFlags::SIGNALED),
        ])
        .unwrap();
    }
    for (x, y) in first.iter().chain(&more) {
        assert_eq!(x.poll_one().status, WcStatus::Success);
        assert_eq!(read(&y.buf, 0, 4096), read(&x.buf, 0, 4096));
    }
    // The next connection's device reports them.
    drop((first, more, pd, cq, ga));
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.status("a").connected {
        assert!(Instant::now() < deadline, "a's guest never left");
        std::thread::sleep(Duration::from_millis(5));
    }
    let again = d.open("a");
    assert_eq!(again.device_attr().max_qp.get(), 16);
    assert_eq!(again.device_attr().max_pd.get(), 16);
    // A key that cannot change at run time is refused with the reason.
    let refusal = d.try_ask(Request::Set {
        vm: "a".into(),
        settings: "socket=/elsewhere".into(),
    });
    assert!(!refusal.ok);
    assert!(
        refusal
            .error
            .unwrap()
            .contains("cannot change while the VM runs")
    );
}

#[test]
fn counters_run_across_connections_and_reset_only_on_request() {
    let d = Managed::start(&[("a", ""), ("b", "")]);
    {
        let (ga, gb) = (d.open("a"), d.open("b"));
        write_and_check(&ga, &gb, 1);
    }
    let wait_disconnected = |name: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.status(name).connected {
            assert!(Instant::now() < deadline, "{name} stayed connected");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_disconnected("a");
    wait_disconnected("b");
    let (a_wrs, b_commands) = (d.counter("a", "wrs"), d.counter("b", "commands_ok"));
    assert_eq!(a_wrs, 1);
    assert!(b_commands > 0);
    {
        let (ga, gb) = (d.open("a"), d.open("b"));
        write_and_check(&ga, &gb, 2);
        assert_eq!(
            d.counter("a", "wrs"),
            2,
            "counters run on across connections"
        );
    }
    d.ask(Request::Reset {
        vm: Some("a".into()),
    });
    assert!(d.status("a").counters.iter().all(|(_, v)| *v == 0));
    assert!(d.counter("b", "commands_ok") > b_commands, "b's are kept");
    d.ask(Request::Reset { vm: None });
    assert_eq!(d.counter("b", "commands_ok"), 0);
}
