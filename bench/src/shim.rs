//! The `shim` section: Debian's perftest run through the libibverbs shim
//! (`libvrdma_ibverbs.so` preloaded, the device `vrdma0` its only VM's socket) against
//! vrdma-perf on the vrdma library, the same test, size and options, one after the other on
//! one daemon with two VMs. Both tools run as two processes, a server on VM `a` and a client
//! on VM `b` connecting over TCP on 127.0.0.1, on the same CPUs (`procs::Role::Server` and
//! `Role::Client`), so what differs is the shim and perftest's own loop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::perf::{self, BwEntry, LatEntry, Rows};
use crate::procs::{self, Daemon, Guard, Role, VmSpec};
use crate::qperf;
use crate::report::Results;
use crate::sections::{Env, Error, median};

/// Where the pairs are recorded: bandwidth ...
pub const BW: &str = "shim_bandwidth";
/// ... and latency.
pub const LAT: &str = "shim_latency";

/// The record of whether server and client shared a CPU (1) or had one each (0).
pub const PLACEMENT: &str = "placement";
/// Its metric.
pub const ENDS_SHARE: &str = "ends_share_cpu";

/// The bandwidth tests compared.
pub const BW_TESTS: [&str; 2] = ["write_bw", "send_bw"];
/// The latency tests compared.
pub const LAT_TESTS: [&str; 3] = ["write_lat", "send_lat", "read_lat"];

/// Rounds of each pair in a full run.
pub const ROUNDS: usize = 7;

/// The target: the shim's bandwidth at least this fraction of vrdma-perf's.
pub const BW_GOAL: f64 = 0.95;
/// The target: the shim's typical latency at most this many microseconds above vrdma-perf's.
pub const LAT_GOAL_US: f64 = 0.2;

/// The series of one tool's results for `test`: "native write_bw", "shim write_bw".
pub fn series(tool: Tool, test: &str) -> String {
    format!("{} {test}", tool.name())
}

/// The series of the comparison for `test`: bandwidth "shim / native write_bw" (metric
/// `ratio`), latency "shim - native write_lat" (metrics `t_typical_diff`, `p99_diff`).
pub fn compared(test: &str) -> String {
    if test.ends_with("_bw") {
        format!("shim / native {test}")
    } else {
        format!("shim - native {test}")
    }
}

/// Which side of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// vrdma-perf on the vrdma library.
    Native,
    /// perftest (`ib_TEST`) with the shim preloaded.
    Shim,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Native => "native",
            Tool::Shim => "shim",
        }
    }
}

/// One measurement: a test and size, run the same way by both tools.
#[derive(Debug, Clone)]
struct Case {
    /// vrdma-perf's name (perftest's is `ib_` and this).
    test: &'static str,
    size: u64,
    length: perf::Length,
}

impl Case {
    fn is_bw(&self) -> bool {
        self.test.ends_with("_bw")
    }

    /// The options both tools get, server and client alike.
    fn options(&self, port: u16) -> Vec<String> {
        let mut a = vec![
            "-p".into(),
            port.to_string(),
            "-s".into(),
            self.size.to_string(),
        ];
        match self.length {
            perf::Length::Iterations(n) => a.extend(["-n".into(), n.to_string()]),
            perf::Length::Seconds(s) => a.extend(["-D".into(), s.to_string()]),
        }
        if self.is_bw() {
            // perftest signals every request of large messages unless told otherwise, and
            // vrdma-perf every 100th: the same for both.
            a.extend(["-Q".into(), "100".into()]);
        }
        if !self.test.starts_with("read") {
            // perftest does not know vrdma0 and sends nothing inline; nor does vrdma-perf here.
            a.extend(["-I".into(), "0".into()]);
        }
        a
    }

    fn stem(&self, tool: Tool, round: usize) -> String {
        format!("{}-{}-{}-{round}", tool.name(), self.test, self.size)
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
enum Measured {
    Bw(BwEntry),
    Lat(LatEntry),
}

/// The programs and VMs of the section.
struct Tools {
    native: PathBuf,
    shim: PathBuf,
    server_vm: PathBuf,
    client_vm: PathBuf,
    dir: PathBuf,
}

impl Tools {
    /// The command of `tool` for one end: the server, or the client when `client` names
    /// where its JSON report goes (vrdma-perf's; perftest's is read from its output).
    fn command(&self, tool: Tool, case: &Case, port: u16, client: Option<&Path>) -> Command {
        let (role, vm) = match client {
            Some(_) => (Role::Client, &self.client_vm),
            None => (Role::Server, &self.server_vm),
        };
        let mut cmd = match tool {
            Tool::Native => {
                let mut c = procs::command(&self.native, role, None);
                c.arg(case.test).arg("-d").arg(vm);
                c
            }
            Tool::Shim => {
                let mut c = procs::command(format!("ib_{}", case.test), role, None);
                c.env("LD_PRELOAD", &self.shim)
                    .env("VRDMA_SOCKETS", vm)
                    .env_remove("VRDMA_LOG")
                    .args(["-d", "vrdma0", "-F"]);
                c
            }
        };
        cmd.args(case.options(port));
        if let Some(json) = client {
            cmd.arg("127.0.0.1");
            if tool == Tool::Native {
                cmd.arg("--out_json_file").arg(json);
            }
        }
        cmd
    }

    /// Runs `case` with `tool`: the server, then (once it listens) the client; returns the
    /// client's result.
    fn run(
        &self,
        tool: Tool,
        case: &Case,
        round: usize,
        limit: Duration,
    ) -> Result<Measured, Error> {
        let stem = case.stem(tool, round);
        let json = self.dir.join(format!("{stem}.json"));
        let client_log = self.dir.join(format!("{stem}.log"));
        let server_log = self.dir.join(format!("{stem}-server.log"));
        let _ = std::fs::remove_file(&json);
        let port = qperf::free_port()
            .map_err(|e| Error::Failed(format!("no free TCP port on localhost: {e}")))?;
        let program = match tool {
            Tool::Native => "vrdma-perf",
            Tool::Shim => "perftest",
        };
        let mut server = Guard::spawn(
            self.command(tool, case, port, None),
            &format!("{program} server"),
            &server_log,
        )?;
        wait_listening(&mut server, port)?;
        let client = Guard::spawn(
            self.command(tool, case, port, Some(&json)),
            &format!("{program} client"),
            &client_log,
        )?;
        client.wait(limit)?;
        server.wait(Duration::from_secs(30))?;
        let what = client_log.display().to_string();
        match tool {
            Tool::Native => {
                let text = std::fs::read_to_string(&json).map_err(|e| perf::Error::Json {
                    path: json.display().to_string(),
                    reason: e.to_string(),
                })?;
                let report = perf::parse(&text).map_err(|e| perf::Error::Json {
                    path: json.display().to_string(),
                    reason: e.to_string(),
                })?;
                let path = json.display().to_string();
                Ok(if case.is_bw() {
                    Measured::Bw(report.bw_for(case.size, &path)?.clone())
                } else {
                    Measured::Lat(report.lat_for(case.size, &path)?.clone())
                })
            }
            Tool::Shim => {
                let out = std::fs::read_to_string(&client_log).unwrap_or_default();
                let row = perftest_row(&out, case.size).ok_or_else(|| {
                    Error::Failed(format!(
                        "perftest printed no result row for {} bytes; see {what}",
                        case.size
                    ))
                })?;
                let parsed = if case.is_bw() {
                    bw_entry(&row).map(Measured::Bw)
                } else {
                    lat_entry(&row).map(Measured::Lat)
                };
                parsed.ok_or_else(|| {
                    Error::Failed(format!(
                        "perftest's result row {row:?} is short; see {what}"
                    ))
                })
            }
        }
    }
}

/// The numbers of perftest's result row for `size`: the first row of numbers after its
/// `#bytes` header whose first number is `size`.
pub fn perftest_row(output: &str, size: u64) -> Option<Vec<f64>> {
    let mut in_table = false;
    for line in output.lines() {
        let t = line.trim();
        if t.starts_with("#bytes") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        let nums: Option<Vec<f64>> = t.split_whitespace().map(|w| w.parse().ok()).collect();
        if let Some(nums) = nums.filter(|n| n.first() == Some(&(size as f64))) {
            return Some(nums);
        }
    }
    None
}

/// A bandwidth row: #bytes #iterations BW-peak BW-average MsgRate. perftest's MB/sec are
/// 2^20 bytes per second, vrdma-perf's MiB/s.
fn bw_entry(row: &[f64]) -> Option<BwEntry> {
    let &[bytes, iterations, peak, avg, rate, ..] = row else {
        return None;
    };
    Some(BwEntry {
        bytes: bytes as u64,
        iterations: iterations as u64,
        bw_peak_mib: peak,
        bw_avg_mib: avg,
        msg_rate_mpps: rate,
    })
}

/// A latency row: #bytes #iterations t_min t_max t_typical t_avg t_stdev p99 p99.9, in µs.
fn lat_entry(row: &[f64]) -> Option<LatEntry> {
    let &[
        bytes,
        iterations,
        min,
        max,
        typical,
        avg,
        stdev,
        p99,
        p999,
        ..,
    ] = row
    else {
        return None;
    };
    Some(LatEntry {
        bytes: bytes as u64,
        iterations: iterations as u64,
        t_min_us: min,
        t_max_us: max,
        t_typical_us: typical,
        t_avg_us: avg,
        t_stdev_us: stdev,
        p99_us: p99,
        p999_us: p999,
    })
}

/// Whether /proc/net/tcp's `table` has a socket listening on `port` (the servers accept one
/// connection, so a probing connect would use it up).
pub fn listening_in(table: &str, port: u16) -> bool {
    let want = format!("{port:04X}");
    table.lines().skip(1).any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.len() > 3 && cols[1].rsplit(':').next() == Some(want.as_str()) && cols[3] == "0A"
    })
}

/// Waits until the server listens on `port`, or fails if it exits or takes 30 s.
fn wait_listening(server: &mut Guard, port: u16) -> Result<(), Error> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        procs::check_interrupt()?;
        let listening = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .any(|f| std::fs::read_to_string(f).is_ok_and(|t| listening_in(&t, port)));
        if listening {
            return Ok(());
        }
        if server.exited().is_some() || Instant::now() > end {
            return Err(Error::Failed(format!(
                "the server never listened on port {port}; see {}: {}",
                server.log().display(),
                server.log_tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// perftest through the shim against vrdma-perf: bandwidth (write_bw, send_bw) and latency
/// (write_lat, send_lat, read_lat) in polling mode, each pair run alternately, [`ROUNDS`]
/// rounds in a full run, one with --quick. The comparison is the median over the rounds of
/// each round's ratio (bandwidth) or difference (latency): on a small host one run of either
/// tool moves by ±25% with where the scheduler happens to put its threads' turns, and a
/// median of paired rounds tells the shim's cost from that.
pub fn shim_section(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    if qperf::which("ib_write_bw").is_none() {
        return Err(Error::Skipped(
            "perftest is not installed: run bench/run (it installs it) or apt-get install perftest"
                .into(),
        ));
    }
    let shim = procs::sibling("libvrdma_ibverbs.so", "vrdma-ibverbs")?;
    let native = procs::sibling("vrdma-perf", "vrdma-perf")?;
    let dir = env.dir("shim")?;
    let mut daemon = env.daemon("shim", &[VmSpec::new("a"), VmSpec::new("b")])?;
    let tools = Tools {
        native,
        shim,
        server_vm: daemon.socket("a"),
        client_vm: daemon.socket("b"),
        dir,
    };
    let shared = procs::Placement::current().is_some_and(procs::Placement::ends_share);
    r.add(
        LAT,
        PLACEMENT,
        None,
        ENDS_SHARE,
        f64::from(u8::from(shared)),
        "bool",
    );
    let rounds = if env.quick { 1 } else { ROUNDS };
    let (bw_sizes, lat_sizes): (Vec<u64>, Vec<u64>) = if env.quick {
        (vec![64, 64 << 10], vec![8])
    } else {
        (
            vec![64, 4 << 10, 64 << 10, 1 << 20],
            vec![8, 4 << 10, 64 << 10],
        )
    };
    let mut cases = Vec::new();
    for test in BW_TESTS {
        for &size in &bw_sizes {
            let length = if env.quick {
                perf::Length::Iterations(((64 << 20) / size).clamp(200, 20_000))
            } else {
                perf::Length::Seconds(env.secs)
            };
            cases.push(Case { test, size, length });
        }
    }
    for test in LAT_TESTS {
        for &size in &lat_sizes {
            let length = perf::Length::Iterations(if env.quick { 1000 } else { 10_000 });
            cases.push(Case { test, size, length });
        }
    }
    for case in &cases {
        procs::check_interrupt()?;
        eprint!("  {} {} B ...", case.test, case.size);
        match pair(env, &tools, &mut daemon, case, rounds) {
            Ok((native, shim)) => record(r, case, &native, &shim),
            Err(e) => {
                eprintln!();
                env.failed(format!("shim {} {} B: {e}", case.test, case.size))?;
                daemon.check_alive()?;
            }
        }
    }
    Ok(())
}

/// Runs `case` `rounds` times with each tool, alternating, and returns each tool's runs in
/// round order.
fn pair(
    env: &Env,
    tools: &Tools,
    daemon: &mut Daemon,
    case: &Case,
    rounds: usize,
) -> Result<(Vec<Measured>, Vec<Measured>), Error> {
    let limit = match case.length {
        perf::Length::Seconds(s) => Duration::from_secs(s + 60),
        perf::Length::Iterations(_) if env.quick => Duration::from_secs(60),
        perf::Length::Iterations(_) => Duration::from_secs(300),
    };
    let mut runs: [Vec<Measured>; 2] = Default::default();
    for round in 0..rounds {
        for (k, tool) in [Tool::Native, Tool::Shim].into_iter().enumerate() {
            procs::check_interrupt()?;
            let m = tools.run(tool, case, round, limit);
            daemon.check_alive()?;
            runs[k].push(m?);
        }
    }
    let [native, shim] = runs;
    Ok((native, shim))
}

/// The median of each metric over `runs` (all of one kind; at least one).
fn median_of(runs: &[Measured]) -> Measured {
    let med = |f: &dyn Fn(&Measured) -> Option<f64>| {
        let mut v: Vec<f64> = runs.iter().filter_map(f).collect();
        median(&mut v)
    };
    match &runs[0] {
        Measured::Bw(first) => Measured::Bw(BwEntry {
            bw_peak_mib: med(&|m| bw_of(m).map(|e| e.bw_peak_mib)),
            bw_avg_mib: med(&|m| bw_of(m).map(|e| e.bw_avg_mib)),
            msg_rate_mpps: med(&|m| bw_of(m).map(|e| e.msg_rate_mpps)),
            ..first.clone()
        }),
        Measured::Lat(first) => Measured::Lat(LatEntry {
            t_min_us: med(&|m| lat_of(m).map(|e| e.t_min_us)),
            t_max_us: med(&|m| lat_of(m).map(|e| e.t_max_us)),
            t_typical_us: med(&|m| lat_of(m).map(|e| e.t_typical_us)),
            t_avg_us: med(&|m| lat_of(m).map(|e| e.t_avg_us)),
            t_stdev_us: med(&|m| lat_of(m).map(|e| e.t_stdev_us)),
            p99_us: med(&|m| lat_of(m).map(|e| e.p99_us)),
            p999_us: med(&|m| lat_of(m).map(|e| e.p999_us)),
            ..first.clone()
        }),
    }
}

fn bw_of(m: &Measured) -> Option<&BwEntry> {
    match m {
        Measured::Bw(e) => Some(e),
        Measured::Lat(_) => None,
    }
}

fn lat_of(m: &Measured) -> Option<&LatEntry> {
    match m {
        Measured::Lat(e) => Some(e),
        Measured::Bw(_) => None,
    }
}

/// The median, lowest and highest of `values` (at least one).
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(&mut values), low, high)
}

/// Records both tools' results (the median of each metric over the rounds) and their
/// comparison (the median, lowest and highest of the rounds' ratios or differences).
fn record(r: &mut Results, case: &Case, natives: &[Measured], shims: &[Measured]) {
    let size = Some(case.size);
    let cmp = compared(case.test);
    let paired = |f: &dyn Fn(&Measured, &Measured) -> Option<f64>| {
        spread(
            natives
                .iter()
                .zip(shims)
                .filter_map(|(n, s)| f(n, s))
                .collect(),
        )
    };
    let (native, shim) = (median_of(natives), median_of(shims));
    match (&native, &shim) {
        (Measured::Bw(n), Measured::Bw(s)) => {
            for (tool, e) in [(Tool::Native, n), (Tool::Shim, s)] {
                let ser = series(tool, case.test);
                r.add(BW, &ser, size, "bw", e.bw_avg_mib, "MiB/s");
                r.add(BW, &ser, size, "msg_rate", e.msg_rate_mpps, "Mmsg/s");
            }
            let (ratio, low, high) =
                paired(&|n, s| Some(bw_of(s)?.bw_avg_mib / bw_of(n)?.bw_avg_mib));
            r.add(BW, &cmp, size, "ratio", ratio, "x");
            r.add(BW, &cmp, size, "ratio_low", low, "x");
            r.add(BW, &cmp, size, "ratio_high", high, "x");
            eprintln!(
                " vrdma-perf {:.1}, perftest+shim {:.1} MiB/s ({ratio:.3}, rounds {low:.3} .. \
                 {high:.3})",
                n.bw_avg_mib, s.bw_avg_mib
            );
        }
        (Measured::Lat(n), Measured::Lat(s)) => {
            for (tool, e) in [(Tool::Native, n), (Tool::Shim, s)] {
                let ser = series(tool, case.test);
                for (m, v) in [
                    ("t_typical", e.t_typical_us),
                    ("t_avg", e.t_avg_us),
                    ("t_min", e.t_min_us),
                    ("p99", e.p99_us),
                    ("p999", e.p999_us),
                ] {
                    r.add(LAT, &ser, size, m, v, "us");
                }
            }
            let (diff, low, high) =
                paired(&|n, s| Some(lat_of(s)?.t_typical_us - lat_of(n)?.t_typical_us));
            let (p99_diff, _, _) = paired(&|n, s| Some(lat_of(s)?.p99_us - lat_of(n)?.p99_us));
            r.add(LAT, &cmp, size, "t_typical_diff", diff, "us");
            r.add(LAT, &cmp, size, "t_typical_diff_low", low, "us");
            r.add(LAT, &cmp, size, "t_typical_diff_high", high, "us");
            r.add(LAT, &cmp, size, "p99_diff", p99_diff, "us");
            eprintln!(
                " vrdma-perf {:.2} (p99 {:.2}), perftest+shim {:.2} (p99 {:.2}) us ({diff:+.2}, \
                 rounds {low:+.2} .. {high:+.2})",
                n.t_typical_us, n.p99_us, s.t_typical_us, s.p99_us
            );
        }
        _ => unreachable!("both tools ran the same test"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BW_OUT: &str = "\
---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 65536      300640           0.00               9381.68\t\t   0.150107
---------------------------------------------------------------------------------------
";

    const LAT_OUT: &str = "\
 Max inline data : 0[B]
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 8       2000          4.41           1584.97      4.67     \t       5.66        \t25.46  \t\t15.26   \t\t967.53 
---------------------------------------------------------------------------------------
";

    #[test]
    fn perftest_rows_are_read_after_the_header() {
        let row = perftest_row(BW_OUT, 65536).unwrap();
        let e = bw_entry(&row).unwrap();
        assert_eq!((e.bytes, e.iterations), (65536, 300640));
        assert_eq!((e.bw_avg_mib, e.msg_rate_mpps), (9381.68, 0.150107));
        assert!(perftest_row(BW_OUT, 64).is_none(), "no row of that size");
        let e = lat_entry(&perftest_row(LAT_OUT, 8).unwrap()).unwrap();
        assert_eq!((e.t_typical_us, e.p99_us, e.p999_us), (4.67, 15.26, 967.53));
        // A bandwidth row is too short to be a latency row.
        assert!(lat_entry(&perftest_row(BW_OUT, 65536).unwrap()).is_none());
        // Numbers before the header (the settings) are not results.
        assert!(perftest_row(" 8 2000 1 2 3 4 5 6 7\n", 8).is_none());
    }

    #[test]
    fn a_listening_socket_is_found_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n   \
                     0: 00000000:59D8 00000000:0000 0A 00000000:00000000\n   \
                     1: 0100007F:59D9 0100007F:8A3C 01 00000000:00000000\n";
        assert!(listening_in(table, 0x59D8));
        assert!(!listening_in(table, 0x59D9), "established, not listening");
        assert!(!listening_in(table, 0x59DA));
    }

    #[test]
    fn both_tools_get_the_same_options() {
        let bw = Case {
            test: "send_bw",
            size: 4096,
            length: perf::Length::Seconds(2),
        };
        assert_eq!(
            bw.options(4242).join(" "),
            "-p 4242 -s 4096 -D 2 -Q 100 -I 0"
        );
        let read = Case {
            test: "read_lat",
            size: 8,
            length: perf::Length::Iterations(1000),
        };
        assert_eq!(read.options(1).join(" "), "-p 1 -s 8 -n 1000");
    }

    #[test]
    fn the_median_is_taken_metric_by_metric() {
        let lat = |typical, p99| {
            Measured::Lat(LatEntry {
                bytes: 8,
                iterations: 1000,
                t_min_us: 1.0,
                t_max_us: 9.0,
                t_typical_us: typical,
                t_avg_us: 2.0,
                t_stdev_us: 0.5,
                p99_us: p99,
                p999_us: 8.0,
            })
        };
        let m = median_of(&[lat(3.0, 7.0), lat(2.0, 5.0), lat(4.0, 6.0)]);
        let e = lat_of(&m).unwrap();
        assert_eq!((e.t_typical_us, e.p99_us, e.bytes), (3.0, 6.0, 8));
    }
}
