//! `vrdmactl`: the operator's command for a running daemon, over its management socket
//! (`vhost-user-rdma --control-socket`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::config::PriorityClass;
use crate::manage::{self, Request, Response};
use crate::vhost::server::VmStatus;

/// List, add, remove, reweigh and drain the VMs of a running vhost-user-rdma.
///
/// vrdmactl lists, adds, removes, reweighs and drains the VMs of a running vhost-user-rdma,
/// and resets their counters, over the daemon's management socket (vhost-user-rdma
/// --control-socket), which only the daemon's user may open. Changes take effect at once and
/// last until the daemon stops: to keep them across restarts, put them in the daemon's --vm
/// list too. The protocol, one JSON object per line each way, is in docs/operations.md.
#[derive(Debug, Parser)]
#[command(name = "vrdmactl", version)]
pub struct Args {
    /// The daemon's management socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = manage::DEFAULT_SOCKET,
        env = "VRDMACTL_SOCKET"
    )]
    pub socket: PathBuf,

    /// Print the daemon's answer as JSON (one object: ok, error, vms) instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// vrdmactl's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show every VM (or one): whether a guest is connected and with which features, weight,
    /// caps, drain, objects in use against quotas, and counters (kept across guest
    /// connections).
    List {
        /// Only this VM.
        vm: Option<String>,
    },
    /// Serve another VM, given as the daemon's --vm takes it (name= and socket= required);
    /// its socket is ready when the command returns. Not with --roce, whose addresses are
    /// bound at start.
    Add {
        /// name=NAME,socket=PATH[,gid=ADDR][,weight=N]...
        #[arg(value_name = "KEY=VALUE,...")]
        vm: String,
    },
    /// Stop serving a VM: its guest, if connected, sees the device go away, its objects are
    /// released and its socket removed. Drain it first to let its work under way finish.
    Remove {
        /// The VM.
        vm: String,
    },
    /// Change a VM's weight, class, caps or quotas, at once: weight, class (latency, normal,
    /// bulk), sl.0 to sl.15 (the class of its QPs on that service level, at most its own; vm
    /// for its own), max-bw and max-msg-rate (none lifts a cap) apply from the scheduler's next round;
    /// quotas (max-qp, max-cq, max-mr, max-pd, max-ah, max-srq, max-mr-bytes) to the guest's
    /// next objects. A connected guest's device keeps reporting the limits it had when it
    /// connected; the next connection reports the new ones. Objects beyond a lowered quota
    /// stay until the guest destroys them.
    Set {
        /// The VM.
        vm: String,
        /// KEY=VALUE pairs, separated by commas or given as separate arguments.
        #[arg(value_name = "KEY=VALUE", required = true)]
        settings: Vec<String>,
    },
    /// Drain a VM: start none of its send work requests, let those under way finish. Its
    /// guest sees no error; what it posts waits in its rings until `resume` (or the VM is
    /// removed). `list` shows how many sends are still under way.
    Drain {
        /// The VM.
        vm: String,
        /// Wait until no send of the VM is under way.
        #[arg(long)]
        wait: bool,
        /// With --wait, give up after this many seconds (exit 1).
        #[arg(long, default_value_t = 30, value_name = "SECONDS")]
        timeout: u64,
    },
    /// End a VM's drain: the work posted meanwhile starts.
    Resume {
        /// The VM.
        vm: String,
    },
    /// Set a VM's counters to zero, or every VM's.
    Reset {
        /// Only this VM.
        vm: Option<String>,
    },
}

/// Runs vrdmactl with the command line `argv` (program name first).
pub fn run(argv: impl IntoIterator<Item = String>) -> ExitCode {
    let args = Args::parse_from(argv);
    let request = match &args.command {
        Command::List { vm } => Request::List { vm: vm.clone() },
        Command::Add { vm } => Request::Add { vm: vm.clone() },
        Command::Remove { vm } => Request::Remove { vm: vm.clone() },
        Command::Set { vm, settings } => Request::Set {
            vm: vm.clone(),
            settings: settings.join(","),
        },
        Command::Drain { vm, .. } => Request::Drain { vm: vm.clone() },
        Command::Resume { vm } => Request::Resume { vm: vm.clone() },
        Command::Reset { vm } => Request::Reset { vm: vm.clone() },
    };
    let response = match exchange(&args, &request) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if let Command::Drain {
        vm,
        wait: true,
        timeout,
    } = &args.command
    {
        if response.ok {
            return wait_drained(&args, vm, Duration::from_secs(*timeout));
        }
    }
    report(&args, &response)
}

/// Sends `request`; on failure to reach the daemon, says why and gives the exit code (2).
fn exchange(args: &Args, request: &Request) -> Result<Response, ExitCode> {
    manage::request(&args.socket, request).map_err(|e| {
        eprintln!("vrdmactl: {}", vrdma_proto::ErrorChain(&e));
        ExitCode::from(2)
    })
}

/// Prints the answer; exit 0 if the daemon carried the request out, else 1.
fn report(args: &Args, response: &Response) -> ExitCode {
    if args.json {
        match serde_json::to_string_pretty(response) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("vrdmactl: cannot print the answer: {e}"),
        }
    } else if let Some(error) = &response.error {
        eprintln!("vrdmactl: {error}");
    } else {
        for vm in &response.vms {
            print!("{}", describe(vm));
        }
    }
    if response.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Polls VM `vm` until none of its sends is under way or `timeout` passes.
fn wait_drained(args: &Args, vm: &str, timeout: Duration) -> ExitCode {
    let deadline = Instant::now() + timeout;
    loop {
        let response = match exchange(
            args,
            &Request::List {
                vm: Some(vm.into()),
            },
        ) {
            Ok(r) => r,
            Err(code) => return code,
        };
        let Some(status) = response.vms.first().filter(|_| response.ok) else {
            return report(args, &response);
        };
        if status.sends_under_way == 0 {
            if !args.json {
                println!("vm {vm}: drained");
            }
            return report(args, &response);
        }
        if Instant::now() >= deadline {
            eprintln!(
                "vrdmactl: vm {vm}: {} sends still under way after {}s",
                status.sends_under_way,
                timeout.as_secs()
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One VM as text, a few lines.
pub fn describe(vm: &VmStatus) -> String {
    let cap = |c: Option<u64>| c.map_or_else(|| "none".to_owned(), |v| v.to_string());
    let state = match (vm.connected, vm.features) {
        (true, Some(f)) => format!("connected, features {f:#x}"),
        (true, None) => "connected, features not yet set".to_owned(),
        (false, _) => "no guest".to_owned(),
    };
    let drain = match (vm.draining, vm.sends_under_way) {
        (false, _) => String::new(),
        (true, 0) => ", drained".to_owned(),
        (true, n) => format!(", draining ({n} sends under way)"),
    };
    let objects: Vec<String> = vm
        .objects
        .iter()
        .map(|o| format!("{} {}/{}", o.kind, o.in_use, o.quota))
        .collect();
    // The service levels that put QPs in another class, if any.
    let sls = match vm.sl_classes.describe() {
        none if none.is_empty() => none,
        some => format!(" ({some})"),
    };
    let by_class: Vec<String> = PriorityClass::ALL
        .iter()
        .zip(vm.bytes_by_class)
        .map(|(class, bytes)| format!("{} {bytes}", class.name()))
        .collect();
    let counters: Vec<String> = vm
        .counters
        .iter()
        .map(|(name, value)| format!("{name} {value}"))
        .collect();
    format!(
        "vm {}: {state}{drain}\n  socket {}, gid {}\n  class {}{}, weight {}, max-bw {}, max-msg-rate {}\n  objects: {}\n  counters: {}\n  bytes by class: {}\n",
        vm.name,
        vm.socket,
        vm.gid,
        vm.class.name(),
        sls,
        vm.weight,
        cap(vm.max_bw),
        cap(vm.max_msg_rate),
        objects.join(", "),
        counters.join(", "),
        by_class.join(", "),
    )
}
