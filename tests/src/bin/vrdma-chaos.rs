//! `vrdma-chaos`: relays IP packets between two TUN devices (usually in two network
//! namespaces), losing, duplicating, reordering, delaying or cutting them, for multi-host tests
//! on a kernel without netem. See `vrdma_tests::chaos` for the topology and the control
//! protocol on stdin.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vrdma_tests::chaos::{
    Command, Impairments, RelayConfig, TunEnd, parse_millis, parse_probability, run_relay,
};

/// Relays raw IP packets between TUN device A and TUN device B with seeded impairments.
///
/// The relay attaches to the TUN devices (create them with `ip -n NS tuntap add dev NAME mode
/// tun` and configure addresses, routes and link state yourself; a missing one is created but
/// left down) and prints `ready`. Impairment flags apply both ways; `--set` runs a control command
/// (such as "a2b loss 0.1") at start-up. On stdin it takes the same commands, one per line,
/// answering each with `ok`, `error: ...` or a JSON line (`stats`). EOF on stdin, SIGTERM or
/// SIGINT print the final stats and exit.
#[derive(Debug, Parser)]
#[command(name = "vrdma-chaos", version)]
struct Args {
    /// Namespace of side A (as `ip netns list` names it); the relay's own when absent.
    #[arg(long)]
    a_netns: Option<String>,
    /// TUN device of side A.
    #[arg(long)]
    a_tun: String,
    /// Namespace of side B; the relay's own when absent.
    #[arg(long)]
    b_netns: Option<String>,
    /// TUN device of side B.
    #[arg(long)]
    b_tun: String,
    /// Seed of every random choice: the same seed and traffic give the same impairments.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Chance of dropping a packet.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    loss: f64,
    /// Chance of sending a packet twice.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    duplicate: f64,
    /// Chance of marking an ECN-capable packet congested (ECN CE), as a switch would.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    mark: f64,
    /// Chance of holding a packet back behind later ones.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    reorder: f64,
    /// How many later packets overtake a held one.
    #[arg(long, default_value_t = 3)]
    reorder_gap: u32,
    /// How long a held packet waits at most for its overtakers, in milliseconds.
    #[arg(long, default_value = "50", value_parser = parse_millis)]
    reorder_timeout_ms: Duration,
    /// Fixed delay, in milliseconds.
    #[arg(long, default_value = "0", value_parser = parse_millis)]
    delay_ms: Duration,
    /// Random extra delay of up to this many milliseconds (reorders when above packet spacing).
    #[arg(long, default_value = "0", value_parser = parse_millis)]
    jitter_ms: Duration,
    /// Start with the link cut (until a `restore` command).
    #[arg(long)]
    cut: bool,
    /// A control command to run at start-up, after the flags above; repeatable.
    #[arg(long = "set", value_name = "COMMAND")]
    set: Vec<Command>,
    /// Keep relaying after stdin closes (stop with SIGTERM), for running in the background.
    #[arg(long)]
    ignore_eof: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let impairments = Impairments {
        cut: args.cut,
        loss: args.loss,
        duplicate: args.duplicate,
        mark: args.mark,
        reorder: args.reorder,
        reorder_gap: args.reorder_gap,
        delay: args.delay_ms,
        jitter: args.jitter_ms,
    };
    let config = RelayConfig {
        a: TunEnd {
            netns: args.a_netns,
            tun: args.a_tun,
        },
        b: TunEnd {
            netns: args.b_netns,
            tun: args.b_tun,
        },
        seed: args.seed,
        initial: [impairments; 2],
        reorder_timeout: args.reorder_timeout_ms,
        exit_on_eof: !args.ignore_eof,
    };
    match run_relay(&config, &args.set) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
