//! The vrdma series: runs `vrdma-perf` (the perftest clone) as a child and reads the JSON it
//! writes with `--out_json_file`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{self, Guard};

/// Why a vrdma-perf run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Running it failed.
    #[error(transparent)]
    Process(#[from] procs::Error),
    /// Its JSON could not be read.
    #[error("cannot read vrdma-perf's result {path}: {reason}")]
    Json {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The JSON has no result for the size asked.
    #[error("vrdma-perf's result {path} has no {kind} entry for {size} bytes")]
    NoEntry {
        /// The file.
        path: String,
        /// "bw" or "lat".
        kind: &'static str,
        /// The size asked for.
        size: u64,
    },
}

// The contract's types are vrdma-perf's own, so the two sides cannot drift apart.
pub use vrdma_perf::report::{BwEntry, JsonReport as Report, LatEntry};

/// Parses the JSON contract.
pub fn parse(text: &str) -> Result<Report, serde_json::Error> {
    serde_json::from_str(text)
}

/// How long a run goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// `-n N` iterations.
    Iterations(u64),
    /// `-D SECS`.
    Seconds(u64),
}

/// One vrdma-perf invocation.
#[derive(Debug, Clone)]
pub struct Run {
    /// write_bw, write_lat, read_bw, read_lat, send_bw, send_lat, atomic_lat.
    pub test: &'static str,
    /// Message size.
    pub size: u64,
    /// How long.
    pub length: Length,
    /// Event mode.
    pub events: bool,
    /// Work requests per post (`-l`), if not perftest's default.
    pub post_list: Option<u32>,
    /// Send-queue depth (`-t`), if not perftest's default.
    pub tx_depth: Option<u32>,
    /// Path MTU in bytes (`-m`), if not the port's active MTU (4096 on every vrdma port).
    pub mtu: Option<u32>,
}

impl Run {
    /// The command line after the program name.
    pub fn args(&self, dev: &Path, loopback: &Path, json: &Path) -> Vec<String> {
        let mut a = vec![
            self.test.to_owned(),
            "-d".into(),
            dev.display().to_string(),
            "--loopback".into(),
            loopback.display().to_string(),
            "-s".into(),
            self.size.to_string(),
        ];
        match self.length {
            Length::Iterations(n) => a.extend(["-n".into(), n.to_string()]),
            Length::Seconds(s) => a.extend(["-D".into(), s.to_string()]),
        }
        if self.events {
            a.push("-e".into());
        }
        if let Some(l) = self.post_list {
            a.extend(["-l".into(), l.to_string()]);
        }
        if let Some(t) = self.tx_depth {
            a.extend(["-t".into(), t.to_string()]);
        }
        if let Some(m) = self.mtu {
            a.extend(["-m".into(), m.to_string()]);
        }
        a.extend(["--out_json_file".into(), json.display().to_string()]);
        a
    }

    /// A file-name stem naming this run.
    pub fn stem(&self) -> String {
        let mut s = format!(
            "{}-{}{}",
            self.test,
            self.size,
            if self.events { "-e" } else { "" }
        );
        if let Some(l) = self.post_list {
            s.push_str(&format!("-l{l}"));
        }
        s
    }
}

/// Runs `binary` for `run` against the daemon's VMs `dev` and `loopback`, with its output and
/// JSON in `dir`, for at most `limit`.
pub fn run(
    binary: &Path,
    run: &Run,
    dev: &Path,
    loopback: &Path,
    dir: &Path,
    limit: Duration,
) -> Result<Report, Error> {
    let json: PathBuf = dir.join(format!("{}.json", run.stem()));
    let log = dir.join(format!("{}.log", run.stem()));
    let _ = std::fs::remove_file(&json);
    let mut cmd = Command::new(binary);
    cmd.args(run.args(dev, loopback, &json));
    Guard::spawn(cmd, "vrdma-perf", &log)?.wait(limit)?;
    let text = std::fs::read_to_string(&json).map_err(|e| Error::Json {
        path: json.display().to_string(),
        reason: e.to_string(),
    })?;
    parse(&text).map_err(|e| Error::Json {
        path: json.display().to_string(),
        reason: e.to_string(),
    })
}

/// Looking up one size's row of a report.
pub trait Rows {
    /// The bandwidth row for `size`.
    fn bw_for(&self, size: u64, path: &str) -> Result<&BwEntry, Error>;
    /// The latency row for `size`.
    fn lat_for(&self, size: u64, path: &str) -> Result<&LatEntry, Error>;
}

impl Rows for Report {
    fn bw_for(&self, size: u64, path: &str) -> Result<&BwEntry, Error> {
        self.bw
            .iter()
            .find(|e| e.bytes == size)
            .ok_or_else(|| Error::NoEntry {
                path: path.into(),
                kind: "bw",
                size,
            })
    }

    fn lat_for(&self, size: u64, path: &str) -> Result<&LatEntry, Error> {
        self.lat
            .iter()
            .find(|e| e.bytes == size)
            .ok_or_else(|| Error::NoEntry {
                path: path.into(),
                kind: "lat",
                size,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BW: &str = r#"{"test":"write_bw","events":false,"qps":1,"tx_depth":128,"post_list":1,"cq_mod":100,"inline_size":0,
 "bw":[{"bytes":65536,"iterations":5000,"bw_peak_mib":12345.6,"bw_avg_mib":12000.1,"msg_rate_mpps":0.19}],
 "lat":[]}"#;

    const LAT: &str = r#"{"test":"write_lat","events":true,"qps":1,"tx_depth":1,"post_list":1,"cq_mod":1,"inline_size":220,
 "bw":[],
 "lat":[{"bytes":8,"iterations":1000,"t_min_us":3.1,"t_max_us":40.2,"t_typical_us":4.5,"t_avg_us":4.8,"t_stdev_us":0.9,"p99_us":7.25,"p999_us":21.0}]}"#;

    #[test]
    fn the_bandwidth_contract_parses() {
        let r = parse(BW).unwrap();
        assert_eq!(r.test, "write_bw");
        assert!(!r.events);
        assert_eq!((r.qps, r.tx_depth, r.post_list, r.cq_mod), (1, 128, 1, 100));
        assert!(r.lat.is_empty());
        let e = r.bw_for(65536, "x").unwrap();
        assert_eq!(e.iterations, 5000);
        assert_eq!(e.bw_peak_mib, 12345.6);
        assert_eq!(e.bw_avg_mib, 12000.1);
        assert_eq!(e.msg_rate_mpps, 0.19);
        assert!(matches!(
            r.bw_for(8, "x"),
            Err(Error::NoEntry {
                size: 8,
                kind: "bw",
                ..
            })
        ));
    }

    #[test]
    fn the_latency_contract_parses() {
        let r = parse(LAT).unwrap();
        assert!(r.events);
        assert_eq!(r.inline_size, 220);
        let e = r.lat_for(8, "x").unwrap();
        assert_eq!(e.t_typical_us, 4.5);
        assert_eq!(e.t_avg_us, 4.8);
        assert_eq!(e.p99_us, 7.25);
        assert_eq!(e.p999_us, 21.0);
        assert_eq!((e.t_min_us, e.t_max_us, e.t_stdev_us), (3.1, 40.2, 0.9));
    }

    #[test]
    fn a_report_missing_a_field_is_refused() {
        let broken = BW.replace(r#""bw_avg_mib":12000.1,"#, "");
        assert!(parse(&broken).is_err());
    }

    #[test]
    fn the_command_line_follows_the_contract() {
        let run = Run {
            test: "write_bw",
            size: 8,
            length: Length::Seconds(2),
            events: true,
            post_list: Some(32),
            tx_depth: Some(128),
            mtu: Some(4096),
        };
        let args = run.args(
            Path::new("/s/a.sock"),
            Path::new("/s/b.sock"),
            Path::new("/o/x.json"),
        );
        assert_eq!(
            args.join(" "),
            "write_bw -d /s/a.sock --loopback /s/b.sock -s 8 -D 2 -e -l 32 -t 128 -m 4096 --out_json_file /o/x.json"
        );
        assert_eq!(run.stem(), "write_bw-8-e-l32");
        let lat = Run {
            test: "send_lat",
            size: 4096,
            length: Length::Iterations(1000),
            events: false,
            post_list: None,
            tx_depth: None,
            mtu: None,
        };
        assert_eq!(
            lat.args(Path::new("a"), Path::new("b"), Path::new("j"))
                .join(" "),
            "send_lat -d a --loopback b -s 4096 -n 1000 --out_json_file j"
        );
    }
}
