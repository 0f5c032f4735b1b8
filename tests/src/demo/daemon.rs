//! `vrdma-demo daemon`: exactly what the `vhost-user-rdma` binary's `main` does, so the demo
//! runs the real daemon in its own process without a second binary to build or find.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vhost_user_rdma::config::{Args, Config};
use vhost_user_rdma::daemon::Daemon;

/// Runs the daemon with `args` (the `vhost-user-rdma` command line, without the program name).
pub fn run(args: Vec<String>) -> ExitCode {
    let argv = std::iter::once("vrdma-demo daemon".to_owned()).chain(args);
    let matches = Args::command()
        .bin_name("vrdma-demo daemon")
        .get_matches_from(argv);
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if args.print_capabilities {
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
            eprintln!("vhost-user-rdma: {}", vrdma::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    log::info!("signal {signal}: shutting down");
    daemon.stop();
    ExitCode::SUCCESS
}
