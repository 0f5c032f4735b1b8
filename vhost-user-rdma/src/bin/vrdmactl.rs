//! vrdmactl: the operator's command for a running vhost-user-rdma.

fn main() -> std::process::ExitCode {
    vhost_user_rdma::ctl::run(std::env::args())
}
