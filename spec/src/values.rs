//! The Starlark value types a spec works with: services, interfaces and
//! their references, fault rules, operations, healthchecks, step responses
//! and trace events.
//!
//! They are plain data (no references into the Starlark heap), so they
//! freeze with the module and can be shared by every test.
//!
//! `unsafe_code` is allowed for this module only because starlark's
//! `derive(ProvidesStaticType)` expands to an `unsafe impl`; nothing here
//! is written unsafe by hand.

use std::collections::BTreeMap;
use std::fmt;

use allocative::Allocative;
use faultbox_agent::rule::{Action, Trigger};
use serde_json::Value as Json;
use starlark::starlark_simple_value;
use starlark::values::dict::AllocDict;
use starlark::values::{
    Heap, NoSerialize, ProvidesStaticType, StarlarkValue, Value, starlark_value,
};

use crate::event::Event;
use crate::host::TestHost;
use crate::model::{Healthcheck, InterfaceDef, OpDef, ServiceDef};

/// What builtins can reach: the topology being declared (while the spec
/// loads) or the running test.
#[derive(ProvidesStaticType, Default)]
pub struct Ctx {
    /// Services declared so far, in declaration order.
    pub services: std::cell::RefCell<Vec<ServiceDef>>,
    /// The test being run; `None` while the spec loads.
    pub run: Option<std::sync::Arc<dyn TestHost>>,
    /// When the running test's time is up (`--timeout`).
    pub deadline: Option<std::time::Instant>,
    /// Local files read while the spec loads (modules, `load_file` and
    /// friends, TLS material), for `faultbox test --kube` to ship.
    pub files: std::cell::RefCell<Vec<std::path::PathBuf>>,
    /// Per monitor of the running test, the last event it has seen (the
    /// monitors themselves are module variables: see builtins/monitors.rs).
    pub monitors: std::cell::RefCell<Vec<u64>>,
    /// Set while a monitor's callback runs: monitors only look.
    pub in_monitor: std::cell::Cell<bool>,
    /// Set when an `assert_*` builtin fails, so a monitor can tell an
    /// assertion in its callback (a violation) from a mistake in it.
    pub assertion_raised: std::cell::Cell<bool>,
    /// `determinism(...)`, once the spec has called it.
    pub determinism: std::cell::RefCell<Option<crate::model::Determinism>>,
    /// `service(nondeterministic_ok=[...])`, by service.
    pub tolerated: std::cell::RefCell<BTreeMap<String, Vec<String>>>,
    /// While `parallel()` calls its branches: where their blocking calls go.
    pub(crate) dispatch: std::cell::RefCell<Option<crate::builtins::Dispatch>>,
}

/// `service(...)`: a declared service.
#[derive(Debug, Clone, ProvidesStaticType, NoSerialize, Allocative)]
pub struct ServiceValue {
    #[allocative(skip)]
    pub def: ServiceDef,
}
starlark_simple_value!(ServiceValue);

impl fmt::Display for ServiceValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<service {}>", self.def.name)
    }
}

/// Step methods each protocol offers, for `svc.iface.<method>(...)`.
fn has_step(protocol: &str, method: &str) -> bool {
    faultbox_proxy::steps::step_def(protocol, method).is_some()
}

#[starlark_value(type = "service")]
impl<'v> StarlarkValue<'v> for ServiceValue {
    fn get_attr(&self, attribute: &str, heap: Heap<'v>) -> Option<Value<'v>> {
        if attribute == "name" {
            return Some(heap.alloc(self.def.name.as_str()));
        }
        if let Some(iface) = self.def.interfaces.iter().find(|i| i.name == attribute) {
            return Some(heap.alloc(InterfaceRef {
                service: self.def.name.clone(),
                iface: iface.clone(),
                remote: self.def.remote.get(&iface.name).cloned(),
                container: self.def.is_container(),
            }));
        }
        // Shorthand steps on a service with one interface (or one named
        // "default"): `svc.get(path=...)`.
        let single = match self.def.interfaces.as_slice() {
            [only] => Some(only),
            many => many.iter().find(|i| i.name == "default"),
        }?;
        has_step(&single.protocol, attribute).then(|| {
            heap.alloc(StepMethod {
                service: self.def.name.clone(),
                iface: single.clone(),
                method: attribute.to_string(),
            })
        })
    }

    fn dir_attr(&self) -> Vec<String> {
        let mut names = vec!["name".to_string()];
        names.extend(self.def.interfaces.iter().map(|i| i.name.clone()));
        names
    }
}

/// `interface(...)` before it is attached to a service.
#[derive(Debug, Clone, ProvidesStaticType, NoSerialize, Allocative)]
pub struct InterfaceValue {
    #[allocative(skip)]
    pub def: InterfaceDef,
}
starlark_simple_value!(InterfaceValue);

impl fmt::Display for InterfaceValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "<interface {} {} :{}>",
            self.def.name, self.def.protocol, self.def.port
        )
    }
}

#[starlark_value(type = "interface")]
impl<'v> StarlarkValue<'v> for InterfaceValue {
    fn get_attr(&self, attribute: &str, heap: Heap<'v>) -> Option<Value<'v>> {
        match attribute {
            "name" => Some(heap.alloc(self.def.name.as_str())),
            "protocol" => Some(heap.alloc(self.def.protocol.as_str())),
            "port" => Some(heap.alloc(i32::from(self.def.port))),
            _ => None,
        }
    }
}

/// The text `.proxy_addr` (and `_host`, `_port`) stand for until the
/// proxy's port is known: it is replaced in service environments.
pub fn proxy_placeholder(part: &str, service: &str, interface: &str) -> String {
    format!("__FB_PROXY_{part}_{service}__{interface}__")
}

thread_local! {
    /// The running test, on its body's thread: what `.proxy_addr` reads
    /// once the proxies listen. Load-time evaluation has none, and gets
    /// the placeholder.
    static RUNNING: std::cell::RefCell<Option<std::sync::Arc<dyn crate::host::TestHost>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` (a test body) with `host` as the running test of this thread.
pub(crate) fn while_running<R>(
    host: std::sync::Arc<dyn crate::host::TestHost>,
    f: impl FnOnce() -> R,
) -> R {
    RUNNING.with(|r| *r.borrow_mut() = Some(host));
    let out = f();
    RUNNING.with(|r| *r.borrow_mut() = None);
    out
}

/// `.proxy_addr`, `.proxy_host` or `.proxy_port` (`part`): the real
/// value while a test runs and the proxy listens, the placeholder before.
fn proxy_part(part: &str, service: &str, interface: &str) -> String {
    let live = RUNNING.with(|r| {
        r.borrow()
            .as_ref()
            .and_then(|host| host.proxy_addr(service, interface))
    });
    let Some(addr) = live else {
        return proxy_placeholder(part, service, interface);
    };
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), ""));
    match part {
        "HOST" => host.to_string(),
        "PORT" => port.to_string(),
        _ => addr.clone(),
    }
}

/// `svc.iface`: where an interface of a service can be reached.
#[derive(Debug, Clone, ProvidesStaticType, NoSerialize, Allocative)]
pub struct InterfaceRef {
    pub service: String,
    #[allocative(skip)]
    pub iface: InterfaceDef,
    /// The upstream of a remote service's interface.
    pub remote: Option<String>,
    /// Whether the service runs in a container: its `.internal_addr` is
    /// its name on the run's network, and its `.addr` the port published
    /// on this machine once it runs.
    pub container: bool,
}
starlark_simple_value!(InterfaceRef);

impl fmt::Display for InterfaceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<interface_ref {}.{}>", self.service, self.iface.name)
    }
}

#[starlark_value(type = "interface_ref")]
impl<'v> StarlarkValue<'v> for InterfaceRef {
    fn get_attr(&self, attribute: &str, heap: Heap<'v>) -> Option<Value<'v>> {
        let port = self.iface.port;
        // A container's published address exists only while it runs.
        let published = || {
            RUNNING.with(|r| {
                r.borrow()
                    .as_ref()
                    .and_then(|host| host.published_addr(&self.service, &self.iface.name))
            })
        };
        let (host, port) = match (&self.remote, self.container.then(published).flatten()) {
            (Some(r), _) => match r.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().unwrap_or(port)),
                None => (r.clone(), port),
            },
            (None, Some(a)) => (a.ip().to_string(), a.port()),
            (None, None) => ("localhost".to_string(), port),
        };
        match attribute {
            "addr" => Some(heap.alloc(format!("{host}:{port}"))),
            "internal_addr" if self.container => {
                Some(heap.alloc(format!("{}:{}", self.service, self.iface.port)))
            }
            "internal_addr" => Some(heap.alloc(format!("{host}:{port}"))),
            "host" => Some(heap.alloc(host)),
            "port" => Some(heap.alloc(i32::from(port))),
            "name" => Some(heap.alloc(self.iface.name.as_str())),
            "protocol" => Some(heap.alloc(self.iface.protocol.as_str())),
            "service" => Some(heap.alloc(self.service.as_str())),
            "proxy_addr" => Some(heap.alloc(proxy_part("ADDR", &self.service, &self.iface.name))),
            "proxy_host" => Some(heap.alloc(proxy_part("HOST", &self.service, &self.iface.name))),
            "proxy_port" => Some(heap.alloc(proxy_part("PORT", &self.service, &self.iface.name))),
            m if has_step(&self.iface.protocol, m) => Some(heap.alloc(StepMethod {
                service: self.service.clone(),
                iface: self.iface.clone(),
                method: m.to_string(),
            })),
            _ => None,
        }
    }

    fn dir_attr(&self) -> Vec<String> {
        let mut names: Vec<String> = [
            "addr",
            "host",
            "port",
            "internal_addr",
            "name",
            "protocol",
            "service",
            "proxy_addr",
            "proxy_host",
            "proxy_port",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        names.extend(
            faultbox_proxy::steps::step_defs(&self.iface.protocol)
                .iter()
                .map(|d| d.method.to_string()),
        );
        names
    }
}

/// A builtin this build does not have (see `builtins::not_in_this_build`).
#[derive(Debug, Clone, ProvidesStaticType, NoSerialize, Allocative)]
pub struct Unsupported {
    pub name: &'static str,
    pub what: &'static str,
}
starlark_simple_value!(Unsupported);

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<builtin {}>", self.name)
    }
}

#[starlark_value(type = "builtin_function_or_method")]
impl<'v> StarlarkValue<'v> for Unsupported {
    fn invoke(
        &self,
        _me: Value<'v>,
        _args: &starlark::eval::Arguments<'v, '_>,
        _eval: &mut starlark::eval::Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        Err(starlark::Error::new_other(anyhow::anyhow!(
            "{}() is not supported by this build of faultbox ({} are not implemented yet)",
            self.name,
            self.what
        )))
    }
}

/// `svc.iface.post`: a step method, called by the test body.
#[derive(Debug, Clone, ProvidesStaticType, NoSerialize, Allocative)]
pub struct StepMethod {
    pub service: String,
    #[allocative(skip)]
    pub iface: InterfaceDef,
    pub method: String,
}
starlark_simple_value!(StepMethod);

impl fmt::Display for StepMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "<step {}.{}.{}>",
            self.service, self.iface.name, self.method
        )
    }
}

#[starlark_value(type = "step_method")]
impl<'v> StarlarkValue<'v> for StepMethod {
    fn invoke(
        &self,
        _me: Value<'v>,
        args: &starlark::eval::Arguments<'v, '_>,
        eval: &mut starlark::eval::Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        crate::builtins::call_step(self, args, eval)
    }
}

/// What a syscall fault does: `deny(...)`, `delay(...)`, `allow()`.
#[derive(Debug, Clone, PartialEq, ProvidesStaticType, NoSerialize, Allocative)]
pub struct FaultValue {
    #[allocative(skip)]
    pub action: Action,
    pub probability: f64,
    pub label: Option<String>,
    #[allocative(skip)]
    pub trigger: Trigger,
    /// The errno name as written (upper-cased), for reports.
    pub errno: Option<String>,
}
starlark_simple_value!(FaultValue);

impl FaultValue {
    /// `deny(EIO)`, `delay(500ms)`, `allow`: the action as reports show it.
    pub fn summary(&self) -> String {
        match (&self.action, &self.errno) {
            (Action::Deny { .. }, Some(name)) => format!("deny({name})"),
            (Action::Hold, _) => format!("hold({})", self.label.as_deref().unwrap_or("")),
            (action, _) => action.describe().into_owned(),
        }
    }

    /// `deny`, `delay` or `allow`.
    pub fn kind(&self) -> &'static str {
        match self.action {
            Action::Allow => "allow",
            Action::Trace => "trace",
            Action::Deny { .. } => "deny",
            Action::Delay { .. } => "delay",
            Action::Hold => "hold",
        }
    }
}

impl fmt::Display for FaultValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.summary())?;
        if self.probability < 1.0 {
            write!(f, " {}%", self.probability * 100.0)?;
        }
        if self.trigger != Trigger::Always {
            write!(f, " {}", self.trigger)?;
        }
        Ok(())
    }
}

#[starlark_value(type = "fault")]
impl<'v> StarlarkValue<'v> for FaultValue {
    fn get_attr(&self, attribute: &str, heap: Heap<'v>) -> Option<Value<'v>> {
        match attribute {
            "action" => Some(heap.alloc(self.kind())),
            "probability" => Some(heap.alloc(self.probability)),
            "label" => Some(heap.alloc(self.label.clone().unwrap_or_default())),
            "errno" => Some(heap.alloc(self.errno.clone().unwrap_or_default())),
            _ => None,
        }
    }
}

/// `response(...)`, `error(...)`, `drop(...)`, `delay(delay=...)`: a
/// protocol-level rule for `fault(svc.iface, ...)`.
#[derive(Debug, Clone, ProvidesStaticType, NoSerialize, Allocative)]
pub struct ProxyRuleValue {
    #[allocative(skip)]
    pub def: faultbox_proxy::rules::ProxyRuleDef,
}
starlark_simple_value!(ProxyRuleValue);

impl fmt::Display for ProxyRuleValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.def.action.kind(), self.def.matcher())
    }
}

#[starlark_value(type = "proxy_fault")]
impl<'v> StarlarkValue<'v> for ProxyRuleValue {}

/// `tls_cert(...)`: TLS material for `interface(tls=...)`.
#[derive(Debug, Clone, ProvidesStaticType, NoSerialize, Allocative)]
pub struct TlsValue {
    #[allocative(skip)]
    pub spec: faultbox_proxy::TlsSpec,
}
starlark_simple_value!(TlsValue);

impl fmt::Display for TlsValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<tls_cert>")
    }
}

#[starlark_value(type = "tls_cert")]
impl<'v> StarlarkValue<'v> for TlsValue {}

/// `op(syscalls=[...], path=...)`: a named group of syscalls.
#[derive(Debug, Clone, ProvidesStaticType, NoSerialize, Allocative)]
pub struct OpValue {
    #[allocative(skip)]
    pub def: OpDef,
}
starlark_simple_value!(OpValue);

impl fmt::Display for OpValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<op {}>", self.def.syscalls.join(","))
    }
}

#[starlark_value(type = "op")]
impl<'v> StarlarkValue<'v> for OpValue {}

/// `tcp(...)` / `http(...)`: a readiness probe.
#[derive(Debug, Clone, ProvidesStaticType, NoSerialize, Allocative)]
pub struct HealthcheckValue {
    #[allocative(skip)]
    pub check: Healthcheck,
}
starlark_simple_value!(HealthcheckValue);

impl fmt::Display for HealthcheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<healthcheck {}>", self.check.describe())
    }
}

#[starlark_value(type = "healthcheck")]
impl<'v> StarlarkValue<'v> for HealthcheckValue {}

/// What a step returned.
#[derive(Debug, Clone, Default, ProvidesStaticType, NoSerialize, Allocative)]
pub struct ResponseValue {
    pub status: i64,
    pub body: String,
    pub headers: BTreeMap<String, String>,
    pub ok: bool,
    pub error: String,
    pub duration_ms: i64,
    /// Structured data, when the protocol has it (SQL rows).
    #[allocative(skip)]
    pub data: Option<Json>,
}
starlark_simple_value!(ResponseValue);

impl fmt::Display for ResponseValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.error.is_empty() {
            return write!(f, "response(error={:?})", self.error);
        }
        write!(f, "response(status={}", self.status)?;
        if !self.body.is_empty() {
            let short: String = self.body.chars().take(60).collect();
            write!(f, ", body={short:?}")?;
        }
        write!(f, ", duration_ms={})", self.duration_ms)
    }
}

#[starlark_value(type = "response")]
impl<'v> StarlarkValue<'v> for ResponseValue {
    fn get_attr(&self, attribute: &str, heap: Heap<'v>) -> Option<Value<'v>> {
        match attribute {
            "status" => Some(heap.alloc(self.status)),
            "body" => Some(heap.alloc(self.body.as_str())),
            "ok" | "success" => Some(Value::new_bool(self.ok)),
            "error" => Some(heap.alloc(self.error.as_str())),
            "duration_ms" => Some(heap.alloc(self.duration_ms)),
            "headers" => Some(
                heap.alloc(AllocDict(
                    self.headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect::<Vec<_>>(),
                )),
            ),
            "data" => Some(match &self.data {
                Some(data) => json_to_value(data, heap),
                None => match serde_json::from_str::<Json>(&self.body) {
                    Ok(data) => json_to_value(&data, heap),
                    Err(_) => heap.alloc(self.body.as_str()),
                },
            }),
            _ => None,
        }
    }

    fn dir_attr(&self) -> Vec<String> {
        [
            "status",
            "body",
            "data",
            "headers",
            "ok",
            "error",
            "duration_ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn to_bool(&self) -> bool {
        self.ok
    }
}

/// One trace event, as `where=` predicates and `events()` see it.
#[derive(Debug, Clone, ProvidesStaticType, NoSerialize, Allocative)]
pub struct EventValue {
    #[allocative(skip)]
    pub event: Event,
}
starlark_simple_value!(EventValue);

impl fmt::Display for EventValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "<event #{} {} {}>",
            self.event.seq, self.event.kind, self.event.service
        )
    }
}

#[starlark_value(type = "event")]
impl<'v> StarlarkValue<'v> for EventValue {
    fn get_attr(&self, attribute: &str, heap: Heap<'v>) -> Option<Value<'v>> {
        let e = &self.event;
        Some(match attribute {
            "seq" => heap.alloc(e.seq),
            "service" => heap.alloc(e.service.as_str()),
            "type" => heap.alloc(e.kind.as_str()),
            "event_type" => heap.alloc(e.event_type()),
            "fields" | "data" => heap.alloc(AllocDict(
                e.fields
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect::<Vec<_>>(),
            )),
            // Any field by name; absent fields read as "".
            field => heap.alloc(e.fields.get(field).map(String::as_str).unwrap_or("")),
        })
    }

    fn has_attr(&self, _attribute: &str, _heap: Heap<'v>) -> bool {
        true
    }
}

/// Converts decoded JSON (or YAML) into Starlark values.
pub fn json_to_value<'v>(json: &Json, heap: Heap<'v>) -> Value<'v> {
    match json {
        Json::Null => Value::new_none(),
        Json::Bool(b) => Value::new_bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => heap.alloc(i),
            None => heap.alloc(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => heap.alloc(s.as_str()),
        Json::Array(items) => heap.alloc(
            items
                .iter()
                .map(|i| json_to_value(i, heap))
                .collect::<Vec<_>>(),
        ),
        Json::Object(map) => heap.alloc(AllocDict(
            map.iter()
                .map(|(k, v)| (heap.alloc(k.as_str()), json_to_value(v, heap)))
                .collect::<Vec<_>>(),
        )),
    }
}

impl From<faultbox_proxy::steps::StepReply> for ResponseValue {
    fn from(r: faultbox_proxy::steps::StepReply) -> ResponseValue {
        ResponseValue {
            status: r.status,
            body: r.body,
            headers: r.headers,
            ok: r.ok,
            error: r.error,
            duration_ms: r.duration_ms,
            data: r.data,
        }
    }
}

/// What a deferred call ends with.
#[derive(Debug, Clone)]
pub enum Outcome {
    Step(faultbox_proxy::steps::StepResult),
    Released(Result<u64, String>),
}

/// A deferred call's result, once its worker has it.
#[derive(Debug, Default)]
pub struct Slot {
    result: std::sync::Mutex<Option<Outcome>>,
    filled: std::sync::Condvar,
}

impl Slot {
    pub(crate) fn fill(&self, outcome: Outcome) {
        let mut r = self.result.lock().unwrap_or_else(|p| p.into_inner());
        *r = Some(outcome);
        self.filled.notify_all();
    }

    pub(crate) fn wait(&self) -> Outcome {
        let mut r = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(o) = r.as_ref() {
                return o.clone();
            }
            r = self.filled.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A deferred call's result; looking at it waits for it.
#[derive(Debug, ProvidesStaticType, NoSerialize, Allocative)]
pub struct Pending {
    #[allocative(skip)]
    pub(crate) slot: std::sync::Arc<Slot>,
    pub(crate) what: String,
}
starlark_simple_value!(Pending);

impl fmt::Display for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.slot.wait() {
            Outcome::Step(faultbox_proxy::steps::StepResult::Reply(r)) => {
                write!(f, "{}", response(r))
            }
            Outcome::Step(faultbox_proxy::steps::StepResult::Text(t)) => write!(f, "{t}"),
            Outcome::Step(faultbox_proxy::steps::StepResult::Raise(m)) => {
                write!(f, "<{} failed: {m}>", self.what)
            }
            Outcome::Released(Ok(n)) => write!(f, "{n}"),
            Outcome::Released(Err(m)) => write!(f, "<{} failed: {m}>", self.what),
        }
    }
}

fn response(r: faultbox_proxy::steps::StepReply) -> ResponseValue {
    ResponseValue::from(r)
}

/// The value a finished call stands for, or its error.
pub(crate) fn outcome_value<'v>(outcome: Outcome, heap: Heap<'v>) -> Result<Value<'v>, String> {
    match outcome {
        Outcome::Step(faultbox_proxy::steps::StepResult::Reply(r)) => Ok(heap.alloc(response(r))),
        Outcome::Step(faultbox_proxy::steps::StepResult::Text(t)) => Ok(heap.alloc(t)),
        Outcome::Step(faultbox_proxy::steps::StepResult::Raise(m)) | Outcome::Released(Err(m)) => {
            Err(m)
        }
        Outcome::Released(Ok(n)) => Ok(heap.alloc(n as i64)),
    }
}

impl Pending {
    fn resolved<'v>(&self, heap: Heap<'v>) -> Option<Value<'v>> {
        outcome_value(self.slot.wait(), heap).ok()
    }
}

#[starlark_value(type = "response")]
impl<'v> StarlarkValue<'v> for Pending {
    fn get_attr(&self, attribute: &str, heap: Heap<'v>) -> Option<Value<'v>> {
        self.resolved(heap)?
            .get_attr(attribute, heap)
            .ok()
            .flatten()
    }

    fn dir_attr(&self) -> Vec<String> {
        match self.slot.wait() {
            Outcome::Step(faultbox_proxy::steps::StepResult::Reply(r)) => response(r).dir_attr(),
            _ => Vec::new(),
        }
    }

    fn equals(&self, other: Value<'v>) -> starlark::Result<bool> {
        match self.slot.wait() {
            Outcome::Step(faultbox_proxy::steps::StepResult::Text(t)) => {
                Ok(other.unpack_str() == Some(t.as_str()))
            }
            Outcome::Released(Ok(n)) => Ok(other.unpack_i32().map(i64::from) == Some(n as i64)),
            _ => Ok(false),
        }
    }
}
