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
    /// Something the user should know about how a test ran.
    fn note(&mut self, text: &str);
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

/// `--explore`: which interleavings of each `parallel()` to play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Explore {
    /// Every one (at most `limit`, or the run is refused).
    All { limit: u64 },
    /// `limit` of them, drawn with the run's seed.
    Sample { limit: u64 },
    /// Just this one (a replay).
    One(u64),
}

/// How many interleavings a run's `parallel()` rounds give: the product
/// of each round's held calls, factorial (0 when nothing was held).
pub fn interleavings(result: &TestResult) -> u64 {
    let rounds: Vec<usize> = result
        .events
        .iter()
        .filter(|e| e.kind == "explore_round")
        .filter_map(|e| e.fields.get("held").and_then(|n| n.parse().ok()))
        .collect();
    if rounds.is_empty() {
        return 0;
    }
    rounds.iter().fold(1u64, |acc, n| {
        acc.saturating_mul(crate::runtime::factorial(*n))
    })
}

/// The interleavings after the first to play, of `total`.
fn explore_plan(explore: Explore, total: u64, seed: u64) -> Result<Vec<u64>, String> {
    match explore {
        Explore::One(_) => Ok(Vec::new()),
        Explore::All { limit } if total > limit => Err(format!(
            "{total} interleavings is more than --explore-limit {limit}; raise it, or sample them with --explore sample"
        )),
        Explore::All { .. } => Ok((1..total).collect()),
        Explore::Sample { limit } => {
            // Floyd's sampling of distinct indices in 1..total, from a
            // splitmix64 stream of the seed: the same seed, the same sample.
            let mut state = seed;
            let mut next = move || {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^ (z >> 31)
            };
            let range = total.saturating_sub(1);
            let want = limit.saturating_sub(1).min(range);
            let mut picked = std::collections::BTreeSet::new();
            for j in (range - want)..range {
                let t = next() % (j + 1);
                if !picked.insert(t + 1) {
                    picked.insert(j + 1);
                }
            }
            Ok(picked.into_iter().collect())
        }
    }
}

/// How a suite runs its tests.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Runs of each test (`--runs`), seeds from `base_seed` on.
    pub runs: u64,
    pub base_seed: u64,
    /// Keep passing results too, not only failures.
    pub keep_passes: bool,
    /// `--explore`.
    pub explore: Option<Explore>,
}

/// Runs `tests` as `schedule` says.
pub fn run(
    spec: &Spec,
    tests: &[String],
    schedule: Schedule,
    config: &RunConfig,
    observer: &mut dyn Observer,
) -> Summary {
    let Schedule {
        runs,
        base_seed,
        keep_passes,
        explore,
    } = schedule;
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
            // Under --explore, a run plays one interleaving: the first
            // says how many its parallel() calls have.
            let first = match explore {
                Some(Explore::One(k)) => Some(k),
                Some(_) => Some(0),
                None => None,
            };
            let mut config = config.clone();
            config.explore = first;
            let mut plan = vec![first];
            let mut total = None;
            let mut failed_run = false;
            let mut k = 0;
            while k < plan.len() {
                config.explore = plan[k];
                let mut result = crate::run_test(spec, name, seed, &config);
                if let Some(index) = plan[k] {
                    if total.is_none() {
                        let n = interleavings(&result);
                        total = Some(n);
                        match explore.map(|e| explore_plan(e, n, seed)) {
                            _ if n == 0 => observer.note(&format!(
                                "--explore: {name} has no parallel() whose branches held a call; it ran once"
                            )),
                            Some(Ok(rest)) => plan.extend(rest.into_iter().map(Some)),
                            Some(Err(why)) => observer.note(&format!("--explore: {name}: {why}")),
                            None => {}
                        }
                    }
                    if let Some(n) = total.filter(|n| *n > 0) {
                        result.interleaving = Some((index, n));
                        result.replay =
                            format!("{} --explore all --explore-index {index}", result.replay);
                    }
                }
                let ok = result.outcome == Outcome::Pass;
                observer.finished(&result, i, passed + u64::from(ok));
                let interrupted = result.outcome == Outcome::Interrupted;
                if !ok || keep_passes {
                    summary.results.push(result);
                }
                if interrupted {
                    summary.interrupted = true;
                    break 'tests;
                }
                if !ok {
                    failed_run = true;
                    break;
                }
                k += 1;
            }
            if failed_run {
                break;
            }
            passed += 1;
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
        assert_eq!(
            select(&tests, "~disk_(full|slow)$"),
            ["test_disk_full", "test_disk_slow"]
        );
        assert_eq!(select(&tests, "~^test_happy"), ["test_happy_path"]);
        assert!(select(&tests, "~(").is_empty());
        assert!(
            faultbox_spec::load::test_filter_error("~(")
                .is_some_and(|e| e.contains("--test \"~(\": not a regular expression"))
        );
        assert_eq!(faultbox_spec::load::test_filter_error("disk_*"), None);
    }

    #[test]
    fn explore_plans_every_interleaving_or_a_seeded_sample() {
        assert_eq!(
            explore_plan(Explore::All { limit: 100 }, 6, 1),
            Ok(vec![1, 2, 3, 4, 5])
        );
        assert!(
            explore_plan(Explore::All { limit: 100 }, 720, 1)
                .is_err_and(|e| e.contains("720 interleavings is more than --explore-limit 100"))
        );
        let a = explore_plan(Explore::Sample { limit: 5 }, 720, 9).expect("plan");
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|k| (1..720).contains(k)));
        assert_eq!(
            a,
            explore_plan(Explore::Sample { limit: 5 }, 720, 9).expect("plan")
        );
        assert_eq!(
            explore_plan(Explore::Sample { limit: 50 }, 6, 1)
                .expect("plan")
                .len(),
            5
        );
        assert_eq!(explore_plan(Explore::One(3), 6, 1), Ok(vec![]));
        assert_eq!(crate::runtime::permutation(3, 0), vec![0, 1, 2]);
        assert_eq!(crate::runtime::permutation(3, 5), vec![2, 1, 0]);
        let all: std::collections::BTreeSet<Vec<usize>> =
            (0..24).map(|k| crate::runtime::permutation(4, k)).collect();
        assert_eq!(all.len(), 24);
    }

    #[test]
    fn seeds_come_from_the_flag_then_the_run_count() {
        assert_eq!(base_seed(Some(42), 5), (42, "cli"));
        assert_eq!(base_seed(None, 3), (0, "runs"));
        let (s, from) = base_seed(None, 1);
        assert!(s < 1_000_000 && from == "generated");
    }
}
