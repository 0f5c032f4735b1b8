//! The vhost-user-rdma daemon.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use log::info;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vhost_user_rdma::config::{Args, Config};
use vhost_user_rdma::server::VmServer;

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
    let scheduler = match vhost_user_rdma::engine::Scheduler::start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vhost-user-rdma: cannot start the scheduler thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut servers = Vec::new();
    for (i, vm) in config.vms.iter().enumerate() {
        let guid = 0x0200_5652_444d_0000 | (i as u64 + 1);
        match VmServer::start(vm.clone(), guid, scheduler.clone()) {
            Ok(s) => servers.push(s),
            Err(e) => {
                eprintln!("vhost-user-rdma: {e}");
                for s in servers {
                    s.stop(Duration::from_secs(1));
                }
                return ExitCode::FAILURE;
            }
        }
    }
    info!(
        "serving {} VM(s) on the {:?} fabric",
        servers.len(),
        config.fabric
    );
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    info!("signal {signal}: shutting down");
    for s in servers {
        s.stop(Duration::from_secs(5));
    }
    info!("stopped");
    ExitCode::SUCCESS
}
