//! The side-by-side tables, the ratios, the targets, and the charts' series, all built from
//! the recorded results.

use std::time::Duration;

use crate::plot::Chart;
use crate::report::{Results, Table, fmt, ratio, size_label};
use crate::sections::{
    BULK_CLASSES_OVER_NORMAL, CROWD_RATIO, Compared, Env, LOCAL, OPS, REG_RATIO, ROCE, TCP_BW,
    TCP_LAT, vrdma_series,
};
use crate::shim::{self, Tool};

/// Every vrdma series: write, read, send in polling and event mode.
fn vrdma_all() -> Vec<String> {
    OPS.iter()
        .flat_map(|op| [vrdma_series(op, false), vrdma_series(op, true)])
        .collect()
}

/// Short column header for a series: "write poll".
fn short(series: &str) -> String {
    series.trim_start_matches("vrdma ").to_owned()
}

/// One column of a size-by-size table.
#[derive(Debug, Clone)]
struct Col {
    section: String,
    series: String,
    metric: String,
    header: String,
}

fn col(section: &str, series: &str, metric: &str) -> Col {
    Col {
        section: section.into(),
        series: series.into(),
        metric: metric.into(),
        header: short(series),
    }
}

impl Col {
    fn named(mut self, header: &str) -> Col {
        self.header = header.into();
        self
    }
}

/// A table with sizes as rows, one column per series; rows for every size any column has.
fn matrix(r: &Results, title: &str, columns: &[Col]) -> Table {
    // Columns of sections that did not run would be all dashes.
    let columns: Vec<&Col> = columns
        .iter()
        .filter(|c| !r.points(&c.section, &c.series, &c.metric).is_empty())
        .collect();
    let headers: Vec<String> = std::iter::once("size".to_owned())
        .chain(columns.iter().map(|c| c.header.clone()))
        .collect();
    let mut t = Table {
        title: title.into(),
        headers,
        ..Table::default()
    };
    let mut sizes: Vec<u64> = columns
        .iter()
        .flat_map(|c| {
            r.points(&c.section, &c.series, &c.metric)
                .into_iter()
                .map(|p| p.0)
        })
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    for size in sizes {
        let mut row = vec![size_label(size)];
        row.extend(
            columns
                .iter()
                .map(|c| fmt(r.get(&c.section, &c.series, Some(size), &c.metric))),
        );
        t.row(row);
    }
    t
}

/// What a target asks of its measured value.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// At least this.
    AtLeast(f64),
    /// At most this.
    AtMost(f64),
    /// Within [lo, hi].
    Between(f64, f64),
}

impl Goal {
    fn met(self, v: f64) -> bool {
        match self {
            Goal::AtLeast(g) => v >= g,
            Goal::AtMost(g) => v <= g,
            Goal::Between(lo, hi) => (lo..=hi).contains(&v),
        }
    }

    fn text(self) -> String {
        match self {
            Goal::AtLeast(g) => format!(">= {g}"),
            Goal::AtMost(g) => format!("<= {g}"),
            Goal::Between(lo, hi) => format!("{lo} .. {hi}"),
        }
    }
}

/// A ratio record: series, size, metric, value.
type RatioRecord = (String, u64, &'static str, f64);

/// Adds the ratio records (vrdma/memcpy and vrdma/TCP for bandwidth, vrdma/TCP for latency),
/// on one host and across two.
fn add_ratios(r: &mut Results) {
    let mut new = Vec::new();
    for series in vrdma_all() {
        for (size, bw) in r.points("bandwidth", &series, "bw") {
            let memcpy = r.get("bandwidth", "memcpy", Some(size), "bw");
            if let Some(x) = ratio(Some(bw), memcpy) {
                new.push((format!("{} / memcpy", short(&series)), size, "bw_ratio", x));
            }
        }
        new.extend(tcp_ratios(r, LOCAL, &series));
    }
    new.extend(tcp_ratios(r, ROCE, &vrdma_series("write", false)));
    for (series, size, metric, x) in new {
        r.add("ratios", &series, Some(size), metric, x, "x");
    }
}

/// The ratio series of vrdma `series` over TCP, where `c` records them: "[NAME ]OP MODE / tcp".
fn tcp_ratio_series(c: Compared, series: &str) -> String {
    c.named(&format!("{} / tcp", short(series)))
}

/// vrdma `series` over qperf's TCP, both as `c` records them, size by size: bandwidth
/// (bw_ratio) and `t_typical` over tcp_lat (lat_ratio).
fn tcp_ratios(r: &Results, c: Compared, series: &str) -> Vec<RatioRecord> {
    let name = tcp_ratio_series(c, series);
    let mut out = Vec::new();
    for (size, bw) in r.points(c.bw, series, "bw") {
        if let Some(x) = ratio(Some(bw), r.get(c.bw, TCP_BW, Some(size), "bw")) {
            out.push((name.clone(), size, "bw_ratio", x));
        }
    }
    for (size, lat) in r.points(c.lat, series, "t_typical") {
        if let Some(x) = ratio(Some(lat), r.get(c.lat, TCP_LAT, Some(size), "latency")) {
            out.push((name.clone(), size, "lat_ratio", x));
        }
    }
    out
}

/// The roce section's tables: vrdma against TCP between two hosts, bandwidth and latency,
/// with their ratios (recorded by [`add_ratios`]).
fn roce_tables(r: &Results) -> Vec<Table> {
    let vr = vrdma_series("write", false);
    let ratios = tcp_ratio_series(ROCE, &vr);
    let mut bw = matrix(
        r,
        "Two hosts (namespaces over veth): bandwidth (MiB/s)",
        &[
            col(ROCE.bw, &vr, "bw").named("vrdma RDMA WRITE"),
            col(ROCE.bw, TCP_BW, "bw").named("qperf tcp_bw"),
            col("ratios", &ratios, "bw_ratio").named("vrdma / TCP"),
            col(ROCE.bw, &vr, "daemon_cpu").named("daemons CPU %"),
        ],
    );
    bw.note = "vrdma: vrdma-perf write_bw, polling, path MTU 4096, between a VM on each host's \
               daemon (RoCEv2 over UDP across the veth, MTU 9000); qperf tcp_bw from one \
               namespace to the other. Daemons CPU: both together, % of one core."
        .into();
    let mut lat = matrix(
        r,
        "Two hosts (namespaces over veth): latency (us, one way)",
        &[
            col(ROCE.lat, &vr, "t_typical").named("vrdma RDMA WRITE"),
            col(ROCE.lat, &vr, "p99").named("vrdma p99"),
            col(ROCE.lat, TCP_LAT, "latency").named("qperf tcp_lat"),
            col("ratios", &ratios, "lat_ratio").named("vrdma / TCP"),
        ],
    );
    lat.note = "vrdma: write_lat t_typical (median) and p99, polling; qperf tcp_lat: mean, \
                best of three."
        .into();
    [bw, lat]
        .into_iter()
        .filter(|t| !t.rows.is_empty())
        .collect()
}

/// The shim section's tables: each pair, the difference and its target.
fn shim_tables(r: &Results) -> Vec<Table> {
    let status = |met: bool| if met { "MET" } else { "NOT MET" }.to_owned();
    let mut bw = Table::new(
        "perftest through the libibverbs shim vs vrdma-perf: bandwidth (MiB/s)",
        &[
            "test",
            "size",
            "vrdma-perf",
            "perftest + shim",
            "shim / native",
            "rounds' range",
            "goal",
            "status",
        ],
    );
    for test in shim::BW_TESTS {
        for (size, native) in r.points(shim::BW, &shim::series(Tool::Native, test), "bw") {
            let shim = r.get(shim::BW, &shim::series(Tool::Shim, test), Some(size), "bw");
            let get = |m| r.get(shim::BW, &shim::compared(test), Some(size), m);
            let ratio = get("ratio");
            bw.row(vec![
                test.into(),
                size_label(size),
                fmt(Some(native)),
                fmt(shim),
                fmt(ratio),
                range(get("ratio_low"), get("ratio_high"), |x| format!("{x:.3}")),
                format!(">= {}", shim::BW_GOAL),
                ratio.map_or("-".into(), |x| status(x >= shim::BW_GOAL)),
            ]);
        }
    }
    bw.note = "Both tools as two processes (server on VM a, client on VM b, over TCP on \
               127.0.0.1), same options (-Q 100 -I 0), polling, run in alternating rounds. \
               Each tool's column is its median over the rounds; shim / native is the median \
               of the rounds' ratios, and the range their lowest and highest."
        .into();
    let mut lat = Table::new(
        "perftest through the libibverbs shim vs vrdma-perf: latency (us)",
        &[
            "test",
            "size",
            "vrdma-perf",
            "perftest + shim",
            "difference",
            "rounds' range",
            "vrdma-perf p99",
            "shim p99",
            "p99 difference",
            "goal",
            "status",
        ],
    );
    for test in shim::LAT_TESTS {
        let ser = |tool| shim::series(tool, test);
        for (size, native) in r.points(shim::LAT, &ser(Tool::Native), "t_typical") {
            let get = |series: &str, m| r.get(shim::LAT, series, Some(size), m);
            let diff = get(&shim::compared(test), "t_typical_diff");
            let state = diff.map_or("-".into(), |d| status(d <= shim::LAT_GOAL_US));
            lat.row(vec![
                test.into(),
                size_label(size),
                fmt(Some(native)),
                fmt(get(&ser(Tool::Shim), "t_typical")),
                diff.map_or("-".into(), |d| format!("{d:+.2}")),
                range(
                    get(&shim::compared(test), "t_typical_diff_low"),
                    get(&shim::compared(test), "t_typical_diff_high"),
                    |d| format!("{d:+.2}"),
                ),
                fmt(get(&ser(Tool::Native), "p99")),
                fmt(get(&ser(Tool::Shim), "p99")),
                get(&shim::compared(test), "p99_diff").map_or("-".into(), |d| format!("{d:+.2}")),
                format!("<= +{}", shim::LAT_GOAL_US),
                state,
            ]);
        }
    }
    lat.note = "t_typical (median) of perftest's one-way latency (read_lat: a whole READ); the \
                goal is on the median. Same options (-I 0 but for read_lat), polling, both \
                tools pacing their polls alike (vrdma::pacing). The difference is the median \
                of the rounds' differences, the range their lowest and highest."
        .into();
    if r.get(shim::LAT, shim::PLACEMENT, None, shim::ENDS_SHARE) == Some(1.0) {
        lat.note.push_str(
            " Server and client shared one CPU: each end waits for the other's turn on it (both \
             yield after 64 empty polls, then every 16th), and perftest's write_lat spins on \
             memory without yielding, so its tail holds time slices.",
        );
    }
    [bw, lat]
        .into_iter()
        .filter(|t| !t.rows.is_empty())
        .collect()
}

/// "low .. high" as `show` writes each, or "-" if either is missing.
fn range(low: Option<f64>, high: Option<f64>, show: impl Fn(f64) -> String) -> String {
    match (low, high) {
        (Some(low), Some(high)) => format!("{} .. {}", show(low), show(high)),
        _ => "-".into(),
    }
}

/// The worst shim pair: the smallest bandwidth ratio and the largest latency difference.
fn shim_worst(r: &Results) -> (Option<f64>, Option<f64>) {
    let mut bw: Option<f64> = None;
    for test in shim::BW_TESTS {
        for (_, x) in r.points(shim::BW, &shim::compared(test), "ratio") {
            bw = Some(bw.map_or(x, |b| b.min(x)));
        }
    }
    let mut lat: Option<f64> = None;
    for test in shim::LAT_TESTS {
        for (_, d) in r.points(shim::LAT, &shim::compared(test), "t_typical_diff") {
            lat = Some(lat.map_or(d, |l| l.max(d)));
        }
    }
    (bw, lat)
}

/// The targets of the performance issue, each measured by this run (or "-" if its section
/// did not run), recorded in section "targets".
fn targets(r: &mut Results) -> Table {
    let k64 = Some(65536);
    let get =
        |r: &Results, sec: &str, ser: &str, size: Option<u64>, m: &str| r.get(sec, ser, size, m);
    let rate = [
        "vrdma write poll, post list 32",
        "vrdma write event, post list 32",
    ]
    .iter()
    .filter_map(|s| get(r, "rate", s, Some(8), "msg_rate"))
    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let idle = r
        .records()
        .iter()
        .rev()
        .find(|x| {
            x.section == "idle"
                && x.metric == "daemon_cpu"
                && x.size
                    .is_some_and(|n| x.series == crate::sections::idle_series(n)[0])
        })
        .map(|x| x.value);
    let (shim_bw, shim_lat) = shim_worst(r);
    let rows: Vec<(&str, Option<f64>, &str, Goal)> = vec![
        (
            "64 KiB RDMA WRITE bw / memcpy",
            get(r, "ratios", "write poll / memcpy", k64, "bw_ratio"),
            "x",
            Goal::AtLeast(0.6),
        ),
        (
            "64 KiB RDMA WRITE bw / qperf tcp_bw",
            get(r, "ratios", "write poll / tcp", k64, "bw_ratio"),
            "x",
            Goal::AtLeast(3.0),
        ),
        (
            "8 B RDMA WRITE latency / qperf tcp_lat, polling",
            get(r, "ratios", "write poll / tcp", Some(8), "lat_ratio"),
            "x",
            Goal::AtMost(0.2),
        ),
        (
            "8 B RDMA WRITE latency / qperf tcp_lat, event mode",
            get(r, "ratios", "write event / tcp", Some(8), "lat_ratio"),
            "x",
            Goal::AtMost(0.5),
        ),
        (
            "8 B message rate, 32 WRs per post",
            rate,
            "Mmsg/s",
            Goal::AtLeast(2.0),
        ),
        (
            "perftest+shim bw / vrdma-perf, worst pair",
            shim_bw,
            "x",
            Goal::AtLeast(shim::BW_GOAL),
        ),
        (
            "perftest+shim latency - vrdma-perf, worst pair",
            shim_lat,
            "us",
            Goal::AtMost(shim::LAT_GOAL_US),
        ),
        (
            "ibv_reg_mr of 1 GiB (median)",
            get(r, "mr", "ibv_reg_mr", Some(1 << 30), "time"),
            "ms",
            Goal::AtMost(10.0),
        ),
        (
            "daemon CPU, idle VMs in event mode",
            idle,
            "% core",
            Goal::AtMost(1.0),
        ),
        (
            "throughput ratio at weights 3:1",
            get(r, "fairness", "weight 3 / weight 1", None, "ratio"),
            "x",
            Goal::Between(2.7, 3.3),
        ),
        (
            "8 B WRITE p99 next to 4 MiB bulk / alone, latency class next to bulk",
            get(
                r,
                "isolation",
                "p99 next to bulk / alone, latency class next to bulk",
                Some(8),
                "ratio",
            ),
            "x",
            Goal::AtMost(2.0),
        ),
        (
            "8 B WRITE p99 next to 15 bulk VMs / alone, latency class next to bulk",
            get(
                r,
                "isolation",
                &format!("{CROWD_RATIO}, latency class next to bulk"),
                Some(8),
                "ratio",
            ),
            "x",
            Goal::AtMost(2.0),
        ),
        (
            "8 B WRITE p99 next to 4 MiB bulk / alone, both normal class",
            get(r, "isolation", "p99 next to bulk / alone", Some(8), "ratio"),
            "x",
            Goal::AtMost(2.0),
        ),
        (
            "4 MiB bulk throughput next to the latency pair, classes / both normal",
            get(
                r,
                "isolation",
                BULK_CLASSES_OVER_NORMAL,
                Some(4 << 20),
                "ratio",
            ),
            "x",
            Goal::AtLeast(0.9),
        ),
        (
            "8 B WRITE p99 next to 4 GiB registrations / alone",
            get(r, "registering", REG_RATIO, Some(8), "ratio"),
            "x",
            Goal::AtMost(2.0),
        ),
        (
            "16 VMs x 16 QPs aggregate / single pair",
            get(r, "many", "aggregate / single pair", None, "ratio"),
            "x",
            Goal::AtLeast(0.9),
        ),
        (
            "16 VMs x 16 QPs min / max per-VM throughput",
            get(r, "many", "min / max per VM", None, "ratio"),
            "x",
            Goal::AtLeast(0.8),
        ),
        (
            "live migration, 64 QPs, 1 GiB: blackout a peer sees",
            get(r, "migrate", "blackout", Some(64), "time"),
            "ms",
            Goal::AtMost(50.0),
        ),
        (
            "live migration, 64 QPs: device state save + load",
            get(r, "migrate", "save", Some(64), "time")
                .zip(get(r, "migrate", "load", Some(64), "time"))
                .map(|(s, l)| s + l),
            "ms",
            Goal::AtMost(10.0),
        ),
    ];
    let mut t = Table::new("Targets", &["target", "measured", "unit", "goal", "status"]);
    for (name, v, unit, goal) in rows {
        let status = match v {
            None => "NOT RUN",
            Some(v) if goal.met(v) => "MET",
            Some(_) => "NOT MET",
        };
        if let Some(v) = v {
            r.add("targets", name, None, "measured", v, unit);
            r.add(
                "targets",
                name,
                None,
                "met",
                f64::from(u8::from(goal.met(v))),
                "bool",
            );
        }
        t.row(vec![
            name.into(),
            fmt(v),
            unit.into(),
            goal.text(),
            status.into(),
        ]);
    }
    t.note = "Latency ratios use vrdma-perf's t_typical (median of half round trips) over qperf's \
              tcp_lat (mean of half round trips); message rate is the better of polling and event mode."
        .into();
    t
}

/// Every table, in the order printed; adds the ratio and target records to `r`.
pub fn all(r: &mut Results, env: &Env) -> Vec<Table> {
    add_ratios(r);
    let mut out = Vec::new();
    let vr = vrdma_all();

    let mut cols: Vec<Col> = vr.iter().map(|s| col("bandwidth", s, "bw")).collect();
    cols.push(col("bandwidth", "memcpy", "bw"));
    cols.push(col("bandwidth", TCP_BW, "bw"));
    let mut t = matrix(r, "Bandwidth (MiB/s, 2^20 bytes per second)", &cols);
    t.note = "vrdma: vrdma-perf *_bw average; memcpy: one thread, cache-hot for small sizes; \
              qperf tcp_bw: TCP on loopback between two processes."
        .into();
    if !t.rows.is_empty() {
        out.push(t);
    }

    let ratio_cols: Vec<Col> = [
        "write poll / memcpy",
        "write poll / tcp",
        "write event / memcpy",
        "write event / tcp",
        "read poll / memcpy",
        "read poll / tcp",
        "send poll / memcpy",
        "send poll / tcp",
    ]
    .iter()
    .map(|s| col("ratios", s, "bw_ratio"))
    .collect();
    let t = matrix(
        r,
        "Bandwidth ratios (vrdma / memcpy, vrdma / TCP)",
        &ratio_cols,
    );
    if !t.rows.is_empty() {
        out.push(t);
    }

    let mut cols: Vec<Col> = vr.iter().map(|s| col("latency", s, "t_typical")).collect();
    cols.push(col("latency", TCP_LAT, "latency"));
    cols.push(col("ratios", "write poll / tcp", "lat_ratio"));
    cols.push(col("ratios", "write event / tcp", "lat_ratio"));
    // read_lat times a whole READ (request out, data back), as perftest does; halving it would
    // hide that a READ cannot be one way. The header says which is which.
    let mut t = matrix(
        r,
        "Latency (us): WRITE, SEND and TCP one way (half a round trip), READ a whole READ (a round trip)",
        &cols,
    );
    t.note = "vrdma: vrdma-perf *_lat t_typical (median): write_lat and send_lat of half round \
              trips, read_lat of whole READs; qperf tcp_lat: mean of half round trips."
        .into();
    if !t.rows.is_empty() {
        out.push(t);
    }

    let mut tail_cols = Vec::new();
    for (e, mode) in [(false, "poll"), (true, "event")] {
        let s = vrdma_series("write", e);
        tail_cols.push(col("latency", &s, "t_avg").named(&format!("{mode} avg")));
        tail_cols.push(col("latency", &s, "p99").named(&format!("{mode} p99")));
        tail_cols.push(col("latency", &s, "p999").named(&format!("{mode} p99.9")));
    }
    let t = matrix(r, "RDMA WRITE latency tails (us)", &tail_cols);
    if !t.rows.is_empty() {
        out.push(t);
    }

    let cpu_cols: Vec<Col> = vr
        .iter()
        .map(|s| col("bandwidth", s, "daemon_cpu"))
        .collect();
    let t = matrix(
        r,
        "Daemon CPU during vrdma-perf bandwidth runs (% of one core)",
        &cpu_cols,
    );
    if !t.rows.is_empty() {
        out.push(t);
    }

    let mut t = Table::new("8-byte message rate", &["series", "Mmsg/s", "daemon CPU %"]);
    for s in r.series("rate", "msg_rate") {
        t.row(vec![
            s.clone(),
            fmt(r.get("rate", &s, Some(8), "msg_rate")),
            fmt(r.get("rate", &s, Some(8), "daemon_cpu")),
        ]);
    }
    if !t.rows.is_empty() {
        out.push(t);
    }

    out.extend(roce_tables(r));
    out.extend(shim_tables(r));

    let mr_cols = [
        col("mr", "ibv_reg_mr", "time").named("register (median)"),
        col("mr", "ibv_reg_mr, first", "time").named("register (first)"),
        col("mr", "ibv_dereg_mr", "time").named("deregister (median)"),
    ];
    let t = matrix(r, "Memory registration (ms)", &mr_cols);
    if !t.rows.is_empty() {
        out.push(t);
    }

    let t = idle_table(r);
    if !t.rows.is_empty() {
        out.push(t);
    }

    let t = wakeup_table(r);
    if !t.rows.is_empty() {
        out.push(t);
    }

    let mut t = Table::new(
        "Fairness: two VMs saturating at weights 3:1",
        &["", "value"],
    );
    for (s, m, unit) in [
        ("VM weight 3", "bw", " MiB/s"),
        ("VM weight 1", "bw", " MiB/s"),
        ("weight 3 / weight 1", "ratio", ""),
    ] {
        if let Some(v) = r.get("fairness", s, None, m) {
            t.row(vec![s.into(), format!("{}{unit}", fmt(Some(v)))]);
        }
    }
    if !t.rows.is_empty() {
        out.push(t);
    }

    let mut t = Table::new(
        "Isolation: 8 B RDMA WRITE latency (us) next to 4 MiB bulk writes",
        &["", "typical", "p99", "p99.9"],
    );
    let mut moved = Vec::new();
    for s in r.series("isolation", "p99") {
        t.row(vec![
            s.clone(),
            fmt(r.get("isolation", &s, Some(8), "t_typical")),
            fmt(r.get("isolation", &s, Some(8), "p99")),
            fmt(r.get("isolation", &s, Some(8), "p999")),
        ]);
        if let Some(v) = r.get("isolation", &s, Some(4 << 20), "bulk_bw") {
            moved.push(format!("{} MiB/s ({s})", fmt(Some(v))));
        }
    }
    if !moved.is_empty() {
        t.note = format!(
            "The bulk VM moved {} meanwhile. With a deep queue it sleeps through the run; \
             polling a short one, its thread wakes every 100 us on the latency VMs' core.",
            moved.join(", ")
        );
    }
    if !t.rows.is_empty() {
        out.push(t);
    }

    let mut t = Table::new(
        "Isolation: 8 B RDMA WRITE latency (us) next to a VM registering 4 GiB",
        &["", "typical", "p99", "p99.9"],
    );
    for s in r.series("registering", "p99") {
        t.row(vec![
            s.clone(),
            fmt(r.get("registering", &s, Some(8), "t_typical")),
            fmt(r.get("registering", &s, Some(8), "p99")),
            fmt(r.get("registering", &s, Some(8), "p999")),
        ]);
    }
    let size = Some(1 << 32);
    let mut neighbours = Vec::new();
    for (command, what) in [
        ("REG_MR of 4 GiB", "registered and deregistered"),
        ("REG_MR of 4 GiB, refused", "had refused"),
    ] {
        if let (Some(ms), Some(rate)) = (
            r.get("registering", command, size, "time"),
            r.get("registering", command, size, "per_s"),
        ) {
            neighbours.push(format!(
                "{what} {} per second ({} ms each, median)",
                fmt(Some(rate)),
                fmt(Some(ms))
            ));
        }
    }
    if !neighbours.is_empty() {
        t.note = format!(
            "The neighbour, with a SEND of its own retried every 10 us, {} REG_MRs of 4 GiB in \
             2^18 pages of 16 KiB; a refused one names a PD that does not exist: the daemon \
             decodes its page list and refuses it as soon as it holds the VM's objects.",
            neighbours.join(", and ")
        );
    }
    if !t.rows.is_empty() {
        out.push(t);
    }

    let mut t = Table::new(
        "Live migration with 1 GiB registered: what a peer and the VMM see",
        &[
            "QPs",
            "blackout (ms)",
            "VMM downtime (ms)",
            "state (bytes)",
            "save (ms)",
            "load (ms)",
        ],
    );
    for qps in [1u64, 64, 1024] {
        let v = |series, metric| fmt(r.get("migrate", series, Some(qps), metric));
        if r.get("migrate", "blackout", Some(qps), "time").is_some() {
            t.row(vec![
                qps.to_string(),
                v("blackout", "time"),
                v("downtime", "time"),
                v("state", "size"),
                v("save", "time"),
                v("load", "time"),
            ]);
        }
    }
    t.note = "A peer on the daemon the VM leaves keeps one 8-byte WRITE at a time outstanding \
              to it; the blackout is the longest gap between two of its completions. VMM \
              downtime: from the first GET_VRING_BASE to the destination's last \
              SET_VRING_ENABLE."
        .into();
    if !t.rows.is_empty() {
        out.push(t);
    }

    let mut t = Table::new(
        "16 VMs x 16 QPs, 64 KiB writes (MiB/s)",
        &["VM", "throughput"],
    );
    for s in r.series("many", "bw") {
        t.row(vec![s.clone(), fmt(r.get("many", &s, None, "bw"))]);
    }
    for s in ["aggregate / single pair", "min / max per VM"] {
        if let Some(v) = r.get("many", s, None, "ratio") {
            t.row(vec![s.into(), fmt(Some(v))]);
        }
    }
    if !t.rows.is_empty() {
        out.push(t);
    }

    for (section, title, x) in [
        ("scale_vms", "Scale: VMs connected (one pair active)", "VMs"),
        (
            "scale_qps",
            "Scale: QPs per VM (8 B writes round-robin, 128 in flight)",
            "QPs/VM",
        ),
        ("scale_depth", "Scale: outstanding WRs on one QP", "WRs"),
    ] {
        let series = "8 B RDMA WRITE";
        let mut t = Table::new(
            title,
            &[
                x,
                "Mmsg/s",
                "daemon ns/msg",
                "daemon RSS MiB",
                "daemon anon MiB",
                "set-up s",
            ],
        );
        for (n, rate) in r.points(section, series, "msg_rate") {
            let g = |m| fmt(r.get(section, series, Some(n), m));
            t.row(vec![
                n.to_string(),
                fmt(Some(rate)),
                g("daemon_ns_per_msg"),
                g("daemon_rss"),
                g("daemon_anon"),
                g("setup"),
            ]);
        }
        if !t.rows.is_empty() {
            out.push(t);
        }
    }

    out.push(targets(r));
    let _ = env;
    out
}

/// Section `wakeup`: one message in event mode against one thread wake-up and against TCP.
fn wakeup_table(r: &Results) -> Table {
    use crate::wakeup::{APART, BACK_TO_BACK, FLOOR, POLLING, SECTION};
    let mut t = Table::new(
        "Event mode against one thread wake-up (8 B, us one way)",
        &["series", "median", "p99", "/ wake-up", "/ qperf tcp_lat"],
    );
    let floor = r.get(SECTION, FLOOR, Some(8), "latency");
    let tcp = r.get("latency", TCP_LAT, Some(8), "latency");
    if let Some(f) = floor {
        t.row(vec![
            FLOOR.into(),
            fmt(Some(f)),
            "".into(),
            fmt(Some(1.0)),
            fmt(ratio(Some(f), tcp)),
        ]);
    }
    let perf = vrdma_series("write", true);
    let rows = [
        (
            format!("{perf} (vrdma-perf write_lat -e)"),
            r.get("latency", &perf, Some(8), "t_typical"),
            r.get("latency", &perf, Some(8), "p99"),
        ),
        (
            POLLING.to_owned(),
            r.get(SECTION, POLLING, Some(8), "t_typical"),
            r.get(SECTION, POLLING, Some(8), "p99"),
        ),
        (
            BACK_TO_BACK.to_owned(),
            r.get(SECTION, BACK_TO_BACK, Some(8), "t_typical"),
            r.get(SECTION, BACK_TO_BACK, Some(8), "p99"),
        ),
        (
            APART.to_owned(),
            r.get(SECTION, APART, Some(8), "t_typical"),
            r.get(SECTION, APART, Some(8), "p99"),
        ),
    ];
    for (name, median, p99) in rows {
        if median.is_some() {
            t.row(vec![
                name,
                fmt(median),
                fmt(p99),
                fmt(ratio(median, floor)),
                fmt(ratio(median, tcp)),
            ]);
        }
    }
    t.note = "The wake-up: a byte back and forth through pipes with cat on the daemon's CPUs, \
              best of three. Polling, the same ping-pong with no one sleeping. Back to back the \
              daemon's scheduler polls and a message costs what it costs polling plus the \
              receiving guest's wake-up; 1 ms apart the scheduler sleeps too, and a message wakes \
              it and then the guest (docs/performance.md)."
        .into();
    t
}

/// Section `idle`: the daemon's CPU with idle VMs, while one pair ping-pongs, and after.
fn idle_table(r: &Results) -> Table {
    let mut t = Table::new(
        "Daemon with idle VMs (event mode), and around a ping-pong",
        &["VMs", "", "CPU % of a core", "writes/s", "RSS MiB"],
    );
    for s in r.series("idle", "daemon_cpu") {
        for (n, cpu) in r.points("idle", &s, "daemon_cpu") {
            let [idle, pingpong, after] = crate::sections::idle_series(n);
            let what = if s == idle {
                "idle"
            } else if s == pingpong {
                "one pair in an 8 B ping-pong"
            } else if s == after {
                "idle again after the ping-pong"
            } else {
                &s
            };
            t.row(vec![
                n.to_string(),
                what.into(),
                fmt(Some(cpu)),
                fmt(r.get("idle", &s, Some(n), "msg_rate").map(|m| m * 1e6)),
                fmt(r.get("idle", &s, Some(n), "daemon_rss")),
            ]);
        }
    }
    t
}

/// The charts: all bandwidth series on one, all latency series on the other.
pub fn charts() -> Vec<Chart<'static>> {
    let mut bw: Vec<(String, String, String)> = vrdma_all()
        .into_iter()
        .map(|s| ("bandwidth".into(), s, "bw".into()))
        .collect();
    bw.push(("bandwidth".into(), "memcpy".into(), "bw".into()));
    bw.push(("bandwidth".into(), TCP_BW.into(), "bw".into()));
    let mut lat: Vec<(String, String, String)> = vrdma_all()
        .into_iter()
        .map(|s| ("latency".into(), s, "t_typical".into()))
        .collect();
    lat.push(("latency".into(), TCP_LAT.into(), "latency".into()));
    vec![
        Chart {
            name: "bandwidth",
            title: "Bandwidth vs message size: vrdma, memcpy, TCP (qperf)",
            ylabel: "MiB/s",
            lines: bw,
        },
        Chart {
            name: "latency",
            title: "Latency vs message size: vrdma (median; READ a whole READ, the rest one way), TCP (qperf, mean, one way)",
            ylabel: "microseconds",
            lines: lat,
        },
    ]
}

/// summary.md: how the run went, then every table in Markdown.
pub fn summary_markdown(
    tables: &[Table],
    env: &Env,
    elapsed: Duration,
    ran: &[&str],
    interrupted: bool,
) -> String {
    let mut s = String::from("# vrdma-bench results\n\n");
    s.push_str(&format!(
        "Mode: {}. Sections: {}. Took {:.0} s{}. Machine: {}.\n\n",
        if env.quick {
            "--quick (smoke test; not numbers to quote)"
        } else {
            "full"
        },
        ran.join(", "),
        elapsed.as_secs_f64(),
        if interrupted {
            " (interrupted: partial)"
        } else {
            ""
        },
        machine()
    ));
    for t in tables {
        s.push_str(&t.markdown());
        s.push('\n');
    }
    if !env.failures.is_empty() {
        s.push_str("### Failures\n\n");
        for f in &env.failures {
            s.push_str(&format!("- {}\n", f.replace('|', "\\|")));
        }
        s.push('\n');
    }
    s.push_str("![bandwidth](bandwidth.png)\n\n![latency](latency.png)\n");
    s
}

/// CPU model, logical CPUs and kernel, for the record.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    // The machine's CPUs, not this process's: the bench pins itself before it writes this.
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cpus} logical CPUs, Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_targets_come_from_the_measurements() {
        let mut r = Results::default();
        r.add(
            "bandwidth",
            "vrdma write poll",
            Some(65536),
            "bw",
            7000.0,
            "MiB/s",
        );
        r.add("bandwidth", "memcpy", Some(65536), "bw", 10000.0, "MiB/s");
        r.add("bandwidth", TCP_BW, Some(65536), "bw", 3000.0, "MiB/s");
        r.add(
            "latency",
            "vrdma write poll",
            Some(8),
            "t_typical",
            5.0,
            "us",
        );
        r.add("latency", TCP_LAT, Some(8), "latency", 20.0, "us");
        r.add("fairness", "weight 3 / weight 1", None, "ratio", 2.95, "x");
        add_ratios(&mut r);
        assert_eq!(
            r.get("ratios", "write poll / memcpy", Some(65536), "bw_ratio"),
            Some(0.7)
        );
        assert_eq!(
            r.get("ratios", "write poll / tcp", Some(65536), "bw_ratio"),
            Some(7000.0 / 3000.0)
        );
        assert_eq!(
            r.get("ratios", "write poll / tcp", Some(8), "lat_ratio"),
            Some(0.25)
        );
        let t = targets(&mut r);
        let status = |name: &str| {
            t.rows
                .iter()
                .find(|row| row[0] == name)
                .map(|row| row[4].clone())
                .unwrap()
        };
        assert_eq!(status("64 KiB RDMA WRITE bw / memcpy"), "MET");
        assert_eq!(status("64 KiB RDMA WRITE bw / qperf tcp_bw"), "NOT MET");
        assert_eq!(
            status("8 B RDMA WRITE latency / qperf tcp_lat, polling"),
            "NOT MET"
        );
        assert_eq!(status("throughput ratio at weights 3:1"), "MET");
        assert_eq!(status("ibv_reg_mr of 1 GiB (median)"), "NOT RUN");
        assert_eq!(
            r.get("targets", "throughput ratio at weights 3:1", None, "met"),
            Some(1.0)
        );
    }

    #[test]
    fn the_two_host_tables_compare_vrdma_with_tcp_over_veth() {
        let mut r = Results::default();
        let vr = vrdma_series("write", false);
        for (size, v, t) in [(64u64, 40.0, 80.0), (65536, 600.0, 1200.0)] {
            r.add(ROCE.bw, &vr, Some(size), "bw", v, "MiB/s");
            r.add(ROCE.bw, TCP_BW, Some(size), "bw", t, "MiB/s");
        }
        r.add(ROCE.bw, &vr, Some(65536), "daemon_cpu", 95.0, "%");
        r.add(ROCE.lat, &vr, Some(8), "t_typical", 30.0, "us");
        r.add(ROCE.lat, &vr, Some(8), "p99", 60.0, "us");
        r.add(ROCE.lat, &vr, Some(8), "daemon_cpu", 50.0, "%");
        r.add(ROCE.lat, TCP_LAT, Some(8), "latency", 20.0, "us");
        // The one-host series must neither feed nor take these ratios.
        r.add("bandwidth", TCP_BW, Some(64), "bw", 1.0, "MiB/s");
        r.add("bandwidth", &vr, Some(64), "bw", 5.0, "MiB/s");
        add_ratios(&mut r);
        let name = "roce write poll / tcp";
        assert_eq!(r.get("ratios", name, Some(64), "bw_ratio"), Some(0.5));
        assert_eq!(r.get("ratios", name, Some(8), "lat_ratio"), Some(1.5));
        assert_eq!(
            r.get("ratios", "write poll / tcp", Some(64), "bw_ratio"),
            Some(5.0)
        );
        let tables = roce_tables(&r);
        assert_eq!(tables.len(), 2);
        let (bw, lat) = (&tables[0], &tables[1]);
        assert_eq!(
            bw.headers,
            [
                "size",
                "vrdma RDMA WRITE",
                "qperf tcp_bw",
                "vrdma / TCP",
                "daemons CPU %"
            ]
        );
        // The latency run's CPU stays out of the bandwidth table: no 8-byte row there.
        assert_eq!(
            bw.rows,
            [
                ["64", "40.0", "80.0", "0.500", "-"],
                ["64K", "600", "1200", "0.500", "95.0"],
            ]
        );
        assert_eq!(lat.rows, [["8", "30.0", "60.0", "20.0", "1.50"]]);
        assert!(roce_tables(&Results::default()).is_empty());
    }

    #[test]
    fn the_idle_target_is_the_idle_vms_not_the_ping_pong() {
        let mut r = Results::default();
        let [idle, pingpong, after] = crate::sections::idle_series(16);
        r.add("idle", &idle, Some(16), "daemon_cpu", 0.5, "%");
        r.add("idle", &idle, Some(16), "daemon_rss", 5.4, "MiB");
        r.add("idle", &pingpong, Some(16), "daemon_cpu", 97.0, "%");
        r.add("idle", &pingpong, Some(16), "msg_rate", 0.1, "Mmsg/s");
        r.add("idle", &after, Some(16), "daemon_cpu", 0.0, "%");
        let t = targets(&mut r);
        let row = t
            .rows
            .iter()
            .find(|row| row[0] == "daemon CPU, idle VMs in event mode")
            .unwrap();
        assert_eq!((row[1].as_str(), row[4].as_str()), ("0.500", "MET"));
        assert_eq!(
            idle_table(&r).rows,
            [
                ["16", "idle", "0.500", "-", "5.40"],
                ["16", "one pair in an 8 B ping-pong", "97.0", "100000", "-"],
                ["16", "idle again after the ping-pong", "0", "-", "-"],
            ]
        );
    }

    #[test]
    fn shim_pairs_are_compared_with_their_targets() {
        let mut r = Results::default();
        let add_bw = |r: &mut Results, test: &str, size: u64, native: f64, shim: f64| {
            r.add(
                shim::BW,
                &shim::series(Tool::Native, test),
                Some(size),
                "bw",
                native,
                "MiB/s",
            );
            r.add(
                shim::BW,
                &shim::series(Tool::Shim, test),
                Some(size),
                "bw",
                shim,
                "MiB/s",
            );
            r.add(
                shim::BW,
                &shim::compared(test),
                Some(size),
                "ratio",
                shim / native,
                "x",
            );
        };
        add_bw(&mut r, "write_bw", 64, 100.0, 96.0);
        add_bw(&mut r, "send_bw", 65536, 1000.0, 900.0);
        for (metric, x) in [("ratio_low", 0.9), ("ratio_high", 1.02)] {
            r.add(
                shim::BW,
                &shim::compared("write_bw"),
                Some(64),
                metric,
                x,
                "x",
            );
        }
        let add_lat = |r: &mut Results, test: &str, native: f64, shim: f64| {
            r.add(
                shim::LAT,
                &shim::series(Tool::Native, test),
                Some(8),
                "t_typical",
                native,
                "us",
            );
            r.add(
                shim::LAT,
                &shim::series(Tool::Shim, test),
                Some(8),
                "t_typical",
                shim,
                "us",
            );
            let cmp = shim::compared(test);
            r.add(
                shim::LAT,
                &cmp,
                Some(8),
                "t_typical_diff",
                shim - native,
                "us",
            );
        };
        add_lat(&mut r, "read_lat", 3.0, 3.15);
        add_lat(&mut r, "write_lat", 4.0, 4.8);
        r.add(
            shim::LAT,
            shim::PLACEMENT,
            None,
            shim::ENDS_SHARE,
            1.0,
            "bool",
        );
        let tables = shim_tables(&r);
        assert_eq!(tables.len(), 2);
        let status: Vec<(&str, &str)> = tables[0]
            .rows
            .iter()
            .map(|row| (row[5].as_str(), row[7].as_str()))
            .collect();
        assert_eq!(
            status,
            [("0.900 .. 1.020", "MET"), ("-", "NOT MET")],
            "0.96 meets >= 0.95, 0.9 does not; the rounds' range where it was recorded"
        );
        let lat: Vec<(&str, &str, &str)> = tables[1]
            .rows
            .iter()
            .map(|row| (row[0].as_str(), row[4].as_str(), row[10].as_str()))
            .collect();
        assert_eq!(
            lat,
            [
                ("write_lat", "+0.80", "NOT MET"),
                ("read_lat", "+0.15", "MET")
            ]
        );
        assert!(tables[1].note.contains("shared one CPU"));
        // The worst pairs: send_bw's 0.9, write_lat's 0.8 us.
        let t = targets(&mut r);
        let row = |name: &str| t.rows.iter().find(|row| row[0] == name).unwrap().clone();
        let bw = row("perftest+shim bw / vrdma-perf, worst pair");
        assert_eq!((bw[1].as_str(), bw[4].as_str()), ("0.900", "NOT MET"));
        let lat = row("perftest+shim latency - vrdma-perf, worst pair");
        assert_eq!((lat[1].as_str(), lat[4].as_str()), ("0.800", "NOT MET"));
    }

    #[test]
    fn goals_compare_as_stated() {
        assert!(Goal::AtLeast(0.6).met(0.6));
        assert!(!Goal::AtLeast(0.6).met(0.59));
        assert!(Goal::AtMost(10.0).met(9.9));
        assert!(Goal::Between(2.7, 3.3).met(3.3));
        assert!(!Goal::Between(2.7, 3.3).met(2.69));
        assert_eq!(Goal::Between(2.7, 3.3).text(), "2.7 .. 3.3");
    }
}
