//! Where a service runs. Everything above this seam (fault windows,
//! steps, proxies, assertions, the trace) is the same code whatever the
//! backend; a backend only starts a service, says where its interfaces
//! are, hands over its shim session when it has one, and stops it.
//!
//! - [`Process`]: a local binary under `faultbox-shim` (binary mode);
//! - [`Remote`]: something already running elsewhere (`remote=`): nothing
//!   is started, and its interfaces are only proxied.
//!
//! A Docker backend (a container whose entrypoint is the shim) and a
//! Kubernetes one (a pod under the shim, created by the runner) are
//! further implementations of [`Backend`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use faultbox_agent::wire::{Isolation, LaunchSpec, OnDisconnect};
use faultbox_proxy::net;
use faultbox_spec::model::{InterfaceDef, ServiceDef};

use crate::shim::{ExitInfo, Shim, ShimEvent};

/// What a backend needs to start one service for one test.
pub struct Launch<'a> {
    pub def: &'a ServiceDef,
    /// The spec's environment for it, addresses already pointed at the
    /// proxies; wins over any inherited environment.
    pub env: BTreeMap<String, String>,
    /// Where its output goes.
    pub log: PathBuf,
    /// The spec's directory (relative binaries resolve against it).
    pub spec_dir: &'a Path,
    /// The syscalls its seccomp filter intercepts.
    pub intercept: &'a [String],
    /// Its seed, derived from the run's.
    pub seed: u64,
    /// The shim's `faultbox-shim` binary and the stop grace.
    pub shim: &'a Path,
    pub stop_grace: Duration,
    /// Where its syscall events and its exit go.
    pub on_event: Box<dyn Fn(ShimEvent) + Send>,
}

/// Starts services of one kind.
pub trait Backend: Send + Sync {
    /// Starts the service (or attaches to it); a failure says why, naming
    /// the service.
    fn start(&self, launch: Launch<'_>) -> Result<Box<dyn Instance>, String>;
}

/// One started service.
pub trait Instance: Send + Sync {
    /// The fields of its `service_started` event (`pid`, `remote`).
    fn started(&self) -> Vec<(&'static str, String)>;

    /// Where the proxy in front of `iface` relays to.
    fn endpoint(&self, iface: &InterfaceDef) -> Result<SocketAddr, String>;

    /// The shim session, when syscall faults can reach the service.
    fn shim(&self) -> Option<&Shim>;

    /// How it ended, once it has.
    fn exited(&self) -> Option<ExitInfo> {
        self.shim().and_then(Shim::exited)
    }

    /// Stops it (SIGTERM, SIGKILL after `grace`) and waits for its
    /// interfaces' ports to be free; returns those still taken.
    fn stop(self: Box<Self>, grace: Duration) -> Vec<String>;
}

/// A local binary under `faultbox-shim`.
pub struct Process;

struct ProcessInstance {
    shim: Option<Shim>,
    name: String,
    interfaces: Vec<InterfaceDef>,
}

impl Backend for Process {
    fn start(&self, launch: Launch<'_>) -> Result<Box<dyn Instance>, String> {
        let def = launch.def;
        let program = crate::runtime::resolve_binary(&def.binary, launch.spec_dir)
            .map_err(|e| format!("service {:?}: {e}", def.name))?;
        for iface in &def.interfaces {
            if port_open(iface.port, Duration::from_millis(200)) {
                return Err(format!(
                    "port {} of {}.{} is already in use by another process (stop it, or declare another port)",
                    iface.port, def.name, iface.name
                ));
            }
        }
        let mut env: BTreeMap<String, String> = std::env::vars().collect();
        env.extend(launch.env);
        let program_text = program.to_string_lossy().into_owned();
        let mut argv = vec![program_text.clone()];
        argv.extend(def.args.iter().cloned());
        let spec = LaunchSpec {
            program: program_text,
            argv,
            env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: None,
            intercept: launch.intercept.to_vec(),
            rules: Vec::new(),
            seed: launch.seed,
            // Services must reach each other and be reached by steps, so
            // they keep the host network.
            isolation: Isolation {
                namespaces: true,
                network: false,
            },
            on_disconnect: OnDisconnect::StopTarget,
            stop_grace_ms: launch.stop_grace.as_millis() as u64,
            user: def.user.clone(),
        };
        let shim = Shim::launch(launch.shim, spec, Some(&launch.log), launch.on_event)
            .map_err(|e| format!("service {:?} did not start: {}", def.name, e.message))?;
        Ok(Box::new(ProcessInstance {
            shim: Some(shim),
            name: def.name.clone(),
            interfaces: def.interfaces.clone(),
        }))
    }
}

impl Instance for ProcessInstance {
    fn started(&self) -> Vec<(&'static str, String)> {
        self.shim
            .as_ref()
            .map(|s| vec![("pid", s.pid.to_string())])
            .unwrap_or_default()
    }

    fn endpoint(&self, iface: &InterfaceDef) -> Result<SocketAddr, String> {
        Ok(SocketAddr::from(([127, 0, 0, 1], iface.port)))
    }

    fn shim(&self) -> Option<&Shim> {
        self.shim.as_ref()
    }

    fn stop(mut self: Box<Self>, grace: Duration) -> Vec<String> {
        if let Some(shim) = self.shim.take() {
            shim.stop(grace);
        }
        let mut busy = Vec::new();
        for iface in &self.interfaces {
            let deadline = Instant::now() + Duration::from_secs(5);
            while port_open(iface.port, Duration::from_millis(100)) {
                if Instant::now() > deadline {
                    busy.push(format!(
                        "{}.{} (port {})",
                        self.name, iface.name, iface.port
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        busy
    }
}

/// A service already running elsewhere.
pub struct Remote;

struct RemoteInstance {
    name: String,
    upstreams: BTreeMap<String, String>,
}

impl Backend for Remote {
    fn start(&self, launch: Launch<'_>) -> Result<Box<dyn Instance>, String> {
        Ok(Box::new(RemoteInstance {
            name: launch.def.name.clone(),
            upstreams: launch.def.remote.clone(),
        }))
    }
}

impl Instance for RemoteInstance {
    fn started(&self) -> Vec<(&'static str, String)> {
        let targets: Vec<String> = self.upstreams.values().cloned().collect();
        vec![("remote", targets.join(","))]
    }

    fn endpoint(&self, iface: &InterfaceDef) -> Result<SocketAddr, String> {
        let addr = self
            .upstreams
            .get(&iface.name)
            .ok_or_else(|| format!("{}.{}: no remote address declared", self.name, iface.name))?;
        net::resolve(addr)
            .ok()
            .and_then(|a| a.first().copied())
            .ok_or_else(|| {
                format!(
                    "{}.{}: remote address {addr} does not resolve",
                    self.name, iface.name
                )
            })
    }

    fn shim(&self) -> Option<&Shim> {
        None
    }

    fn stop(self: Box<Self>, _grace: Duration) -> Vec<String> {
        Vec::new()
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    std::net::TcpStream::connect_timeout(&addr, timeout).is_ok()
}
