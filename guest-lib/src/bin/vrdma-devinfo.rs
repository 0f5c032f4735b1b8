//! `vrdma-devinfo`: prints a vrdma device's attributes in `ibv_devinfo`'s format.
//!
//! ```text
//! vrdma-devinfo --socket /run/vrdma/vm1.sock [-v] [-i PORT]
//! vrdma-devinfo --pci [-v] [-i PORT]       (inside a VM, as root)
//! ```
//!
//! The device is opened over virtio-user (this process becomes the VM's vhost-user frontend
//! for as long as it runs) or, with `--pci`, as the VM's virtio-pci
//! function (1af4:106a) from user space; then it is queried with `ibv_query_device`, `ibv_query_port` and
//! `ibv_query_gid`, and printed with `ibv_devinfo`'s field names, tabs and value formats, so
//! scripts written for `ibv_devinfo` read it unchanged. Fields `ibv_devinfo` prints that the
//! vrdma device does not report (`board_id`, `device_cap_flags`, the ODP and TSO capabilities,
//! counters) are left out rather than invented. The device has no firmware, so `fw_ver` is
//! `0.0.0`.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vrdma::transport::{PciOptions, VirtioPci, VirtioUserError};
use vrdma::{Context, DeviceAttr, PortAttr, SrqCaps};
use vrdma_proto::config::{AtomicCap, LinkLayer, Mtu, PortState};

const USAGE: &str = "\
Usage: vrdma-devinfo [--socket PATH | --pci] [-v] [-i PORT]
Print the attributes of a vrdma device, as ibv_devinfo does: the one behind a vhost-user socket,
or, inside a VM (as root), the VM's vrdma PCI device (1af4:106a).

Options:
  -s, --socket=PATH      the VM's vhost-user socket (vhost-user-rdma --vm ...,socket=PATH)
  -p, --pci              the first vrdma PCI device of this VM (needs root)
  -i, --ib-port=PORT     print only port PORT (default all ports)
  -v, --verbose          print all the attributes of the device
  -h, --help             print this help";

/// The device's name, as `ibv_get_device_name` would give it: one device per socket.
const HCA_ID: &str = "vrdma0";

/// Where the device is.
#[derive(Debug)]
enum Device {
    /// A vhost-user socket (virtio-user).
    Socket(PathBuf),
    /// The first vrdma PCI function of this (virtual) machine.
    Pci,
}

#[derive(Debug)]
struct Args {
    device: Device,
    port: Option<u8>,
    verbose: bool,
}

enum Parsed {
    Run(Args),
    Help,
}

fn parse(argv: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut argv = argv.peekable();
    let (mut socket, mut pci, mut port, mut verbose) = (None, false, None, false);
    while let Some(arg) = argv.next() {
        // `--opt=value` and `--opt value` (and `-s value`) as getopt_long accepts them.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| format!("option {name} needs {what}"))
        };
        match name.as_str() {
            "-s" | "--socket" => socket = Some(PathBuf::from(value("a socket path")?)),
            "-p" | "--pci" => pci = true,
            "-i" | "--ib-port" => {
                let v = value("a port number")?;
                port = match v.parse::<u8>() {
                    Ok(p) if p >= 1 => Some(p),
                    _ => return Err(format!("invalid port {v:?}: ports are numbered from 1")),
                };
            }
            "-v" | "--verbose" => verbose = true,
            "-h" | "--help" => return Ok(Parsed::Help),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let device = match (socket, pci) {
        (Some(_), true) => return Err("--socket and --pci exclude each other".into()),
        (Some(socket), false) => Device::Socket(socket),
        (None, true) => Device::Pci,
        (None, false) => {
            return Err(
                "--socket PATH (the VM's vhost-user socket) or --pci (inside the VM) is required"
                    .into(),
            );
        }
    };
    Ok(Parsed::Run(Args {
        device,
        port,
        verbose,
    }))
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vrdma-devinfo: {e} (see vrdma-devinfo --help)");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vrdma-devinfo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let ctx = match &args.device {
        Device::Socket(socket) => Context::open(socket).map_err(|e| open_failure(socket, &e))?,
        Device::Pci => {
            let transport = VirtioPci::open(PciOptions::default()).map_err(|e| {
                format!(
                    "cannot open the vrdma PCI device: {}",
                    vrdma::error_chain(&e)
                )
            })?;
            Context::from_transport(transport)
        }
    };
    let failed = |what: &str, e: vrdma::Error| format!("{what}: {}", vrdma::error_chain(&e));
    let dev = ctx
        .query_device()
        .map_err(|e| failed("cannot query the device", e))?;
    if let Some(port) = args.port.filter(|&p| p > dev.phys_port_cnt) {
        return Err(format!(
            "invalid port {port} requested: the device has {} port(s)",
            dev.phys_port_cnt
        ));
    }
    // Query everything before printing, so a failure prints one line and nothing else.
    let mut ports = Vec::new();
    for port in 1..=dev.phys_port_cnt {
        if args.port.is_some_and(|p| p != port) {
            continue;
        }
        let attr = ctx
            .query_port(port)
            .map_err(|e| failed(&format!("cannot query port {port}"), e))?;
        let mut gids = Vec::new();
        if args.verbose {
            for index in 0..u32::from(attr.gid_tbl_len.get()) {
                let gid = ctx
                    .query_gid(port, index)
                    .map_err(|e| failed(&format!("cannot query GID {index} of port {port}"), e))?;
                if !gid.is_zero() {
                    gids.push((index, gid));
                }
            }
        }
        ports.push((port, attr, gids));
    }
    print!("{}", format_device(&dev, &ctx.srq_caps(), args.verbose));
    for (port, attr, gids) in &ports {
        print!("{}", format_port(*port, attr, gids, args.verbose));
    }
    Ok(())
}

/// One line saying what failed and what to do about it.
fn open_failure(socket: &Path, err: &vrdma::Error) -> String {
    let path = socket.display();
    let hint = format!("is vhost-user-rdma running with --vm ...,socket={path}?");
    let transport =
        std::error::Error::source(err).and_then(|s| s.downcast_ref::<VirtioUserError>());
    match transport {
        // The socket is there but this user may not open it: the daemon runs, and asking
        // whether it does would send the operator the wrong way.
        Some(VirtioUserError::Connect { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            format!(
                "cannot open the vrdma device at {path}: this user may not open the socket; \
                 give it access with the daemon's --vm ...,socket={path},owner=USER,group=GROUP,mode=0660"
            )
        }
        Some(VirtioUserError::Connect { source, .. }) => {
            let why = match source.kind() {
                std::io::ErrorKind::NotFound => "no such socket".to_owned(),
                std::io::ErrorKind::ConnectionRefused => {
                    "nobody is listening on it (a socket left behind by a daemon that stopped?)"
                        .to_owned()
                }
                _ => source.to_string(),
            };
            format!("cannot open the vrdma device at {path}: {why}; {hint}")
        }
        Some(VirtioUserError::HandshakeTimeout { timeout, .. }) => format!(
            "cannot open the vrdma device at {path}: something accepted the connection but did \
             not answer the vhost-user handshake within {timeout:?}; {hint} The daemon serves \
             one guest per socket at a time: is another one connected?"
        ),
        Some(VirtioUserError::Handshake { step, .. }) => format!(
            "cannot open the vrdma device at {path}: the vhost-user {step} request failed or got \
             no answer (see the daemon's log); {hint}"
        ),
        _ => format!(
            "cannot open the vrdma device at {path}: {}",
            vrdma::error_chain(err)
        ),
    }
}

/// `ibv_devinfo`'s device section.
fn format_device(dev: &DeviceAttr, srq: &SrqCaps, verbose: bool) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("hca_id:\t{HCA_ID}"));
    // A RoCE device's transport is InfiniBand (IBV_TRANSPORT_IB = 0).
    line("\ttransport:\t\t\tInfiniBand (0)".into());
    line("\tfw_ver:\t\t\t\t0.0.0".into());
    line(format!("\tnode_guid:\t\t\t{}", guid(dev.node_guid.get())));
    line(format!(
        "\tsys_image_guid:\t\t\t{}",
        guid(dev.sys_image_guid.get())
    ));
    line(format!("\tvendor_id:\t\t\t0x{:04x}", dev.vendor_id.get()));
    line(format!(
        "\tvendor_part_id:\t\t\t{}",
        dev.vendor_part_id.get()
    ));
    line(format!("\thw_ver:\t\t\t\t0x{:X}", dev.hw_ver.get()));
    line(format!("\tphys_port_cnt:\t\t\t{}", dev.phys_port_cnt));
    if verbose {
        line(format!("\tmax_mr_size:\t\t\t0x{:x}", dev.max_mr_size.get()));
        line(format!(
            "\tpage_size_cap:\t\t\t0x{:x}",
            dev.page_size_cap.get()
        ));
        line(format!("\tmax_qp:\t\t\t\t{}", dev.max_qp.get()));
        line(format!("\tmax_qp_wr:\t\t\t{}", dev.max_qp_wr.get()));
        line(format!("\tmax_sge:\t\t\t{}", dev.max_sge.get()));
        line(format!("\tmax_cq:\t\t\t\t{}", dev.max_cq.get()));
        line(format!("\tmax_cqe:\t\t\t{}", dev.max_cqe.get()));
        line(format!("\tmax_mr:\t\t\t\t{}", dev.max_mr.get()));
        line(format!("\tmax_pd:\t\t\t\t{}", dev.max_pd.get()));
        line(format!(
            "\tmax_qp_rd_atom:\t\t\t{}",
            dev.max_qp_rd_atom.get()
        ));
        line(format!(
            "\tmax_qp_init_rd_atom:\t\t{}",
            dev.max_qp_init_rd_atom.get()
        ));
        line(format!(
            "\tatomic_cap:\t\t\t{} ({})",
            atomic_cap_str(dev.atomic_cap),
            dev.atomic_cap
        ));
        line(format!("\tmax_ah:\t\t\t\t{}", dev.max_ah.get()));
        line(format!("\tmax_srq:\t\t\t{}", srq.max_srq.get()));
        line(format!("\tmax_srq_wr:\t\t\t{}", srq.max_srq_wr.get()));
        line(format!("\tmax_srq_sge:\t\t\t{}", srq.max_srq_sge.get()));
    }
    out
}

/// `ibv_devinfo`'s section for one port, with its GID table when verbose.
fn format_port(
    port: u8,
    attr: &PortAttr,
    gids: &[(u32, vrdma_proto::Gid)],
    verbose: bool,
) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("\t\tport:\t{port}"));
    line(format!(
        "\t\t\tstate:\t\t\t{} ({})",
        port_state_str(attr.state),
        attr.state
    ));
    line(format!(
        "\t\t\tmax_mtu:\t\t{} ({})",
        mtu_str(attr.max_mtu),
        attr.max_mtu
    ));
    line(format!(
        "\t\t\tactive_mtu:\t\t{} ({})",
        mtu_str(attr.active_mtu),
        attr.active_mtu
    ));
    line(format!("\t\t\tsm_lid:\t\t\t{}", attr.sm_lid.get()));
    line(format!("\t\t\tport_lid:\t\t{}", attr.lid.get()));
    // No LMC on RoCE: the port has no LID to mask.
    line("\t\t\tport_lmc:\t\t0x00".into());
    line(format!(
        "\t\t\tlink_layer:\t\t{}",
        link_layer_str(attr.link_layer)
    ));
    if verbose {
        line(format!(
            "\t\t\tmax_msg_sz:\t\t0x{:x}",
            attr.max_msg_sz.get()
        ));
        line(format!(
            "\t\t\tport_cap_flags:\t\t0x{:08x}",
            attr.port_cap_flags.get()
        ));
        line(format!(
            "\t\t\tpkey_tbl_len:\t\t{}",
            attr.pkey_tbl_len.get()
        ));
        line(format!("\t\t\tgid_tbl_len:\t\t{}", attr.gid_tbl_len.get()));
        line(format!(
            "\t\t\tactive_width:\t\t{}X ({})",
            width_str(attr.active_width),
            attr.active_width
        ));
        line(format!(
            "\t\t\tactive_speed:\t\t{} ({})",
            speed_str(attr.active_speed),
            attr.active_speed
        ));
        line(format!(
            "\t\t\tphys_state:\t\t{} ({})",
            phys_state_str(attr.phys_state),
            attr.phys_state
        ));
        for (index, gid) in gids {
            // Every vrdma GID is RoCE v2, which ibv_devinfo prints with inet_ntop.
            line(format!(
                "\t\t\tGID[{index:3}]:\t\t{}, RoCE v2",
                Ipv6Addr::from(gid.0)
            ));
        }
    }
    line(String::new());
    out
}

fn guid(g: u64) -> String {
    format!(
        "{:04x}:{:04x}:{:04x}:{:04x}",
        (g >> 48) & 0xffff,
        (g >> 32) & 0xffff,
        (g >> 16) & 0xffff,
        g & 0xffff
    )
}

fn port_state_str(raw: u8) -> &'static str {
    match PortState::from_raw(raw) {
        Ok(PortState::Down) => "PORT_DOWN",
        Ok(PortState::Init) => "PORT_INIT",
        Ok(PortState::Armed) => "PORT_ARMED",
        Ok(PortState::Active) => "PORT_ACTIVE",
        _ => "invalid state",
    }
}

fn mtu_str(raw: u8) -> String {
    Mtu::from_raw(raw)
        .map(|m| m.bytes().to_string())
        .unwrap_or_else(|_| "invalid MTU".into())
}

fn link_layer_str(raw: u8) -> &'static str {
    match LinkLayer::from_raw(raw) {
        Ok(LinkLayer::Unspecified | LinkLayer::Infiniband) => "InfiniBand",
        Ok(LinkLayer::Ethernet) => "Ethernet",
        Err(_) => "Unknown",
    }
}

fn atomic_cap_str(raw: u8) -> &'static str {
    match AtomicCap::from_raw(raw) {
        Ok(AtomicCap::None) => "ATOMIC_NONE",
        Ok(AtomicCap::Hca) => "ATOMIC_HCA",
        Ok(AtomicCap::Glob) => "ATOMIC_GLOB",
        Err(_) => "invalid atomic capability",
    }
}

fn width_str(raw: u8) -> &'static str {
    match raw {
        1 => "1",
        2 => "4",
        4 => "8",
        8 => "12",
        16 => "2",
        _ => "invalid width",
    }
}

fn speed_str(raw: u8) -> &'static str {
    match raw {
        1 => "2.5 Gbps",
        2 => "5.0 Gbps",
        4 | 8 => "10.0 Gbps",
        16 => "14.0 Gbps",
        32 => "25.0 Gbps",
        64 => "50.0 Gbps",
        _ => "invalid speed",
    }
}

fn phys_state_str(raw: u8) -> &'static str {
    match raw {
        1 => "SLEEP",
        2 => "POLLING",
        3 => "DISABLED",
        4 => "PORT_CONFIGURATION TRAINNING",
        5 => "LINK_UP",
        6 => "LINK_ERROR_RECOVERY",
        7 => "PHY TEST",
        _ => "invalid physical state",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_failure(kind: std::io::ErrorKind) -> String {
        let err = vrdma::Error::Transport {
            verb: "ibv_open_device",
            source: Box::new(VirtioUserError::Connect {
                socket: "/run/vrdma/vm1.sock".into(),
                source: std::io::Error::from(kind),
            }),
        };
        open_failure(Path::new("/run/vrdma/vm1.sock"), &err)
    }

    /// A socket this user may not open names the daemon's access options instead of asking
    /// whether the daemon runs (tests run as root, whom no mode refuses, so the error is made
    /// here; tests/tools.rs covers the missing and stale sockets with the real program).
    #[test]
    fn permission_denied_points_at_owner_group_and_mode() {
        let denied = connect_failure(std::io::ErrorKind::PermissionDenied);
        assert!(
            denied.contains("owner=USER,group=GROUP,mode=0660") && !denied.contains("running"),
            "{denied}"
        );
        let missing = connect_failure(std::io::ErrorKind::NotFound);
        assert!(missing.contains("is vhost-user-rdma running"), "{missing}");
    }
}
