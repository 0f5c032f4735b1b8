//! perftest for vrdma: `ib_write_bw`, `ib_write_lat`, `ib_read_bw`, `ib_read_lat`,
//! `ib_send_bw`, `ib_send_lat` and `ib_atomic_lat` over the vrdma guest library, with
//! perftest's options, TCP exchange and output, and a JSON report.
//!
//! * [`opts`]: the command line and the settings it resolves to.
//! * [`wire`]: the TCP side channel between client and server.
//! * [`bench`]: one side's device objects and perftest's loops.
//! * [`stats`] and [`report`]: perftest's statistics, tables and the JSON report.
//! * [`check`]: `--check`'s payload pattern and verification.
//!
//! [`run`] is the whole program; the `vrdma-perf` binary only parses the arguments and calls
//! [`main_with`].

pub mod bench;
pub mod check;
pub mod opts;
pub mod report;
pub mod stats;
pub mod wire;

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vrdma::Context;

pub use opts::{Args, Role, Settings, Test};
pub use report::JsonReport;

use bench::Side;
use check::Verified;
use opts::DeviceChoice;
use report::{HeaderInfo, QpAddress, RESULT_LINE};
use wire::{Control, Params};

/// How long either side waits for the other (a completion, a TCP message) before giving up;
/// perftest waits for ever, a script should not.
pub const WAIT: Duration = Duration::from_secs(30);
/// How long a server started on its own waits for its client.
const ACCEPT_WAIT: Duration = Duration::from_secs(120);

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad options or device name.
    #[error(transparent)]
    Options(#[from] opts::Error),
    /// The device side failed.
    #[error(transparent)]
    Bench(#[from] bench::Error),
    /// The exchange with the other side failed.
    #[error(transparent)]
    Wire(#[from] wire::Error),
    /// The JSON report could not be written.
    #[error(transparent)]
    Report(#[from] report::Error),
    /// The server end of `--loopback` failed.
    #[error("the server on {device} failed")]
    Server {
        /// Its device.
        device: String,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// Setting up the loopback connection failed.
    #[error("couldn't set up the loopback connection")]
    Loopback(#[source] std::io::Error),
}

impl Error {
    /// The exit code: 2 for usage errors, as clap's, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Options(opts::Error::Usage(_)) => 2,
            _ => 1,
        }
    }

    /// `--check` found a bad payload.
    fn is_payload(&self) -> bool {
        matches!(self, Error::Bench(bench::Error::Payload { .. }))
    }

    /// A failure that only says the other end went away or failed: the other end's own
    /// error says more.
    fn is_peer_failure(&self) -> bool {
        matches!(
            self,
            Error::Wire(wire::Error::Closed | wire::Error::Peer(_) | wire::Error::Timeout { .. })
                | Error::Bench(bench::Error::Wire(
                    wire::Error::Closed | wire::Error::Peer(_) | wire::Error::Timeout { .. }
                ))
        )
    }
}

/// Runs the program and returns its exit code, printing a failure as one line on stderr.
pub fn main_with(args: &Args) -> ExitCode {
    let stdout = std::io::stdout();
    match run(args, &mut stdout.lock()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vrdma-perf: {}", vrdma::error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs the test `args` describe, printing perftest's output to `out`. The client (and
/// `--loopback`) returns the report, also written as JSON if asked; the server returns `None`.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<Option<JsonReport>, Error> {
    let s = Settings::from_args(args)?;
    let report = match &s.role {
        Role::Server => {
            let dev = opts::resolve_device(s.device.as_deref())?;
            let ctx = bench::open(&dev.device)?;
            let listener = wire::listen(s.port.unwrap_or(opts::DEF_PORT))?;
            let no_stop = AtomicBool::new(false);
            let verified = server(&s, ctx, &dev, &listener, ACCEPT_WAIT, &no_stop, out)?;
            print_verified(out, verified);
            return Ok(None);
        }
        Role::Client(host) => {
            let dev = opts::resolve_device(s.device.as_deref())?;
            let ctx = bench::open(&dev.device)?;
            let (report, verified) =
                client(&s, ctx, &dev, host, s.port.unwrap_or(opts::DEF_PORT), out)?;
            print_verified(out, verified);
            report
        }
        Role::Loopback(dev2) => {
            let (report, verified) = loopback(&s, dev2, out)?;
            // Both ends' checks, as one line.
            print_verified(out, verified);
            report
        }
    };
    if let Some(path) = &s.json {
        report.write(path)?;
    }
    Ok(Some(report))
}

/// `--check`'s line, on a side that verified messages (checked by the other side only: none).
fn print_verified(out: &mut dyn Write, verified: Verified) {
    if verified.messages > 0 {
        let _ = writeln!(out, "{}", verified.line());
        let _ = out.flush();
    }
}

/// Both ends in this process: the server in a thread on `dev2`, the client here. Returns
/// the report and what both ends verified.
fn loopback(
    s: &Settings,
    dev2: &str,
    out: &mut dyn Write,
) -> Result<(JsonReport, Verified), Error> {
    let dev = opts::resolve_device(s.device.as_deref())?;
    let dev2 = opts::resolve_device(Some(dev2))?;
    // Both devices are opened before either end starts, so a bad one fails at once rather
    // than leaving the other end waiting.
    let ctx = bench::open(&dev.device)?;
    let ctx2 = bench::open(&dev2.device)?;
    let listener =
        TcpListener::bind(("127.0.0.1", s.port.unwrap_or(0))).map_err(Error::Loopback)?;
    let port = listener.local_addr().map_err(Error::Loopback)?.port();
    let stop = AtomicBool::new(false);
    let (client_result, server_result) = std::thread::scope(|scope| {
        // The server end prints nothing: the client's output is the report.
        let server =
            scope.spawn(|| server(s, ctx2, &dev2, &listener, WAIT, &stop, &mut std::io::sink()));
        let c = client(s, ctx, &dev, "127.0.0.1", port, out);
        if c.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let sr = server.join().unwrap_or_else(|_| {
            Err(Error::Server {
                device: dev2.name.clone(),
                source: Box::new(Error::Loopback(std::io::Error::other(
                    "the thread panicked",
                ))),
            })
        });
        (c, sr)
    });
    let server_failure = |e: Error| Error::Server {
        device: dev2.name.clone(),
        source: Box::new(e),
    };
    match (client_result, server_result) {
        (Ok((report, mine)), Ok(theirs)) => Ok((report, mine.plus(theirs))),
        (Ok(_), Err(e)) => Err(server_failure(e)),
        // A bad payload is the cause of what the client then sees (its QPs' peer gone).
        (Err(c), Err(e)) if (c.is_peer_failure() && !e.is_peer_failure()) || e.is_payload() => {
            Err(server_failure(e))
        }
        (Err(c), _) => Err(c),
    }
}

/// Sends the failure to the other side (best effort), so it stops at once rather than at
/// its timeout, and returns it.
fn tell_peer<T>(ctl: &mut Control, r: Result<T, Error>) -> Result<T, Error> {
    if let Err(e) = &r {
        if !e.is_peer_failure() {
            // The other side closes as soon as it reads the line; one that does not is not
            // waited for long.
            let _ = ctl.send_last(
                &format!("ERR {}", vrdma::error_chain(e)),
                Duration::from_secs(2),
            );
        }
    }
    r
}

fn print_addresses(out: &mut dyn Write, local: &[QpAddress], remote: &[QpAddress]) {
    for a in local {
        let _ = write!(out, "{}", report::address("local", a));
    }
    for a in remote {
        let _ = write!(out, "{}", report::address("remote", a));
    }
    let _ = writeln!(out, "{RESULT_LINE}");
    let _ = out.flush();
}

fn header_info(s: &Settings, dev: &DeviceChoice, p: &Params, side: &Side) -> HeaderInfo {
    HeaderInfo {
        device: dev.name.clone(),
        qps: p.qps,
        tx_depth: p.tx_depth,
        cq_mod: p.cq_mod,
        mtu: p.mtu,
        inline: p.inline,
        out_reads: side.out_reads(),
        post_list: p.post_list,
        events: p.events,
        bidirectional: p.bidirectional,
        duration: s.duration.map(|d| d.as_secs()),
    }
}

/// The client end: the report and what this side verified.
fn client(
    s: &Settings,
    ctx: Context,
    dev: &DeviceChoice,
    host: &str,
    port: u16,
    out: &mut dyn Write,
) -> Result<(JsonReport, Verified), Error> {
    let params = bench::params_for(&ctx, s)?;
    let mut side = Side::new(ctx, params)?;
    let mut ctl = Control::new(wire::connect(host, port, WAIT)?)?;
    let r = client_body(s, &mut side, &mut ctl, dev, params, out);
    tell_peer(&mut ctl, r)
}

fn client_body(
    s: &Settings,
    side: &mut Side,
    ctl: &mut Control,
    dev: &DeviceChoice,
    params: Params,
    out: &mut dyn Write,
) -> Result<(JsonReport, Verified), Error> {
    ctl.send(&params.encode())?;
    let local = side.addresses();
    for a in &local {
        ctl.send(&wire::encode_qp(a))?;
    }
    let mut remote = Vec::with_capacity(local.len());
    for _ in 0..local.len() {
        remote.push(wire::decode_qp(
            &ctl.recv("the server's QP address", WAIT)?,
        )?);
    }
    side.connect(&remote)?;
    let test = s.test;
    let _ = write!(
        out,
        "{}",
        report::header(test, &header_info(s, dev, &params, side))
    );
    print_addresses(out, &local, &remote);
    let _ = writeln!(out, "{}", report::columns(test, s.report_gbits));
    let mut json = JsonReport {
        test: test.name().to_owned(),
        events: params.events,
        qps: params.qps,
        tx_depth: params.tx_depth,
        post_list: params.post_list,
        cq_mod: params.cq_mod,
        inline_size: params.inline,
        bw: Vec::new(),
        lat: Vec::new(),
    };
    let run_wait = WAIT + s.duration.unwrap_or_default();
    for &size in &s.sizes {
        side.prepare(size)?;
        ctl.reset();
        let ms = s.duration.map_or(0, |d| d.as_millis());
        ctl.send(&format!("RUN {size} {} {ms}", s.iters))?;
        ctl.expect("READY", WAIT)?;
        if test.is_bw() {
            let receiving = params.bidirectional && test == Test::SendBw;
            let Some(mine) = side.run_bw(ctl, size, s.iters, s.duration, true, receiving)? else {
                unreachable!("a sending side always has statistics");
            };
            ctl.send(&format!("DONE {}", mine.iterations))?;
            if params.check && test == Test::WriteBw {
                // The server checks its slots against these; with -b it sends its own.
                for line in side.written_lines() {
                    ctl.send(&line)?;
                }
                if params.bidirectional {
                    verify_written(side, ctl, size, run_wait)?;
                }
            }
            let ok = ctl.recv("the server's OK", run_wait)?;
            let stats = match parse_ok(&ok)? {
                Some(theirs) if params.bidirectional => mine.plus(theirs),
                _ => mine,
            };
            let _ = writeln!(out, "{}", report::bw_row(size, &stats, s.report_gbits));
            json.push_bw(size, &stats);
        } else {
            let Some(stats) = side.run_lat(ctl, size, s.iters, s.duration, true)? else {
                unreachable!("the client always measures");
            };
            ctl.send(&format!("DONE {}", stats.iterations))?;
            parse_ok(&ctl.recv("the server's OK", run_wait)?)?;
            let _ = writeln!(out, "{}", report::lat_row(size, &stats));
            json.push_lat(size, &stats);
        }
        let _ = out.flush();
    }
    ctl.send("QUIT")?;
    ctl.expect("BYE", WAIT)?;
    let _ = writeln!(out, "{RESULT_LINE}");
    let _ = out.flush();
    Ok((json, side.verified()))
}

/// `--check`, write_bw: reads the other side's `WRITTEN` lines and checks this side's
/// TARGET slots against them.
fn verify_written(
    side: &mut Side,
    ctl: &mut Control,
    size: usize,
    wait: Duration,
) -> Result<(), Error> {
    for q in 0..side.qp_count() {
        let line = ctl.recv("the other side's WRITTEN line", wait)?;
        let last = wire::decode_written(&line, q, side.target_slots())?;
        side.verify_written(q, &last, size)?;
    }
    Ok(())
}

/// `OK`, or `OK peak avg rate` with the server's own BW (bidirectional).
fn parse_ok(line: &str) -> Result<Option<stats::BwStats>, Error> {
    let bad = || {
        Error::Wire(wire::Error::Protocol {
            line: line.to_owned(),
            expected: "OK".into(),
        })
    };
    let w: Vec<&str> = line.split_whitespace().collect();
    match w[..] {
        ["OK"] => Ok(None),
        ["OK", iterations, peak, avg, rate] => Ok(Some(stats::BwStats {
            iterations: iterations.parse().map_err(|_| bad())?,
            peak_mib: peak.parse().map_err(|_| bad())?,
            avg_mib: avg.parse().map_err(|_| bad())?,
            msg_rate_mpps: rate.parse().map_err(|_| bad())?,
        })),
        _ => Err(bad()),
    }
}

fn server(
    s: &Settings,
    ctx: Context,
    dev: &DeviceChoice,
    listener: &TcpListener,
    accept_wait: Duration,
    stop: &AtomicBool,
    out: &mut dyn Write,
) -> Result<Verified, Error> {
    let mut ctl = Control::new(wire::accept(listener, accept_wait, stop)?)?;
    let r = server_body(s, ctx, &mut ctl, dev, out);
    tell_peer(&mut ctl, r)
}

fn server_body(
    s: &Settings,
    ctx: Context,
    ctl: &mut Control,
    dev: &DeviceChoice,
    out: &mut dyn Write,
) -> Result<Verified, Error> {
    let params = Params::decode(&ctl.recv("the client's parameters", WAIT)?)?;
    if params.test != s.test {
        return Err(wire::Error::TestMismatch {
            client: params.test.name(),
            server: s.test.name(),
        }
        .into());
    }
    if s.check && !params.check {
        // Otherwise the server's --check would pass without checking anything.
        return Err(wire::Error::CheckMismatch.into());
    }
    let mut side = Side::new(ctx, params)?;
    let mut remote = Vec::new();
    for _ in 0..params.qps {
        remote.push(wire::decode_qp(
            &ctl.recv("the client's QP address", WAIT)?,
        )?);
    }
    side.connect(&remote)?;
    let local = side.addresses();
    for a in &local {
        ctl.send(&wire::encode_qp(a))?;
    }
    let test = params.test;
    let _ = write!(
        out,
        "{}",
        report::header(test, &header_info(s, dev, &params, &side))
    );
    print_addresses(out, &local, &remote);
    loop {
        let line = ctl.recv("the client's next test", WAIT)?;
        if line == "QUIT" {
            ctl.send("BYE")?;
            break;
        }
        let bad = || wire::Error::Protocol {
            line: line.clone(),
            expected: "RUN size iters duration_ms".into(),
        };
        let w: Vec<&str> = line.split_whitespace().collect();
        let ["RUN", size, iters, ms] = w[..] else {
            return Err(bad().into());
        };
        let size: usize = size.parse().map_err(|_| bad())?;
        let iters: u64 = iters.parse().map_err(|_| bad())?;
        let ms: u64 = ms.parse().map_err(|_| bad())?;
        let duration = (ms > 0).then(|| Duration::from_millis(ms));
        ctl.reset();
        side.prepare(size)?;
        ctl.send("READY")?;
        let receiving = test == Test::SendBw;
        let mine = if test.is_bw() && !params.bidirectional && !receiving {
            // Nothing to post or poll (the client's WRITEs and READs need no receives): wait
            // for DONE without polling, or this side would take CPU from the client when
            // both ends share cores (`--loopback`).
            None
        } else if test.is_bw() {
            side.run_bw(ctl, size, iters, duration, params.bidirectional, receiving)?
        } else {
            side.run_lat(ctl, size, iters, duration, false)?;
            None
        };
        if ctl.peer_done.is_none() {
            let done = ctl.recv("the client's DONE", WAIT + duration.unwrap_or_default())?;
            if !done.starts_with("DONE ") {
                return Err(wire::Error::Protocol {
                    line: done,
                    expected: "DONE n".into(),
                }
                .into());
            }
        }
        if params.check && test == Test::WriteBw {
            let wait = WAIT + duration.unwrap_or_default();
            verify_written(&mut side, ctl, size, wait)?;
            if params.bidirectional {
                for line in side.written_lines() {
                    ctl.send(&line)?;
                }
            }
        }
        match mine {
            Some(b) => ctl.send(&format!(
                "OK {} {} {} {}",
                b.iterations, b.peak_mib, b.avg_mib, b.msg_rate_mpps
            ))?,
            None => ctl.send("OK")?,
        }
    }
    let _ = writeln!(out, "{RESULT_LINE}");
    let _ = out.flush();
    Ok(side.verified())
}
