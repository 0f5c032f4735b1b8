//! perftest-style statistics and tables.
//!
//! The numbers follow perftest's definitions: latency is half the measured round trip of each
//! iteration, `t_typical` is the median, percentiles are taken from the sorted samples, and
//! MB/sec means 2^20 bytes per second.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use vrdma_proto::Gid;

/// The dashed line perftest puts between header blocks.
pub const RULE: &str =
    "---------------------------------------------------------------------------------------";

/// Latency columns, as `ib_write_lat` prints them.
const LAT_COLUMNS: [&str; 9] = [
    "#bytes",
    "#iterations",
    "t_min[usec]",
    "t_max[usec]",
    "t_typical[usec]",
    "t_avg[usec]",
    "t_stdev[usec]",
    "99% percentile[usec]",
    "99.9% percentile[usec]",
];

/// Bandwidth columns, as `ib_write_bw` prints them.
const BW_COLUMNS: [&str; 5] = [
    "#bytes",
    "#iterations",
    "BW peak[MB/sec]",
    "BW average[MB/sec]",
    "MsgRate[Mpps]",
];

/// One side of the connection, as perftest prints it under the header.
#[derive(Debug, Clone, Copy)]
pub struct Address {
    /// QP number.
    pub qpn: u32,
    /// Remote key of the buffer.
    pub rkey: u32,
    /// Buffer address.
    pub vaddr: u64,
    /// Port GID.
    pub gid: Gid,
}

/// What the header of every test shows.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Path MTU in bytes.
    pub mtu: u32,
    /// This guest's QP and buffer.
    pub local: Address,
    /// The other guest's.
    pub remote: Address,
    /// How the QP information was exchanged.
    pub exchange: String,
}

/// The perftest-style header of one test.
pub fn header(
    title: &str,
    method: &str,
    setup: &Setup,
    tx_depth: u32,
    cq_mod: u32,
    inline: u32,
    latency: bool,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{RULE}");
    let _ = writeln!(s, "{}", format!("{title:^87}").trim_end());
    let rows = [
        (
            "Dual-port",
            "OFF".to_owned(),
            "Device",
            "vrdma (virtio-user)".to_owned(),
        ),
        ("Number of qps", "1".into(), "Transport type", "RC".into()),
        (
            "Connection type",
            "RC".into(),
            "Fabric",
            "soft (daemon, guest to guest)".into(),
        ),
        ("TX depth", tx_depth.to_string(), "Using SRQ", "OFF".into()),
        (
            "CQ Moderation",
            cq_mod.to_string(),
            "Mtu",
            format!("{}[B]", setup.mtu),
        ),
        (
            "Link type",
            "Ethernet".into(),
            "Max inline data",
            format!("{inline}[B]"),
        ),
    ];
    for (k1, v1, k2, v2) in rows {
        let _ = writeln!(s, " {k1:<16}: {v1:<14}{k2:<15}: {v2}");
    }
    let _ = writeln!(s, " {:<16}: {}", "Data ex. method", setup.exchange);
    let _ = writeln!(s, " {:<16}: {method}", "Method");
    let _ = writeln!(s, "{RULE}");
    for (side, a) in [("local", setup.local), ("remote", setup.remote)] {
        let _ = writeln!(
            s,
            " {side} address: LID 0000 QPN {:#06x} PSN 0x000000 RKey {:#010x} VAddr {:#016x}",
            a.qpn, a.rkey, a.vaddr
        );
        let _ = writeln!(s, " GID: {}", a.gid);
    }
    let _ = writeln!(s, "{RULE}");
    let columns: &[&str] = if latency { &LAT_COLUMNS } else { &BW_COLUMNS };
    let _ = write!(
        s,
        "{}",
        row(columns.iter().map(|c| (*c).to_owned()), columns)
    );
    s
}

fn row(cells: impl Iterator<Item = String>, columns: &[&str]) -> String {
    let mut s = String::new();
    for (cell, col) in cells.zip(columns) {
        let _ = write!(s, " {cell:<width$}  ", width = col.len().max(7));
    }
    s.truncate(s.trim_end().len());
    s.push('\n');
    s
}

/// Latency statistics over the samples of one size, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Iterations measured.
    pub iterations: usize,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Median (perftest's "typical").
    pub typical: f64,
    /// Mean.
    pub avg: f64,
    /// Standard deviation.
    pub stdev: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
}

impl Latency {
    /// Statistics of one-way latencies: each sample is a round trip and counts as half.
    pub fn from_round_trips(rtts: &[Duration]) -> Latency {
        let mut v: Vec<f64> = rtts.iter().map(|d| d.as_secs_f64() * 1e6 / 2.0).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1);
        let avg = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - avg) * (x - avg)).sum::<f64>() / n as f64;
        let at = |p: f64| {
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, n) - 1;
            v.get(i).copied().unwrap_or(0.0)
        };
        Latency {
            iterations: v.len(),
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
            typical: at(0.5),
            avg,
            stdev: var.sqrt(),
            p99: at(0.99),
            p999: at(0.999),
        }
    }

    /// One table row.
    pub fn row(&self, bytes: usize) -> String {
        let cells = [
            bytes.to_string(),
            self.iterations.to_string(),
            format!("{:.2}", self.min),
            format!("{:.2}", self.max),
            format!("{:.2}", self.typical),
            format!("{:.2}", self.avg),
            format!("{:.2}", self.stdev),
            format!("{:.2}", self.p99),
            format!("{:.2}", self.p999),
        ];
        row(cells.into_iter(), &LAT_COLUMNS)
    }
}

/// Bandwidth of one size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bandwidth {
    /// Messages.
    pub iterations: u64,
    /// Best rate over any window of a tenth of the run, MB/sec (2^20 B/s).
    pub peak: f64,
    /// Bytes over the whole run's time, MB/sec.
    pub average: f64,
    /// Millions of messages per second.
    pub msg_rate: f64,
}

impl Bandwidth {
    /// From the start time and, for each signalled completion, when it was polled and how many
    /// messages had completed by then.
    pub fn from_samples(bytes: usize, start: Instant, samples: &[(Instant, u64)]) -> Bandwidth {
        const MB: f64 = (1u64 << 20) as f64;
        let Some(&(end, total)) = samples.last() else {
            return Bandwidth {
                iterations: 0,
                peak: 0.0,
                average: 0.0,
                msg_rate: 0.0,
            };
        };
        let secs = end.duration_since(start).as_secs_f64().max(1e-9);
        let average = total as f64 * bytes as f64 / secs / MB;
        // Peak: the best window of at least a tenth of the messages (perftest's peak looks at
        // every sub-range, which with completions moderated 16 at a time says more about the
        // moderation than about the device).
        let window = (total / 10).max(1);
        let mut points = Vec::with_capacity(samples.len() + 1);
        points.push((start, 0u64));
        points.extend_from_slice(samples);
        let mut peak = average;
        let mut j = 0;
        for i in 0..points.len() {
            j = j.max(i + 1);
            while j < points.len() && points[j].1 - points[i].1 < window {
                j += 1;
            }
            let Some(&(tj, cj)) = points.get(j) else {
                break;
            };
            let dt = tj.duration_since(points[i].0).as_secs_f64();
            if dt > 0.0 {
                peak = peak.max((cj - points[i].1) as f64 * bytes as f64 / dt / MB);
            }
        }
        Bandwidth {
            iterations: total,
            peak,
            average,
            msg_rate: total as f64 / secs / 1e6,
        }
    }

    /// One table row.
    pub fn row(&self, bytes: usize) -> String {
        let cells = [
            bytes.to_string(),
            self.iterations.to_string(),
            format!("{:.2}", self.peak),
            format!("{:.2}", self.average),
            format!("{:.6}", self.msg_rate),
        ];
        row(cells.into_iter(), &BW_COLUMNS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_half_the_round_trip_and_typical_is_the_median() {
        let rtts: Vec<Duration> = (1..=1000).map(|us| Duration::from_micros(us * 2)).collect();
        let l = Latency::from_round_trips(&rtts);
        assert_eq!(l.iterations, 1000);
        assert!((l.min - 1.0).abs() < 1e-9);
        assert!((l.max - 1000.0).abs() < 1e-9);
        assert!((l.typical - 500.0).abs() < 1e-9);
        assert!((l.avg - 500.5).abs() < 1e-9);
        assert!((l.p99 - 990.0).abs() < 1e-9);
        assert!((l.p999 - 999.0).abs() < 1e-9);
    }

    #[test]
    fn bandwidth_uses_binary_megabytes() {
        let start = Instant::now();
        let samples: Vec<(Instant, u64)> = (1..=10)
            .map(|i| (start + Duration::from_millis(100 * i), i * 16))
            .collect();
        let b = Bandwidth::from_samples(1 << 20, start, &samples);
        assert_eq!(b.iterations, 160);
        assert!((b.average - 160.0).abs() < 1e-6, "{b:?}");
        assert!((b.peak - 160.0).abs() < 1e-6, "{b:?}");
        assert!((b.msg_rate - 0.000160).abs() < 1e-9, "{b:?}");
    }
}
