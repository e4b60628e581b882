//! `faultbox test`: load a spec, run its tests, print verdicts.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use faultbox_agent::glob::wildcard;
use faultbox_agent::seccomp;
use faultbox_engine::backend::port_open;
use faultbox_engine::report::{self, Outcome, TestResult};
use faultbox_engine::runtime::{RunConfig, resolve_binary};
use faultbox_engine::{run_test, shim};
use faultbox_spec::load as spec;
use serde_json::json;

use crate::log::{Level, LogFormat, Logger};

/// Which results to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Show {
    All,
    #[value(alias = "failures")]
    Fail,
}

/// Output format of the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Flags of `faultbox test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The spec to run (default: ./faultbox.star).
    #[arg(value_name = "FILE.star", default_value = "faultbox.star")]
    file: PathBuf,
    /// Run only matching tests: a name, a name without `test_`, or a glob.
    #[arg(long = "test", value_name = "NAME")]
    test: Option<String>,
    /// Run each test N times (seeds 0..N-1 unless --seed); a test stops at
    /// its first failing run.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Seed for deterministic replay (with --runs, seeds SEED..SEED+N-1).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Which results to print and record.
    #[arg(long, value_enum, default_value_t = Show::All)]
    show: Show,
    /// `json`: the results as JSON on stdout (human output stays on stderr).
    #[arg(long, value_enum, value_name = "FORMAT")]
    format: Option<Format>,
    /// Also write the JSON results to FILE.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Load the spec and list services and tests; start nothing.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// Debug logging; print return values and every intercepted syscall.
    #[arg(long)]
    debug: bool,
    /// Log format: console or json (default: console on a terminal).
    #[arg(long = "log-format", value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Longest a test body may run.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    timeout: String,
    /// Not in this build (interleaving exploration).
    #[arg(long, hide = true)]
    explore: Option<String>,
    /// Not in this build.
    #[arg(long = "virtual-time", hide = true)]
    virtual_time: bool,
    /// Not in this build.
    #[arg(long, hide = true)]
    shiviz: Option<PathBuf>,
    /// Not in this build.
    #[arg(long, hide = true)]
    normalize: Option<PathBuf>,
}

fn select(tests: &[String], pattern: &str) -> Vec<String> {
    let with_prefix = format!("test_{pattern}");
    let glob = pattern.contains(['*', '?']);
    tests
        .iter()
        .filter(|t| {
            *t == pattern
                || *t == &with_prefix
                || (glob && (wildcard(pattern, t) || wildcard(&with_prefix, t)))
        })
        .cloned()
        .collect()
}

/// Runs the command and returns the exit code.
pub fn run(args: TestArgs) -> Result<i32> {
    for (given, flag) in [
        (args.explore.is_some(), "--explore"),
        (args.virtual_time, "--virtual-time"),
        (args.shiviz.is_some(), "--shiviz"),
        (args.normalize.is_some(), "--normalize"),
    ] {
        if given {
            bail!("{flag} is not supported by this build of faultbox yet");
        }
    }
    let timeout = faultbox_agent::rule::parse_duration(&args.timeout)
        .map(Duration::from_nanos)
        .map_err(|e| anyhow::anyhow!("--timeout {:?}: {e}", args.timeout))?;
    let started = Instant::now();
    let spec = match spec::load(&args.file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(1);
        }
    };
    let tests = match &args.test {
        Some(p) => {
            let chosen = select(&spec.tests, p);
            if chosen.is_empty() {
                eprintln!(
                    "error: no test matched {p:?} (available: {})",
                    if spec.tests.is_empty() {
                        "none".into()
                    } else {
                        spec.tests.join(", ")
                    }
                );
                return Ok(1);
            }
            chosen
        }
        None => spec.tests.clone(),
    };
    if args.dry_run {
        let mut out = String::new();
        let _ = writeln!(out, "Dry-run: loaded {}", args.file.display());
        let _ = writeln!(out, "Services: {}", spec.services.len());
        for s in &spec.services {
            let ports: Vec<String> = s
                .interfaces
                .iter()
                .map(|i| format!("{}:{}/{}", i.name, i.port, i.protocol))
                .collect();
            let what = if s.is_remote() {
                let addrs: Vec<&str> = s.remote.values().map(String::as_str).collect();
                format!("remote {}", addrs.join(", "))
            } else {
                s.binary.clone()
            };
            let _ = writeln!(
                out,
                "  - {} ({}{}{})",
                s.name,
                what,
                if ports.is_empty() { "" } else { "; " },
                ports.join(", ")
            );
        }
        let _ = writeln!(out, "Tests: {}", tests.len());
        for t in &tests {
            let _ = writeln!(out, "  - {t}");
        }
        if !spec.intercept.is_empty() {
            let _ = writeln!(out, "Syscall filter: {}", spec.intercept.join(", "));
        }
        crate::print_stdout(&out)?;
        return Ok(0);
    }
    if tests.is_empty() {
        eprintln!(
            "WARNING: [NO_TESTS_DISCOVERED] {} defines no test_* function",
            args.file.display()
        );
        return Ok(0);
    }
    // Everything that can be checked before starting anything.
    let shim_path = shim::locate().map_err(anyhow::Error::msg)?;
    for s in spec.services.iter().filter(|s| !s.is_remote()) {
        resolve_binary(&s.binary, &spec.dir)
            .map_err(|e| anyhow::anyhow!("service {:?} ({}): {e}", s.name, s.declared_at))?;
        if let Some(user) = &s.user
            && !faultbox_agent::process::is_root()
        {
            bail!(
                "service {:?} ({}): user={user:?} needs faultbox to run as root (switching accounts needs CAP_SETUID)",
                s.name,
                s.declared_at
            );
        }
    }
    for s in spec.services.iter().filter(|s| !s.is_remote()) {
        for i in &s.interfaces {
            if port_open(i.port, Duration::from_millis(200)) {
                bail!(
                    "port {} of {}.{} is already in use by another process (stop it, or declare another port)",
                    i.port,
                    s.name,
                    i.name
                );
            }
        }
    }
    if !spec.intercept.is_empty() && !seccomp::user_notification_available() {
        bail!(
            "this kernel does not support seccomp user notification, so syscall faults cannot be injected (needs Linux 5.0+ with CONFIG_SECCOMP_FILTER)"
        );
    }
    let log_dir = std::env::temp_dir().join(format!("faultbox-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).with_context(|| format!("create {}", log_dir.display()))?;
    let config = RunConfig {
        shim: shim_path,
        log_dir: log_dir.clone(),
        test_timeout: timeout,
        stop_grace: Duration::from_secs(2),
    };
    let log = Logger::new(
        args.log_format,
        args.debug,
        format!("{:016x}", std::process::id()),
    );
    let (base_seed, seed_source) = match args.seed {
        Some(s) => (s, "cli"),
        None if args.runs > 1 => (0, "runs"),
        None => (
            faultbox_agent::engine::random_seed() % 1_000_000,
            "generated",
        ),
    };
    eprintln!("Seed: {base_seed} ({seed_source})");
    let mut results: Vec<TestResult> = Vec::new();
    let (mut passed, mut failed) = (0u64, 0u64);
    for name in &tests {
        let mut runs_passed = 0;
        for i in 0..args.runs {
            let seed = base_seed.wrapping_add(i);
            log.log(
                Level::Debug,
                "running test",
                &[("test", json!(name)), ("seed", json!(seed))],
            );
            let result = run_test(&spec, name, seed, &config);
            log.log(
                Level::Debug,
                "test completed",
                &[
                    ("test", json!(name)),
                    ("result", json!(result.outcome.as_str())),
                    ("duration_ms", json!(result.duration_ms)),
                ],
            );
            let ok = result.outcome == Outcome::Pass;
            if ok {
                runs_passed += 1;
            }
            let show = !ok || args.show == Show::All;
            if show && (args.runs == 1 || !ok) {
                eprint!("{}", result.human(args.debug));
                if args.runs > 1 {
                    eprintln!("  ({runs_passed}/{} runs passed before failure)", i + 1);
                }
            }
            if show {
                results.push(result);
            }
            if !ok {
                break;
            }
        }
        if runs_passed == args.runs {
            passed += 1;
            if args.runs > 1 && args.show == Show::All {
                eprintln!("--- PASS: {name} ({runs_passed}/{} runs) ---", args.runs);
            }
        } else {
            failed += 1;
        }
    }
    eprintln!("\n{passed} passed, {failed} failed");
    let zero = report::zero_traffic(&results);
    if !zero.is_empty() {
        eprint!("\n{zero}");
    }
    if failed > 0 {
        eprintln!("Service output: {}", log_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&log_dir);
    }
    let doc = report::run_json(
        &args.file.display().to_string(),
        started.elapsed().as_millis() as u64,
        &results,
    );
    let text = serde_json::to_string_pretty(&doc)?;
    if let Some(path) = &args.output {
        std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    if args.format == Some(Format::Json) {
        crate::print_stdout(&format!("{text}\n"))?;
    }
    Ok(if failed > 0 { 2 } else { 0 })
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
}
