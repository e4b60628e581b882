//! Test verdicts and how they are shown: the result model, diagnostics,
//! the JSON document (`--format json`, `--output`) and the human summary.
//! The JSON schema is documented in docs/json-output.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value as Json, json};

use faultbox_spec::host::AssertionDetail;

use crate::runtime::{Crash, FaultRecord};
use crate::trace::Event;

/// Version of the JSON document; bumped on incompatible changes.
pub const JSON_VERSION: u32 = 1;

/// A test's verdict.
/// Whether a decision changed the call (not `allow...` or `trace`).
fn changed(decision: &str) -> bool {
    !(decision.starts_with("allow") || decision == "trace")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Error,
    /// The run was interrupted (SIGINT, SIGTERM) while this test ran.
    Interrupted,
}

impl Outcome {
    /// `pass`, `fail`, `error`, `interrupted`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Error => "error",
            Outcome::Interrupted => "interrupted",
        }
    }
}

/// Why a test did not pass, for `failure_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// An `assert_*` failed.
    Assertion,
    /// The body raised something else (`fail()`, a type error, a step).
    Error,
    /// The body ran past the test timeout.
    Timeout,
    /// A service did not start or never became healthy.
    ServiceStart,
    /// A service exited during the test.
    ServiceCrashed,
}

impl FailureKind {
    fn as_str(self) -> &'static str {
        match self {
            FailureKind::Assertion => "assertion",
            FailureKind::Error => "error",
            FailureKind::Timeout => "timeout",
            FailureKind::ServiceStart => "service_start",
            FailureKind::ServiceCrashed => "service_crashed",
        }
    }
}

/// An actionable hint attached to a test.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub level: &'static str,
    pub code: &'static str,
    pub message: String,
    pub suggestion: String,
    pub service: Option<String>,
    pub syscall: Option<String>,
}

/// Everything known about one finished test.
#[derive(Debug, Clone)]
pub struct TestResult {
    pub name: String,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub failure: Option<FailureKind>,
    pub seed: u64,
    pub duration_ms: u64,
    pub return_value: Option<String>,
    pub replay: String,
    pub faults: Vec<FaultRecord>,
    pub assertions: u64,
    pub assertion: Option<AssertionDetail>,
    pub crashes: Vec<Crash>,
    pub healthcheck_timeout: bool,
    pub events: Vec<Event>,
    pub diagnostics: Vec<Diagnostic>,
}

impl TestResult {
    /// Fills `diagnostics` from the rest of the result.
    pub fn diagnose(&mut self) {
        let mut d = Vec::new();
        let passed = self.outcome == Outcome::Pass;
        for f in self.faults.iter().filter(|f| !f.trace) {
            if f.hits == 0 {
                d.push(Diagnostic {
                    level: "warning",
                    code: "FAULT_NOT_FIRED",
                    message: format!(
                        "{} fault on '{}' was installed but never fired{}",
                        f.syscall,
                        f.service,
                        if f.matched == 0 { " (no matching syscall happened while it was active)" } else { "" }
                    ),
                    suggestion: "The service may use another syscall variant (pwrite64 instead of write, say), another path, or no such call during the fault window; run with --debug to see every intercepted syscall.".into(),
                    service: Some(f.service.clone()),
                    syscall: Some(f.syscall.clone()),
                });
            } else if passed && f.action == "deny" && self.assertions == 0 {
                d.push(Diagnostic {
                    level: "warning",
                    code: "FAULT_FIRED_BUT_SUCCESS",
                    message: format!(
                        "{} fault fired {} time(s) on '{}' but the test passed without asserting anything",
                        f.syscall, f.hits, f.service
                    ),
                    suggestion: "Assert on how the system reacted (a status code, an error, an event); otherwise the fault proves nothing.".into(),
                    service: Some(f.service.clone()),
                    syscall: Some(f.syscall.clone()),
                });
            }
        }
        for c in &self.crashes {
            d.push(Diagnostic {
                level: "error",
                code: "SERVICE_CRASHED",
                message: format!(
                    "service '{}' exited with code {} during the test",
                    c.service,
                    c.exit.shell_code()
                ),
                suggestion: if c.log_tail.is_empty() {
                    "Look at the service's output; if the exit is the expected reaction to a fault, assert it with assert_eventually(type=\"service_exited\", service=...).".into()
                } else {
                    format!(
                        "Its last output:\n{}\nIf the exit is the expected reaction to a fault, assert it with assert_eventually(type=\"service_exited\", service=...).",
                        c.log_tail
                    )
                },
                service: Some(c.service.clone()),
                syscall: None,
            });
        }
        if self.healthcheck_timeout {
            d.push(Diagnostic {
                level: "error",
                code: "HEALTHCHECK_TIMEOUT",
                message: self.reason.clone().unwrap_or_default(),
                suggestion: "Check that the service listens on the declared port and address, or raise the healthcheck's timeout=.".into(),
                service: None,
                syscall: None,
            });
        }
        if self.failure == Some(FailureKind::Timeout) {
            let fired = self.faults.iter().any(|f| f.hits > 0 && !f.trace);
            let any = self.faults.iter().any(|f| !f.trace);
            let (code, suggestion) = match (any, fired) {
                (_, true) => (
                    "TIMEOUT_DURING_FAULT",
                    "A fault fired and the test hung: the service may retry forever or wait without a deadline.",
                ),
                (true, false) => (
                    "TIMEOUT_NO_FAULT_FIRED",
                    "The test hung although no fault fired: look at the step that was running.",
                ),
                _ => (
                    "TIMEOUT_NO_FAULTS",
                    "The test hung without faults: a step or an assert_eventually(timeout=) waited too long.",
                ),
            };
            d.push(Diagnostic {
                level: "error",
                code,
                message: self.reason.clone().unwrap_or_default(),
                suggestion: suggestion.into(),
                service: None,
                syscall: None,
            });
        }
        if self.failure == Some(FailureKind::Assertion) {
            d.push(Diagnostic {
                level: "error",
                code: "ASSERTION_MISMATCH",
                message: self.reason.clone().unwrap_or_default(),
                suggestion: "Check the service's error handling: its response does not match what the test expects under the injected fault.".into(),
                service: None,
                syscall: None,
            });
        }
        if passed && self.assertions == 0 {
            d.push(Diagnostic {
                level: "warning",
                code: "TEST_NO_ASSERTIONS",
                message: "passed without evaluating any assertion".into(),
                suggestion: "Add assert_eq/assert_true/assert_eventually so the test can fail."
                    .into(),
                service: None,
                syscall: None,
            });
        }
        self.diagnostics = d;
    }

    fn syscall_summary(&self) -> BTreeMap<String, (u64, u64, BTreeMap<String, u64>)> {
        let mut out: BTreeMap<String, (u64, u64, BTreeMap<String, u64>)> = BTreeMap::new();
        for e in self.events.iter().filter(|e| e.kind == "syscall") {
            let entry = out.entry(e.service.clone()).or_default();
            entry.0 += 1;
            if e.fields.get("decision").is_some_and(|d| changed(d)) {
                entry.1 += 1;
            }
            if let Some(s) = e.fields.get("syscall") {
                *entry.2.entry(s.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    /// This test as a JSON object.
    pub fn to_json(&self) -> Json {
        serde_json::to_value(self).unwrap_or(Json::Null)
    }

    /// Every field of the test's JSON but its events.
    fn summary_json(&self) -> serde_json::Map<String, Json> {
        let mut o = serde_json::Map::new();
        o.insert("name".into(), json!(self.name));
        o.insert("result".into(), json!(self.outcome.as_str()));
        if let Some(r) = &self.reason {
            o.insert("reason".into(), json!(r));
        }
        if let Some(f) = self.failure {
            o.insert("failure_type".into(), json!(f.as_str()));
        }
        o.insert("seed".into(), json!(self.seed));
        o.insert("duration_ms".into(), json!(self.duration_ms));
        if let Some(r) = &self.return_value {
            o.insert("return_value".into(), json!(r));
        }
        o.insert("replay_command".into(), json!(self.replay));
        if self.outcome != Outcome::Pass
            && let Some(r) = &self.reason
        {
            o.insert(
                "error_detail".into(),
                json!({"assertion_type": self.failure.map(FailureKind::as_str).unwrap_or("error"), "message": r}),
            );
        }
        let faults: Vec<Json> = self
            .faults
            .iter()
            .map(|f| {
                let mut x = serde_json::Map::new();
                x.insert("service".into(), json!(f.service));
                if let Some(i) = &f.interface {
                    x.insert("interface".into(), json!(i));
                }
                x.insert("syscall".into(), json!(f.syscall));
                x.insert("action".into(), json!(f.action));
                if let Some(e) = &f.errno {
                    x.insert("errno".into(), json!(e));
                }
                x.insert("hits".into(), json!(f.hits));
                x.insert("windows".into(), json!(f.windows));
                if let Some(l) = &f.label {
                    x.insert("label".into(), json!(l));
                }
                Json::Object(x)
            })
            .collect();
        if !faults.is_empty() {
            o.insert("faults".into(), Json::Array(faults));
        }
        let summary = self.syscall_summary();
        if !summary.is_empty() {
            let s: serde_json::Map<String, Json> = summary
                .into_iter()
                .map(|(svc, (total, faulted, breakdown))| {
                    (
                        svc,
                        json!({"total": total, "faulted": faulted, "breakdown": breakdown}),
                    )
                })
                .collect();
            o.insert("syscall_summary".into(), Json::Object(s));
        }
        if !self.diagnostics.is_empty() {
            let d: Vec<Json> = self
                .diagnostics
                .iter()
                .map(|d| {
                    let mut x = serde_json::Map::new();
                    x.insert("level".into(), json!(d.level));
                    x.insert("code".into(), json!(d.code));
                    x.insert("message".into(), json!(d.message));
                    x.insert("suggestion".into(), json!(d.suggestion));
                    if let Some(s) = &d.service {
                        x.insert("service".into(), json!(s));
                    }
                    if let Some(s) = &d.syscall {
                        x.insert("syscall".into(), json!(s));
                    }
                    Json::Object(x)
                })
                .collect();
            o.insert("diagnostics".into(), Json::Array(d));
        }
        o.insert("assertions".into(), json!(self.assertions));
        if let Some(a) = &self.assertion {
            let mut x = serde_json::Map::new();
            x.insert("func".into(), json!(a.func));
            for (k, v) in [
                ("expected", &a.expected),
                ("actual", &a.actual),
                ("message", &a.message),
                ("file", &a.file),
            ] {
                if let Some(v) = v {
                    x.insert(k.into(), json!(v));
                }
            }
            if let Some(l) = a.line {
                x.insert("line".into(), json!(l));
            }
            o.insert("assertion".into(), Json::Object(x));
        }
        o
    }

    /// The human summary block for this test.
    pub fn human(&self, debug: bool) -> String {
        let mut s = String::new();
        let word = match self.outcome {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Error => "ERROR",
            Outcome::Interrupted => "INTERRUPTED",
        };
        let _ = writeln!(
            s,
            "--- {word}: {} ({}ms, seed={}) ---",
            self.name, self.duration_ms, self.seed
        );
        if debug && let Some(r) = &self.return_value {
            let _ = writeln!(s, "  return: {r}");
        }
        if let Some(r) = &self.reason {
            let mut lines = r.lines();
            let _ = writeln!(s, "  reason: {}", lines.next().unwrap_or(""));
            for l in lines {
                let _ = writeln!(s, "          {l}");
            }
        }
        if self.outcome != Outcome::Pass {
            let _ = writeln!(s, "  replay: {}", self.replay);
        }
        let shown: Vec<&Event> = self
            .events
            .iter()
            .filter(|e| e.kind == "syscall")
            .filter(|e| {
                debug
                    || e.fields
                        .get("decision")
                        .is_some_and(|d| changed(d) || d == "trace")
            })
            .collect();
        let total = self.events.iter().filter(|e| e.kind == "syscall").count();
        if !shown.is_empty() {
            let _ = writeln!(
                s,
                "  syscall trace ({total} events, {} shown):",
                shown.len()
            );
            for e in shown.iter().take(40) {
                let f = |k: &str| e.fields.get(k).cloned().unwrap_or_default();
                let name = match e.fields.get("op") {
                    Some(op) => format!("{op}({})", f("syscall")),
                    None => f("syscall"),
                };
                let mut line = format!(
                    "    #{:<4} {:<12} {:<16} {}",
                    e.seq,
                    e.service,
                    name,
                    f("decision")
                );
                if let Some(l) = e.fields.get("label") {
                    line.push_str(&format!("  [{l}]"));
                }
                if let Some(p) = e.fields.get("path") {
                    line.push_str(&format!("  {p}"));
                }
                if let Some(ms) = e.fields.get("latency_ms") {
                    line.push_str(&format!("  (+{ms}ms)"));
                }
                let _ = writeln!(s, "{line}");
            }
            if shown.len() > 40 {
                let _ = writeln!(s, "    ... {} more", shown.len() - 40);
            }
        }
        for f in &self.faults {
            let kind = if f.trace { "trace" } else { "fault" };
            let rule = if f.trace { "trace" } else { f.rule.as_str() };
            let _ = match &f.interface {
                Some(i) => writeln!(
                    s,
                    "  protocol rule on {}.{i}: {rule} ({} hits)",
                    f.service, f.hits
                ),
                None => writeln!(
                    s,
                    "  {kind} rule on {}: {}={rule} ({} hits)",
                    f.service, f.syscall, f.hits
                ),
            };
        }
        if !self.faults.is_empty()
            && self.faults.iter().filter(|f| !f.trace).all(|f| f.hits == 0)
            && self.faults.iter().any(|f| !f.trace)
        {
            let _ = writeln!(
                s,
                "  WARNING: fault rules were installed but no injections fired"
            );
            let _ = writeln!(
                s,
                "    hint: the target may use a different syscall variant (pwrite64 instead of write, say)"
            );
            let _ = writeln!(
                s,
                "    hint: run with --debug to see all intercepted syscalls"
            );
        }
        if self.outcome != Outcome::Pass {
            let summary = self.syscall_summary();
            if !summary.is_empty() {
                let _ = writeln!(s, "  per-service syscall summary:");
                for (svc, (total, faulted, breakdown)) in summary {
                    let b: Vec<String> =
                        breakdown.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    let _ = writeln!(
                        s,
                        "    {svc:<12} {total} total, {faulted} faulted  [{}]",
                        b.join(" ")
                    );
                }
            }
        }
        for d in self.diagnostics.iter().filter(|d| d.level != "info") {
            let _ = writeln!(
                s,
                "  {}: [{}] {}",
                d.level.to_uppercase(),
                d.code,
                d.message
            );
            for l in d.suggestion.lines() {
                let _ = writeln!(s, "    {l}");
            }
        }
        s
    }
}

/// The whole run as the JSON document.
pub fn run_json<'a>(
    star_file: &'a str,
    duration_ms: u64,
    results: &'a [TestResult],
) -> RunReport<'a> {
    RunReport {
        star_file,
        duration_ms,
        results,
    }
}

/// The document of one `faultbox test` run; it serializes straight to
/// its output, so a long trace costs its text and no value tree.
pub struct RunReport<'a> {
    star_file: &'a str,
    duration_ms: u64,
    results: &'a [TestResult],
}

impl serde::Serialize for RunReport<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let count = |o: Outcome| self.results.iter().filter(|r| r.outcome == o).count();
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("version", &JSON_VERSION)?;
        m.serialize_entry("star_file", self.star_file)?;
        m.serialize_entry("duration_ms", &self.duration_ms)?;
        m.serialize_entry("pass", &count(Outcome::Pass))?;
        m.serialize_entry("fail", &count(Outcome::Fail))?;
        m.serialize_entry("error", &count(Outcome::Error))?;
        m.serialize_entry("interrupted", &count(Outcome::Interrupted))?;
        m.serialize_entry("tests", self.results)?;
        m.end()
    }
}

impl serde::Serialize for TestResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.summary_json() {
            m.serialize_entry(&k, &v)?;
        }
        m.serialize_entry("events", &self.events)?;
        m.end()
    }
}

/// The zero-traffic block: faults that saw no matching syscall at all.
pub fn zero_traffic(results: &[TestResult]) -> String {
    let rows: Vec<String> = results
        .iter()
        .flat_map(|r| {
            r.faults
                .iter()
                .filter(|f| !f.trace && f.matched == 0)
                .map(move |f| {
                    let label = f
                        .label
                        .as_deref()
                        .map(|l| format!(", label={l}"))
                        .unwrap_or_default();
                    format!(
                        "  {} — {}.{} ({}{label})",
                        r.name, f.service, f.syscall, f.action
                    )
                })
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "Zero-traffic faults ({}): rule installed, matched no syscalls\n{}\n  Hint: the scenario may not be exercising that path during the fault window.\n",
        rows.len(),
        rows.join("\n")
    )
}
