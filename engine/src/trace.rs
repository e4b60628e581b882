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

pub use faultbox_spec::event::{Event, Filter, fields, now_ns, rfc3339};

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

    /// Every event, moved out (the test is over: its result keeps them).
    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut self.lock().events)
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

impl faultbox_proxy::EventSink for Trace {
    fn emit(&self, kind: &str, service: &str, fields: faultbox_proxy::Fields) {
        Trace::emit(self, kind, service, fields);
    }
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
