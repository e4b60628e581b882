//! The event log of one test: every syscall the shims report, service
//! lifecycle, fault windows and steps, with a global sequence number and a
//! vector clock per service.
//!
//! Clocks follow the usual rules: an event on a service ticks that
//! service's own entry; a step merges the test's clock into the target
//! before the call and the target's into the test's after it, so "the
//! test sent, the service wrote, the test received" is causally ordered.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value as Json, json};

/// One recorded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Position in the test's log, from 1.
    pub seq: u64,
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// `syscall`, `service_started`, `fault_applied`, `step_send`, ...
    pub kind: String,
    /// The service it happened on (`test` for steps).
    pub service: String,
    /// Event details; all values are strings.
    pub fields: BTreeMap<String, String>,
    /// The service's vector clock after this event.
    pub vector_clock: BTreeMap<String, u64>,
}

impl Event {
    /// `syscall.write`, `lifecycle.started`, `step_send.orders`, ...
    pub fn event_type(&self) -> String {
        match self.kind.as_str() {
            "service_started" => "lifecycle.started".into(),
            "service_ready" => "lifecycle.ready".into(),
            "service_exited" => "lifecycle.exited".into(),
            "step_send" | "step_recv" => match self.fields.get("target") {
                Some(t) => format!("{}.{t}", self.kind),
                None => self.kind.clone(),
            },
            _ => match self.fields.get("syscall") {
                Some(s) => format!("{}.{s}", self.kind),
                None => self.kind.clone(),
            },
        }
    }

    /// The JSON shape documented in docs/json-output.md.
    pub fn to_json(&self) -> Json {
        let mut out = serde_json::Map::new();
        out.insert("seq".into(), json!(self.seq));
        out.insert("timestamp".into(), json!(rfc3339(self.time_ns)));
        out.insert("type".into(), json!(self.kind));
        out.insert("event_type".into(), json!(self.event_type()));
        if !self.service.is_empty() {
            out.insert("partition_key".into(), json!(self.service));
            out.insert("service".into(), json!(self.service));
        }
        if !self.fields.is_empty() {
            out.insert("fields".into(), json!(self.fields));
        }
        if !self.vector_clock.is_empty() {
            out.insert("vector_clock".into(), json!(self.vector_clock));
        }
        Json::Object(out)
    }
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `2026-11-22T10:00:01.123456789Z`, trailing zeros of the fraction trimmed.
pub fn rfc3339(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let frac = ns % 1_000_000_000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    if frac != 0 {
        let f = format!("{frac:09}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[derive(Default)]
struct Inner {
    events: Vec<Event>,
    clocks: HashMap<String, BTreeMap<String, u64>>,
}

/// The log of one test; shared by the body and the shim readers.
#[derive(Default)]
pub struct Trace {
    inner: Mutex<Inner>,
}

impl Trace {
    /// An empty log.
    pub fn new() -> Trace {
        Trace::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event now; returns its sequence number.
    pub fn emit(&self, kind: &str, service: &str, fields: BTreeMap<String, String>) -> u64 {
        self.emit_at(now_ns(), kind, service, fields)
    }

    /// Appends an event that happened at `time_ns`.
    pub fn emit_at(
        &self,
        time_ns: u64,
        kind: &str,
        service: &str,
        fields: BTreeMap<String, String>,
    ) -> u64 {
        let mut inner = self.lock();
        let seq = inner.events.len() as u64 + 1;
        let vector_clock = if service.is_empty() {
            BTreeMap::new()
        } else {
            let clock = inner.clocks.entry(service.to_string()).or_default();
            *clock.entry(service.to_string()).or_insert(0) += 1;
            clock.clone()
        };
        inner.events.push(Event {
            seq,
            time_ns,
            kind: kind.to_string(),
            service: service.to_string(),
            fields,
            vector_clock,
        });
        seq
    }

    /// Merges `from`'s clock into `into`'s (element-wise maximum).
    pub fn merge(&self, into: &str, from: &str) {
        let mut inner = self.lock();
        let source = inner.clocks.get(from).cloned().unwrap_or_default();
        let target = inner.clocks.entry(into.to_string()).or_default();
        for (k, v) in source {
            let slot = target.entry(k).or_insert(0);
            *slot = (*slot).max(v);
        }
    }

    /// A copy of every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// Events with `seq > after`.
    pub fn events_after(&self, after: u64) -> Vec<Event> {
        let inner = self.lock();
        inner
            .events
            .get(after as usize..)
            .map(<[Event]>::to_vec)
            .unwrap_or_default()
    }

    /// The sequence number of the last event.
    pub fn last_seq(&self) -> u64 {
        self.lock().events.len() as u64
    }
}

/// `key=value` filters of `assert_eventually`, `assert_never`, `events`:
/// `service`, `type` and any field name; values may use `*` and `?`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub conditions: Vec<(String, String)>,
}

impl Filter {
    /// Whether `event` satisfies every condition.
    pub fn matches(&self, event: &Event) -> bool {
        self.conditions.iter().all(|(key, want)| {
            let have = match key.as_str() {
                "service" => Some(event.service.as_str()),
                "type" => Some(event.kind.as_str()),
                "event_type" => return wildcard(want, &event.event_type()),
                field => event.fields.get(field).map(String::as_str),
            };
            have.is_some_and(|h| wildcard(want, h))
        })
    }

    /// `k="v", ...` for messages.
    pub fn describe(&self) -> String {
        self.conditions
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Shell-style match of a whole string: `*` any run (slashes included),
/// `?` one character. Filter values are mostly decisions and paths, where
/// "deny*" or "*.wal" should just work.
pub fn wildcard(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Builds a field map from pairs.
pub fn fields<const N: usize>(pairs: [(&str, String); N]) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_tick_per_service_and_merge_on_steps() {
        let t = Trace::new();
        t.emit("service_started", "db", BTreeMap::new());
        t.emit("step_send", "test", BTreeMap::new());
        t.merge("db", "test");
        t.emit("syscall", "db", BTreeMap::new());
        t.merge("test", "db");
        t.emit("step_recv", "test", BTreeMap::new());
        let e = t.events();
        assert_eq!(
            e[2].vector_clock,
            BTreeMap::from([("db".into(), 2), ("test".into(), 1)])
        );
        assert_eq!(
            e[3].vector_clock,
            BTreeMap::from([("db".into(), 2), ("test".into(), 2)])
        );
        assert_eq!(e.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    }

    #[test]
    fn timestamps_are_rfc3339_with_trimmed_fraction() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(1_783_684_801_420_000_000),
            "2026-07-10T12:00:01.42Z"
        );
    }

    #[test]
    fn wildcards_cover_prefix_suffix_and_middle() {
        assert!(wildcard("deny*", "deny(input/output error)"));
        assert!(wildcard("*.wal", "/tmp/x/inventory.wal"));
        assert!(wildcard("/tmp/*/x", "/tmp/a/b/x"));
        assert!(!wildcard("write", "writev"));
        assert!(wildcard("", ""));
        assert!(!wildcard("", "x"));
    }

    #[test]
    fn event_type_names_the_syscall_or_target() {
        let t = Trace::new();
        t.emit("syscall", "db", fields([("syscall", "fsync".into())]));
        t.emit("step_send", "test", fields([("target", "orders".into())]));
        t.emit("service_ready", "db", BTreeMap::new());
        let e = t.events();
        assert_eq!(e[0].event_type(), "syscall.fsync");
        assert_eq!(e[1].event_type(), "step_send.orders");
        assert_eq!(e[2].event_type(), "lifecycle.ready");
        let j = e[0].to_json();
        assert_eq!(j["partition_key"], "db");
        assert_eq!(j["fields"]["syscall"], "fsync");
    }
}
