//! Faultbox's runtime: services started under `faultbox-shim`, the test
//! body run against them with its fault windows and steps, the event
//! trace, verdicts and reports. The language is `faultbox-spec`; the
//! proxies are `faultbox-proxy`.

pub mod backend;
pub mod docker;
pub mod kubernetes;
pub mod registry;
pub mod report;
pub mod runtime;
pub mod shim;
pub mod suite;
pub mod trace;

use std::time::Instant;

use faultbox_spec::load::{BodyOutcome, Spec};
use report::{FailureKind, Outcome, TestResult};
use runtime::{RunConfig, TestRun};

/// `faultbox test <file> --test <name> --seed <seed>`.
pub fn replay_command(spec: &Spec, name: &str, seed: u64) -> String {
    format!(
        "faultbox test {} --test {} --seed {seed}",
        spec.path.display(),
        name.strip_prefix("test_").unwrap_or(name)
    )
}

/// Runs test `name` once: fresh services, the body, teardown, verdict.
pub fn run_test(spec: &Spec, name: &str, seed: u64, config: &RunConfig) -> TestResult {
    let started = Instant::now();
    let run = TestRun::new(
        name,
        seed,
        spec.services.clone(),
        spec.intercept.clone(),
        config.clone(),
    );
    let mut result = TestResult {
        name: name.to_string(),
        outcome: Outcome::Pass,
        reason: None,
        failure: None,
        seed,
        duration_ms: 0,
        return_value: None,
        replay: replay_command(spec, name, seed),
        faults: Vec::new(),
        assertions: 0,
        assertion: None,
        crashes: Vec::new(),
        healthcheck_timeout: false,
        events: Vec::new(),
        diagnostics: Vec::new(),
        interleaving: None,
    };
    run.observe_determinism(spec.determinism.clone());
    match run.start_services(&spec.dir) {
        Err(e @ runtime::StartError::Interrupted { .. }) => {
            result.outcome = Outcome::Interrupted;
            result.reason = Some(e.to_string());
        }
        Err(e) => {
            result.outcome = Outcome::Error;
            result.failure = Some(FailureKind::ServiceStart);
            result.healthcheck_timeout = e.healthcheck_timeout();
            result.reason = Some(e.to_string());
        }
        Ok(()) => match spec.run_body(name, run.clone(), config.test_timeout, &config.stop) {
            BodyOutcome::Returned(value) => result.return_value = value,
            BodyOutcome::Failed { message, location } => {
                result.outcome = Outcome::Fail;
                result.failure = Some(if run.assertion().is_some() {
                    FailureKind::Assertion
                } else {
                    FailureKind::Error
                });
                result.reason = Some(match location {
                    Some(at) if run.assertion().is_none() => format!("{message} (at {at})"),
                    _ => message,
                });
            }
            BodyOutcome::Interrupted => {
                result.outcome = Outcome::Interrupted;
                result.reason = Some("interrupted: the run was stopped while this test ran".into());
            }
            BodyOutcome::TimedOut => {
                result.outcome = Outcome::Error;
                result.failure = Some(FailureKind::Timeout);
                result.reason = Some(format!(
                    "test timed out after {:?} (raise it with --timeout)",
                    config.test_timeout
                ));
            }
        },
    }
    run.close_all_windows();
    run.sync_all();
    run.settle_exits();
    // Below a failure of the body, above a crash: what the services did
    // was already wrong when they did it.
    if let Some(reason) = run.determinism_violation() {
        let from_body = result
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(reason.as_str()));
        if result.outcome == Outcome::Pass || from_body {
            result.outcome = Outcome::Fail;
            result.failure = Some(FailureKind::Nondeterminism);
            result.reason = Some(reason);
        }
    }
    let busy = run.stop_services();
    // After the stop: a container's last output arrives through the
    // engine's log stream, which may trail its exit.
    let crashes = run.unexpected_crashes();
    if result.outcome == Outcome::Pass
        && let Some(c) = crashes.first()
    {
        result.outcome = Outcome::Error;
        result.failure = Some(FailureKind::ServiceCrashed);
        result.reason = Some(format!(
            "service '{}' exited with code {} during the test",
            c.service,
            c.exit.shell_code()
        ));
    }
    if result.outcome == Outcome::Pass && !busy.is_empty() {
        result.outcome = Outcome::Error;
        result.reason = Some(format!(
            "ports still taken after the services stopped: {} (a child process may have escaped)",
            busy.join(", ")
        ));
    }
    result.crashes = crashes;
    result.faults = run.faults();
    result.assertions = run.assertions.load(std::sync::atomic::Ordering::SeqCst);
    result.assertion = run.assertion();
    result.events = run.take_events();
    result.duration_ms = started.elapsed().as_millis() as u64;
    result.diagnose();
    result
}
