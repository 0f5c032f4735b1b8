//! The daemon's command-line program, as a function: the `vhost-user-rdma` binary and the
//! demo's `daemon` subcommand run exactly the same thing.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use crate::config::{Args, Config, FabricKind};
use crate::daemon::Daemon;
use crate::manage;
use vrdma_proto::ErrorChain;

/// The capabilities JSON of QEMU's `docs/interop/vhost-user.json` ("Backend program
/// conventions" in vhost-user.rst). That schema's `VHostUserBackendType` enum has no RDMA
/// type (it lists 9p, balloon, block, caif, console, crypto, gpu, input, net, rng, rpmsg,
/// rproc-serial, scsi, vsock and fs), so no output can both validate and be true: naming one
/// of those would have management software pair this daemon with the wrong device. It prints
/// `"rdma"`, what an entry for virtio device 42 would be called, in the form the schema gives
/// types without their own features (only `type`, as virtiofsd prints for `fs`). A validating
/// consumer rejects it until QEMU adds the type (README.md says so).
pub const CAPABILITIES: &str = "{\n  \"type\": \"rdma\"\n}";

/// Runs the daemon with the command line `argv` (program name first) until SIGINT or
/// SIGTERM; `bin_name` is how help and errors name the program.
pub fn run(bin_name: &str, argv: impl IntoIterator<Item = String>) -> ExitCode {
    let matches = Args::command()
        .bin_name(bin_name.to_owned())
        .get_matches_from(argv);
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if args.print_capabilities {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    // A second logger (the demo's own process may have one) is not an error.
    let _ = env_logger::Builder::new()
        .filter_level(args.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .try_init();
    if args.check_fabric {
        return check_fabric(&args.fabric);
    }
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhost-user-rdma: {e}");
            return ExitCode::from(2);
        }
    };
    // Signals are taken before any thread starts so none of them sees SIGINT, SIGTERM or
    // SIGUSR1 (which logs the counters) handled by default.
    let signals = match manage::Signals::install() {
        Ok(s) => s,
        Err(e) => return refused(&e, false),
    };
    let control = match config
        .control_socket
        .as_deref()
        .map(manage::ControlSocket::bind)
    {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => return refused(&e, matches!(e, manage::Error::SocketBusy(_))),
        None => None,
    };
    let daemon = match Daemon::start(&config) {
        Ok(d) => d,
        Err(e) => return refused(&e, e.is_configuration()),
    };
    match manage::run(daemon, signals, control) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => refused(&e, false),
    }
}

/// Says why the program cannot go on and gives its exit code: 2 when the host or the
/// command line is at fault (`configuration`), as for a bad option, else 1.
fn refused(e: &(dyn std::error::Error + 'static), configuration: bool) -> ExitCode {
    eprintln!("vhost-user-rdma: {}", ErrorChain(e));
    if configuration {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// `--check-fabric`: checks fabric `fabric` and exits (see the option's help).
fn check_fabric(fabric: &str) -> ExitCode {
    let kind = match crate::config::parse_fabric(fabric) {
        Ok(k) => k,
        Err(e) => return refused(&e, true),
    };
    match kind {
        FabricKind::Soft => {
            println!("the soft fabric needs no NIC: nothing to check");
            ExitCode::SUCCESS
        }
        #[cfg(feature = "verbs")]
        FabricKind::Verbs(spec) => {
            use crate::fabric::verbs::{check, nic};
            let nic = match nic::Nic::open(&spec.device, spec.port, spec.gid_index) {
                Ok(n) => n,
                Err(e) => return refused(&e, e.is_configuration()),
            };
            match check::check(&nic) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                // The check's errors name the device and the step.
                Err(e) => refused(&e, false),
            }
        }
        #[cfg(not(feature = "verbs"))]
        FabricKind::Verbs(_) => {
            // parse_fabric refuses verbs: in a build without the feature; kept for the match.
            eprintln!(
                "vhost-user-rdma: this build has no libibverbs support; rebuild with --features verbs"
            );
            ExitCode::from(2)
        }
    }
}
