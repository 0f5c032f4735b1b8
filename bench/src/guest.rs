//! In-process guests for the fairness, isolation, many-VM and scale scenarios: each is a
//! thread of this process that opens a VM's device through the `vrdma` library (virtio-user,
//! as the tests and vrdma-perf do) and keeps RDMA WRITEs outstanding.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vrdma::mem::DmaBuf;
use vrdma::{
    AccessFlags, AddressHandle, CompletionQueue, Context, MemoryRegion, ProtectionDomain, QpAttr,
    QpAttrMask, QpCap, QpInitAttr, QpState, QpType, QueuePair, SendFlags, SendWr, Sge, WcStatus,
    WorkCompletion,
};

/// Why an in-process guest failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A verb failed.
    #[error("{what}: {}", vrdma::error_chain(.source))]
    Verb {
        /// What the guest was doing.
        what: String,
        /// The library's error.
        source: vrdma::Error,
    },
    /// A work request completed with an error.
    #[error(
        "an RDMA WRITE completed with {status:?} (vendor_err {vendor_err}); see the daemon's log"
    )]
    Completion {
        /// Its status.
        status: WcStatus,
        /// vrdma's detail.
        vendor_err: u32,
    },
    /// Nothing completed for a long time.
    #[error(
        "{outstanding} RDMA WRITEs did not complete within 10 s; the daemon may be stuck or overloaded"
    )]
    Stalled {
        /// Writes in flight.
        outstanding: usize,
    },
    /// The traffic never started.
    #[error("traffic of {who} never started within 10 s")]
    NoTraffic {
        /// Which guest.
        who: String,
    },
    /// A guest thread panicked.
    #[error("a guest thread panicked")]
    Panicked,
    /// Interrupted by a signal.
    #[error("interrupted")]
    Interrupted,
}

fn verb(what: impl Into<String>) -> impl FnOnce(vrdma::Error) -> Error {
    let what = what.into();
    move |source| Error::Verb { what, source }
}

/// Opens VM `socket`'s device with room for large buffers.
pub fn open(socket: &Path) -> Result<Context, Error> {
    Context::open(socket).map_err(verb(format!("opening {}", socket.display())))
}

/// One VM's side of the traffic: QPs on one CQ, and one registered buffer. Fields drop in
/// declaration order: the QPs before the CQ and the MR, the MR before its buffer.
#[derive(Debug)]
pub struct Side {
    /// The QPs.
    pub qps: Vec<QueuePair>,
    /// Their send and receive CQ.
    pub cq: CompletionQueue,
    /// The buffer's registration.
    pub mr: MemoryRegion,
    /// Source of this side's writes (first half) and target of the peer's (second half).
    pub buf: DmaBuf,
    /// Send-queue depth of each QP.
    pub sq_depth: u32,
    _pd: ProtectionDomain,
    /// The device.
    pub ctx: Context,
}

impl Side {
    /// `nqp` RC QPs of send depth `sq_depth` on one CQ of `cq_depth`, and a registered buffer
    /// for `msg`-byte messages: the first half is what this side sends, the second half is
    /// where the peer writes, so no byte is both read and written by the device.
    pub fn new(
        ctx: &Context,
        nqp: usize,
        sq_depth: u32,
        cq_depth: u32,
        msg: u32,
    ) -> Result<Side, Error> {
        let buf_len = 2 * (msg as usize).max(4096);
        let pd = ProtectionDomain::new(ctx).map_err(verb("ibv_alloc_pd"))?;
        let cq = CompletionQueue::new(ctx, cq_depth).map_err(verb("ibv_create_cq"))?;
        let cap = QpCap {
            max_send_wr: sq_depth,
            max_recv_wr: 1,
            ..QpCap::default()
        };
        let mut qps = Vec::with_capacity(nqp);
        for i in 0..nqp {
            let qp = QueuePair::new(
                &pd,
                &QpInitAttr {
                    send_cq: &cq,
                    recv_cq: &cq,
                    cap,
                    qp_type: QpType::Rc,
                    sq_sig_all: false,
                },
            )
            .map_err(verb(format!("ibv_create_qp (QP {i} of {nqp})")))?;
            qps.push(qp);
        }
        let buf = ctx.alloc(buf_len).map_err(verb("allocating the buffer"))?;
        let mr = MemoryRegion::register(&pd, &buf, access()).map_err(verb("ibv_reg_mr"))?;
        let sq_depth = qps.first().map_or(sq_depth, |q| q.cap().max_send_wr);
        Ok(Side {
            qps,
            cq,
            mr,
            buf,
            sq_depth,
            _pd: pd,
            ctx: ctx.clone(),
        })
    }

    /// Where the peer writes: this side's buffer.
    pub fn target(&self) -> Target {
        Target {
            addr: self.buf.addr() + self.buf.len() as u64 / 2,
            rkey: self.mr.rkey(),
        }
    }
}

/// All rights, as perftest registers its buffers.
fn access() -> AccessFlags {
    AccessFlags::LOCAL_WRITE
        | AccessFlags::REMOTE_WRITE
        | AccessFlags::REMOTE_READ
        | AccessFlags::REMOTE_ATOMIC
}

/// Connects QP i of `a` with QP i of `b`, for every i.
pub fn connect(a: &Side, b: &Side) -> Result<(), Error> {
    for (qa, qb) in a.qps.iter().zip(&b.qps) {
        connect_qp(qa, b.ctx.gid(), qb.qp_num())?;
        connect_qp(qb, a.ctx.gid(), qa.qp_num())?;
    }
    Ok(())
}

/// RESET -> INIT -> RTR -> RTS towards `remote_qpn` at `remote_gid`, as perftest does.
fn connect_qp(qp: &QueuePair, remote_gid: vrdma_proto::Gid, remote_qpn: u32) -> Result<(), Error> {
    let init = QpAttr {
        qp_state: QpState::Init,
        qp_access_flags: access(),
        ..QpAttr::default()
    };
    qp.modify(&init, QpAttrMask::RC_INIT)
        .map_err(verb("ibv_modify_qp to INIT"))?;
    let rtr = QpAttr {
        qp_state: QpState::Rtr,
        dest_qp_num: remote_qpn,
        max_dest_rd_atomic: 1,
        min_rnr_timer: 1,
        ah_attr: AddressHandle::attr_for(remote_gid),
        ..QpAttr::default()
    };
    qp.modify(&rtr, QpAttrMask::RC_RTR)
        .map_err(verb("ibv_modify_qp to RTR"))?;
    let rts = QpAttr {
        qp_state: QpState::Rts,
        ..QpAttr::default()
    };
    qp.modify(&rts, QpAttrMask::RC_RTS)
        .map_err(verb("ibv_modify_qp to RTS"))?;
    Ok(())
}

/// The remote buffer a side writes into.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its address.
    pub addr: u64,
    /// Its rkey.
    pub rkey: u32,
}

/// What a guest does while it has nothing to poll.
#[derive(Debug, Clone, Copy)]
pub enum Idle {
    /// Yield the CPU and poll again: for message-rate runs, where sleeping would be the limit.
    Yield,
    /// Sleep: for bulk runs, leaving the cores to the daemon on a small machine.
    Sleep(Duration),
}

/// How a guest loads the fabric.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Bytes per RDMA WRITE.
    pub msg: u32,
    /// Writes kept outstanding over all QPs.
    pub depth: u32,
    /// Writes posted per doorbell.
    pub batch: u32,
    /// What to do when the CQ is empty.
    pub idle: Idle,
}

/// Keeps `load.depth` signalled RDMA WRITEs of `load.msg` bytes outstanding from `side` to
/// `target`, round-robin over its QPs, until `stop`; counts completions in `done`. Drains
/// what is in flight before returning.
pub fn drive(
    side: &Side,
    target: Target,
    load: Load,
    stop: &AtomicBool,
    done: &AtomicU64,
) -> Result<(), Error> {
    let nqp = side.qps.len();
    let cap = side.sq_depth as usize;
    let batch = (load.batch.max(1) as usize).min(cap);
    let depth = (load.depth as usize).max(batch).min(cap * nqp);
    let sge = [Sge::new(side.buf.addr(), load.msg, side.mr.lkey())];
    let mut outstanding = vec![0usize; nqp];
    let mut total = 0usize;
    let mut next = 0usize;
    let mut wc = [WorkCompletion::default(); 64];
    let mut last_progress = Instant::now();
    let mut wrs: Vec<SendWr<'_>> = Vec::with_capacity(batch);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while !stopping && depth - total >= batch {
            // The next QP, in turn, with room for a whole batch.
            let Some(q) = (0..nqp)
                .map(|i| (next + i) % nqp)
                .find(|&q| outstanding[q] + batch <= cap)
            else {
                break;
            };
            wrs.clear();
            wrs.extend((0..batch).map(|_| {
                SendWr::rdma_write(q as u64, &sge, target.addr, target.rkey)
                    .with_flags(SendFlags::SIGNALED)
            }));
            // SAFETY: the SGE lies in `side.buf`, which the caller's `side` keeps alive for
            // the whole call; this function drains every write before it returns, and nothing
            // writes the buffer meanwhile (the bench never touches its bytes).
            unsafe { side.qps[q].post_send(&wrs) }.map_err(verb("ibv_post_send"))?;
            outstanding[q] += batch;
            total += batch;
            next = q + 1;
        }
        if stopping && total == 0 {
            return Ok(());
        }
        let n = side.cq.poll(&mut wc).map_err(verb("ibv_poll_cq"))?;
        for w in &wc[..n] {
            if w.status != WcStatus::Success {
                return Err(Error::Completion {
                    status: w.status,
                    vendor_err: w.vendor_err,
                });
            }
            let q = w.wr_id as usize;
            outstanding[q] = outstanding[q].saturating_sub(1);
            total = total.saturating_sub(1);
        }
        if n > 0 {
            done.fetch_add(n as u64, Ordering::Relaxed);
            last_progress = Instant::now();
            continue;
        }
        if last_progress.elapsed() > Duration::from_secs(10) {
            return Err(Error::Stalled { outstanding: total });
        }
        match load.idle {
            Idle::Yield => std::thread::yield_now(),
            Idle::Sleep(d) => std::thread::sleep(d),
        }
    }
}

/// Writers running in threads; stopped and joined on drop, so no thread outlives a failing
/// scenario.
#[derive(Debug)]
pub struct Writers {
    stop: std::sync::Arc<AtomicBool>,
    counters: Vec<std::sync::Arc<AtomicU64>>,
    names: Vec<String>,
    threads: Vec<std::thread::JoinHandle<(Result<(), Error>, Side)>>,
    /// Sides kept until every writer is joined: targets, and the writers' own sides.
    passive: Vec<Side>,
}

impl Default for Writers {
    fn default() -> Self {
        Writers {
            stop: std::sync::Arc::new(AtomicBool::new(false)),
            counters: Vec::new(),
            names: Vec::new(),
            threads: Vec::new(),
            passive: Vec::new(),
        }
    }
}

impl Writers {
    /// Starts a thread driving `side` towards `target`; returns its index.
    pub fn start(&mut self, name: &str, side: Side, target: Target, load: Load) -> usize {
        let done = std::sync::Arc::new(AtomicU64::new(0));
        let (stop, counter) = (self.stop.clone(), done.clone());
        self.threads.push(std::thread::spawn(move || {
            let r = drive(&side, target, load, &stop, &counter);
            if r.is_err() {
                // One failing writer ends the scenario: the others stop too.
                stop.store(true, Ordering::Relaxed);
            }
            // The side goes back to be dropped after every writer has stopped: its QPs are
            // the responders of a peer's writes, which may still be draining.
            (r, side)
        }));
        self.counters.push(done);
        self.names.push(name.to_owned());
        self.counters.len() - 1
    }

    /// Keeps `side`, the target of some writer, alive until the writers are joined.
    pub fn keep(&mut self, side: Side) {
        self.passive.push(side);
    }

    /// Completions of every writer so far.
    pub fn counts(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits until every writer has completed something, then `warmup`, then counts
    /// completions over `window`. Returns (completions per writer, the exact window).
    pub fn measure(
        &mut self,
        warmup: Duration,
        window: Duration,
    ) -> Result<(Vec<u64>, Duration), Error> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.check()?;
            let counts = self.counts();
            match counts.iter().position(|&c| c == 0) {
                None => break,
                Some(i) if Instant::now() > deadline => {
                    return Err(Error::NoTraffic {
                        who: self.names[i].clone(),
                    });
                }
                Some(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        self.pause(warmup)?;
        let (before, t0) = (self.counts(), Instant::now());
        self.pause(window)?;
        let (after, t1) = (self.counts(), Instant::now());
        self.check()?;
        let diff = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        Ok((diff, t1 - t0))
    }

    fn pause(&mut self, d: Duration) -> Result<(), Error> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.check()?;
            std::thread::sleep(Duration::from_millis(10).min(end - Instant::now()));
        }
        Ok(())
    }

    /// Fails if a writer failed or a signal arrived.
    fn check(&mut self) -> Result<(), Error> {
        if crate::procs::interrupted() {
            return Err(Error::Interrupted);
        }
        if self.stop.load(Ordering::Relaxed) {
            return self.finish();
        }
        Ok(())
    }

    /// Stops every writer, joins them, and returns the first failure.
    pub fn finish(&mut self) -> Result<(), Error> {
        self.stop.store(true, Ordering::Relaxed);
        let mut first = Ok(());
        for t in self.threads.drain(..) {
            let r = match t.join() {
                Ok((r, side)) => {
                    self.passive.push(side);
                    r
                }
                Err(_) => Err(Error::Panicked),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
