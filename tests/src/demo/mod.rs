//! The pieces of `vrdma-demo`, the main-job demo (see `src/bin/vrdma-demo.rs`).

mod daemon;
mod guest;
mod parent;
mod report;
mod wire;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

const LONG_ABOUT: &str = "\
vrdma-demo: the vrdma main-job demo.

Without a subcommand it runs everything as separate processes of this one binary: it starts
the vhost-user-rdma daemon serving two VMs (vm1, vm2) on sockets in a private temporary
directory, then one guest per VM. Each guest opens its VM's vrdma device over virtio-user
(the process is its own vhost-user frontend, as a VMM would be), and the two exchange QP
numbers, GIDs, buffer addresses and rkeys over TCP on 127.0.0.1, as perftest does. They
connect RC QPs and run RDMA WRITE and SEND latency (ping-pong) and bandwidth tests; the
client prints perftest-style tables. Every test checks the data that arrived. At the end the
daemon is stopped with SIGTERM and the directory removed.";

/// The vrdma main-job demo: a daemon and two guests, perftest-style latency and bandwidth.
#[derive(Debug, Parser)]
#[command(name = "vrdma-demo", version, long_about = LONG_ABOUT, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Time to spend measuring each message size, in milliseconds (13 sizes in all).
    #[arg(long, default_value_t = 1000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(10..=10_000))]
    ms_per_size: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the vhost-user-rdma daemon, exactly as the vhost-user-rdma binary does (same
    /// options: `vrdma-demo daemon --help` lists them). Stops on SIGINT or SIGTERM.
    #[command(disable_help_flag = true)]
    Daemon {
        /// vhost-user-rdma options, e.g. --vm name=vm1,socket=/tmp/vm1.sock,gid=10.0.0.1
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "OPTIONS"
        )]
        args: Vec<String>,
    },
    /// Run one guest: open the VM's device at --socket and either wait for the other guest
    /// (--server --port) or connect to it and run the tests (--connect).
    Guest(guest::GuestArgs),
}

/// Dispatches on the subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => parent::run(cli.ms_per_size),
        Some(Command::Daemon { args }) => daemon::run(args),
        Some(Command::Guest(args)) => guest::run(&args),
    }
}
