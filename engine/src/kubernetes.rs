//! Cluster mode: `image=` services as pods under `faultbox-shim`, started
//! by a FaultTest's runner (this process, in a pod the operator made).
//!
//! One [`Cluster`] serves a run. It knows where the runner is (its pod's
//! address and namespace, the FaultTest that owns everything, the faultbox
//! image) from the variables the operator sets, and makes the channel's
//! credentials from the run's CA: a certificate for itself (the name
//! `tunnel::CONTROLLER_NAME`) and one for every shim, in a Secret owned by
//! the FaultTest that the service pods mount. Each service start is:
//!
//! - a TCP listener in the runner for that one shim;
//! - a pod: an init container of the faultbox image puts the static shim
//!   into an emptyDir (`faultbox-shim --install`), and the service's own
//!   image runs it as its command, dialling the runner over mutual TLS
//!   (`--control tls:IP:PORT@DIR`), so no port is opened on the pod;
//! - the handshake, then the launch of the service's entrypoint and
//!   command as the shim's target, as in container mode.
//!
//! Pods meet the "restricted" pod security standard: non-root (the spec's
//! numeric `user=`, else the image's own user, which must be numeric),
//! no privilege escalation (which also sets no_new_privs, all user
//! notification needs), every capability dropped, RuntimeDefault seccomp.
//! Under those the shim makes no namespaces (the runtime's profile refuses
//! them) and reads its target's memory through `/proc/<pid>/mem`
//! (containerd's profile allows `process_vm_readv` only with
//! CAP_SYS_PTRACE). When the runner goes, a shim answers what it holds
//! and allows everything from then on (`OnDisconnect::AllowAll`): the pod
//! keeps serving until the FaultTest's deletion collects it.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultbox_agent::tunnel::{self, Credentials};
use faultbox_agent::wire::{Isolation, LaunchSpec, OnDisconnect};
use faultbox_proxy::tls::Issuer;
use faultbox_spec::model::{ContainerDef, ImageSource, InterfaceDef, ServiceDef};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, HostAlias, LocalObjectReference,
    Pod, PodSecurityContext, PodSpec, SeccompProfile, Secret, SecretVolumeSource, SecurityContext,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, LogParams, ObjectMeta, Patch, PatchParams, PostParams};

use crate::backend::{Backend, BackendError, Instance, Launch};
use crate::registry::{ImageConfig, Registries, numeric_uid};
use crate::shim::{ExitInfo, Shim};

/// How long a service pod may take from creation to its shim dialling in
/// (scheduling, pulling its image, the init container).
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// Where a service pod has the shim and its credentials. Not under
/// `/faultbox`: in the faultbox image (the init container) that is the
/// CLI binary, and a file cannot be a mount point.
const BIN_DIR: &str = "/faultbox-bin";
const TLS_DIR: &str = "/faultbox-tls";
const LABEL_TEST: &str = "faultbox.io/faulttest";
const LABEL_SERVICE: &str = "faultbox.io/service";
/// Which run's pods of a service a Service selects: `<prefix>-<service>`.
const LABEL_INSTANCE: &str = "faultbox.io/instance";
/// The generation of the FaultTest the runner runs: the operator cancels
/// a superseded run by deleting the pods labelled with another one.
const LABEL_GENERATION: &str = "faultbox.io/generation";

/// Why cluster mode could not do something.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Not in a FaultTest's runner pod.
    #[error(
        "{name} is not set: image= services run as pods only in a FaultTest's runner (the operator sets it); locally they run on Docker"
    )]
    NotInRunner {
        /// The missing variable.
        name: &'static str,
    },
    /// The cluster cannot be reached with the runner's account.
    #[error("the Kubernetes API: {0}")]
    Client(String),
    /// The run's credentials cannot be made.
    #[error("the shim channel's credentials: {0}")]
    Credentials(String),
    /// Neither the spec nor the image gives a command.
    #[error("service {service:?}: give entrypoint= (and args=): {why}")]
    NoCommand {
        /// The service.
        service: String,
        /// Why the image's own could not be used.
        why: String,
    },
    /// Neither the spec nor the image gives a non-root numeric user.
    #[error(
        "service {service:?}: image {image:?} runs as {user}: give user= a numeric non-root uid (the restricted pod security standard checks it)"
    )]
    ImageUser {
        /// The service.
        service: String,
        /// Its image.
        image: String,
        /// What the image says.
        user: String,
    },
    /// A FaultTest's imagePullSecret that does not exist.
    #[error(
        "imagePullSecret {name:?} does not exist in namespace {namespace} (create it, or remove it from the FaultTest)"
    )]
    PullSecret {
        /// The Secret.
        name: String,
        /// The namespace.
        namespace: String,
    },
    /// `build=` in a cluster.
    #[error(
        "service {service:?}: build= makes an image on this machine's Docker; in a cluster give image= of an image in a registry the cluster pulls from"
    )]
    Build {
        /// The service.
        service: String,
    },
    /// `user=` that is not a number.
    #[error(
        "service {service:?}: user={user:?} must be a numeric uid in a cluster (the restricted pod security standard needs a non-root uid it can check)"
    )]
    User {
        /// The service.
        service: String,
        /// What was given.
        user: String,
    },
    /// The pod could not be created.
    #[error("service {service:?}: create its pod: {reason}")]
    Create {
        /// The service.
        service: String,
        /// Why.
        reason: String,
    },
    /// The pod did not start, or its shim never dialled in.
    #[error("service {service:?} (pod {pod}): {reason}{output}")]
    Start {
        /// The service.
        service: String,
        /// Its pod.
        pod: String,
        /// Why.
        reason: String,
        /// The pod's last lines, when it had any.
        output: String,
    },
}

impl From<ClusterError> for BackendError {
    fn from(e: ClusterError) -> BackendError {
        BackendError::Cluster(Box::new(e))
    }
}

/// The runner's view of the cluster for one run.
pub struct Cluster {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    namespace: String,
    owner: OwnerReference,
    /// The runner pod's address: where shims dial and proxies listen.
    pub ip: IpAddr,
    /// The faultbox image, whose shim the service pods install.
    image: String,
    /// The Secret with the shims' credentials.
    secret: String,
    server: Arc<rustls::ServerConfig>,
    /// A prefix for pod names: the FaultTest and a per-run tag.
    prefix: String,
    generation: String,
    next: AtomicU64,
    registries: Registries,
    pull_secrets: Vec<String>,
    /// What `prepare` settled for each container service.
    services: Mutex<BTreeMap<String, Settled>>,
}

/// A container service as its pods run it.
#[derive(Debug, Clone)]
struct Settled {
    argv: Vec<String>,
    uid: Option<i64>,
    /// Its Service (`.internal_addr`) and the Service's cluster IP, when
    /// it has interfaces.
    service: Option<(String, String)>,
    /// The image's digest, when its registry was asked.
    digest: Option<String>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.namespace)
            .field("ip", &self.ip)
            .finish()
    }
}

fn var(name: &'static str) -> Result<String, ClusterError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or(ClusterError::NotInRunner { name })
}

/// Whether this process is a FaultTest's runner that may start pods.
pub fn in_runner() -> bool {
    std::env::var_os("FAULTBOX_FAULTTEST_UID").is_some()
}

/// Where a runner is: what the operator tells it in its environment.
#[derive(Debug, Clone)]
pub struct RunnerPlace {
    /// Its namespace, where the service pods go.
    pub namespace: String,
    /// Its address, where shims dial and proxies listen.
    pub ip: IpAddr,
    /// The FaultTest that owns everything, and its uid.
    pub faulttest: String,
    /// The FaultTest's uid.
    pub uid: String,
    /// The faultbox image (the service pods' init container).
    pub image: String,
    /// The FaultTest generation being run.
    pub generation: String,
    /// The run CA's directory.
    pub ca_dir: PathBuf,
}

impl RunnerPlace {
    /// From `FAULTBOX_NAMESPACE`, `FAULTBOX_POD_IP`, `FAULTBOX_FAULTTEST`,
    /// `FAULTBOX_FAULTTEST_UID`, `FAULTBOX_IMAGE`, `FAULTBOX_GENERATION`
    /// and `FAULTBOX_RUN_CA_DIR`.
    pub fn from_env() -> Result<RunnerPlace, ClusterError> {
        Ok(RunnerPlace {
            namespace: var("FAULTBOX_NAMESPACE")?,
            ip: var("FAULTBOX_POD_IP")?
                .parse()
                .map_err(|e| ClusterError::Client(format!("FAULTBOX_POD_IP: {e}")))?,
            faulttest: var("FAULTBOX_FAULTTEST")?,
            uid: var("FAULTBOX_FAULTTEST_UID")?,
            image: var("FAULTBOX_IMAGE")?,
            generation: var("FAULTBOX_GENERATION")?,
            ca_dir: PathBuf::from(var("FAULTBOX_RUN_CA_DIR")?),
        })
    }
}

impl Cluster {
    /// Connects as the runner the environment describes.
    pub fn connect(work_dir: &Path) -> Result<Cluster, ClusterError> {
        Cluster::connect_as(work_dir, RunnerPlace::from_env()?)
    }

    /// Connects with the runner's account (or a kubeconfig), and makes the
    /// channel's credentials and their Secret.
    pub fn connect_as(work_dir: &Path, place: RunnerPlace) -> Result<Cluster, ClusterError> {
        let RunnerPlace {
            namespace,
            ip,
            faulttest,
            uid,
            image,
            generation,
            ca_dir,
        } = place;
        let owner = OwnerReference {
            api_version: "faultbox.io/v1alpha1".into(),
            kind: "FaultTest".into(),
            name: faulttest,
            uid,
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Client(e.to_string()))?;
        let client = rt
            .block_on(async {
                // In a runner pod this is the pod's account; a kubeconfig
                // (KUBECONFIG) comes first, which lets a benchmark or a
                // debugging session play the runner from a node.
                let config = kube::Config::infer().await.map_err(|e| e.to_string())?;
                kube::Client::try_from(config).map_err(|e| e.to_string())
            })
            .map_err(ClusterError::Client)?;
        let issuer = run_ca(&ca_dir)?;
        let cred = |e: faultbox_proxy::TlsError| ClusterError::Credentials(e.to_string());
        let ca_pem = std::fs::read_to_string(&issuer.cert)
            .map_err(|e| ClusterError::Credentials(e.to_string()))?;
        let dir = work_dir.join("controller-tls");
        std::fs::create_dir_all(&dir).map_err(|e| ClusterError::Credentials(e.to_string()))?;
        let (cert, key) =
            faultbox_proxy::tls::issue(&issuer, &[tunnel::CONTROLLER_NAME.to_string()])
                .map_err(cred)?;
        for (file, text) in [("ca.crt", &ca_pem), ("tls.crt", &cert), ("tls.key", &key)] {
            std::fs::write(dir.join(file), text)
                .map_err(|e| ClusterError::Credentials(e.to_string()))?;
        }
        let server = tunnel::server_config(&Credentials::in_dir(&dir))
            .map_err(|e| ClusterError::Credentials(e.to_string()))?;
        let (shim_cert, shim_key) =
            faultbox_proxy::tls::issue(&issuer, &["faultbox-shim".to_string()]).map_err(cred)?;
        let pull_secrets: Vec<String> = std::env::var("FAULTBOX_IMAGE_PULL_SECRETS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let pull_dir =
            PathBuf::from(std::env::var_os("FAULTBOX_PULL_SECRETS_DIR").unwrap_or_default());
        for name in &pull_secrets {
            let dir = pull_dir.join(name);
            if !dir.join(".dockerconfigjson").is_file() && !dir.join(".dockercfg").is_file() {
                return Err(ClusterError::PullSecret {
                    name: name.clone(),
                    namespace,
                });
            }
        }
        // Random, not the pid: the runner is pid 1 in every runner pod,
        // and a superseded run's runner may still be stopping (and
        // deleting what it made) while the next one starts.
        let tag = format!("{:06x}", faultbox_agent::engine::random_seed() & 0xff_ffff);
        let prefix = dns_label(&format!("{}-{tag}", owner.name), 40);
        let secret = format!("{prefix}-shim");
        let cluster = Cluster {
            rt,
            client,
            namespace,
            owner,
            ip,
            image,
            secret,
            server,
            prefix,
            generation,
            next: AtomicU64::new(0),
            registries: Registries::from_env(),
            pull_secrets,
            services: Mutex::new(BTreeMap::new()),
        };
        let body = Secret {
            metadata: cluster.meta(&cluster.secret, None),
            string_data: Some(BTreeMap::from([
                ("ca.crt".to_string(), ca_pem),
                ("tls.crt".to_string(), shim_cert),
                ("tls.key".to_string(), shim_key),
            ])),
            ..Default::default()
        };
        let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
        cluster
            .rt
            .block_on(secrets.create(&PostParams::default(), &body))
            .map_err(|e| ClusterError::Client(format!("create Secret {}: {e}", cluster.secret)))?;
        Ok(cluster)
    }

    fn meta(&self, name: &str, service: Option<&str>) -> ObjectMeta {
        let mut labels = BTreeMap::from([
            (LABEL_TEST.to_string(), self.owner.name.clone()),
            (LABEL_GENERATION.to_string(), self.generation.clone()),
        ]);
        if let Some(s) = service {
            labels.insert(LABEL_SERVICE.to_string(), s.to_string());
        }
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..Default::default()
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Settles how each container service runs, before any test: its
    /// command and user (from the spec, else the image's config in its
    /// registry), and a Service that gives `.internal_addr`. The
    /// Services' addresses go into every pod's /etc/hosts under the
    /// services' own names, so `db:5432` reaches the same thing in a pod
    /// as in a container.
    pub fn prepare(&self, services: &[ServiceDef]) -> Result<(), ClusterError> {
        for def in services {
            let Some(c) = &def.container else { continue };
            let mut s = self.settle(def, c)?;
            if !def.interfaces.is_empty() {
                s.service = Some(self.create_service(def)?);
            }
            // At once, so that a later failure's drop deletes this one.
            if let Ok(mut m) = self.services.lock() {
                m.insert(def.name.clone(), s);
            }
        }
        Ok(())
    }

    /// What a service's pods run and as whom. `entrypoint=` replaces the
    /// image's entrypoint and its command (as in Kubernetes and Docker);
    /// `args=` alone replaces only the command.
    fn settle(&self, def: &ServiceDef, c: &ContainerDef) -> Result<Settled, ClusterError> {
        let image = match &c.image {
            ImageSource::Pull(r) => r.clone(),
            ImageSource::Build { .. } => {
                return Err(ClusterError::Build {
                    service: def.name.clone(),
                });
            }
        };
        let uid = match &def.user {
            None => None,
            Some(u) => Some(u.parse::<i64>().map_err(|_| ClusterError::User {
                service: def.name.clone(),
                user: u.clone(),
            })?),
        };
        if let Some(entrypoint) = &c.entrypoint {
            let mut argv = entrypoint.clone();
            argv.extend(c.cmd.clone().unwrap_or_default());
            if argv.is_empty() {
                return Err(ClusterError::NoCommand {
                    service: def.name.clone(),
                    why: "entrypoint=[] with no args= leaves nothing to run".into(),
                });
            }
            // The image's user is checked by the kubelet (runAsNonRoot).
            return Ok(Settled {
                argv,
                uid,
                service: None,
                digest: None,
            });
        }
        let config: ImageConfig =
            self.rt
                .block_on(self.registries.config(&image))
                .map_err(|e| ClusterError::NoCommand {
                    service: def.name.clone(),
                    why: format!(
                        "the entrypoint of {image:?} could not be read from its registry: {e}"
                    ),
                })?;
        let mut argv = config.entrypoint.clone();
        argv.extend(c.cmd.clone().unwrap_or_else(|| config.cmd.clone()));
        if argv.is_empty() {
            return Err(ClusterError::NoCommand {
                service: def.name.clone(),
                why: format!("image {image:?} has neither ENTRYPOINT nor CMD"),
            });
        }
        let uid = match uid {
            Some(u) => Some(u),
            None => Some(
                numeric_uid(&config.user).ok_or_else(|| ClusterError::ImageUser {
                    service: def.name.clone(),
                    image: image.clone(),
                    user: if config.user.is_empty() {
                        "root".to_string()
                    } else {
                        format!("user {:?}", config.user)
                    },
                })?,
            ),
        };
        tracing::info!(service = %def.name, image = %image, digest = %config.digest, argv = ?argv, "read the image's config from its registry");
        Ok(Settled {
            argv,
            uid,
            service: None,
            digest: Some(config.digest),
        })
    }

    /// A Service selecting this run's pods of `def`, with its interfaces'
    /// ports.
    fn create_service(&self, def: &ServiceDef) -> Result<(String, String), ClusterError> {
        let name = self.instance(&def.name);
        let mut meta = self.meta(&name, Some(&def.name));
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(LABEL_INSTANCE.into(), name.clone());
        let body = Service {
            metadata: meta,
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([(LABEL_INSTANCE.to_string(), name.clone())])),
                ports: Some(
                    def.interfaces
                        .iter()
                        .map(|i| ServicePort {
                            // Names are needed only to tell ports apart.
                            name: (def.interfaces.len() > 1).then(|| port_name(&i.name)),
                            port: i32::from(i.port),
                            protocol: Some(protocol(i).into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                // Endpoints before readiness: the runner, not the
                // kubelet, decides when a service is up.
                publish_not_ready_addresses: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.namespace);
        let made = self
            .rt
            .block_on(api.create(&PostParams::default(), &body))
            .map_err(|e| ClusterError::Create {
                service: def.name.clone(),
                reason: format!("create its Service {name}: {e}"),
            })?;
        let ip = made
            .spec
            .and_then(|s| s.cluster_ip)
            .filter(|ip| !ip.is_empty() && ip != "None");
        let Some(ip) = ip else {
            let _ = self
                .rt
                .block_on(api.delete(&name, &DeleteParams::background()));
            return Err(ClusterError::Create {
                service: def.name.clone(),
                reason: format!("its Service {name} got no cluster IP"),
            });
        };
        Ok((name, ip))
    }

    /// `<prefix>-<service>`: the name of a service's Service and the
    /// label that its pods carry.
    fn instance(&self, service: &str) -> String {
        instance_name(&self.prefix, service)
    }

    fn settled(&self, service: &str) -> Option<Settled> {
        self.services.lock().ok()?.get(service).cloned()
    }

    /// Every Service's cluster address under its service's name.
    fn host_aliases(&self) -> Vec<HostAlias> {
        let Ok(settled) = self.services.lock() else {
            return Vec::new();
        };
        settled
            .iter()
            .filter_map(|(service, s)| {
                let (_, ip) = s.service.as_ref()?;
                if !is_dns_name(service) {
                    // The API server refuses the whole pod for one such
                    // name; the Service itself still works by its own name.
                    tracing::warn!(service = %service, "not a DNS name: pods cannot reach it by this name");
                    return None;
                }
                Some(HostAlias {
                    ip: ip.clone(),
                    hostnames: Some(vec![service.clone()]),
                })
            })
            .collect()
    }

    /// The service's pod, restricted, running the shim from the init
    /// container's copy.
    fn pod(
        &self,
        name: &str,
        def: &ServiceDef,
        image: &str,
        uid: Option<i64>,
        port: u16,
        aliases: Vec<HostAlias>,
    ) -> Pod {
        let restricted = || SecurityContext {
            allow_privilege_escalation: Some(false),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let bin = VolumeMount {
            name: "faultbox-bin".into(),
            mount_path: BIN_DIR.into(),
            ..Default::default()
        };
        let shim = format!("{BIN_DIR}/faultbox-shim");
        let mut metadata = self.meta(name, Some(&def.name));
        metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(LABEL_INSTANCE.into(), self.instance(&def.name));
        Pod {
            metadata,
            spec: Some(PodSpec {
                restart_policy: Some("Never".into()),
                host_aliases: (!aliases.is_empty()).then_some(aliases),
                image_pull_secrets: (!self.pull_secrets.is_empty()).then(|| {
                    self.pull_secrets
                        .iter()
                        .map(|n| LocalObjectReference { name: n.clone() })
                        .collect()
                }),
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                hostname: Some(dns_label(&def.name, 63)),
                security_context: Some(PodSecurityContext {
                    run_as_non_root: Some(true),
                    run_as_user: uid,
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                init_containers: Some(vec![Container {
                    name: "faultbox-shim".into(),
                    image: Some(self.image.clone()),
                    image_pull_policy: Some("IfNotPresent".into()),
                    command: Some(vec!["/faultbox-shim".into()]),
                    args: Some(vec!["--install".into(), shim.clone()]),
                    security_context: Some(SecurityContext {
                        read_only_root_filesystem: Some(true),
                        ..restricted()
                    }),
                    volume_mounts: Some(vec![bin.clone()]),
                    ..Default::default()
                }]),
                containers: vec![Container {
                    name: dns_label(&def.name, 63),
                    image: Some(image.to_string()),
                    image_pull_policy: Some("IfNotPresent".into()),
                    command: Some(vec![shim]),
                    args: Some(vec![
                        "--control".into(),
                        format!("tls:{}@{TLS_DIR}", SocketAddr::new(self.ip, port)),
                    ]),
                    ports: Some(
                        def.interfaces
                            .iter()
                            .map(|i| ContainerPort {
                                container_port: i32::from(i.port),
                                name: None,
                                protocol: Some(protocol(i).into()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    security_context: Some(restricted()),
                    volume_mounts: Some(vec![
                        VolumeMount {
                            read_only: Some(true),
                            ..bin
                        },
                        VolumeMount {
                            name: "faultbox-tls".into(),
                            mount_path: TLS_DIR.into(),
                            read_only: Some(true),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }],
                volumes: Some(vec![
                    Volume {
                        name: "faultbox-bin".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    },
                    Volume {
                        name: "faultbox-tls".into(),
                        secret: Some(SecretVolumeSource {
                            secret_name: Some(self.secret.clone()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl Drop for Cluster {
    /// The run's Services and Secret go with it (the FaultTest's deletion
    /// collects them too, should the runner die first).
    fn drop(&mut self) {
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.namespace);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let names: Vec<String> = self
            .services
            .get_mut()
            .map(|m| {
                m.values()
                    .filter_map(|s| s.service.as_ref().map(|(n, _)| n.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let cleanup = async {
            for name in names {
                let _ = services.delete(&name, &DeleteParams::background()).await;
            }
            let _ = secrets
                .delete(&self.secret, &DeleteParams::background())
                .await;
        };
        // An API server that does not answer must not keep the runner from
        // exiting: the FaultTest's deletion collects what is left.
        let _ = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), cleanup).await });
    }
}

/// Whether `name` can be a host name in /etc/hosts as Kubernetes checks
/// it (a DNS-1123 subdomain: lower case letters, digits, `-` and `.`).
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// `<prefix>-<service>` as a Service name: a DNS-1035 label, which must
/// start with a letter (a FaultTest's name may start with a digit).
fn instance_name(prefix: &str, service: &str) -> String {
    let name = dns_label(&format!("{prefix}-{service}"), 63);
    if name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name
    } else {
        dns_label(&format!("s-{name}"), 63)
    }
}

/// An interface's name as a port name (IANA_SVC_NAME: at most 15 of
/// a-z, 0-9 and single dashes, with a letter).
fn port_name(name: &str) -> String {
    let mut s = dns_label(name, 15);
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    if s.chars().any(|c| c.is_ascii_lowercase()) {
        s
    } else {
        format!("p{}", &s[..s.len().min(14)])
    }
}

/// `reg:5000/app:v1` → `reg:5000/app` (a port is not a tag).
fn without_tag(image: &str) -> &str {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => image,
    }
}

fn protocol(i: &InterfaceDef) -> &'static str {
    if i.protocol == "udp" { "UDP" } else { "TCP" }
}

/// The run CA in `dir` (tls.crt, tls.key), made now if the preflight did
/// not make it (a spec without TLS interfaces).
fn run_ca(dir: &Path) -> Result<Issuer, ClusterError> {
    let issuer = Issuer {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    if !issuer.cert.is_file() {
        let fail = |e: String| ClusterError::Credentials(e);
        let (cert, key) =
            faultbox_proxy::tls::new_ca("Faultbox run CA").map_err(|e| fail(e.to_string()))?;
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        std::fs::write(&issuer.key, key).map_err(|e| fail(e.to_string()))?;
        std::fs::write(&issuer.cert, cert).map_err(|e| fail(e.to_string()))?;
    }
    Ok(issuer)
}

/// `text` as a DNS label: lower case, letters, digits and dashes, at most
/// `max` long.
fn dns_label(text: &str, max: usize) -> String {
    let s: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(max)
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() { "svc".into() } else { s }
}

impl Backend for Arc<Cluster> {
    fn start(&self, launch: Launch<'_>) -> Result<Box<dyn Instance>, BackendError> {
        Ok(Box::new(start_pod(self, launch)?))
    }
}

/// A service pod and its shim.
pub struct PodInstance {
    cluster: Arc<Cluster>,
    name: String,
    ip: IpAddr,
    image: String,
    digest: Option<String>,
    shim: Option<Shim>,
    log: Mutex<PathBuf>,
    removed: bool,
}

fn start_pod(cluster: &Arc<Cluster>, launch: Launch<'_>) -> Result<PodInstance, ClusterError> {
    let def = launch.def;
    let Some(c) = &def.container else {
        return Err(ClusterError::Create {
            service: def.name.clone(),
            reason: "it has no image".into(),
        });
    };
    // Settled by prepare() for the services it was given; settled here
    // for any other (nothing calls start before prepare in a run).
    let settled = match cluster.settled(&def.name) {
        Some(s) => s,
        None => cluster.settle(def, c)?,
    };
    let image = match &c.image {
        ImageSource::Pull(r) => r.clone(),
        ImageSource::Build { .. } => {
            return Err(ClusterError::Build {
                service: def.name.clone(),
            });
        }
    };
    let argv = settled.argv.clone();
    let listener =
        TcpListener::bind(SocketAddr::new(cluster.ip, 0)).map_err(|e| ClusterError::Create {
            service: def.name.clone(),
            reason: format!("listen for its shim on {}: {e}", cluster.ip),
        })?;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let n = cluster.next.fetch_add(1, Ordering::SeqCst);
    let name = dns_label(&format!("{}-{}-{n}", cluster.prefix, def.name), 63);
    // The command was read from this digest: run exactly that image, not
    // whatever the tag names by the time the node pulls it.
    let pinned = match &settled.digest {
        Some(d) if !image.contains('@') => format!("{}@{d}", without_tag(&image)),
        _ => image.clone(),
    };
    let body = cluster.pod(
        &name,
        def,
        &pinned,
        settled.uid,
        port,
        cluster.host_aliases(),
    );
    let created = cluster
        .rt
        .block_on(cluster.pods().create(&PostParams::default(), &body))
        .map_err(|e| ClusterError::Create {
            service: def.name.clone(),
            reason: e.to_string(),
        })?;
    let _ = created;
    let mut instance = PodInstance {
        cluster: Arc::clone(cluster),
        name: name.clone(),
        ip: cluster.ip,
        image: image.clone(),
        digest: settled.digest.clone(),
        shim: None,
        log: Mutex::new(launch.log.clone()),
        removed: false,
    };
    // From here on, dropping `instance` deletes the pod.
    let (stream, ip) = instance.wait_for_shim(&def.name, &listener)?;
    instance.ip = ip;
    if instance.digest.is_none() {
        // What the kubelet ran, as it reports it (`repo@sha256:…`).
        instance.digest = instance.image_id();
    }
    // The image's own environment (PATH, PGDATA ...) is the shim's, set by
    // the runtime from the image config: the target inherits it.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("HOSTNAME".into(), def.name.clone());
    env.extend(launch.env.clone());
    let spec = LaunchSpec {
        program: argv[0].clone(),
        argv: argv.clone(),
        env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        inherit_env: true,
        cwd: None,
        intercept: launch.intercept.to_vec(),
        rules: Vec::new(),
        seed: launch.seed,
        // The pod is the isolation, and the runtime's profile refuses
        // new namespaces anyway.
        isolation: Isolation {
            namespaces: false,
            network: false,
        },
        on_disconnect: OnDisconnect::AllowAll,
        stop_grace_ms: launch.stop_grace.as_millis() as u64,
        user: None,
    };
    let shim = Shim::attach(stream, spec, launch.shim, launch.on_event).map_err(|e| {
        ClusterError::Start {
            service: def.name.clone(),
            pod: name.clone(),
            reason: e.to_string(),
            output: instance.last_lines(),
        }
    })?;
    instance.shim = Some(shim);
    Ok(instance)
}

impl PodInstance {
    /// Accepts the pod's shim, watching the pod meanwhile so a pod that
    /// cannot start says why instead of timing out.
    fn wait_for_shim(
        &self,
        service: &str,
        listener: &TcpListener,
    ) -> Result<(std::os::unix::net::UnixStream, IpAddr), ClusterError> {
        let failed = |reason: String, output: String| ClusterError::Start {
            service: service.to_string(),
            pod: self.name.clone(),
            reason,
            output,
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| failed(e.to_string(), String::new()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut checked = Instant::now();
        loop {
            match listener.accept() {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nonblocking(false);
                    match tunnel::accept(tcp, Arc::clone(&self.cluster.server)) {
                        // Pod to pod there is no NAT: where the shim dials
                        // from is the pod's address, known before the API
                        // server's status says it.
                        Ok(stream) => return Ok((stream, peer.ip())),
                        // Not our shim (it had no credentials of this run).
                        Err(e) => tracing::warn!(error = %e, "refused a channel"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(failed(e.to_string(), String::new())),
            }
            if checked.elapsed() > Duration::from_millis(500) {
                checked = Instant::now();
                if let Some(why) = self.stuck() {
                    return Err(failed(why, self.last_lines()));
                }
            }
            if Instant::now() > deadline {
                return Err(failed(
                    format!(
                        "its shim did not dial in within {}s",
                        START_TIMEOUT.as_secs()
                    ),
                    self.last_lines(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Why the pod cannot get to running its shim, if it cannot.
    fn stuck(&self) -> Option<String> {
        let Some(pod) = self
            .cluster
            .rt
            .block_on(self.cluster.pods().get_opt(&self.name))
            .ok()?
        else {
            return Some("the pod was deleted before its shim dialled in".into());
        };
        let st = pod.status.unwrap_or_default();
        let ended = matches!(st.phase.as_deref(), Some("Failed" | "Succeeded"))
            .then(|| st.phase.clone().unwrap_or_default());
        let statuses = st
            .init_container_statuses
            .unwrap_or_default()
            .into_iter()
            .chain(st.container_statuses.unwrap_or_default());
        for c in statuses {
            let state = c.state.unwrap_or_default();
            if let Some(w) = state.waiting
                && matches!(
                    w.reason.as_deref(),
                    Some(
                        "ErrImagePull"
                            | "ImagePullBackOff"
                            | "InvalidImageName"
                            | "CreateContainerConfigError"
                            | "CreateContainerError"
                            | "RunContainerError"
                    )
                )
            {
                let message = w.message.unwrap_or_default();
                let hint = if message.contains("non-numeric user") {
                    "; give the service user= a numeric non-root uid"
                } else {
                    ""
                };
                return Some(format!(
                    "container {} cannot start: {} ({message}){hint}",
                    c.name,
                    w.reason.unwrap_or_default(),
                ));
            }
            if let Some(t) = state.terminated
                && t.exit_code != 0
            {
                return Some(format!(
                    "container {} exited with {}{}",
                    c.name,
                    t.exit_code,
                    t.message.map(|m| format!(": {m}")).unwrap_or_default()
                ));
            }
        }
        if let Some(phase) = ended {
            return Some(format!(
                "the pod ended ({phase}) before its shim dialled in"
            ));
        }
        st.conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .map(|c| format!("not scheduled: {}", c.message.unwrap_or_default()))
    }

    /// The image ID the kubelet reports for the service's container.
    fn image_id(&self) -> Option<String> {
        let pod = self
            .cluster
            .rt
            .block_on(self.cluster.pods().get(&self.name))
            .ok()?;
        pod.status?
            .container_statuses?
            .into_iter()
            .map(|c| c.image_id)
            .find(|id| !id.is_empty())
    }

    /// Its output so far, as the end of an error message.
    fn last_lines(&self) -> String {
        let text = self.logs(Some(20));
        if text.trim().is_empty() {
            String::new()
        } else {
            format!("; its last lines:\n{text}")
        }
    }

    fn logs(&self, tail: Option<i64>) -> String {
        let params = LogParams {
            tail_lines: tail,
            ..Default::default()
        };
        self.cluster
            .rt
            .block_on(self.cluster.pods().logs(&self.name, &params))
            .unwrap_or_default()
    }

    fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        // The service's output, for the test's log, before it goes.
        let text = self.logs(None);
        let path = self.log.lock().map(|p| p.clone()).unwrap_or_default();
        if let Ok(mut f) = std::fs::File::create(&path) {
            let _ = f.write_all(text.as_bytes());
        }
        // Out of its Service first: the Service publishes addresses that
        // are not ready, so a terminating pod would stay in it and the next
        // test's traffic to the service's name could reach the old one.
        let unlabel = serde_json::json!({"metadata": {"labels": {LABEL_INSTANCE: null}}});
        let _ = self.cluster.rt.block_on(self.cluster.pods().patch(
            &self.name,
            &PatchParams::default(),
            &Patch::Merge(&unlabel),
        ));
        let _ = self.cluster.rt.block_on(
            self.cluster
                .pods()
                .delete(&self.name, &DeleteParams::background().grace_period(1)),
        );
    }
}

impl Instance for PodInstance {
    fn started(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("pod", self.name.clone()), ("image", self.image.clone())];
        if let Some(d) = &self.digest {
            out.push(("digest", d.clone()));
        }
        if let Some(s) = &self.shim {
            out.push(("pid", s.pid.to_string()));
        }
        out
    }

    fn endpoint(&self, iface: &InterfaceDef) -> Result<SocketAddr, BackendError> {
        Ok(SocketAddr::new(self.ip, iface.port))
    }

    fn shim(&self) -> Option<&Shim> {
        self.shim.as_ref()
    }

    fn relog(&self, log: &Path) {
        if let Ok(mut p) = self.log.lock() {
            *p = log.to_path_buf();
        }
    }

    fn exited(&self) -> Option<ExitInfo> {
        self.shim.as_ref().and_then(Shim::exited)
    }

    fn stop(mut self: Box<Self>, grace: Duration) -> Vec<String> {
        if let Some(shim) = self.shim.take() {
            shim.stop(grace);
        }
        self.remove();
        Vec::new()
    }
}

impl Drop for PodInstance {
    fn drop(&mut self) {
        self.shim.take();
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_dns_labels() {
        assert_eq!(dns_label("Orders_API", 63), "orders-api");
        assert_eq!(dns_label("--x--", 63), "x");
        assert_eq!(dns_label("___", 63), "svc");
        assert_eq!(dns_label(&"a".repeat(80), 63).len(), 63);
        assert_eq!(instance_name("shop-1a", "db"), "shop-1a-db");
        assert_eq!(instance_name("1nightly-2f", "db"), "s-1nightly-2f-db");
        assert_eq!(instance_name(&"x".repeat(70), "db").len(), 63);
        assert_eq!(port_name("admin__api"), "admin-api");
        assert!(is_dns_name("orders-db") && is_dns_name("db.internal"));
        assert!(!is_dns_name("order_db") && !is_dns_name("Orders") && !is_dns_name("-x"));
        assert_eq!(
            without_tag("10.244.0.1:5000/app:e2e"),
            "10.244.0.1:5000/app"
        );
        assert_eq!(without_tag("10.244.0.1:5000/app"), "10.244.0.1:5000/app");
        assert_eq!(without_tag("redis"), "redis");
        assert_eq!(port_name("8080"), "p8080");
        assert_eq!(port_name("a-very-long-interface"), "a-very-long-int");
    }
}
