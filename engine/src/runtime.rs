//! One test, run for real: services started under their shims in
//! dependency order, healthchecks, the body with its fault windows and
//! steps, then everything stopped and the ports confirmed free.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use faultbox_agent::engine::RuleStats;
use faultbox_agent::glob::Glob;
use faultbox_agent::rule::{Action, Rule, RuleId, Trigger};
use faultbox_agent::syscalls::Arch;

use faultbox_proxy::TlsSpec;
use faultbox_proxy::net;
use faultbox_proxy::protocol::{Target, Wire};
use faultbox_proxy::rules::ProxyRuleDef;
use faultbox_proxy::server::Proxy;
use faultbox_proxy::steps::{StepCall, StepResult};
use faultbox_proxy::tls::{self, Relay, TlsSetup};
use faultbox_spec::host::{AssertionDetail, HostError, TestHost};
use faultbox_spec::model::{Healthcheck, ServiceDef, TopologyError, start_order};
use faultbox_spec::values::{FaultValue, proxy_placeholder};

use crate::backend::{Backend, BackendError, Instance, Launch, Process, Remote};
use crate::shim::{ExitInfo, Shim, ShimEvent};
use crate::trace::{Event, Trace, fields};

/// Settings shared by every test of a run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The `faultbox-shim` binary.
    pub shim: PathBuf,
    /// Where service output goes, one file per service and test.
    pub log_dir: PathBuf,
    /// Longest a test body may run.
    pub test_timeout: Duration,
    /// SIGTERM → SIGKILL grace when stopping services.
    pub stop_grace: Duration,
    /// Set when the run is interrupted (SIGINT, SIGTERM): the running
    /// test stops where it is, and no other starts.
    pub stop: Arc<AtomicBool>,
    /// The Docker engine and the run's network, when the spec has
    /// container services.
    pub docker: Option<Arc<crate::docker::Docker>>,
    /// In a FaultTest's runner: the cluster, where container services
    /// become pods.
    pub cluster: Option<Arc<crate::kubernetes::Cluster>>,
    /// `reuse=True` services between two tests of the run.
    pub kept: KeptServices,
    /// `--explore`: the interleaving this run plays (see
    /// [`TestHost::explore_finish`]).
    pub explore: Option<u64>,
}

/// Where a kept service's shim events go: the test it serves now.
type EventSlot = Arc<Mutex<Box<dyn Fn(ShimEvent) + Send>>>;

/// Where a kept service's proxy events go: the trace of the test it
/// serves now.
struct SwitchSink(Mutex<Arc<Trace>>);

impl faultbox_proxy::EventSink for SwitchSink {
    fn emit(&self, kind: &str, service: &str, fields: faultbox_proxy::Fields) {
        let trace = Arc::clone(&lock(&self.0));
        faultbox_proxy::EventSink::emit(&*trace, kind, service, fields);
    }
}

/// A `reuse=True` service between tests: its instance, its proxies (so
/// the addresses its dependents were given stay right) and the switches
/// that point its events at the next test.
struct Kept {
    instance: Box<dyn Instance>,
    switch: Switch,
    proxies: Vec<((String, String), Proxy)>,
    tls: Vec<((String, String), TlsRelays)>,
}

#[derive(Clone)]
struct Switch {
    events: EventSlot,
    proxy_events: Arc<SwitchSink>,
}

/// The run's kept services, until `stop_all` (the containers also go when
/// their handles drop, and the run's Docker sweeps what is left).
#[derive(Clone, Default)]
pub struct KeptServices(Arc<Mutex<BTreeMap<String, Kept>>>);

impl std::fmt::Debug for KeptServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(lock(&self.0).keys()).finish()
    }
}

impl KeptServices {
    /// Stops every kept service (the end of a run).
    pub fn stop_all(&self, grace: Duration) {
        let all = std::mem::take(&mut *lock(&self.0));
        for (_, k) in all {
            k.stop(grace);
        }
    }
}

impl Kept {
    fn stop(self, grace: Duration) {
        for (_, p) in self.proxies {
            p.stop();
        }
        for (_, r) in self.tls {
            r.front.stop();
            r.back.stop();
        }
        self.instance.stop(grace);
    }
}

impl RunConfig {
    /// Where proxies listen: loopback, or the run network's gateway when
    /// containers must reach them too (this machine owns that address,
    /// so host processes reach it as well).
    pub fn proxy_bind(&self) -> std::net::IpAddr {
        match (&self.docker, &self.cluster) {
            (Some(d), _) => d.gateway.into(),
            (None, Some(c)) => c.ip,
            (None, None) => std::net::Ipv4Addr::LOCALHOST.into(),
        }
    }
}

/// One fault rule's record, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRecord {
    pub service: String,
    /// For protocol faults: the interface.
    pub interface: Option<String>,
    /// The keyword as written: a syscall, a family or an op name.
    pub syscall: String,
    /// `deny`, `delay`, `allow`, `trace`.
    pub action: String,
    /// The rule as written: `deny(EIO)`, `delay(500ms)`.
    pub rule: String,
    pub errno: Option<String>,
    pub label: Option<String>,
    /// Calls the rule changed.
    pub hits: u64,
    /// Calls the rule could see (its syscalls, on paths it cares about).
    pub matched: u64,
    /// A `trace` window, not a fault.
    pub trace: bool,
    /// How many windows this record sums: the same rule on the same
    /// target in many windows (a fault in a loop) is one record with
    /// added counters, so a test's memory does not grow per window.
    pub windows: u64,
}

impl FaultRecord {
    /// Whether `other` is the same rule on the same target.
    fn same_rule(&self, other: &FaultRecord) -> bool {
        (
            &self.service,
            &self.interface,
            &self.syscall,
            &self.action,
            &self.rule,
            &self.errno,
            &self.label,
            self.trace,
        ) == (
            &other.service,
            &other.interface,
            &other.syscall,
            &other.action,
            &other.rule,
            &other.errno,
            &other.label,
            other.trace,
        )
    }
}

/// A service that stopped while the test was running.
#[derive(Debug, Clone, PartialEq)]
pub struct Crash {
    pub service: String,
    pub exit: ExitInfo,
    /// The last lines of its output.
    pub log_tail: String,
}

/// Why services could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The topology cannot be ordered.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The backend could not start a service.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A container service in a run that did not connect to Docker.
    #[error("service {0:?} runs in a container, and this run has no Docker engine")]
    NoDocker(String),
    /// The service died while its healthcheck waited.
    #[error(
        "service {service:?} exited with code {code} before its healthcheck {check} passed{output}"
    )]
    ExitedBeforeHealthy {
        /// The service.
        service: String,
        /// Its exit code, shell style.
        code: i32,
        /// The healthcheck.
        check: String,
        /// Its last output, with its separator.
        output: String,
    },
    /// The healthcheck did not pass in time (HEALTHCHECK_TIMEOUT).
    #[error(
        "service {service:?}: healthcheck {check} did not pass within {timeout:?} (last attempt: {last}); check the port and the service's output{output}{hint}"
    )]
    HealthcheckTimeout {
        /// The service.
        service: String,
        /// The healthcheck.
        check: String,
        /// How long it was given.
        timeout: Duration,
        /// What the last attempt got.
        last: Box<ProbeError>,
        /// Its last output, with its separator.
        output: String,
        /// Advice for remote services, with its separator.
        hint: &'static str,
    },
    /// The run was interrupted while services were starting.
    #[error("interrupted while starting {service:?}")]
    Interrupted {
        /// The service being waited for.
        service: String,
    },
    /// The proxy or TLS relay in front of an interface did not start.
    #[error("{what} for {service}.{interface}: {reason}")]
    Proxy {
        /// "proxy", "TLS" or "TLS relay".
        what: &'static str,
        /// The service.
        service: String,
        /// The interface.
        interface: String,
        /// Why.
        reason: String,
    },
}

impl StartError {
    /// Whether a healthcheck ran out of time (HEALTHCHECK_TIMEOUT).
    pub fn healthcheck_timeout(&self) -> bool {
        matches!(self, StartError::HealthcheckTimeout { .. })
    }
}

/// Why one healthcheck attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `ready()` on a service without interfaces.
    #[error("ready() needs the service to declare an interface")]
    NoInterface,
    /// `ready()` on a protocol with no probe.
    #[error("ready(): no probe for protocol {protocol:?}")]
    NoProbe {
        /// The protocol.
        protocol: String,
    },
    /// The protocol's own probe failed.
    #[error(transparent)]
    Protocol(#[from] faultbox_proxy::protocol::ProtocolError),
    /// `http(url=)` with a URL that cannot be used.
    #[error(transparent)]
    Url(#[from] faultbox_proxy::steps::UrlError),
    /// No connection, or no answer.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An HTTP answer with the wrong status.
    #[error("status {0}")]
    Status(u16),
}

struct WindowRule {
    keyword: String,
    rule: Rule,
    fault: FaultValue,
}

struct Window {
    id: u64,
    service: String,
    trace: bool,
    from_start: bool,
    rules: Vec<WindowRule>,
    /// One side of a `partition()`: `a,b`. Its rules (a connect rule per
    /// port of the other side) are reported as one record.
    partition: Option<String>,
    /// `--explore`'s own hold rules: not the test's faults, so they leave
    /// no record and no window events.
    hidden: bool,
}

/// A `partition()` in force: the windows of its sides.
struct Partition {
    id: u64,
    a: String,
    b: String,
    windows: Vec<u64>,
}

struct ProxyWindow {
    id: u64,
    service: String,
    interface: String,
    from_start: bool,
    rules: Vec<(RuleId, ProxyRuleDef)>,
}

struct TlsRelays {
    interface: String,
    front: Relay,
    back: Relay,
    setup: Arc<TlsSetup>,
}

struct Running {
    instance: Box<dyn Instance>,
    /// For a `reuse=True` service: how to hand it to the next test.
    switch: Option<Switch>,
    /// Healthy with its proxies up.
    complete: bool,
}

/// The state of one test while it runs; shared by the body, the shim
/// readers and the supervising thread.
pub struct TestRun {
    pub name: String,
    pub seed: u64,
    pub trace: Arc<Trace>,
    config: RunConfig,
    services: Vec<ServiceDef>,
    intercept: Vec<String>,
    running: Mutex<BTreeMap<String, Running>>,
    windows: Mutex<Vec<Window>>,
    proxy_windows: Mutex<Vec<ProxyWindow>>,
    proxies: Mutex<BTreeMap<(String, String), Proxy>>,
    /// TLS interfaces: the front and back relays around their proxy, and
    /// the configuration steps use.
    tls: Mutex<BTreeMap<(String, String), TlsRelays>>,
    /// TLS setups by declaration, so every interface with a generated
    /// certificate shares one CA per test.
    tls_setups: Mutex<Vec<(TlsSpec, Arc<TlsSetup>)>>,
    next_window: AtomicU64,
    faults: Mutex<Vec<FaultRecord>>,
    crashes: Arc<Mutex<Vec<Crash>>>,
    acknowledged: Mutex<BTreeSet<String>>,
    stopping: Arc<AtomicBool>,
    /// Assertions evaluated by the body.
    pub assertions: AtomicU64,
    assertion: Mutex<Option<AssertionDetail>>,
    /// `determinism(...)`: set before the services start.
    determinism: std::sync::OnceLock<faultbox_spec::model::Determinism>,
    /// Ports a connect may reach without being `unmediated_io`: every
    /// declared interface (and remote upstream), published port and proxy.
    mediated: Arc<Mutex<BTreeSet<u16>>>,
    /// The first untolerated `unmediated_io` under strict determinism.
    violation: Arc<Mutex<Option<String>>>,
    partitions: Mutex<Vec<Partition>>,
    /// `--explore`: the hold windows of a `parallel()` being explored.
    explore_windows: Mutex<Vec<u64>>,
    /// `--explore`: what is left of the interleaving index for the rounds
    /// to come (each round takes its digit, across every `parallel()`).
    explore_rest: Mutex<Option<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes and returns every entry of `service`'s interfaces.
fn take_service<T>(map: &Mutex<BTreeMap<(String, String), T>>, service: &str) -> Vec<T> {
    let mut all = lock(map);
    let keys: Vec<(String, String)> = all.keys().filter(|(s, _)| s == service).cloned().collect();
    keys.iter().filter_map(|k| all.remove(k)).collect()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The hold rules' tag under `--explore`.
const EXPLORE_TAG: &str = "explore";

/// What `--explore` holds in a `parallel()`: the calls through which
/// services touch each other and their files, among those the filter has.
const EXPLORE_SYSCALLS: &[&str] = &[
    "write",
    "writev",
    "pwrite64",
    "fsync",
    "fdatasync",
    "openat",
    "connect",
    "sendto",
    "sendmsg",
    "recvfrom",
    "recvmsg",
    "read",
    "readv",
    "pread64",
];

/// `n!`, saturating.
pub fn factorial(n: usize) -> u64 {
    (1..=n as u64).fold(1u64, |acc, k| acc.saturating_mul(k))
}

/// The `index`-th permutation of `0..n` in lexicographic order (the
/// factorial number system): index 0 is `0, 1, ..., n-1`.
pub fn permutation(n: usize, index: u64) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..n).collect();
    let mut rest = index % factorial(n).max(1);
    let mut out = Vec::with_capacity(n);
    for k in (0..n).rev() {
        let f = factorial(k).max(1);
        let pick = (rest / f) as usize;
        rest %= f;
        out.push(pool.remove(pick.min(pool.len().saturating_sub(1))));
    }
    out
}

/// The ports the spec declares: interfaces, and remote upstreams.
fn declared_ports(services: &[ServiceDef]) -> BTreeSet<u16> {
    let mut ports: BTreeSet<u16> = services
        .iter()
        .flat_map(|s| s.interfaces.iter().map(|i| i.port))
        .collect();
    for s in services {
        for upstream in s.remote.values() {
            if let Some(p) = upstream.rsplit_once(':').and_then(|(_, p)| p.parse().ok()) {
                ports.insert(p);
            }
        }
    }
    ports
}

/// What kind of unmediated I/O a reported call is, and its detail, if it
/// is one: a raw clock read, randomness, or a connect to a port that no
/// interface, proxy or published port of the run explains.
fn unmediated(
    syscall: &str,
    path: Option<&str>,
    mediated: &BTreeSet<u16>,
) -> Option<(&'static str, String)> {
    match syscall {
        "clock_gettime" => Some(("clock", String::new())),
        "getrandom" => Some(("rand", String::new())),
        "connect" => {
            // Unix sockets (no port) are local plumbing, not the network.
            let addr = path?;
            let port: u16 = addr.rsplit_once(':')?.1.parse().ok()?;
            if mediated.contains(&port) {
                None
            } else if port == 53 {
                Some(("dns", addr.to_string()))
            } else {
                Some(("network-unmediated", addr.to_string()))
            }
        }
        _ => None,
    }
}

impl TestRun {
    /// A test about to run `services` (with the spec's syscall filter).
    pub fn new(
        name: &str,
        seed: u64,
        services: Vec<ServiceDef>,
        intercept: Vec<String>,
        config: RunConfig,
    ) -> Arc<TestRun> {
        let services_ports = services.clone();
        let config_explore = config.explore;
        Arc::new(TestRun {
            name: name.to_string(),
            seed,
            trace: Arc::new(Trace::new()),
            config,
            services,
            intercept,
            running: Mutex::new(BTreeMap::new()),
            windows: Mutex::new(Vec::new()),
            proxy_windows: Mutex::new(Vec::new()),
            proxies: Mutex::new(BTreeMap::new()),
            tls: Mutex::new(BTreeMap::new()),
            tls_setups: Mutex::new(Vec::new()),
            next_window: AtomicU64::new(1),
            faults: Mutex::new(Vec::new()),
            crashes: Arc::new(Mutex::new(Vec::new())),
            acknowledged: Mutex::new(BTreeSet::new()),
            stopping: Arc::new(AtomicBool::new(false)),
            assertions: AtomicU64::new(0),
            assertion: Mutex::new(None),
            determinism: std::sync::OnceLock::new(),
            mediated: Arc::new(Mutex::new(declared_ports(&services_ports))),
            violation: Arc::new(Mutex::new(None)),
            partitions: Mutex::new(Vec::new()),
            explore_windows: Mutex::new(Vec::new()),
            explore_rest: Mutex::new(config_explore),
        })
    }

    /// Reports the services' nondeterminism as the spec's `determinism()`
    /// asks; call before [`TestRun::start_services`].
    pub fn observe_determinism(&self, d: Option<faultbox_spec::model::Determinism>) {
        if let Some(d) = d {
            let _ = self.determinism.set(d);
        }
    }

    /// The strict-determinism violation that fails the test, if any.
    pub fn determinism_violation(&self) -> Option<String> {
        lock(&self.violation).clone()
    }

    /// The declared service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceDef> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Starts every service in dependency order and waits for its
    /// healthcheck.
    pub fn start_services(&self, spec_dir: &Path) -> Result<(), StartError> {
        let order = start_order(&self.services)?;
        for i in order {
            let def = &self.services[i];
            self.start_one(def, spec_dir)?;
        }
        Ok(())
    }

    fn start_one(&self, def: &ServiceDef, spec_dir: &Path) -> Result<(), StartError> {
        let backend: &dyn Backend = match (&self.config.docker, &self.config.cluster) {
            _ if !def.is_container() && def.is_remote() => &Remote,
            _ if !def.is_container() => &Process,
            (Some(docker), _) => docker,
            (None, Some(cluster)) => cluster,
            (None, None) => return Err(StartError::NoDocker(def.name.clone())),
        };
        let mut env = BTreeMap::new();
        for (k, v) in &def.env {
            env.insert(k.clone(), self.rewrite_env_value(&def.name, v));
        }
        env.extend(self.address_vars());
        let log = self
            .config
            .log_dir
            .join(format!("{}.{}.log", self.name, def.name));
        if def.reuse && self.resume(def, &log)? {
            return Ok(());
        }
        let switch = def.reuse.then(|| Switch {
            events: Arc::new(Mutex::new(self.event_sink(def))),
            proxy_events: Arc::new(SwitchSink(Mutex::new(Arc::clone(&self.trace)))),
        });
        let on_event: Box<dyn Fn(ShimEvent) + Send> = match &switch {
            Some(sw) => {
                let slot = Arc::clone(&sw.events);
                Box::new(move |e| (lock(&slot))(e))
            }
            None => self.event_sink(def),
        };
        let instance = backend.start(Launch {
            def,
            env,
            log: log.clone(),
            spec_dir,
            intercept: &self.intercept,
            seed: faultbox_agent::engine::derive_seed(self.seed, &def.name),
            shim: &self.config.shim,
            stop_grace: self.config.stop_grace,
            on_event,
        });
        let instance = instance.inspect_err(|e| {
            tracing::debug!(service = %def.name, error = %e, "service did not start");
        })?;
        self.trace.emit(
            "service_started",
            &def.name,
            instance
                .started()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        );
        lock(&self.running).insert(
            def.name.clone(),
            Running {
                instance,
                switch,
                complete: false,
            },
        );
        if let Some(check) = &def.healthcheck {
            self.wait_healthy(def, check, &log)?;
            self.trace.emit(
                "service_ready",
                &def.name,
                fields([("healthcheck", check.describe())]),
            );
        }
        self.start_proxies(def)?;
        self.mark_complete(&def.name);
        Ok(())
    }

    /// Takes over a kept `reuse=True` service when an earlier test left
    /// one that still runs: its events now reach this test, and it is
    /// announced (and checked) as if it had started. Returns false when
    /// there is none, so it starts afresh.
    fn resume(&self, def: &ServiceDef, log: &Path) -> Result<bool, StartError> {
        let Some(kept) = lock(&self.config.kept.0).remove(&def.name) else {
            return Ok(false);
        };
        if kept.instance.exited().is_some() {
            kept.stop(self.config.stop_grace);
            return Ok(false);
        }
        let Kept {
            instance,
            switch,
            proxies,
            tls,
        } = kept;
        *lock(&switch.events) = self.event_sink(def);
        *lock(&switch.proxy_events.0) = Arc::clone(&self.trace);
        instance.relog(log);
        let mut started: BTreeMap<String, String> = instance
            .started()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        started.insert("reused".into(), "true".into());
        self.trace.emit("service_started", &def.name, started);
        // Its proxies and TLS setup belong to this test from here on, so a
        // failed healthcheck below stops them with the service.
        for (key, t) in &tls {
            let spec = def
                .interfaces
                .iter()
                .find(|i| i.name == key.1)
                .and_then(|i| i.tls.clone());
            if let Some(spec) = spec {
                let mut setups = lock(&self.tls_setups);
                if !setups.iter().any(|(k, _)| *k == spec) {
                    setups.push((spec, Arc::clone(&t.setup)));
                }
            }
        }
        let announced: Vec<(String, String, String, String)> = proxies
            .iter()
            .map(|(key, proxy)| {
                let listen = match tls.iter().find(|(k, _)| k == key) {
                    Some((_, t)) => t.front.listen,
                    None => proxy.listen,
                };
                (
                    key.1.clone(),
                    proxy.protocol.clone(),
                    listen.to_string(),
                    proxy.upstream.to_string(),
                )
            })
            .collect();
        lock(&self.proxies).extend(proxies);
        lock(&self.tls).extend(tls);
        lock(&self.running).insert(
            def.name.clone(),
            Running {
                instance,
                switch: Some(switch),
                complete: false,
            },
        );
        if let Some(check) = &def.healthcheck {
            self.wait_healthy(def, check, log)?;
            self.trace.emit(
                "service_ready",
                &def.name,
                fields([("healthcheck", check.describe())]),
            );
        }
        for (interface, protocol, listen, target) in announced {
            for addr in [&listen, &target] {
                if let Some(port) = addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()) {
                    lock(&self.mediated).insert(port);
                }
            }
            self.trace.emit(
                "proxy_started",
                &def.name,
                fields([
                    ("interface", interface),
                    ("protocol", protocol),
                    ("listen", listen),
                    ("target", target),
                    ("mode", "reused".to_string()),
                ]),
            );
        }
        self.mark_complete(&def.name);
        Ok(true)
    }

    /// The service started completely (healthy, proxies up): only such a
    /// service is kept for the next test.
    fn mark_complete(&self, service: &str) {
        if let Some(r) = lock(&self.running).get_mut(service) {
            r.complete = true;
        }
    }

    fn start_proxies(&self, def: &ServiceDef) -> Result<(), StartError> {
        // Proxies start once the service is ready, before anything that
        // depends on it, so dependents are pointed at them from the start.
        for iface in &def.interfaces {
            if !faultbox_proxy::rules::proxied(&iface.protocol) {
                continue;
            }
            let err = |what, reason: String| StartError::Proxy {
                what,
                service: def.name.clone(),
                interface: iface.name.clone(),
                reason,
            };
            let upstream = match lock(&self.running).get(&def.name) {
                Some(r) => r.instance.endpoint(iface)?,
                None => return Err(err("proxy", "the service is not running".into())),
            };
            let key = (def.name.clone(), iface.name.clone());
            let sink: Arc<dyn faultbox_proxy::EventSink> = match lock(&self.running)
                .get(&def.name)
                .and_then(|r| r.switch.as_ref())
            {
                Some(sw) => Arc::clone(&sw.proxy_events) as Arc<dyn faultbox_proxy::EventSink>,
                None => self.trace.clone(),
            };
            let start = |to| {
                Proxy::start_on(
                    self.config.proxy_bind(),
                    &def.name,
                    &iface.name,
                    &iface.protocol,
                    to,
                    Arc::clone(&sink),
                )
                .map_err(|e| err("proxy", e.to_string()))
            };
            // The address clients use: the TLS front's when there is one.
            lock(&self.mediated).insert(upstream.port());
            let announce = |listen: std::net::SocketAddr, mode: &str| {
                lock(&self.mediated).insert(listen.port());
                self.trace.emit(
                    "proxy_started",
                    &def.name,
                    fields([
                        ("interface", iface.name.clone()),
                        ("protocol", iface.protocol.clone()),
                        ("listen", listen.to_string()),
                        ("target", upstream.to_string()),
                        ("mode", mode.to_string()),
                    ]),
                );
            };
            let Some(tls) = &iface.tls else {
                let proxy = start(upstream)?;
                announce(proxy.listen, "passthrough");
                lock(&self.proxies).insert(key, proxy);
                continue;
            };
            let setup = self.tls_setup(tls).map_err(|e| err("TLS", e.to_string()))?;
            let host = def
                .remote
                .get(&iface.name)
                .and_then(|r| r.rsplit_once(':').map(|(h, _)| h.to_string()))
                .unwrap_or_else(|| "localhost".to_string());
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| err("TLS", e.to_string()))?;
            let io = |e: std::io::Error| err("TLS relay", e.to_string());
            let wire =
                faultbox_proxy::protocol::get(&iface.protocol).map_or(Wire::Direct, |p| p.wire());
            let back = Relay::back(upstream, name, &setup.upstream, wire).map_err(io)?;
            let proxy = start(back.listen)?;
            let front =
                Relay::front_on(self.config.proxy_bind(), proxy.listen, &setup.server, wire)
                    .map_err(io)?;
            announce(front.listen, "tls");
            lock(&self.proxies).insert(key.clone(), proxy);
            lock(&self.tls).insert(
                key,
                TlsRelays {
                    interface: iface.name.clone(),
                    front,
                    back,
                    setup,
                },
            );
        }
        Ok(())
    }

    fn tls_setup(&self, spec: &TlsSpec) -> Result<Arc<TlsSetup>, faultbox_proxy::TlsError> {
        let mut setups = lock(&self.tls_setups);
        if let Some((_, s)) = setups.iter().find(|(k, _)| k == spec) {
            return Ok(Arc::clone(s));
        }
        // In a FaultTest's runner the operator mounts the Secrets the spec
        // names, and the run's CA, and says where in these variables.
        let secrets = std::env::var_os("FAULTBOX_SECRETS_DIR").map(PathBuf::from);
        let issuer = std::env::var_os("FAULTBOX_RUN_CA_DIR")
            .map(PathBuf::from)
            .map(|d| tls::Issuer {
                cert: d.join("tls.crt"),
                key: d.join("tls.key"),
            });
        let resolved = spec.resolve(secrets.as_deref())?;
        // The generated certificate covers every name a client may use.
        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        if self.config.docker.is_some() || self.config.cluster.is_some() {
            names.push(self.config.proxy_bind().to_string());
        }
        for s in &self.services {
            for r in s.remote.values() {
                if let Some((h, _)) = r.rsplit_once(':') {
                    names.push(h.to_string());
                }
            }
        }
        let tag = format!("{}.tls{}", self.name, setups.len());
        let setup = Arc::new(tls::setup(
            &resolved,
            &names,
            issuer.as_ref(),
            &self.config.log_dir,
            &tag,
        )?);
        setups.push((spec.clone(), Arc::clone(&setup)));
        Ok(setup)
    }

    /// The address clients use for `service.interface`: the TLS front, the
    /// proxy, or nothing (no proxy).
    fn public_addr(&self, service: &str, interface: &str) -> Option<std::net::SocketAddr> {
        let key = (service.to_string(), interface.to_string());
        if let Some(t) = lock(&self.tls).get(&key) {
            return Some(t.front.listen);
        }
        lock(&self.proxies).get(&key).map(|p| p.listen)
    }

    /// Where the test reaches `service.interface`: its proxy when one
    /// runs, the service itself otherwise.
    pub fn step_addr(&self, service: &str, interface: &str, port: u16) -> String {
        if let Some(a) = self.public_addr(service, interface) {
            return a.to_string();
        }
        self.endpoint(service, interface)
            .map_or_else(|| format!("localhost:{port}"), |a| a.to_string())
    }

    /// Where a container service's interface is published here.
    fn published(&self, service: &str, interface: &str) -> Option<std::net::SocketAddr> {
        let def = self.service(service)?;
        let iface = def.interfaces.iter().find(|i| i.name == interface)?;
        lock(&self.running)
            .get(service)
            .and_then(|r| r.instance.published(iface))
    }

    /// Where the backend says `service.interface` is.
    fn endpoint(&self, service: &str, interface: &str) -> Option<std::net::SocketAddr> {
        let def = self.service(service)?;
        let iface = def.interfaces.iter().find(|i| i.name == interface)?;
        lock(&self.running)
            .get(service)
            .and_then(|r| r.instance.endpoint(iface).ok())
    }

    /// The TLS configuration steps use for `service.interface`, if it has
    /// TLS.
    pub fn step_tls(&self, service: &str, interface: &str) -> Option<Arc<rustls::ClientConfig>> {
        lock(&self.tls)
            .get(&(service.to_string(), interface.to_string()))
            .map(|t| Arc::clone(&t.setup.steps))
    }

    /// Points another service's address in an env value at its proxy:
    /// `localhost:PORT`, `127.0.0.1:PORT` and `<service>:PORT` (the
    /// name a container has on the run's network) become the proxy's
    /// address, and `.proxy_addr/.proxy_host/.proxy_port` placeholders
    /// resolve.
    fn rewrite_env_value(&self, own: &str, value: &str) -> String {
        let mut out = value.to_string();
        let proxies: Vec<(String, String, u16)> = lock(&self.proxies)
            .iter()
            .map(|((s, i), p)| (s.clone(), i.clone(), p.upstream.port()))
            .collect();
        for (svc, iface, upstream_port) in &proxies {
            let Some(public) = self.public_addr(svc, iface) else {
                continue;
            };
            let addr = public.to_string();
            let port = public.port().to_string();
            out = out
                .replace(&proxy_placeholder("ADDR", svc, iface), &addr)
                .replace(
                    &proxy_placeholder("HOST", svc, iface),
                    &public.ip().to_string(),
                )
                .replace(&proxy_placeholder("PORT", svc, iface), &port);
            if svc == own {
                continue;
            }
            let remote = self.service(svc).and_then(|d| d.remote.get(iface)).cloned();
            match remote {
                Some(r) => out = replace_addr(&out, &r, &addr),
                None => {
                    // The real port: a TLS proxy's upstream is its back relay.
                    let real = self
                        .service(svc)
                        .and_then(|d| d.interfaces.iter().find(|i| &i.name == iface))
                        .map(|i| i.port)
                        .unwrap_or(*upstream_port);
                    for host in ["localhost", "127.0.0.1", svc.as_str()] {
                        out = replace_addr(&out, &format!("{host}:{real}"), &addr);
                    }
                }
            }
        }
        out
    }

    /// `FAULTBOX_<SVC>_<IFACE>_ADDR/HOST/PORT` for every interface.
    fn address_vars(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some((_, setup)) = lock(&self.tls_setups).first() {
            out.push((
                "FAULTBOX_CA_FILE".to_string(),
                setup.ca_file.to_string_lossy().into_owned(),
            ));
        }
        for s in &self.services {
            for i in &s.interfaces {
                let key = format!("FAULTBOX_{}_{}", env_name(&s.name), env_name(&i.name));
                let (host, port) = match self.public_addr(&s.name, &i.name) {
                    Some(a) => (a.ip().to_string(), a.port()),
                    None if s.is_container() => (s.name.clone(), i.port),
                    None => ("localhost".to_string(), i.port),
                };
                out.push((format!("{key}_ADDR"), format!("{host}:{port}")));
                out.push((format!("{key}_HOST"), host));
                out.push((format!("{key}_PORT"), port.to_string()));
            }
        }
        out
    }

    fn wait_healthy(
        &self,
        def: &ServiceDef,
        check: &Healthcheck,
        log: &Path,
    ) -> Result<(), StartError> {
        let started = Instant::now();
        let timeout = check.timeout();
        let first = def.interfaces.first();
        let ready_at = first.and_then(|i| self.endpoint(&def.name, &i.name));
        // A container's `localhost:<port>` is its own address on the run's
        // network: probed there, a tcp() check proves the service itself
        // listens, not Docker's port forwarder.
        let rewritten;
        let check = if def.is_container() {
            rewritten = self.container_check(def, check);
            &rewritten
        } else {
            check
        };
        // A TLS interface's server may speak nothing but TLS (memcached
        // with -Z): ready() asks it over TLS, as the proxy will.
        let tls = match first.and_then(|i| i.tls.as_ref()) {
            Some(spec) => Some(self.tls_setup(spec).map_err(|e| StartError::Proxy {
                what: "TLS",
                service: def.name.clone(),
                interface: first.map(|i| i.name.clone()).unwrap_or_default(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        let mut last_error;
        let mut pause = Duration::from_millis(1);
        loop {
            if self.config.stop.load(Ordering::SeqCst) {
                return Err(StartError::Interrupted {
                    service: def.name.clone(),
                });
            }
            if let Some(exit) = self.exit_of(&def.name) {
                let out = tail(log, 15);
                return Err(StartError::ExitedBeforeHealthy {
                    service: def.name.clone(),
                    code: exit.shell_code(),
                    check: check.describe(),
                    output: if out.is_empty() {
                        String::new()
                    } else {
                        format!("; its last output:\n{out}")
                    },
                });
            }
            let left = timeout.saturating_sub(started.elapsed());
            let attempt = left.min(Duration::from_secs(2));
            match probe(
                check,
                def,
                ready_at,
                tls.as_ref().map(|s| &s.upstream),
                attempt,
            ) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(service = %def.name, check = %check.describe(), error = %e, "healthcheck attempt failed");
                    last_error = e;
                }
            }
            if started.elapsed() >= timeout {
                let out = tail(log, 15);
                return Err(StartError::HealthcheckTimeout {
                    service: def.name.clone(),
                    check: check.describe(),
                    timeout,
                    last: Box::new(last_error),
                    output: if out.is_empty() {
                        String::new()
                    } else {
                        format!(":\n{out}")
                    },
                    hint: if def.is_remote() {
                        "; a remote service must be reachable from this machine (kubectl port-forward, a VPN, or running faultbox in the cluster)"
                    } else {
                        ""
                    },
                });
            }
            // Fast first retries (most services are up within a few ms),
            // backing off to 50 ms for slow starters.
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// `check` with `localhost:PORT`, `127.0.0.1:PORT` and `<name>:PORT`
    /// of `def`'s interfaces pointed at its container.
    fn container_check(&self, def: &ServiceDef, check: &Healthcheck) -> Healthcheck {
        let point = |text: &str| {
            let mut out = text.to_string();
            for i in &def.interfaces {
                if let Some(at) = self.endpoint(&def.name, &i.name) {
                    for host in ["localhost", "127.0.0.1", def.name.as_str()] {
                        out = replace_addr(&out, &format!("{host}:{}", i.port), &at.to_string());
                    }
                }
            }
            out
        };
        match check {
            Healthcheck::Tcp { addr, timeout } => Healthcheck::Tcp {
                addr: point(addr),
                timeout: *timeout,
            },
            Healthcheck::Http {
                url,
                timeout,
                expect_status,
            } => Healthcheck::Http {
                url: point(url),
                timeout: *timeout,
                expect_status: *expect_status,
            },
            other => other.clone(),
        }
    }

    fn exit_of(&self, service: &str) -> Option<ExitInfo> {
        lock(&self.running)
            .get(service)
            .and_then(|r| r.instance.exited())
    }

    fn event_sink(&self, def: &ServiceDef) -> Box<dyn Fn(ShimEvent) + Send> {
        let trace = Arc::clone(&self.trace);
        let service = def.name.clone();
        let ops: BTreeSet<String> = def.ops.keys().cloned().collect();
        let stopping = Arc::clone(&self.stopping);
        let crashes = Arc::clone(&self.crashes);
        let determinism = self.determinism.get().cloned();
        let mediated = Arc::clone(&self.mediated);
        let violation = Arc::clone(&self.violation);
        let log = self
            .config
            .log_dir
            .join(format!("{}.{}.log", self.name, def.name));
        Box::new(move |event| match event {
            ShimEvent::Syscall(e) => {
                let keyword = e.rule.as_ref().map(|r| r.name.clone()).unwrap_or_default();
                let op = if ops.contains(&keyword) {
                    keyword.clone()
                } else {
                    String::new()
                };
                let connect_allowed = e.syscall == "connect" && e.decision == "allow";
                let odd = determinism
                    .as_ref()
                    .and_then(|_| unmediated(&e.syscall, e.path.as_deref(), &lock(&mediated)));
                let syscall = e.syscall.to_string();
                trace.emit_at(
                    e.time_ns,
                    "syscall",
                    &service,
                    fields([
                        ("syscall", e.syscall.into_owned()),
                        ("pid", e.pid.to_string()),
                        ("decision", e.decision.into_owned()),
                        ("path", e.path.unwrap_or_default()),
                        (
                            "latency_ms",
                            e.latency_ns
                                .map(|n| (n / 1_000_000).to_string())
                                .unwrap_or_default(),
                        ),
                        ("label", e.label.unwrap_or_default()),
                        ("op", op),
                        ("rule", e.rule.map(|r| r.to_string()).unwrap_or_default()),
                    ]),
                );
                if connect_allowed {
                    // A connection may reach any other service: order it
                    // after everything they did (conservative causality).
                    trace.merge(&service, "test");
                }
                if let (Some(d), Some((category, detail))) = (&determinism, odd) {
                    let tolerated = d.tolerates(&service, category);
                    let seq = trace.emit(
                        "unmediated_io",
                        &service,
                        fields([
                            ("category", category.to_string()),
                            ("syscall", syscall.clone()),
                            ("detail", detail.clone()),
                            ("tolerated", tolerated.to_string()),
                        ]),
                    );
                    if d.strict && !tolerated {
                        let what = if detail.is_empty() {
                            syscall
                        } else {
                            format!("{syscall} {detail}")
                        };
                        lock(&violation).get_or_insert_with(|| {
                            format!(
                                "strict determinism: service {service:?} did {category} I/O Faultbox does not mediate ({what}, event #{seq}); tolerate it with determinism(allow=[\"{category}\"]) or service(\"{service}\", ..., nondeterministic_ok=[\"{category}\"])"
                            )
                        });
                    }
                }
            }
            ShimEvent::Exited { exit, .. } => {
                let expected = stopping.load(Ordering::SeqCst);
                trace.emit(
                    "service_exited",
                    &service,
                    fields([
                        ("exit_code", exit.shell_code().to_string()),
                        (
                            "signal",
                            exit.signal.map(|s| s.to_string()).unwrap_or_default(),
                        ),
                        ("expected", expected.to_string()),
                    ]),
                );
                if !expected {
                    lock(&crashes).push(Crash {
                        service: service.clone(),
                        exit,
                        log_tail: tail(&log, 15),
                    });
                }
            }
            // The launch reports its own failures; a refused rule change
            // is returned by `Shim::set_rules`.
            ShimEvent::FilterInstalled { .. }
            | ShimEvent::Started { .. }
            | ShimEvent::RulesRejected(_) => {}
        })
    }

    /// Waits until every shim has delivered the events decided so far.
    /// Requests go out to every shim first, so the waits overlap.
    pub fn sync_all(&self) {
        let running = lock(&self.running);
        let pending: Vec<(&Shim, u64)> = running
            .values()
            .filter_map(|r| r.instance.shim())
            .filter(|shim| shim.exited().is_none())
            .filter_map(|shim| shim.request_sync().map(|t| (shim, t)))
            .collect();
        for (shim, token) in pending {
            shim.wait_synced(token, Duration::from_secs(2));
        }
    }

    /// Adds a window's rules to its service's shim; on error the window
    /// is not kept.
    fn install_window(&self, window: Window) -> Result<(), HostError> {
        let service = window.service.clone();
        let mut windows = lock(&self.windows);
        windows.push(window);
        if let Err(e) = self.push_rules(&service, &windows) {
            windows.pop();
            return Err(e);
        }
        Ok(())
    }

    /// Takes a window's rules out of its shim and records their hits.
    fn remove_window(&self, id: u64) -> Result<(), HostError> {
        let service = match lock(&self.windows).iter().find(|w| w.id == id) {
            Some(w) => w.service.clone(),
            None => return Ok(()),
        };
        let mut windows = lock(&self.windows);
        let Some(at) = windows.iter().position(|w| w.id == id) else {
            return Ok(());
        };
        let window = windows.remove(at);
        let push = self.push_rules(&service, &windows);
        drop(windows);
        // The rules are out, and the shim has reported their final
        // counters (and every event decided so far).
        let stats: Vec<Option<RuleStats>> = {
            let running = lock(&self.running);
            let shim = running.get(&service).and_then(|r| r.instance.shim());
            if let Some(shim) = shim {
                shim.sync(Duration::from_secs(2));
            }
            window
                .rules
                .iter()
                .map(|r| shim.and_then(|s| s.take_rule_stats(&r.rule.id)))
                .collect()
        };
        if window.hidden {
            return match push {
                Err(_) if self.exit_of(&service).is_some() => Ok(()),
                other => other,
            };
        }
        let (mut partition_hits, mut partition_matched) = (0, 0);
        for (r, stats) in window.rules.iter().zip(stats) {
            let (fired, matched) = stats.map_or((0, 0), |s| (s.fired, s.matched));
            let hits = if window.trace { 0 } else { fired };
            if window.partition.is_some() {
                partition_hits += hits;
                partition_matched += matched;
                continue;
            }
            if matched == 0 && !window.trace {
                self.trace.emit(
                    "fault_zero_traffic",
                    &service,
                    fields([
                        ("syscall", r.keyword.clone()),
                        ("action", r.fault.kind().to_string()),
                        ("label", r.fault.label.clone().unwrap_or_default()),
                        ("path", r.rule.path.clone().unwrap_or_default()),
                    ]),
                );
            }
            self.record_fault(FaultRecord {
                service: service.clone(),
                interface: None,
                syscall: r.keyword.clone(),
                action: if window.trace {
                    "trace".into()
                } else {
                    r.fault.kind().into()
                },
                errno: r.fault.errno.clone(),
                rule: r.fault.summary(),
                label: r.fault.label.clone(),
                hits,
                matched,
                trace: window.trace,
                windows: 1,
            });
        }
        if let (Some(between), Some(r)) = (&window.partition, window.rules.first()) {
            self.record_fault(FaultRecord {
                service: service.clone(),
                interface: None,
                syscall: "connect".into(),
                action: "deny".into(),
                errno: r.fault.errno.clone(),
                rule: format!("partition({})", between.replace(',', ", ")),
                label: r.fault.label.clone(),
                hits: partition_hits,
                matched: partition_matched,
                trace: false,
                windows: 1,
            });
        } else {
            let kind = if window.trace {
                "trace_removed"
            } else {
                "fault_removed"
            };
            self.trace.emit(kind, &service, BTreeMap::new());
        }
        // A service that died mid-window cannot take new rules; that is
        // reported as a crash, not as a failure to close the window.
        match push {
            Err(_) if self.exit_of(&service).is_some() => Ok(()),
            other => other,
        }
    }

    /// The calls `--explore` holds once the services have settled (in a
    /// canonical order: service, syscall, path, then arrival), or `None`
    /// when nothing is held and the branches are done. Settled: at least
    /// as many calls held as branch calls are out, and no new one and no
    /// service thread running for 20 ms; or no new call for 250 ms (a
    /// branch call stuck on something else, a service that spins).
    fn settled_holds(
        &self,
        pending: &dyn Fn() -> usize,
    ) -> Option<Vec<(String, faultbox_agent::wire::HeldCall)>> {
        let mut last = usize::MAX;
        let mut since = Instant::now();
        let mut quiet_since = since;
        loop {
            let mut held = Vec::new();
            let mut busy = false;
            {
                let running = lock(&self.running);
                for (service, r) in running.iter() {
                    if let Some(shim) = r.instance.shim() {
                        busy |= shim.target_busy();
                        for call in shim.held(EXPLORE_TAG).unwrap_or_default() {
                            held.push((service.clone(), call));
                        }
                    }
                }
            }
            let waiting = pending();
            if held.is_empty() && waiting == 0 {
                return None;
            }
            if held.len() != last {
                last = held.len();
                since = Instant::now();
                quiet_since = since;
            }
            if busy {
                quiet_since = Instant::now();
            }
            // Every branch call still out is stuck on a held call (or the
            // wait has gone on long enough: one may be stuck elsewhere).
            let settled = (held.len() >= waiting
                && quiet_since.elapsed() >= Duration::from_millis(20))
                || since.elapsed() >= Duration::from_millis(250);
            if !held.is_empty() && settled {
                held.sort_by(|(sa, a), (sb, b)| {
                    (sa, &a.syscall, &a.path, a.seq).cmp(&(sb, &b.syscall, &b.path, b.seq))
                });
                return Some(held);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Where a connect to `service` may go, as `path` globs of connect's
    /// `ip:port`: its interfaces, where they are published, and its
    /// proxies and TLS fronts. An interface port another service declares
    /// too (containers often share one) is matched with the service's own
    /// address, so a split from one does not cut the other.
    fn destinations_of(&self, service: &str) -> Vec<String> {
        let mut out = BTreeSet::new();
        if let Some(def) = self.service(service) {
            for iface in &def.interfaces {
                let shared = self.services.iter().any(|s| {
                    s.name != service && s.interfaces.iter().any(|i| i.port == iface.port)
                });
                let own = lock(&self.running)
                    .get(service)
                    .and_then(|r| r.instance.endpoint(iface).ok());
                // An IPv6 address would need `[` in the glob, a class.
                match own {
                    Some(addr) if shared && addr.is_ipv4() => {
                        out.insert(format!("{}:{}", addr.ip(), iface.port));
                    }
                    _ => {
                        out.insert(format!("*:{}", iface.port));
                    }
                }
                if let Some(addr) = self.published(service, &iface.name) {
                    out.insert(format!("*:{}", addr.port()));
                }
                if let Some(up) = def.remote.get(&iface.name).and_then(|r| r.rsplit_once(':')) {
                    out.insert(format!("*:{}", up.1));
                }
            }
        }
        for ((s, _), proxy) in lock(&self.proxies).iter() {
            if s == service {
                out.insert(format!("*:{}", proxy.listen.port()));
            }
        }
        for ((s, _), relays) in lock(&self.tls).iter() {
            if s == service {
                out.insert(format!("*:{}", relays.front.listen.port()));
            }
        }
        out.into_iter().collect()
    }

    /// Adds a closed window's record, into the record of the same rule
    /// when there is one.
    fn record_fault(&self, record: FaultRecord) {
        let mut faults = lock(&self.faults);
        match faults.iter_mut().find(|f| f.same_rule(&record)) {
            Some(f) => {
                f.hits += record.hits;
                f.matched += record.matched;
                f.windows += record.windows;
            }
            None => faults.push(record),
        }
    }

    fn push_rules(&self, service: &str, windows: &[Window]) -> Result<(), HostError> {
        // Latest window first: the first rule that fires decides, so an
        // inner window overrides an outer one while it is open. Trace
        // rules come last so they never shadow a fault.
        let mut rules = Vec::new();
        for trace in [false, true] {
            for w in windows.iter().rev() {
                if w.service == service && w.trace == trace {
                    rules.extend(w.rules.iter().map(|r| r.rule.clone()));
                }
            }
        }
        let running = lock(&self.running);
        let not_running = |state| HostError::NotRunning {
            service: service.to_string(),
            state,
        };
        let shim = running
            .get(service)
            .and_then(|r| r.instance.shim())
            .ok_or_else(|| not_running("is not running"))?;
        if shim.exited().is_some() {
            return Err(not_running("has exited"));
        }
        shim.set_rules(rules).map_err(|e| {
            tracing::debug!(service, error = %e, "rules refused");
            HostError::Refused {
                service: service.to_string(),
                reason: e.to_string(),
            }
        })
    }

    /// Closes every window still open (a `fault_start` without its
    /// `fault_stop`), oldest last.
    pub fn close_all_windows(&self) {
        let ids: Vec<u64> = lock(&self.partitions).iter().rev().map(|p| p.id).collect();
        for id in ids {
            let _ = self.close_partition(id);
        }
        let ids: Vec<u64> = lock(&self.windows).iter().rev().map(|w| w.id).collect();
        for id in ids {
            let _ = self.close_window(id);
        }
        let ids: Vec<u64> = lock(&self.proxy_windows)
            .iter()
            .rev()
            .map(|w| w.id)
            .collect();
        for id in ids {
            self.close_proxy_window(id);
        }
    }

    /// The failed assertion, if any.
    pub fn assertion(&self) -> Option<AssertionDetail> {
        lock(&self.assertion).clone()
    }

    /// Faults and traces of the test, in the order their windows closed.
    pub fn faults(&self) -> Vec<FaultRecord> {
        lock(&self.faults).clone()
    }

    /// Waits for exits that happened but are not reported yet: a service
    /// that died during the body's last step must count as a crash even
    /// if its shim's `exited` message is still on the way.
    pub fn settle_exits(&self) {
        let running = lock(&self.running);
        for r in running.values() {
            r.instance.settle();
        }
    }

    /// Services that exited during the test and that the test did not
    /// assert on.
    pub fn unexpected_crashes(&self) -> Vec<Crash> {
        let ack = lock(&self.acknowledged).clone();
        lock(&self.crashes)
            .iter()
            .filter(|c| !ack.contains(&c.service))
            .map(|c| {
                let log = self
                    .config
                    .log_dir
                    .join(format!("{}.{}.log", self.name, c.service));
                let mut c = c.clone();
                c.log_tail = tail(&log, 15);
                c
            })
            .collect()
    }

    /// Stops every service, dependents first, and waits for their ports
    /// to close. Returns ports still taken afterwards.
    pub fn stop_services(&self) -> Vec<String> {
        self.stopping.store(true, Ordering::SeqCst);
        let order = start_order(&self.services).unwrap_or_default();
        let mut busy = Vec::new();
        for i in order.into_iter().rev() {
            let def = &self.services[i];
            let running = lock(&self.running).remove(&def.name);
            let proxies = take_service(&self.proxies, &def.name);
            let tls = take_service(&self.tls, &def.name);
            // A kept service waits for the next test, unless it died in
            // this one.
            let keep = running
                .as_ref()
                .is_some_and(|r| r.switch.is_some() && r.complete && r.instance.exited().is_none());
            if keep
                && let Some(Running {
                    instance,
                    switch: Some(switch),
                    ..
                }) = running
            {
                let name = |k: &str| (def.name.clone(), k.to_string());
                let kept = Kept {
                    instance,
                    switch,
                    proxies: proxies
                        .into_iter()
                        .map(|p| (name(&p.interface), p))
                        .collect(),
                    tls: tls.into_iter().map(|t| (name(&t.interface), t)).collect(),
                };
                lock(&self.config.kept.0).insert(def.name.clone(), kept);
                continue;
            }
            for p in proxies {
                p.stop();
            }
            for r in tls {
                r.front.stop();
                r.back.stop();
            }
            if let Some(r) = running {
                busy.extend(r.instance.stop(self.config.stop_grace));
            }
        }
        busy
    }

    /// A snapshot of the log.
    pub fn events(&self) -> Vec<Event> {
        self.trace.events()
    }

    /// The whole trace, moved out once the test is over.
    pub fn take_events(&self) -> Vec<Event> {
        self.trace.take_events()
    }
}

impl TestHost for TestRun {
    fn open_window(
        &self,
        service: &str,
        faults: Vec<(String, FaultValue)>,
        trace: bool,
        from_start: bool,
    ) -> Result<u64, HostError> {
        let def = self
            .service(service)
            .ok_or_else(|| HostError::UnknownService {
                service: service.to_string(),
            })?;
        if def.is_remote() {
            return Err(HostError::Remote {
                service: service.to_string(),
            });
        }
        if !def.seccomp {
            return Err(HostError::NoSeccomp {
                service: service.to_string(),
            });
        }
        let arch = Arch::native();
        let id = self.next_window.fetch_add(1, Ordering::SeqCst);
        let mut rules = Vec::new();
        for (keyword, fault) in faults {
            let (syscalls, path) = expand_keyword(arch, def, &keyword)?;
            if let Some(missing) = syscalls.iter().find(|s| !self.intercept.contains(s)) {
                return Err(HostError::NotFilterable {
                    service: service.to_string(),
                    keyword,
                    syscall: missing.clone(),
                });
            }
            if let Some(p) = &path {
                Glob::new(p).map_err(|e| HostError::Path {
                    keyword: keyword.clone(),
                    path: p.clone(),
                    reason: e.to_string(),
                })?;
            }
            let rule = Rule {
                id: RuleId::in_window(id, keyword.clone()),
                syscalls,
                action: fault.action,
                probability: fault.probability,
                path,
                trigger: fault.trigger,
                label: fault.label.clone(),
            };
            rules.push(WindowRule {
                keyword,
                rule,
                fault,
            });
        }
        let kind = if trace {
            "trace_applied"
        } else {
            "fault_applied"
        };
        let mut f = BTreeMap::new();
        for r in &rules {
            let mut text = format!(
                "{} → filter:[{}]",
                if trace {
                    "trace".to_string()
                } else {
                    r.fault.summary()
                },
                r.rule.syscalls.join(",")
            );
            if let Some(l) = &r.fault.label {
                text.push_str(&format!(" label={l:?}"));
            }
            f.insert(r.keyword.clone(), text);
        }
        self.install_window(Window {
            id,
            service: service.to_string(),
            trace,
            from_start,
            rules,
            partition: None,
            hidden: false,
        })?;
        self.trace.emit(kind, service, f);
        Ok(id)
    }

    fn close_window(&self, id: u64) -> Result<(), HostError> {
        self.remove_window(id)
    }

    fn open_partition(&self, a: &str, b: &str) -> Result<u64, HostError> {
        let mut opened: Vec<u64> = Vec::new();
        let between = format!("{a},{b}");
        let mut cut = Vec::new();
        for (from, to) in [(a, b), (b, a)] {
            let def = self
                .service(from)
                .ok_or_else(|| HostError::UnknownService {
                    service: from.to_string(),
                })?;
            if self.service(to).is_none() {
                return Err(HostError::UnknownService {
                    service: to.to_string(),
                });
            }
            // A remote service or one without a shim dials nothing we
            // can refuse; the other side's rules still cut the link.
            if def.is_remote() || !def.seccomp {
                continue;
            }
            if !self.intercept.iter().any(|s| s == "connect") {
                return Err(HostError::NotFilterable {
                    service: from.to_string(),
                    keyword: "partition".into(),
                    syscall: "connect".into(),
                });
            }
            let id = self.next_window.fetch_add(1, Ordering::SeqCst);
            let fault = FaultValue {
                action: Action::Deny {
                    errno: libc::ECONNREFUSED,
                },
                probability: 1.0,
                label: Some(format!("partition({a}, {b})")),
                trigger: Trigger::Always,
                errno: Some("ECONNREFUSED".into()),
            };
            let destinations = self.destinations_of(to);
            cut.push(format!("{from}→{to}:{}", destinations.join(",")));
            let rules = destinations
                .iter()
                .map(|dest| WindowRule {
                    keyword: format!("connect:{dest}"),
                    rule: Rule {
                        id: RuleId::in_window(id, format!("partition:{dest}")),
                        syscalls: vec!["connect".into()],
                        action: fault.action,
                        probability: 1.0,
                        path: Some(dest.clone()),
                        trigger: Trigger::Always,
                        label: fault.label.clone(),
                    },
                    fault: fault.clone(),
                })
                .collect();
            let installed = self.install_window(Window {
                id,
                service: from.to_string(),
                trace: false,
                from_start: false,
                rules,
                partition: Some(between.clone()),
                hidden: false,
            });
            if let Err(e) = installed {
                for w in opened {
                    let _ = self.remove_window(w);
                }
                return Err(e);
            }
            opened.push(id);
        }
        if opened.is_empty() {
            let remote = self.service(a).is_some_and(ServiceDef::is_remote);
            return Err(if remote {
                HostError::Remote {
                    service: a.to_string(),
                }
            } else {
                HostError::NoSeccomp {
                    service: a.to_string(),
                }
            });
        }
        let id = self.next_window.fetch_add(1, Ordering::SeqCst);
        lock(&self.partitions).push(Partition {
            id,
            a: a.to_string(),
            b: b.to_string(),
            windows: opened,
        });
        self.trace.emit(
            "partition_applied",
            "test",
            fields([("between", between), ("refused", cut.join(" "))]),
        );
        Ok(id)
    }

    fn close_partition(&self, id: u64) -> Result<(), HostError> {
        let p = {
            let mut all = lock(&self.partitions);
            let Some(at) = all.iter().position(|p| p.id == id) else {
                return Ok(());
            };
            all.remove(at)
        };
        let mut result = Ok(());
        for w in &p.windows {
            if let Err(e) = self.remove_window(*w) {
                result = result.and(Err(e));
            }
        }
        self.trace.emit(
            "partition_removed",
            "test",
            fields([("between", format!("{},{}", p.a, p.b))]),
        );
        result
    }

    fn release(
        &self,
        tag: &str,
        deny: Option<i32>,
        limit: Option<u64>,
        timeout: Duration,
    ) -> Result<u64, HostError> {
        let (mut services, mut known) = (Vec::new(), BTreeSet::new());
        for w in lock(&self.windows).iter() {
            for r in &w.rules {
                if r.rule.action != Action::Hold {
                    continue;
                }
                let Some(label) = &r.rule.label else { continue };
                if w.hidden {
                    continue;
                }
                if label == tag && !services.contains(&w.service) {
                    services.push(w.service.clone());
                }
                known.insert(label.clone());
            }
        }
        if services.is_empty() {
            let known = if known.is_empty() {
                String::new()
            } else {
                format!(
                    "; in force: {}",
                    known.into_iter().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(HostError::UnknownTag {
                tag: tag.to_string(),
                known,
            });
        }
        let deadline = Instant::now() + timeout;
        loop {
            let mut answered = 0;
            {
                let running = lock(&self.running);
                for service in &services {
                    let Some(shim) = running.get(service).and_then(|r| r.instance.shim()) else {
                        continue;
                    };
                    let left = limit.map(|n| n.saturating_sub(answered));
                    if left == Some(0) {
                        break;
                    }
                    answered += shim.release(tag, deny, left, None).unwrap_or(0);
                }
            }
            if answered > 0 {
                return Ok(answered);
            }
            if Instant::now() >= deadline {
                return Err(HostError::NothingHeld {
                    tag: tag.to_string(),
                    waited: faultbox_agent::rule::format_duration(timeout),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn explore_begin(&self) -> bool {
        if self.config.explore.is_none() {
            return false;
        }
        // A call the spec's own hold() parks stays the spec's to release.
        let user_held: BTreeSet<String> = lock(&self.windows)
            .iter()
            .flat_map(|w| w.rules.iter())
            .filter(|r| r.rule.action == Action::Hold)
            .flat_map(|r| r.rule.syscalls.iter().cloned())
            .collect();
        let syscalls: Vec<String> = self
            .intercept
            .iter()
            .filter(|s| EXPLORE_SYSCALLS.contains(&s.as_str()) && !user_held.contains(*s))
            .cloned()
            .collect();
        if syscalls.is_empty() {
            return false;
        }
        let services: Vec<String> = lock(&self.running)
            .iter()
            .filter(|(_, r)| r.instance.shim().is_some())
            .map(|(name, _)| name.clone())
            .collect();
        let mut opened = Vec::new();
        for service in services {
            let id = self.next_window.fetch_add(1, Ordering::SeqCst);
            let fault = FaultValue {
                action: Action::Hold,
                probability: 1.0,
                label: Some(EXPLORE_TAG.into()),
                trigger: Trigger::Always,
                errno: None,
            };
            let rule = WindowRule {
                keyword: "explore".into(),
                rule: Rule {
                    id: RuleId::in_window(id, "explore"),
                    syscalls: syscalls.clone(),
                    action: Action::Hold,
                    probability: 1.0,
                    path: None,
                    trigger: Trigger::Always,
                    label: fault.label.clone(),
                },
                fault,
            };
            let installed = self.install_window(Window {
                id,
                service: service.clone(),
                trace: false,
                from_start: false,
                rules: vec![rule],
                partition: None,
                hidden: true,
            });
            if installed.is_ok() {
                opened.push(id);
            }
        }
        let exploring = !opened.is_empty();
        *lock(&self.explore_windows) = opened;
        exploring
    }

    fn explore_finish(&self, pending: &dyn Fn() -> usize) {
        if self.config.explore.is_none() {
            return;
        }
        let mut round = 0;
        while let Some(held) = self.settled_holds(pending) {
            round += 1;
            let n = held.len();
            let f = factorial(n).max(1);
            let order = {
                let mut rest = lock(&self.explore_rest);
                let left = rest.unwrap_or(0);
                *rest = Some(left / f);
                permutation(n, left % f)
            };
            self.trace.emit(
                "explore_round",
                "test",
                fields([
                    ("round", round.to_string()),
                    ("held", n.to_string()),
                    (
                        "order",
                        order
                            .iter()
                            .map(|i| {
                                let (service, call) = &held[*i];
                                format!("{service}:{}", call.syscall)
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                ]),
            );
            for i in order {
                let (service, call) = &held[i];
                if let Some(shim) = lock(&self.running)
                    .get(service)
                    .and_then(|r| r.instance.shim())
                {
                    let _ = shim.release(EXPLORE_TAG, None, None, Some(call.seq));
                }
                // One call at a time: the next is let go once the kernel
                // has had the time to run this one.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let windows = std::mem::take(&mut *lock(&self.explore_windows));
        for id in windows {
            let _ = self.remove_window(id);
        }
    }

    fn latest_partition(&self, a: &str, b: &str) -> Option<u64> {
        lock(&self.partitions)
            .iter()
            .rev()
            .find(|p| (p.a == a && p.b == b) || (p.a == b && p.b == a))
            .map(|p| p.id)
    }

    fn latest_started_window(&self, service: &str, trace: bool) -> Option<u64> {
        lock(&self.windows)
            .iter()
            .rev()
            .find(|w| w.service == service && w.from_start && w.trace == trace)
            .map(|w| w.id)
    }

    fn open_proxy_window(
        &self,
        service: &str,
        interface: &str,
        rules: Vec<ProxyRuleDef>,
        from_start: bool,
    ) -> Result<u64, HostError> {
        let id = self.next_window.fetch_add(1, Ordering::SeqCst);
        let proxies = lock(&self.proxies);
        let proxy = proxies
            .get(&(service.to_string(), interface.to_string()))
            .ok_or_else(|| HostError::NoProxy {
                service: service.to_string(),
                interface: interface.to_string(),
            })?;
        for r in &rules {
            r.check(&proxy.protocol).map_err(|e| HostError::ProxyRule {
                service: service.to_string(),
                interface: interface.to_string(),
                reason: e.to_string(),
            })?;
        }
        let named: Vec<(RuleId, ProxyRuleDef)> = rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| (RuleId::in_window(id, i.to_string()), r))
            .collect();
        proxy
            .rules()
            .push_front(
                faultbox_agent::engine::derive_seed(self.seed, &format!("{service}.{interface}")),
                named.clone(),
            )
            .map_err(|e| HostError::ProxyRule {
                service: service.to_string(),
                interface: interface.to_string(),
                reason: e.to_string(),
            })?;
        let described: Vec<String> = named
            .iter()
            .map(|(_, r)| format!("{}({})", r.action.kind(), r.matcher()))
            .collect();
        self.trace.emit(
            "proxy_fault_applied",
            service,
            fields([
                ("interface", interface.to_string()),
                ("protocol", proxy.protocol.clone()),
                ("proxy", proxy.listen.to_string()),
                ("rules", described.join(", ")),
            ]),
        );
        drop(proxies);
        lock(&self.proxy_windows).push(ProxyWindow {
            id,
            service: service.to_string(),
            interface: interface.to_string(),
            from_start,
            rules: named,
        });
        Ok(id)
    }

    fn latest_started_proxy_window(&self, service: &str, interface: &str) -> Option<u64> {
        lock(&self.proxy_windows)
            .iter()
            .rev()
            .find(|w| w.service == service && w.interface == interface && w.from_start)
            .map(|w| w.id)
    }

    fn close_proxy_window(&self, id: u64) {
        let window = {
            let mut windows = lock(&self.proxy_windows);
            let Some(at) = windows.iter().position(|w| w.id == id) else {
                return;
            };
            windows.remove(at)
        };
        // The proxy's own counters: every request decided while the
        // window was open, whenever its connection ends.
        let stats = lock(&self.proxies)
            .get(&(window.service.clone(), window.interface.clone()))
            .map(|p| p.rules().remove(id))
            .unwrap_or_default();
        for (rule_id, r) in &window.rules {
            let (matched, hits) = stats
                .iter()
                .find(|s| &s.id == rule_id)
                .map_or((0, 0), |s| (s.matched, s.fired));
            self.record_fault(FaultRecord {
                service: window.service.clone(),
                interface: Some(window.interface.clone()),
                syscall: r.matcher(),
                action: r.action.kind().into(),
                rule: format!("{}({})", r.action.kind(), r.matcher()),
                errno: None,
                label: r.label.clone(),
                hits,
                matched,
                trace: false,
                windows: 1,
            });
        }
        self.trace.emit(
            "proxy_fault_removed",
            &window.service,
            fields([("interface", window.interface.clone())]),
        );
    }

    fn count_assertion(&self) {
        self.assertions.fetch_add(1, Ordering::SeqCst);
    }

    fn record_assertion(&self, detail: AssertionDetail) {
        let mut slot = lock(&self.assertion);
        if slot.is_none() {
            *slot = Some(detail);
        }
    }

    fn events(&self) -> Vec<Event> {
        self.sync_all();
        self.trace.events()
    }

    fn events_after(&self, after: u64) -> Vec<Event> {
        self.sync_all();
        self.trace.events_after(after)
    }

    fn violation(&self) -> Option<String> {
        // Strict: what the services decided up to now counts, so a step
        // that made a service read the clock fails the step's line.
        if self.determinism.get().is_some_and(|d| d.strict) {
            self.sync_all();
        }
        self.determinism_violation()
    }

    fn acknowledge_exit(&self, service: &str) {
        lock(&self.acknowledged).insert(service.to_string());
    }

    fn step(&self, call: &StepCall) -> StepResult {
        let addr = self.step_addr(&call.service, &call.interface, call.port);
        let target = call.service.clone();
        let mut send = fields([
            ("target", target.clone()),
            ("method", call.method.clone()),
            ("interface", call.interface.clone()),
            ("protocol", call.protocol.clone()),
            ("spec", self.name.clone()),
        ]);
        let Some(proto) = faultbox_proxy::protocol::get(&call.protocol) else {
            return StepResult::Raise(format!(
                "{}.{}: no steps for protocol {:?}",
                call.service, call.interface, call.protocol
            ));
        };
        send.extend(proto.describe_step(call));
        let started = Instant::now();
        // Calls the services made before the step are logged before it.
        self.sync_all();
        self.trace.emit("step_send", "test", send);
        self.trace.merge(&target, "test");
        let tls = self.step_tls(&call.service, &call.interface);
        let env = self.service(&target).map_or(&[][..], |s| s.env.as_slice());
        let mut result = proto.step(
            call,
            &Target {
                addr: &addr,
                tls: tls.as_ref(),
                env,
            },
        );
        let elapsed = started.elapsed().as_millis() as i64;
        // Every call the step caused, in any service, is logged before its
        // answer: the trace's order is the causal one.
        self.sync_all();
        self.trace.merge("test", &target);
        let method = call.method.clone();
        let recv = match &mut result {
            StepResult::Reply(r) => {
                r.duration_ms = elapsed;
                let mut recv = fields([
                    ("target", target.clone()),
                    ("method", method.clone()),
                    ("duration_ms", elapsed.to_string()),
                    ("success", r.ok.to_string()),
                    ("error", r.error.clone()),
                ]);
                if r.status != 0 {
                    recv.insert("status_code".into(), r.status.to_string());
                    if !(200..300).contains(&r.status) {
                        recv.insert("body".into(), r.body.chars().take(2048).collect());
                    }
                }
                let summary = if !r.ok {
                    format!("← {target}.{method}  error: {}", r.error)
                } else if r.status != 0 {
                    format!("← {target}.{method}  [{}]", r.status)
                } else {
                    format!("← {target}.{method}  ok")
                };
                recv.insert("summary".into(), summary);
                recv
            }
            StepResult::Text(line) => fields([
                ("target", target.clone()),
                ("method", method.clone()),
                ("body", line.chars().take(2048).collect()),
                ("duration_ms", elapsed.to_string()),
                ("success", "true".into()),
                ("summary", format!("← {target}.{method} {line}")),
            ]),
            StepResult::Raise(e) => fields([
                ("target", target.clone()),
                ("method", method.clone()),
                ("duration_ms", elapsed.to_string()),
                ("success", "false".into()),
                ("error", e.clone()),
                ("summary", format!("← {target}.{method} error")),
            ]),
        };
        self.trace.emit("step_recv", "test", recv);
        result
    }

    fn proxy_addr(&self, service: &str, interface: &str) -> Option<String> {
        self.public_addr(service, interface).map(|a| a.to_string())
    }

    fn published_addr(&self, service: &str, interface: &str) -> Option<std::net::SocketAddr> {
        self.published(service, interface)
    }
}

/// Expands a fault keyword: an op of the service, a family, or a syscall.
pub fn expand_keyword(
    arch: Arch,
    def: &ServiceDef,
    keyword: &str,
) -> Result<(Vec<String>, Option<String>), HostError> {
    let mut out: Vec<String> = Vec::new();
    let (names, path) = match def.ops.get(keyword) {
        Some(op) => (op.syscalls.clone(), op.path.clone()),
        None => (vec![keyword.to_string()], None),
    };
    for name in &names {
        let expanded = faultbox_agent::syscalls::expand_family(arch, name);
        for s in expanded {
            if arch.number(s).is_none() {
                let suggestion = faultbox_agent::errno::closest(name, arch.all_names())
                    .map(|c| format!(" (did you mean {c}?)"))
                    .unwrap_or_default();
                let ops = if def.ops.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {:?} declares ops: {}",
                        def.name,
                        def.ops.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                };
                return Err(HostError::UnknownKeyword {
                    service: def.name.clone(),
                    keyword: name.clone(),
                    hint: format!("{suggestion}{ops}"),
                });
            }
            let s = s.to_string();
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    Ok((out, path))
}

/// Replaces `from` (a `host:port`) in `text` unless more digits follow or
/// more of a host name precedes, so `localhost:80` does not rewrite
/// `localhost:8080`, nor `db:5432` rewrite `orders-db:5432`.
fn replace_addr(text: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(from) {
        let after = &rest[i + from.len()..];
        let before = rest[..i].chars().last().or_else(|| out.chars().last());
        out.push_str(&rest[..i]);
        let glued = before.is_some_and(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if glued || after.starts_with(|c: char| c.is_ascii_digit()) {
            out.push_str(from);
        } else {
            out.push_str(to);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// One healthcheck attempt; `ready()` probes `ready_at`, where the
/// backend says the service's first interface is, over TLS with `tls`.
pub fn probe(
    check: &Healthcheck,
    def: &ServiceDef,
    ready_at: Option<std::net::SocketAddr>,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let timeout = timeout.max(Duration::from_millis(50));
    match check {
        Healthcheck::Ready { .. } => {
            let (Some(iface), Some(at)) = (def.interfaces.first(), ready_at) else {
                return Err(ProbeError::NoInterface);
            };
            let addr = at.to_string();
            let target = Target {
                addr: &addr,
                tls,
                env: &def.env,
            };
            match faultbox_proxy::protocol::get(&iface.protocol) {
                Some(p) => Ok(p.ready(&target, timeout)?),
                None => Err(ProbeError::NoProbe {
                    protocol: iface.protocol.clone(),
                }),
            }
        }
        Healthcheck::Tcp { addr, .. } => Ok(net::connect(addr, timeout).map(|_| ())?),
        Healthcheck::Http {
            url, expect_status, ..
        } => {
            let (addr, path) = faultbox_proxy::steps::split_url(url)?;
            let r = net::http_request(&addr, "GET", &path, &[], &[], timeout, None)?;
            let good = match expect_status {
                Some(want) => r.status == *want,
                None => (200..400).contains(&r.status),
            };
            if good {
                Ok(())
            } else {
                Err(ProbeError::Status(r.status))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultbox_spec::model::OpDef;

    fn svc(name: &str, deps: &[&str]) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            binary: "/bin/true".into(),
            args: vec![],
            env: vec![],
            interfaces: vec![],
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            healthcheck: None,
            ops: BTreeMap::new(),
            user: None,
            remote: Default::default(),
            container: None,
            seccomp: true,
            reuse: false,
            declared_at: String::new(),
        }
    }

    #[test]
    fn dependencies_start_first() {
        let s = vec![
            svc("api", &["db", "cache"]),
            svc("db", &[]),
            svc("cache", &["db"]),
        ];
        let order: Vec<&str> = start_order(&s)
            .expect("order")
            .into_iter()
            .map(|i| s[i].name.as_str())
            .collect();
        assert_eq!(order, ["db", "cache", "api"]);
    }

    #[test]
    fn cycles_are_named() {
        let s = vec![svc("a", &["b"]), svc("b", &["a"])];
        let e = start_order(&s).expect_err("cycle").to_string();
        assert!(e.contains("a → b → a"), "{e}");
        let e = start_order(&[svc("a", &["ghost"])])
            .expect_err("missing")
            .to_string();
        assert!(e.contains("\"ghost\""), "{e}");
    }

    #[test]
    fn keywords_expand_ops_and_families() {
        let arch = Arch::native();
        let mut s = svc("db", &[]);
        s.ops.insert(
            "persist".into(),
            OpDef {
                syscalls: vec!["write".into(), "fsync".into()],
                path: Some("*.wal".into()),
            },
        );
        let (sc, path) = expand_keyword(arch, &s, "persist").expect("op");
        assert_eq!(
            sc,
            [
                "write",
                "writev",
                "pwrite64",
                "pwritev",
                "pwritev2",
                "fsync",
                "fdatasync"
            ]
        );
        assert_eq!(path.as_deref(), Some("*.wal"));
        let (sc, _) = expand_keyword(arch, &s, "connect").expect("raw");
        assert_eq!(sc, ["connect"]);
        let e = expand_keyword(arch, &s, "fsyncc")
            .expect_err("typo")
            .to_string();
        assert!(
            e.contains("did you mean fsync?") && e.contains("persist"),
            "{e}"
        );
    }
}
