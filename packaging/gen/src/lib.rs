//! The files packaging ships that are derived from the code, so that they cannot drift from it:
//!
//! - `man/vhost-user-rdma.1`, `man/vrdmactl.1`, `man/vrdma-perf.1`, `man/vrdma-devinfo.1`: the
//!   man pages, made with `clap_mangen` from the programs' clap definitions
//!   (`vhost_user_rdma::config::Args`, `vhost_user_rdma::ctl::Args`, `vrdma_perf::Args`).
//!   `vrdmactl`'s commands are described on its one page, each with its usage and arguments
//!   (clap_mangen alone would only name them and point at `vrdmactl-COMMAND` pages that do not
//!   exist). `vrdma-devinfo` parses its options by hand, as `ibv_devinfo` does with
//!   getopt_long, so its page comes from [`devinfo_command`], a clap description of the same
//!   options that a test compares with the program's own usage text.
//! - `packaging/deb/vhost-user-rdma.service`: the systemd unit the Debian package installs,
//!   which is `packaging/systemd/vhost-user-rdma.service` (the one `cargo install` users copy,
//!   running `/usr/local/bin/vhost-user-rdma`) with `ExecStart` at `/usr/bin` and a header
//!   that says where it came from.
//!
//! `cargo run -p vrdma-pkg-gen` writes them; `cargo run -p vrdma-pkg-gen -- --check` and this
//! crate's test (`tests/current.rs`, part of `cargo test --workspace`) fail if a committed one
//! differs from what the code gives.

use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command, CommandFactory};

/// The workspace's root, where the generated files' paths start.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The version every page names: the workspace's.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The systemd unit for `cargo install` users, and the path it runs the daemon from.
pub const SOURCE_UNIT: &str = "packaging/systemd/vhost-user-rdma.service";
const SOURCE_EXEC: &str = "ExecStart=/usr/local/bin/vhost-user-rdma ";
/// The Debian package's unit, and the path it runs the daemon from.
pub const PACKAGE_UNIT: &str = "packaging/deb/vhost-user-rdma.service";
const PACKAGE_EXEC: &str = "ExecStart=/usr/bin/vhost-user-rdma ";

/// `vrdma-devinfo`'s options as a clap command, for its man page only: the program itself
/// parses them by hand (guest-lib/src/bin/vrdma-devinfo.rs). Keep the two in step; the test
/// `devinfo_page_matches_its_usage` compares this with the program's usage text.
pub fn devinfo_command() -> Command {
    Command::new("vrdma-devinfo")
        .version(VERSION)
        .about("Print the attributes of a vrdma device, as ibv_devinfo does")
        .long_about(
            "Print the attributes of a vrdma device in ibv_devinfo's format: the one behind a \
             vhost-user socket (this process is the VM's vhost-user frontend for as long as it \
             runs), or, inside a VM (as root), the VM's vrdma PCI device (1af4:106a). The \
             device is queried with ibv_query_device, ibv_query_port and ibv_query_gid and \
             printed with ibv_devinfo's field names, tabs and value formats, so scripts \
             written for ibv_devinfo read it unchanged. Fields the vrdma device does not \
             report (board_id, device_cap_flags, the ODP and TSO capabilities, counters) are \
             left out; the device has no firmware, so fw_ver is 0.0.0. One of --socket and \
             --pci is required.",
        )
        .disable_version_flag(true)
        .disable_help_flag(true)
        .arg(
            Arg::new("socket")
                .short('s')
                .long("socket")
                .value_name("PATH")
                .conflicts_with("pci")
                .help("the VM's vhost-user socket (vhost-user-rdma --vm ...,socket=PATH)"),
        )
        .arg(
            Arg::new("pci")
                .short('p')
                .long("pci")
                .action(ArgAction::SetTrue)
                .help("the first vrdma PCI device of this VM (needs root)"),
        )
        .arg(
            Arg::new("ib-port")
                .short('i')
                .long("ib-port")
                .value_name("PORT")
                .help("print only port PORT (default all ports)"),
        )
        .arg(
            Arg::new("verbose")
                .short('v')
                .long("verbose")
                .action(ArgAction::SetTrue)
                .help("print all the attributes of the device"),
        )
        .arg(
            Arg::new("help")
                .short('h')
                .long("help")
                .action(ArgAction::Help)
                .help("print this help"),
        )
}

/// `vrdmactl`'s clap definition: its NAME line is the documentation's first line, its
/// DESCRIPTION the paragraph after.
pub fn vrdmactl_command() -> Command {
    vhost_user_rdma::ctl::Args::command()
}

/// Text for a roff line: backslashes and hyphens escaped, and a line that would start with a
/// control character protected.
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// A COMMANDS section for a program with subcommands: each one's usage, what it does, and its
/// own arguments (the global ones are in OPTIONS).
fn commands_section(cmd: &Command) -> String {
    let mut cmd = cmd.clone();
    cmd.build();
    let mut out = String::from(".SH COMMANDS\n");
    for sub in cmd.get_subcommands_mut() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let usage = sub.render_usage().to_string();
        let usage = usage.strip_prefix("Usage: ").unwrap_or(&usage);
        let about = sub
            .get_long_about()
            .or_else(|| sub.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        out.push_str(&format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            roff_text(usage),
            roff_text(&about)
        ));
        let args: Vec<_> = sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !a.is_global_set())
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .collect();
        if args.is_empty() {
            continue;
        }
        out.push_str(".RS\n");
        for arg in args {
            let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
            let name = match arg.get_long() {
                Some(long) => match arg.get_value_names() {
                    Some(v) if takes_value => {
                        format!("--{long} {}", v[0])
                    }
                    _ => format!("--{long}"),
                },
                None => arg
                    .get_value_names()
                    .map_or_else(|| arg.get_id().to_string(), |v| v.join(" ")),
            };
            let mut help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            if let Some(default) = arg.get_default_values().first().filter(|_| takes_value) {
                help.push_str(&format!(" (default {})", default.to_string_lossy()));
            }
            out.push_str(&format!(
                ".TP\n\\fB{}\\fR\n{}\n",
                roff_text(&name),
                roff_text(&help)
            ));
        }
        out.push_str(".RE\n");
    }
    out
}

/// Each program with a man page, as the clap command its page is made from.
pub fn commands() -> Vec<Command> {
    vec![
        vhost_user_rdma::config::Args::command(),
        vrdmactl_command(),
        vrdma_perf::Args::command(),
        devinfo_command(),
    ]
}

/// Sections a program's page has beyond what clap describes, in roff.
fn extra_sections(name: &str) -> &'static str {
    match name {
        "vhost-user-rdma" => {
            ".SH FILES\n\
             .TP\n\
             /etc/vrdma/vhost-user-rdma.conf\n\
             VRDMA_ARGS, the daemon's arguments when it runs as vhost-user-rdma.service.\n\
             .TP\n\
             /lib/systemd/system/vhost-user-rdma.service\n\
             The systemd unit (Debian package). It is not enabled on install: edit the \
             configuration, then systemctl enable \\-\\-now vhost-user-rdma.\n\
             .TP\n\
             /run/vrdma\n\
             Where the unit lets the daemon make the VMs' sockets.\n\
             .TP\n\
             /run/vrdma/control/vrdmactl.sock\n\
             The management socket (\\-\\-control\\-socket) the unit has the daemon make, \
             for vrdmactl.\n\
             .SH SIGNALS\n\
             SIGUSR1 logs every VM's counters. SIGINT and SIGTERM disconnect every VM, release \
             its objects and remove the sockets.\n\
             .SH SEE ALSO\n\
             .BR vrdmactl (1),\n\
             .BR vrdma-devinfo (1),\n\
             .BR vrdma-perf (1)\n"
        }
        "vrdmactl" => {
            ".SH ENVIRONMENT\n\
             .TP\n\
             VRDMACTL_SOCKET\n\
             The management socket, when \\-\\-socket is not given.\n\
             .SH FILES\n\
             .TP\n\
             /run/vrdma/control/vrdmactl.sock\n\
             The management socket vhost\\-user\\-rdma.service makes (mode 0600), and the \
             default of \\-\\-socket.\n\
             .SH EXIT STATUS\n\
             0 if the daemon carried the command out, 1 if it refused it (the reason is printed) \
             or drain \\-\\-wait timed out, 2 if the daemon could not be reached or the \
             command line is wrong.\n\
             .SH NOTES\n\
             Changes are not written to the daemon's configuration: they last until the daemon \
             stops. add is refused when the daemon runs with \\-\\-roce, whose addresses are \
             bound at start.\n\
             .SH SEE ALSO\n\
             .BR vhost-user-rdma (1),\n\
             .BR vrdma-devinfo (1)\n"
        }
        "vrdma-perf" => {
            ".SH SEE ALSO\n\
             .BR vhost-user-rdma (1),\n\
             .BR vrdma-devinfo (1),\n\
             .BR ib_write_bw (1)\n"
        }
        "vrdma-devinfo" => {
            ".SH EXIT STATUS\n\
             0 on success, 1 if the device could not be opened or queried, 2 for a bad \
             command line.\n\
             .SH SEE ALSO\n\
             .BR vhost-user-rdma (1),\n\
             .BR vrdma-perf (1),\n\
             .BR ibv_devinfo (1)\n"
        }
        _ => "",
    }
}

/// The man page of `cmd`, in section 1.
pub fn man_page(cmd: Command) -> Vec<u8> {
    let name = cmd.get_name().to_owned();
    let commands = cmd.has_subcommands().then(|| commands_section(&cmd));
    let man = clap_mangen::Man::new(cmd)
        .section("1")
        .source(format!("vrdma {VERSION}"))
        .manual("vrdma");
    let mut out = Vec::new();
    match commands {
        None => man.render(&mut out).expect("render into memory"),
        // clap_mangen's own order, with COMMANDS in place of its SUBCOMMANDS list.
        Some(commands) => {
            man.render_title(&mut out).expect("render into memory");
            man.render_name_section(&mut out)
                .expect("render into memory");
            man.render_synopsis_section(&mut out)
                .expect("render into memory");
            man.render_description_section(&mut out)
                .expect("render into memory");
            man.render_options_section(&mut out)
                .expect("render into memory");
            out.extend_from_slice(commands.as_bytes());
            man.render_version_section(&mut out)
                .expect("render into memory");
        }
    }
    out.extend_from_slice(extra_sections(&name).as_bytes());
    out
}

/// The Debian package's unit made from the `cargo install` one (`source`): its header comment
/// replaced, and `ExecStart` at `/usr/bin`. Fails if `source` does not have exactly one
/// `ExecStart` at `/usr/local/bin` or no `[Unit]` section.
pub fn packaged_unit(source: &str) -> Result<String, String> {
    if source.matches(SOURCE_EXEC).count() != 1 || source.matches("ExecStart=").count() != 1 {
        return Err(format!(
            "{SOURCE_UNIT} must have exactly one ExecStart, starting {SOURCE_EXEC:?}"
        ));
    }
    let body = source
        .find("\n[Unit]")
        .map(|at| &source[at + 1..])
        .ok_or_else(|| format!("{SOURCE_UNIT} has no [Unit] section"))?;
    let header = format!(
        "# vhost-user-rdma as a systemd service, as the Debian package installs it\n\
         # (/lib/systemd/system/vhost-user-rdma.service). Generated from {SOURCE_UNIT} by\n\
         # `cargo run -p vrdma-pkg-gen`, with ExecStart at /usr/bin: edit that file, not this one.\n\
         #\n\
         # The package does not enable the unit: edit VRDMA_ARGS in /etc/vrdma/vhost-user-rdma.conf,\n\
         # then `systemctl enable --now vhost-user-rdma`. vrdmactl changes the VMs while the\n\
         # daemon runs, until it stops; a change to that line takes effect on a restart of the\n\
         # service, which disconnects every VM's guest.\n\n"
    );
    Ok(header + &body.replace(SOURCE_EXEC, PACKAGE_EXEC))
}

/// Every generated file: its path under the workspace and its contents.
pub fn outputs() -> Result<Vec<(PathBuf, Vec<u8>)>, String> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = commands()
        .into_iter()
        .map(|cmd| {
            let path = PathBuf::from(format!("man/{}.1", cmd.get_name()));
            (path, man_page(cmd))
        })
        .collect();
    let source = std::fs::read_to_string(workspace().join(SOURCE_UNIT))
        .map_err(|e| format!("{SOURCE_UNIT}: {e}"))?;
    out.push((PACKAGE_UNIT.into(), packaged_unit(&source)?.into_bytes()));
    Ok(out)
}
