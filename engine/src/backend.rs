//! Where a service runs. Everything above this seam (fault windows,
//! steps, proxies, assertions, the trace) is the same code whatever the
//! backend; a backend only starts a service, says where its interfaces
//! are, hands over its shim session when it has one, and stops it.
//!
//! - [`Process`]: a local binary under `faultbox-shim` (binary mode);
//! - [`Remote`]: something already running elsewhere (`remote=`): nothing
//!   is started, and its interfaces are only proxied.
//!
//! - [`crate::docker::Docker`]: a container whose entrypoint is the shim
//!   (container mode).
//!
//! - [`crate::kubernetes::Cluster`]: a pod whose command is the shim,
//!   created by a FaultTest's runner (cluster mode).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use faultbox_agent::wire::{Isolation, LaunchSpec, OnDisconnect};
use faultbox_proxy::net;
use faultbox_spec::model::{InterfaceDef, ServiceDef};

use crate::shim::{ExitInfo, Shim, ShimError, ShimEvent};

/// Why a backend could not start a service or say where it is.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The service's program cannot be run.
    #[error("service {service:?} ({declared_at}): {source}")]
    Program {
        /// The service.
        service: String,
        /// Where the spec declares it.
        declared_at: String,
        /// Why.
        source: ProgramError,
    },
    /// Something else listens on a port the service declares.
    #[error(
        "port {port} of {service}.{interface} is already in use by another process (stop it, or declare another port)"
    )]
    PortBusy {
        /// The service.
        service: String,
        /// The interface.
        interface: String,
        /// The port.
        port: u16,
    },
    /// The shim could not start it.
    #[error("service {service:?} did not start: {source}")]
    Launch {
        /// The service.
        service: String,
        /// Why.
        source: ShimError,
    },
    /// A remote service without an address for this interface.
    #[error("{service}.{interface}: no remote address declared")]
    NoAddress {
        /// The service.
        service: String,
        /// The interface.
        interface: String,
    },
    /// The Docker engine refused or failed something.
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerError),
    /// A service pod could not be made or started (cluster mode).
    #[error(transparent)]
    Cluster(Box<crate::kubernetes::ClusterError>),
    /// A remote address that does not resolve.
    #[error("{service}.{interface}: remote address {addr} does not resolve")]
    Unresolved {
        /// The service.
        service: String,
        /// The interface.
        interface: String,
        /// The address as declared.
        addr: String,
    },
}

/// A service's `binary=` that cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// A path to nothing.
    #[error("{} does not exist", path.display())]
    Missing {
        /// The path, resolved against the spec's directory.
        path: PathBuf,
    },
    /// A path to something that cannot be executed.
    #[error("{} is not executable (chmod +x it, or check the path)", path.display())]
    NotExecutable {
        /// The path.
        path: PathBuf,
    },
    /// A bare name no `PATH` entry has.
    #[error("{name:?} was not found on PATH (install it or give a path)")]
    NotOnPath {
        /// The name.
        name: String,
    },
}

/// Resolves a service's program: a bare name through `PATH`, a relative
/// path against the spec's directory (so a spec runs from any directory).
pub fn resolve_binary(binary: &str, spec_dir: &Path) -> Result<PathBuf, ProgramError> {
    if binary.contains('/') {
        let p = Path::new(binary);
        // Through components, so a spec in `.` naming `./bin` reads
        // `./bin` in messages, not `././bin`.
        let path: PathBuf = if p.is_absolute() {
            p.to_path_buf()
        } else {
            spec_dir.join(p).components().collect()
        };
        if !path.exists() {
            return Err(ProgramError::Missing { path });
        }
        if !faultbox_agent::process::is_executable(&path) {
            return Err(ProgramError::NotExecutable { path });
        }
        // Absolute, but not through symlinks: some programs pick their
        // personality from argv[0] (redis-server is a link to
        // redis-check-rdb, busybox is everything).
        return Ok(std::path::absolute(&path).unwrap_or(path));
    }
    faultbox_agent::process::resolve_program(binary, std::env::var("PATH").ok().as_deref())
        .map(PathBuf::from)
        .ok_or_else(|| ProgramError::NotOnPath {
            name: binary.to_string(),
        })
}

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
    fn start(&self, launch: Launch<'_>) -> Result<Box<dyn Instance>, BackendError>;
}

/// One started service.
pub trait Instance: Send + Sync {
    /// The fields of its `service_started` event (`pid`, `remote`).
    fn started(&self) -> Vec<(&'static str, String)>;

    /// Where the proxy in front of `iface` relays to.
    fn endpoint(&self, iface: &InterfaceDef) -> Result<SocketAddr, BackendError>;

    /// Where `iface` is published on this machine, when that differs from
    /// where the proxy relays to (a container's mapped port).
    fn published(&self, _iface: &InterfaceDef) -> Option<SocketAddr> {
        None
    }

    /// The shim session, when syscall faults can reach the service.
    fn shim(&self) -> Option<&Shim>;

    /// Sends its output to `log` from now on (a kept service serving
    /// the next test).
    fn relog(&self, _log: &Path) {}

    /// How it ended, once it has.
    fn exited(&self) -> Option<ExitInfo> {
        self.shim().and_then(Shim::exited)
    }

    /// Waits (briefly) for the report of an exit that already happened:
    /// a service that died during the body's last step must count as a
    /// crash even if its exit is still on the way.
    fn settle(&self) {
        if let Some(shim) = self.shim()
            && shim.exited().is_none()
            && shim.target_gone()
        {
            shim.wait_exited(Duration::from_secs(2));
        }
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
    fn start(&self, launch: Launch<'_>) -> Result<Box<dyn Instance>, BackendError> {
        let def = launch.def;
        let program = resolve_binary(&def.binary, launch.spec_dir).map_err(|source| {
            BackendError::Program {
                service: def.name.clone(),
                declared_at: def.declared_at.clone(),
                source,
            }
        })?;
        for iface in &def.interfaces {
            if port_taken(iface, Duration::from_millis(200)) {
                return Err(BackendError::PortBusy {
                    service: def.name.clone(),
                    interface: iface.name.clone(),
                    port: iface.port,
                });
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
            inherit_env: false,
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
        let shim = Shim::launch(launch.shim, spec, Some(&launch.log), launch.on_event).map_err(
            |source| BackendError::Launch {
                service: def.name.clone(),
                source,
            },
        )?;
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

    fn endpoint(&self, iface: &InterfaceDef) -> Result<SocketAddr, BackendError> {
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
            while port_taken(iface, Duration::from_millis(100)) {
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
    fn start(&self, launch: Launch<'_>) -> Result<Box<dyn Instance>, BackendError> {
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

    fn endpoint(&self, iface: &InterfaceDef) -> Result<SocketAddr, BackendError> {
        let addr = self
            .upstreams
            .get(&iface.name)
            .ok_or_else(|| BackendError::NoAddress {
                service: self.name.clone(),
                interface: iface.name.clone(),
            })?;
        net::resolve(addr)
            .ok()
            .and_then(|a| a.first().copied())
            .ok_or_else(|| BackendError::Unresolved {
                service: self.name.clone(),
                interface: iface.name.clone(),
                addr: addr.clone(),
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

/// Whether `iface`'s port is taken on this machine: for TCP something
/// accepts on it; for a datagram protocol a socket is bound to it (UDP
/// has no handshake to try).
pub fn port_taken(iface: &InterfaceDef, timeout: Duration) -> bool {
    let datagrams = faultbox_proxy::protocol::get(&iface.protocol).is_some_and(|p| p.datagrams());
    if datagrams {
        return std::net::UdpSocket::bind(("127.0.0.1", iface.port)).is_err();
    }
    port_open(iface.port, timeout)
}
