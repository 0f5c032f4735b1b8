//! Command line and the validated configuration it becomes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::Parser;
use vrdma_proto::Gid;
use vrdma_proto::config::Mtu;

/// vhost-user-rdma: the host side of the vrdma paravirtual RDMA device.
///
/// One process serves many VMs, each over its own vhost-user socket. It validates every
/// request a guest makes, keeps tenants apart, and shares the fabric between them by weight.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-rdma", version, about, long_about = None)]
pub struct Args {
    /// A VM to serve, as comma-separated key=value pairs. Repeat for more VMs.
    ///
    /// Keys: name (required), socket (required; the vhost-user socket path the VMM connects
    /// to), gid (IPv4 or IPv6 address of the VM's port; default 10.0.0.N for the Nth VM),
    /// weight (share of the fabric within its class, 1-1000; default 1), class (latency,
    /// normal or bulk: served in that order, each lower class keeping at least a tenth of the
    /// fabric while it has work; default normal), sl.0 to sl.15 (the class of the VM's RC
    /// QPs whose path has that service level, as RoCE networks map SL to a priority: at most
    /// the VM's own class, never above it; vm, the default, for the VM's class), max-qp,
    /// max-cq, max-mr, max-pd,
    /// max-ah, max-srq (object quotas), max-mr-bytes (bytes registered at once; suffixes K,
    /// M, G), max-bw (payload bytes per second; suffixes K, M, G), max-msg-rate (work
    /// requests per second), doorbells (doorbell queues, 1-64; default 1), incoming (on: the
    /// VM arrives by live migration, so with --roce its address is bound when its guest
    /// connects; default off), owner and group (user and group of the socket, names or
    /// numeric ids; default the daemon's), mode (the socket's permission bits in octal, such as
    /// 0660; default what the umask leaves). The socket's directory is made (0755) if missing.
    ///
    /// Example: --vm name=vm1,socket=/run/vrdma/vm1.sock,gid=10.0.0.1,weight=3,group=kvm,mode=0660
    #[arg(long = "vm", value_name = "KEY=VALUE,...")]
    pub vms: Vec<String>,

    /// Where the VMs' work goes: "soft" (built in; VMs on this host copy guest to guest) or
    /// "verbs:DEVICE[,port=N][,gid-index=N]" (a real RDMA NIC through libibverbs, its port N,
    /// default 1, and the GID at index N of that port, default 0; needs the `verbs` build
    /// feature; every VM's port then has the NIC's GID). On RoCE, pick the index of a RoCEv2
    /// GID (`show_gids` lists them).
    #[arg(
        long,
        default_value = "soft",
        value_name = "soft|verbs:DEVICE[,port=N][,gid-index=N]"
    )]
    pub fabric: String,

    /// Carry work to VMs on other hosts as RoCEv2 over UDP: binds the --roce-port on every
    /// VM's gid= address (each must be an address of this host). Without it, only VMs on this
    /// daemon can talk to each other.
    #[arg(long)]
    pub roce: bool,

    /// The port's active MTU with --roce (256, 512, 1024, 2048 or 4096): the path MTU
    /// applications choose, so a RoCEv2 packet of that payload plus 68 bytes of headers must
    /// fit the link (1024 on a 1500-byte Ethernet, as rxe reports; 4096 needs jumbo frames).
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    pub roce_mtu: u32,

    /// The UDP port of every daemon in the fabric; RoCEv2 peers (NICs, rxe) use 4791.
    #[arg(long, default_value_t = 4791, value_name = "PORT")]
    pub roce_port: u16,

    /// The DSCP (0-63) RoCEv2 packets carry for each priority class, so that switches can
    /// prioritise them too: "latency=N,normal=N,bulk=N", any of them (the rest keep their
    /// defaults: latency 46 (EF), normal 26 (AF31, the usual RoCE class), bulk 8 (CS1)).
    #[arg(long, default_value = "", value_name = "CLASS=DSCP,...")]
    pub dscp: String,

    /// Let a QP whose address gives a traffic class (the GRH's,
    /// `ibv_ah_attr.grh.traffic_class`) put that class's DSCP on its packets instead of its
    /// VM's class's, as RoCE NICs do. Off by default: a guest could then claim any priority
    /// on the network.
    #[arg(long)]
    pub guest_dscp: bool,

    /// Check the ICRC of IPv4 packets ("verify", assuming IP Identification 0 as Linux sends
    /// it) or not ("skip": needed for peers that vary the Identification, such as Linux rxe;
    /// the Ethernet FCS still protects the packet). IPv6 packets are always checked.
    #[arg(long, default_value = "verify", value_name = "verify|skip")]
    pub roce_ipv4_icrc: String,

    /// Print the backend capabilities JSON that QEMU's docs/interop/vhost-user.json defines
    /// for backend programs, and exit: {"type": "rdma"}, a type that schema does not list yet
    /// (it has no RDMA device), so a consumer that validates against it refuses it.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Check the fabric and exit, without serving VMs (no --vm needed): with verbs:DEVICE,
    /// open the NIC, print its port and GID, run an RDMA WRITE, READ, SEND and both atomics
    /// between two RC QPs of its own through the port, and a UD SEND from a UD QP to itself.
    /// Exits 0 if all passed, 2 if there is no such device, 1 if a step failed.
    #[arg(long)]
    pub check_fabric: bool,

    /// Serve the daemon's counters in Prometheus text format over HTTP on ADDR:PORT, at
    /// /metrics (for example 127.0.0.1:9464; port 0 picks a free one, which the log names).
    /// The metrics are listed in docs/operations.md.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,

    /// Serve the management socket at PATH, through which `vrdmactl` lists the VMs, adds and
    /// removes them, changes their weight, caps and quotas, drains them and resets their
    /// counters while the daemon runs. It is made with mode 0600 (the daemon user's alone),
    /// its directory too if missing. The systemd unit uses /run/vrdma/control/vrdmactl.sock, where
    /// vrdmactl looks by default.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Bound each step of a VM whose priority class is below another VM's to about this many
    /// microseconds of the scheduler's time (sized from the copy rate it measures), so that a
    /// higher class's message waits behind at most that much of it. 0, the default, leaves
    /// steps at up to 64 KiB (about 2 us of copying on a host that copies 30 GiB/s). A bound
    /// costs the lower classes throughput: docs/performance.md has what it measured.
    #[arg(long, default_value_t = 0.0, value_name = "MICROSECONDS")]
    pub step_time_us: f64,

    /// Log level: error, warn, info, debug or trace. RUST_LOG, if set, takes precedence.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: log::LevelFilter,
}

/// Why the command line was refused; each message names the option to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--metrics` is not an IP address and port.
    #[error("--metrics {0:?}: give an IP address and a TCP port, as 127.0.0.1:9464 or [::1]:9464")]
    Metrics(String),
    /// No `--vm` given.
    #[error("no VM to serve: give at least one --vm name=NAME,socket=PATH")]
    NoVm,
    /// A `--vm` entry is not `key=value`.
    #[error("--vm {entry:?}: {part:?} is not key=value")]
    NotKeyValue {
        /// The whole entry.
        entry: String,
        /// The offending part.
        part: String,
    },
    /// A key is unknown.
    #[error(
        "--vm {entry:?}: unknown key {key:?} (known: name, socket, gid, weight, class, sl.0 to sl.15, max-qp, max-cq, max-mr, max-pd, max-ah, max-srq, max-mr-bytes, max-bw, max-msg-rate, doorbells, incoming, owner, group, mode)"
    )]
    UnknownKey {
        /// The whole entry.
        entry: String,
        /// The key.
        key: String,
    },
    /// A required key is missing.
    #[error("--vm {entry:?}: missing {key}=")]
    Missing {
        /// The whole entry.
        entry: String,
        /// The key.
        key: &'static str,
    },
    /// A value does not parse or is out of range.
    #[error("--vm {entry:?}: {key}={value:?} is invalid: {reason}")]
    BadValue {
        /// The whole entry.
        entry: String,
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// What is expected.
        reason: &'static str,
    },
    /// Two VMs share a name, socket or GID.
    #[error("VMs {first:?} and {second:?} have the same {what}; each VM needs its own")]
    Duplicate {
        /// One VM.
        first: String,
        /// The other.
        second: String,
        /// What they share.
        what: &'static str,
    },
    /// The fabric is unknown or not built in.
    #[error("--fabric {0:?}: {1}")]
    Fabric(String, &'static str),
    /// `--roce-ipv4-icrc` is neither `verify` nor `skip`.
    #[error("--roce-ipv4-icrc {0:?}: give verify or skip")]
    Icrc(String),
    /// `--roce-mtu` is not an IB MTU.
    #[error("--roce-mtu {0}: give 256, 512, 1024, 2048 or 4096 (the payload of one packet)")]
    RoceMtu(u32),
    /// A key that cannot change while the VM runs (`vrdmactl set`).
    #[error(
        "{entry:?}: {key} cannot change while the VM runs; these can: {RUN_TIME_KEYS} (remove the VM and add it again to change the rest)"
    )]
    NotAtRunTime {
        /// The whole entry.
        entry: String,
        /// The key.
        key: String,
    },
    /// `vrdmactl set` with nothing to set.
    #[error("nothing to change: give key=value pairs, such as weight=3 or max-bw=1G")]
    NothingToSet,
    /// `--dscp` is not `CLASS=DSCP` pairs.
    #[error("--dscp {0:?}: give latency=N, normal=N and/or bulk=N, each DSCP from 0 to 63")]
    Dscp(String),
    /// `--step-time-us` out of range.
    #[error("--step-time-us {0}: give 0 (no bound) or 0.1 to 1000 microseconds")]
    StepTime(f64),
    /// `--roce-port 0`.
    #[error("--roce-port 0: give the UDP port the fabric's daemons share (4791 for RoCEv2)")]
    RocePort,
}

/// The default SRQ quota: applications share a few SRQs among many QPs, so far fewer are
/// needed than QPs.
fn default_max_srq() -> u32 {
    1024
}

/// Per-VM limits; the guest sees them as its device's capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quotas {
    /// Most QPs.
    pub max_qp: u32,
    /// Most CQs.
    pub max_cq: u32,
    /// Most MRs.
    pub max_mr: u32,
    /// Most PDs.
    pub max_pd: u32,
    /// Most AHs.
    pub max_ah: u32,
    /// Most shared receive queues.
    #[serde(default = "default_max_srq")]
    pub max_srq: u32,
    /// Most bytes registered at once.
    pub max_mr_bytes: u64,
    /// Most payload bytes per second the VM may move as requester; `None` for no limit.
    pub max_bw: Option<u64>,
    /// Most work requests per second the VM may complete as requester; `None` for no limit.
    pub max_msg_rate: Option<u64>,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_qp: 4096,
            max_cq: 4096,
            max_mr: 16384,
            max_pd: 1024,
            max_ah: 4096,
            max_srq: default_max_srq(),
            max_mr_bytes: 16 << 30,
            max_bw: None,
            max_msg_rate: None,
        }
    }
}

/// One VM, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Name used in logs and counters.
    pub name: String,
    /// The vhost-user socket path.
    pub socket: PathBuf,
    /// The GID of the VM's port.
    pub gid: Gid,
    /// Share of the fabric within its class.
    pub weight: u32,
    /// Its priority class.
    pub class: PriorityClass,
    /// The class its QPs on each service level take (`sl.N=`).
    pub sl_classes: SlClasses,
    /// Object quotas.
    pub quotas: Quotas,
    /// Doorbell queues offered.
    pub doorbell_queues: u16,
    /// The port's active MTU, what applications take as their path MTU: the largest RoCEv2
    /// packet payload that fits the link with `--roce`, 4096 without.
    pub active_mtu: Mtu,
    /// Whether the daemon runs the inter-host fabric (`--roce`).
    pub roce: bool,
    /// The VM arrives by live migration (`incoming=on`): with `--roce` its address is bound
    /// when its guest connects, not at start, as it may still be another host's (or another
    /// daemon's) until the switch-over.
    pub incoming: bool,
    /// QP numbers are the NIC's (the verbs fabric): a peer on another host puts them in its
    /// packets, so the VM's QPs are numbered by the NIC, not by the daemon's allocator.
    pub nic_qpns: bool,
    /// Who may open the VM's socket: set on it right after it is bound.
    pub socket_access: SocketAccess,
}

/// The owner, group and mode the VM's socket gets right after it is bound (`owner=`, `group=`,
/// `mode=`): a VMM running as another user than the daemon (QEMU as `libvirt-qemu`, say) can
/// only connect if the socket lets it, and the umask alone cannot say which user that is.
/// `None` leaves that part as binding made it: the daemon's user and group, and the mode the
/// umask leaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// The socket's owner (uid).
    pub owner: Option<u32>,
    /// The socket's group (gid).
    pub group: Option<u32>,
    /// The socket's permission bits (at most 0o777).
    pub mode: Option<u32>,
}

/// What of a VM an operator may change while it runs (`vrdmactl set`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunTime {
    /// Share of the fabric within its class.
    pub weight: u32,
    /// Priority class.
    pub class: PriorityClass,
    /// The class its QPs on each service level take.
    pub sl_classes: SlClasses,
    /// Object quotas and caps.
    pub quotas: Quotas,
}

impl Default for RunTime {
    fn default() -> Self {
        RunTime {
            weight: 1,
            class: PriorityClass::Normal,
            sl_classes: SlClasses::default(),
            quotas: Quotas::default(),
        }
    }
}

impl VmConfig {
    /// What this VM and `other` have in common that each VM needs its own of: the name, the
    /// socket, or (with `check_gid`) the GID.
    pub fn shares_with(&self, other: &VmConfig, check_gid: bool) -> Option<&'static str> {
        if self.name == other.name {
            Some("name")
        } else if self.socket == other.socket {
            Some("socket")
        } else if check_gid && self.gid == other.gid {
            Some("gid")
        } else {
            None
        }
    }

    /// What of the VM may change while it runs, as it stands.
    pub fn run_time(&self) -> RunTime {
        RunTime {
            weight: self.weight,
            class: self.class,
            sl_classes: self.sl_classes,
            quotas: self.quotas,
        }
    }
}

/// A VM's priority class (`class=`): the scheduler serves the classes in this order, strictly,
/// except that each class below the first keeps at least a tenth of the fabric while it has
/// work (docs/architecture.md, "Priority classes"). Weights share the fabric within a class.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum PriorityClass {
    /// Small messages that must not wait behind others' bulk transfers.
    Latency = 0,
    /// The default.
    #[default]
    Normal = 1,
    /// Transfers that may wait.
    Bulk = 2,
}

impl PriorityClass {
    /// Every class, highest priority first.
    pub const ALL: [PriorityClass; 3] = [
        PriorityClass::Latency,
        PriorityClass::Normal,
        PriorityClass::Bulk,
    ];

    /// Its name in `class=` and in the counters.
    pub fn name(self) -> &'static str {
        match self {
            PriorityClass::Latency => "latency",
            PriorityClass::Normal => "normal",
            PriorityClass::Bulk => "bulk",
        }
    }

    /// The class called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The class of index `raw` (its place in [`PriorityClass::ALL`]), or `Normal`.
    pub fn from_index(raw: u8) -> Self {
        Self::ALL
            .get(usize::from(raw))
            .copied()
            .unwrap_or(PriorityClass::Normal)
    }

    /// Its place in [`PriorityClass::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Service levels are 4 bits.
pub const SERVICE_LEVELS: usize = 16;

/// The priority class a VM's QPs take by the service level of their path (`sl.N=CLASS`), as
/// RoCE networks map SL to a priority: a VM's bulk transfers can run below its latency-bound
/// messages. A QP's class is the lower of its VM's class and its SL's, so an SL can put a QP
/// below its VM's class, never above it: the operator, not the tenant, decides how high a
/// VM's work may go. An SL given no class (the default, `sl.N=vm`) leaves its QPs in the VM's
/// class. RC QPs take the SL of the address they were connected with (`ibv_modify_qp` to
/// RTR); UD QPs, whose address comes with each work request, stay in the VM's class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SlClasses(pub [Option<PriorityClass>; SERVICE_LEVELS]);

impl SlClasses {
    /// The class SL `sl` puts its QPs in, if any (the SL's low 4 bits count).
    pub fn of(&self, sl: u8) -> Option<PriorityClass> {
        self.0[usize::from(sl) % SERVICE_LEVELS]
    }

    /// `sl.N=CLASS` for each SL that has a class, comma-separated, as `--vm` takes them; empty
    /// if none has.
    pub fn describe(&self) -> String {
        let pairs: Vec<String> = (0..SERVICE_LEVELS)
            .filter_map(|sl| Some(format!("sl.{sl}={}", self.0[sl]?.name())))
            .collect();
        pairs.join(",")
    }
}

/// Which fabric carries the VMs' work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FabricKind {
    /// The built-in software fabric.
    Soft,
    /// A libibverbs device.
    Verbs(VerbsNic),
}

impl FabricKind {
    /// Whether the fabric posts receives to a NIC ahead of arrival, so each post must reach
    /// it before the guest's `post_recv` returns: the device then offers `features::SYNC_RECV`
    /// (the driver sends `POST_RECV` after every post) and refuses a driver that does not
    /// accept it. The soft fabric reads receive rings when messages arrive.
    pub fn needs_sync_receives(&self) -> bool {
        matches!(self, FabricKind::Verbs(_))
    }
}

/// The NIC of the verbs fabric: `verbs:DEVICE[,port=N][,gid-index=N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerbsNic {
    /// The libibverbs device name (`ibv_devices`).
    pub device: String,
    /// Its port, from 1.
    pub port: u8,
    /// The index of the port's GID the fabric's QPs use.
    pub gid_index: u8,
}

impl std::fmt::Display for VerbsNic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "verbs:{},port={},gid-index={}",
            self.device, self.port, self.gid_index
        )
    }
}

/// The daemon's validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The VMs.
    pub vms: Vec<VmConfig>,
    /// The fabric.
    pub fabric: FabricKind,
    /// The inter-host fabric, if enabled.
    pub roce: Option<RoceSettings>,
    /// Where to serve Prometheus metrics (`--metrics`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Where to serve the management socket (`--control-socket`), if anywhere.
    pub control_socket: Option<PathBuf>,
    /// The bound on a lower class's steps (`--step-time-us`), if any.
    pub step_time: Option<std::time::Duration>,
}

/// How the RoCEv2 fabric between hosts is configured (`--roce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoceSettings {
    /// The UDP port of every daemon in the fabric (4791 in RoCEv2).
    pub port: u16,
    /// Check the ICRC of IPv4 packets assuming IP Identification 0, as Linux sends with an
    /// unconnected socket and DF set. Peers that vary it (rxe) need this off; see
    /// docs/fabric.md.
    pub ipv4_icrc: bool,
    /// The DSCP of each priority class's packets (`--dscp`).
    pub dscp: Dscp,
}

/// The ECN field of an ECN-capable packet (ECT(0)).
pub const ECN_ECT0: u8 = 0b10;

/// The ECN field of a packet a congested switch marked (CE).
pub const ECN_CE: u8 = 0b11;

/// The DSCP each priority class's RoCEv2 packets carry (`--dscp`), and whether a QP's own
/// traffic class may choose instead (`--guest-dscp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dscp {
    /// By `PriorityClass::index`.
    pub by_class: [u8; 3],
    /// A QP's traffic class, if it gives one, chooses its packets' DSCP.
    pub guest_chooses: bool,
}

impl Default for Dscp {
    /// Latency EF (46), normal AF31 (26, the class RoCE deployments commonly give RoCE
    /// traffic), bulk CS1 (8, lower effort); the guest does not choose.
    fn default() -> Self {
        Dscp {
            by_class: [46, 26, 8],
            guest_chooses: false,
        }
    }
}

impl Dscp {
    /// The IP TOS byte (IPv6 traffic class) of a packet of a QP of a VM in `class` whose
    /// address gives `traffic_class`: with `guest_chooses`, that traffic class's DSCP if it
    /// gives one, as RoCE NICs put the GRH's traffic class in the IP header; else the
    /// class's; and ECT(0), ECN-capable
    /// transport, so that a congested switch marks the packet rather than drops it (the
    /// receiver echoes the mark and the sender halves its window).
    pub fn tos(&self, class: PriorityClass, traffic_class: u8) -> u8 {
        let dscp = match traffic_class >> 2 {
            given if given != 0 && self.guest_chooses => given,
            _ => self.by_class[class.index()],
        };
        dscp << 2 | ECN_ECT0
    }
}

/// `--dscp`: `CLASS=DSCP` pairs, the classes not named keeping their defaults.
fn parse_dscp(s: &str) -> Result<Dscp, Error> {
    let mut dscp = Dscp::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let parsed = part.split_once('=').and_then(|(class, value)| {
            Some((PriorityClass::from_name(class)?, value.parse::<u8>().ok()?))
        });
        match parsed {
            Some((class, value)) if value < 64 => dscp.by_class[class.index()] = value,
            _ => return Err(Error::Dscp(s.to_owned())),
        }
    }
    Ok(dscp)
}

impl Config {
    /// Validates the command line.
    pub fn from_args(args: &Args) -> Result<Self, Error> {
        if args.vms.is_empty() {
            return Err(Error::NoVm);
        }
        let mut vms = args
            .vms
            .iter()
            .enumerate()
            .map(|(i, entry)| parse_vm(entry, i))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in vms.iter().enumerate() {
            for b in &vms[i + 1..] {
                if let Some(what) = a.shares_with(b, true) {
                    return Err(Error::Duplicate {
                        first: a.name.clone(),
                        second: b.name.clone(),
                        what,
                    });
                }
            }
        }
        let roce = if args.roce {
            if args.roce_port == 0 {
                return Err(Error::RocePort);
            }
            let ipv4_icrc = match args.roce_ipv4_icrc.as_str() {
                "verify" => true,
                "skip" => false,
                other => return Err(Error::Icrc(other.to_owned())),
            };
            Some(RoceSettings {
                port: args.roce_port,
                ipv4_icrc,
                dscp: Dscp {
                    guest_chooses: args.guest_dscp,
                    ..parse_dscp(&args.dscp)?
                },
            })
        } else {
            None
        };
        if roce.is_some() {
            let mtu = [
                Mtu::Mtu256,
                Mtu::Mtu512,
                Mtu::Mtu1024,
                Mtu::Mtu2048,
                Mtu::Mtu4096,
            ]
            .into_iter()
            .find(|m| m.bytes() == args.roce_mtu)
            .ok_or(Error::RoceMtu(args.roce_mtu))?;
            for vm in &mut vms {
                vm.active_mtu = mtu;
                vm.roce = true;
            }
        }
        let metrics = match &args.metrics {
            Some(m) => Some(m.parse().map_err(|_| Error::Metrics(m.clone()))?),
            None => None,
        };
        Ok(Config {
            vms,
            fabric: parse_fabric(&args.fabric)?,
            roce,
            metrics,
            control_socket: args.control_socket.clone(),
            step_time: match args.step_time_us {
                0.0 => None,
                t if t.is_finite() && (0.1..=1000.0).contains(&t) => {
                    Some(std::time::Duration::from_secs_f64(t / 1e6))
                }
                t => return Err(Error::StepTime(t)),
            },
        })
    }
}

/// The fabric `--fabric` names (what [`Config::from_args`] checks of it, alone).
pub fn parse_fabric(s: &str) -> Result<FabricKind, Error> {
    if s == "soft" {
        return Ok(FabricKind::Soft);
    }
    let Some(spec) = s.strip_prefix("verbs:") else {
        return Err(Error::Fabric(s.to_owned(), "expected soft or verbs:DEVICE"));
    };
    let mut parts = spec.split(',');
    let device = parts.next().unwrap_or_default();
    if device.is_empty() || device.contains('=') {
        return Err(Error::Fabric(
            s.to_owned(),
            "expected verbs:DEVICE[,port=N][,gid-index=N], the device first",
        ));
    }
    let mut nic = VerbsNic {
        device: device.to_owned(),
        port: 1,
        gid_index: 0,
    };
    for part in parts {
        let number = |v: &str, what| {
            v.parse::<u8>()
                .map_err(|_| Error::Fabric(s.to_owned(), what))
        };
        match part.split_once('=') {
            Some(("port", v)) => {
                nic.port = number(v, "port= takes a port number from 1 to 255")?;
                if nic.port == 0 {
                    return Err(Error::Fabric(s.to_owned(), "ports are numbered from 1"));
                }
            }
            Some(("gid-index", v)) => {
                nic.gid_index = number(v, "gid-index= takes a GID table index from 0 to 255")?;
            }
            _ => {
                return Err(Error::Fabric(
                    s.to_owned(),
                    "unknown option: verbs:DEVICE takes port=N and gid-index=N",
                ));
            }
        }
    }
    if cfg!(feature = "verbs") {
        Ok(FabricKind::Verbs(nic))
    } else {
        Err(Error::Fabric(
            s.to_owned(),
            "this build has no libibverbs support; rebuild with --features verbs",
        ))
    }
}

fn parse_vm(entry: &str, index: usize) -> Result<VmConfig, Error> {
    let bad = |key: &str, value: &str, reason| Error::BadValue {
        entry: entry.to_owned(),
        key: key.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let mut name = None;
    let mut socket = None;
    let mut gid = None;
    let mut run_time = RunTime::default();
    let mut doorbell_queues = 1;
    let mut incoming = false;
    let mut socket_access = SocketAccess::default();
    for part in entry.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').ok_or_else(|| Error::NotKeyValue {
            entry: entry.to_owned(),
            part: part.to_owned(),
        })?;
        if set_run_time(entry, key, value, &mut run_time)? {
            continue;
        }
        let count = |max: u32| -> Result<u32, Error> {
            match value.parse::<u32>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(bad(
                    key,
                    value,
                    "expected a whole number within the device's limits",
                )),
            }
        };
        match key {
            "name" if !value.is_empty() => name = Some(value.to_owned()),
            "name" => return Err(bad(key, value, "must not be empty")),
            "socket" if !value.is_empty() => socket = Some(PathBuf::from(value)),
            "socket" => return Err(bad(key, value, "must not be empty")),
            "gid" => {
                let ip: IpAddr = value
                    .parse()
                    .map_err(|_| bad(key, value, "expected an IPv4 or IPv6 address"))?;
                gid = Some(gid_of(ip));
            }
            "doorbells" => {
                doorbell_queues = count(vrdma_proto::queue::MAX_DOORBELL_QUEUES.into())? as u16
            }
            "incoming" => {
                incoming = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(bad(key, value, "expected on or off")),
                }
            }
            "owner" => {
                socket_access.owner = Some(user_id(value).ok_or_else(|| {
                    bad(
                        key,
                        value,
                        "no such user on this host: give a user name or a numeric uid",
                    )
                })?)
            }
            "group" => {
                socket_access.group = Some(group_id(value).ok_or_else(|| {
                    bad(
                        key,
                        value,
                        "no such group on this host: give a group name or a numeric gid",
                    )
                })?)
            }
            "mode" => {
                socket_access.mode = Some(parse_mode(value).ok_or_else(|| {
                    bad(
                        key,
                        value,
                        "expected octal permission bits such as 0660 (at most 0777)",
                    )
                })?)
            }
            _ => {
                return Err(Error::UnknownKey {
                    entry: entry.to_owned(),
                    key: key.to_owned(),
                });
            }
        }
    }
    let missing = |key| Error::Missing {
        entry: entry.to_owned(),
        key,
    };
    let default_gid = || {
        let n = u8::try_from(index + 1).unwrap_or(u8::MAX);
        gid_of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)))
    };
    Ok(VmConfig {
        name: name.ok_or_else(|| missing("name"))?,
        socket: socket.ok_or_else(|| missing("socket"))?,
        gid: gid.unwrap_or_else(default_gid),
        weight: run_time.weight,
        class: run_time.class,
        sl_classes: run_time.sl_classes,
        quotas: run_time.quotas,
        doorbell_queues,
        active_mtu: Mtu::Mtu4096,
        roce: false,
        incoming,
        nic_qpns: false,
        socket_access,
    })
}

/// The keys of a VM that an operator may change while it runs (`vrdmactl set`).
pub const RUN_TIME_KEYS: &str = "weight, class, sl.0 to sl.15, max-qp, max-cq, max-mr, max-pd, max-ah, max-srq, max-mr-bytes, max-bw, max-msg-rate";

/// Applies `entry`, comma-separated key=value pairs of [`RUN_TIME_KEYS`], to what a VM has
/// now (`vrdmactl set`): the keys mean what they mean in `--vm`, and max-bw and max-msg-rate
/// also take `none`, which lifts the cap.
pub fn apply_settings(entry: &str, now: RunTime) -> Result<RunTime, Error> {
    let mut run_time = now;
    let mut any = false;
    for part in entry.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').ok_or_else(|| Error::NotKeyValue {
            entry: entry.to_owned(),
            part: part.to_owned(),
        })?;
        match (key, value) {
            ("max-bw", "none") => run_time.quotas.max_bw = None,
            ("max-msg-rate", "none") => run_time.quotas.max_msg_rate = None,
            _ => {
                if !set_run_time(entry, key, value, &mut run_time)? {
                    let fixed = [
                        "name",
                        "socket",
                        "gid",
                        "doorbells",
                        "incoming",
                        "owner",
                        "group",
                        "mode",
                    ];
                    return Err(if fixed.contains(&key) {
                        Error::NotAtRunTime {
                            entry: entry.to_owned(),
                            key: key.to_owned(),
                        }
                    } else {
                        Error::UnknownKey {
                            entry: entry.to_owned(),
                            key: key.to_owned(),
                        }
                    });
                }
            }
        }
        any = true;
    }
    if !any {
        return Err(Error::NothingToSet);
    }
    Ok(run_time)
}

/// Parses one VM as `--vm` gives it, for a VM added while the daemon runs (`vrdmactl add`);
/// `index` is its place among the daemon's VMs, which picks its default GID.
pub fn parse_vm_entry(entry: &str, index: usize) -> Result<VmConfig, Error> {
    parse_vm(entry, index)
}

/// Sets the weight, class or quota `key` names from `value`; returns whether `key` is one of
/// them.
fn set_run_time(
    entry: &str,
    key: &str,
    value: &str,
    run_time: &mut RunTime,
) -> Result<bool, Error> {
    let RunTime {
        weight,
        class,
        sl_classes,
        quotas,
    } = run_time;
    let bad = |reason| Error::BadValue {
        entry: entry.to_owned(),
        key: key.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let count = |max: u32| -> Result<u32, Error> {
        match value.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(bad("expected a whole number within the device's limits")),
        }
    };
    if let Some(sl) = key.strip_prefix("sl.") {
        let sl = sl
            .parse::<usize>()
            .ok()
            .filter(|&sl| sl < SERVICE_LEVELS)
            .ok_or_else(|| bad("service levels are sl.0 to sl.15"))?;
        sl_classes.0[sl] = match value {
            "vm" => None,
            _ => Some(PriorityClass::from_name(value).ok_or_else(|| {
                bad("expected latency, normal or bulk, or vm for the VM's own class")
            })?),
        };
        return Ok(true);
    }
    match key {
        "weight" => *weight = count(1000)?,
        "class" => {
            *class = PriorityClass::from_name(value)
                .ok_or_else(|| bad("expected latency, normal or bulk"))?
        }
        "max-qp" => quotas.max_qp = count(crate::limits::MAX_QP)?,
        "max-cq" => quotas.max_cq = count(crate::limits::MAX_CQ)?,
        "max-mr" => quotas.max_mr = count(crate::limits::MAX_MR)?,
        "max-pd" => quotas.max_pd = count(crate::limits::MAX_PD)?,
        "max-ah" => quotas.max_ah = count(crate::limits::MAX_AH)?,
        "max-srq" => quotas.max_srq = count(crate::limits::MAX_SRQ)?,
        "max-mr-bytes" => {
            quotas.max_mr_bytes =
                parse_size(value).ok_or_else(|| bad("expected a size such as 512M or 4G"))?
        }
        "max-bw" => {
            quotas.max_bw = Some(
                parse_size(value)
                    .ok_or_else(|| bad("expected bytes per second such as 500M or 2G"))?,
            )
        }
        "max-msg-rate" => {
            quotas.max_msg_rate = Some(
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad("expected work requests per second, at least 1"))?,
            )
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// The uid of `value`: a number as it is (a uid need not have a passwd entry, as in a
/// container), else a user name looked up in the host's user database.
fn user_id(value: &str) -> Option<u32> {
    if let Ok(uid) = value.parse::<u32>() {
        return Some(uid);
    }
    let user = nix::unistd::User::from_name(value).ok()??;
    Some(user.uid.as_raw())
}

/// The gid of `value`: a number as it is, else a group name looked up in the host's group
/// database.
fn group_id(value: &str) -> Option<u32> {
    if let Ok(gid) = value.parse::<u32>() {
        return Some(gid);
    }
    let group = nix::unistd::Group::from_name(value).ok()??;
    Some(group.gid.as_raw())
}

/// Permission bits in octal (`0660`, `660`): only the nine rwx bits, as setuid, setgid and
/// sticky mean nothing on a socket and a typo there should not pass silently.
fn parse_mode(value: &str) -> Option<u32> {
    if value.is_empty() || value.len() > 4 {
        return None;
    }
    u32::from_str_radix(value, 8).ok().filter(|&m| m <= 0o777)
}

/// The RoCEv2 GID of an IP address. IPv4 addresses are IPv4-mapped, and an IPv4-mapped IPv6
/// address (`::ffff:a.b.c.d`, as a dual-stack socket reports an IPv4 peer) is the same port as
/// its IPv4 address: one GID, one host.
pub fn gid_of(ip: IpAddr) -> Gid {
    match ip {
        IpAddr::V4(v4) => Gid::from_ipv4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Gid::from_ipv4(v4.octets()),
            None => Gid(v6.octets()),
        },
    }
}

/// The IP address of a GID: IPv4-mapped GIDs are IPv4 addresses, the rest IPv6.
pub fn ip_of(gid: Gid) -> IpAddr {
    match gid.to_ipv4() {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(gid.0)),
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1 << shift).filter(|&v| v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--dscp` names classes' DSCPs (the rest keep theirs); with `--guest-dscp` a QP's
    /// traffic class, when it gives one, wins, as on a RoCE NIC; and every packet is
    /// ECN-capable, ECT(0).
    #[test]
    fn dscp_by_class_and_by_traffic_class() {
        let d = parse_dscp("bulk=4,latency=40").unwrap();
        assert_eq!(d.by_class, [40, 26, 4]);
        // A guest's traffic class chooses nothing unless the operator lets it.
        assert_eq!(d.tos(PriorityClass::Bulk, 46 << 2), 4 << 2 | ECN_ECT0);
        let d = Dscp {
            guest_chooses: true,
            ..d
        };
        assert_eq!(d.tos(PriorityClass::Latency, 0), 40 << 2 | ECN_ECT0);
        assert_eq!(
            d.tos(PriorityClass::Normal, 3),
            26 << 2 | ECN_ECT0,
            "ECN bits alone give no DSCP"
        );
        assert_eq!(d.tos(PriorityClass::Bulk, 34 << 2 | 1), 34 << 2 | ECN_ECT0);
        assert_eq!(parse_dscp("").unwrap(), Dscp::default());
        for bad in ["normal=64", "fast=1", "latency", "latency=x"] {
            assert!(matches!(parse_dscp(bad), Err(Error::Dscp(_))), "{bad}");
        }
    }

    fn args(vms: &[&str]) -> Args {
        let mut argv = vec!["vhost-user-rdma".to_owned()];
        for vm in vms {
            argv.push("--vm".into());
            argv.push((*vm).into());
        }
        Args::parse_from(argv)
    }

    #[test]
    fn parses_two_vms_with_defaults_and_overrides() {
        let cfg = Config::from_args(&args(&[
            "name=a,socket=/tmp/a.sock",
            "name=b,socket=/tmp/b.sock,gid=192.168.1.7,weight=3,max-qp=8,max-srq=3,max-mr-bytes=2G,doorbells=4,max-bw=100M,max-msg-rate=5000",
        ]))
        .unwrap();
        assert_eq!(cfg.vms[0].gid, Gid::from_ipv4([10, 0, 0, 1]));
        assert_eq!(cfg.vms[0].weight, 1);
        assert_eq!(cfg.vms[1].gid, Gid::from_ipv4([192, 168, 1, 7]));
        assert_eq!(cfg.vms[1].weight, 3);
        assert_eq!(cfg.vms[1].quotas.max_qp, 8);
        assert_eq!(cfg.vms[1].quotas.max_srq, 3);
        assert_eq!(cfg.vms[0].quotas.max_srq, 1024);
        assert_eq!(cfg.vms[1].quotas.max_mr_bytes, 2 << 30);
        assert_eq!(cfg.vms[1].doorbell_queues, 4);
        assert_eq!(cfg.vms[1].quotas.max_bw, Some(100 << 20));
        assert_eq!(cfg.vms[1].quotas.max_msg_rate, Some(5000));
        assert_eq!(cfg.vms[0].quotas.max_bw, None);
        assert_eq!(cfg.fabric, FabricKind::Soft);
    }

    /// `sl.N=CLASS` gives an SL a class, `sl.N=vm` takes it back, at start and at run time.
    #[test]
    fn service_levels_take_classes_at_start_and_at_run_time() {
        let cfg = Config::from_args(&args(&[
            "name=a,socket=/x,class=latency,sl.1=bulk,sl.15=normal",
        ]))
        .unwrap();
        let sl = cfg.vms[0].sl_classes;
        assert_eq!(sl.of(0), None);
        assert_eq!(sl.of(1), Some(PriorityClass::Bulk));
        assert_eq!(sl.of(15), Some(PriorityClass::Normal));
        assert_eq!(sl.describe(), "sl.1=bulk,sl.15=normal");
        let changed = apply_settings("sl.1=vm,sl.2=normal", cfg.vms[0].run_time()).unwrap();
        assert_eq!(changed.sl_classes.of(1), None);
        assert_eq!(changed.sl_classes.of(2), Some(PriorityClass::Normal));
        assert_eq!(changed.sl_classes.of(15), Some(PriorityClass::Normal));
        assert_eq!(changed.class, PriorityClass::Latency);
        assert_eq!(SlClasses::default().describe(), "");
    }

    #[test]
    fn rejects_bad_entries_with_the_key_named() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "no VM"),
            (&["name=a"], "missing socket"),
            (&["socket=/x"], "missing name"),
            (&["name=a,socket=/x,weight=0"], "weight=\"0\""),
            (&["name=a,socket=/x,colour=red"], "unknown key \"colour\""),
            (&["name=a,socket=/x,gid=banana"], "gid=\"banana\""),
            (&["name=a,socket=/x,junk"], "not key=value"),
            (&["name=a,socket=/x", "name=a,socket=/y"], "same name"),
            (&["name=a,socket=/x", "name=b,socket=/x"], "same socket"),
            (
                &[
                    "name=a,socket=/x,gid=10.0.0.9",
                    "name=b,socket=/y,gid=10.0.0.9",
                ],
                "same gid",
            ),
            (&["name=a,socket=/x,max-mr-bytes=lots"], "max-mr-bytes"),
            (&["name=a,socket=/x,max-msg-rate=0"], "max-msg-rate"),
            (&["name=a,socket=/x,max-bw=fast"], "max-bw"),
            (
                &["name=a,socket=/x,owner=nobody-here"],
                "owner=\"nobody-here\"",
            ),
            (&["name=a,socket=/x,group=nobody-here"], "no such group"),
            (&["name=a,socket=/x,mode=rw"], "octal"),
            (&["name=a,socket=/x,mode=1777"], "at most 0777"),
            (&["name=a,socket=/x,mode="], "mode=\"\""),
            (&["name=a,socket=/x,sl.16=bulk"], "sl.0 to sl.15"),
            (&["name=a,socket=/x,sl.x=bulk"], "sl.0 to sl.15"),
            (&["name=a,socket=/x,sl.1=slow"], "vm for the VM's own class"),
        ];
        for (vms, expected) in cases {
            let err = Config::from_args(&args(vms)).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{vms:?}: {err:?} should mention {expected:?}"
            );
        }
    }

    /// Users and groups by name (root is 0 on every host) or number, modes in octal with or
    /// without the leading 0; nothing given leaves the socket as binding made it.
    #[test]
    fn socket_owner_group_and_mode_take_names_numbers_and_octal() {
        let cfg = Config::from_args(&args(&[
            "name=a,socket=/x,owner=root,group=root,mode=0660",
            "name=b,socket=/y,owner=1234,group=5678,mode=600",
            "name=c,socket=/z",
        ]))
        .unwrap();
        let access = |i: usize| cfg.vms[i].socket_access;
        assert_eq!(
            access(0),
            SocketAccess {
                owner: Some(0),
                group: Some(0),
                mode: Some(0o660)
            }
        );
        assert_eq!(
            access(1),
            SocketAccess {
                owner: Some(1234),
                group: Some(5678),
                mode: Some(0o600)
            }
        );
        assert_eq!(access(2), SocketAccess::default());
    }

    #[test]
    fn the_roce_mtu_is_the_ports_active_mtu_and_only_with_roce() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["vhost-user-rdma", "--vm", "name=a,socket=/x"];
            argv.extend(extra);
            Config::from_args(&Args::parse_from(argv))
        };
        assert_eq!(parse(&[]).unwrap().vms[0].active_mtu, Mtu::Mtu4096);
        assert_eq!(parse(&["--roce"]).unwrap().vms[0].active_mtu, Mtu::Mtu1024);
        let cfg = parse(&["--roce", "--roce-mtu", "2048"]).unwrap();
        assert_eq!(cfg.vms[0].active_mtu, Mtu::Mtu2048);
        assert_eq!(cfg.roce.map(|r| r.port), Some(4791));
        let bad = parse(&["--roce", "--roce-mtu", "1500"]).unwrap_err();
        assert!(bad.to_string().contains("--roce-mtu 1500"), "{bad}");
        assert!(parse(&["--roce", "--roce-ipv4-icrc", "maybe"]).is_err());
        assert!(parse(&["--roce", "--roce-port", "0"]).is_err());
    }

    #[test]
    fn metrics_take_an_address_and_port() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["vhost-user-rdma", "--vm", "name=a,socket=/x"];
            argv.extend(extra);
            Config::from_args(&Args::parse_from(argv))
        };
        assert_eq!(parse(&[]).unwrap().metrics, None);
        let cfg = parse(&["--metrics", "127.0.0.1:9464"]).unwrap();
        assert_eq!(cfg.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(parse(&["--metrics", "[::1]:0"]).unwrap().metrics.is_some());
        for bad in ["9464", "localhost:9464", "127.0.0.1", "127.0.0.1:70000"] {
            let e = parse(&["--metrics", bad]).unwrap_err();
            assert!(e.to_string().contains("--metrics"), "{e}");
        }
    }

    #[test]
    fn gids_and_addresses_map_both_ways() {
        let v4 = Gid::from_ipv4([10, 1, 2, 3]);
        assert_eq!(ip_of(v4), IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(gid_of(ip_of(v4)), v4);
        let v6 = Gid([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(gid_of(ip_of(v6)), v6);
        // A dual-stack socket reports IPv4 peers as mapped IPv6.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
        assert_eq!(gid_of(mapped), v4);
    }

    /// An IPv4-mapped IPv6 address on the command line names the same port as its IPv4
    /// address: the same GID (so two VMs cannot both claim it), bound as IPv4.
    #[test]
    fn an_ipv4_mapped_gid_is_its_ipv4_address() {
        let mapped = Config::from_args(&args(&["name=a,socket=/x,gid=::ffff:10.0.0.9"])).unwrap();
        assert_eq!(mapped.vms[0].gid, Gid::from_ipv4([10, 0, 0, 9]));
        assert_eq!(
            ip_of(mapped.vms[0].gid),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9))
        );
        let clash = Config::from_args(&args(&[
            "name=a,socket=/x,gid=10.0.0.9",
            "name=b,socket=/y,gid=::ffff:10.0.0.9",
        ]))
        .unwrap_err();
        assert!(clash.to_string().contains("same gid"), "{clash}");
    }

    #[test]
    fn verbs_fabric_needs_the_feature() {
        let mut a = args(&["name=a,socket=/x"]);
        a.fabric = "verbs:mlx5_0".into();
        let r = Config::from_args(&a);
        if cfg!(feature = "verbs") {
            assert_eq!(
                r.unwrap().fabric,
                FabricKind::Verbs(VerbsNic {
                    device: "mlx5_0".into(),
                    port: 1,
                    gid_index: 0
                })
            );
        } else {
            assert!(r.unwrap_err().to_string().contains("--features verbs"));
        }
        a.fabric = "carrier-pigeon".into();
        assert!(Config::from_args(&a).is_err());
    }

    #[test]
    fn only_the_verbs_fabric_needs_sync_receives() {
        assert!(!FabricKind::Soft.needs_sync_receives());
        let nic = VerbsNic {
            device: "mlx5_0".into(),
            port: 1,
            gid_index: 0,
        };
        assert!(FabricKind::Verbs(nic).needs_sync_receives());
    }

    #[test]
    fn the_verbs_nic_takes_a_port_and_a_gid_index() {
        if cfg!(feature = "verbs") {
            assert_eq!(
                parse_fabric("verbs:mlx5_1,gid-index=3,port=2").unwrap(),
                FabricKind::Verbs(VerbsNic {
                    device: "mlx5_1".into(),
                    port: 2,
                    gid_index: 3
                })
            );
        }
        for (bad, says) in [
            ("verbs:", "the device first"),
            ("verbs:port=1", "the device first"),
            ("verbs:mlx5_0,port=0", "from 1"),
            ("verbs:mlx5_0,port=256", "port number"),
            ("verbs:mlx5_0,gid-index=x", "GID table index"),
            ("verbs:mlx5_0,speed=100", "unknown option"),
        ] {
            let e = parse_fabric(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
