//! The vhost-user-rdma daemon.

fn main() -> std::process::ExitCode {
    vhost_user_rdma::cli::run("vhost-user-rdma", std::env::args())
}
