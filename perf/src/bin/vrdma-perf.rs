//! `vrdma-perf`: perftest for vrdma. See `vrdma-perf --help` and perf/README.md.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let _ = env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .parse_env("RUST_LOG")
        .try_init();
    vrdma_perf::main_with(&vrdma_perf::Args::parse())
}
