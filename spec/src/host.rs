//! What the builtins a test body calls ask of the runtime.
//!
//! The language never names the runtime's types: a test body runs against
//! a [`TestHost`], which `faultbox-engine` implements for a running test.
//! That is what lets the operator load and validate a spec with this crate
//! alone.

use faultbox_proxy::rules::ProxyRuleDef;
use faultbox_proxy::steps::{StepCall, StepResult};

use crate::event::Event;
use crate::values::FaultValue;

/// A failed assertion, recorded where it happened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AssertionDetail {
    pub func: String,
    pub expected: Option<String>,
    pub actual: Option<String>,
    pub message: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
}

/// The running test, as its body sees it.
pub trait TestHost: Send + Sync {
    /// Opens a syscall fault window (or, with `trace`, a trace window) on
    /// `service`; `from_start` marks `fault_start` windows, which
    /// `fault_stop` closes. Returns the window's id.
    fn open_window(
        &self,
        service: &str,
        faults: Vec<(String, FaultValue)>,
        trace: bool,
        from_start: bool,
    ) -> Result<u64, String>;

    /// Closes a syscall window and records its hits.
    fn close_window(&self, id: u64) -> Result<(), String>;

    /// The newest window `fault_start` (or `trace_start`) opened on
    /// `service`.
    fn latest_started_window(&self, service: &str, trace: bool) -> Option<u64>;

    /// Opens a protocol fault window on `service.interface`.
    fn open_proxy_window(
        &self,
        service: &str,
        interface: &str,
        rules: Vec<ProxyRuleDef>,
        from_start: bool,
    ) -> Result<u64, String>;

    /// The newest `fault_start` window on `service.interface`.
    fn latest_started_proxy_window(&self, service: &str, interface: &str) -> Option<u64>;

    /// Closes a protocol window and records its hits.
    fn close_proxy_window(&self, id: u64);

    /// Counts one evaluated assertion.
    fn count_assertion(&self);

    /// Records the assertion that failed the test (the first one wins).
    fn record_assertion(&self, detail: AssertionDetail);

    /// Every event so far, once every service has reported the calls it
    /// decided up to now.
    fn events(&self) -> Vec<Event>;

    /// An asserted exit of `service` is not a crash.
    fn acknowledge_exit(&self, service: &str);

    /// Carries out one step: traffic to an interface, through its proxy,
    /// recorded in the trace.
    fn step(&self, call: &StepCall) -> StepResult;

    /// Where `service.interface`'s proxy listens (`127.0.0.1:PORT`), once
    /// it runs.
    fn proxy_addr(&self, service: &str, interface: &str) -> Option<String>;
}
