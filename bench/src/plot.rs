//! bandwidth.png and latency.png with gnuplot: every series on one chart, message size on a
//! log2 axis.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::procs::{self, Guard};
use crate::report::{self, Results};

/// Why a plot was not drawn.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// gnuplot is not installed.
    #[error(
        "gnuplot is not installed: run bench/run (it installs gnuplot-nox) or apt-get install gnuplot-nox"
    )]
    NotInstalled,
    /// Nothing to plot.
    #[error("no {0} results to plot")]
    Empty(&'static str),
    /// Writing the data or script failed.
    #[error(transparent)]
    Write(#[from] report::Error),
    /// gnuplot failed.
    #[error(transparent)]
    Process(#[from] procs::Error),
}

/// One chart.
#[derive(Debug)]
pub struct Chart<'a> {
    /// File stem: NAME.png, NAME.dat, NAME.gp.
    pub name: &'a str,
    /// Title on top.
    pub title: &'a str,
    /// Y axis label.
    pub ylabel: &'a str,
    /// (section, series, metric) of each line.
    pub lines: Vec<(String, String, String)>,
}

/// The gnuplot data file: one block per series ("size value" lines), blocks separated by two
/// blank lines so `index N` selects one. Returns the data and the titles of non-empty series.
pub fn data(results: &Results, chart: &Chart<'_>) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut titles = Vec::new();
    for (section, series, metric) in &chart.lines {
        let points = results.points(section, series, metric);
        if points.is_empty() {
            continue;
        }
        let _ = writeln!(text, "# {series}");
        for (size, value) in points {
            let _ = writeln!(text, "{size} {value}");
        }
        text.push_str("\n\n");
        titles.push(series.clone());
    }
    (text, titles)
}

/// The gnuplot script for `titles` read from `dat`, drawn into `png`.
pub fn script(chart: &Chart<'_>, dat: &str, png: &str, titles: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "set terminal pngcairo size 1400,900 noenhanced font 'sans,11'"
    );
    let _ = writeln!(s, "set output '{png}'");
    let _ = writeln!(s, "set title '{}'", chart.title);
    let _ = writeln!(s, "set xlabel 'message size (bytes)'");
    let _ = writeln!(s, "set ylabel '{}'", chart.ylabel);
    // Base 2 on x so that %L (the exponent in the axis' log base) labels 2^3 .. 2^22.
    let _ = writeln!(s, "set logscale x 2");
    let _ = writeln!(s, "set logscale y 10");
    let _ = writeln!(s, "set format x '2^%L'");
    let _ = writeln!(s, "set grid");
    let _ = writeln!(s, "set key outside right top");
    let plots: Vec<String> = titles
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "'{dat}' index {i} using 1:2 with linespoints title '{}'",
                t.replace('\'', "")
            )
        })
        .collect();
    let _ = writeln!(s, "plot {}", plots.join(", \\\n     "));
    s
}

/// Writes NAME.dat and NAME.gp into `dir` and runs gnuplot to draw NAME.png.
pub fn draw(results: &Results, chart: &Chart<'_>, dir: &Path) -> Result<(), Error> {
    if crate::qperf::which("gnuplot").is_none() {
        return Err(Error::NotInstalled);
    }
    let (data, titles) = data(results, chart);
    if titles.is_empty() {
        return Err(Error::Empty(if chart.name == "latency" {
            "latency"
        } else {
            "bandwidth"
        }));
    }
    let dat = format!("{}.dat", chart.name);
    let gp = format!("{}.gp", chart.name);
    let png = format!("{}.png", chart.name);
    report::write_file(&dir.join(&dat), &data)?;
    report::write_file(&dir.join(&gp), &script(chart, &dat, &png, &titles))?;
    let mut cmd = Command::new("gnuplot");
    cmd.arg(&gp).current_dir(dir);
    let log = dir.join("logs").join(format!("gnuplot-{}.log", chart.name));
    Guard::spawn(cmd, "gnuplot", &log)?.wait_through_signals(Duration::from_secs(60))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> Chart<'static> {
        Chart {
            name: "bandwidth",
            title: "Bandwidth",
            ylabel: "MiB/s",
            lines: vec![
                ("bandwidth".into(), "memcpy".into(), "bw".into()),
                ("bandwidth".into(), "vrdma write poll".into(), "bw".into()),
                ("bandwidth".into(), "qperf tcp_bw".into(), "bw".into()),
            ],
        }
    }

    #[test]
    fn data_has_one_block_per_measured_series() {
        let mut r = Results::default();
        r.add("bandwidth", "memcpy", Some(65536), "bw", 20000.0, "MiB/s");
        r.add("bandwidth", "memcpy", Some(8), "bw", 900.0, "MiB/s");
        r.add("bandwidth", "qperf tcp_bw", Some(8), "bw", 12.5, "MiB/s");
        let (text, titles) = data(&r, &chart());
        assert_eq!(titles, vec!["memcpy", "qperf tcp_bw"]);
        assert_eq!(
            text,
            "# memcpy\n8 900\n65536 20000\n\n\n# qperf tcp_bw\n8 12.5\n\n\n"
        );
    }

    #[test]
    fn script_plots_every_series_on_one_log_chart() {
        let titles = vec!["memcpy".to_owned(), "qperf tcp_bw".to_owned()];
        let s = script(&chart(), "bandwidth.dat", "bandwidth.png", &titles);
        assert!(s.contains("set terminal pngcairo"));
        assert!(s.contains("set output 'bandwidth.png'"));
        assert!(s.contains("set logscale x 2"));
        assert!(s.contains("'bandwidth.dat' index 0 using 1:2 with linespoints title 'memcpy'"));
        assert!(
            s.contains("'bandwidth.dat' index 1 using 1:2 with linespoints title 'qperf tcp_bw'")
        );
    }
}
