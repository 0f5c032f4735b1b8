//! `vrdma-demo`: the main job of vrdma, from one command:
//!
//! ```sh
//! cargo run --release -p vrdma-tests --bin vrdma-demo
//! ```
//!
//! A multi-call binary: without arguments it starts `vrdma-demo daemon ...` (the
//! vhost-user-rdma daemon serving two VMs) and two `vrdma-demo guest ...` processes, which
//! connect RC QPs through the daemon and run perftest-style latency and bandwidth tests.
//! `vrdma-demo --help` describes the subcommands.

#[path = "../demo/mod.rs"]
mod demo;

fn main() -> std::process::ExitCode {
    demo::main()
}
