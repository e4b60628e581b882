//! A suite: the tests a filter chose, each run `runs` times with
//! successive seeds (stopping at its first failing run), after the checks
//! that can be made before anything starts. The CLI prints what this
//! reports; the cluster runner will drive the same loop.

use std::path::PathBuf;
use std::time::Duration;

use faultbox_spec::load::Spec;

use crate::backend::port_taken;
use crate::backend::{BackendError, resolve_binary};
use crate::report::{Outcome, TestResult};
use crate::runtime::RunConfig;
use crate::shim::ShimError;

/// What stops a suite before its first service starts.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// No usable shim.
    #[error(transparent)]
    Shim(#[from] ShimError),
    /// A service's program cannot be run, or its port is taken.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// `user=` without root.
    #[error(
        "service {service:?} ({declared_at}): user={user:?} needs faultbox to run as root (switching accounts needs CAP_SETUID)"
    )]
    NeedsRoot {
        /// The service.
        service: String,
        /// Where the spec declares it.
        declared_at: String,
        /// The account.
        user: String,
    },
    /// Container services, and no Docker engine.
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerError),
    /// Container services in a runner that cannot make pods.
    #[error(transparent)]
    Cluster(#[from] crate::kubernetes::ClusterError),
    /// Syscall faults on a kernel without user notification.
    #[error(
        "this kernel does not support seccomp user notification, so syscall faults cannot be injected (needs Linux 5.0+ with CONFIG_SECCOMP_FILTER)"
    )]
    NoUserNotification,
    /// The run's CA could not be made.
    #[error("the run's CA in {}: {reason}", dir.display())]
    RunCa {
        /// FAULTBOX_RUN_CA_DIR.
        dir: std::path::PathBuf,
        /// Why.
        reason: String,
    },
}

pub use faultbox_spec::load::select_tests as select;

/// The first seed of a suite and where it came from: `--seed`, `0` for
/// `--runs N` (seeds 0..N-1), or a fresh one.
pub fn base_seed(given: Option<u64>, runs: u64) -> (u64, &'static str) {
    match given {
        Some(s) => (s, "cli"),
        None if runs > 1 => (0, "runs"),
        None => (
            faultbox_agent::engine::random_seed() % 1_000_000,
            "generated",
        ),
    }
}

/// What preflight found: the shim to launch services with, and the Docker
/// engine when the spec has container services.
pub struct Prepared {
    pub shim: PathBuf,
    pub docker: Option<std::sync::Arc<crate::docker::Docker>>,
    /// In a FaultTest's runner, container services become pods instead.
    pub cluster: Option<std::sync::Arc<crate::kubernetes::Cluster>>,
}

/// Everything that can be checked before a service starts: the shim, each
/// binary, accounts, free ports, the kernel's user notification, and the
/// Docker engine (connected, with the run's network, and what dead runs
/// left removed) when containers are declared. `work_dir` holds the run's
/// scratch files.
pub fn preflight(spec: &Spec, work_dir: &std::path::Path) -> Result<Prepared, PreflightError> {
    let shim = crate::shim::locate()?;
    let binaries = || {
        spec.services
            .iter()
            .filter(|s| !s.is_remote() && !s.is_container())
    };
    for s in binaries() {
        resolve_binary(&s.binary, &spec.dir).map_err(|source| BackendError::Program {
            service: s.name.clone(),
            declared_at: s.declared_at.clone(),
            source,
        })?;
        if let Some(user) = &s.user
            && !faultbox_agent::process::is_root()
        {
            return Err(PreflightError::NeedsRoot {
                service: s.name.clone(),
                declared_at: s.declared_at.clone(),
                user: user.clone(),
            });
        }
    }
    for s in binaries() {
        for i in &s.interfaces {
            if port_taken(i, Duration::from_millis(200)) {
                return Err(BackendError::PortBusy {
                    service: s.name.clone(),
                    interface: i.name.clone(),
                    port: i.port,
                }
                .into());
            }
        }
    }
    if !spec.intercept.is_empty() && !faultbox_agent::seccomp::user_notification_available() {
        return Err(PreflightError::NoUserNotification);
    }
    run_ca(spec)?;
    let containers = spec.services.iter().any(|s| s.is_container());
    if containers && crate::kubernetes::in_runner() {
        let cluster = crate::kubernetes::Cluster::connect(work_dir)?;
        cluster.prepare(&spec.services)?;
        return Ok(Prepared {
            shim,
            docker: None,
            cluster: Some(std::sync::Arc::new(cluster)),
        });
    }
    let docker = if containers {
        let docker = crate::docker::Docker::connect(work_dir)?;
        docker.prepare(&spec.services, &spec.dir)?;
        Some(std::sync::Arc::new(docker))
    } else {
        None
    };
    Ok(Prepared {
        shim,
        docker,
        cluster: None,
    })
}

/// In a FaultTest's runner (`FAULTBOX_RUN_CA_DIR` set) a spec with TLS
/// interfaces gets one CA for the whole run, which signs every test's
/// proxy certificate. Its key never leaves the runner; its certificate
/// goes to the log as a `run-ca: "<PEM as a JSON string>"` line, which the
/// operator publishes in a ConfigMap for clients to trust.
fn run_ca(spec: &Spec) -> Result<(), PreflightError> {
    let Some(dir) = std::env::var_os("FAULTBOX_RUN_CA_DIR").map(std::path::PathBuf::from) else {
        return Ok(());
    };
    let tls = spec
        .services
        .iter()
        .any(|s| s.interfaces.iter().any(|i| i.tls.is_some()));
    if !tls || dir.join("tls.crt").is_file() {
        return Ok(());
    }
    let fail = |reason: String| PreflightError::RunCa {
        dir: dir.clone(),
        reason,
    };
    let (cert, key) =
        faultbox_proxy::tls::new_ca("Faultbox run CA").map_err(|e| fail(e.to_string()))?;
    std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join("tls.key"))
            .and_then(|mut f| f.write_all(key.as_bytes()))
            .map_err(|e| fail(e.to_string()))?;
    }
    std::fs::write(dir.join("tls.crt"), &cert).map_err(|e| fail(e.to_string()))?;
    eprintln!("run-ca: {}", serde_json::Value::String(cert));
    Ok(())
}

/// What a suite reports while it runs.
pub trait Observer {
    /// Run `run` (from 0) of test `name` starts with `seed`.
    fn started(&mut self, name: &str, seed: u64, run: u64);
    /// That run ended; `passed` runs of the test passed so far.
    fn finished(&mut self, result: &TestResult, run: u64, passed: u64);
    /// The test is done: `passed` of `runs` runs passed.
    fn test_done(&mut self, name: &str, passed: u64, runs: u64);
}

/// What a suite ran.
#[derive(Debug, Default)]
pub struct Summary {
    /// The results kept (every run's, or only failures when asked).
    pub results: Vec<TestResult>,
    /// Tests whose every run passed, and the others.
    pub passed: u64,
    pub failed: u64,
    /// The run was interrupted: the last result says where, and the
    /// tests after it did not run.
    pub interrupted: bool,
}

/// Runs `tests`, each `runs` times from `base_seed` on; keeps passing
/// results only when `keep_passes`.
pub fn run(
    spec: &Spec,
    tests: &[String],
    runs: u64,
    base_seed: u64,
    keep_passes: bool,
    config: &RunConfig,
    observer: &mut dyn Observer,
) -> Summary {
    let mut summary = Summary::default();
    'tests: for name in tests {
        let mut passed = 0;
        for i in 0..runs {
            if config.stop.load(std::sync::atomic::Ordering::SeqCst) {
                summary.interrupted = true;
                break 'tests;
            }
            let seed = base_seed.wrapping_add(i);
            observer.started(name, seed, i);
            let result = crate::run_test(spec, name, seed, config);
            let ok = result.outcome == Outcome::Pass;
            if ok {
                passed += 1;
            }
            observer.finished(&result, i, passed);
            let interrupted = result.outcome == Outcome::Interrupted;
            if !ok || keep_passes {
                summary.results.push(result);
            }
            if interrupted {
                summary.interrupted = true;
                break 'tests;
            }
            if !ok {
                break;
            }
        }
        observer.test_done(name, passed, runs);
        if passed == runs {
            summary.passed += 1;
        } else {
            summary.failed += 1;
        }
    }
    config.kept.stop_all(config.stop_grace);
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_filter_accepts_names_with_and_without_prefix_and_globs() {
        let tests: Vec<String> = ["test_happy_path", "test_disk_full", "test_disk_slow"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(select(&tests, "happy_path"), ["test_happy_path"]);
        assert_eq!(select(&tests, "test_disk_full"), ["test_disk_full"]);
        assert_eq!(
            select(&tests, "disk_*"),
            ["test_disk_full", "test_disk_slow"]
        );
        assert!(select(&tests, "nope").is_empty());
    }

    #[test]
    fn seeds_come_from_the_flag_then_the_run_count() {
        assert_eq!(base_seed(Some(42), 5), (42, "cli"));
        assert_eq!(base_seed(None, 3), (0, "runs"));
        let (s, from) = base_seed(None, 1);
        assert!(s < 1_000_000 && from == "generated");
    }
}
