//! The topology a spec declares, as plain data.

use std::collections::BTreeMap;
use std::time::Duration;

/// The kinds of I/O `determinism()` reports as `unmediated_io`: what a
/// service reads or reaches that Faultbox observes but does not decide.
pub const NONDETERMINISM: &[(&str, &str)] = &[
    (
        "clock",
        "a clock_gettime that reached the kernel (not the vDSO)",
    ),
    ("rand", "getrandom"),
    ("dns", "a connect to port 53 that no service declares"),
    (
        "network-unmediated",
        "a connect to an address that is neither a declared interface nor a proxy",
    ),
];

/// The syscalls `determinism()` adds to every service's filter.
pub const DETERMINISM_SYSCALLS: &[&str] = &["clock_gettime", "getrandom", "connect"];

/// `determinism(...)`: the spec asks that the services' nondeterminism be
/// reported, and (strict) that an untolerated kind fail the test.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Determinism {
    /// The first untolerated event fails the test.
    pub strict: bool,
    /// Kinds tolerated everywhere (`allow=`).
    pub allow: Vec<String>,
    /// Kinds tolerated per service (`service(nondeterministic_ok=)`).
    pub tolerated: BTreeMap<String, Vec<String>>,
}

impl Determinism {
    /// Whether `category` on `service` is tolerated.
    pub fn tolerates(&self, service: &str, category: &str) -> bool {
        self.allow.iter().any(|c| c == category)
            || self
                .tolerated
                .get(service)
                .is_some_and(|l| l.iter().any(|c| c == category))
    }
}

/// One declared service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceDef {
    pub name: String,
    /// The program, as written in the spec.
    pub binary: String,
    pub args: Vec<String>,
    /// Spec environment; wins over the inherited one.
    pub env: Vec<(String, String)>,
    pub interfaces: Vec<InterfaceDef>,
    pub depends_on: Vec<String>,
    pub healthcheck: Option<Healthcheck>,
    pub ops: BTreeMap<String, OpDef>,
    /// Account to run as (`user=`).
    pub user: Option<String>,
    /// For a remote service (`remote=`): each interface's upstream
    /// `host:port`. Empty for a service Faultbox starts.
    pub remote: BTreeMap<String, String>,
    /// For a container service (`image=` or `build=`): how to make and
    /// run its container.
    pub container: Option<ContainerDef>,
    /// `seccomp=False`: no shim, so syscall faults cannot reach it.
    pub seccomp: bool,
    /// `reuse=True`: one container serves every test of a suite.
    pub reuse: bool,
    /// Where the spec declared it, `file:line`.
    pub declared_at: String,
}

impl ServiceDef {
    /// Whether the service runs elsewhere (nothing is launched).
    pub fn is_remote(&self) -> bool {
        !self.remote.is_empty()
    }

    /// Whether the service runs in a container.
    pub fn is_container(&self) -> bool {
        self.container.is_some()
    }
}

/// Where a container service's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// `image=`: a reference, local or pulled.
    Pull(String),
    /// `build=`: a directory with a Dockerfile, relative to the spec.
    Build(String),
}

/// The container half of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDef {
    pub image: ImageSource,
    /// `entrypoint=`: replaces the image's ENTRYPOINT.
    pub entrypoint: Option<Vec<String>>,
    /// `args=`: replaces the image's CMD.
    pub cmd: Option<Vec<String>>,
    /// `ports={container_port: host_port}` (0: any free port); interface
    /// ports not named here are published on a free port.
    pub ports: BTreeMap<u16, u16>,
    /// `volumes={host_path_or_volume: container_path}`.
    pub volumes: Vec<(String, String)>,
}

/// One interface of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceDef {
    pub name: String,
    pub protocol: String,
    pub port: u16,
    /// `tls=`: the proxy terminates and re-originates TLS.
    pub tls: Option<faultbox_proxy::TlsSpec>,
}

/// A named operation: syscalls (families allowed) and an optional path glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpDef {
    pub syscalls: Vec<String>,
    pub path: Option<String>,
}

/// A readiness probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// Ready when a TCP connection to `addr` succeeds.
    Tcp { addr: String, timeout: Duration },
    /// Ready when `GET url` answers `expect_status` (or any 2xx/3xx).
    Http {
        url: String,
        timeout: Duration,
        expect_status: Option<u16>,
    },
    /// Ready when the service's first interface answers its own protocol:
    /// `SELECT 1` for postgres, `GET /` for http, a TCP connect otherwise.
    Ready { timeout: Duration },
}

impl Healthcheck {
    /// `tcp://localhost:5432`, `http://localhost:8080/health`.
    pub fn describe(&self) -> String {
        match self {
            Healthcheck::Tcp { addr, .. } => format!("tcp://{addr}"),
            Healthcheck::Http { url, .. } => url.clone(),
            Healthcheck::Ready { .. } => "ready()".into(),
        }
    }

    /// How long the probe may take to pass.
    pub fn timeout(&self) -> Duration {
        match self {
            Healthcheck::Tcp { timeout, .. }
            | Healthcheck::Http { timeout, .. }
            | Healthcheck::Ready { timeout } => *timeout,
        }
    }
}

/// Services whose `depends_on` cannot be ordered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    /// A chain of dependencies that comes back to where it started.
    #[error("{declared_at}: depends_on cycle: {path} (break one of these dependencies)")]
    Cycle {
        /// Where the service that closes the cycle is declared.
        declared_at: String,
        /// The services around the cycle.
        path: String,
    },
    /// A dependency on a service the spec does not declare.
    #[error("{declared_at}: service {service:?} depends on {dependency:?}, which is not declared")]
    UnknownDependency {
        /// Where the dependent service is declared.
        declared_at: String,
        /// The dependent service.
        service: String,
        /// The missing one.
        dependency: String,
    },
    /// A kept container pointing at one that is started fresh per test.
    #[error(
        "{declared_at}: service {service:?} has reuse=True but depends on {dependency:?}, which is started fresh for every test, so the kept container would keep the first test's address for it; give {dependency:?} reuse=True too, or drop reuse="
    )]
    ReuseDependsOnFresh {
        /// Where the kept service is declared.
        declared_at: String,
        /// The kept service.
        service: String,
        /// The dependency started per test.
        dependency: String,
    },
}

/// Orders services so that each comes after what it depends on.
pub fn start_order(services: &[ServiceDef]) -> Result<Vec<usize>, TopologyError> {
    let index = |name: &str| services.iter().position(|s| s.name == name);
    let mut order = Vec::new();
    let mut state = vec![0u8; services.len()]; // 0 new, 1 visiting, 2 done
    fn visit(
        i: usize,
        services: &[ServiceDef],
        index: &dyn Fn(&str) -> Option<usize>,
        state: &mut [u8],
        order: &mut Vec<usize>,
        path: &mut Vec<String>,
    ) -> Result<(), TopologyError> {
        match state[i] {
            2 => return Ok(()),
            1 => {
                path.push(services[i].name.clone());
                return Err(TopologyError::Cycle {
                    declared_at: services[i].declared_at.clone(),
                    path: path.join(" → "),
                });
            }
            _ => {}
        }
        state[i] = 1;
        path.push(services[i].name.clone());
        for dep in &services[i].depends_on {
            let j = index(dep).ok_or_else(|| TopologyError::UnknownDependency {
                declared_at: services[i].declared_at.clone(),
                service: services[i].name.clone(),
                dependency: dep.clone(),
            })?;
            visit(j, services, index, state, order, path)?;
        }
        path.pop();
        state[i] = 2;
        order.push(i);
        Ok(())
    }
    for i in 0..services.len() {
        visit(i, services, &index, &mut state, &mut order, &mut Vec::new())?;
    }
    for s in services.iter().filter(|s| s.reuse) {
        for dep in &s.depends_on {
            let fresh = index(dep).is_some_and(|j| !services[j].reuse && !services[j].is_remote());
            if fresh {
                return Err(TopologyError::ReuseDependsOnFresh {
                    declared_at: s.declared_at.clone(),
                    service: s.name.clone(),
                    dependency: dep.clone(),
                });
            }
        }
    }
    Ok(order)
}
