//! Results in long format, the CSV they are written to, and the tables printed side by side
//! (as text on the terminal and as Markdown in summary.md).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

/// Why the results could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing a file failed.
    #[error("cannot write {path}: {source}; check that the output directory is writable")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One measured value: a row of results.csv.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The bench section (bandwidth, latency, mr, fairness...).
    pub section: String,
    /// The series within it ("vrdma write poll", "memcpy", "qperf tcp_bw"...).
    pub series: String,
    /// The message size or the scaled quantity (VMs, QPs, WRs); `None` when there is none.
    pub size: Option<u64>,
    /// What was measured (bw, t_typical, p99...).
    pub metric: String,
    /// The value.
    pub value: f64,
    /// Its unit (MiB/s, us, ms, %...).
    pub unit: String,
}

/// Every record of a run, in the order measured.
#[derive(Debug, Default)]
pub struct Results {
    records: Vec<Record>,
}

impl Results {
    /// Adds a value.
    pub fn add(
        &mut self,
        section: &str,
        series: &str,
        size: Option<u64>,
        metric: &str,
        value: f64,
        unit: &str,
    ) {
        self.records.push(Record {
            section: section.into(),
            series: series.into(),
            size,
            metric: metric.into(),
            value,
            unit: unit.into(),
        });
    }

    /// All records.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The last value recorded for this key.
    pub fn get(&self, section: &str, series: &str, size: Option<u64>, metric: &str) -> Option<f64> {
        self.records
            .iter()
            .rev()
            .find(|r| {
                r.section == section && r.series == series && r.size == size && r.metric == metric
            })
            .map(|r| r.value)
    }

    /// The series of a section that have `metric`, in first-seen order.
    pub fn series(&self, section: &str, metric: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.records {
            if r.section == section && r.metric == metric && !out.contains(&r.series) {
                out.push(r.series.clone());
            }
        }
        out
    }

    /// The (size, value) points of one series, ascending by size.
    pub fn points(&self, section: &str, series: &str, metric: &str) -> Vec<(u64, f64)> {
        let mut out: Vec<(u64, f64)> = self
            .records
            .iter()
            .filter(|r| r.section == section && r.series == series && r.metric == metric)
            .filter_map(|r| r.size.map(|s| (s, r.value)))
            .collect();
        out.sort_by_key(|p| p.0);
        out.dedup_by_key(|p| p.0);
        out
    }

    /// Writes results.csv: section,series,size_bytes,metric,value,unit.
    pub fn write_csv(&self, path: &Path) -> Result<(), Error> {
        let mut text = String::from("section,series,size_bytes,metric,value,unit\n");
        for r in &self.records {
            let size = r.size.map(|s| s.to_string()).unwrap_or_default();
            let _ = writeln!(
                text,
                "{},{},{},{},{},{}",
                csv_field(&r.section),
                csv_field(&r.series),
                size,
                csv_field(&r.metric),
                r.value,
                csv_field(&r.unit)
            );
        }
        write_file(path, &text)
    }
}

/// A CSV field, quoted when it holds a comma, quote or line break (RFC 4180).
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Writes `text` to `path`.
pub fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| Error::Write {
            path: path.display().to_string(),
            source,
        })
}

/// A table: a title, column headers, and rows of cells.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Printed above it.
    pub title: String,
    /// Column headers.
    pub headers: Vec<String>,
    /// Rows of cells, as many as headers.
    pub rows: Vec<Vec<String>>,
    /// Printed below it (definitions, what a blank cell means).
    pub note: String,
}

impl Table {
    /// An empty table.
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Table {
        Table {
            title: title.into(),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
            note: String::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Fixed-width text, first column left-aligned, the others right-aligned.
    pub fn text(&self) -> String {
        let ncol = self.headers.len();
        let mut width: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, c) in row.iter().enumerate().take(ncol) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                if i == 0 {
                    let _ = write!(s, "{c:<w$}");
                } else {
                    let _ = write!(s, "  {c:>w$}");
                }
            }
            s.trim_end().to_owned()
        };
        let mut out = format!("== {} ==\n", self.title);
        out.push_str(&line(&self.headers));
        out.push('\n');
        let total: usize = width.iter().sum::<usize>() + 2 * width.len().saturating_sub(1);
        out.push_str(&"-".repeat(total));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        if !self.note.is_empty() {
            out.push_str(&self.note);
            out.push('\n');
        }
        out
    }

    /// A Markdown table with the title as a heading.
    pub fn markdown(&self) -> String {
        let esc = |s: &str| s.replace('|', "\\|");
        let mut out = format!("### {}\n\n", self.title);
        out.push_str(&format!(
            "| {} |\n",
            self.headers
                .iter()
                .map(|h| esc(h))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
        out.push_str(&format!(
            "|{}\n",
            self.headers
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        ));
        for row in &self.rows {
            out.push_str(&format!(
                "| {} |\n",
                row.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")
            ));
        }
        if !self.note.is_empty() {
            out.push('\n');
            out.push_str(&self.note);
            out.push('\n');
        }
        out
    }
}

/// A value with three significant digits, or "-" when it was not measured.
pub fn fmt(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if !v.is_finite() => "-".into(),
        Some(v) => {
            let a = v.abs();
            if a >= 100.0 {
                format!("{v:.0}")
            } else if a >= 10.0 {
                format!("{v:.1}")
            } else if a >= 1.0 {
                format!("{v:.2}")
            } else if a >= 0.01 {
                format!("{v:.3}")
            } else if a == 0.0 {
                "0".into()
            } else {
                // Three significant digits however small: 0.00972, not 9.72e-3.
                let decimals = (2.0 - a.log10().floor()) as usize;
                format!("{v:.decimals$}")
            }
        }
    }
}

/// A byte count as perftest prints sizes: 8, 4K, 64K, 1M, 1G.
pub fn size_label(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (unit, suffix) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// `a / b` when both exist and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_is_long_format_with_quoting() {
        let mut r = Results::default();
        r.add(
            "bandwidth",
            "vrdma write poll",
            Some(65536),
            "bw",
            12000.5,
            "MiB/s",
        );
        r.add("fairness", "vm1, weight 3", None, "ratio", 2.98, "x");
        let dir = std::env::temp_dir().join(format!("vrdma-bench-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("results.csv");
        r.write_csv(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            text,
            "section,series,size_bytes,metric,value,unit\n\
             bandwidth,vrdma write poll,65536,bw,12000.5,MiB/s\n\
             fairness,\"vm1, weight 3\",,ratio,2.98,x\n"
        );
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn lookups_find_series_sizes_and_points() {
        let mut r = Results::default();
        r.add("bandwidth", "memcpy", Some(4096), "bw", 2.0, "MiB/s");
        r.add("bandwidth", "memcpy", Some(8), "bw", 1.0, "MiB/s");
        r.add("bandwidth", "qperf tcp_bw", Some(8), "bw", 0.5, "MiB/s");
        r.add("latency", "qperf tcp_lat", Some(8), "latency", 30.0, "us");
        assert_eq!(r.series("bandwidth", "bw"), vec!["memcpy", "qperf tcp_bw"]);
        assert_eq!(
            r.points("bandwidth", "memcpy", "bw"),
            vec![(8, 1.0), (4096, 2.0)]
        );
        assert_eq!(
            r.get("latency", "qperf tcp_lat", Some(8), "latency"),
            Some(30.0)
        );
        assert_eq!(r.get("latency", "qperf tcp_lat", Some(16), "latency"), None);
    }

    #[test]
    fn tables_render_as_text_and_markdown() {
        let mut t = Table::new("Bandwidth", &["size", "vrdma", "memcpy"]);
        t.row(vec!["8".into(), "1.5".into(), "-".into()]);
        t.row(vec!["64K".into(), "12000".into(), "20000".into()]);
        let text = t.text();
        assert!(
            text.starts_with("== Bandwidth ==\nsize  vrdma  memcpy\n"),
            "{text}"
        );
        assert!(text.contains("64K   12000   20000\n"), "{text}");
        let md = t.markdown();
        assert!(md.contains("| size | vrdma | memcpy |\n|---|---:|---:|\n| 8 | 1.5 | - |\n"));
    }

    #[test]
    fn numbers_and_sizes_are_formatted_for_people() {
        assert_eq!(fmt(Some(12345.6)), "12346");
        assert_eq!(fmt(Some(32.44)), "32.4");
        assert_eq!(fmt(Some(4.567)), "4.57");
        assert_eq!(fmt(Some(0.1234)), "0.123");
        assert_eq!(fmt(Some(0.00972)), "0.00972");
        assert_eq!(fmt(None), "-");
        assert_eq!(size_label(8), "8");
        assert_eq!(size_label(65536), "64K");
        assert_eq!(size_label(4 << 20), "4M");
        assert_eq!(size_label(1 << 30), "1G");
        assert_eq!(size_label(1000), "1000");
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
    }
}
