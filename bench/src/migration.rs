//! The `migrate` section: a VM live-migrates between two daemons on this host (`--roce` on
//! loopback addresses, so its address moves from one to the other) while a peer VM left on the
//! first daemon keeps one 8-byte RDMA WRITE at a time outstanding to it. Measured for 1, 64
//! and 1,024 QPs, with 1 GiB registered: the blackout the peer sees (the longest gap between
//! two of its completions), the device state's size, and the time to save and to load it.
//!
//! The VMM is the tests' (`vrdma_tests::vmm`), which sends QEMU's messages; the guests are
//! threads of this process. The byte-for-byte comparison of source and destination memory the
//! tests make is skipped here: a VMM does not do it, and it would lengthen the switch-over.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vrdma::transport::{Options, VirtioUser};
use vrdma::{
    CompletionQueue, Context, MemoryRegion, ProtectionDomain, QpCap, QpInitAttr, QpType, QueuePair,
    SendFlags, SendWr, Sge, WcStatus,
};
use vrdma_tests::vmm::{Plan, migrate};
use vrdma_tests::{SharedTransport, all_access, connect_rc_both, empty_wc};

use crate::procs::{Launch, VmSpec};
use crate::report::Results;
use crate::sections::{Env, Error};

/// QP counts measured.
const QP_COUNTS: [usize; 3] = [1, 64, 1024];
/// Bytes the migrating VM registers (one MR).
const REGISTERED: usize = 1 << 30;
/// The address of the VM that moves (it moves with it).
const VM_GID: &str = "127.0.40.1";
/// The address of its peer, which stays.
const PEER_GID: &str = "127.0.40.2";
/// The peers' ACK timeout exponent: perftest's 14 (4.096 µs × 2^14 ≈ 67 ms).
const TIMEOUT: u8 = 14;
/// Migrations per QP count; the median is reported.
const RUNS: usize = 3;

fn verb(what: &str) -> impl FnOnce(vrdma::Error) -> Error + '_ {
    move |e| Error::Failed(format!("{what}: {}", vrdma::error_chain(&e)))
}

/// One migration's numbers.
#[derive(Debug, Clone, Copy)]
struct Sample {
    blackout_ms: f64,
    downtime_ms: f64,
    state_bytes: f64,
    save_ms: f64,
    load_ms: f64,
}

/// The section.
pub fn migrate_section(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    let counts: &[usize] = if env.quick {
        &QP_COUNTS[..2]
    } else {
        &QP_COUNTS
    };
    for &qps in counts {
        let mut samples = Vec::new();
        for run in 0..if env.quick { 1 } else { RUNS } {
            match one(env, qps, run) {
                Ok(s) => samples.push(s),
                Err(e) => env.failed(format!("migrate, {qps} QPs: {e}"))?,
            }
        }
        if samples.is_empty() {
            continue;
        }
        let med = |f: fn(&Sample) -> f64| {
            let mut v: Vec<f64> = samples.iter().map(f).collect();
            crate::sections::median(&mut v)
        };
        let size = Some(qps as u64);
        let s = Sample {
            blackout_ms: med(|s| s.blackout_ms),
            downtime_ms: med(|s| s.downtime_ms),
            state_bytes: med(|s| s.state_bytes),
            save_ms: med(|s| s.save_ms),
            load_ms: med(|s| s.load_ms),
        };
        r.add("migrate", "blackout", size, "time", s.blackout_ms, "ms");
        r.add("migrate", "downtime", size, "time", s.downtime_ms, "ms");
        r.add("migrate", "state", size, "size", s.state_bytes, "B");
        r.add("migrate", "save", size, "time", s.save_ms, "ms");
        r.add("migrate", "load", size, "time", s.load_ms, "ms");
        eprintln!(
            "  {qps} QPs: blackout {:.1} ms (VMM downtime {:.1} ms), state {:.0} B, save {:.2} ms, load {:.2} ms (median of {})",
            s.blackout_ms,
            s.downtime_ms,
            s.state_bytes,
            s.save_ms,
            s.load_ms,
            samples.len()
        );
    }
    Ok(())
}

fn one(env: &Env, qps: usize, run: usize) -> Result<Sample, Error> {
    let launch = Launch {
        netns: None,
        args: vec!["--roce".into()],
    };
    let tag = format!("migrate-{qps}-{run}");
    let quota = format!("max-qp={}", qps.max(16));
    let source = env.daemon_on(
        &format!("{tag}-source"),
        &[
            VmSpec::with("a", format!("gid={VM_GID},{quota}")),
            VmSpec::with("p", format!("gid={PEER_GID},{quota}")),
        ],
        &launch,
    )?;
    let dest = env.daemon_on(
        &format!("{tag}-dest"),
        &[VmSpec::with(
            "a",
            format!("gid={VM_GID},incoming=on,{quota}"),
        )],
        &launch,
    )?;
    let open = |socket: &std::path::Path| -> Result<(Context, Arc<VirtioUser>), Error> {
        let dev = Arc::new(
            VirtioUser::connect(socket, Options::default())
                .map_err(|e| Error::Failed(format!("connect: {}", vrdma::error_chain(&e))))?,
        );
        Ok((Context::from_transport(SharedTransport(dev.clone())), dev))
    };
    let (ca, dev_a) = open(&source.socket("a"))?;
    let (cp, _dev_p) = open(&source.socket("p"))?;
    let big = ca.alloc(REGISTERED).map_err(verb("allocating 1 GiB"))?;
    let pd_a = ProtectionDomain::new(&ca).map_err(verb("PD"))?;
    let mr_a = MemoryRegion::register(&pd_a, &big, all_access()).map_err(verb("MR"))?;
    let cq_a = CompletionQueue::new(&ca, 1024).map_err(verb("CQ"))?;
    let pd_p = ProtectionDomain::new(&cp).map_err(verb("PD"))?;
    let buf_p = cp.alloc(4096).map_err(verb("buffer"))?;
    let mr_p = MemoryRegion::register(&pd_p, &buf_p, all_access()).map_err(verb("MR"))?;
    let cq_p = CompletionQueue::new(&cp, 1024).map_err(verb("CQ"))?;
    let cap = QpCap {
        max_send_wr: 16,
        max_recv_wr: 16,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    };
    let make = |pd: &ProtectionDomain, cq: &CompletionQueue| {
        QueuePair::new(
            pd,
            &QpInitAttr {
                send_cq: cq,
                recv_cq: cq,
                srq: None,
                cap,
                qp_type: QpType::Rc,
                sq_sig_all: false,
            },
        )
        .map_err(verb("QP"))
    };
    let mut pairs = Vec::with_capacity(qps);
    for _ in 0..qps {
        let (qa, qp) = (make(&pd_a, &cq_a)?, make(&pd_p, &cq_p)?);
        connect_rc_both(&qa, ca.gid(), &qp, cp.gid(), TIMEOUT);
        pairs.push((qa, qp));
    }
    // The peer's ping: one 8-byte WRITE at a time on its first QP, each completion's time.
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (report, times) = std::thread::scope(|s| {
        let pinger = s.spawn(|| {
            let mut times = Vec::with_capacity(1 << 20);
            let mut wc = [empty_wc(); 1];
            let sge = [Sge::new(buf_p.addr(), 8, mr_p.lkey())];
            let mut id = 0u64;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                let wr = SendWr::rdma_write(id, &sge, big.addr(), mr_a.rkey())
                    .with_flags(SendFlags::SIGNALED);
                // SAFETY: the SGE lies in `buf_p`, which outlives the QP and which nothing
                // else touches.
                if unsafe { pairs[0].1.post_send(&[wr]) }.is_err() {
                    return Err(format!("post {id} failed"));
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match cq_p.poll(&mut wc) {
                        Ok(1) if wc[0].status == WcStatus::Success => break,
                        Ok(1) => return Err(format!("write {id}: {:?}", wc[0])),
                        Ok(_) if Instant::now() < deadline => std::hint::spin_loop(),
                        Ok(_) => return Err(format!("write {id} took over 10 s")),
                        Err(e) => return Err(format!("poll: {e}")),
                    }
                }
                times.push(started.elapsed());
            }
            Ok(times)
        });
        std::thread::sleep(Duration::from_millis(100));
        let report = migrate(
            &[(&dev_a, dest.socket("a").as_path())],
            &Plan {
                precopy_rounds: 1,
                skip_compare: true,
                ..Plan::default()
            },
            |_| {},
        );
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        (report, pinger.join())
    });
    let report = report.map_err(|e| Error::Failed(format!("migration: {e}")))?;
    let times = times
        .map_err(|_| Error::Failed("the peer's thread panicked".into()))?
        .map_err(|e| Error::Failed(format!("the peer: {e}")))?;
    let blackout = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let r = &report[0];
    Ok(Sample {
        blackout_ms: blackout.as_secs_f64() * 1e3,
        downtime_ms: r.downtime.as_secs_f64() * 1e3,
        state_bytes: r.state_bytes as f64,
        save_ms: r.save.as_secs_f64() * 1e3,
        load_ms: r.load.as_secs_f64() * 1e3,
    })
}
