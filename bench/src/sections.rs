//! The bench's sections. Each starts its own daemon (so its CPU time and memory belong to that
//! section alone), measures, records into [`Results`], and stops the daemon on every exit
//! path. A failing measurement inside a section is noted and the section goes on where that
//! makes sense.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vrdma_netns::Netns;

use crate::guest::{self, Idle, Load, Side, Writers};
use crate::perf::{self, Length, Rows, Run};
use crate::procs::{self, Daemon, Launch, VmSpec};
use crate::report::Results;
use crate::{memcpy, qperf, report};

/// Why a section failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A child process.
    #[error(transparent)]
    Process(#[from] procs::Error),
    /// vrdma-perf.
    #[error(transparent)]
    Perf(#[from] perf::Error),
    /// qperf.
    #[error(transparent)]
    Qperf(#[from] qperf::Error),
    /// An in-process guest.
    #[error(transparent)]
    Guest(#[from] guest::Error),
    /// The simulated hosts of the roce section.
    #[error(transparent)]
    Netns(#[from] vrdma_netns::NetnsError),
    /// The section cannot run here, and why.
    #[error("skipped: {0}")]
    Skipped(String),
    /// A measurement failed, and why.
    #[error("{0}")]
    Failed(String),
    /// A system call the section itself makes failed.
    #[error("{what}: {source}")]
    Io {
        /// What the section was doing.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A directory could not be made.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Everything sections share: options, where things go, and failures noted along the way.
#[derive(Debug)]
pub struct Env {
    /// Few sizes, short runs.
    pub quick: bool,
    /// Seconds per bandwidth point in a full run.
    pub secs: u64,
    /// The output directory.
    pub out: PathBuf,
    /// Where daemons put their sockets (short, because socket paths are limited to 108 bytes).
    pub sock_root: PathBuf,
    /// Measurements that failed inside sections that went on.
    pub failures: Vec<String>,
    /// The isolation section's daemon's `--step-time-us`, if any.
    pub step_time_us: Option<f64>,
}

/// The sections, in the order they run.
pub const SECTIONS: [&str; 14] = [
    "vrdma",
    "tcp",
    "wakeup",
    "roce",
    "shim",
    "memcpy",
    "mr",
    "idle",
    "fairness",
    "isolation",
    "registering",
    "many",
    "scale",
    "migrate",
];

/// The RDMA operations compared.
pub const OPS: [&str; 3] = ["write", "read", "send"];

/// The series name of a vrdma-perf operation and mode, e.g. "vrdma write poll".
pub fn vrdma_series(op: &str, events: bool) -> String {
    format!("vrdma {op} {}", if events { "event" } else { "poll" })
}

/// The series of qperf's TCP bandwidth and latency.
pub const TCP_BW: &str = "qperf tcp_bw";
/// See [`TCP_BW`].
pub const TCP_LAT: &str = "qperf tcp_lat";

/// Where a vrdma-against-TCP comparison is recorded: the results sections of its bandwidth
/// and latency values, and its name, which prefixes its ratios, failures and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compared {
    /// The section of bandwidth values (metric bw).
    pub bw: &'static str,
    /// The section of latency values (vrdma's t_typical..., qperf's latency).
    pub lat: &'static str,
    /// Empty for the one-host comparison.
    pub name: &'static str,
}

impl Compared {
    /// `what`, prefixed with the comparison's name if it has one.
    pub fn named(&self, what: &str) -> String {
        if self.name.is_empty() {
            what.to_owned()
        } else {
            format!("{} {what}", self.name)
        }
    }
}

/// One host: two VMs of one daemon, and TCP on loopback.
pub const LOCAL: Compared = Compared {
    bw: "bandwidth",
    lat: "latency",
    name: "",
};

/// Two hosts (network namespaces joined by veth): one VM on each host's daemon, talking
/// RoCEv2, and TCP across the same veth.
pub const ROCE: Compared = Compared {
    bw: "roce_bandwidth",
    lat: "roce_latency",
    name: "roce",
};

/// Powers of two from `lo` to `hi`.
fn pow2(lo: u64, hi: u64) -> Vec<u64> {
    std::iter::successors(Some(lo), |s| Some(s * 2))
        .take_while(|&s| s <= hi)
        .collect()
}

impl Env {
    /// Bandwidth message sizes: 8 B to 4 MiB.
    pub fn bw_sizes(&self) -> Vec<u64> {
        if self.quick {
            vec![8, 4096, 65536, 1 << 20]
        } else {
            pow2(8, 4 << 20)
        }
    }

    /// Latency message sizes: 8 B to 64 KiB.
    pub fn lat_sizes(&self) -> Vec<u64> {
        if self.quick {
            vec![8, 4096]
        } else {
            pow2(8, 64 << 10)
        }
    }

    /// `name` under the output directory, created.
    pub(crate) fn dir(&self, name: &str) -> Result<PathBuf, Error> {
        let path = self.out.join(name);
        std::fs::create_dir_all(&path).map_err(|source| Error::Dir {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Starts a daemon for `vms`, its log in logs/daemon-TAG.log.
    pub(crate) fn daemon(&self, tag: &str, vms: &[VmSpec]) -> Result<Daemon, Error> {
        self.daemon_on(tag, vms, &Launch::default())
    }

    /// [`Env::daemon`] where and as `launch` says.
    pub(crate) fn daemon_on(
        &self,
        tag: &str,
        vms: &[VmSpec],
        launch: &Launch,
    ) -> Result<Daemon, Error> {
        let bin = procs::sibling("vhost-user-rdma", "vhost-user-rdma")?;
        let log = self.dir("logs")?.join(format!("daemon-{tag}.log"));
        Ok(Daemon::start(
            &bin,
            &self.sock_root.join(tag),
            &log,
            vms,
            launch,
        )?)
    }

    fn window(&self, quick: f64, full: f64) -> Duration {
        Duration::from_secs_f64(if self.quick { quick } else { full })
    }

    /// A measurement failed: ends the run if that was Ctrl-C, otherwise records the failure
    /// so the section can go on with the next measurement.
    pub(crate) fn failed(&mut self, what: String) -> Result<(), Error> {
        if procs::interrupted() {
            return Err(procs::Error::Interrupted.into());
        }
        eprintln!();
        eprintln!("  FAILED: {what}");
        self.failures.push(what);
        Ok(())
    }
}

/// The two VMs vrdma-perf runs between (`-d`, `--loopback`), and the daemons serving them.
struct Ends<'a> {
    daemons: Vec<&'a mut Daemon>,
    dev: PathBuf,
    loopback: PathBuf,
}

impl<'a> Ends<'a> {
    /// VMs `a` and `b` of one daemon.
    fn local(daemon: &'a mut Daemon) -> Ends<'a> {
        let (dev, loopback) = (daemon.socket("a"), daemon.socket("b"));
        Ends {
            daemons: vec![daemon],
            dev,
            loopback,
        }
    }

    /// Fails if a daemon has died.
    fn check_alive(&mut self) -> Result<(), Error> {
        for d in &mut self.daemons {
            d.check_alive()?;
        }
        Ok(())
    }

    /// The daemons' CPU time so far, together.
    fn cpu(&self) -> Result<Duration, Error> {
        let mut sum = Duration::ZERO;
        for d in &self.daemons {
            sum += d.cpu()?;
        }
        Ok(sum)
    }
}

/// Runs vrdma-perf once, with the daemons' CPU over the run.
fn perf_run(
    env: &Env,
    ends: &mut Ends<'_>,
    run: &Run,
    dir: &Path,
) -> Result<(perf::Report, f64), Error> {
    let bin = procs::sibling("vrdma-perf", "vrdma-perf")?;
    let limit = match run.length {
        Length::Seconds(s) => Duration::from_secs(s + 120),
        Length::Iterations(_) if env.quick => Duration::from_secs(60),
        Length::Iterations(_) => Duration::from_secs(300),
    };
    let (c0, t0) = (ends.cpu()?, Instant::now());
    let report = perf::run(&bin, run, &ends.dev, &ends.loopback, dir, limit);
    ends.check_alive()?;
    let cpu = procs::percent(ends.cpu()?.saturating_sub(c0), t0.elapsed());
    Ok((report?, cpu))
}

/// One vrdma-perf series: an operation and mode over message sizes.
#[derive(Debug, Clone)]
struct Series {
    op: &'static str,
    events: bool,
    /// "bw" or "lat".
    kind: &'static str,
    sizes: Vec<u64>,
    /// vrdma-perf's `-m`, if not the port's.
    mtu: Option<u32>,
    /// Where it is recorded.
    into: Compared,
}

/// Runs vrdma-perf for each size of `s` and records the results as series
/// [`vrdma_series`]. A failed run is noted and ends the series (the rest would fail the same
/// way).
fn perf_series(
    env: &mut Env,
    r: &mut Results,
    ends: &mut Ends<'_>,
    s: &Series,
    dir: &Path,
) -> Result<(), Error> {
    let series = vrdma_series(s.op, s.events);
    for &size in &s.sizes {
        procs::check_interrupt()?;
        let length = match (s.kind, env.quick) {
            // About 64 MiB per point, at least 200 messages.
            ("bw", true) => Length::Iterations(((64 << 20) / size).clamp(200, 20_000)),
            ("bw", false) => Length::Seconds(env.secs),
            (_, true) => Length::Iterations(1000),
            (_, false) => Length::Iterations(10_000),
        };
        let run = Run {
            test: if s.kind == "bw" {
                bw_test(s.op)
            } else {
                lat_test(s.op)
            },
            size,
            length,
            events: s.events,
            post_list: None,
            tx_depth: None,
            mtu: s.mtu,
        };
        eprint!(
            "  {} {size} B{} ...",
            run.test,
            if s.events { " -e" } else { "" }
        );
        match perf_run(env, ends, &run, dir) {
            Ok((rep, cpu)) => {
                let path = dir.join(format!("{}.json", run.stem()));
                let path = path.display().to_string();
                let (bw, lat) = (s.into.bw, s.into.lat);
                if s.kind == "bw" {
                    let e = rep.bw_for(size, &path)?;
                    eprintln!(" {:.1} MiB/s", e.bw_avg_mib);
                    r.add(bw, &series, Some(size), "bw", e.bw_avg_mib, "MiB/s");
                    r.add(bw, &series, Some(size), "bw_peak", e.bw_peak_mib, "MiB/s");
                    r.add(
                        bw,
                        &series,
                        Some(size),
                        "msg_rate",
                        e.msg_rate_mpps,
                        "Mmsg/s",
                    );
                    r.add(bw, &series, Some(size), "daemon_cpu", cpu, "%");
                } else {
                    let e = rep.lat_for(size, &path)?;
                    eprintln!(" {:.2} us", e.t_typical_us);
                    for (m, v) in [
                        ("t_typical", e.t_typical_us),
                        ("t_avg", e.t_avg_us),
                        ("t_min", e.t_min_us),
                        ("t_max", e.t_max_us),
                        ("p99", e.p99_us),
                        ("p999", e.p999_us),
                    ] {
                        r.add(lat, &series, Some(size), m, v, "us");
                    }
                    r.add(lat, &series, Some(size), "daemon_cpu", cpu, "%");
                }
            }
            Err(e) => {
                let what = format!("{} {size} B events={}: {e}", run.test, s.events);
                env.failed(s.into.named(&what))?;
                ends.check_alive()?;
                break;
            }
        }
    }
    Ok(())
}

/// vrdma WRITE, READ and SEND bandwidth and latency, polling and event mode, through
/// vrdma-perf; then the 8-byte message rate with batched posting.
pub fn vrdma(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    let dir = env.dir("vrdma-perf")?;
    let mut daemon = env.daemon("vrdma", &[VmSpec::new("a"), VmSpec::new("b")])?;
    let mut ends = Ends::local(&mut daemon);
    for op in OPS {
        for events in [false, true] {
            for (kind, sizes) in [("bw", env.bw_sizes()), ("lat", env.lat_sizes())] {
                let s = Series {
                    op,
                    events,
                    kind,
                    sizes,
                    mtu: None,
                    into: LOCAL,
                };
                perf_series(env, r, &mut ends, &s, &dir)?;
            }
        }
    }
    // The message-rate target: 8-byte writes, posted 32 per doorbell, 512 outstanding (a
    // deeper queue than perftest's default 128, as message-rate runs use).
    for events in [false, true] {
        let run = Run {
            test: "write_bw",
            size: 8,
            length: if env.quick {
                Length::Iterations(100_000)
            } else {
                Length::Seconds(env.secs)
            },
            events,
            post_list: Some(32),
            tx_depth: Some(512),
            mtu: None,
        };
        let series = format!("{}, post list 32", vrdma_series("write", events));
        eprint!(
            "  write_bw 8 B -l 32{} ...",
            if events { " -e" } else { "" }
        );
        match perf_run(env, &mut ends, &run, &dir) {
            Ok((rep, cpu)) => {
                let e = rep.bw_for(8, "write_bw -l 32")?;
                eprintln!(" {:.3} Mmsg/s", e.msg_rate_mpps);
                r.add(
                    "rate",
                    &series,
                    Some(8),
                    "msg_rate",
                    e.msg_rate_mpps,
                    "Mmsg/s",
                );
                r.add("rate", &series, Some(8), "daemon_cpu", cpu, "%");
            }
            Err(e) => env.failed(format!("write_bw 8 B -l 32 events={events}: {e}"))?,
        }
    }
    Ok(())
}

fn bw_test(op: &str) -> &'static str {
    match op {
        "write" => "write_bw",
        "read" => "read_bw",
        _ => "send_bw",
    }
}

fn lat_test(op: &str) -> &'static str {
    match op {
        "write" => "write_lat",
        "read" => "read_lat",
        _ => "send_lat",
    }
}

/// TCP on loopback with qperf: tcp_bw for the bandwidth sizes, tcp_lat for the latency sizes.
pub fn tcp(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    let dir = env.dir("logs")?;
    let server = qperf::Server::start(&dir.join("qperf-server.log"))?;
    let (bw, lat) = (env.bw_sizes(), env.lat_sizes());
    qperf_series(env, r, &server, (&bw, &lat), LOCAL, &dir)
}

/// qperf's client against `server`: tcp_bw for the first sizes of `sizes`, tcp_lat for the
/// second, recorded as [`TCP_BW`] and [`TCP_LAT`] where `into` says; its output in
/// `dir`/[NAME-]qperf-SIZE.log. A failed size is noted and the next one runs.
fn qperf_series(
    env: &mut Env,
    r: &mut Results,
    server: &qperf::Server,
    sizes: (&[u64], &[u64]),
    into: Compared,
    dir: &Path,
) -> Result<(), Error> {
    let secs = if env.quick { 1 } else { env.secs };
    let (bw, lat) = sizes;
    let mut all = bw.to_vec();
    all.extend(lat);
    all.sort_unstable();
    all.dedup();
    for size in all {
        procs::check_interrupt()?;
        let mut tests = Vec::new();
        if bw.contains(&size) {
            tests.push("tcp_bw");
        }
        if lat.contains(&size) {
            tests.push("tcp_lat");
        }
        eprint!("  qperf {} {size} B ...", tests.join(" "));
        let log = dir.join(format!(
            "{}-{size}.log",
            into.named("qperf").replace(' ', "-")
        ));
        match server.run(&tests, size, secs, &log) {
            Ok(mut q) => {
                // TCP's latency is one thread wake-up per message, and on a virtual machine a
                // wake-up costs 2 to 30 µs depending on what ran just before (the hypervisor's
                // halt polling adapts). Take the best of three, so the baseline is TCP at its
                // fastest, never a slow moment.
                if q.latency_us.is_some() {
                    for _ in 0..2 {
                        let again = server.run(&["tcp_lat"], size, secs, &log);
                        if let Ok(Some(l)) = again.map(|a| a.latency_us) {
                            q.latency_us = q.latency_us.map(|best| best.min(l));
                        }
                    }
                }
                if let Some(bw) = q.bw_bytes_per_sec {
                    eprint!(" {:.1} MiB/s", bw / MIB);
                    r.add(into.bw, TCP_BW, Some(size), "bw", bw / MIB, "MiB/s");
                }
                if let Some(lat) = q.latency_us {
                    eprint!(" {lat:.2} us");
                    r.add(into.lat, TCP_LAT, Some(size), "latency", lat, "us");
                }
                eprintln!();
            }
            Err(e) => env.failed(into.named(&format!("qperf {size} B: {e}")))?,
        }
    }
    Ok(())
}

/// The two simulated hosts' addresses on their veth, with and without the prefix length.
const ROCE_HOSTS: [(&str, &str); 2] =
    [("10.66.0.1/24", "10.66.0.1"), ("10.66.0.2/24", "10.66.0.2")];
/// The veth's MTU: jumbo frames, as RoCE networks use.
const VETH_MTU: u32 = 9000;
/// The path MTU vrdma-perf asks for: a 4096-byte payload and RoCEv2's headers (IPv4 20, UDP 8,
/// BTH 12, RETH 16, ICRC 4 bytes) fit the 9000-byte veth in one frame.
const ROCE_PATH_MTU: u32 = 4096;
/// Bandwidth message sizes across hosts.
const ROCE_BW_SIZES: [u64; 4] = [64, 4096, 64 << 10, 1 << 20];
/// Latency message sizes across hosts.
const ROCE_LAT_SIZES: [u64; 1] = [8];

/// Two hosts on this machine, network namespaces joined by a veth pair: vrdma RDMA WRITE
/// between a VM on each host's daemon (RoCEv2 over UDP across the veth), guests polling,
/// against qperf TCP across the same veth. Needs root; the namespaces go on every exit path.
pub fn roce(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    if !procs::is_root() {
        return Err(Error::Skipped(
            "creating network namespaces needs root; run bench/run as root".into(),
        ));
    }
    // Deleted on drop, whatever happens in between; the veth pair goes with them.
    let hosts = [Netns::new("vrdma-bench-a")?, Netns::new("vrdma-bench-b")?];
    let [(a_cidr, a_ip), (b_cidr, b_ip)] = ROCE_HOSTS;
    vrdma_netns::veth(&hosts[0], &[a_cidr], &hosts[1], &[b_cidr], VETH_MTU)?;
    eprintln!(
        "  hosts: {} ({a_ip}) and {} ({b_ip}), veth MTU {VETH_MTU}",
        hosts[0].name(),
        hosts[1].name(),
    );
    if let Err(e) = roce_vrdma(env, r, &hosts) {
        env.failed(ROCE.named(&format!("vrdma: {e}")))?;
    }
    let dir = env.dir("logs")?;
    let route = qperf::Route {
        server_netns: Some(hosts[0].name().to_owned()),
        client_netns: Some(hosts[1].name().to_owned()),
        address: a_ip.to_owned(),
    };
    match qperf::Server::start_on(&dir.join("qperf-roce-server.log"), route) {
        Ok(server) => {
            qperf_series(
                env,
                r,
                &server,
                (&ROCE_BW_SIZES, &ROCE_LAT_SIZES),
                ROCE,
                &dir,
            )?;
        }
        Err(e) => env.failed(ROCE.named(&format!("qperf: {e}")))?,
    }
    Ok(())
}

/// The vrdma half of [`roce`]: a `--roce` daemon in each namespace serving one VM whose GID is
/// that host's address; vrdma-perf (in this namespace: vhost-user sockets are paths) drives
/// both VMs.
fn roce_vrdma(env: &mut Env, r: &mut Results, hosts: &[Netns; 2]) -> Result<(), Error> {
    let dir = env.dir("vrdma-perf/roce")?;
    let mut daemons = Vec::new();
    for ((vm, host), (_, ip)) in [("a", &hosts[0]), ("b", &hosts[1])]
        .into_iter()
        .zip(ROCE_HOSTS)
    {
        let launch = Launch {
            netns: Some(host.name().to_owned()),
            args: vec!["--roce".into()],
        };
        let spec = VmSpec::with(vm, format!("gid={ip}"));
        daemons.push(env.daemon_on(&format!("roce-{vm}"), &[spec], &launch)?);
    }
    let (dev, loopback) = (daemons[0].socket("a"), daemons[1].socket("b"));
    let mut ends = Ends {
        daemons: daemons.iter_mut().collect(),
        dev,
        loopback,
    };
    for (kind, sizes) in [("bw", &ROCE_BW_SIZES[..]), ("lat", &ROCE_LAT_SIZES[..])] {
        let s = Series {
            op: "write",
            events: false,
            kind,
            sizes: sizes.to_vec(),
            mtu: Some(ROCE_PATH_MTU),
            into: ROCE,
        };
        perf_series(env, r, &mut ends, &s, &dir)?;
    }
    Ok(())
}

const MIB: f64 = (1u64 << 20) as f64;

/// Single-thread memcpy bandwidth for the bandwidth sizes.
pub fn memcpy(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    let time = env.window(0.03, 0.3);
    for size in env.bw_sizes() {
        procs::check_interrupt()?;
        let bw = memcpy::bandwidth(size as usize, time) / MIB;
        eprintln!("  memcpy {size} B: {bw:.0} MiB/s");
        r.add("bandwidth", "memcpy", Some(size), "bw", bw, "MiB/s");
    }
    Ok(())
}

/// Memory registration and deregistration time, 4 KiB to 1 GiB.
pub fn mr(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    let daemon = env.daemon("mr", &[VmSpec::new("mr")])?;
    let ctx = guest::open(&daemon.socket("mr"))?;
    let pd = vrdma::ProtectionDomain::new(&ctx).map_err(|source| guest::Error::Verb {
        what: "ibv_alloc_pd".into(),
        source,
    })?;
    let runs = if env.quick { 3 } else { 9 };
    let access = vrdma::AccessFlags::LOCAL_WRITE
        | vrdma::AccessFlags::REMOTE_WRITE
        | vrdma::AccessFlags::REMOTE_READ;
    for size in [4u64 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30] {
        procs::check_interrupt()?;
        let verb = |what: &str| {
            let what = format!("{what} ({} bytes)", size);
            move |source| guest::Error::Verb { what, source }
        };
        let buf = ctx.alloc(size as usize).map_err(verb("allocating"))?;
        let (mut reg, mut dereg) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let t0 = Instant::now();
            let mr =
                vrdma::MemoryRegion::register(&pd, &buf, access).map_err(verb("ibv_reg_mr"))?;
            let t1 = Instant::now();
            drop(mr);
            reg.push((t1 - t0).as_secs_f64() * 1e3);
            dereg.push(t1.elapsed().as_secs_f64() * 1e3);
        }
        let first = reg[0];
        let (reg, dereg) = (median(&mut reg), median(&mut dereg));
        eprintln!(
            "  ibv_reg_mr {}: {reg:.3} ms (first {first:.3} ms), dereg {dereg:.3} ms",
            report::size_label(size)
        );
        r.add("mr", "ibv_reg_mr", Some(size), "time", reg, "ms");
        r.add("mr", "ibv_reg_mr, first", Some(size), "time", first, "ms");
        r.add("mr", "ibv_dereg_mr", Some(size), "time", dereg, "ms");
    }
    Ok(())
}

/// The median; sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Series of section `idle`: the daemon with `n` VMs, idle; then one pair of them in a
/// ping-pong; then all idle again.
pub fn idle_series(n: u64) -> [String; 3] {
    [
        format!("{n} idle VMs, event mode"),
        format!("{n} VMs, one pair in an 8 B ping-pong"),
        format!("{n} VMs, idle again after the ping-pong"),
    ]
}

/// Daemon CPU with idle guests in event mode: each VM's guest has a QP connected to a
/// neighbour and an armed CQ, and sleeps. Then the scheduler's adaptive polling: the daemon's
/// CPU while one pair ping-pongs 8-byte writes (the scheduler polls), and once they stop
/// (it must sleep again).
pub fn idle(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    let n = if env.quick { 4 } else { 16 };
    let vms: Vec<VmSpec> = (0..n).map(|i| VmSpec::new(format!("i{i:02}"))).collect();
    let daemon = env.daemon("idle", &vms)?;
    let mut sides = Vec::new();
    let mut channels = Vec::new();
    for vm in &vms {
        let ctx = guest::open(&daemon.socket(&vm.name))?;
        channels.push(vrdma::CompletionChannel::new(&ctx).map_err(|source| {
            guest::Error::Verb {
                what: "ibv_create_comp_channel".into(),
                source,
            }
        })?);
        sides.push(Side::new(&ctx, 1, 16, 64, 4096)?);
    }
    for pair in sides.chunks(2) {
        if let [a, b] = pair {
            guest::connect(a, b)?;
        }
    }
    for s in &sides {
        s.cq.req_notify(false)
            .map_err(|source| guest::Error::Verb {
                what: "ibv_req_notify_cq".into(),
                source,
            })?;
    }
    // Let connection set-up settle before measuring.
    procs::sleep(Duration::from_millis(200))?;
    let window = env.window(1.0, 5.0);
    let (c0, t0) = (daemon.cpu()?, Instant::now());
    procs::sleep(window)?;
    let cpu = procs::percent(daemon.cpu()?.saturating_sub(c0), t0.elapsed());
    let mem = daemon.memory()?;
    eprintln!("  daemon CPU with {n} idle VMs: {cpu:.2}% of a core over {window:?}");
    let [idle_vms, pingpong, idle_after] = idle_series(n);
    r.add("idle", &idle_vms, Some(n), "daemon_cpu", cpu, "%");
    r.add(
        "idle",
        &idle_vms,
        Some(n),
        "daemon_rss",
        mem.rss as f64 / MIB,
        "MiB",
    );

    // One write at a time, each waited for with the guest polling its CQ: every doorbell
    // comes a few microseconds after the scheduler's last work, so the scheduler polls
    // instead of sleeping (docs/architecture.md, "Adaptive polling").
    let mut writers = Writers::default();
    let mut pair = sides.drain(..2);
    let (a, b) = (pair.next().expect("n >= 2"), pair.next().expect("n >= 2"));
    drop(pair);
    let target = b.target();
    writers.keep(b);
    writers.start("ping-pong", a, target, rate_load(1, 1));
    // Past the start and the warm-up first, so the window sees only the steady state.
    writers.measure(env.window(0.3, 1.0), Duration::ZERO)?;
    let c0 = daemon.cpu()?;
    let (done, took) = writers.measure(Duration::ZERO, window)?;
    let cpu = procs::percent(daemon.cpu()?.saturating_sub(c0), took);
    let rate = done[0] as f64 / took.as_secs_f64();
    eprintln!(
        "  daemon CPU with one pair in a ping-pong: {cpu:.2}% of a core ({rate:.0} writes/s)"
    );
    r.add("idle", &pingpong, Some(n), "daemon_cpu", cpu, "%");
    r.add("idle", &pingpong, Some(n), "msg_rate", rate / 1e6, "Mmsg/s");

    // Traffic stops: after the polling window (at most 200 µs) the scheduler must sleep.
    writers.finish()?;
    procs::sleep(Duration::from_millis(200))?;
    let (c0, t0) = (daemon.cpu()?, Instant::now());
    procs::sleep(window)?;
    let cpu = procs::percent(daemon.cpu()?.saturating_sub(c0), t0.elapsed());
    eprintln!("  daemon CPU once the ping-pong stopped: {cpu:.2}% of a core over {window:?}");
    r.add("idle", &idle_after, Some(n), "daemon_cpu", cpu, "%");
    drop(writers);
    drop(channels);
    Ok(())
}

/// Bulk writes of this size in the fairness and many-VM scenarios: one chunk of the
/// scheduler, and the size of the bandwidth target.
const BULK_MSG: u32 = 64 << 10;

fn bulk_load(depth: u32) -> Load {
    Load {
        msg: BULK_MSG,
        depth,
        batch: 1,
        // As the integration tests do: guests leave the CPU to the daemon.
        idle: Idle::Sleep(Duration::from_micros(100)),
    }
}

/// Message size and writes in flight per VM in the fairness scenario (as tests/tests/fairness.rs).
const FAIR_MSG: u32 = 1 << 20;
const FAIR_DEPTH: u32 = 32;

/// Two VMs of weights 3 and 1 write 1 MiB messages into a third as fast as they can.
pub fn fairness(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    let daemon = env.daemon(
        "fairness",
        &[
            VmSpec::with("w3", "weight=3"),
            VmSpec::with("w1", "weight=1"),
            VmSpec::new("sink"),
        ],
    )?;
    let sink = guest::open(&daemon.socket("sink"))?;
    let mut writers = Writers::default();
    for name in ["w3", "w1"] {
        let ctx = guest::open(&daemon.socket(name))?;
        let a = Side::new(&ctx, 1, FAIR_DEPTH, 64, FAIR_MSG)?;
        let b = Side::new(&sink, 1, FAIR_DEPTH, 64, FAIR_MSG)?;
        guest::connect(&a, &b)?;
        // 32 MiB in flight per VM: enough that neither VM's queue ever runs dry while its
        // guest sleeps, so the scheduler's weights, not the guests, decide the shares.
        let load = Load {
            msg: FAIR_MSG,
            depth: FAIR_DEPTH,
            batch: 8,
            idle: Idle::Sleep(Duration::from_micros(100)),
        };
        writers.start(name, a, b.target(), load);
        writers.keep(b);
    }
    let (done, window) = writers.measure(env.window(0.3, 1.0), env.window(1.0, 5.0))?;
    writers.finish()?;
    let bw: Vec<f64> = done
        .iter()
        .map(|&n| n as f64 * f64::from(FAIR_MSG) / MIB / window.as_secs_f64())
        .collect();
    let ratio = bw[0] / bw[1];
    eprintln!(
        "  weight 3: {:.0} MiB/s, weight 1: {:.0} MiB/s, ratio {ratio:.2}",
        bw[0], bw[1]
    );
    r.add("fairness", "VM weight 3", None, "bw", bw[0], "MiB/s");
    r.add("fairness", "VM weight 1", None, "bw", bw[1], "MiB/s");
    r.add("fairness", "weight 3 / weight 1", None, "ratio", ratio, "x");
    Ok(())
}

/// 8-byte write latency (vrdma-perf write_lat) between two VMs, alone and while two other
/// VMs move 4 MiB writes.
pub fn isolation(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    let control = env.sock_root.join("isolation-control").join("ctl.sock");
    let launch = Launch {
        netns: None,
        args: {
            let mut a = vec!["--control-socket".into(), control.display().to_string()];
            if let Some(us) = env.step_time_us {
                a.extend(["--step-time-us".into(), us.to_string()]);
            }
            a
        },
    };
    let mut daemon = env.daemon_on(
        "isolation",
        &[
            VmSpec::new("a"),
            VmSpec::new("b"),
            VmSpec::new("bulk"),
            VmSpec::new("bsink"),
        ],
        &launch,
    )?;
    let run = small_write_latency(env);
    let bulk = guest::open(&daemon.socket("bulk"))?;
    let bsink = guest::open(&daemon.socket("bsink"))?;
    // Each round measures alone and next to each kind of neighbour, for each pairing of
    // classes, in turn, so that a change in this VM's wake-up cost during the section (it
    // swings between about 2 and 21 us) falls on all of them alike; of each, the run with
    // the median p99 is recorded.
    let rounds = if env.quick { 1 } else { ISOLATION_ROUNDS };
    let mut alone = Vec::new();
    let cases: Vec<(&BulkNeighbour, &ClassPairing)> = CLASS_PAIRINGS
        .iter()
        .flat_map(|p| BULK_NEIGHBOURS.iter().map(move |n| (n, p)))
        .filter(|(n, p)| p.every_neighbour || n.depth == BULK_NEIGHBOURS[0].depth)
        .collect();
    let mut loaded: Vec<Vec<(perf::LatEntry, (f64, f64))>> = vec![Vec::new(); cases.len()];
    let mut bulk_alone = Vec::new();
    for round in 0..rounds {
        set_classes(&control, &CLASS_PAIRINGS[0])?;
        let dir = env.dir(&format!("vrdma-perf/isolation-alone-{round}"))?;
        let (report, _) = perf_run(env, &mut Ends::local(&mut daemon), &run, &dir)?;
        alone.push(report.lat_for(8, "write_lat alone")?.clone());
        bulk_alone.push(bulk_by_itself(env, (&bulk, &bsink))?);
        for ((neighbour, pairing), runs) in cases.iter().zip(&mut loaded) {
            set_classes(&control, pairing)?;
            let vms = (&bulk, &bsink);
            runs.push(next_to_bulk(env, &mut daemon, vms, neighbour, &run, round)?);
        }
    }
    // The worst case: next to CROWD bulk VMs at once (added through vrdmactl), every VM
    // normal, then the pair latency and the crowd bulk; one run each.
    let crowd = add_crowd(&control, &daemon)?;
    let mut crowd_runs = Vec::new();
    for pairing in [&CLASS_PAIRINGS[0], &CLASS_PAIRINGS[1]] {
        set_classes(&control, pairing)?;
        for k in 0..CROWD {
            let class = format!("class={}", pairing.bulk_vm);
            vrdmactl(&control, &["set", &format!("crowd{k}"), &class])?;
        }
        let dir = format!("vrdma-perf/isolation-crowd-{}", pairing.bulk_vm);
        crowd_runs.push((
            pairing,
            next_to_crowd(env, &mut daemon, &crowd, &run, &dir)?,
        ));
    }
    drop(crowd);
    for k in 0..CROWD {
        vrdmactl(&control, &["remove", &format!("crowd{k}")])?;
    }
    set_classes(&control, &CLASS_PAIRINGS[0])?;
    let alone = median_p99(alone.into_iter().map(|e| (e, 0.0)).collect()).0;
    record_latency(r, "isolation", "alone", &alone);
    bulk_alone.sort_by(f64::total_cmp);
    let bulk_alone = bulk_alone[bulk_alone.len() / 2];
    let size = Some(u64::from(ISOLATION_BULK_MSG));
    r.add(
        "isolation",
        "bulk alone",
        size,
        "bulk_bw",
        bulk_alone,
        "MiB/s",
    );
    let mut ratios = Vec::new();
    for ((neighbour, pairing), runs) in cases.iter().zip(loaded) {
        let (entry, (bulk_bw, window)) = median_p99(runs);
        let series = pairing.series(neighbour.series);
        record_latency(r, "isolation", &series, &entry);
        r.add("isolation", &series, size, "bulk_bw", bulk_bw, "MiB/s");
        let ratio = entry.p99_us / alone.p99_us;
        r.add(
            "isolation",
            &pairing.series(neighbour.ratio),
            Some(8),
            "ratio",
            ratio,
            "x",
        );
        if neighbour.depth == BULK_NEIGHBOURS[0].depth {
            r.add(
                "isolation",
                &pairing.series(BULK_WITH_OVER_ALONE),
                size,
                "ratio",
                bulk_bw / bulk_alone,
                "x",
            );
            // What each of the latency pair's messages cost the bulk VM: the time its
            // throughput alone would have taken to move what it did not, over the run, per
            // message (two an iteration: a round trip). A priority that serves the pair sooner
            // lets it send more; this tells whether each message also got dearer. Signed, so
            // that the host's noise shows as such.
            if bulk_alone > 0.0 && entry.iterations > 0 {
                let lost = (1.0 - bulk_bw / bulk_alone) * window;
                r.add(
                    "isolation",
                    &pairing.series(BULK_COST_PER_MESSAGE),
                    Some(8),
                    "cost",
                    lost * 1e6 / (2 * entry.iterations) as f64,
                    "us",
                );
            }
        }
        ratios.push(format!(
            "{series}: p99 {:.2} us ({ratio:.2}x)",
            entry.p99_us
        ));
    }
    for (pairing, (entry, bulk_bw)) in crowd_runs {
        let series = pairing.series(CROWD_SERIES);
        record_latency(r, "isolation", &series, &entry);
        r.add("isolation", &series, size, "bulk_bw", bulk_bw, "MiB/s");
        let ratio = entry.p99_us / alone.p99_us;
        r.add(
            "isolation",
            &pairing.series(CROWD_RATIO),
            Some(8),
            "ratio",
            ratio,
            "x",
        );
        ratios.push(format!(
            "{series}: p99 {:.2} us ({ratio:.2}x)",
            entry.p99_us
        ));
    }
    // The bulk VM next to the latency pair in their own classes, against both in the default
    // class (as before classes existed): what the priority costs bulk throughput.
    let deep = BULK_NEIGHBOURS[0].series;
    let with_classes = r.get(
        "isolation",
        &CLASS_PAIRINGS[1].series(deep),
        size,
        "bulk_bw",
    );
    let without = r.get("isolation", deep, size, "bulk_bw");
    if let (Some(with_classes), Some(without)) = (with_classes, without) {
        let ratio = with_classes / without;
        r.add(
            "isolation",
            BULK_CLASSES_OVER_NORMAL,
            size,
            "ratio",
            ratio,
            "x",
        );
    }
    eprintln!("  p99 alone {:.2} us; {}", alone.p99_us, ratios.join("; "));
    Ok(())
}

/// The classes of the isolation section's VMs for one measurement: the latency pair's (`a`
/// and `b`) and the bulk VM's.
struct ClassPairing {
    latency_pair: &'static str,
    bulk_vm: &'static str,
    /// The class the bulk VM's QPs take by their service level (`BULK_SL`), if not its own.
    bulk_sl_class: Option<&'static str>,
    /// Measured next to every kind of bulk neighbour, not only the deep-queued one.
    every_neighbour: bool,
}

impl ClassPairing {
    /// `base` (a series or ratio name) for this pairing: unchanged for the default classes,
    /// which the section measured before classes existed.
    fn series(&self, base: &str) -> String {
        match self.bulk_sl_class {
            _ if self.latency_pair == "normal" && self.bulk_vm == "normal" => base.to_owned(),
            Some(by_sl) => format!(
                "{base}, {} class next to a {} VM's QPs in {by_sl} by their SL",
                self.latency_pair, self.bulk_vm
            ),
            None => format!(
                "{base}, {} class next to {}",
                self.latency_pair, self.bulk_vm
            ),
        }
    }
}

/// The pairings of classes the isolation section measures; the first is every VM in the
/// default class.
const CLASS_PAIRINGS: [ClassPairing; 5] = [
    ClassPairing {
        latency_pair: "normal",
        bulk_vm: "normal",
        bulk_sl_class: None,
        every_neighbour: true,
    },
    ClassPairing {
        latency_pair: "latency",
        bulk_vm: "bulk",
        bulk_sl_class: None,
        every_neighbour: true,
    },
    ClassPairing {
        latency_pair: "latency",
        bulk_vm: "normal",
        bulk_sl_class: None,
        every_neighbour: false,
    },
    ClassPairing {
        latency_pair: "normal",
        bulk_vm: "bulk",
        bulk_sl_class: None,
        every_neighbour: false,
    },
    // Both VMs latency, the bulk VM's writes on a service level its operator put in bulk: a
    // QP's class, not only a VM's.
    ClassPairing {
        latency_pair: "latency",
        bulk_vm: "latency",
        bulk_sl_class: Some("bulk"),
        every_neighbour: false,
    },
];

/// The service level of the bulk VMs' QPs: their VM's class unless a pairing gives it one.
const BULK_SL: u8 = 1;

/// The ratio of the bulk VM's throughput next to the latency pair with the pair in the
/// latency class and the bulk VM in the bulk class, to the same with every VM normal.
pub(crate) const BULK_CLASSES_OVER_NORMAL: &str =
    "bulk throughput next to the latency pair, latency and bulk classes / every VM normal";

/// The ratio of the bulk VM's throughput next to the latency pair to its throughput alone.
pub(crate) const BULK_WITH_OVER_ALONE: &str = "bulk throughput next to the latency pair / alone";

/// The isolation section's series of what one latency message costs the bulk VM next to it,
/// in microseconds of its throughput.
pub(crate) const BULK_COST_PER_MESSAGE: &str = "bulk VM's time per latency message";

/// Gives the isolation section's VMs the classes of `pairing`, through `vrdmactl`.
fn set_classes(control: &Path, pairing: &ClassPairing) -> Result<(), Error> {
    for (vm, class) in [
        ("a", pairing.latency_pair),
        ("b", pairing.latency_pair),
        ("bulk", pairing.bulk_vm),
    ] {
        vrdmactl(control, &["set", vm, &format!("class={class}")])?;
    }
    let by_sl = format!("sl.{BULK_SL}={}", pairing.bulk_sl_class.unwrap_or("vm"));
    vrdmactl(control, &["set", "bulk", &by_sl])
}

/// Runs `vrdmactl --socket CONTROL ARGS`, which must succeed.
fn vrdmactl(control: &Path, args: &[&str]) -> Result<(), Error> {
    let ctl = procs::sibling("vrdmactl", "vhost-user-rdma")?;
    let out = std::process::Command::new(&ctl)
        .arg("--socket")
        .arg(control)
        .args(args)
        .output()
        .map_err(|e| Error::Failed(format!("cannot run {}: {e}", ctl.display())))?;
    if !out.status.success() {
        return Err(Error::Failed(format!(
            "vrdmactl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Bulk VMs of the isolation section's worst case.
const CROWD: usize = 15;
/// Its series.
const CROWD_SERIES: &str = "next to 15 VMs of 4 MiB bulk writes";
/// Its ratio.
pub(crate) const CROWD_RATIO: &str = "p99 next to 15 bulk VMs / alone";

/// Adds the worst case's bulk VMs to the running daemon through `vrdmactl` and opens them.
fn add_crowd(control: &Path, daemon: &Daemon) -> Result<Vec<vrdma::Context>, Error> {
    (0..CROWD)
        .map(|k| {
            let name = format!("crowd{k}");
            let socket = daemon.socket(&name);
            let entry = format!(
                "name={name},socket={},gid=10.0.9.{}",
                socket.display(),
                k + 1
            );
            vrdmactl(control, &["add", &entry])?;
            Ok(guest::open(&socket)?)
        })
        .collect()
}

/// One write_lat run while each of `crowd` writes 4 MiB messages to itself with a deep queue
/// (a QP to another QP of the same VM: the copy is the daemon's all the same): the run, and
/// the crowd's aggregate throughput in MiB/s.
fn next_to_crowd(
    env: &mut Env,
    daemon: &mut Daemon,
    crowd: &[vrdma::Context],
    run: &Run,
    dir: &str,
) -> Result<(perf::LatEntry, f64), Error> {
    let msg = ISOLATION_BULK_MSG;
    let mut writers = Writers::default();
    for (k, ctx) in crowd.iter().enumerate() {
        start_bulk(
            &mut writers,
            &format!("crowd{k}"),
            (ctx, ctx),
            &BULK_NEIGHBOURS[0],
        )?;
    }
    writers.measure(Duration::from_millis(200), Duration::ZERO)?;
    let total = |w: &Writers| w.counts().iter().sum::<u64>();
    let (c0, t0) = (total(&writers), Instant::now());
    let dir = env.dir(dir)?;
    let loaded = perf_run(env, &mut Ends::local(daemon), run, &dir);
    let bw = (total(&writers) - c0) as f64 * f64::from(msg) / MIB / t0.elapsed().as_secs_f64();
    writers.finish()?;
    let loaded = loaded?.0.lat_for(8, "write_lat next to the crowd")?.clone();
    Ok((loaded, bw))
}

/// Starts a writer of 4 MiB messages from `from` to `to` driven as `neighbour` says, named
/// `name`, in `writers` (which keeps the target side).
fn start_bulk(
    writers: &mut Writers,
    name: &str,
    (from, to): (&vrdma::Context, &vrdma::Context),
    neighbour: &BulkNeighbour,
) -> Result<(), Error> {
    let msg = ISOLATION_BULK_MSG;
    let a = Side::new(from, 1, neighbour.depth, 2 * neighbour.depth.max(32), msg)?;
    let b = Side::new(to, 1, 4, 64, msg)?;
    guest::connect_on(&a, &b, BULK_SL)?;
    writers.start(
        name,
        a,
        b.target(),
        Load {
            msg,
            depth: neighbour.depth,
            batch: neighbour.depth.min(64),
            idle: Idle::Sleep(neighbour.sleep),
        },
    );
    writers.keep(b);
    Ok(())
}

/// The bulk VM's throughput in MiB/s writing 4 MiB messages with a deep queue, by itself.
fn bulk_by_itself(env: &Env, vms: (&vrdma::Context, &vrdma::Context)) -> Result<f64, Error> {
    let msg = ISOLATION_BULK_MSG;
    let mut writers = Writers::default();
    start_bulk(&mut writers, "bulk", vms, &BULK_NEIGHBOURS[0])?;
    writers.measure(Duration::from_millis(100), Duration::ZERO)?;
    let (c0, t0) = (writers.counts()[0], Instant::now());
    std::thread::sleep(env.window(0.3, 1.0));
    let bw = (writers.counts()[0] - c0) as f64 * f64::from(msg) / MIB / t0.elapsed().as_secs_f64();
    writers.finish()?;
    Ok(bw)
}

/// Rounds of the isolation section in a full run.
const ISOLATION_ROUNDS: usize = 3;
/// The bulk VM's message size.
const ISOLATION_BULK_MSG: u32 = 4 << 20;

/// Of latency runs (each with a number that goes with it), the one whose p99 is the median.
fn median_p99<T>(mut runs: Vec<(perf::LatEntry, T)>) -> (perf::LatEntry, T) {
    runs.sort_by(|a, b| a.0.p99_us.total_cmp(&b.0.p99_us));
    let middle = runs.len() / 2;
    runs.swap_remove(middle)
}

/// Records a latency run's typical, p99 and p99.9 latency in `section` as `series`.
fn record_latency(r: &mut Results, section: &str, series: &str, e: &perf::LatEntry) {
    r.add(section, series, Some(8), "t_typical", e.t_typical_us, "us");
    r.add(section, series, Some(8), "p99", e.p99_us, "us");
    r.add(section, series, Some(8), "p999", e.p999_us, "us");
}

/// How the bulk VM of the isolation section drives its 4 MiB writes.
struct BulkNeighbour {
    /// Its series in the isolation table.
    series: &'static str,
    /// The ratio's name in the CSV.
    ratio: &'static str,
    /// Writes outstanding (and its send queue's depth).
    depth: u32,
    /// How long its thread sleeps when its CQ is empty.
    sleep: Duration,
}

/// The bulk VM two ways. On this 2-vCPU machine its thread shares CPU 0 with the latency
/// VMs' (the daemon has CPU 1), where on a host each VM has vCPUs of its own. Polling a short
/// queue, it wakes every 100 µs on that core, and each wake-up delays whichever latency message
/// is in flight: that measures the shared core as much as the fabric. With a deep queue it
/// sleeps through the run while the daemon copies its writes without pause: that measures the
/// fabric, which is what the target is about (docs/performance.md, "Isolation").
const BULK_NEIGHBOURS: [BulkNeighbour; 2] = [
    BulkNeighbour {
        series: "next to 4 MiB bulk writes",
        ratio: "p99 next to bulk / alone",
        depth: 4096,
        sleep: Duration::from_millis(10),
    },
    BulkNeighbour {
        series: "next to 4 MiB bulk writes, bulk VM polling on the same core",
        ratio: "p99 next to bulk polling on the same core / alone",
        depth: 4,
        sleep: Duration::from_micros(100),
    },
];

/// One vrdma-perf write_lat run while `vms.0` writes 4 MiB messages to `vms.1` as `bulk`
/// says: the run, and the bulk VM's throughput meanwhile in MiB/s with the time it was
/// measured over in seconds.
fn next_to_bulk(
    env: &mut Env,
    daemon: &mut Daemon,
    vms: (&vrdma::Context, &vrdma::Context),
    bulk: &BulkNeighbour,
    run: &Run,
    round: usize,
) -> Result<(perf::LatEntry, (f64, f64)), Error> {
    let msg = ISOLATION_BULK_MSG;
    let mut writers = Writers::default();
    start_bulk(&mut writers, "bulk", vms, bulk)?;
    writers.measure(Duration::from_millis(100), Duration::ZERO)?;
    let (c0, t0) = (writers.counts()[0], Instant::now());
    let loaded_dir = env.dir(&format!("vrdma-perf/isolation-bulk-{}-{round}", bulk.depth))?;
    let loaded = perf_run(env, &mut Ends::local(daemon), run, &loaded_dir);
    let window = t0.elapsed().as_secs_f64();
    let bulk_bw = (writers.counts()[0] - c0) as f64 * f64::from(msg) / MIB / window;
    writers.finish()?;
    let loaded = loaded?.0.lat_for(8, "write_lat next to bulk")?.clone();
    Ok((loaded, (bulk_bw, window)))
}

/// The 8-byte RDMA WRITE ping-pong the isolation sections measure next to their neighbours.
fn small_write_latency(env: &Env) -> Run {
    Run {
        test: "write_lat",
        size: 8,
        length: Length::Iterations(if env.quick { 2000 } else { 20_000 }),
        events: false,
        post_list: None,
        tx_depth: None,
        mtu: None,
    }
}

/// 8-byte write latency (vrdma-perf write_lat) between two VMs, alone and while a third VM
/// registers and deregisters 4 GiB in 2^18 pages over and over, with a SEND of its own
/// refused for want of a receive and retried every 10 µs meanwhile (so the scheduler has that
/// VM's timers to serve while its objects are locked); and, to tell the lock from the CPU,
/// while it sends the same REG_MR naming a PD that does not exist, which the daemon decodes
/// and refuses as soon as it holds the VM's objects.
pub fn registering(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    let mut daemon = env.daemon(
        "registering",
        &[VmSpec::new("a"), VmSpec::new("b"), VmSpec::new("reg")],
    )?;
    let run = small_write_latency(env);
    let reg = guest::Registrar::open(&daemon.socket("reg"), REG_PAGES, REG_PAGE_SHIFT)?;
    // As in the isolation section: rounds of alone and next to each kind of neighbour, and of
    // each the run with the median p99.
    let rounds = if env.quick { 1 } else { ISOLATION_ROUNDS };
    let mut alone = Vec::new();
    let mut next: [Vec<(perf::LatEntry, f64)>; 2] = Default::default();
    let mut took: [Vec<f64>; 2] = Default::default();
    for round in 0..rounds {
        let dir = env.dir(&format!("vrdma-perf/registering-alone-{round}"))?;
        let (report, _) = perf_run(env, &mut Ends::local(&mut daemon), &run, &dir)?;
        alone.push((report.lat_for(8, "write_lat alone")?.clone(), 0.0));
        for (k, neighbour) in REG_NEIGHBOURS.iter().enumerate() {
            let dir = env.dir(&format!("vrdma-perf/registering-{}-{round}", neighbour.tag))?;
            let mut registering = reg.start(neighbour.refused)?;
            let t0 = Instant::now();
            let report = perf_run(env, &mut Ends::local(&mut daemon), &run, &dir);
            let elapsed = t0.elapsed();
            let times = registering.finish()?;
            reg.quiet()?;
            let entry = report?.0.lat_for(8, neighbour.series)?.clone();
            let per_s = times.len() as f64 / elapsed.as_secs_f64();
            took[k].extend(times.iter().map(|t| t.as_secs_f64() * 1e3));
            next[k].push((entry, per_s));
        }
    }
    let alone = median_p99(alone).0;
    record_latency(r, "registering", "alone", &alone);
    let mut line = format!(
        "  p50/p99 alone {:.2}/{:.2} us",
        alone.t_typical_us, alone.p99_us
    );
    for ((neighbour, runs), took) in REG_NEIGHBOURS.iter().zip(next).zip(&mut took) {
        let (entry, per_s) = median_p99(runs);
        record_latency(r, "registering", neighbour.series, &entry);
        let ratio = entry.p99_us / alone.p99_us;
        r.add("registering", neighbour.ratio, Some(8), "ratio", ratio, "x");
        let ms = median(took);
        let size = Some(REG_PAGES << REG_PAGE_SHIFT);
        r.add("registering", neighbour.command, size, "time", ms, "ms");
        r.add(
            "registering",
            neighbour.command,
            size,
            "per_s",
            per_s,
            "1/s",
        );
        line.push_str(&format!(
            "; {} {:.2}/{:.2} us ({ratio:.2}x), {} of {ms:.2} ms median, {per_s:.0}/s",
            neighbour.series,
            entry.t_typical_us,
            entry.p99_us,
            took.len(),
        ));
    }
    eprintln!("{line}");
    Ok(())
}

/// Pages the registering VM of the registering section registers at a time, and their size:
/// 2^18 pages of 16 KiB, 4 GiB, the longest page list one REG_MR may carry. The daemon checks
/// every page under the VM's lock.
const REG_PAGES: u64 = 1 << 18;
const REG_PAGE_SHIFT: u8 = 14;

/// What the third VM of the registering section does.
struct RegNeighbour {
    /// Its series in the table.
    series: &'static str,
    /// The ratio's name in the CSV.
    ratio: &'static str,
    /// The series of its commands' times.
    command: &'static str,
    /// Its vrdma-perf directories' tag.
    tag: &'static str,
    /// It names a PD that does not exist.
    refused: bool,
}

/// The ratio of the registering section's target.
pub const REG_RATIO: &str = "p99 next to registrations / alone";

/// The registering VM, and the same VM's REG_MRs refused (see [`registering`]).
const REG_NEIGHBOURS: [RegNeighbour; 2] = [
    RegNeighbour {
        series: "next to 4 GiB registrations",
        ratio: REG_RATIO,
        command: "REG_MR of 4 GiB",
        tag: "reg",
        refused: false,
    },
    RegNeighbour {
        series: "next to refused 4 GiB REG_MRs (same CPU, no lock)",
        ratio: "p99 next to refused REG_MRs / alone",
        command: "REG_MR of 4 GiB, refused",
        tag: "refused",
        refused: true,
    },
];

/// 16 VMs as 8 pairs, each VM writing 64 KiB messages over 16 QPs to its partner, against
/// one VM writing to another over one QP with the same number of writes outstanding.
pub fn many(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    const VMS: usize = 16;
    const QPS: usize = 16;
    const PER_QP: u32 = 4;
    let depth = QPS as u32 * PER_QP;
    let vms: Vec<VmSpec> = (0..VMS).map(|i| VmSpec::new(format!("m{i:02}"))).collect();
    let daemon = env.daemon("many", &vms)?;
    let ctxs = vms
        .iter()
        .map(|v| guest::open(&daemon.socket(&v.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let (warmup, window) = (env.window(0.3, 1.0), env.window(1.0, 5.0));

    // The single-pair figure first, while the other guests are connected but idle.
    let single = {
        let a = Side::new(&ctxs[0], 1, depth, 2 * depth, BULK_MSG)?;
        let b = Side::new(&ctxs[1], 1, depth, 2 * depth, BULK_MSG)?;
        guest::connect(&a, &b)?;
        let mut w = Writers::default();
        w.start("single pair", a, b.target(), bulk_load(depth));
        w.keep(b);
        let (done, t) = w.measure(warmup, window)?;
        w.finish()?;
        done[0] as f64 * f64::from(BULK_MSG) / MIB / t.as_secs_f64()
    };
    eprintln!("  single pair, 1 QP: {single:.0} MiB/s");

    let mut sides: Vec<Option<Side>> = ctxs
        .iter()
        .map(|c| Side::new(c, QPS, PER_QP, 2 * depth, BULK_MSG).map(Some))
        .collect::<Result<_, _>>()?;
    for k in 0..VMS / 2 {
        let (a, b) = (sides[2 * k].as_ref(), sides[2 * k + 1].as_ref());
        if let (Some(a), Some(b)) = (a, b) {
            guest::connect(a, b)?;
        }
    }
    let targets: Vec<guest::Target> = sides.iter().flatten().map(Side::target).collect();
    let mut w = Writers::default();
    for (i, side) in sides.iter_mut().enumerate() {
        if let Some(side) = side.take() {
            // Each VM writes into its partner's buffer (i ^ 1 pairs 0-1, 2-3, ...).
            w.start(&vms[i].name, side, targets[i ^ 1], bulk_load(depth));
        }
    }
    let (done, t) = w.measure(warmup, window)?;
    w.finish()?;
    let bw: Vec<f64> = done
        .iter()
        .map(|&n| n as f64 * f64::from(BULK_MSG) / MIB / t.as_secs_f64())
        .collect();
    let total: f64 = bw.iter().sum();
    let (min, max) = bw
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &b| (lo.min(b), hi.max(b)));
    for (vm, b) in vms.iter().zip(&bw) {
        r.add("many", &vm.name, None, "bw", *b, "MiB/s");
    }
    r.add("many", "single pair, 1 QP", None, "bw", single, "MiB/s");
    r.add(
        "many",
        "aggregate, 16 VMs x 16 QPs",
        None,
        "bw",
        total,
        "MiB/s",
    );
    r.add(
        "many",
        "aggregate / single pair",
        None,
        "ratio",
        total / single,
        "x",
    );
    r.add("many", "min / max per VM", None, "ratio", min / max, "x");
    eprintln!(
        "  16 VMs x 16 QPs: aggregate {total:.0} MiB/s ({:.2} of single pair), min/max per VM {:.2}",
        total / single,
        min / max
    );
    Ok(())
}

/// 8-byte writes for the scale tables: many small messages in flight, guests polling.
fn rate_load(depth: u32, batch: u32) -> Load {
    Load {
        msg: 8,
        depth,
        batch,
        idle: Idle::Yield,
    }
}

/// Where a scale measurement goes: its table, its x value, and how long set-up took.
#[derive(Debug, Clone, Copy)]
struct Point {
    section: &'static str,
    x: u64,
    setup: Duration,
}

/// Measures one active pair's 8-byte write rate and the daemon's CPU per message and memory.
fn scale_point(
    env: &Env,
    r: &mut Results,
    daemon: &Daemon,
    at: Point,
    a: Side,
    b: Side,
    load: Load,
) -> Result<(), Error> {
    let Point { section, x, setup } = at;
    let mut w = Writers::default();
    w.start("active pair", a, b.target(), load);
    w.keep(b);
    // Count from the daemon's CPU too: measure's own window is used for both.
    let (warmup, window) = (env.window(0.2, 0.5), env.window(0.5, 2.0));
    w.measure(warmup, Duration::ZERO)?;
    let (n0, c0, t0) = (w.counts()[0], daemon.cpu()?, Instant::now());
    procs::sleep(window).map_err(Error::from)?;
    let (n1, c1, t) = (w.counts()[0], daemon.cpu()?, t0.elapsed());
    w.finish()?;
    let msgs = (n1 - n0).max(1);
    let rate = msgs as f64 / t.as_secs_f64() / 1e6;
    let ns = c1.saturating_sub(c0).as_nanos() as f64 / msgs as f64;
    let mem = daemon.memory()?;
    let series = "8 B RDMA WRITE";
    r.add(section, series, Some(x), "msg_rate", rate, "Mmsg/s");
    r.add(section, series, Some(x), "daemon_ns_per_msg", ns, "ns");
    r.add(
        section,
        series,
        Some(x),
        "daemon_rss",
        mem.rss as f64 / MIB,
        "MiB",
    );
    r.add(
        section,
        series,
        Some(x),
        "daemon_anon",
        mem.anon as f64 / MIB,
        "MiB",
    );
    r.add(section, series, Some(x), "setup", setup.as_secs_f64(), "s");
    eprintln!(
        "  {section} {x}: {rate:.3} Mmsg/s, daemon {ns:.0} ns/msg, RSS {:.1} MiB (anon {:.1} MiB), set-up {:.2} s",
        mem.rss as f64 / MIB,
        mem.anon as f64 / MIB,
        setup.as_secs_f64()
    );
    Ok(())
}

/// How daemon memory and per-message cost grow with VMs, QPs per VM and outstanding WRs.
pub fn scale(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    let (vm_counts, qp_counts, depths): (Vec<u64>, Vec<u64>, Vec<u64>) = if env.quick {
        (vec![2, 16], vec![1, 256], vec![1, 16, 128])
    } else {
        (vec![2, 4, 16, 64], vec![1, 16, 256, 4096], pow2(1, 128))
    };
    // VMs: all connected, each with a PD, CQ, QP and MR; one pair active.
    for &n in &vm_counts {
        procs::check_interrupt()?;
        let vms: Vec<VmSpec> = (0..n).map(|i| VmSpec::new(format!("v{i:02}"))).collect();
        let daemon = env.daemon(&format!("scale-vms-{n}"), &vms)?;
        let t0 = Instant::now();
        let mut idle = Vec::new();
        let mut active = Vec::new();
        for (i, vm) in vms.iter().enumerate() {
            let ctx = guest::open(&daemon.socket(&vm.name))?;
            let side = Side::new(&ctx, 1, 128, 256, 4096)?;
            if i < 2 {
                active.push(side);
            } else {
                idle.push(side);
            }
        }
        let (b, a) = (active.pop(), active.pop());
        let (Some(a), Some(b)) = (a, b) else {
            continue;
        };
        guest::connect(&a, &b)?;
        let setup = t0.elapsed();
        scale_point(
            env,
            r,
            &daemon,
            Point {
                section: "scale_vms",
                x: n,
                setup,
            },
            a,
            b,
            rate_load(128, 16),
        )?;
        drop(idle);
    }
    // QPs per VM: two VMs, Q QPs each connected pairwise, 128 writes in flight round-robin.
    for &q in &qp_counts {
        procs::check_interrupt()?;
        let quota = "max-qp=4096,max-cq=4096";
        let daemon = env.daemon(
            &format!("scale-qps-{q}"),
            &[VmSpec::with("a", quota), VmSpec::with("b", quota)],
        )?;
        let t0 = Instant::now();
        let (ca, cb) = (
            guest::open(&daemon.socket("a"))?,
            guest::open(&daemon.socket("b"))?,
        );
        let per_qp = (128 / q as u32).max(1);
        let a = Side::new(&ca, q as usize, per_qp, 256, 4096)?;
        let b = Side::new(&cb, q as usize, per_qp, 256, 4096)?;
        guest::connect(&a, &b)?;
        let setup = t0.elapsed();
        scale_point(
            env,
            r,
            &daemon,
            Point {
                section: "scale_qps",
                x: q,
                setup,
            },
            a,
            b,
            rate_load(128, 1),
        )?;
    }
    // Outstanding WRs on one QP.
    let daemon = env.daemon("scale-depth", &[VmSpec::new("a"), VmSpec::new("b")])?;
    let (ca, cb) = (
        guest::open(&daemon.socket("a"))?,
        guest::open(&daemon.socket("b"))?,
    );
    for &d in &depths {
        procs::check_interrupt()?;
        let t0 = Instant::now();
        let a = Side::new(&ca, 1, 128, 256, 4096)?;
        let b = Side::new(&cb, 1, 128, 256, 4096)?;
        guest::connect(&a, &b)?;
        let setup = t0.elapsed();
        scale_point(
            env,
            r,
            &daemon,
            Point {
                section: "scale_depth",
                x: d,
                setup,
            },
            a,
            b,
            rate_load(d as u32, 1),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p99_us: f64) -> perf::LatEntry {
        perf::LatEntry {
            bytes: 8,
            iterations: 1000,
            t_min_us: 1.0,
            t_max_us: 50.0,
            t_typical_us: 3.0,
            t_avg_us: 4.0,
            t_stdev_us: 1.0,
            p99_us,
            p999_us: 2.0 * p99_us,
        }
    }

    #[test]
    fn the_median_run_by_p99_keeps_its_own_numbers() {
        let (e, bw) = median_p99(vec![(run(5.0), 1.0), (run(9.0), 2.0), (run(7.0), 3.0)]);
        assert_eq!((e.p99_us, e.p999_us, bw), (7.0, 14.0, 3.0));
        let (e, _) = median_p99(vec![(run(4.0), 0.0)]);
        assert_eq!(e.p99_us, 4.0, "one round is its own median");
    }
}
