//! The daemon as a library: every VM's server and the scheduler, started and stopped together.
//! The binary's `main` and the demo use it, and integration tests run it in-process.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use log::info;

use crate::config::{Config, FabricKind};
use crate::fabric::Fabric;
use crate::fabric::roce::{self, Network, RoceFabric};
use crate::fabric::soft::SoftFabric;
use crate::sched::Scheduler;
use crate::vhost::server::{self, VmServer};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The scheduler thread could not be started.
    #[error("cannot start the scheduler thread")]
    Scheduler(#[source] std::io::Error),
    /// A VM could not be served.
    #[error(transparent)]
    Server(#[from] server::Error),
    /// The inter-host fabric could not start.
    #[error(transparent)]
    Roce(#[from] roce::Error),
    /// The NIC of `--fabric verbs:DEV` cannot be used.
    #[cfg(feature = "verbs")]
    #[error("cannot use the fabric's RDMA NIC")]
    Nic(#[source] crate::fabric::verbs::nic::Error),
    /// The fabric asked for cannot carry VMs' work in this version.
    #[error(
        "the {0} fabric opened its NIC, but carrying VMs' work over it is not built yet: use \
         --fabric soft (--check-fabric tests the NIC on its own)"
    )]
    FabricUnavailable(String),
}

impl Error {
    /// Whether the host or the command line is at fault (no such NIC, port or GID) rather than
    /// the run: the program exits 2 for those, as for a bad option.
    pub fn is_configuration(&self) -> bool {
        #[cfg(feature = "verbs")]
        if let Error::Nic(e) = self {
            return e.is_configuration();
        }
        false
    }
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    servers: Vec<VmServer>,
    scheduler: Scheduler,
    network: Option<Arc<Network>>,
}

impl Daemon {
    /// Starts the scheduler and listens on every VM's socket. If one VM cannot be served, the
    /// ones already started are stopped again.
    pub fn start(config: &Config) -> Result<Daemon, Error> {
        if let FabricKind::Verbs(spec) = &config.fabric {
            #[cfg(feature = "verbs")]
            {
                let nic =
                    crate::fabric::verbs::nic::Nic::open(&spec.device, spec.port, spec.gid_index)
                        .map_err(Error::Nic)?;
                log::info!("fabric {spec}: {:?}", nic.port());
            }
            // Refuse rather than quietly run the soft fabric under the operator's nose.
            return Err(Error::FabricUnavailable(spec.to_string()));
        }
        let network = match config.roce {
            Some(settings) => {
                let gids: Vec<_> = config
                    .vms
                    .iter()
                    .map(|v| (v.name.clone(), v.gid, v.incoming))
                    .collect();
                Some(Network::start(settings, &gids)?)
            }
            None => None,
        };
        let remote = network.clone();
        let scheduler = match Scheduler::start(move || {
            Box::new(SoftFabric::new(remote.map(RoceFabric::new))) as Box<dyn Fabric>
        }) {
            Ok(s) => s,
            Err(e) => {
                if let Some(n) = &network {
                    n.stop();
                }
                return Err(Error::Scheduler(e));
            }
        };
        if let Some(n) = &network {
            n.set_scheduler(scheduler.thread().clone());
        }
        let mut servers = Vec::new();
        for vm in &config.vms {
            match VmServer::start(vm.clone(), vm.gid.node_guid(), scheduler.clone()) {
                Ok(s) => servers.push(s),
                Err(e) => {
                    for s in servers {
                        s.stop(Duration::from_secs(1));
                    }
                    if let Some(n) = &network {
                        n.stop();
                    }
                    return Err(e.into());
                }
            }
        }
        info!(
            "serving {} VM(s) on the {:?} fabric",
            servers.len(),
            config.fabric
        );
        Ok(Daemon {
            servers,
            scheduler,
            network,
        })
    }

    /// The server of the VM called `name`.
    pub fn server(&self, name: &str) -> Option<&VmServer> {
        self.servers.iter().find(|s| s.name() == name)
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The RoCEv2 network between hosts, if `--roce` started one.
    pub fn roce(&self) -> Option<&Arc<Network>> {
        self.network.as_ref()
    }

    /// Logs every VM's counters and the inter-host fabric's, one line each (SIGUSR1).
    pub fn log_counters(&self) {
        for s in &self.servers {
            let Some(device) = s.device() else {
                info!("vm {}: no guest connected", s.name());
                continue;
            };
            let c = &device.vm().counters;
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            info!(
                "vm {}: wrs {} bytes {} completions {} errors {} doorbells {} polled-doorbells {} malformed-doorbells {} ud-dropped {} events-lost {} commands {} failed-commands {} waited-ms {}",
                s.name(),
                load(&c.wrs),
                load(&c.bytes),
                load(&c.completions),
                load(&c.errors),
                load(&c.doorbells),
                load(&c.doorbells_polled),
                load(&c.doorbells_malformed),
                load(&c.ud_dropped),
                load(&c.events_lost),
                load(&c.commands_ok),
                load(&c.commands_failed),
                load(&c.wait_ns) / 1_000_000,
            );
        }
        if let Some(n) = &self.network {
            n.log_counters();
        }
    }

    /// Disconnects every VM, releases their objects and removes the sockets.
    pub fn stop(self) {
        for s in self.servers {
            s.stop(Duration::from_secs(5));
        }
        if let Some(n) = &self.network {
            n.stop();
        }
        info!("stopped");
    }
}
