//! `faultbox test`: load a spec, run its tests, print verdicts.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use faultbox_agent::process::SignalSet;
use faultbox_engine::report::{self, Outcome, TestResult};
use faultbox_engine::runtime::RunConfig;
use faultbox_engine::suite;
use faultbox_spec::load as spec;

use crate::log::LogFormat;

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
    /// The JSON document on one line: what the cluster runner prints, so
    /// the operator finds it in a log that interleaves stderr.
    JsonLine,
}

/// Flags of `faultbox test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The spec to run (default: ./faultbox.star).
    #[arg(value_name = "FILE.star", default_value = "faultbox.star")]
    pub(crate) file: PathBuf,
    /// Run only matching tests: a name, a name without `test_`, or a glob.
    #[arg(long = "test", value_name = "NAME")]
    pub(crate) test: Option<String>,
    /// Run each test N times (seeds 0..N-1 unless --seed); a test stops at
    /// its first failing run.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) runs: u64,
    /// Seed for deterministic replay (with --runs, seeds SEED..SEED+N-1).
    #[arg(long, value_name = "N")]
    pub(crate) seed: Option<u64>,
    /// Which results to print and record.
    #[arg(long, value_enum, default_value_t = Show::All)]
    show: Show,
    /// `json`: the results as JSON on stdout (human output stays on
    /// stderr); `json-line`: the same document on one line.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub(crate) format: Option<Format>,
    /// Also write the JSON results to FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
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
    /// Longest loading the spec may take (its top-level code and loads;
    /// default 30s).
    #[arg(long = "load-timeout", value_name = "DURATION")]
    load_timeout: Option<String>,
    /// Most memory evaluating the spec may take (`512MiB`, `2GiB`; `0`
    /// for no limit; default 1GiB).
    #[arg(long = "load-memory", value_name = "SIZE")]
    load_memory: Option<String>,
    /// Run in the Kubernetes cluster of the current kubeconfig context, as
    /// a FaultTest the operator runs; prints and exits as a local run.
    #[arg(long)]
    pub(crate) kube: bool,
    /// The namespace for --kube (default: the context's).
    #[arg(long, value_name = "NS", requires = "kube")]
    pub(crate) namespace: Option<String>,
    /// The kubeconfig context for --kube (default: the current one).
    #[arg(long, value_name = "CTX", requires = "kube")]
    pub(crate) context: Option<String>,
    /// Play the interleavings of each parallel(): every one (all) or a
    /// seeded sample; each is a run of its own
    #[arg(long, value_name = "all|sample", value_parser = ["all", "sample"])]
    explore: Option<String>,
    /// With --explore sample: how many interleavings; with all: the most
    /// it may run [default: 20 for sample, 5040 for all]
    #[arg(long, value_name = "N", requires = "explore")]
    explore_limit: Option<u64>,
    /// With --explore: play only interleaving K (the replay command)
    #[arg(long, value_name = "K", requires = "explore")]
    explore_index: Option<u64>,
    /// Not in this build.
    #[arg(long = "virtual-time", hide = true)]
    virtual_time: bool,
    /// Write a ShiViz log of the run's events (vector clocks per service)
    #[arg(long, value_name = "FILE")]
    shiviz: Option<PathBuf>,
    /// Write the normalized trace (for `faultbox diff`: stable across runs
    /// of a deterministic test)
    #[arg(long, value_name = "FILE")]
    normalize: Option<PathBuf>,
}

/// Runs the command and returns the exit code.
pub fn run(args: TestArgs) -> Result<i32> {
    if args.virtual_time {
        bail!("--virtual-time is not supported by this build of faultbox yet");
    }
    let explore = match (args.explore.as_deref(), args.explore_index) {
        (None, _) => None,
        (Some(_), Some(k)) => Some(suite::Explore::One(k)),
        (Some("sample"), None) => Some(suite::Explore::Sample {
            limit: args.explore_limit.unwrap_or(20).max(1),
        }),
        (Some(_), None) => Some(suite::Explore::All {
            limit: args.explore_limit.unwrap_or(5040).max(1),
        }),
    };
    let timeout = faultbox_agent::rule::parse_duration(&args.timeout)
        .map(Duration::from_nanos)
        .map_err(|e| anyhow::anyhow!("--timeout {:?}: {e}", args.timeout))?;
    let mut limits = spec::Limits::default();
    if let Some(t) = &args.load_timeout {
        limits.timeout = faultbox_agent::rule::parse_duration(t)
            .map(Duration::from_nanos)
            .map_err(|e| anyhow::anyhow!("--load-timeout {t:?}: {e}"))?;
    }
    if let Some(m) = &args.load_memory {
        limits.memory = spec::parse_size(m).ok_or_else(|| {
            anyhow::anyhow!(
                "--load-memory {m:?}: not a size (write it like 512MiB, 2GiB or 0 for no limit)"
            )
        })?;
    }
    let started = Instant::now();
    let spec = match spec::load_with(&args.file, limits) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(1);
        }
    };
    let tests = match &args.test {
        Some(p) => {
            if let Some(why) = faultbox_spec::load::test_filter_error(p) {
                eprintln!("error: {why}");
                return Ok(1);
            }
            let chosen = suite::select(&spec.tests, p);
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
    if args.kube && !args.dry_run {
        if args.normalize.is_some() || args.shiviz.is_some() {
            bail!(
                "--normalize and --shiviz write a local run's trace; with --kube, take the events from --output's JSON document"
            );
        }
        return crate::kube::run(&args, &spec);
    }
    // After the load, whose thread is gone: the mask must be set while
    // this is the only thread.
    let interrupt = Interrupt::watch()?;
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
        // What a run would refuse, without starting anything: an account
        // that does not exist is an error; a binary that is not there yet
        // may still be built, so it is a warning.
        for s in spec.services.iter().filter(|s| !s.is_remote()) {
            if let Some(user) = &s.user
                && let Err(e) = faultbox_agent::process::lookup_account(user)
            {
                eprintln!("error: service {:?} ({}): {e}", s.name, s.declared_at);
                return Ok(1);
            }
            if let Err(e) = faultbox_engine::backend::resolve_binary(&s.binary, &spec.dir) {
                eprintln!(
                    "WARNING: service {:?} ({}): {e}; a run would fail unless it exists by then",
                    s.name, s.declared_at
                );
            }
        }
        return Ok(0);
    }
    if tests.is_empty() {
        eprintln!(
            "WARNING: [NO_TESTS_DISCOVERED] {} defines no test_* function",
            args.file.display()
        );
        return Ok(0);
    }
    // The trace files are opened before anything runs: a path that cannot
    // be written fails now, not after the whole suite.
    let mut views = Vec::new();
    for (path, view) in [
        (&args.normalize, View::Normalized),
        (&args.shiviz, View::ShiViz),
    ] {
        if let Some(p) = path {
            let file = std::fs::File::create(p)
                .with_context(|| format!("cannot write the trace to {}", p.display()))?;
            views.push((p.clone(), file, view));
        }
    }
    // Everything that can be checked before starting anything.
    let log_dir = std::env::temp_dir().join(format!("faultbox-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).with_context(|| format!("create {}", log_dir.display()))?;
    let prepared = suite::preflight(&spec, &log_dir)?;
    let config = RunConfig {
        shim: prepared.shim,
        docker: prepared.docker,
        cluster: prepared.cluster,
        kept: Default::default(),
        explore: None,
        log_dir: log_dir.clone(),
        test_timeout: timeout,
        stop_grace: Duration::from_secs(2),
        stop: Arc::clone(&interrupt.stop),
    };
    interrupt.running.store(true, Ordering::SeqCst);
    crate::log::init(
        args.log_format,
        args.debug,
        format!("{:016x}", std::process::id()),
    );
    let (base_seed, seed_source) = suite::base_seed(args.seed, args.runs);
    eprintln!("Seed: {base_seed} ({seed_source})");
    let mut printer = Printer {
        show: args.show,
        runs: args.runs,
        debug: args.debug,
    };
    let suite::Summary {
        results,
        passed,
        failed,
        interrupted,
    } = suite::run(
        &spec,
        &tests,
        suite::Schedule {
            runs: args.runs,
            base_seed,
            keep_passes: args.show == Show::All,
            explore,
        },
        &config,
        &mut printer,
    );
    let signal = interrupt.signal.load(Ordering::SeqCst);
    if interrupted {
        eprintln!(
            "\ninterrupted by {}: {passed} passed, {failed} failed before it; the tests after it did not run",
            signal_name(signal)
        );
    } else {
        eprintln!("\n{passed} passed, {failed} failed");
    }
    let zero = report::zero_traffic(&results);
    if !zero.is_empty() {
        eprint!("\n{zero}");
    }
    if failed > 0 {
        eprintln!("Service output: {}", log_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&log_dir);
    }
    let scrub = report::Scrub {
        dirs: vec![
            (log_dir.display().to_string(), "$LOGS"),
            (spec.dir.display().to_string(), "$SPEC"),
        ],
        ..report::Scrub::default()
    };
    for (path, mut file, view) in views {
        let text = match view {
            View::Normalized => report::normalized(&results, &scrub),
            View::ShiViz => report::shiviz(&results),
        };
        file.write_all(text.as_bytes())
            .with_context(|| format!("write {}", path.display()))?;
    }
    let star_file = args.file.display().to_string();
    let doc = report::run_json(&star_file, started.elapsed().as_millis() as u64, &results);
    let text = serde_json::to_string_pretty(&doc)?;
    if let Some(path) = &args.output {
        std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    match args.format {
        Some(Format::Json) => crate::print_stdout(&format!("{text}\n"))?,
        Some(Format::JsonLine) => {
            crate::print_stdout(&format!("{}\n", serde_json::to_string(&doc)?))?
        }
        _ => {}
    }
    Ok(if interrupted {
        128 + signal
    } else if failed > 0 {
        2
    } else {
        0
    })
}

/// The trace files a run can write.
#[derive(Clone, Copy)]
enum View {
    Normalized,
    ShiViz,
}

/// SIGINT and SIGTERM during `faultbox test`. Before services start, a
/// signal ends the process at once (there is nothing to clean up). While
/// the suite runs, the first one stops the running test and its services
/// and lets the summary and the reports be written; a second one exits at
/// once (the shims then stop their targets as their controller is gone).
struct Interrupt {
    stop: Arc<AtomicBool>,
    running: Arc<AtomicBool>,
    signal: Arc<AtomicI32>,
}

impl Interrupt {
    fn watch() -> Result<Interrupt> {
        // Blocked before any other thread exists, so only the watcher
        // sees them (threads inherit the mask).
        let signals = SignalSet::block(&[libc::SIGINT, libc::SIGTERM]).context("block signals")?;
        let me = Interrupt {
            stop: Arc::new(AtomicBool::new(false)),
            running: Arc::new(AtomicBool::new(false)),
            signal: Arc::new(AtomicI32::new(0)),
        };
        let (stop, running, signal) = (
            Arc::clone(&me.stop),
            Arc::clone(&me.running),
            Arc::clone(&me.signal),
        );
        std::thread::spawn(move || {
            let (sig, _) = signals.wait();
            if !running.load(Ordering::SeqCst) {
                std::process::exit(128 + sig);
            }
            signal.store(sig, Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
            eprintln!(
                "\nfaultbox: {}: stopping the running test and its services (again to exit at once)",
                signal_name(sig)
            );
            let (again, _) = signals.wait();
            std::process::exit(128 + again);
        });
        Ok(me)
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Prints a suite's progress as the CLI reference shows it.
struct Printer {
    show: Show,
    runs: u64,
    debug: bool,
}

impl suite::Observer for Printer {
    fn started(&mut self, name: &str, seed: u64, _run: u64) {
        tracing::debug!(test = name, seed, "running test");
    }

    fn finished(&mut self, result: &TestResult, run: u64, passed: u64) {
        tracing::debug!(
            test = %result.name,
            result = result.outcome.as_str(),
            duration_ms = result.duration_ms,
            "test completed"
        );
        let ok = result.outcome == Outcome::Pass;
        let show = !ok || self.show == Show::All;
        if show && (self.runs == 1 || !ok) {
            eprint!("{}", result.human(self.debug));
            if self.runs > 1 {
                eprintln!("  ({passed}/{} runs passed before failure)", run + 1);
            }
        }
    }

    fn note(&mut self, text: &str) {
        eprintln!("{text}");
    }

    fn test_done(&mut self, name: &str, passed: u64, runs: u64) {
        if passed == runs && runs > 1 && self.show == Show::All {
            eprintln!("--- PASS: {name} ({passed}/{runs} runs) ---");
        }
    }
}
