//! What perftest prints (header, address lines, result tables, in its formats) and the JSON
//! report the bench harness reads.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vrdma_proto::Gid;

use crate::opts::Test;
use crate::stats::{BwStats, LatStats};

/// perftest's `RESULT_LINE`.
pub const RESULT_LINE: &str =
    "---------------------------------------------------------------------------------------";
/// perftest's `RESULT_FMT`.
pub const RESULT_FMT: &str =
    " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]";
/// perftest's `RESULT_FMT_G` (`--report_gbits`).
pub const RESULT_FMT_G: &str =
    " #bytes     #iterations    BW peak[Gb/sec]    BW average[Gb/sec]   MsgRate[Mpps]";
/// perftest's `RESULT_FMT_LAT`.
pub const RESULT_FMT_LAT: &str = " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec]";

/// Why the JSON report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be written.
    #[error("couldn't write the JSON report to {path}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// One QP's address, as the two sides exchange and print it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpAddress {
    /// QP number.
    pub qpn: u32,
    /// Initial packet sequence number.
    pub psn: u32,
    /// Remote key of the QP's buffer.
    pub rkey: u32,
    /// The buffer's address.
    pub vaddr: u64,
    /// The port's GID.
    pub gid: Gid,
}

/// What the header shows besides the test.
#[derive(Debug, Clone)]
pub struct HeaderInfo {
    /// Device name.
    pub device: String,
    /// QPs.
    pub qps: u32,
    /// Requests outstanding per QP.
    pub tx_depth: u32,
    /// Signal every N-th (bw tests).
    pub cq_mod: u32,
    /// Path MTU in bytes.
    pub mtu: u32,
    /// Inline bytes.
    pub inline: u32,
    /// Outstanding READs/atomics (READ and atomic tests).
    pub out_reads: u32,
    /// Requests per post call.
    pub post_list: u32,
    /// `-e`.
    pub events: bool,
    /// `-b`.
    pub bidirectional: bool,
    /// `-D` seconds.
    pub duration: Option<u64>,
}

/// Formats `v` as C's `%#0{width}x` does: no `0x` for zero.
fn c_hex(v: u64, width: usize) -> String {
    if v == 0 {
        format!("{:0width$}", 0)
    } else {
        format!("{v:#0width$x}")
    }
}

/// perftest's header block, up to the line before the address lines.
pub fn header(test: Test, h: &HeaderInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{RESULT_LINE}");
    let _ = writeln!(s, "                    {}", test.title());
    let _ = writeln!(s, " Dual-port       : OFF\t\tDevice         : {}", h.device);
    let _ = writeln!(s, " Number of qps   : {}\t\tTransport type : IB", h.qps);
    let _ = writeln!(s, " Connection type : RC\t\tUsing SRQ      : OFF");
    if h.bidirectional {
        let _ = writeln!(s, " Bidirectional   : ON");
    }
    let _ = writeln!(s, " TX depth        : {}", h.tx_depth);
    if test.is_bw() {
        let _ = writeln!(s, " CQ Moderation   : {}", h.cq_mod);
    }
    if h.post_list > 1 {
        let _ = writeln!(s, " Post List       : {}", h.post_list);
    }
    let _ = writeln!(s, " Mtu             : {}[B]", h.mtu);
    let _ = writeln!(s, " Link type       : Ethernet");
    let _ = writeln!(s, " GID index       : 0");
    if test.is_read() {
        let _ = writeln!(s, " Outstand reads  : {}", h.out_reads);
    }
    if !test.is_read() {
        let _ = writeln!(s, " Max inline data : {}[B]", h.inline);
    }
    let _ = writeln!(s, " rdma_cm QPs\t : OFF");
    if h.events {
        let _ = writeln!(
            s,
            " Use events      : ON (sleeping on a completion channel)"
        );
        if test == Test::WriteLat {
            let _ = writeln!(
                s,
                " Events method   : RDMA_WRITE_WITH_IMM, the receiver sleeps on its CQ"
            );
        }
    }
    if let Some(d) = h.duration {
        let _ = writeln!(s, " Duration        : {d}[sec]");
    }
    let _ = writeln!(s, " Data ex. method : Ethernet");
    let _ = writeln!(s, "{RESULT_LINE}");
    s
}

/// The address lines of one side: `side` is `local` or `remote`.
pub fn address(side: &str, a: &QpAddress) -> String {
    let gid: Vec<String> = a.gid.0.iter().map(|b| format!("{b:02}")).collect();
    format!(
        " {side} address: LID {} QPN {} PSN {} RKey {} VAddr {}\n GID: {}\n",
        c_hex(0, 4),
        c_hex(a.qpn.into(), 6),
        c_hex(a.psn.into(), 6),
        c_hex(a.rkey.into(), 8),
        c_hex(a.vaddr, 16),
        gid.join(":")
    )
}

/// The column line of the results.
pub fn columns(test: Test, gbits: bool) -> &'static str {
    match (test.is_bw(), gbits) {
        (true, false) => RESULT_FMT,
        (true, true) => RESULT_FMT_G,
        (false, _) => RESULT_FMT_LAT,
    }
}

/// One bw row, as perftest's `REPORT_FMT`.
pub fn bw_row(bytes: usize, s: &BwStats, gbits: bool) -> String {
    // MiB/s to Gbit/s.
    let scale = if gbits {
        (1u64 << 20) as f64 * 8.0 / 1e9
    } else {
        1.0
    };
    format!(
        " {:<7}    {:<10}       {:<7.2}            {:<7.2}\t\t   {:<7.6}",
        bytes,
        s.iterations,
        s.peak_mib * scale,
        s.avg_mib * scale,
        s.msg_rate_mpps
    )
}

/// One latency row, as perftest's `REPORT_FMT_LAT`.
pub fn lat_row(bytes: usize, s: &LatStats) -> String {
    format!(
        " {:<7} {}          {:<7.2}        {:<7.2}      {:<7.2}  \t       {:<7.2}     \t{:<7.2}\t\t{:<7.2} \t\t{:<7.2}",
        bytes, s.iterations, s.min, s.max, s.typical, s.avg, s.stdev, s.p99, s.p999
    )
}

/// One bw size in the JSON report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BwEntry {
    /// Message size.
    pub bytes: u64,
    /// Iterations.
    pub iterations: u64,
    /// Peak, MiB/s.
    pub bw_peak_mib: f64,
    /// Average, MiB/s.
    pub bw_avg_mib: f64,
    /// Millions of messages per second.
    pub msg_rate_mpps: f64,
}

/// One latency size in the JSON report, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatEntry {
    /// Message size.
    pub bytes: u64,
    /// Iterations.
    pub iterations: u64,
    /// Smallest.
    pub t_min_us: f64,
    /// Largest kept.
    pub t_max_us: f64,
    /// Median.
    pub t_typical_us: f64,
    /// Mean.
    pub t_avg_us: f64,
    /// Standard deviation.
    pub t_stdev_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

/// The JSON report: one object, the contract with the bench harness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonReport {
    /// `write_bw`, ...
    pub test: String,
    /// `-e`.
    pub events: bool,
    /// `-q`.
    pub qps: u32,
    /// `-t` as used.
    pub tx_depth: u32,
    /// `-l`.
    pub post_list: u32,
    /// `-Q` as used.
    pub cq_mod: u32,
    /// Inline bytes as used.
    pub inline_size: u32,
    /// One entry per size (bw tests).
    pub bw: Vec<BwEntry>,
    /// One entry per size (latency tests).
    pub lat: Vec<LatEntry>,
}

impl JsonReport {
    /// Adds a bw row.
    pub fn push_bw(&mut self, bytes: usize, s: &BwStats) {
        self.bw.push(BwEntry {
            bytes: bytes as u64,
            iterations: s.iterations,
            bw_peak_mib: s.peak_mib,
            bw_avg_mib: s.avg_mib,
            msg_rate_mpps: s.msg_rate_mpps,
        });
    }

    /// Adds a latency row.
    pub fn push_lat(&mut self, bytes: usize, s: &LatStats) {
        self.lat.push(LatEntry {
            bytes: bytes as u64,
            iterations: s.iterations,
            t_min_us: s.min,
            t_max_us: s.max,
            t_typical_us: s.typical,
            t_avg_us: s.avg,
            t_stdev_us: s.stdev,
            p99_us: s.p99,
            p999_us: s.p999,
        });
    }

    /// Writes the report to `path`.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let mut text = serde_json::to_string(self).map_err(|e| Error::Write {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        text.push('\n');
        std::fs::write(path, text).map_err(|source| Error::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lines_print_as_perftest_with_c_hex_and_decimal_gid() {
        let a = QpAddress {
            qpn: 0x108,
            psn: 0x2a1e5e,
            rkey: 0x1fffbd,
            vaddr: 0x7f3b7d7ba000,
            gid: Gid::from_ipv4([10, 0, 0, 1]),
        };
        assert_eq!(
            address("local", &a),
            " local address: LID 0000 QPN 0x0108 PSN 0x2a1e5e RKey 0x1fffbd VAddr 0x007f3b7d7ba000\n \
             GID: 00:00:00:00:00:00:00:00:00:00:255:255:10:00:00:01\n"
        );
    }

    #[test]
    fn rows_use_perftest_formats() {
        let bw = BwStats {
            iterations: 5000,
            peak_mib: 11025.5,
            avg_mib: 11000.25,
            msg_rate_mpps: 0.176004,
        };
        assert_eq!(
            bw_row(65536, &bw, false),
            " 65536      5000             11025.50            11000.25\t\t   0.176004"
        );
        // 1000 MiB/s = 8.388608 Gbit/s.
        let one = BwStats {
            avg_mib: 1000.0,
            peak_mib: 1000.0,
            ..bw
        };
        assert!(bw_row(65536, &one, true).contains("8.39"));
    }
}
