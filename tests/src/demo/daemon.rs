//! `vrdma-demo daemon`: exactly what the `vhost-user-rdma` binary runs, so the demo runs the
//! real daemon in its own process without a second binary to build or find.

use std::process::ExitCode;

/// Runs the daemon with `args` (the `vhost-user-rdma` command line, without the program name).
pub fn run(args: Vec<String>) -> ExitCode {
    const NAME: &str = "vrdma-demo daemon";
    vhost_user_rdma::cli::run(NAME, std::iter::once(NAME.to_owned()).chain(args))
}
