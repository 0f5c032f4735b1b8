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
use crate::metrics::{self, MetricsServer, Sources, VmSource};
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
    /// The metrics endpoint (`--metrics`) could not start.
    #[error(transparent)]
    Metrics(#[from] metrics::Error),
    /// The NIC of `--fabric verbs:DEV` cannot be used.
    #[cfg(feature = "verbs")]
    #[error("cannot use the fabric's RDMA NIC")]
    Nic(#[source] crate::fabric::verbs::nic::Error),
    /// The verbs fabric was asked for together with `--roce`, which is the soft fabric's.
    #[error(
        "--roce is the soft fabric's link between hosts; with --fabric {0} the NIC carries \
         traffic between hosts itself: drop --roce"
    )]
    RoceWithNic(String),
    /// The fabric asked for is not in this build.
    #[error(
        "this vhost-user-rdma was built without the verbs fabric: rebuild with `--features \
         verbs` (needs libibverbs-dev) to use --fabric {0}"
    )]
    NotBuilt(String),
}

impl Error {
    /// Whether the host or the command line is at fault (no such NIC, port or GID) rather than
    /// the run: the program exits 2 for those, as for a bad option.
    pub fn is_configuration(&self) -> bool {
        #[cfg(feature = "verbs")]
        if let Error::Nic(e) = self {
            return e.is_configuration();
        }
        if let Error::Metrics(e) = self {
            return e.is_configuration();
        }
        matches!(self, Error::RoceWithNic(_) | Error::NotBuilt(_))
    }
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    servers: Vec<VmServer>,
    scheduler: Scheduler,
    network: Option<Arc<Network>>,
    metrics: Option<MetricsServer>,
}

impl Daemon {
    /// Starts the scheduler and listens on every VM's socket. If one VM cannot be served, the
    /// ones already started are stopped again.
    pub fn start(config: &Config) -> Result<Daemon, Error> {
        if let FabricKind::Verbs(spec) = &config.fabric {
            if config.roce.is_some() {
                return Err(Error::RoceWithNic(spec.to_string()));
            }
            #[cfg(feature = "verbs")]
            {
                let nic =
                    crate::fabric::verbs::nic::Nic::open(&spec.device, spec.port, spec.gid_index)
                        .map_err(Error::Nic)?;
                log::info!("fabric {spec}: {:?}", nic.port());
                // Every VM's port is the NIC's: its GID is what peers address, and its QP
                // numbers are the NIC's (docs/architecture.md, "Handles on the verbs fabric").
                let mut config = config.clone();
                let port = nic.port();
                for vm in &mut config.vms {
                    vm.gid = vrdma_proto::Gid(port.gid);
                    vm.nic_qpns = true;
                    if let Ok(mtu) = vrdma_proto::config::Mtu::from_raw(port.active_mtu_enum as u8)
                    {
                        vm.active_mtu = mtu;
                    }
                }
                return Self::serve(&config, None, move || {
                    Box::new(crate::fabric::verbs::VerbsFabric::new(nic)) as Box<dyn Fabric>
                });
            }
            // Refuse rather than quietly run the soft fabric under the operator's nose.
            #[cfg(not(feature = "verbs"))]
            return Err(Error::NotBuilt(spec.to_string()));
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
        Self::serve(config, network, move || {
            Box::new(SoftFabric::new(remote.map(RoceFabric::new))) as Box<dyn Fabric>
        })
    }

    /// Starts the scheduler on the fabric `make_fabric` makes and listens on every VM's
    /// socket.
    fn serve(
        config: &Config,
        network: Option<Arc<Network>>,
        make_fabric: impl FnOnce() -> Box<dyn Fabric> + Send + 'static,
    ) -> Result<Daemon, Error> {
        let scheduler = match Scheduler::start(make_fabric) {
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
        let sync_receives = config.fabric.needs_sync_receives();
        for vm in &config.vms {
            match VmServer::start(
                vm.clone(),
                vm.gid.node_guid(),
                scheduler.clone(),
                sync_receives,
            ) {
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
        let metrics = match config.metrics {
            Some(addr) => {
                let sources = Sources {
                    vms: servers
                        .iter()
                        .map(|s| VmSource {
                            name: s.name().to_owned(),
                            counters: s.counters().clone(),
                            connected: s.connected_flag(),
                        })
                        .collect(),
                    network: network.clone(),
                    scheduler: scheduler.stats().clone(),
                };
                match MetricsServer::start(addr, sources) {
                    Ok(m) => Some(m),
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
            None => None,
        };
        info!(
            "serving {} VM(s) on the {:?} fabric",
            servers.len(),
            config.fabric
        );
        Ok(Daemon {
            servers,
            scheduler,
            network,
            metrics,
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

    /// Where the metrics endpoint listens, if `--metrics` started one: the port it bound
    /// when port 0 was asked for.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// The RoCEv2 network between hosts, if `--roce` started one.
    pub fn roce(&self) -> Option<&Arc<Network>> {
        self.network.as_ref()
    }

    /// Logs every VM's counters and the inter-host fabric's, one line each (SIGUSR1).
    pub fn log_counters(&self) {
        for s in &self.servers {
            // The counters run on across guest connections.
            if !s.is_connected() {
                info!("vm {}: no guest connected", s.name());
            }
            let c = s.counters();
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
        if let Some(m) = self.metrics {
            m.stop();
        }
        for s in self.servers {
            s.stop(Duration::from_secs(5));
        }
        if let Some(n) = &self.network {
            n.stop();
        }
        info!("stopped");
    }
}
