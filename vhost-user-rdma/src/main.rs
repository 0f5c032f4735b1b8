//! The vhost-user-rdma daemon.

use std::process::ExitCode;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vhost_user_rdma::config::{Args, Config};
use vhost_user_rdma::daemon::Daemon;

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_capabilities {
        // QEMU's vhost-user.json has no "rdma" backend type yet; this is the entry vrdma
        // proposes for it, with no optional features.
        println!("{{\n  \"type\": \"rdma\",\n  \"features\": []\n}}");
        return ExitCode::SUCCESS;
    }
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhost-user-rdma: {e}");
            return ExitCode::from(2);
        }
    };
    // Signals are taken before any thread starts so none of them sees SIGINT or SIGTERM.
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vhost-user-rdma: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let daemon = match Daemon::start(&config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vhost-user-rdma: {e}");
            return ExitCode::FAILURE;
        }
    };
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    log::info!("signal {signal}: shutting down");
    daemon.stop();
    ExitCode::SUCCESS
}
