//! vrdma-bench: the one bench command of docs/performance.md. In one run on one machine it
//! measures vrdma (through vrdma-perf and in-process guests against the real daemon binary),
//! TCP on loopback (qperf) and memcpy, and vrdma against TCP between two simulated hosts
//! (network namespaces), prints them side by side with the ratios and the targets, and writes
//! results.csv, summary.md and the plots.

mod guest;
mod memcpy;
mod migration;
mod perf;
mod plot;
mod procs;
mod qperf;
mod report;
mod sections;
mod shim;
mod tables;
mod wakeup;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use report::Results;
use sections::{Env, SECTIONS};

/// The side-by-side benchmark: vrdma against TCP (qperf) and memcpy, memory registration,
/// daemon idle CPU, fairness, isolation (from bulk traffic and from memory registration) and
/// scale. Run it through bench/run, which installs qperf and gnuplot and builds the daemon and
/// vrdma-perf next to this program.
#[derive(Debug, Parser)]
#[command(name = "vrdma-bench", version, about, long_about = None)]
struct Args {
    /// Where results.csv, summary.md, the plots and the logs go (default
    /// bench-results/YYYYMMDD-HHMMSS).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,

    /// Few sizes and short runs, under about a minute: a smoke test, not numbers to quote.
    #[arg(long)]
    quick: bool,

    /// Run only these sections (comma-separated): vrdma, tcp, wakeup, roce, shim, memcpy, mr,
    /// idle, fairness, isolation, registering, many, scale, migrate.
    #[arg(long, value_name = "SECTION,...", value_delimiter = ',')]
    only: Vec<String>,

    /// Seconds per bandwidth point (vrdma-perf -D, qperf -t) in a full run.
    #[arg(long, default_value_t = 2, value_name = "SECS")]
    secs: u64,

    /// Run the isolation section's daemon with `--step-time-us US` (a lower class's steps
    /// bounded by time), to measure what the bound buys and costs.
    #[arg(long, value_name = "US")]
    step_time_us: Option<f64>,

    /// Do not give the daemon a CPU of its own. By default, on two or more CPUs, the daemon
    /// runs on the last CPU and vrdma's guests on the others (as an operator dedicates host
    /// cores to it), while qperf runs on all of them.
    #[arg(long)]
    no_pin: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    for s in &args.only {
        if !SECTIONS.contains(&s.as_str()) {
            eprintln!(
                "vrdma-bench: --only {s:?}: no such section; the sections are {}",
                SECTIONS.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    if !args.no_pin {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(placement) = procs::Placement::last_cpu(cpus) {
            eprintln!(
                "vrdma-bench: daemon on CPU {}, guests on CPU {}, qperf on CPUs {}, the shim \
                 section's servers on CPU {} and clients on CPU {} (--no-pin to share them all)",
                placement.daemon,
                placement.guests,
                placement.all,
                placement.ends[0],
                placement.ends[1]
            );
            if let Err(e) = placement.apply() {
                eprintln!("vrdma-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Err(e) = procs::install_signal_flag() {
        eprintln!("vrdma-bench: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results").join(timestamp()));
    if let Err(e) = std::fs::create_dir_all(out.join("logs")) {
        eprintln!("vrdma-bench: cannot create {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    let mut env = Env {
        quick: args.quick,
        secs: args.secs.max(1),
        out: out.clone(),
        sock_root: std::env::temp_dir().join(format!("vrdma-bench-{}", std::process::id())),
        failures: Vec::new(),
        step_time_us: args.step_time_us,
    };
    let mut results = Results::default();
    let started = Instant::now();
    let mut interrupted = false;
    let mut ran = Vec::new();
    for name in SECTIONS {
        if !args.only.is_empty() && !args.only.iter().any(|s| s == name) {
            continue;
        }
        if procs::interrupted() {
            interrupted = true;
            break;
        }
        eprintln!(
            "[{:>5.0} s] section {name}",
            started.elapsed().as_secs_f64()
        );
        let outcome = match name {
            "vrdma" => sections::vrdma(&mut env, &mut results),
            "tcp" => sections::tcp(&mut env, &mut results),
            "wakeup" => wakeup::wakeup(&mut env, &mut results),
            "roce" => sections::roce(&mut env, &mut results),
            "shim" => shim::shim_section(&mut env, &mut results),
            "memcpy" => sections::memcpy(&mut env, &mut results),
            "mr" => sections::mr(&mut env, &mut results),
            "idle" => sections::idle(&mut env, &mut results),
            "fairness" => sections::fairness(&mut env, &mut results),
            "isolation" => sections::isolation(&mut env, &mut results),
            "registering" => sections::registering(&mut env, &mut results),
            "many" => sections::many(&mut env, &mut results),
            "migrate" => migration::migrate_section(&mut env, &mut results),
            "scale" => sections::scale(&mut env, &mut results),
            other => unreachable!("section {other} is in SECTIONS but not run"),
        };
        ran.push(name);
        if let Err(e) = outcome {
            if procs::interrupted() {
                interrupted = true;
                break;
            }
            let msg = format!("section {name}: {e}");
            let what = match e {
                sections::Error::Skipped(_) => "SKIPPED",
                _ => "FAILED",
            };
            eprintln!("  {what}: {msg}");
            env.failures.push(msg);
        }
    }
    let _ = std::fs::remove_dir_all(&env.sock_root);

    let elapsed = started.elapsed();
    let tables = tables::all(&mut results, &env);
    let mut text = String::new();
    for t in &tables {
        text.push_str(&t.text());
        text.push('\n');
    }
    println!("\n{text}");
    let mut ok = env.failures.is_empty() && !interrupted;
    if !env.failures.is_empty() {
        println!("Failures ({}):", env.failures.len());
        for f in &env.failures {
            println!("  - {f}");
        }
    }
    if let Err(e) = results.write_csv(&out.join("results.csv")) {
        eprintln!("vrdma-bench: {e}");
        ok = false;
    }
    let md = tables::summary_markdown(&tables, &env, elapsed, &ran, interrupted);
    if let Err(e) = report::write_file(&out.join("summary.md"), &md) {
        eprintln!("vrdma-bench: {e}");
        ok = false;
    }
    for chart in tables::charts() {
        if let Err(e) = plot::draw(&results, &chart, &out) {
            // An empty chart only means its sections were not selected.
            if !matches!(e, plot::Error::Empty(_)) {
                eprintln!("vrdma-bench: {}.png: {e}", chart.name);
                ok = false;
            }
        }
    }
    println!(
        "Wrote {}/results.csv, summary.md, bandwidth.png, latency.png (logs in {}/logs) in {:.0} s.",
        out.display(),
        out.display(),
        elapsed.as_secs_f64()
    );
    if interrupted {
        println!("Interrupted: the results above are partial.");
        ExitCode::from(130)
    } else if ok {
        ExitCode::SUCCESS
    } else {
        println!("Not everything ran: see the failures above and the logs.");
        ExitCode::FAILURE
    }
}

/// UTC now as YYYYMMDD-HHMMSS.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn the_command_line_parses() {
        let a = Args::parse_from([
            "vrdma-bench",
            "--quick",
            "--only",
            "vrdma,tcp,roce",
            "--out",
            "/tmp/x",
        ]);
        assert!(a.quick);
        assert_eq!(a.only, vec!["vrdma", "tcp", "roce"]);
        assert!(a.only.iter().all(|s| SECTIONS.contains(&s.as_str())));
        assert_eq!(a.out, Some(PathBuf::from("/tmp/x")));
        assert_eq!(a.secs, 2);
    }
}
