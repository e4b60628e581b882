//! The event model: what one test records (syscalls the shims report,
//! service lifecycle, fault windows, proxy decisions, steps) and the
//! `key=value` filters assertions select events with. The runtime's trace
//! records them; assertions and `events()` read them.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use faultbox_agent::glob::wildcard;
use serde_json::Value as Json;

pub use faultbox_proxy::{Fields, fields};

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
        // One shape, written once: the Serialize impl below.
        serde_json::to_value(self).unwrap_or(Json::Null)
    }
}

impl serde::Serialize for Event {
    /// The JSON form of an event (docs/json-output.md), written straight
    /// to the output: a report of a long trace builds no value tree.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("seq", &self.seq)?;
        m.serialize_entry("timestamp", &rfc3339(self.time_ns))?;
        m.serialize_entry("type", &self.kind)?;
        m.serialize_entry("event_type", &self.event_type())?;
        if !self.service.is_empty() {
            m.serialize_entry("partition_key", &self.service)?;
            m.serialize_entry("service", &self.service)?;
        }
        if !self.fields.is_empty() {
            m.serialize_entry("fields", &self.fields)?;
        }
        if !self.vector_clock.is_empty() {
            m.serialize_entry("vector_clock", &self.vector_clock)?;
        }
        m.end()
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
