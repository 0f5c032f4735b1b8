//! The daemon as a library: every VM's server and the scheduler, started and stopped together.
//! The binary's `main` and the demo use it, and integration tests run it in-process.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::info;

use crate::config::{self as config, Config, FabricKind, VmConfig};
use crate::fabric::Fabric;
use crate::fabric::roce::{self, Network, RoceFabric};
use crate::fabric::soft::SoftFabric;
use crate::metrics::{self, MetricsServer, Sources, VmSource};
use crate::sched::Scheduler;
use crate::vhost::listen::Listeners;
use crate::vhost::server::{self, VmServer, VmStatus};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The scheduler thread could not be started.
    #[error("cannot start the scheduler thread")]
    Scheduler(#[source] std::io::Error),
    /// A VM could not be served.
    #[error(transparent)]
    Server(#[from] server::Error),
    /// The loop watching the VMs' sockets could not start.
    #[error(transparent)]
    Listeners(#[from] crate::vhost::listen::Error),
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
    /// A command of the management socket names a VM the daemon does not serve.
    #[error("no VM called {0:?} is served here (`vrdmactl list` shows those that are)")]
    UnknownVm(String),
    /// A VM to add, or a change to a VM, is not valid.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// A VM cannot be added while the daemon runs the RoCEv2 fabric.
    #[error(
        "a VM cannot be added while the daemon runs with --roce (its addresses are bound at \
         start): add it to the daemon's --vm list and restart the daemon"
    )]
    AddWithRoce,
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
        matches!(
            self,
            Error::RoceWithNic(_)
                | Error::NotBuilt(_)
                | Error::Server(server::Error::SocketBusy(_))
        )
    }
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    servers: Vec<VmServer>,
    scheduler: Scheduler,
    network: Option<Arc<Network>>,
    metrics: Option<MetricsServer>,
    /// The loop watching the VMs' sockets.
    listeners: Arc<Listeners>,
    /// What the metrics read of each VM: changes as VMs are added and removed.
    vm_sources: Arc<Mutex<Vec<VmSource>>>,
    /// The fabric posts receives ahead of arrival (see `VmServer::start`).
    sync_receives: bool,
    /// On the verbs fabric, the NIC port's GID and active MTU, which every VM's port takes.
    nic_port: Option<(vrdma_proto::Gid, vrdma_proto::config::Mtu)>,
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
                let gid = vrdma_proto::Gid(port.gid);
                let mtu = vrdma_proto::config::Mtu::from_raw(port.active_mtu_enum as u8)
                    .unwrap_or(vrdma_proto::config::Mtu::Mtu4096);
                for vm in &mut config.vms {
                    on_nic_port(vm, gid, mtu);
                }
                let mut daemon = Self::serve(&config, None, move || {
                    Box::new(crate::fabric::verbs::VerbsFabric::new(nic)) as Box<dyn Fabric>
                })?;
                daemon.nic_port = Some((gid, mtu));
                return Ok(daemon);
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
        let scheduler = match Scheduler::start_with(make_fabric, config.step_time) {
            Ok(s) => s,
            Err(e) => {
                if let Some(n) = &network {
                    n.stop();
                }
                return Err(Error::Scheduler(e));
            }
        };
        if let Some(n) = &network {
            n.set_scheduler(scheduler.bell().clone());
        }
        // Undoes what was started when a later step fails.
        let abandon = |servers: Vec<VmServer>, listeners: Option<&Listeners>| {
            for s in servers {
                s.stop(Duration::from_secs(1));
            }
            if let Some(l) = listeners {
                l.stop();
            }
            if let Some(n) = &network {
                n.stop();
            }
        };
        let listeners = match Listeners::start() {
            Ok(l) => l,
            Err(e) => {
                abandon(Vec::new(), None);
                return Err(e.into());
            }
        };
        let mut servers = Vec::new();
        let sync_receives = config.fabric.needs_sync_receives();
        for vm in &config.vms {
            match VmServer::start(
                vm.clone(),
                vm.gid.node_guid(),
                scheduler.clone(),
                sync_receives,
                &listeners,
            ) {
                Ok(s) => servers.push(s),
                Err(e) => {
                    abandon(servers, Some(&listeners));
                    return Err(e.into());
                }
            }
        }
        let vm_sources = Arc::new(Mutex::new(servers.iter().map(source_of).collect()));
        let metrics = match config.metrics {
            Some(addr) => {
                let sources = Sources {
                    vms: vm_sources.clone(),
                    network: network.clone(),
                    scheduler: scheduler.stats().clone(),
                };
                match MetricsServer::start(addr, sources) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        abandon(servers, Some(&listeners));
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
            listeners,
            vm_sources,
            sync_receives,
            nic_port: None,
        })
    }

    /// Serves one more VM, given as `--vm` gives it (`vrdmactl add`): its socket is ready when
    /// this returns, and the VMs already served are not touched.
    pub fn add_vm(&mut self, entry: &str) -> Result<(), Error> {
        if self.network.is_some() {
            return Err(Error::AddWithRoce);
        }
        // A VM without gid= takes the first default address (10.0.0.N) no VM here has.
        let taken: Vec<vrdma_proto::Gid> = self.servers.iter().map(|s| s.config().gid).collect();
        let free = (0..usize::from(u8::MAX))
            .find(|&i| {
                let n = u8::try_from(i + 1).unwrap_or(u8::MAX);
                !taken.contains(&config::gid_of(std::net::IpAddr::from([10, 0, 0, n])))
            })
            .unwrap_or(self.servers.len());
        let mut vm = config::parse_vm_entry(entry, free)?;
        if let Some((gid, mtu)) = self.nic_port {
            on_nic_port(&mut vm, gid, mtu);
        }
        for s in &self.servers {
            let other = s.config();
            // On the NIC fabric every VM has the NIC's GID.
            if let Some(what) = other.shares_with(&vm, self.nic_port.is_none()) {
                return Err(config::Error::Duplicate {
                    first: other.name,
                    second: vm.name,
                    what,
                }
                .into());
            }
        }
        let server = VmServer::start(
            vm.clone(),
            vm.gid.node_guid(),
            self.scheduler.clone(),
            self.sync_receives,
            &self.listeners,
        )?;
        self.vm_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(source_of(&server));
        info!("vm {}: added", vm.name);
        self.servers.push(server);
        Ok(())
    }

    /// Stops serving VM `name` (`vrdmactl remove`): its guest, if connected, sees the device
    /// go away (its QPs' peers get errors, as when a host fails), its objects are released
    /// and its socket removed. Drain it first for its work in progress to finish.
    pub fn remove_vm(&mut self, name: &str) -> Result<(), Error> {
        let i = self.index_of(name)?;
        let server = self.servers.remove(i);
        self.vm_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|v| v.name != name);
        server.stop(Duration::from_secs(5));
        info!("vm {name}: removed");
        Ok(())
    }

    /// Changes VM `name`'s weight, class, caps or quotas (`vrdmactl set`; `settings` as
    /// `config::apply_settings` takes them), at once.
    pub fn set_vm(&self, name: &str, settings: &str) -> Result<(), Error> {
        let server = &self.servers[self.index_of(name)?];
        let current = server.config();
        server.set_run_time(config::apply_settings(settings, current.run_time())?);
        Ok(())
    }

    /// Starts or ends a drain of VM `name` (`vrdmactl drain`, `vrdmactl resume`).
    pub fn set_draining(&self, name: &str, draining: bool) -> Result<(), Error> {
        self.servers[self.index_of(name)?].set_draining(draining);
        Ok(())
    }

    /// Sets VM `name`'s counters to zero, or every VM's with `None` (`vrdmactl reset`).
    pub fn reset_counters(&self, name: Option<&str>) -> Result<(), Error> {
        match name {
            Some(n) => self.servers[self.index_of(n)?].counters().reset(),
            None => self.servers.iter().for_each(|s| s.counters().reset()),
        }
        info!("counters of {} reset", name.unwrap_or("every VM"));
        Ok(())
    }

    /// What an operator sees of every VM, or of VM `name` (`vrdmactl list`).
    pub fn status(&self, name: Option<&str>) -> Result<Vec<VmStatus>, Error> {
        match name {
            Some(n) => Ok(vec![self.servers[self.index_of(n)?].status()]),
            None => Ok(self.servers.iter().map(VmServer::status).collect()),
        }
    }

    fn index_of(&self, name: &str) -> Result<usize, Error> {
        self.servers
            .iter()
            .position(|s| s.name() == name)
            .ok_or_else(|| Error::UnknownVm(name.to_owned()))
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
        self.listeners.stop();
        if let Some(n) = &self.network {
            n.stop();
        }
        info!("stopped");
    }
}

/// What the metrics read of a VM's server.
fn source_of(server: &VmServer) -> VmSource {
    VmSource {
        name: server.name().to_owned(),
        counters: server.counters().clone(),
        connected: server.connected_flag(),
        share: server.share().clone(),
    }
}

/// Gives VM `vm` the verbs fabric's port: the NIC's GID, which peers address, and its MTU;
/// its QP numbers are the NIC's (docs/architecture.md, "Handles on the verbs fabric").
fn on_nic_port(vm: &mut VmConfig, gid: vrdma_proto::Gid, mtu: vrdma_proto::config::Mtu) {
    vm.gid = gid;
    vm.nic_qpns = true;
    vm.active_mtu = mtu;
}
