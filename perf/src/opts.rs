//! Command-line options, with perftest's letters and defaults, and the settings they resolve
//! to once the per-test defaults and perftest's dependencies between options are applied.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use vrdma_proto::config::Mtu;

/// perftest's `-a` sizes end here (`MAX_SIZE`, 8 MiB).
pub const MAX_ALL_SIZE: usize = 8 << 20;
/// Receives kept posted per QP by SEND tests (perftest's `DEF_RX_SEND`).
const DEF_RX_DEPTH: u32 = 512;
/// Inline bytes latency tests use unless `-I` says otherwise (perftest's `DEF_INLINE_WRITE`).
pub const DEF_INLINE_LAT: u32 = 220;

/// Why the options cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A combination of options perftest refuses too: a usage error (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The device named with `-d` (or the first one) does not exist.
    #[error("{0}")]
    Device(String),
}

/// One perftest program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// `ib_write_bw`.
    WriteBw,
    /// `ib_write_lat`.
    WriteLat,
    /// `ib_read_bw`.
    ReadBw,
    /// `ib_read_lat`.
    ReadLat,
    /// `ib_send_bw`.
    SendBw,
    /// `ib_send_lat`.
    SendLat,
    /// `ib_atomic_lat`.
    AtomicLat,
}

impl Test {
    /// Every test, in the order `--help` lists them.
    pub const ALL: [Test; 7] = [
        Test::WriteBw,
        Test::WriteLat,
        Test::ReadBw,
        Test::ReadLat,
        Test::SendBw,
        Test::SendLat,
        Test::AtomicLat,
    ];

    /// The name used on the command line and in JSON (`write_bw`).
    pub fn name(self) -> &'static str {
        match self {
            Test::WriteBw => "write_bw",
            Test::WriteLat => "write_lat",
            Test::ReadBw => "read_bw",
            Test::ReadLat => "read_lat",
            Test::SendBw => "send_bw",
            Test::SendLat => "send_lat",
            Test::AtomicLat => "atomic_lat",
        }
    }

    /// Parses `write_bw` or perftest's `ib_write_bw`.
    pub fn from_name(s: &str) -> Option<Test> {
        let s = s.strip_prefix("ib_").unwrap_or(s);
        Test::ALL.into_iter().find(|t| t.name() == s)
    }

    /// The title perftest prints above its header.
    pub fn title(self) -> &'static str {
        match self {
            Test::WriteBw => "RDMA_Write BW Test",
            Test::WriteLat => "RDMA_Write Latency Test",
            Test::ReadBw => "RDMA_Read BW Test",
            Test::ReadLat => "RDMA_Read Latency Test",
            Test::SendBw => "Send BW Test",
            Test::SendLat => "Send Latency Test",
            Test::AtomicLat => "Atomic FETCH_AND_ADD Latency Test",
        }
    }

    /// Bandwidth test (else latency).
    pub fn is_bw(self) -> bool {
        matches!(self, Test::WriteBw | Test::ReadBw | Test::SendBw)
    }

    /// The receiver needs posted receives (SEND tests).
    pub fn is_send(self) -> bool {
        matches!(self, Test::SendBw | Test::SendLat)
    }

    /// The client's operation reads the server's memory (READ, atomics): inline never applies
    /// and the QP needs outstanding-read credits.
    pub fn is_read(self) -> bool {
        matches!(self, Test::ReadBw | Test::ReadLat | Test::AtomicLat)
    }

    /// Latency samples are half a round trip (ping-pong) rather than one whole operation.
    pub fn is_ping_pong(self) -> bool {
        matches!(self, Test::WriteLat | Test::SendLat)
    }
}

fn parse_test(s: &str) -> Result<Test, String> {
    Test::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Test::ALL.iter().map(|t| t.name()).collect();
        format!("unknown test; use one of {}", names.join(", "))
    })
}

/// Parses a path MTU in bytes, as perftest's `-m`.
pub fn parse_mtu(s: &str) -> Result<Mtu, String> {
    match s.parse::<u32>() {
        Ok(256) => Ok(Mtu::Mtu256),
        Ok(512) => Ok(Mtu::Mtu512),
        Ok(1024) => Ok(Mtu::Mtu1024),
        Ok(2048) => Ok(Mtu::Mtu2048),
        Ok(4096) => Ok(Mtu::Mtu4096),
        _ => Err("the MTU is one of 256, 512, 1024, 2048, 4096".into()),
    }
}

const LONG_ABOUT: &str = "\
perftest for vrdma: ib_write_bw, ib_write_lat, ib_read_bw, ib_read_lat, ib_send_bw,
ib_send_lat and ib_atomic_lat over the vrdma guest library, with perftest's options and output.

  vrdma-perf write_bw -d vrdma0                    server: waits for a client on TCP port 18515
  vrdma-perf write_bw -d vrdma1 SERVERHOST         client: runs the test and prints the table
  vrdma-perf write_lat -d vrdma0 --loopback vrdma1 both ends in this process (two VMs)

The server follows the client's -s/-n/-a/-D/-q/-t/-l/-Q/-I/-e/-b/--check; both must run the same
test.
Devices are the names vrdma::device_list() gives (VRDMA_SOCKETS; or inside a VM its vrdma PCI
functions, then the sockets in /run/vrdma)
or vhost-user socket paths.";

/// perftest for vrdma.
#[derive(Debug, Clone, Parser)]
#[command(name = "vrdma-perf", version, long_about = LONG_ABOUT)]
pub struct Args {
    /// The test: write_bw, write_lat, read_bw, read_lat, send_bw, send_lat, atomic_lat (or
    /// perftest's names, ib_write_bw...).
    #[arg(value_name = "TEST", value_parser = parse_test)]
    pub test: Test,
    /// The server to connect to; without it, be the server.
    #[arg(value_name = "SERVERHOST", conflicts_with = "loopback")]
    pub server: Option<String>,
    /// Use device DEV: a name such as vrdma0, or a vhost-user socket path (default: the first
    /// device found).
    #[arg(short = 'd', long = "ib-dev", value_name = "DEV")]
    pub ib_dev: Option<String>,
    /// Size of message to exchange (default 65536 for bw tests, 2 for latency, 8 for atomics).
    #[arg(short = 's', long, value_name = "SIZE",
          value_parser = clap::value_parser!(u64).range(1..=1 << 31))]
    pub size: Option<u64>,
    /// Number of exchanges (at least 5; default 5000 for bw tests, 1000 for latency).
    #[arg(short = 'n', long, value_name = "ITERS", conflicts_with = "duration",
          value_parser = clap::value_parser!(u64).range(5..=1 << 40))]
    pub iters: Option<u64>,
    /// Run sizes from 2 till 2^23 (8 only for atomics).
    #[arg(short = 'a', long, conflicts_with_all = ["size", "duration"])]
    pub all: bool,
    /// Run the test for SECONDS and report the average, instead of a number of iterations.
    #[arg(short = 'D', long, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: Option<u64>,
    /// Number of QPs (bw tests): the work is posted to them round-robin, each does ITERS.
    #[arg(short = 'q', long = "qp", value_name = "QPS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub qps: u32,
    /// Sleep on CQ events instead of polling.
    #[arg(short = 'e', long)]
    pub events: bool,
    /// Size of tx queue: requests kept outstanding per QP (default 128 bw, 1 latency).
    #[arg(short = 't', long = "tx-depth", value_name = "DEP",
          value_parser = clap::value_parser!(u32).range(1..=1 << 15))]
    pub tx_depth: Option<u32>,
    /// Receives kept posted per QP by SEND tests (default 512, at most ITERS).
    #[arg(short = 'r', long = "rx-depth", value_name = "DEP",
          value_parser = clap::value_parser!(u32).range(1..=1 << 15))]
    pub rx_depth: Option<u32>,
    /// Post lists of SIZE requests: one post_send call (one doorbell) each.
    #[arg(short = 'l', long = "post_list", value_name = "SIZE", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1 << 15))]
    pub post_list: u32,
    /// Signal every N-th request (default 100, capped so the queue cannot stall).
    #[arg(short = 'Q', long = "cq-mod", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1 << 15))]
    pub cq_mod: Option<u32>,
    /// Max size of message to be sent inline (default 220 for write/send latency, else 0).
    #[arg(short = 'I', long = "inline_size", value_name = "SIZE")]
    pub inline_size: Option<u32>,
    /// Listen on/connect to TCP port PORT (default 18515; --loopback picks a free one).
    #[arg(short = 'p', long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Measure bidirectional bandwidth (bw tests).
    #[arg(short = 'b', long)]
    pub bidirectional: bool,
    /// Report BW in Gbit/sec instead of MiB/sec.
    #[arg(long = "report_gbits")]
    pub report_gbits: bool,
    /// Save the report as JSON (in perftest_out.json unless --out_json_file says where).
    #[arg(long = "out_json")]
    pub out_json: bool,
    /// Save the JSON report in FILE (implies --out_json).
    #[arg(long = "out_json_file", value_name = "FILE")]
    pub out_json_file: Option<PathBuf>,
    /// Path MTU: 256, 512, 1024, 2048 or 4096 (default: the port's active MTU).
    #[arg(short = 'm', long, value_name = "MTU", value_parser = parse_mtu)]
    pub mtu: Option<Mtu>,
    /// Run both ends in this process: the server on DEV2 in a thread, the client on -d.
    #[arg(long, value_name = "DEV2")]
    pub loopback: Option<String>,
    /// Verify every payload (not atomic_lat); numbers measured with --check are not
    /// comparable with others.
    ///
    /// Not a perftest option (its -c is the connection type, so there is no short letter).
    /// The sender fills each message with a pattern of its QP and iteration; the receiver
    /// checks each message in full (write_bw: each buffer slot's last message, at the end of
    /// the run, told over TCP; read tests: the reader checks what it read). A mismatch fails
    /// the run, naming the test, iteration, offset, expected and found byte; a checked run
    /// prints "payloads verified: N messages, M bytes" on each side that verified (with
    /// --loopback, one line for both). The server follows the client's --check. Each request
    /// in flight gets a buffer slot of its own, so -t (and send_bw's -r) are capped to fit
    /// 4 MiB per QP; filling and checking take time.
    #[arg(long)]
    pub check: bool,
}

/// Which end this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Waits for a client.
    Server,
    /// Connects to the server at the host.
    Client(String),
    /// Both, the server on the given device in a thread.
    Loopback(String),
}

/// What a run uses, once the defaults are applied.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The test.
    pub test: Test,
    /// Which end.
    pub role: Role,
    /// `-d`, unresolved (resolved with [`resolve_device`] when opened).
    pub device: Option<String>,
    /// Message sizes, one table row each.
    pub sizes: Vec<usize>,
    /// Iterations per QP (ignored with `duration`).
    pub iters: u64,
    /// `-D`.
    pub duration: Option<Duration>,
    /// QPs.
    pub qps: u32,
    /// Sleep on events.
    pub events: bool,
    /// Outstanding requests per QP.
    pub tx_depth: u32,
    /// Receives posted per QP (SEND tests and the event mode of write_lat).
    pub rx_depth: u32,
    /// Requests per post_send call.
    pub post_list: u32,
    /// Signal every N-th request.
    pub cq_mod: u32,
    /// `-I`, if given (the default depends on the device).
    pub inline_size: Option<u32>,
    /// TCP port; `None` is 18515, or a free port with `--loopback`.
    pub port: Option<u16>,
    /// `-b`.
    pub bidirectional: bool,
    /// `--report_gbits`.
    pub report_gbits: bool,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
    /// `-m`.
    pub mtu: Option<Mtu>,
    /// `--check`.
    pub check: bool,
}

/// perftest's default TCP port.
pub const DEF_PORT: u16 = 18515;

impl Settings {
    /// Applies the per-test defaults and checks the combinations perftest checks.
    pub fn from_args(a: &Args) -> Result<Settings, Error> {
        let test = a.test;
        let usage = |s: String| Err(Error::Usage(s));
        if !test.is_bw() && a.qps > 1 {
            return usage(format!("{} uses one QP; -q is for bw tests", test.name()));
        }
        if !test.is_bw() && a.bidirectional {
            return usage("-b (bidirectional) is for bw tests".into());
        }
        if !test.is_bw() && a.post_list > 1 {
            return usage("-l (post list) is for bw tests".into());
        }
        if test == Test::AtomicLat && a.size.is_some_and(|s| s != 8) {
            return usage("atomic operations are 8 bytes: -s must be 8".into());
        }
        if test.is_read() && a.inline_size.is_some_and(|i| i > 0) {
            return usage(format!("{} cannot send inline (-I)", test.name()));
        }
        if test == Test::AtomicLat && a.check {
            return usage("--check verifies payloads; atomic_lat has none".into());
        }
        let sizes: Vec<usize> = if test == Test::AtomicLat {
            vec![8]
        } else if a.all {
            (1..=23).map(|p| 1usize << p).collect()
        } else {
            let default = if test.is_bw() { 65536 } else { 2 };
            vec![a.size.map_or(default, |s| s as usize)]
        };
        let iters = a.iters.unwrap_or(if test.is_bw() { 5000 } else { 1000 });
        // With --check each request in flight has a slot of its own.
        let slots = if a.check {
            crate::check::max_slots(sizes.iter().copied().max().unwrap_or(1))
        } else {
            u32::MAX
        };
        let tx_depth = if test.is_bw() {
            // As perftest: never deeper than the whole run.
            let t = a.tx_depth.unwrap_or(128).min(slots);
            if a.duration.is_some() {
                t
            } else {
                t.min(u32::try_from(iters).unwrap_or(u32::MAX))
            }
        } else {
            // A latency test has exactly one request in flight.
            1
        };
        let post_list = a.post_list;
        if post_list > tx_depth {
            return usage(format!(
                "the post list ({post_list}) is longer than the TX depth ({tx_depth}{})",
                if tx_depth == slots {
                    ", as --check caps it at this size"
                } else {
                    ""
                }
            ));
        }
        if a.duration.is_none() && iters % u64::from(post_list) != 0 {
            return usage(format!(
                "the number of iterations ({iters}) must be a multiple of the post list ({post_list})"
            ));
        }
        // Signalling less often than this would leave the queue full of requests no completion
        // reports, and the test would stall (perftest caps it at the TX depth).
        let cq_mod = if test.is_bw() {
            a.cq_mod.unwrap_or(100).min(tx_depth - post_list + 1)
        } else {
            1
        };
        let rx_depth = a
            .rx_depth
            .unwrap_or(DEF_RX_DEPTH)
            .min(if test == Test::SendBw {
                slots
            } else {
                u32::MAX
            })
            .min(if a.duration.is_some() {
                u32::MAX
            } else {
                u32::try_from(iters).unwrap_or(u32::MAX)
            });
        let role = match (&a.server, &a.loopback) {
            (Some(host), _) => Role::Client(host.clone()),
            (None, Some(dev2)) => Role::Loopback(dev2.clone()),
            (None, None) => Role::Server,
        };
        let json = match (&a.out_json_file, a.out_json) {
            (Some(f), _) => Some(f.clone()),
            (None, true) => Some(PathBuf::from("perftest_out.json")),
            (None, false) => None,
        };
        Ok(Settings {
            test,
            role,
            device: a.ib_dev.clone(),
            sizes,
            iters,
            duration: a.duration.map(Duration::from_secs),
            qps: a.qps,
            events: a.events,
            tx_depth,
            rx_depth,
            post_list,
            cq_mod,
            inline_size: a.inline_size,
            port: a.port,
            bidirectional: a.bidirectional,
            report_gbits: a.report_gbits,
            json,
            mtu: a.mtu,
            check: a.check,
        })
    }
}

/// A device to open: what the header calls it, and the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceChoice {
    /// `vrdma0`, or the socket path given.
    pub name: String,
    /// The device: a vhost-user socket or, inside a VM, a PCI function.
    pub device: vrdma::Device,
}

/// Resolves `-d`: a name from [`vrdma::device_list`], or a socket path; without it, the first
/// device, as perftest takes the first device found.
pub fn resolve_device(dev: Option<&str>) -> Result<DeviceChoice, Error> {
    let list = vrdma::device_list();
    let Some(dev) = dev else {
        return list
            .first()
            .map(|d| DeviceChoice {
                name: d.name.clone(),
                device: d.clone(),
            })
            .ok_or_else(|| {
                Error::Device(format!(
                    "no vrdma device found (none in VRDMA_SOCKETS or {}); give -d SOCKET",
                    vrdma::DEFAULT_SOCKET_DIR
                ))
            });
    };
    if let Some(d) = list.iter().find(|d| d.name == dev) {
        return Ok(DeviceChoice {
            name: d.name.clone(),
            device: d.clone(),
        });
    }
    // A path: anything with a slash, or an existing file.
    if dev.contains('/') || std::path::Path::new(dev).exists() {
        return Ok(DeviceChoice {
            name: dev.to_owned(),
            device: vrdma::Device::socket(dev, dev),
        });
    }
    let known: Vec<String> = list
        .iter()
        .map(|d| format!("{} ({})", d.name, d.path.display()))
        .collect();
    Err(Error::Device(format!(
        "IB device {dev} not found; devices: {}",
        if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(argv: &[&str]) -> Result<Settings, Error> {
        let mut v = vec!["vrdma-perf"];
        v.extend_from_slice(argv);
        Settings::from_args(&Args::try_parse_from(v).expect("parses"))
    }

    #[test]
    fn defaults_follow_perftest_per_test() {
        let bw = settings(&["ib_write_bw"]).unwrap();
        assert_eq!(
            (bw.sizes.clone(), bw.iters, bw.tx_depth, bw.cq_mod),
            (vec![65536], 5000, 128, 100)
        );
        let lat = settings(&["write_lat"]).unwrap();
        assert_eq!(
            (lat.sizes.clone(), lat.iters, lat.tx_depth),
            (vec![2], 1000, 1)
        );
        let all = settings(&["send_lat", "-a"]).unwrap();
        assert_eq!(all.sizes.len(), 23);
        assert_eq!((all.sizes[0], all.sizes[22]), (2, MAX_ALL_SIZE));
        assert_eq!(settings(&["atomic_lat", "-a"]).unwrap().sizes, vec![8]);
    }

    #[test]
    fn cq_moderation_is_capped_so_the_queue_cannot_stall() {
        let s = settings(&["write_bw", "-t", "128", "-l", "64", "-n", "640"]).unwrap();
        assert_eq!(s.cq_mod, 65);
        let s = settings(&["write_bw", "-n", "10"]).unwrap();
        assert_eq!((s.tx_depth, s.cq_mod), (10, 10));
    }

    #[test]
    fn combinations_perftest_refuses_are_usage_errors() {
        for argv in [
            &["write_lat", "-q", "2"][..],
            &["atomic_lat", "-s", "16"],
            &["write_bw", "-l", "3", "-n", "10"],
            &["read_bw", "-I", "64"],
            &["atomic_lat", "--check"],
            // --check caps the TX depth at 1 for 8 MiB messages.
            &[
                "write_bw", "-s", "8388608", "-l", "2", "-n", "10", "--check",
            ],
        ] {
            assert!(matches!(settings(argv), Err(Error::Usage(_))), "{argv:?}");
        }
    }

    #[test]
    fn check_gives_each_request_in_flight_a_slot_of_its_own() {
        let s = settings(&["write_bw", "--check"]).unwrap();
        assert!(s.check);
        // 64 slots of 64 KiB fit 4 MiB.
        assert_eq!((s.tx_depth, s.cq_mod), (64, 64));
        let s = settings(&["send_bw", "--check", "-s", "1048576"]).unwrap();
        assert_eq!((s.tx_depth, s.rx_depth), (4, 4));
        // Small messages keep perftest's depths; latency tests are unchanged.
        let s = settings(&["send_bw", "--check", "-s", "64"]).unwrap();
        assert_eq!((s.tx_depth, s.rx_depth), (128, 512));
        let s = settings(&["send_lat", "--check", "-s", "1048576"]).unwrap();
        assert_eq!((s.tx_depth, s.rx_depth), (1, 512));
        assert!(!settings(&["write_bw"]).unwrap().check);
    }
}
