//! Container mode: `image=` and `build=` services in Docker containers,
//! each with `faultbox-shim` as its entrypoint.
//!
//! One [`Docker`] serves a whole run (a suite): it holds the Engine API
//! client, the run's bridge network (`faultbox-<run>`) and the images it
//! prepared. Each test gets fresh containers (a `reuse=True` service keeps
//! one for the run, see `runtime::KeptServices`); every container and network
//! carries labels naming the run and the process that owns it, so the next
//! run removes what a run that died left behind, and never anything else.
//!
//! The shim is bind-mounted read-only at `/faultbox/shim` and dials its
//! controller over a Unix socket in a bind-mounted per-container directory
//! (`/faultbox/run/control.sock`). The image's ENTRYPOINT and CMD (or
//! `entrypoint=`/`args=`) become the shim's target, so the filter is in
//! place before the image's own entrypoint runs and covers whatever it
//! forks. Docker's default seccomp profile stays on: it allows user
//! notification, and the agent reads target memory through
//! `/proc/<pid>/mem` where the profile refuses `process_vm_readv`.
//!
//! Addresses: the proxies listen on the network's gateway, which the host
//! owns and every container reaches; the proxy relays to the container's
//! address on the network directly (no userland port forwarder in the
//! data path), and healthchecks probe that address too, so a `tcp()`
//! check proves the service itself listens (Docker's port forwarder
//! accepts before the service does). Interface ports are also published on
//! 127.0.0.1 (random ports unless `ports=` fixes them): that is the
//! `.addr` a test reads.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker as Client;
use bollard::errors::Error as ApiError;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, NetworkCreateRequest, NetworkingConfig,
    PortBinding,
};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, CreateImageOptions, InspectNetworkOptions,
    ListContainersOptions, ListNetworksOptions, LogsOptions, RemoveContainerOptions,
    StopContainerOptions, WaitContainerOptions,
};
use faultbox_agent::wire::{Isolation, LaunchSpec, OnDisconnect};
use faultbox_spec::model::{ContainerDef, ImageSource, InterfaceDef, ServiceDef};
use futures_util::StreamExt;

use crate::backend::{Backend, BackendError, Instance, Launch};
use crate::shim::{ExitInfo, Shim};

/// How long a missing image may take to pull, unless
/// `FAULTBOX_PULL_TIMEOUT` (seconds) says otherwise.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(120);

fn pull_timeout() -> Duration {
    std::env::var("FAULTBOX_PULL_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(PULL_TIMEOUT, Duration::from_secs)
}
/// How long a container's shim may take to dial in.
const DIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Labels on everything Faultbox creates.
const LABEL_RUN: &str = "faultbox.run";
const LABEL_OWNER: &str = "faultbox.owner";
const LABEL_SERVICE: &str = "faultbox.service";
/// Where the shim and its control socket appear in a container.
const SHIM_IN_CONTAINER: &str = "/faultbox/shim";
const RUN_IN_CONTAINER: &str = "/faultbox/run";

/// Why container mode could not do something.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// No engine answers.
    #[error(
        "Docker is not reachable at {host} ({reason}); start dockerd (scripts/setup starts one) or set DOCKER_HOST to the engine's socket"
    )]
    Unreachable {
        /// The socket or URL tried.
        host: String,
        /// What the client said.
        reason: String,
    },
    /// An image that is neither here nor pullable.
    #[error("service {service:?}: image {image:?} is not here and could not be pulled: {reason}")]
    Pull {
        service: String,
        image: String,
        reason: String,
    },
    /// A pull that took too long.
    #[error(
        "service {service:?}: pulling image {image:?} took longer than {secs}s; pull it yourself (docker pull {image}), or allow longer with FAULTBOX_PULL_TIMEOUT=<seconds>"
    )]
    PullTimeout {
        service: String,
        image: String,
        secs: u64,
    },
    /// `build=` naming a directory without a Dockerfile.
    #[error(
        "service {service:?}: build={dir:?} has no Dockerfile ({}); point build= at the directory that holds it",
        path.display()
    )]
    NoDockerfile {
        service: String,
        dir: String,
        path: PathBuf,
    },
    /// A build that failed.
    #[error("service {service:?}: building {dir:?} failed: {reason}{output}")]
    Build {
        service: String,
        dir: String,
        reason: String,
        /// The build's last lines, with their separator.
        output: String,
    },
    /// Nothing to run.
    #[error(
        "service {service:?}: image {image:?} has neither ENTRYPOINT nor CMD; give the program with args=[...] (or entrypoint=[...])"
    )]
    NoCommand { service: String, image: String },
    /// A host port in `ports=` (or a published one) that is taken.
    #[error(
        "service {service:?}: host port {port} is already in use (ports={{...}}); free it or map another port (0 picks a free one)"
    )]
    HostPortBusy { service: String, port: u16 },
    /// The container ended before its target was running.
    #[error("service {service:?}: its container exited with code {code} as it started{output}")]
    ExitedAtStart {
        service: String,
        code: i64,
        /// Its last log lines, with their separator.
        output: String,
    },
    /// The shim dialled in but could not be served.
    #[error("service {service:?}: the shim in its container failed: {reason}{output}")]
    Shim {
        service: String,
        reason: String,
        output: String,
    },
    /// The shim never dialled in.
    #[error(
        "service {service:?}: the shim in its container did not connect within {}s{output}",
        DIAL_TIMEOUT.as_secs()
    )]
    NoDial { service: String, output: String },
    /// Anything else the engine refused.
    #[error("Docker: {what}: {reason}")]
    Api { what: String, reason: String },
}

fn api(what: impl Into<String>) -> impl FnOnce(ApiError) -> DockerError {
    let what = what.into();
    move |e| DockerError::Api {
        what,
        reason: reason(&e),
    }
}

/// The engine's own message, without the client's wrapping.
fn reason(e: &ApiError) -> String {
    match e {
        ApiError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        ApiError::DockerStreamError { error } => error.trim().to_string(),
        other => other.to_string(),
    }
}

fn not_found(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// What a container's image says it runs.
#[derive(Debug, Clone, Default)]
struct ImageInfo {
    reference: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    workdir: Option<String>,
}

/// The engine, the run's network and the images prepared for it.
pub struct Docker {
    client: Client,
    rt: tokio::runtime::Runtime,
    run: String,
    network: String,
    /// The network's gateway: this machine, as containers see it.
    pub gateway: Ipv4Addr,
    /// Per-container directories holding control sockets.
    sockets: PathBuf,
    images: Mutex<BTreeMap<String, ImageInfo>>,
    next: AtomicU64,
    /// Time spent waiting for the engine, for benchmarks.
    engine_ns: AtomicU64,
}

impl std::fmt::Debug for Docker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Docker")
            .field("run", &self.run)
            .field("network", &self.network)
            .field("gateway", &self.gateway)
            .finish()
    }
}

impl Docker {
    /// Connects to the engine (`DOCKER_HOST`, or the default socket),
    /// removes what dead runs left, and creates this run's network.
    pub fn connect(work_dir: &Path) -> Result<Docker, DockerError> {
        let host = std::env::var("DOCKER_HOST")
            .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string());
        let unreachable = |reason: String| DockerError::Unreachable {
            host: host.clone(),
            reason,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("docker")
            .enable_all()
            .build()
            .map_err(|e| unreachable(format!("start the client runtime: {e}")))?;
        let client = Client::connect_with_defaults().map_err(|e| unreachable(reason(&e)))?;
        // The engine may be older than the client: speak its version.
        let client = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), async {
                    client.ping().await?;
                    client.negotiate_version().await
                })
                .await
            })
            .map_err(|_| unreachable("no answer within 10s".into()))?
            .map_err(|e| unreachable(reason(&e)))?;
        let run = format!("{:08x}", faultbox_agent::engine::random_seed() as u32);
        let sockets = work_dir.join(format!("docker-{run}"));
        std::fs::create_dir_all(&sockets).map_err(|e| DockerError::Api {
            what: format!("create {}", sockets.display()),
            reason: e.to_string(),
        })?;
        let mut docker = Docker {
            client,
            rt,
            network: format!("faultbox-{run}"),
            run,
            gateway: Ipv4Addr::UNSPECIFIED,
            sockets,
            images: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(1),
            engine_ns: AtomicU64::new(0),
        };
        docker.remove_stale();
        docker.gateway = docker.create_network()?;
        Ok(docker)
    }

    /// Waits for an Engine API call, counting the time.
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        let t = Instant::now();
        let out = self.rt.block_on(f);
        self.engine_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// How long this run has waited for the engine so far (creating,
    /// starting, inspecting, stopping and removing; pulls and builds).
    pub fn engine_time(&self) -> Duration {
        Duration::from_nanos(self.engine_ns.load(Ordering::Relaxed))
    }

    /// This run's id, as its labels carry it.
    pub fn run_id(&self) -> &str {
        &self.run
    }

    /// The run's network name.
    pub fn network(&self) -> &str {
        &self.network
    }

    fn labels(&self, service: Option<&str>) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (LABEL_RUN.to_string(), self.run.clone()),
            (LABEL_OWNER.to_string(), owner_tag(std::process::id())),
        ]);
        if let Some(s) = service {
            labels.insert(LABEL_SERVICE.to_string(), s.to_string());
        }
        labels
    }

    /// Removes containers and networks whose owning faultbox is gone. Only
    /// what carries Faultbox's labels is considered, and a live run's
    /// things are left alone.
    fn remove_stale(&self) {
        let filters = HashMap::from([("label".to_string(), vec![LABEL_RUN.to_string()])]);
        self.block_on(async {
            let containers = self
                .client
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: Some(filters.clone()),
                    ..Default::default()
                }))
                .await
                .unwrap_or_default();
            for c in containers {
                let owner = c.labels.as_ref().and_then(|l| l.get(LABEL_OWNER));
                if owner.is_some_and(|o| owner_alive(o)) {
                    continue;
                }
                if let Some(id) = c.id {
                    tracing::debug!(container = %id, "removing a container a dead run left");
                    let _ = self.client.remove_container(&id, Some(force())).await;
                }
            }
            let networks = self
                .client
                .list_networks(Some(ListNetworksOptions {
                    filters: Some(filters),
                }))
                .await
                .unwrap_or_default();
            for n in networks {
                let owner = n.labels.as_ref().and_then(|l| l.get(LABEL_OWNER));
                if owner.is_some_and(|o| owner_alive(o)) {
                    continue;
                }
                if let Some(id) = n.id {
                    tracing::debug!(network = %id, "removing a network a dead run left");
                    let _ = self.client.remove_network(&id).await;
                }
            }
        });
    }

    fn create_network(&self) -> Result<Ipv4Addr, DockerError> {
        let request = NetworkCreateRequest {
            name: self.network.clone(),
            driver: Some("bridge".into()),
            labels: Some(self.labels(None)),
            ..Default::default()
        };
        self.block_on(async {
            self.client
                .create_network(request)
                .await
                .map_err(api(format!("create network {}", self.network)))?;
            let inspect = self
                .client
                .inspect_network(&self.network, None::<InspectNetworkOptions>)
                .await
                .map_err(api(format!("inspect network {}", self.network)))?;
            inspect
                .ipam
                .and_then(|i| i.config)
                .into_iter()
                .flatten()
                .filter_map(|c| c.gateway)
                .find_map(|g| g.parse::<Ipv4Addr>().ok())
                .ok_or_else(|| DockerError::Api {
                    what: format!("network {}", self.network),
                    reason: "it has no IPv4 gateway".into(),
                })
        })
    }

    /// Everything about the container services that can be checked before
    /// one starts: each image is here (pulled or built), has something to
    /// run, and each fixed host port is free.
    pub fn prepare(&self, services: &[ServiceDef], spec_dir: &Path) -> Result<(), DockerError> {
        for def in services {
            let Some(c) = &def.container else { continue };
            let image = self.image(def, c, spec_dir)?;
            command(def, c, &image)?;
            for host in c.ports.values().copied().filter(|p| *p != 0) {
                if std::net::TcpListener::bind(("127.0.0.1", host)).is_err() {
                    return Err(DockerError::HostPortBusy {
                        service: def.name.clone(),
                        port: host,
                    });
                }
            }
        }
        Ok(())
    }

    /// The image `def` runs, pulled or built once per run.
    fn image(
        &self,
        def: &ServiceDef,
        c: &ContainerDef,
        spec_dir: &Path,
    ) -> Result<ImageInfo, DockerError> {
        if let Some(info) = lock(&self.images).get(&def.name) {
            return Ok(info.clone());
        }
        let reference = match &c.image {
            ImageSource::Pull(image) => {
                self.pull_if_missing(&def.name, image)?;
                image.clone()
            }
            ImageSource::Build(dir) => self.build(&def.name, dir, spec_dir)?,
        };
        let inspect = self
            .block_on(self.client.inspect_image(&reference))
            .map_err(api(format!("inspect image {reference}")))?;
        let config = inspect.config.unwrap_or_default();
        let info = ImageInfo {
            reference,
            entrypoint: config.entrypoint.unwrap_or_default(),
            cmd: config.cmd.unwrap_or_default(),
            env: config.env.unwrap_or_default(),
            workdir: config.working_dir.filter(|w| !w.is_empty()),
        };
        lock(&self.images).insert(def.name.clone(), info.clone());
        Ok(info)
    }

    fn pull_if_missing(&self, service: &str, image: &str) -> Result<(), DockerError> {
        match self.block_on(self.client.inspect_image(image)) {
            Ok(_) => return Ok(()),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(api(format!("inspect image {image}"))(e)),
        }
        let timeout = pull_timeout();
        eprintln!(
            "faultbox: pulling image {image} (up to {}s)",
            timeout.as_secs()
        );
        let (from_image, tag) = split_reference(image);
        let options = CreateImageOptions {
            from_image: Some(from_image),
            tag,
            ..Default::default()
        };
        let pull = async {
            let mut stream = self.client.create_image(Some(options), None, None);
            let mut last = String::new();
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| reason(&e))?;
                if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                    return Err(detail);
                }
                if let Some(status) = info.status {
                    let line = match info.id {
                        Some(id) => format!("{id}: {status}"),
                        None => status,
                    };
                    // Progress bars repeat; say each stage once.
                    if line != last && !line.contains("Downloading") && !line.contains("Extracting")
                    {
                        eprintln!("faultbox: {image}: {line}");
                        last = line;
                    }
                }
            }
            Ok(())
        };
        match self.block_on(async { tokio::time::timeout(timeout, pull).await }) {
            Err(_) => Err(DockerError::PullTimeout {
                service: service.to_string(),
                image: image.to_string(),
                secs: timeout.as_secs(),
            }),
            Ok(Err(reason)) => Err(DockerError::Pull {
                service: service.to_string(),
                image: image.to_string(),
                reason,
            }),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Builds `faultbox-<service>:<digest of the context>`, or reuses it
    /// while the context is unchanged.
    fn build(&self, service: &str, dir: &str, spec_dir: &Path) -> Result<String, DockerError> {
        let context: PathBuf = spec_dir.join(dir).components().collect();
        let dockerfile = context.join("Dockerfile");
        if !dockerfile.is_file() {
            return Err(DockerError::NoDockerfile {
                service: service.to_string(),
                dir: dir.to_string(),
                path: dockerfile,
            });
        }
        let failed = |reason: String, output: String| DockerError::Build {
            service: service.to_string(),
            dir: dir.to_string(),
            reason,
            output,
        };
        let digest = context_digest(&context).map_err(|e| failed(e.to_string(), String::new()))?;
        let tag = format!("faultbox-{}:{}", tag_name(service), &digest[..16]);
        if self.block_on(self.client.inspect_image(&tag)).is_ok() {
            return Ok(tag);
        }
        eprintln!("faultbox: building {tag} from {}", context.display());
        let mut archive = tar::Builder::new(Vec::new());
        archive.follow_symlinks(false);
        archive
            .append_dir_all(".", &context)
            .map_err(|e| failed(format!("pack {}: {e}", context.display()), String::new()))?;
        let body = archive
            .into_inner()
            .map_err(|e| failed(format!("pack {}: {e}", context.display()), String::new()))?;
        let options = BuildImageOptions {
            t: Some(tag.clone()),
            rm: true,
            forcerm: true,
            labels: Some(HashMap::from([(
                LABEL_SERVICE.to_string(),
                service.to_string(),
            )])),
            ..Default::default()
        };
        let mut output: Vec<String> = Vec::new();
        let result: Result<(), String> = self.block_on(async {
            let mut stream =
                self.client
                    .build_image(options, None, Some(bollard::body_full(body.into())));
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| reason(&e))?;
                if let Some(text) = info.stream {
                    output.extend(
                        text.lines()
                            .map(str::to_string)
                            .filter(|l| !l.trim().is_empty()),
                    );
                }
                if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                    return Err(detail);
                }
            }
            Ok(())
        });
        result.map_err(|reason| {
            let last = output[output.len().saturating_sub(10)..].join("\n");
            failed(
                reason,
                if last.is_empty() {
                    String::new()
                } else {
                    format!("; its last lines:\n{last}")
                },
            )
        })?;
        Ok(tag)
    }

    /// Force-removes a container and waits until it is gone.
    fn remove(&self, id: &str) {
        let _ = self.block_on(self.client.remove_container(id, Some(force())));
    }

    /// The last `lines` lines of a container's output.
    fn logs_tail(&self, id: &str, lines: usize) -> String {
        self.block_on(async {
            let mut stream = self.client.logs(
                id,
                Some(LogsOptions {
                    stdout: true,
                    stderr: true,
                    tail: lines.to_string(),
                    ..Default::default()
                }),
            );
            let mut out = String::new();
            while let Some(Ok(chunk)) = stream.next().await {
                out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            }
            out.trim_end().to_string()
        })
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        // Containers of tests that did not stop theirs (a panic), then
        // the network.
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_RUN}={}", self.run)],
        )]);
        self.block_on(async {
            let left = self
                .client
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: Some(filters),
                    ..Default::default()
                }))
                .await
                .unwrap_or_default();
            for c in left {
                if let Some(id) = c.id {
                    let _ = self.client.remove_container(&id, Some(force())).await;
                }
            }
            let _ = self.client.remove_network(&self.network).await;
        });
        let _ = std::fs::remove_dir_all(&self.sockets);
    }
}

fn force() -> RemoveContainerOptions {
    RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `boot:pidns:pid:starttime`: a process, told apart from a later one
/// that reuses its pid, on this boot of this machine, as this pid namespace
/// sees it.
fn owner_tag(pid: u32) -> String {
    format!(
        "{}:{}:{pid}:{}",
        boot_id(),
        pid_namespace(),
        start_time(pid).unwrap_or(0)
    )
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().replace('-', ""))
        .unwrap_or_default()
}

/// The inode of this process's pid namespace.
fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("pid:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, counted after the command name's closing parenthesis.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether the faultbox `tag` names may still be running. A tag from an
/// earlier boot is dead; one from another pid namespace (a faultbox in a
/// container sharing this engine) cannot be checked from here, so it
/// counts as alive, as does anything unreadable: only what is certainly
/// orphaned is removed.
fn owner_alive(tag: &str) -> bool {
    let parts: Vec<&str> = tag.split(':').collect();
    let [boot, ns, pid, start] = parts.as_slice() else {
        return true;
    };
    if *boot != boot_id() {
        return false;
    }
    if *ns != pid_namespace() {
        return true;
    }
    match (pid.parse::<u32>(), start.parse::<u64>()) {
        (Ok(pid), Ok(start)) => start_time(pid) == Some(start),
        _ => true,
    }
}

/// `registry:5000/name:tag` → (`registry:5000/name`, `tag`); a digest
/// reference pulls as written.
fn split_reference(image: &str) -> (String, Option<String>) {
    if image.contains('@') {
        return (image.to_string(), None);
    }
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(i) => (
            image[..slash + i].to_string(),
            Some(image[slash + i + 1..].to_string()),
        ),
        None => (image.to_string(), Some("latest".to_string())),
    }
}

/// A service name as an image repository component (lower case, no `_`,
/// no leading or trailing separator).
fn tag_name(service: &str) -> String {
    let name: String = service
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        "service".to_string()
    } else {
        name.to_string()
    }
}

/// A digest of a build context: every file's path, mode and bytes; a
/// symbolic link by its target (it is packed as a link, as `docker build`
/// does, so a loop cannot hang the walk).
fn context_digest(dir: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                stack.push(path);
            } else {
                files.push((path, meta.permissions().mode()));
            }
        }
    }
    files.sort();
    let mut hash = sha2::Sha256::new();
    for (path, mode) in files {
        let rel = path.strip_prefix(dir).unwrap_or(&path);
        hash.update(rel.to_string_lossy().as_bytes());
        hash.update(mode.to_le_bytes());
        match std::fs::read_link(&path) {
            Ok(target) => hash.update(target.to_string_lossy().as_bytes()),
            Err(_) => hash.update(std::fs::read(&path)?),
        }
        hash.update([0]);
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The target's pid on this machine: the child of the shim (the
/// container's init) whose innermost pid is `ns_pid`.
fn host_pid_of(shim: u32, ns_pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{shim}/task/{shim}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .find(|c| {
            std::fs::read_to_string(format!("/proc/{c}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|l| l.split_whitespace().last())
                        .and_then(|p| p.parse::<u32>().ok())
                })
                == Some(ns_pid)
        })
}

/// `5432/tcp` or `53/udp`.
fn port_key(iface_protocol: &str, port: u16) -> String {
    let udp = faultbox_proxy::protocol::get(iface_protocol).is_some_and(|p| p.datagrams());
    format!("{port}/{}", if udp { "udp" } else { "tcp" })
}

/// A service's container for one test (or, with `reuse=True`, a suite).
struct ContainerInstance {
    docker: Arc<Docker>,
    id: String,
    name: String,
    image: String,
    shim: Option<Shim>,
    ip: Ipv4Addr,
    published: BTreeMap<String, SocketAddr>,
    /// The exit code once the container stopped (from the engine's wait).
    exit: Arc<Mutex<Option<i64>>>,
    log_task: Option<tokio::task::JoinHandle<()>>,
    /// Where the log task writes: the current test's file.
    log: Arc<Mutex<File>>,
    /// Its control socket's directory.
    dir: PathBuf,
    /// The container's init, as this machine's /proc names it.
    init_pid: Option<u32>,
    removed: bool,
}

impl Backend for Arc<Docker> {
    fn start(&self, launch: Launch<'_>) -> Result<Box<dyn Instance>, BackendError> {
        let def = launch.def;
        let Some(c) = &def.container else {
            return Err(BackendError::Docker(DockerError::Api {
                what: format!("service {:?}", def.name),
                reason: "it has no image".into(),
            }));
        };
        Ok(Box::new(start_container(self, def, c, launch)?))
    }
}

fn start_container(
    docker: &Arc<Docker>,
    def: &ServiceDef,
    c: &ContainerDef,
    launch: Launch<'_>,
) -> Result<ContainerInstance, DockerError> {
    let image = docker.image(def, c, launch.spec_dir)?;
    let argv = command(def, c, &image)?;
    let n = docker.next.fetch_add(1, Ordering::SeqCst);
    let name = format!("faultbox-{}-{}-{n}", docker.run, def.name);
    // Short: a Unix socket path has 108 bytes.
    let dir = docker.sockets.join(n.to_string());
    let mut env: BTreeMap<String, String> = image
        .env
        .iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.insert("HOSTNAME".into(), def.name.clone());
    env.extend(launch.env.clone());
    let env_list: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();

    let mut binds: Vec<String> = Vec::new();
    let mut listener = None;
    let entrypoint = if def.seccomp {
        let io = |what: &str| {
            let what = format!("{what} {}", dir.display());
            move |e: std::io::Error| DockerError::Api {
                what,
                reason: e.to_string(),
            }
        };
        std::fs::create_dir_all(&dir).map_err(io("create"))?;
        let sock = dir.join("control.sock");
        let l = UnixListener::bind(&sock).map_err(io("listen in"))?;
        // Whatever account the image runs as may dial in.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .map_err(io("chmod"))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777))
            .map_err(io("chmod"))?;
        l.set_nonblocking(true).map_err(io("listen in"))?;
        listener = Some(l);
        binds.push(format!("{}:{SHIM_IN_CONTAINER}:ro", launch.shim.display()));
        binds.push(format!("{}:{RUN_IN_CONTAINER}", dir.display()));
        vec![
            SHIM_IN_CONTAINER.to_string(),
            "--control".to_string(),
            format!("unix:{RUN_IN_CONTAINER}/control.sock"),
        ]
    } else {
        argv.clone()
    };
    // The CA a TLS interface's clients are told to trust, where the host
    // has it.
    if let Some(ca) = launch.env.get("FAULTBOX_CA_FILE") {
        binds.push(format!("{ca}:{ca}:ro"));
    }
    for (from, to) in &c.volumes {
        let from = if from.starts_with('.') || from.starts_with('/') {
            let p: PathBuf = launch.spec_dir.join(from).components().collect();
            std::path::absolute(&p)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        } else {
            from.clone()
        };
        binds.push(format!("{from}:{to}"));
    }

    let mut ports: BTreeMap<String, u16> = BTreeMap::new();
    for i in &def.interfaces {
        ports.insert(
            port_key(&i.protocol, i.port),
            c.ports.get(&i.port).copied().unwrap_or(0),
        );
    }
    for (inner, host) in &c.ports {
        ports.entry(format!("{inner}/tcp")).or_insert(*host);
    }
    let port_bindings = ports
        .iter()
        .map(|(k, host)| {
            (
                k.clone(),
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(if *host == 0 {
                        String::new()
                    } else {
                        host.to_string()
                    }),
                }]),
            )
        })
        .collect();
    let body = ContainerCreateBody {
        image: Some(image.reference.clone()),
        hostname: Some(def.name.clone()),
        user: def.user.clone(),
        env: Some(env_list.clone()),
        entrypoint: Some(entrypoint),
        cmd: Some(Vec::new()),
        labels: Some(docker.labels(Some(&def.name))),
        exposed_ports: Some(ports.keys().cloned().collect()),
        stop_timeout: Some(launch.stop_grace.as_secs().max(1) as i64),
        host_config: Some(HostConfig {
            // The shim reads the paths and memory of its target's calls;
            // when the image's entrypoint switches accounts (runuser,
            // gosu, su-exec) that needs CAP_SYS_PTRACE, which Docker's
            // default seccomp profile answers by also allowing
            // process_vm_readv. The profile itself stays on.
            cap_add: def.seccomp.then(|| vec!["SYS_PTRACE".to_string()]),
            binds: Some(binds),
            // Specs written for Docker Desktop name the host so; here it is
            // the run network's gateway, where the proxies listen.
            extra_hosts: Some(vec![format!("host.docker.internal:{}", docker.gateway)]),
            port_bindings: Some(port_bindings),
            network_mode: Some(docker.network.clone()),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                docker.network.clone(),
                EndpointSettings {
                    aliases: Some(vec![def.name.clone()]),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    };
    let log = File::create(&launch.log).map_err(|e| DockerError::Api {
        what: format!("create {}", launch.log.display()),
        reason: e.to_string(),
    })?;
    let created = docker
        .block_on(docker.client.create_container(
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            }),
            body,
        ))
        .map_err(api(format!("create container for service {:?}", def.name)))?;
    let mut instance = ContainerInstance {
        docker: Arc::clone(docker),
        id: created.id.clone(),
        name: name.clone(),
        dir,
        init_pid: None,
        image: image.reference.clone(),
        shim: None,
        ip: Ipv4Addr::UNSPECIFIED,
        published: BTreeMap::new(),
        exit: Arc::new(Mutex::new(None)),
        log_task: None,
        log: Arc::new(Mutex::new(log)),
        removed: false,
    };
    // From here on, dropping `instance` removes the container.
    if let Err(e) = docker.block_on(docker.client.start_container(&created.id, None)) {
        let text = reason(&e);
        let busy = text.contains("already allocated") || text.contains("address already in use");
        if let Some(port) = busy.then(|| busy_port(&text, &c.ports)).flatten() {
            return Err(DockerError::HostPortBusy {
                service: def.name.clone(),
                port,
            });
        }
        return Err(DockerError::Api {
            what: format!("start container for service {:?}", def.name),
            reason: text,
        });
    }
    // Without a shim, the engine's wait reports the exit as a shim would.
    let (on_event, exit_sink) = if listener.is_some() {
        (Some(launch.on_event), None)
    } else {
        (None, Some(launch.on_event))
    };
    instance.follow(exit_sink);
    if let (Some(listener), Some(on_event)) = (listener, on_event) {
        let stream = instance.dial(&def.name, listener)?;
        let spec = LaunchSpec {
            program: argv[0].clone(),
            argv: argv.clone(),
            env: env_list,
            inherit_env: false,
            cwd: image.workdir.clone(),
            intercept: launch.intercept.to_vec(),
            rules: Vec::new(),
            seed: launch.seed,
            // The container is the isolation.
            isolation: Isolation {
                namespaces: false,
                network: false,
            },
            on_disconnect: OnDisconnect::StopTarget,
            stop_grace_ms: launch.stop_grace.as_millis() as u64,
            user: None,
        };
        let shim = Shim::attach(stream, spec, launch.shim, on_event).map_err(|e| {
            let output = instance.last_lines();
            match e.exit_code() {
                Some(code) => DockerError::ExitedAtStart {
                    service: def.name.clone(),
                    code: i64::from(code),
                    output: format!(" ({e}){output}"),
                },
                None => DockerError::Shim {
                    service: def.name.clone(),
                    reason: e.to_string(),
                    output,
                },
            }
        })?;
        instance.shim = Some(shim);
    }
    instance.inspect(&def.name)?;
    Ok(instance)
}

/// What the container runs: `entrypoint=` or the image's ENTRYPOINT, then
/// `args=` or the image's CMD.
fn command(
    def: &ServiceDef,
    c: &ContainerDef,
    image: &ImageInfo,
) -> Result<Vec<String>, DockerError> {
    let mut argv = c
        .entrypoint
        .clone()
        .unwrap_or_else(|| image.entrypoint.clone());
    // As with `docker run --entrypoint`, a new entrypoint drops the
    // image's CMD.
    match (&c.cmd, &c.entrypoint) {
        (Some(cmd), _) => argv.extend(cmd.iter().cloned()),
        (None, None) => argv.extend(image.cmd.iter().cloned()),
        (None, Some(_)) => {}
    }
    if argv.is_empty() {
        return Err(DockerError::NoCommand {
            service: def.name.clone(),
            image: image.reference.clone(),
        });
    }
    Ok(argv)
}

/// Which of `ports`' fixed host ports an engine error names.
fn busy_port(text: &str, ports: &BTreeMap<u16, u16>) -> Option<u16> {
    ports
        .values()
        .copied()
        .filter(|p| *p != 0)
        .find(|p| text.contains(&format!(":{p}")))
        .or_else(|| ports.values().copied().find(|p| *p != 0))
}

impl ContainerInstance {
    /// Copies the container's output into the test's log file as it
    /// comes, and notes its exit code when it stops.
    fn follow(&mut self, on_exit: Option<Box<dyn Fn(crate::shim::ShimEvent) + Send>>) {
        let client = self.docker.client.clone();
        let id = self.id.clone();
        let log = Arc::clone(&self.log);
        self.log_task = Some(self.docker.rt.spawn(async move {
            let mut stream = client.logs(
                &id,
                Some(LogsOptions {
                    follow: true,
                    stdout: true,
                    stderr: true,
                    ..Default::default()
                }),
            );
            while let Some(Ok(chunk)) = stream.next().await {
                let _ = lock(&log).write_all(&chunk.into_bytes());
            }
        }));
        let client = self.docker.client.clone();
        let id = self.id.clone();
        let exit = Arc::clone(&self.exit);
        self.docker.rt.spawn(async move {
            let mut wait = client.wait_container(
                &id,
                Some(WaitContainerOptions {
                    condition: "not-running".into(),
                }),
            );
            let code = match wait.next().await {
                Some(Ok(r)) => r.status_code,
                // A non-zero exit arrives as an error carrying the code.
                Some(Err(ApiError::DockerContainerWaitError { code, .. })) => code,
                _ => return,
            };
            // Reported before it is noted, so whoever sees it noted (see
            // `settle`) knows the report is in.
            if let Some(report) = on_exit {
                report(crate::shim::ShimEvent::Exited {
                    exit: ExitInfo {
                        code: Some(code as i32),
                        signal: None,
                    },
                    interrupted: 0,
                });
            }
            *lock(&exit) = Some(code);
        });
    }

    fn last_lines(&self) -> String {
        let out = self.docker.logs_tail(&self.id, 15);
        if out.is_empty() {
            String::new()
        } else {
            format!("; its last output:\n{out}")
        }
    }

    /// Waits for the shim in the container to dial in.
    fn dial(
        &self,
        service: &str,
        listener: UnixListener,
    ) -> Result<std::os::unix::net::UnixStream, DockerError> {
        let deadline = Instant::now() + DIAL_TIMEOUT;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    return Ok(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    return Err(DockerError::Api {
                        what: format!("accept the shim of service {service:?}"),
                        reason: e.to_string(),
                    });
                }
            }
            if let Some(code) = *lock(&self.exit) {
                return Err(DockerError::ExitedAtStart {
                    service: service.to_string(),
                    code,
                    output: self.last_lines(),
                });
            }
            if Instant::now() > deadline {
                return Err(DockerError::NoDial {
                    service: service.to_string(),
                    output: self.last_lines(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reads the container's address, published ports and init pid.
    fn inspect(&mut self, service: &str) -> Result<(), DockerError> {
        let info = self
            .docker
            .block_on(self.docker.client.inspect_container(&self.id, None))
            .map_err(api(format!("inspect the container of service {service:?}")))?;
        if let Some(state) = &info.state
            && state.running != Some(true)
        {
            return Err(DockerError::ExitedAtStart {
                service: service.to_string(),
                code: state.exit_code.unwrap_or(-1),
                output: self.last_lines(),
            });
        }
        let settings = info.network_settings.unwrap_or_default();
        self.ip = settings
            .networks
            .as_ref()
            .and_then(|n| n.get(&self.docker.network))
            .and_then(|e| e.ip_address.as_deref())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| DockerError::Api {
                what: format!("the container of service {service:?}"),
                reason: format!("it has no address on network {}", self.docker.network),
            })?;
        for (key, bindings) in settings.ports.unwrap_or_default() {
            let host = bindings
                .unwrap_or_default()
                .into_iter()
                .find_map(|b| b.host_port.and_then(|p| p.parse::<u16>().ok()));
            if let Some(port) = host {
                self.published
                    .insert(key, SocketAddr::from(([127, 0, 0, 1], port)));
            }
        }
        let init = info
            .state
            .and_then(|s| s.pid)
            .and_then(|p| u32::try_from(p).ok());
        self.init_pid = init;
        if let (Some(shim), Some(pid)) = (&self.shim, init) {
            // The target's pid is the container's; /proc here needs ours.
            if let Some(host) = host_pid_of(pid, shim.pid) {
                shim.set_host_pid(host);
            }
        }
        Ok(())
    }

    fn remove(&mut self, grace: Duration) {
        if self.removed {
            return;
        }
        self.removed = true;
        let client = &self.docker.client;
        let _ = self.docker.block_on(client.stop_container(
            &self.id,
            Some(StopContainerOptions {
                t: Some(grace.as_secs().max(1) as i32),
                ..Default::default()
            }),
        ));
        self.docker.remove(&self.id);
        if let Some(task) = self.log_task.take() {
            // The stream ends with the container; wait for the last lines.
            let _ = self
                .docker
                .block_on(async { tokio::time::timeout(Duration::from_secs(2), task).await });
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Instance for ContainerInstance {
    fn started(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("container", self.name.clone()),
            ("image", self.image.clone()),
        ];
        if let Some(s) = &self.shim {
            out.push(("pid", s.pid.to_string()));
        }
        out
    }

    fn endpoint(&self, iface: &InterfaceDef) -> Result<SocketAddr, BackendError> {
        Ok(SocketAddr::from((self.ip, iface.port)))
    }

    fn published(&self, iface: &InterfaceDef) -> Option<SocketAddr> {
        self.published
            .get(&port_key(&iface.protocol, iface.port))
            .copied()
    }

    fn shim(&self) -> Option<&Shim> {
        self.shim.as_ref()
    }

    fn relog(&self, log: &Path) {
        match File::create(log) {
            Ok(f) => *lock(&self.log) = f,
            Err(e) => tracing::debug!(log = %log.display(), error = %e, "cannot open the next log"),
        }
    }

    fn settle(&self) {
        if let Some(shim) = &self.shim {
            if shim.exited().is_none() && shim.target_gone() {
                shim.wait_exited(Duration::from_secs(2));
            }
            return;
        }
        let gone = self.init_pid.is_some_and(crate::shim::process_gone);
        let deadline = Instant::now() + Duration::from_secs(2);
        while gone && lock(&self.exit).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn exited(&self) -> Option<ExitInfo> {
        if let Some(s) = &self.shim {
            return s.exited();
        }
        lock(&self.exit).map(|code| ExitInfo {
            code: Some(code as i32),
            signal: None,
        })
    }

    fn stop(mut self: Box<Self>, grace: Duration) -> Vec<String> {
        if let Some(shim) = self.shim.take() {
            shim.stop(grace);
        }
        self.remove(grace);
        Vec::new()
    }
}

impl Drop for ContainerInstance {
    fn drop(&mut self) {
        self.shim.take();
        self.remove(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_repository_and_tag() {
        assert_eq!(
            split_reference("postgres:16"),
            ("postgres".into(), Some("16".into()))
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/faultbox/http"),
            ("127.0.0.1:5000/faultbox/http".into(), Some("latest".into()))
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/faultbox/http:v2"),
            ("127.0.0.1:5000/faultbox/http".into(), Some("v2".into()))
        );
        assert_eq!(split_reference("x@sha256:ab").1, None);
    }

    #[test]
    fn owners_are_alive_only_with_their_start_time_on_this_boot() {
        let me = owner_tag(std::process::id());
        assert!(owner_alive(&me));
        let (boot, ns) = (boot_id(), pid_namespace());
        assert!(!boot.is_empty() && !ns.is_empty(), "{me}");
        let pid = std::process::id();
        let start = start_time(pid).expect("start");
        assert!(!owner_alive(&format!("{boot}:{ns}:{pid}:{}", start + 1)));
        assert!(!owner_alive(&format!("{boot}:{ns}:{}:0", u32::MAX)));
        assert!(
            !owner_alive(&format!("0000:{ns}:{pid}:{start}")),
            "another boot"
        );
        assert!(
            owner_alive(&format!("{boot}:1:{}:0", u32::MAX)),
            "another pid namespace"
        );
        assert!(owner_alive("garbage"), "unreadable: left alone");
    }

    #[test]
    fn a_context_digest_follows_names_modes_and_bytes() {
        let dir = std::env::temp_dir().join(format!("fb-digest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).expect("dir");
        std::fs::write(dir.join("Dockerfile"), "FROM x\n").expect("write");
        std::fs::write(dir.join("sub/a"), "1").expect("write");
        let first = context_digest(&dir).expect("digest");
        assert_eq!(first, context_digest(&dir).expect("digest"));
        std::fs::write(dir.join("sub/a"), "2").expect("write");
        let second = context_digest(&dir).expect("digest");
        assert_ne!(first, second);
        std::fs::set_permissions(dir.join("sub/a"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        assert_ne!(second, context_digest(&dir).expect("digest"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
