//! Network namespaces for vrdma's multi-host tests and the bench's cross-host section: each
//! simulated host is a namespace with its own interfaces, addresses and routes, so daemons on
//! one machine talk over real IP paths.
//!
//! Everything here shells out to iproute2 (`ip`) rather than speaking netlink: the commands are
//! the same ones an operator would type to reproduce a failing topology by hand, and they show
//! up verbatim in error messages.

use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

/// Why a namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `ip` could not be started at all.
    #[error("cannot run `{command}`: {source}; install iproute2 (apt-get install iproute2)")]
    Spawn {
        /// The command line.
        command: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// `ip` ran and reported an error.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The namespace's handle in /run/netns could not be opened.
    #[error("cannot open {}: {source}; does namespace `{name}` exist (`ip netns list`)?", path.display())]
    Open {
        /// The namespace.
        name: String,
        /// Its handle.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// setns(2) refused.
    #[error("cannot enter namespace `{name}`: {source}; entering a namespace needs root")]
    Enter {
        /// The namespace.
        name: String,
        /// What the kernel said.
        source: nix::Error,
    },
    /// A sysctl inside a namespace could not be written.
    #[error("cannot set {} in namespace `{name}`: {source}", path.display())]
    Sysctl {
        /// The namespace.
        name: String,
        /// The /proc/sys file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// An address argument was not `ADDRESS/PREFIX`.
    #[error("`{0}` is not an address with a prefix length, such as 10.0.0.1/24 or fd00::1/64")]
    BadCidr(String),
}

/// Whether this process can create namespaces, with the reason when it cannot.
pub fn available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("network namespaces need root; run the tests as root (CI does)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("`ip -V` failed ({})", out.status)),
        Err(e) => Err(format!(
            "cannot run `ip`: {e}; install iproute2 (apt-get install iproute2)"
        )),
    }
}

/// Whether a namespace test should run: false (after printing why) when not root, the one
/// case where skipping is legitimate. As root, anything else missing fails the test, because
/// CI runs as root and a silently skipped multi-host test would hide a broken set-up.
pub fn can_run_or_skip(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping {test}: network namespaces need root");
        return false;
    }
    if let Err(why) = available() {
        panic!("{test}: running as root but namespaces are unusable: {why}");
    }
    true
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name unique among this process's live objects, short enough for an interface name (15
/// bytes) when `prefix` has at most 2 bytes and one suffix byte is added: pids are at most 6 hex
/// digits, and the counter wraps at 4 digits since no test holds 65536 links at once.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}{:x}x{:x}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed) % 0x10000
    )
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion; its stdout on success, its stderr in the error otherwise.
pub fn run_command(mut cmd: Command) -> Result<String, NetnsError> {
    let command = command_line(&cmd);
    log::debug!("running {command}");
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().map_err(|source| NetnsError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !status.success() {
        return Err(NetnsError::Failed {
            command,
            status,
            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run_command(cmd)
}

/// A network namespace that exists as long as this value does.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `prefix` plus a unique suffix, with `lo` up (without it even
    /// local connections fail, which makes for confusing test failures).
    pub fn new(prefix: &str) -> Result<Netns, NetnsError> {
        let name = format!("{prefix}-{}", unique_name(""));
        ip(&["netns", "add", &name])?;
        // Constructed before `lo` comes up so a failure there still deletes the namespace.
        let ns = Netns { name };
        ns.run(&["link", "set", "dev", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace; add arguments and spawn it.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `ip ARGS` inside the namespace and returns its stdout.
    pub fn run(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        run_command(cmd)
    }

    /// Writes `value` to `/proc/sys/KEY` as seen from inside the namespace (for example
    /// `net/ipv4/conf/all/rp_filter`). Net sysctls are per namespace, resolved by the namespace
    /// of the thread that opens the file.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        let path = PathBuf::from("/proc/sys").join(key);
        let written = run_in_named_netns(&self.name, || std::fs::write(&path, value))?;
        written.map_err(|source| NetnsError::Sysctl {
            name: self.name.clone(),
            path,
            source,
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            log::warn!("leaking network namespace: {e}");
        }
    }
}

/// Runs `f` on a thread that has entered `ns` and returns its result. Sockets (and TUN devices)
/// stay in the namespace they were created in, so a socket made here can be used from any
/// thread afterwards. Panics if the namespace cannot be entered; a panic in `f` is passed on.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    match run_in_named_netns(ns.name(), f) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// [`in_netns`] for a namespace known only by name (as `ip netns` lists it), reporting failure
/// to enter it as an error.
pub fn run_in_named_netns<T: Send>(
    name: &str,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    let path = PathBuf::from("/run/netns").join(name);
    let handle = File::open(&path).map_err(|source| NetnsError::Open {
        name: name.to_owned(),
        path,
        source,
    })?;
    // A fresh thread, because setns changes the namespace of the calling thread for good and the
    // caller's thread must stay where it is.
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            setns(&handle, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                name: name.to_owned(),
                source,
            })?;
            Ok(f())
        });
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// An address with its prefix length, as `ip addr add` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.1/24` or `fd00::1/64`.
    pub fn parse(text: &str) -> Result<Cidr, NetnsError> {
        let bad = || NetnsError::BadCidr(text.to_owned());
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }

    /// The network this address is in, as `ip route` takes it (`10.0.0.0/24`).
    pub fn network(&self) -> String {
        let net = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from((u32::from(a) & mask).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from((u128::from(a) & mask).to_be_bytes())
            }
        };
        format!("{net}/{}", self.prefix)
    }

    /// The arguments of `ip addr add` after the address: IPv6 addresses skip duplicate address
    /// detection, which would otherwise leave them unusable (tentative) for a second or more.
    pub fn add_args(&self) -> Vec<String> {
        let mut args = vec![format!("{}/{}", self.addr, self.prefix)];
        if self.addr.is_ipv6() {
            args.push("nodad".into());
        }
        args
    }
}

/// Adds `addrs` to `dev` in `ns`.
pub fn add_addresses(ns: &Netns, dev: &str, addrs: &[Cidr]) -> Result<(), NetnsError> {
    for cidr in addrs {
        let mut args = vec!["addr", "add"];
        let extra = cidr.add_args();
        args.extend(extra.iter().map(String::as_str));
        args.extend(["dev", dev]);
        ns.run(&args)?;
    }
    Ok(())
}

fn parse_all(addrs: &[&str]) -> Result<Vec<Cidr>, NetnsError> {
    addrs.iter().map(|a| Cidr::parse(a)).collect()
}

/// Connects `a` and `b` with a veth pair carrying `a_addrs` and `b_addrs` (`ADDRESS/PREFIX`) and
/// the given MTU, both ends up. Returns the device names in `a` and in `b`. The pair goes away
/// with either namespace.
pub fn veth(
    a: &Netns,
    a_addrs: &[&str],
    b: &Netns,
    b_addrs: &[&str],
    mtu: u32,
) -> Result<(String, String), NetnsError> {
    let (a_cidrs, b_cidrs) = (parse_all(a_addrs)?, parse_all(b_addrs)?);
    let base = unique_name("ve");
    let (dev_a, dev_b) = (format!("{base}a"), format!("{base}b"));
    // Created straight into the namespaces, so the names never exist in (or clash with) the
    // namespace the tests run in.
    ip(&[
        "link",
        "add",
        &dev_a,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &dev_b,
        "netns",
        b.name(),
    ])?;
    let mtu = mtu.to_string();
    for (ns, dev, cidrs) in [(a, &dev_a, &a_cidrs), (b, &dev_b, &b_cidrs)] {
        add_addresses(ns, dev, cidrs)?;
        ns.run(&["link", "set", "dev", dev, "mtu", &mtu, "up"])?;
    }
    Ok((dev_a, dev_b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_network_masks_host_bits() {
        assert_eq!(Cidr::parse("10.1.2.3/24").unwrap().network(), "10.1.2.0/24");
        assert_eq!(Cidr::parse("10.1.2.3/0").unwrap().network(), "0.0.0.0/0");
        assert_eq!(Cidr::parse("10.1.2.3/32").unwrap().network(), "10.1.2.3/32");
        assert_eq!(
            Cidr::parse("fd00:1:2::7/64").unwrap().network(),
            "fd00:1:2::/64"
        );
    }

    #[test]
    fn cidr_rejects_what_ip_would_reject() {
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "fd00::1/129",
            "host/24",
            "10.0.0.1/x",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn unique_names_fit_interface_names() {
        let name = format!("{}a", unique_name("ch"));
        assert!(name.len() <= 15, "{name} is too long for an interface");
        assert_ne!(unique_name("ch"), unique_name("ch"));
    }
}
