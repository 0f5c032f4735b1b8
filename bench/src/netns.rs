//! Two simulated hosts on this machine for the roce section: two network namespaces joined by
//! a veth pair, an address on each end. Made with iproute2 (`ip`), the commands an operator
//! would type, and deleted on drop, whatever happened in between.

use std::process::{Command, ExitStatus};

/// Why the hosts could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `ip` could not be started.
    #[error("cannot run `{command}`: {source}; install iproute2 (apt-get install iproute2)")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// `ip` refused.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// One simulated host: its namespace, its end of the veth pair, and its address on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The namespace, as `ip netns` names it.
    pub netns: String,
    /// Its interface.
    pub dev: String,
    /// Its address with the prefix length, e.g. 10.66.0.1/24.
    pub cidr: String,
}

impl Host {
    /// The address without the prefix length.
    pub fn addr(&self) -> &str {
        self.cidr.split_once('/').map_or(&self.cidr, |(a, _)| a)
    }
}

/// Two hosts joined by a veth pair; dropping it deletes the namespaces, and with them the pair.
#[derive(Debug)]
pub struct Hosts {
    /// The first host.
    pub a: Host,
    /// The second host.
    pub b: Host,
    /// The namespaces made so far, deleted on drop.
    made: Vec<String>,
}

/// The two hosts' names for `tag` (unique among live runs, such as the bench's PID): interface
/// names must fit in 15 bytes, so they are short; namespace names say whose they are.
pub fn hosts_named(tag: &str, cidrs: [&str; 2]) -> (Host, Host) {
    let host = |side: &str, cidr: &str| Host {
        netns: format!("vrdma-bench-{tag}-{side}"),
        dev: format!("vrb{tag}{side}"),
        cidr: cidr.to_owned(),
    };
    (host("a", cidrs[0]), host("b", cidrs[1]))
}

/// The `ip` commands (arguments after `ip`) that join two existing namespaces: the pair is
/// created straight into them (so its names never exist in this namespace), then each end
/// gets its address and MTU and comes up, and so does each loopback.
pub fn link_commands(a: &Host, b: &Host, mtu: u32) -> Vec<Vec<String>> {
    let words = |s: String| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let mut out = vec![words(format!(
        "link add {} netns {} type veth peer name {} netns {}",
        a.dev, a.netns, b.dev, b.netns
    ))];
    for h in [a, b] {
        out.push(words(format!(
            "-n {} addr add {} dev {}",
            h.netns, h.cidr, h.dev
        )));
        out.push(words(format!(
            "-n {} link set dev {} mtu {mtu} up",
            h.netns, h.dev
        )));
        out.push(words(format!("-n {} link set dev lo up", h.netns)));
    }
    out
}

impl Hosts {
    /// Makes two namespaces named after `tag`, joined by a veth pair of `mtu` bytes carrying
    /// `cidrs` (ADDRESS/PREFIX each). Needs root.
    pub fn create(tag: &str, cidrs: [&str; 2], mtu: u32) -> Result<Hosts, Error> {
        let (a, b) = hosts_named(tag, cidrs);
        let mut hosts = Hosts {
            a,
            b,
            made: Vec::new(),
        };
        for ns in [hosts.a.netns.clone(), hosts.b.netns.clone()] {
            ip(&["netns", "add", &ns])?;
            // Recorded at once, so a later failure still deletes it.
            hosts.made.push(ns);
        }
        for args in link_commands(&hosts.a, &hosts.b, mtu) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ip(&args)?;
        }
        Ok(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in self.made.drain(..).rev() {
            if let Err(e) = ip(&["netns", "delete", &ns]) {
                log::warn!("leaking network namespace {ns} (ip netns delete {ns}): {e}");
            }
        }
    }
}

/// Runs `ip ARGS` to completion.
fn ip(args: &[&str]) -> Result<(), Error> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interfaces_for_any_pid() {
        // Linux PIDs go up to 2^22 = 4194304: seven digits.
        let (a, b) = hosts_named("4194304", ["10.66.0.1/24", "10.66.0.2/24"]);
        assert!(a.dev.len() <= 15 && b.dev.len() <= 15, "{a:?} {b:?}");
        assert_ne!(a.dev, b.dev);
        assert_ne!(a.netns, b.netns);
        assert_eq!(a.netns, "vrdma-bench-4194304-a");
        assert_eq!((a.addr(), b.addr()), ("10.66.0.1", "10.66.0.2"));
        assert_eq!(b.cidr, "10.66.0.2/24");
    }

    #[test]
    fn both_ends_get_their_address_and_mtu() {
        let (a, b) = hosts_named("42", ["10.66.0.1/24", "10.66.0.2/24"]);
        let cmds: Vec<String> = link_commands(&a, &b, 9000)
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert_eq!(
            cmds[0],
            "link add vrb42a netns vrdma-bench-42-a type veth peer name vrb42b netns vrdma-bench-42-b"
        );
        for h in [&a, &b] {
            let ns = &h.netns;
            assert!(cmds.contains(&format!("-n {ns} addr add {} dev {}", h.cidr, h.dev)));
            assert!(cmds.contains(&format!("-n {ns} link set dev {} mtu 9000 up", h.dev)));
            assert!(cmds.contains(&format!("-n {ns} link set dev lo up")));
        }
        assert_eq!(cmds.len(), 7);
    }
}
