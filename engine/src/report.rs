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
    /// Strict `determinism()`: a service did I/O Faultbox does not mediate.
    Nondeterminism,
}

impl FailureKind {
    fn as_str(self) -> &'static str {
        match self {
            FailureKind::Assertion => "assertion",
            FailureKind::Error => "error",
            FailureKind::Timeout => "timeout",
            FailureKind::ServiceStart => "service_start",
            FailureKind::ServiceCrashed => "service_crashed",
            FailureKind::Nondeterminism => "strict_determinism_violation",
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
    /// `--explore`: which interleaving this run played, of how many.
    pub interleaving: Option<(u64, u64)>,
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
        if let Some((index, of)) = self.interleaving {
            o.insert("interleaving".into(), json!({"index": index, "of": of}));
        }
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
        let interleaving = self
            .interleaving
            .map(|(k, n)| format!(", interleaving {k} of {n}"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "--- {word}: {} ({}ms, seed={}{interleaving}) ---",
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

// ---- Trace views: the normalized trace (`--normalize`, `faultbox diff`)
// and the ShiViz log (`--shiviz`).

/// The parts of a path that belong to one run rather than to the test:
/// the run's own directories (replaced by a placeholder such as `$LOGS`),
/// pids under `/proc`, and the inode numbers of sockets and pipes.
#[derive(Debug, Clone, Default)]
pub struct Scrub {
    /// A directory of this run and what stands for it.
    pub dirs: Vec<(String, &'static str)>,
    /// The test's proxy ports (random each run) and the proxy each is,
    /// `svc.iface.proxy`: a connect to one is written with that name.
    pub ports: BTreeMap<u16, String>,
}

impl Scrub {
    fn path(&self, raw: &str) -> String {
        if let Some((host, port)) = raw.rsplit_once(':')
            && !raw.contains('/')
            && let Some(name) = port.parse::<u16>().ok().and_then(|p| self.ports.get(&p))
        {
            return format!("{host}:{name}");
        }
        for kind in ["socket", "pipe", "anon_inode"] {
            if raw.starts_with(&format!("{kind}:")) {
                return kind.to_string();
            }
        }
        let mut p = raw.to_string();
        for (dir, name) in &self.dirs {
            if !dir.is_empty() && (p == *dir || p.starts_with(&format!("{dir}/"))) {
                p = format!("{name}{}", &p[dir.len()..]);
            }
        }
        if let Some(rest) = p.strip_prefix("/proc/") {
            let (first, tail) = rest.split_once('/').unwrap_or((rest, ""));
            if !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()) {
                p = if tail.is_empty() {
                    "/proc/PID".to_string()
                } else {
                    format!("/proc/PID/{tail}")
                };
            }
        }
        p
    }
}

/// The line an event contributes to the normalized trace, if any: the
/// syscalls a program chose to make (with their decisions and scrubbed
/// paths), the lifecycle, fault windows and steps. Everything that varies
/// from run to run for reasons outside the test (pids, times, ports, the
/// loader's system-path reads, proxy chatter) is left out.
fn normal_line(e: &Event, scrub: &Scrub) -> Option<String> {
    let f = |k: &str| e.fields.get(k).map(String::as_str).unwrap_or_default();
    match e.kind.as_str() {
        "syscall" => {
            let decision = f("decision");
            let path = f("path");
            // A parked call's `hold(...)` event races its neighbours'
            // releases; its `(released)` event, in release order, is the
            // line that tells what happened to it.
            if decision.starts_with("allow (system path)")
                || decision.starts_with("hold(")
                || (decision == "allow" && path.is_empty())
            {
                return None;
            }
            let mut line = format!("{} {decision}", f("syscall"));
            if !path.is_empty() {
                line.push(' ');
                line.push_str(&scrub.path(path));
            }
            Some(line)
        }
        "service_started" | "service_ready" | "fault_applied" | "fault_removed"
        | "trace_applied" | "trace_removed" => Some(e.kind.clone()),
        // Only a crash: every service is stopped at the end of a test.
        "service_exited" if f("expected") != "true" => {
            Some(format!("service_exited {}", f("exit_code")))
        }
        "step_send" | "step_recv" => Some(format!("{} {}", e.kind, f("target"))),
        "unmediated_io" => Some(format!("unmediated_io {}", f("category"))),
        "explore_round" => Some(format!("explore_round {} {}", f("round"), f("order"))),
        "partition_applied" | "partition_removed" => Some(format!("{} {}", e.kind, f("between"))),
        _ => None,
    }
}

/// `=== test ===` headers in run order (a test run again is `(run K)`),
/// then `--- service ---` sections in name order (events without a
/// service under `test`), each with its lines in sequence order. Two runs
/// of a deterministic test give the same text.
pub fn normalized(results: &[TestResult], scrub: &Scrub) -> String {
    let mut out = String::new();
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    for r in results {
        let n = seen.entry(&r.name).or_insert(0);
        *n += 1;
        if *n == 1 {
            let _ = writeln!(out, "=== {} ===", r.name);
        } else {
            let _ = writeln!(out, "=== {} (run {n}) ===", r.name);
        }
        let mut scrub = scrub.clone();
        for e in r.events.iter().filter(|e| e.kind == "proxy_started") {
            let port = e
                .fields
                .get("listen")
                .and_then(|l| l.rsplit_once(':'))
                .and_then(|(_, p)| p.parse::<u16>().ok());
            if let (Some(port), Some(iface)) = (port, e.fields.get("interface")) {
                scrub
                    .ports
                    .insert(port, format!("{}.{iface}.proxy", e.service));
            }
        }
        let mut by_service: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for e in &r.events {
            if let Some(line) = normal_line(e, &scrub) {
                let service = if e.service.is_empty() {
                    "test"
                } else {
                    e.service.as_str()
                };
                by_service.entry(service).or_default().push(line);
            }
        }
        for (service, mut lines) in by_service {
            let _ = writeln!(out, "--- {service} ---");
            // Steps of parallel() branches start and end in a race: a run
            // of adjacent sends (or answers) is written in name order.
            // Sequential steps never have two sends in a row.
            let mut i = 0;
            while i < lines.len() {
                let kind = lines[i].split(' ').next().unwrap_or("").to_string();
                let mut j = i + 1;
                if kind == "step_send" || kind == "step_recv" {
                    while j < lines.len() && lines[j].split(' ').next() == Some(kind.as_str()) {
                        j += 1;
                    }
                    lines[i..j].sort();
                }
                i = j;
            }
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
        }
    }
    out
}

/// The first line of a ShiViz log: how ShiViz splits the lines after it.
pub const SHIVIZ_REGEX: &str = r"(?<host>\S+) (?<clock>\{.*?\}) (?<event>.*)";

/// A ShiViz log of every test: the parser regex, an empty line, then one
/// `host {clock} description` line per event with a service. Tests follow
/// each other in one execution: each test's clocks are offset by every
/// host's last value in the tests before, so a host's clock only grows. A
/// failed test adds a `VIOLATION` event on host `test` that follows
/// everything in it.
pub fn shiviz(results: &[TestResult]) -> String {
    let mut out = format!("{SHIVIZ_REGEX}\n\n");
    let mut offset: BTreeMap<String, u64> = BTreeMap::new();
    // Each host's last clock: a host's next event must dominate it, also
    // across tests, where its own clock in the new test knows nothing yet.
    let mut host_last: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for r in results {
        let mut last = offset.clone();
        for e in r.events.iter().filter(|e| !e.service.is_empty()) {
            let mut owned: BTreeMap<String, u64> = host_last.remove(&e.service).unwrap_or_default();
            for (k, v) in &e.vector_clock {
                let v = v + offset.get(k).copied().unwrap_or(0);
                let slot = owned.entry(k.clone()).or_insert(0);
                *slot = (*slot).max(v);
            }
            let clock: BTreeMap<&str, u64> = owned.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            for (k, v) in &clock {
                let slot = last.entry(k.to_string()).or_insert(0);
                *slot = (*slot).max(*v);
            }
            let _ = writeln!(out, "{} {} {}", e.service, clock_json(&clock), describe(e));
            host_last.insert(e.service.clone(), owned);
        }
        if r.outcome != Outcome::Pass {
            let tick = last.get("test").copied().unwrap_or(0) + 1;
            last.insert("test".into(), tick);
            host_last.insert("test".into(), last.clone());
            let clock: BTreeMap<&str, u64> = last.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            let reason = r.reason.as_deref().unwrap_or(r.outcome.as_str());
            let _ = writeln!(
                out,
                "test {} VIOLATION [{}] {}",
                clock_json(&clock),
                r.name,
                reason.replace('\n', " ")
            );
        }
        offset = last;
    }
    out
}

/// `{"a": 1, "b": 2}`: sorted keys, as ShiViz's examples write clocks.
fn clock_json(clock: &BTreeMap<&str, u64>) -> String {
    let parts: Vec<String> = clock
        .iter()
        .map(|(k, v)| format!("{}: {v}", Json::from(*k)))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// `syscall.fsync deny(input/output error) [label] /data/wal (+500ms)`,
/// `step_send get→api`, or the event's type.
fn describe(e: &Event) -> String {
    let f = |k: &str| e.fields.get(k).map(String::as_str).unwrap_or_default();
    match e.kind.as_str() {
        "syscall" => {
            let mut s = format!("syscall.{} {}", f("syscall"), f("decision"));
            if !f("label").is_empty() {
                let _ = write!(s, " [{}]", f("label"));
            }
            if !f("path").is_empty() {
                let _ = write!(s, " {}", f("path"));
            }
            if let Ok(ms) = f("latency_ms").parse::<u64>()
                && ms > 0
            {
                let _ = write!(s, " (+{ms}ms)");
            }
            s
        }
        "step_send" | "step_recv" => format!("{} {}→{}", e.kind, f("method"), f("target")),
        _ => e.kind.clone(),
    }
}

/// Why two files cannot be compared as normalized traces.
#[derive(Debug, thiserror::Error)]
#[error(
    "{name} is not a normalized trace (its first line is not `=== <test> ===`; `faultbox test --normalize FILE` writes one)"
)]
pub struct NotNormalized {
    /// The file, as given.
    pub name: String,
}

/// Compares two normalized traces line by line (a minimal edit script, so
/// one extra line shows as one): `None` when they are identical, else a
/// report of every difference with the test and service it is in and the
/// line before it.
pub fn diff_normalized(a: (&str, &str), b: (&str, &str)) -> Result<Option<String>, NotNormalized> {
    for (name, text) in [a, b] {
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let header = first.starts_with("=== ") && first.ends_with(" ===");
        // Empty too: a run that stopped before its first test leaves the
        // file it opened empty, and two of those are not "identical".
        if !header {
            return Err(NotNormalized {
                name: name.to_string(),
            });
        }
    }
    if a.1 == b.1 {
        return Ok(None);
    }
    let old: Vec<&str> = a.1.lines().collect();
    let new: Vec<&str> = b.1.lines().collect();
    // Where each line of `a` is: its test and service headers.
    let mut place = Vec::with_capacity(old.len());
    let (mut test, mut service) = ("", "");
    for l in &old {
        if let Some(t) = l.strip_prefix("=== ").and_then(|t| t.strip_suffix(" ===")) {
            (test, service) = (t, "");
        } else if let Some(s) = l.strip_prefix("--- ").and_then(|s| s.strip_suffix(" ---")) {
            service = s;
        }
        place.push((test, service));
    }
    let diff = similar::TextDiff::configure()
        .algorithm(similar::Algorithm::Myers)
        .diff_slices(&old, &new);
    let mut out = format!("traces differ ({} vs {} lines):\n", old.len(), new.len());
    for group in diff.grouped_ops(1) {
        let Some(first) = group
            .iter()
            .find(|op| op.tag() != similar::DiffTag::Equal)
            .or(group.first())
        else {
            continue;
        };
        let at = first.old_range().start;
        let (t, s) = place
            .get(at.min(place.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {t}{}{}, line {}:",
            if s.is_empty() { "" } else { " / " },
            s,
            at + 1
        );
        for op in &group {
            for change in diff.iter_changes(op) {
                let sign = match change.tag() {
                    similar::ChangeTag::Equal => "   ",
                    similar::ChangeTag::Delete => "  -",
                    similar::ChangeTag::Insert => "  +",
                };
                let _ = writeln!(out, "  {sign} {}", change.value());
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(
        seq: u64,
        kind: &str,
        service: &str,
        f: &[(&str, &str)],
        clock: &[(&str, u64)],
    ) -> Event {
        Event {
            seq,
            time_ns: seq * 1000,
            kind: kind.into(),
            service: service.into(),
            fields: f
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            vector_clock: clock.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    fn result(name: &str, outcome: Outcome, events: Vec<Event>) -> TestResult {
        TestResult {
            interleaving: None,
            name: name.into(),
            outcome,
            reason: (outcome != Outcome::Pass).then(|| "assert_eq failed: 1 != 2".into()),
            failure: None,
            seed: 7,
            duration_ms: 12,
            return_value: None,
            replay: String::new(),
            faults: vec![],
            assertions: 1,
            assertion: None,
            crashes: vec![],
            healthcheck_timeout: false,
            events,
            diagnostics: vec![],
        }
    }

    /// One test's events as a run with the given pid, inode and log dir
    /// would report them.
    fn run_of(pid: &str, inode: &str, logs: &str) -> Vec<Event> {
        vec![
            event(1, "service_started", "db", &[("pid", pid)], &[("db", 1)]),
            event(
                2,
                "syscall",
                "db",
                &[
                    ("syscall", "openat"),
                    ("decision", "allow (system path)"),
                    ("path", "/lib/x86_64-linux-gnu/libc.so.6"),
                ],
                &[("db", 2)],
            ),
            event(
                3,
                "syscall",
                "db",
                &[
                    ("syscall", "write"),
                    ("decision", "allow"),
                    ("path", &format!("{logs}/test_a.db.log")),
                ],
                &[("db", 3)],
            ),
            event(4, "service_ready", "db", &[], &[("db", 4)]),
            event(
                5,
                "step_send",
                "test",
                &[("target", "db"), ("method", "get")],
                &[("test", 1)],
            ),
            event(
                6,
                "syscall",
                "db",
                &[
                    ("syscall", "read"),
                    ("decision", "allow"),
                    ("path", &format!("socket:[{inode}]")),
                ],
                &[("db", 5), ("test", 1)],
            ),
            event(
                7,
                "syscall",
                "db",
                &[
                    ("syscall", "fsync"),
                    ("decision", "deny(input/output error)"),
                    ("path", "/data/wal"),
                    ("label", "wal"),
                    ("pid", pid),
                ],
                &[("db", 6), ("test", 1)],
            ),
            event(
                8,
                "syscall",
                "db",
                &[("syscall", "getpid"), ("decision", "allow")],
                &[("db", 7), ("test", 1)],
            ),
            event(
                9,
                "syscall",
                "db",
                &[
                    ("syscall", "openat"),
                    ("decision", "allow"),
                    ("path", &format!("/proc/{pid}/status")),
                ],
                &[("db", 8), ("test", 1)],
            ),
            event(
                10,
                "proxy_started",
                "db",
                &[("listen", "127.0.0.1:41234")],
                &[("db", 9), ("test", 1)],
            ),
            event(
                11,
                "step_recv",
                "test",
                &[("target", "db"), ("method", "get")],
                &[("db", 9), ("test", 2)],
            ),
        ]
    }

    #[test]
    fn normalized_traces_drop_what_differs_between_runs() {
        let one = [result(
            "test_a",
            Outcome::Pass,
            run_of("4242", "991", "/tmp/faultbox-4242"),
        )];
        let two = [result(
            "test_a",
            Outcome::Pass,
            run_of("777", "12", "/tmp/faultbox-777"),
        )];
        let scrub = |d: &str| Scrub {
            dirs: vec![(d.to_string(), "$LOGS")],
            ..Scrub::default()
        };
        let a = normalized(&one, &scrub("/tmp/faultbox-4242"));
        let b = normalized(&two, &scrub("/tmp/faultbox-777"));
        assert_eq!(a, b);
        assert_eq!(
            a,
            "=== test_a ===\n--- db ---\nservice_started\nwrite allow $LOGS/test_a.db.log\nservice_ready\nread allow socket\nfsync deny(input/output error) /data/wal\nopenat allow /proc/PID/status\n--- test ---\nstep_send db\nstep_recv db\n"
        );
        assert_eq!(
            diff_normalized(("a", &a), ("b", &b)).expect("both traces"),
            None
        );
        // A second run of a test is told apart.
        let twice = normalized(&[one[0].clone(), one[0].clone()], &Scrub::default());
        assert!(twice.contains("=== test_a (run 2) ==="), "{twice}");
    }

    #[test]
    fn connects_to_a_proxy_are_named_by_the_proxy_not_its_random_port() {
        let trace = |port: &str| {
            vec![
                event(
                    1,
                    "proxy_started",
                    "db",
                    &[
                        ("interface", "main"),
                        ("listen", &format!("127.0.0.1:{port}")),
                    ],
                    &[("db", 1)],
                ),
                event(
                    2,
                    "syscall",
                    "api",
                    &[
                        ("syscall", "connect"),
                        ("decision", "deny(connection refused)"),
                        ("path", &format!("127.0.0.1:{port}")),
                    ],
                    &[("api", 1)],
                ),
                event(
                    3,
                    "syscall",
                    "api",
                    &[
                        ("syscall", "connect"),
                        ("decision", "allow"),
                        ("path", "127.0.0.1:5432"),
                    ],
                    &[("api", 2)],
                ),
                event(
                    4,
                    "partition_applied",
                    "test",
                    &[("between", "api,db")],
                    &[],
                ),
            ]
        };
        let a = normalized(
            &[result("test_a", Outcome::Pass, trace("40001"))],
            &Scrub::default(),
        );
        let b = normalized(
            &[result("test_a", Outcome::Pass, trace("51234"))],
            &Scrub::default(),
        );
        assert_eq!(a, b);
        assert_eq!(
            a,
            "=== test_a ===\n--- api ---\nconnect deny(connection refused) 127.0.0.1:db.main.proxy\nconnect allow 127.0.0.1:5432\n--- test ---\npartition_applied api,db\n"
        );
    }

    #[test]
    fn a_diff_names_the_test_the_service_and_the_line() {
        let a = "=== test_a ===\n--- db ---\nservice_started\nwrite allow /data/wal\nfsync allow /data/wal\n--- test ---\nstep_send db\n";
        let b = "=== test_a ===\n--- db ---\nservice_started\nwrite allow /data/wal\nfsync deny(input/output error) /data/wal\n--- test ---\nstep_send db\n";
        let report = diff_normalized(("a", a), ("b", b))
            .expect("traces")
            .expect("a difference");
        assert!(
            report.starts_with("traces differ (7 vs 7 lines):\n"),
            "{report}"
        );
        assert!(report.contains("  test_a / db, line 5:\n"), "{report}");
        assert!(report.contains("      write allow /data/wal\n"), "{report}");
        assert!(report.contains("    - fsync allow /data/wal\n"), "{report}");
        assert!(
            report.contains("    + fsync deny(input/output error) /data/wal\n"),
            "{report}"
        );
        // One extra line is one difference, not the rest of the file.
        let c = a.replace(
            "write allow /data/wal\n",
            "write allow /data/wal\nwrite allow /data/wal\n",
        );
        let report = diff_normalized(("a", a), ("c", &c))
            .expect("traces")
            .expect("differ");
        assert_eq!(report.matches("  + ").count(), 1, "{report}");
        assert_eq!(report.matches("  - ").count(), 0, "{report}");
        let e = diff_normalized(("a", a), ("notes.txt", "hello\n")).expect_err("not a trace");
        assert!(
            e.to_string()
                .contains("notes.txt is not a normalized trace"),
            "{e}"
        );
    }

    /// Each line as ShiViz's regex splits it: host, clock, description.
    fn parse_shiviz(text: &str) -> Vec<(String, BTreeMap<String, u64>, String)> {
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(SHIVIZ_REGEX));
        assert_eq!(lines.next(), Some(""));
        lines
            .map(|l| {
                let (host, rest) = l.split_once(' ').expect("host");
                assert!(!host.is_empty() && !host.contains(char::is_whitespace));
                let end = rest.find('}').expect("clock") + 1;
                let clock: BTreeMap<String, u64> =
                    serde_json::from_str(&rest[..end]).expect("clock json");
                let event = rest[end..].strip_prefix(' ').expect("event").to_string();
                (host.to_string(), clock, event)
            })
            .collect()
    }

    #[test]
    fn shiviz_clocks_grow_per_host_across_tests() {
        let results = [
            result("test_a", Outcome::Pass, run_of("1", "1", "/l")),
            result("test_b", Outcome::Fail, run_of("2", "2", "/l")),
        ];
        let text = shiviz(&results);
        let lines = parse_shiviz(&text);
        let mut last: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (host, clock, _) in &lines {
            assert!(clock.contains_key(host), "{host} {clock:?}");
            if let Some(prev) = last.get(host) {
                assert_eq!(
                    clock[host],
                    prev[host] + 1,
                    "{host}: {prev:?} then {clock:?}"
                );
                for (k, v) in prev {
                    assert!(
                        clock.get(k).copied().unwrap_or(0) >= *v,
                        "{host}: {prev:?} then {clock:?}"
                    );
                }
            }
            last.insert(host.clone(), clock.clone());
        }
        assert!(
            lines.iter().any(|(h, _, e)| h == "db"
                && e == "syscall.fsync deny(input/output error) [wal] /data/wal"),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|(h, _, e)| h == "test" && e == "step_send get→db"),
            "{text}"
        );
        let (host, clock, event) = lines.last().expect("a violation");
        assert_eq!(host, "test");
        assert_eq!(event, "VIOLATION [test_b] assert_eq failed: 1 != 2");
        assert_eq!(clock["db"], 18, "it follows everything: {clock:?}");
    }
}
