//! What a user would pick instead of vrdma: TCP between two processes, measured with qperf
//! (tcp_bw, tcp_lat), on loopback or between two network namespaces.

use std::path::Path;
use std::time::Duration;

use crate::procs::{self, Guard};

/// Why a qperf measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// qperf is not installed.
    #[error("qperf is not installed: run bench/run (it installs it) or apt-get install qperf")]
    NotInstalled,
    /// Running it failed.
    #[error(transparent)]
    Process(#[from] procs::Error),
    /// Its output has no result line.
    #[error("qperf printed no {what} result; its output was: {output}")]
    NoResult {
        /// "bw" or "latency".
        what: &'static str,
        /// What it printed.
        output: String,
    },
    /// No free TCP port for its server.
    #[error("no free TCP port on localhost for the qperf server: {0}")]
    NoPort(std::io::Error),
}

/// One qperf client run's results.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QperfResult {
    /// tcp_bw in bytes per second.
    pub bw_bytes_per_sec: Option<f64>,
    /// tcp_lat in microseconds (one way: half a round trip, averaged).
    pub latency_us: Option<f64>,
}

/// Parses a qperf report such as
///
/// ```text
/// tcp_bw:
///     bw  =  3.25 GB/sec
/// tcp_lat:
///     latency  =  37.5 us
/// ```
///
/// qperf's units are decimal (GB = 10^9 bytes). Its tcp_bw is bytes received over the
/// elapsed time; its tcp_lat is the elapsed time over the messages received by both sides,
/// i.e. the mean of half round trips (qperf.c, calc_results).
pub fn parse(output: &str) -> QperfResult {
    let mut r = QperfResult::default();
    for line in output.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let mut words = value.split_whitespace();
        let (Some(num), Some(unit)) = (words.next(), words.next()) else {
            continue;
        };
        // qperf groups digits with commas ("1,234 sec") unless --unify_units is given.
        let Ok(num) = num.replace(',', "").parse::<f64>() else {
            continue;
        };
        match key.trim() {
            "bw" => {
                let scale = match unit {
                    "bytes/sec" => Some(1.0),
                    "KB/sec" => Some(1e3),
                    "MB/sec" => Some(1e6),
                    "GB/sec" => Some(1e9),
                    "TB/sec" => Some(1e12),
                    // With -ub qperf prints bits.
                    "bits/sec" => Some(1.0 / 8.0),
                    "Kb/sec" => Some(1e3 / 8.0),
                    "Mb/sec" => Some(1e6 / 8.0),
                    "Gb/sec" => Some(1e9 / 8.0),
                    _ => None,
                };
                r.bw_bytes_per_sec = scale.map(|s| num * s);
            }
            "latency" => {
                r.latency_us = match unit {
                    "ns" => Some(num / 1e3),
                    "us" => Some(num),
                    "ms" => Some(num * 1e3),
                    "sec" | "s" => Some(num * 1e6),
                    _ => None,
                };
            }
            _ => {}
        }
    }
    r
}

/// Where qperf's two ends run: each in a network namespace or in this one, and the address
/// the client reaches the server at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The server's namespace, or this one.
    pub server_netns: Option<String>,
    /// The client's namespace, or this one.
    pub client_netns: Option<String>,
    /// The server's address as the client sees it.
    pub address: String,
}

impl Route {
    /// Both ends here, over loopback.
    pub fn loopback() -> Route {
        Route {
            server_netns: None,
            client_netns: None,
            address: "localhost".into(),
        }
    }
}

/// A qperf server on a free port, ended on drop.
#[derive(Debug)]
pub struct Server {
    _guard: Guard,
    port: u16,
    route: Route,
}

impl Server {
    /// Starts `qperf --listen_port PORT` on loopback, its output in `log`.
    pub fn start(log: &Path) -> Result<Server, Error> {
        Server::start_on(log, Route::loopback())
    }

    /// Starts `qperf --listen_port PORT` where `route` puts the server, its output in `log`.
    pub fn start_on(log: &Path, route: Route) -> Result<Server, Error> {
        if which("qperf").is_none() {
            return Err(Error::NotInstalled);
        }
        // Free here; a namespace of the bench's own has nothing listening at all.
        let port = free_port().map_err(Error::NoPort)?;
        let mut cmd = procs::command(
            "qperf",
            procs::Role::Baseline,
            route.server_netns.as_deref(),
        );
        cmd.arg("--listen_port").arg(port.to_string());
        let guard = Guard::spawn(cmd, "qperf server", log)?;
        // The client's --wait_server covers the server's start-up.
        Ok(Server {
            _guard: guard,
            port,
            route,
        })
    }

    /// Runs the client for `tests` (tcp_bw, tcp_lat) with `size`-byte messages for `secs`
    /// seconds each (qperf takes whole seconds; 0 would run for ever).
    pub fn run(
        &self,
        tests: &[&str],
        size: u64,
        secs: u64,
        log: &Path,
    ) -> Result<QperfResult, Error> {
        let secs = secs.max(1);
        let mut cmd = procs::command(
            "qperf",
            procs::Role::Baseline,
            self.route.client_netns.as_deref(),
        );
        cmd.args(client_args(
            self.port,
            &self.route.address,
            tests,
            size,
            secs,
        ));
        let guard = Guard::spawn(cmd, "qperf", log)?;
        // Each test runs `secs`, plus connection set-up; a client that loses its server hangs.
        guard.wait(Duration::from_secs(20 + secs * tests.len() as u64))?;
        let output = std::fs::read_to_string(log).unwrap_or_default();
        let r = parse(&output);
        let missing = |what| Error::NoResult {
            what,
            output: output.trim().replace('\n', " | "),
        };
        if tests.contains(&"tcp_bw") && r.bw_bytes_per_sec.is_none() {
            return Err(missing("bw"));
        }
        if tests.contains(&"tcp_lat") && r.latency_us.is_none() {
            return Err(missing("latency"));
        }
        Ok(r)
    }
}

/// The client's arguments after `qperf`: `tests` with `size`-byte messages for `secs` seconds
/// each against the server at `address`, listening on `port`.
fn client_args(port: u16, address: &str, tests: &[&str], size: u64, secs: u64) -> Vec<String> {
    let mut a: Vec<String> = [
        "--listen_port",
        &port.to_string(),
        "--wait_server",
        "5",
        "--time",
        &secs.to_string(),
        "--msg_size",
        &size.to_string(),
        address,
    ]
    .iter()
    .map(|w| (*w).to_owned())
    .collect();
    a.extend(tests.iter().map(|t| (*t).to_owned()));
    a
}

/// The path of `program` in PATH.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A TCP port nothing listens on now (the kernel picks it; the server, qperf or section
/// shim's, binds it right after).
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_results_parse_with_their_units() {
        let out = "tcp_bw:\n    bw  =  3.25 GB/sec\ntcp_lat:\n    latency  =  37.5 us\n";
        let r = parse(out);
        assert_eq!(r.bw_bytes_per_sec, Some(3.25e9));
        assert_eq!(r.latency_us, Some(37.5));
    }

    #[test]
    fn other_units_are_scaled() {
        let r = parse("tcp_bw:\n    bw  =  812 MB/sec\n");
        assert_eq!(r.bw_bytes_per_sec, Some(812e6));
        assert_eq!(r.latency_us, None);
        let r = parse("tcp_bw:\n    bw  =  2747269120 bytes/sec\n");
        assert_eq!(r.bw_bytes_per_sec, Some(2747269120.0));
        let r = parse("tcp_bw:\n    bw  =  950 KB/sec\n");
        assert_eq!(r.bw_bytes_per_sec, Some(950e3));
        let r = parse("tcp_bw:\n    bw  =  8 Gb/sec\n");
        assert_eq!(r.bw_bytes_per_sec, Some(1e9));
        let r = parse("tcp_lat:\n    latency  =  1.2 ms\n");
        assert_eq!(r.latency_us, Some(1200.0));
        let r = parse("tcp_lat:\n    latency  =  1,250 sec\n");
        assert_eq!(r.latency_us, Some(1.25e9));
        let r = parse("tcp_lat:\n    latency  =  950 ns\n");
        assert_eq!(r.latency_us, Some(0.95));
    }

    #[test]
    fn the_client_asks_the_server_s_address() {
        assert_eq!(
            client_args(4242, "localhost", &["tcp_bw", "tcp_lat"], 65536, 2).join(" "),
            "--listen_port 4242 --wait_server 5 --time 2 --msg_size 65536 localhost tcp_bw tcp_lat"
        );
        assert_eq!(
            client_args(4242, "10.66.0.1", &["tcp_lat"], 8, 1).join(" "),
            "--listen_port 4242 --wait_server 5 --time 1 --msg_size 8 10.66.0.1 tcp_lat"
        );
        assert_eq!(Route::loopback().address, "localhost");
    }

    #[test]
    fn verbose_lines_and_failures_are_not_results() {
        // -vu adds msg_size and time lines; they must not be taken for results.
        let out = "tcp_lat:\n    latency   =  36 us\n    msg_size  =   8 bytes\n    time      =   1 sec\n";
        assert_eq!(
            parse(out),
            QperfResult {
                bw_bytes_per_sec: None,
                latency_us: Some(36.0)
            }
        );
        assert_eq!(
            parse("failed to connect: Connection refused\n"),
            QperfResult::default()
        );
    }
}
