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

/// Why the running test could not do what a builtin asked.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The spec names a service it did not declare.
    #[error("no service named {service:?}")]
    UnknownService {
        /// The name.
        service: String,
    },
    /// Syscall faults on a service Faultbox did not start.
    #[error(
        "{service:?} is a remote service: syscall faults need a process Faultbox starts; use protocol faults (fault({service}.<interface>, error(...), ...))"
    )]
    Remote {
        /// The service.
        service: String,
    },
    /// A container started with `seccomp=False`.
    #[error(
        "{service:?} runs with seccomp=False, so no shim filters its syscalls; drop seccomp=False to fault them, or use protocol faults (fault({service}.<interface>, error(...), ...))"
    )]
    NoSeccomp {
        /// The service.
        service: String,
    },
    /// A fault keyword that is neither an op, a family nor a syscall.
    #[error("{keyword:?} is neither a syscall nor an op of service {service:?}{hint}")]
    UnknownKeyword {
        /// The service.
        service: String,
        /// The keyword.
        keyword: String,
        /// A suggestion and the service's ops, with their separators.
        hint: String,
    },
    /// A syscall outside the filter the service was started with.
    #[error(
        "FAULT_NOT_FILTERABLE: {keyword} on {service:?} needs {syscall}, which is not in the service's seccomp filter; the filter is fixed when the service starts, from the syscall names the spec spells out, so write the syscall as a keyword (for example {syscall}=deny(\"EIO\")) rather than building it at run time"
    )]
    NotFilterable {
        /// The service.
        service: String,
        /// The keyword.
        keyword: String,
        /// The syscall missing from the filter.
        syscall: String,
    },
    /// An op's path glob that does not compile.
    #[error("{keyword}: path {path:?}: {reason}")]
    Path {
        /// The keyword.
        keyword: String,
        /// The glob.
        path: String,
        /// Why.
        reason: String,
    },
    /// The service is not (or no longer) running.
    #[error("service {service:?} {state}")]
    NotRunning {
        /// The service.
        service: String,
        /// "is not running" or "has exited".
        state: &'static str,
    },
    /// The service's shim refused the rules.
    #[error("service {service:?} refused the rules: {reason}")]
    Refused {
        /// The service.
        service: String,
        /// The shim's reason.
        reason: String,
    },
    /// `release()` of a tag no hold rule in force carries.
    #[error("release({tag:?}): no hold(tag={tag:?}) rule is in force{known}")]
    UnknownTag {
        /// The tag.
        tag: String,
        /// The tags that are, with their separator.
        known: String,
    },
    /// `release()` waited and no call was held.
    #[error(
        "release({tag:?}): no call was held under {tag:?} within {waited} (is the hold rule's syscall reached while it is in force?)"
    )]
    NothingHeld {
        /// The tag.
        tag: String,
        /// How long it waited.
        waited: String,
    },
    /// A protocol fault on an interface with no proxy.
    #[error("{service}.{interface} has no proxy (is the service running?)")]
    NoProxy {
        /// The service.
        service: String,
        /// The interface.
        interface: String,
    },
    /// A protocol rule the interface's protocol does not accept.
    #[error("{service}.{interface}: {reason}")]
    ProxyRule {
        /// The service.
        service: String,
        /// The interface.
        interface: String,
        /// Why.
        reason: String,
    },
}

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
    ) -> Result<u64, HostError>;

    /// Closes a syscall window and records its hits.
    fn close_window(&self, id: u64) -> Result<(), HostError>;

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
    ) -> Result<u64, HostError>;

    /// The newest `fault_start` window on `service.interface`.
    fn latest_started_proxy_window(&self, service: &str, interface: &str) -> Option<u64>;

    /// Closes a protocol window and records its hits.
    fn close_proxy_window(&self, id: u64);

    /// Splits `a` from `b` (`partition()`): connects either way are
    /// refused until [`TestHost::close_partition`]. Returns its id.
    fn open_partition(&self, a: &str, b: &str) -> Result<u64, HostError>;

    /// Heals a partition and records what it refused.
    fn close_partition(&self, id: u64) -> Result<(), HostError>;

    /// The newest partition between `a` and `b`, in either order.
    fn latest_partition(&self, a: &str, b: &str) -> Option<u64>;

    /// Answers calls held under `tag` (at most `limit`), failing them
    /// with `deny` or letting them run; waits up to `timeout` for a first
    /// one. Returns how many it answered.
    fn release(
        &self,
        tag: &str,
        deny: Option<i32>,
        limit: Option<u64>,
        timeout: std::time::Duration,
    ) -> Result<u64, HostError>;

    /// `--explore`: starts holding the services' calls for a `parallel()`
    /// about to dispatch its branches; false when not exploring.
    fn explore_begin(&self) -> bool {
        false
    }

    /// `--explore`: answers the held calls round by round (a round: the
    /// calls held once the services settle), each round in the order
    /// this run's interleaving gives, until `pending()` (the branches'
    /// calls not yet answered) is zero and nothing is held; then stops
    /// holding.
    fn explore_finish(&self, _pending: &dyn Fn() -> usize) {}

    /// Counts one evaluated assertion.
    fn count_assertion(&self);

    /// Records the assertion that failed the test (the first one wins).
    fn record_assertion(&self, detail: AssertionDetail);

    /// Every event so far, once every service has reported the calls it
    /// decided up to now.
    fn events(&self) -> Vec<Event>;

    /// The events after sequence number `after`, likewise: what a poll
    /// has not seen yet.
    fn events_after(&self, after: u64) -> Vec<Event> {
        let mut all = self.events();
        all.retain(|e| e.seq > after);
        all
    }

    /// What has already failed the test outside its body (a strict
    /// `determinism()` violation): the body stops at its next step or
    /// wait with this reason.
    fn violation(&self) -> Option<String> {
        None
    }

    /// An asserted exit of `service` is not a crash.
    fn acknowledge_exit(&self, service: &str);

    /// Carries out one step: traffic to an interface, through its proxy,
    /// recorded in the trace.
    fn step(&self, call: &StepCall) -> StepResult;

    /// Where `service.interface`'s proxy listens (`127.0.0.1:PORT`), once
    /// it runs.
    fn proxy_addr(&self, service: &str, interface: &str) -> Option<String>;

    /// Where a container service's interface is published on this
    /// machine, once it runs.
    fn published_addr(&self, _service: &str, _interface: &str) -> Option<std::net::SocketAddr> {
        None
    }
}
