//! The builtins a spec calls, grouped by theme: topology, syscall faults,
//! steps, assertions and file readers.
//!
//! Every builtin takes `*args, **kwargs` and checks them itself, so an
//! unknown keyword gets one message shape everywhere: the builtin, the bad
//! keyword, and the keywords it accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultbox_agent::errno;
use faultbox_agent::rule::{self, Action, Trigger, parse_duration};
use faultbox_agent::syscalls::{self, Arch};
use starlark::environment::GlobalsBuilder;
use starlark::eval::{Arguments, Evaluator};
use starlark::starlark_module;
use starlark::values::dict::DictRef;
use starlark::values::float::UnpackFloat;
use starlark::values::list::ListRef;
use starlark::values::none::NoneType;
use starlark::values::tuple::UnpackTuple;
use starlark::values::{UnpackValue, Value};

use crate::event::{Event, Filter};
use crate::host::{AssertionDetail, TestHost};
use crate::model::{Healthcheck, InterfaceDef, OpDef, ServiceDef};
use crate::values::{
    Ctx, EventValue, FaultValue, HealthcheckValue, InterfaceRef, InterfaceValue, OpValue,
    ProxyRuleValue, ResponseValue, ServiceValue, StepMethod, TlsValue, json_to_value,
};
use faultbox_proxy::TlsSpec;
use faultbox_proxy::rules::{ProxyAction, ProxyRuleDef};
use faultbox_proxy::steps::{self, Arg as StepArg, Kind, StepCall, StepResult};

fn err(message: impl Into<String>) -> starlark::Error {
    starlark::Error::new_other(anyhow::anyhow!(message.into()))
}

type Res<T> = starlark::Result<T>;

fn ctx<'a>(eval: &'a Evaluator<'_, '_, '_>) -> Res<&'a Ctx> {
    eval.extra
        .and_then(|e| e.downcast_ref::<Ctx>())
        .ok_or_else(|| err("internal: builtin called outside a Faultbox evaluation"))
}

fn run_of(eval: &Evaluator<'_, '_, '_>, builtin: &str) -> Res<Arc<dyn TestHost>> {
    ctx(eval)?.run.clone().ok_or_else(|| {
        err(format!(
            "{builtin}() can only be called inside a test function (def test_...)"
        ))
    })
}

/// Where the current call is, `file:line`.
fn call_site(eval: &Evaluator<'_, '_, '_>) -> (Option<String>, Option<u32>) {
    match eval.call_stack_top_location() {
        Some(span) => {
            let r = span.resolve_span();
            (
                Some(span.filename().to_string()),
                Some(r.begin.line as u32 + 1),
            )
        }
        None => (None, None),
    }
}

/// The arguments of one builtin call.
struct Args<'v> {
    builtin: &'static str,
    pos: Vec<Value<'v>>,
    named: Vec<(String, Value<'v>)>,
}

impl<'v> Args<'v> {
    fn new(
        builtin: &'static str,
        pos: UnpackTuple<Value<'v>>,
        kwargs: DictRef<'v>,
    ) -> Res<Args<'v>> {
        let mut named = Vec::new();
        for (k, v) in kwargs.iter() {
            let k = k
                .unpack_str()
                .ok_or_else(|| err(format!("{builtin}(): keyword names must be strings")))?;
            named.push((k.to_string(), v));
        }
        Ok(Args {
            builtin,
            pos: pos.items,
            named,
        })
    }

    fn from_arguments(
        builtin: &'static str,
        args: &Arguments<'v, '_>,
        eval: &Evaluator<'v, '_, '_>,
    ) -> Res<Args<'v>> {
        let pos = args.positions(eval.heap())?.collect();
        let named = args
            .names_map()?
            .into_iter()
            .map(|(k, v)| (k.as_str().to_string(), v))
            .collect();
        Ok(Args {
            builtin,
            pos,
            named,
        })
    }

    /// Refuses keywords outside `accepted` and more than `max_pos`
    /// positional arguments.
    fn check(&self, max_pos: usize, accepted: &[&str]) -> Res<()> {
        for (k, _) in &self.named {
            if !accepted.contains(&k.as_str()) {
                let hint = errno::closest(k, accepted.iter().copied())
                    .map(|c| format!(" (did you mean {c}?)"))
                    .unwrap_or_default();
                return Err(err(format!(
                    "{}(): unknown keyword argument {k:?}{hint}; accepted: {}",
                    self.builtin,
                    accepted.join(", ")
                )));
            }
        }
        if self.pos.len() > max_pos {
            return Err(err(format!(
                "{}(): takes at most {max_pos} positional argument(s), got {}",
                self.builtin,
                self.pos.len()
            )));
        }
        Ok(())
    }

    fn named(&self, key: &str) -> Option<Value<'v>> {
        self.named
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .filter(|v| !v.is_none())
    }

    /// Positional `i`, or the keyword `key` (not both).
    fn arg(&self, i: usize, key: &str) -> Res<Option<Value<'v>>> {
        match (self.pos.get(i), self.named(key)) {
            (Some(_), Some(_)) => Err(err(format!(
                "{}(): {key} given both by position and by keyword",
                self.builtin
            ))),
            (Some(v), None) => Ok(Some(*v)),
            (None, v) => Ok(v),
        }
    }

    fn required(&self, i: usize, key: &str) -> Res<Value<'v>> {
        self.arg(i, key)?.ok_or_else(|| {
            err(format!(
                "{}(): missing required argument {key}",
                self.builtin
            ))
        })
    }

    fn string(&self, v: Value<'v>, key: &str) -> Res<String> {
        v.unpack_str().map(str::to_string).ok_or_else(|| {
            err(format!(
                "{}(): {key} must be a string, got {} ({})",
                self.builtin,
                v.get_type(),
                v.to_repr()
            ))
        })
    }

    fn strings(&self, v: Value<'v>, key: &str) -> Res<Vec<String>> {
        let list = ListRef::from_value(v)
            .map(|l| l.content().to_vec())
            .or_else(|| {
                UnpackTuple::<Value>::unpack_value(v)
                    .ok()
                    .flatten()
                    .map(|t| t.items)
            })
            .ok_or_else(|| {
                err(format!(
                    "{}(): {key} must be a list of strings, got {}",
                    self.builtin,
                    v.get_type()
                ))
            })?;
        list.iter().map(|x| self.string(*x, key)).collect()
    }

    fn duration(&self, v: Value<'v>, key: &str) -> Res<Duration> {
        let text = self.string(v, key)?;
        parse_duration(&text)
            .map(Duration::from_nanos)
            .map_err(|e| err(format!("{}(): {key}={text:?}: {e}", self.builtin)))
    }

    /// `key=` as a duration, or `default` when not given.
    fn duration_or(&self, key: &str, default: Duration) -> Res<Duration> {
        match self.named(key) {
            Some(v) => self.duration(v, key),
            None => Ok(default),
        }
    }

    fn callable(&self, v: Value<'v>, key: &str) -> Res<Value<'v>> {
        if v.get_type() == "function" {
            Ok(v)
        } else {
            Err(err(format!(
                "{}(): {key} must be a function, got {} ({})",
                self.builtin,
                v.get_type(),
                v.to_repr()
            )))
        }
    }
}

/// `remote="host[:port]"` or `remote=remotes({iface: "host[:port]"})`:
/// each interface's upstream; a bare host takes the interface's port.
fn remote_upstreams(
    name: &str,
    v: Value,
    interfaces: &[InterfaceDef],
) -> Res<BTreeMap<String, String>> {
    if interfaces.is_empty() {
        return Err(err(format!(
            "service({name:?}): a remote service needs at least one interface(...) to proxy"
        )));
    }
    let with_port = |addr: &str, port: u16| {
        if addr
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            addr.to_string()
        } else {
            format!("{addr}:{port}")
        }
    };
    let mut out = BTreeMap::new();
    if let Some(addr) = v.unpack_str() {
        if addr.is_empty() {
            return Err(err(format!("service({name:?}): remote=\"\" is empty")));
        }
        let has_port = with_port(addr, 0) == addr;
        if has_port && interfaces.len() > 1 {
            return Err(err(format!(
                "service({name:?}): remote={addr:?} names one port for {} interfaces; give a bare host (each interface keeps its port) or remotes({{iface: \"host:port\"}})",
                interfaces.len()
            )));
        }
        for i in interfaces {
            out.insert(i.name.clone(), with_port(addr, i.port));
        }
        return Ok(out);
    }
    let d = DictRef::from_value(v).ok_or_else(|| {
        err(format!(
            "service({name:?}): remote= must be \"host[:port]\" or remotes({{iface: \"host[:port]\"}}), got {}",
            v.get_type()
        ))
    })?;
    for (k, val) in d.iter() {
        let (Some(k), Some(addr)) = (k.unpack_str(), val.unpack_str()) else {
            return Err(err(format!(
                "service({name:?}): remotes() maps interface names to \"host[:port]\" strings"
            )));
        };
        let iface = interfaces.iter().find(|i| i.name == k).ok_or_else(|| {
            err(format!(
                "service({name:?}): remotes() names {k:?}, which is not one of its interfaces"
            ))
        })?;
        out.insert(k.to_string(), with_port(addr, iface.port));
    }
    if let Some(missing) = interfaces.iter().find(|i| !out.contains_key(&i.name)) {
        return Err(err(format!(
            "service({name:?}): remotes() gives no address for interface {:?}",
            missing.name
        )));
    }
    Ok(out)
}

/// Protocols the original project names that this build has no proxy,
/// steps or probe for: refused at load, with a way out.
const NOT_IN_THIS_BUILD: &[&str] = &[
    "kafka",
    "nats",
    "mongodb",
    "cassandra",
    "clickhouse",
    "amqp",
];

fn service_name(v: Value, builtin: &str) -> Res<String> {
    if let Some(s) = ServiceValue::from_value(v) {
        return Ok(s.def.name.clone());
    }
    if InterfaceRef::from_value(v).is_some() {
        return Err(err(format!(
            "{builtin}() takes a service, not an interface ({}); protocol faults go through fault(svc.iface, ...), fault_start and fault_stop",
            v.to_str()
        )));
    }
    Err(err(format!(
        "{builtin}(): the first argument must be a service, got {} ({})",
        v.get_type(),
        v.to_repr()
    )))
}

/// `probability=`: `"30%"` or `0.3` (the agent's one reading); a bare
/// number above 1 is refused with the percentage to write instead.
fn parse_probability(builtin: &str, v: Value) -> Res<f64> {
    let fraction = |x: f64, shown: String| {
        if (0.0..=1.0).contains(&x) {
            Ok(x)
        } else if x > 1.0 && x <= 100.0 {
            Err(err(format!(
                "{builtin}(): probability={shown} is a bare number above 1: write \"{shown}%\" for a percentage, or a fraction from 0 to 1"
            )))
        } else {
            Err(err(format!(
                "{builtin}(): probability {shown} is outside 0%..100%"
            )))
        }
    };
    if let Some(text) = v.unpack_str() {
        rule::parse_probability(text).map_err(|e| err(format!("{builtin}(): {e}")))
    } else if let Some(i) = v.unpack_i32() {
        fraction(f64::from(i), i.to_string())
    } else if let Ok(Some(f)) = UnpackFloat::unpack_value(v) {
        fraction(f.0, v.to_repr())
    } else {
        Err(err(format!(
            "{builtin}(): probability must be like \"30%\" or 0.3, got {}",
            v.to_repr()
        )))
    }
}

fn parse_trigger(builtin: &str, text: &str) -> Res<Trigger> {
    let bad = || {
        err(format!(
            "{builtin}(): trigger={text:?} is not valid; use \"nth=N\" (only the Nth call, N ≥ 1) or \"after=N\" (every call after the first N)"
        ))
    };
    let (kind, n) = text.split_once('=').ok_or_else(bad)?;
    let n: u64 = n.trim().parse().map_err(|_| bad())?;
    match kind.trim() {
        "nth" if n >= 1 => Ok(Trigger::Nth(n)),
        "after" => Ok(Trigger::After(n)),
        _ => Err(bad()),
    }
}

fn fault_common(a: &Args, action: Action, errno: Option<String>) -> Res<FaultValue> {
    let probability = match a.named("probability") {
        Some(v) => parse_probability(a.builtin, v)?,
        None => 1.0,
    };
    let label = a.named("label").map(|v| a.string(v, "label")).transpose()?;
    let trigger = match a.named("trigger") {
        Some(v) => parse_trigger(a.builtin, &a.string(v, "trigger")?)?,
        None => Trigger::Always,
    };
    Ok(FaultValue {
        action,
        probability,
        label: label.filter(|l| !l.is_empty()),
        trigger,
        errno,
    })
}

const MATCHERS: &[&str] = &[
    "method",
    "path",
    "command",
    "key",
    "query",
    "probability",
    "trigger",
    "label",
];

/// Builds a protocol rule from its matcher keywords.
fn proxy_rule(a: &Args, action: ProxyAction, extra: &[&str]) -> Res<ProxyRuleValue> {
    for (k, _) in &a.named {
        if matches!(k.as_str(), "topic" | "subject" | "collection") {
            return Err(err(format!(
                "{}(): {k}= matches message-broker traffic; this build proxies {} only",
                a.builtin,
                faultbox_proxy::protocol::names().join(", ")
            )));
        }
    }
    let mut accepted: Vec<&str> = MATCHERS.to_vec();
    accepted.extend_from_slice(extra);
    a.check(0, &accepted)?;
    let f = fault_common(a, Action::Allow, None)?;
    Ok(ProxyRuleValue {
        def: ProxyRuleDef {
            action,
            method: a
                .named("method")
                .map(|v| a.string(v, "method"))
                .transpose()?,
            path: a.named("path").map(|v| a.string(v, "path")).transpose()?,
            command: a
                .named("command")
                .map(|v| a.string(v, "command"))
                .transpose()?,
            key: a.named("key").map(|v| a.string(v, "key")).transpose()?,
            query: a.named("query").map(|v| a.string(v, "query")).transpose()?,
            probability: f.probability,
            trigger: f.trigger,
            label: f.label,
        },
    })
}

/// `status=`: an HTTP status, a gRPC code, or a gRPC code's name
/// (`"UNAVAILABLE"`). Which of them fits is checked against the
/// interface's protocol when the rule is applied.
fn status_arg(a: &Args) -> Res<Option<u16>> {
    let Some(v) = a.named("status") else {
        return Ok(None);
    };
    if let Some(name) = v.unpack_str() {
        return faultbox_proxy::rules::grpc_code(name).map(Some).ok_or_else(|| {
            err(format!(
                "{}(): status={name:?} is not a gRPC code name (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...); HTTP statuses are numbers",
                a.builtin
            ))
        });
    }
    v.unpack_i32()
        .filter(|s| (0..=599).contains(s))
        .map(|s| Some(s as u16))
        .ok_or_else(|| {
            err(format!(
                "{}(): status must be an HTTP status 100..599 or a gRPC code (1..16 or a name such as \"UNAVAILABLE\"), got {}",
                a.builtin,
                v.to_repr()
            ))
        })
}

/// `fault(svc.iface, *rules, run=fn)` and friends: the protocol rules.
fn proxy_rules(a: &Args, from: usize) -> Res<Vec<ProxyRuleDef>> {
    // A list of rules (what a recipe such as grpc.retryable() returns)
    // counts as its rules in order.
    let mut values = Vec::new();
    for v in &a.pos[from..] {
        match ListRef::from_value(*v) {
            Some(list) => values.extend(list.iter()),
            None => values.push(*v),
        }
    }
    let rules: Vec<ProxyRuleDef> = values
        .iter()
        .map(|v| {
            ProxyRuleValue::from_value(*v).map(|r| r.def.clone()).ok_or_else(|| {
                err(format!(
                    "{}(): protocol rules are response(...), error(...), drop(...) or delay(delay=...), got {}",
                    a.builtin,
                    v.to_repr()
                ))
            })
        })
        .collect::<Res<_>>()?;
    if rules.is_empty() {
        return Err(err(format!(
            "{}(): no rules given, e.g. {}(svc.api, error(path=\"/orders\", status=503), ...)",
            a.builtin, a.builtin
        )));
    }
    Ok(rules)
}

/// Collects `**faults` keywords: each value must be a fault rule.
fn fault_kwargs(a: &Args, skip: &[&str]) -> Res<Vec<(String, FaultValue)>> {
    let mut out = Vec::new();
    for (k, v) in &a.named {
        if skip.contains(&k.as_str()) {
            continue;
        }
        let f = FaultValue::from_value(*v).ok_or_else(|| {
            err(format!(
                "{}(): {k}= must be a syscall rule such as deny(\"EIO\"), delay(\"200ms\") or allow(), got {}",
                a.builtin,
                v.to_repr()
            ))
        })?;
        out.push((k.clone(), f.clone()));
    }
    if out.is_empty() {
        return Err(err(format!(
            "{}(): no faults given; name a syscall, family or op, e.g. {}(svc, write=deny(\"EIO\"), ...)",
            a.builtin, a.builtin
        )));
    }
    Ok(out)
}

/// Runs `f` with a window open, closing it whatever `f` does.
fn with_windows<'v>(
    eval: &mut Evaluator<'v, '_, '_>,
    run: &dyn TestHost,
    ids: Vec<u64>,
    f: Value<'v>,
) -> Res<Value<'v>> {
    let result = eval.eval_function(f, &[], &[]);
    let mut close_error = None;
    for id in ids.into_iter().rev() {
        if let Err(e) = run.close_window(id) {
            close_error.get_or_insert(e);
        }
    }
    let value = result?;
    match close_error {
        Some(e) => Err(err(e)),
        None => Ok(value),
    }
}

fn open_windows(
    run: &dyn TestHost,
    services: &[String],
    faults: &[(String, FaultValue)],
    trace: bool,
    from_start: bool,
) -> Res<Vec<u64>> {
    let mut ids = Vec::new();
    for s in services {
        match run.open_window(s, faults.to_vec(), trace, from_start) {
            Ok(id) => ids.push(id),
            Err(e) => {
                for id in ids.into_iter().rev() {
                    let _ = run.close_window(id);
                }
                return Err(err(e));
            }
        }
    }
    Ok(ids)
}

/// `fault_stop(svc)` / `trace_stop(svc)`: closes the latest window that
/// `fault_start` / `trace_start` opened on the service.
fn stop_window(a: Args, eval: &Evaluator, trace: bool) -> Res<NoneType> {
    a.check(1, &["service"])?;
    let service = service_name(a.required(0, "service")?, a.builtin)?;
    let run = run_of(eval, a.builtin)?;
    let opener = if trace { "trace_start" } else { "fault_start" };
    let id = run.latest_started_window(&service, trace).ok_or_else(|| {
        err(format!(
            "{}({service}): no {opener} window is open on {service:?}",
            a.builtin
        ))
    })?;
    run.close_window(id).map_err(err)?;
    Ok(NoneType)
}

fn trace_faults(a: &Args) -> Res<Vec<(String, FaultValue)>> {
    let syscalls = match a.named("syscalls") {
        Some(v) => a.strings(v, "syscalls")?,
        None => return Err(err(format!("{}(): missing syscalls=[...]", a.builtin))),
    };
    Ok(syscalls
        .into_iter()
        .map(|s| {
            (
                s,
                FaultValue {
                    action: Action::Trace,
                    probability: 1.0,
                    label: None,
                    trigger: Trigger::Always,
                    errno: None,
                },
            )
        })
        .collect())
}

fn filter_from(a: &Args, skip: &[&str]) -> Res<Filter> {
    let mut conditions = Vec::new();
    for (k, v) in &a.named {
        if skip.contains(&k.as_str()) {
            continue;
        }
        let text = match v.unpack_str() {
            Some(s) => s.to_string(),
            None => v.to_str(),
        };
        conditions.push((k.clone(), text));
    }
    Ok(Filter { conditions })
}

fn dict_filter<'v>(a: &Args<'v>, v: Value<'v>, key: &str) -> Res<Filter> {
    let d = DictRef::from_value(v)
        .ok_or_else(|| err(format!("{}(): {key} must be a dict of filters", a.builtin)))?;
    let mut conditions = Vec::new();
    for (k, v) in d.iter() {
        let k = a.string(k, key)?;
        let text = v
            .unpack_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_str());
        conditions.push((k, text));
    }
    Ok(Filter { conditions })
}

/// The events that satisfy `filter` and, when given, the `where` predicate.
fn matching<'v>(
    eval: &mut Evaluator<'v, '_, '_>,
    events: Vec<Event>,
    filter: &Filter,
    pred: Option<Value<'v>>,
) -> Res<Vec<Event>> {
    let mut out = Vec::new();
    for e in events {
        if !filter.matches(&e) {
            continue;
        }
        if let Some(p) = pred {
            let arg = eval.heap().alloc(EventValue { event: e.clone() });
            if !eval.eval_function(p, &[arg], &[])?.to_bool() {
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}

fn count_assertion(eval: &Evaluator) -> Option<Arc<dyn TestHost>> {
    let run = ctx(eval).ok()?.run.clone()?;
    run.count_assertion();
    Some(run)
}

fn assertion_failed(
    eval: &Evaluator,
    run: Option<&Arc<dyn TestHost>>,
    mut detail: AssertionDetail,
    message: String,
) -> starlark::Error {
    let (file, line) = call_site(eval);
    detail.file = file;
    detail.line = line;
    if let Some(run) = run {
        run.record_assertion(detail);
    }
    err(message)
}

fn text_of(v: Value) -> String {
    v.unpack_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_str())
}

fn describe_event(e: &Event) -> String {
    let mut parts = vec![format!("service={}", e.service), format!("type={}", e.kind)];
    for k in ["syscall", "decision", "path"] {
        if let Some(v) = e.fields.get(k) {
            parts.push(format!("{k}={v}"));
        }
    }
    parts.join(" ")
}

fn resolve_relative(eval: &Evaluator, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let (file, _) = call_site(eval);
    let dir = file
        .as_deref()
        .and_then(|f| Path::new(f).parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    dir.join(p)
}

const LOAD_FILE_MAX: u64 = 50 << 20;

fn read_spec_file(eval: &Evaluator, builtin: &str, path: &str) -> Res<String> {
    let full = resolve_relative(eval, path);
    let meta = std::fs::metadata(&full)
        .map_err(|e| err(format!("{builtin}({path:?}): {}: {e}", full.display())))?;
    if meta.len() > LOAD_FILE_MAX {
        return Err(err(format!(
            "{builtin}({path:?}): {} is {} bytes, over the 50 MiB limit",
            full.display(),
            meta.len()
        )));
    }
    std::fs::read_to_string(&full)
        .map_err(|e| err(format!("{builtin}({path:?}): {}: {e}", full.display())))
}

#[starlark_module]
pub(crate) fn topology(builder: &mut GlobalsBuilder) {
    /// `service(name, [binary], *interfaces, args=, env=, depends_on=,
    /// healthcheck=, ops=, user=)`: declares a service started from a
    /// local binary.
    fn service<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("service", args, kwargs)?;
        for (bad, why) in [
            (
                "image",
                "container mode (image=) needs a Docker engine and is not supported by this build; give the service a local binary",
            ),
            (
                "build",
                "container mode (build=) is not supported by this build; build the binary yourself and pass its path",
            ),
            (
                "cmd",
                "there is no cmd=; put the program in binary= and its arguments in args=[...]",
            ),
            (
                "entrypoint",
                "there is no entrypoint=; put the program in binary= and its arguments in args=[...]",
            ),
        ] {
            if a.named.iter().any(|(k, _)| k == bad) {
                return Err(err(format!("service(): {why}")));
            }
        }
        a.check(
            usize::MAX,
            &[
                "name",
                "binary",
                "args",
                "env",
                "depends_on",
                "healthcheck",
                "ops",
                "user",
                "remote",
            ],
        )?;
        let c = ctx(eval)?;
        if c.run.is_some() {
            return Err(err(
                "service() must be called at the top level of the spec, not inside a test",
            ));
        }
        let name = a.string(a.required(0, "name")?, "name")?;
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        {
            return Err(err(format!(
                "service(): name {name:?} must be non-empty letters, digits, '_' or '-'"
            )));
        }
        let mut binary = a
            .named("binary")
            .map(|v| a.string(v, "binary"))
            .transpose()?;
        let mut interfaces: Vec<InterfaceDef> = Vec::new();
        for (i, v) in a.pos.iter().enumerate().skip(1) {
            if let Some(s) = v.unpack_str() {
                if binary.is_some() {
                    return Err(err(format!(
                        "service({name:?}): the binary is given twice (positional {s:?} and another)"
                    )));
                }
                binary = Some(s.to_string());
            } else if let Some(iface) = InterfaceValue::from_value(*v) {
                if interfaces.iter().any(|x| x.name == iface.def.name) {
                    return Err(err(format!(
                        "service({name:?}): two interfaces are named {:?}",
                        iface.def.name
                    )));
                }
                interfaces.push(iface.def.clone());
            } else {
                return Err(err(format!(
                    "service({name:?}): positional argument {} must be the binary (a string) or an interface(...), got {}",
                    i + 1,
                    v.get_type()
                )));
            }
        }
        let remote = match a.named("remote") {
            Some(v) => remote_upstreams(&name, v, &interfaces)?,
            None => BTreeMap::new(),
        };
        if !remote.is_empty() {
            if binary.is_some() {
                return Err(err(format!(
                    "service({name:?}): a remote service runs nothing here; drop the binary, or drop remote="
                )));
            }
            for k in ["args", "env", "ops", "user"] {
                if a.named(k).is_some() {
                    return Err(err(format!(
                        "service({name:?}): {k}= needs a process Faultbox starts, and a remote service has none; fault it at the protocol level instead (fault({name}.<interface>, error(...), ...))"
                    )));
                }
            }
            if a.named("healthcheck").is_none() {
                return Err(err(format!(
                    "service({name:?}): a remote service needs healthcheck= (e.g. tcp(\"host:port\")), so a test never starts against an unreachable upstream"
                )));
            }
        }
        let binary = match (binary, remote.is_empty()) {
            (Some(b), _) => b,
            (None, false) => String::new(),
            (None, true) => {
                return Err(err(format!(
                    "service({name:?}): no binary; give the program to run, e.g. service({name:?}, \"./bin/{name}\", ...), or remote=\"host:port\" for a service that runs elsewhere"
                )));
            }
        };
        let args_list = match a.named("args") {
            Some(v) => a.strings(v, "args")?,
            None => Vec::new(),
        };
        let mut env = Vec::new();
        if let Some(v) = a.named("env") {
            let d = DictRef::from_value(v)
                .ok_or_else(|| err(format!("service({name:?}): env must be a dict of strings")))?;
            for (k, val) in d.iter() {
                let k = a.string(k, "env key")?;
                let text = if let Some(s) = val.unpack_str() {
                    s.to_string()
                } else if val.unpack_i32().is_some() || val.unpack_bool().is_some() {
                    val.to_str()
                } else {
                    return Err(err(format!(
                        "service({name:?}): env[{k:?}] must be a string, got {} ({})",
                        val.get_type(),
                        val.to_repr()
                    )));
                };
                env.push((k, text));
            }
        }
        let mut depends_on = Vec::new();
        if let Some(v) = a.named("depends_on") {
            let items = ListRef::from_value(v)
                .map(|l| l.content().to_vec())
                .ok_or_else(|| {
                    err(format!(
                        "service({name:?}): depends_on must be a list of services"
                    ))
                })?;
            for item in items {
                let dep = match (ServiceValue::from_value(item), item.unpack_str()) {
                    (Some(s), _) => s.def.name.clone(),
                    (None, Some(s)) => s.to_string(),
                    _ => {
                        return Err(err(format!(
                            "service({name:?}): depends_on items must be services, got {}",
                            item.get_type()
                        )));
                    }
                };
                depends_on.push(dep);
            }
        }
        let healthcheck = match a.named("healthcheck") {
            Some(v) => Some(
                HealthcheckValue::from_value(v)
                    .ok_or_else(|| {
                        err(format!(
                            "service({name:?}): healthcheck must be tcp(...), http(...) or ready(), got {}",
                            v.get_type()
                        ))
                    })?
                    .check
                    .clone(),
            ),
            None => None,
        };
        let mut ops = BTreeMap::new();
        if let Some(v) = a.named("ops") {
            let d = DictRef::from_value(v)
                .ok_or_else(|| err(format!("service({name:?}): ops must be a dict of op(...)")))?;
            for (k, val) in d.iter() {
                let k = a.string(k, "ops key")?;
                let op = OpValue::from_value(val).ok_or_else(|| {
                    err(format!(
                        "service({name:?}): ops[{k:?}] must be op(...), got {}",
                        val.get_type()
                    ))
                })?;
                ops.insert(k, op.def.clone());
            }
        }
        let user = a.named("user").map(|v| a.string(v, "user")).transpose()?;
        let (file, line) = call_site(eval);
        let def = ServiceDef {
            name: name.clone(),
            binary,
            args: args_list,
            env,
            interfaces,
            depends_on,
            healthcheck,
            ops,
            user,
            remote,
            declared_at: format!("{}:{}", file.unwrap_or_default(), line.unwrap_or(0)),
        };
        let mut services = c.services.borrow_mut();
        if let Some(other) = services.iter().find(|s| s.name == name) {
            return Err(err(format!(
                "service(): {name:?} is already declared at {}",
                other.declared_at
            )));
        }
        // Remote services' ports are on other machines: only local ones
        // can collide.
        let local = |d: &ServiceDef| !d.is_remote();
        for iface in def.interfaces.iter().filter(|_| local(&def)) {
            for other in services.iter().filter(|o| local(o)) {
                if let Some(o) = other.interfaces.iter().find(|o| o.port == iface.port) {
                    return Err(err(format!(
                        "service({name:?}): port {} of interface {:?} is already used by {}.{}",
                        iface.port, iface.name, other.name, o.name
                    )));
                }
            }
        }
        services.push(def.clone());
        Ok(eval.heap().alloc(ServiceValue { def }))
    }

    /// `interface(name, protocol, port)`.
    fn interface<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("interface", args, kwargs)?;
        a.check(3, &["name", "protocol", "port", "tls"])?;
        let name = a.string(a.required(0, "name")?, "name")?;
        let protocol = a.string(a.required(1, "protocol")?, "protocol")?;
        if faultbox_proxy::protocol::get(&protocol).is_none() {
            let supported = faultbox_proxy::protocol::names().join(", ");
            return Err(err(if NOT_IN_THIS_BUILD.contains(&protocol.as_str()) {
                format!(
                    "interface({name:?}): protocol {protocol:?} is not supported by this build (supported: {supported}); declare it \"tcp\" to proxy its bytes with connection-level faults"
                )
            } else {
                let hint = errno::closest(&protocol, faultbox_proxy::protocol::names().into_iter())
                    .map(|c| format!(" (did you mean {c}?)"))
                    .unwrap_or_default();
                format!(
                    "interface({name:?}): unknown protocol {protocol:?}{hint}; supported: {supported}"
                )
            }));
        }
        let port_v = a.required(2, "port")?;
        let port = port_v
            .unpack_i32()
            .filter(|p| (1..=65535).contains(p))
            .ok_or_else(|| {
                err(format!(
                    "interface({name:?}): port must be an integer 1..65535, got {}",
                    port_v.to_repr()
                ))
            })?;
        let tls = match a.named("tls") {
            None => None,
            Some(v) if v.unpack_bool() == Some(false) => None,
            Some(v) if v.unpack_bool() == Some(true) => Some(TlsSpec::default()),
            Some(v) => Some(
                TlsValue::from_value(v)
                    .ok_or_else(|| {
                        err(format!(
                            "interface({name:?}): tls= must be tls_cert(...) or True, got {}",
                            v.get_type()
                        ))
                    })?
                    .spec
                    .clone(),
            ),
        };
        if tls.is_some() && !faultbox_proxy::rules::proxied(&protocol) {
            return Err(err(format!(
                "interface({name:?}): tls= needs a proxy, and {protocol} interfaces have none in this build (http, grpc, tcp, redis, postgres and mysql do)"
            )));
        }
        Ok(eval.heap().alloc(InterfaceValue {
            def: InterfaceDef {
                name,
                protocol,
                port: port as u16,
                tls,
            },
        }))
    }

    /// `tcp(addr, timeout="10s")`: ready when a TCP connect succeeds.
    fn tcp<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("tcp", args, kwargs)?;
        a.check(1, &["addr", "timeout"])?;
        let addr = a.string(a.required(0, "addr")?, "addr")?;
        let addr = addr.strip_prefix("tcp://").unwrap_or(&addr).to_string();
        if !addr.contains(':') {
            return Err(err(format!(
                "tcp({addr:?}): the address needs a port, like \"localhost:5432\""
            )));
        }
        let timeout = a.duration_or("timeout", Duration::from_secs(10))?;
        Ok(eval.heap().alloc(HealthcheckValue {
            check: Healthcheck::Tcp { addr, timeout },
        }))
    }

    /// `http(url, timeout="10s", expect_status=None)`: ready when `GET url`
    /// answers `expect_status` (any 2xx/3xx when not given).
    fn http<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("http", args, kwargs)?;
        a.check(1, &["url", "timeout", "expect_status"])?;
        let url = a.string(a.required(0, "url")?, "url")?;
        let url = if url.contains("://") {
            url
        } else {
            format!("http://{url}")
        };
        steps::split_url(&url).map_err(|e| err(format!("http(): {e}")))?;
        let timeout = a.duration_or("timeout", Duration::from_secs(10))?;
        let expect_status = match a.named("expect_status") {
            Some(v) => Some(
                v.unpack_i32()
                    .filter(|s| (100..=599).contains(s))
                    .ok_or_else(|| {
                        err(format!(
                            "http(): expect_status must be an HTTP status 100..599, got {}",
                            v.to_repr()
                        ))
                    })? as u16,
            ),
            None => None,
        };
        Ok(eval.heap().alloc(HealthcheckValue {
            check: Healthcheck::Http {
                url,
                timeout,
                expect_status,
            },
        }))
    }

    /// `ready(timeout="30s")`: ready when the service answers its first
    /// interface's protocol (`SELECT 1` for postgres, `GET /` for http, a
    /// TCP connect otherwise).
    fn ready<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("ready", args, kwargs)?;
        a.check(0, &["timeout"])?;
        let timeout = a.duration_or("timeout", Duration::from_secs(30))?;
        Ok(eval.heap().alloc(HealthcheckValue {
            check: Healthcheck::Ready { timeout },
        }))
    }

    /// `op(syscalls=[...], path=None)`: a named operation for `ops=`.
    fn op<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("op", args, kwargs)?;
        a.check(0, &["syscalls", "path"])?;
        let syscalls = match a.named("syscalls") {
            Some(v) => a.strings(v, "syscalls")?,
            None => return Err(err("op(): missing syscalls=[...]")),
        };
        if syscalls.is_empty() {
            return Err(err("op(): syscalls=[] is empty; list at least one syscall"));
        }
        let arch = Arch::native();
        for s in &syscalls {
            for x in syscalls::expand_family(arch, s) {
                if arch.number(x).is_none() {
                    let hint = errno::closest(s, arch.all_names())
                        .map(|c| format!(" (did you mean {c}?)"))
                        .unwrap_or_default();
                    return Err(err(format!("op(): unknown syscall {s:?}{hint}")));
                }
            }
        }
        let path = a.named("path").map(|v| a.string(v, "path")).transpose()?;
        if let Some(p) = &path {
            faultbox_agent::glob::Glob::new(p)
                .map_err(|e| err(format!("op(): path {p:?}: {e}")))?;
        }
        Ok(eval.heap().alloc(OpValue {
            def: OpDef { syscalls, path },
        }))
    }

    /// `remotes({iface: "host[:port]"})`: per-interface upstreams for
    /// `service(remote=...)`.
    fn remotes<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("remotes", args, kwargs)?;
        a.check(1, &["mapping"])?;
        let m = a.required(0, "mapping")?;
        let d = DictRef::from_value(m)
            .ok_or_else(|| err("remotes(): takes a dict {interface: \"host[:port]\"}"))?;
        for (k, v) in d.iter() {
            if k.unpack_str().is_none() || v.unpack_str().is_none() {
                return Err(err(
                    "remotes(): keys are interface names and values \"host[:port]\" strings",
                ));
            }
        }
        Ok(m)
    }

    /// `tls_cert(proxy_cert=, proxy_key=, client_cert=, client_key=, ca=,
    /// insecure=False)`: TLS for `interface(..., tls=...)`. Paths are
    /// relative to the calling file; nothing given = a generated CA.
    fn tls_cert<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("tls_cert", args, kwargs)?;
        a.check(
            0,
            &[
                "proxy_cert",
                "proxy_key",
                "client_cert",
                "client_key",
                "ca",
                "insecure",
            ],
        )?;
        let path = |k: &str| -> Res<Option<std::path::PathBuf>> {
            a.named(k)
                .map(|v| a.string(v, k).map(|p| resolve_relative(eval, &p)))
                .transpose()
        };
        let spec = TlsSpec {
            proxy_cert: path("proxy_cert")?,
            proxy_key: path("proxy_key")?,
            client_cert: path("client_cert")?,
            client_key: path("client_key")?,
            ca: path("ca")?,
            insecure: a
                .named("insecure")
                .and_then(|v| v.unpack_bool())
                .unwrap_or(false),
        };
        spec.validate()
            .map_err(|e| err(format!("tls_cert(): {e}")))?;
        Ok(eval.heap().alloc(TlsValue { spec }))
    }

    /// `free_port()`: a TCP port nothing listens on right now, for specs
    /// that must not collide with whatever else runs on the machine.
    fn free_port() -> anyhow::Result<i32> {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        Ok(i32::from(l.local_addr()?.port()))
    }
}

#[starlark_module]
pub(crate) fn faults(builder: &mut GlobalsBuilder) {
    /// `deny(errno, probability="100%", label=, trigger=)`: fail the call.
    fn deny<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("deny", args, kwargs)?;
        a.check(1, &["errno", "probability", "label", "trigger"])?;
        let name = a.string(a.required(0, "errno")?, "errno")?;
        let e = errno::lookup(&name).ok_or_else(|| {
            let hint = errno::closest(
                &name.to_ascii_uppercase(),
                errno::ERRNOS.iter().map(|e| e.name),
            )
            .map(|c| format!(" (did you mean {c}?)"))
            .unwrap_or_default();
            err(format!("deny(): unknown errno {name:?}{hint}"))
        })?;
        let f = fault_common(
            &a,
            Action::Deny { errno: e.number },
            Some(e.name.to_string()),
        )?;
        Ok(eval.heap().alloc(f))
    }

    /// `delay(duration, probability="100%", label=, trigger=)`: hold the
    /// call, then let it run.
    fn delay<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("delay", args, kwargs)?;
        if a.pos.is_empty() && a.named("duration").is_none() {
            // Without a duration it is the protocol form: delay(delay="500ms", path=...).
            let Some(d) = a.named("delay") else {
                return Err(err(
                    "delay(): needs a duration: delay(\"500ms\") for a syscall, delay(delay=\"500ms\", path=...) for a protocol",
                ));
            };
            let d = a.duration(d, "delay")?;
            let r = proxy_rule(
                &a,
                ProxyAction::Delay {
                    ns: d.as_nanos() as u64,
                },
                &["delay"],
            )?;
            return Ok(eval.heap().alloc(r));
        }
        a.check(1, &["duration", "probability", "label", "trigger"])?;
        let d = a.duration(a.required(0, "duration")?, "duration")?;
        let f = fault_common(
            &a,
            Action::Delay {
                ns: d.as_nanos() as u64,
            },
            None,
        )?;
        Ok(eval.heap().alloc(f))
    }

    /// `response(status=200, body="", method=, path=, ...)`: answer for
    /// the upstream.
    fn response<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("response", args, kwargs)?;
        let status = status_arg(&a)?;
        // `value=` reads better for caches (memcached's item, a Redis
        // bulk string); it is the same answer as `body=`.
        if a.named("body").is_some() && a.named("value").is_some() {
            return Err(err("response(): give body= or value=, not both"));
        }
        let body = a
            .named("body")
            .or_else(|| a.named("value"))
            .map(|v| a.string(v, "body"))
            .transpose()?
            .unwrap_or_default();
        let r = proxy_rule(
            &a,
            ProxyAction::Respond { status, body },
            &["status", "body", "value"],
        )?;
        Ok(eval.heap().alloc(r))
    }

    /// `error(status=500, message="injected fault", method=, path=, ...)`:
    /// answer with an error.
    fn error<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("error", args, kwargs)?;
        let status = status_arg(&a)?;
        let message = a
            .named("message")
            .map(|v| a.string(v, "message"))
            .transpose()?
            .unwrap_or_else(|| "injected fault".into());
        let code = a.named("code").map(|v| a.string(v, "code")).transpose()?;
        if let Some(c) = &code
            && (c.len() != 5 || !c.chars().all(|ch| ch.is_ascii_alphanumeric()))
        {
            return Err(err(format!(
                "error(): code={c:?} is not a SQLSTATE (five letters or digits, e.g. 53100)"
            )));
        }
        let number = match a.named("number") {
            None => None,
            Some(v) => Some(
                v.unpack_i32()
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| {
                        err(format!(
                            "error(): number= must be a MySQL error number (1..65535), got {}",
                            v.to_repr()
                        ))
                    })?,
            ),
        };
        let r = proxy_rule(
            &a,
            ProxyAction::Error {
                status,
                message,
                code,
                number,
            },
            &["status", "message", "code", "number"],
        )?;
        Ok(eval.heap().alloc(r))
    }

    /// `duplicate(method=, path=, command=, key=, ...)`: the upstream gets
    /// the request twice (http, redis); the client sees one answer.
    fn duplicate<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("duplicate", args, kwargs)?;
        let r = proxy_rule(&a, ProxyAction::Duplicate, &[])?;
        Ok(eval.heap().alloc(r))
    }

    /// `drop(reset=None, method=, path=, ...)`: end the connection without
    /// an answer, with a reset or a close (see `ProxyAction::Drop`).
    fn drop<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("drop", args, kwargs)?;
        let reset = match a.named("reset") {
            None => None,
            Some(v) => Some(v.unpack_bool().ok_or_else(|| {
                err(format!(
                    "drop(): reset= is True (end with a TCP reset) or False (an orderly close), got {}",
                    v.to_repr()
                ))
            })?),
        };
        let r = proxy_rule(&a, ProxyAction::Drop { reset }, &["reset"])?;
        Ok(eval.heap().alloc(r))
    }

    /// `allow()`: intercept and let the call run (recorded in the trace).
    fn allow<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("allow", args, kwargs)?;
        a.check(0, &["label"])?;
        let f = fault_common(&a, Action::Allow, None)?;
        Ok(eval.heap().alloc(f))
    }

    /// `fault(service, run=fn, **{syscall_or_op: rule})`: applies the
    /// rules while `run` executes and returns what it returns.
    fn fault<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("fault", args, kwargs)?;
        if let Some(iface) = InterfaceRef::from_value(a.required(0, "service")?) {
            a.check(usize::MAX, &["run"])?;
            let f = a.callable(
                a.named("run")
                    .ok_or_else(|| err("fault(): missing run=fn"))?,
                "run",
            )?;
            let rules = proxy_rules(&a, 1)?;
            let run = run_of(eval, "fault")?;
            let id = run
                .open_proxy_window(&iface.service, &iface.iface.name, rules, false)
                .map_err(err)?;
            let result = eval.eval_function(f, &[], &[]);
            run.close_proxy_window(id);
            return result;
        }
        let service = service_name(a.required(0, "service")?, "fault")?;
        if a.pos.len() > 1 {
            return Err(err(
                "fault(): rules are keywords (write=deny(\"EIO\")); positional rules are for protocol faults, which this build does not support",
            ));
        }
        let f = a.callable(
            a.named("run").ok_or_else(|| {
                err("fault(): missing run=fn (use fault_start/fault_stop for an open window)")
            })?,
            "run",
        )?;
        let faults = fault_kwargs(&a, &["run", "service"])?;
        let run = run_of(eval, "fault")?;
        let ids = open_windows(&*run, &[service], &faults, false, false)?;
        with_windows(eval, &*run, ids, f)
    }

    /// `fault_start(service, **faults)`: opens a window until `fault_stop`.
    fn fault_start<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("fault_start", args, kwargs)?;
        if let Some(iface) = InterfaceRef::from_value(a.required(0, "service")?) {
            a.check(usize::MAX, &[])?;
            let rules = proxy_rules(&a, 1)?;
            let run = run_of(eval, "fault_start")?;
            run.open_proxy_window(&iface.service, &iface.iface.name, rules, true)
                .map_err(err)?;
            return Ok(NoneType);
        }
        let service = service_name(a.required(0, "service")?, "fault_start")?;
        if a.named.iter().any(|(k, _)| k == "run") {
            return Err(err(
                "fault_start(): takes no run=; use fault(svc, run=fn, ...) for a scoped window",
            ));
        }
        let faults = fault_kwargs(&a, &["service"])?;
        let run = run_of(eval, "fault_start")?;
        open_windows(&*run, &[service], &faults, false, true)?;
        Ok(NoneType)
    }

    /// `fault_stop(service)`: closes the latest `fault_start` window.
    fn fault_stop<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("fault_stop", args, kwargs)?;
        if let Some(iface) = a.pos.first().and_then(|v| InterfaceRef::from_value(*v)) {
            a.check(1, &["service"])?;
            let run = run_of(eval, "fault_stop")?;
            let id = run
                .latest_started_proxy_window(&iface.service, &iface.iface.name)
                .ok_or_else(|| {
                    err(format!(
                        "fault_stop({}.{}): no fault_start window is open on it",
                        iface.service, iface.iface.name
                    ))
                })?;
            run.close_proxy_window(id);
            return Ok(NoneType);
        }
        stop_window(a, eval, false)
    }

    /// `fault_all([svc, ...], run=fn, **faults)`: the same rules on every
    /// listed service.
    fn fault_all<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("fault_all", args, kwargs)?;
        let list = a.required(0, "services")?;
        let items = ListRef::from_value(list)
            .map(|l| l.content().to_vec())
            .ok_or_else(|| err("fault_all(): the first argument must be a list of services"))?;
        let services = items
            .into_iter()
            .map(|v| service_name(v, "fault_all"))
            .collect::<Res<Vec<_>>>()?;
        let f = a.callable(
            a.named("run")
                .ok_or_else(|| err("fault_all(): missing run=fn"))?,
            "run",
        )?;
        let faults = fault_kwargs(&a, &["run", "services"])?;
        let run = run_of(eval, "fault_all")?;
        let ids = open_windows(&*run, &services, &faults, false, false)?;
        with_windows(eval, &*run, ids, f)
    }

    /// `trace(service, syscalls=[...], run=fn)`: records the syscalls
    /// (they are intercepted and allowed) while `run` executes.
    fn trace<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("trace", args, kwargs)?;
        a.check(1, &["service", "syscalls", "run"])?;
        let service = service_name(a.required(0, "service")?, "trace")?;
        let f = a.callable(
            a.named("run")
                .ok_or_else(|| err("trace(): missing run=fn"))?,
            "run",
        )?;
        let faults = trace_faults(&a)?;
        let run = run_of(eval, "trace")?;
        let ids = open_windows(&*run, &[service], &faults, true, false)?;
        with_windows(eval, &*run, ids, f)
    }

    /// `trace_start(service, syscalls=[...])`.
    fn trace_start<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("trace_start", args, kwargs)?;
        a.check(1, &["service", "syscalls"])?;
        let service = service_name(a.required(0, "service")?, "trace_start")?;
        let faults = trace_faults(&a)?;
        let run = run_of(eval, "trace_start")?;
        open_windows(&*run, &[service], &faults, true, true)?;
        Ok(NoneType)
    }

    /// `trace_stop(service)`.
    fn trace_stop<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        stop_window(Args::new("trace_stop", args, kwargs)?, eval, true)
    }
}

#[starlark_module]
pub(crate) fn assertions(builder: &mut GlobalsBuilder) {
    /// `assert_true(cond, message=None)`.
    fn assert_true<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("assert_true", args, kwargs)?;
        a.check(2, &["cond", "message", "msg"])?;
        let cond = a.required(0, "cond")?;
        let message = a.arg(1, "message")?.or_else(|| a.named("msg")).map(text_of);
        let run = count_assertion(eval);
        if cond.to_bool() {
            return Ok(NoneType);
        }
        let text = match &message {
            Some(m) => format!("assert_true: {m}"),
            None => format!("assert_true: {} is not true", cond.to_repr()),
        };
        Err(assertion_failed(
            eval,
            run.as_ref(),
            AssertionDetail {
                func: "assert_true".into(),
                expected: Some("True".into()),
                actual: Some(cond.to_repr()),
                message,
                ..Default::default()
            },
            text,
        ))
    }

    /// `assert_eq(actual, expected, message=None)`.
    fn assert_eq<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("assert_eq", args, kwargs)?;
        a.check(3, &["actual", "expected", "message", "msg"])?;
        let actual = a.required(0, "actual")?;
        let expected = a.required(1, "expected")?;
        let message = a.arg(2, "message")?.or_else(|| a.named("msg")).map(text_of);
        let run = count_assertion(eval);
        if actual.equals(expected)? {
            return Ok(NoneType);
        }
        let mut text = format!(
            "assert_eq failed: {} != {}",
            actual.to_repr(),
            expected.to_repr()
        );
        if let Some(m) = &message {
            text.push_str(&format!(" ({m})"));
        }
        Err(assertion_failed(
            eval,
            run.as_ref(),
            AssertionDetail {
                func: "assert_eq".into(),
                expected: Some(expected.to_repr()),
                actual: Some(actual.to_repr()),
                message,
                ..Default::default()
            },
            text,
        ))
    }

    /// `assert_eventually(where=fn, timeout="0s", **filters)`: some event
    /// matches (waiting up to `timeout` for it).
    fn assert_eventually<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("assert_eventually", args, kwargs)?;
        if !a.pos.is_empty() {
            return Err(err("assert_eventually(): takes keyword filters only"));
        }
        let filter = filter_from(&a, &["where", "timeout", "message"])?;
        let pred = a
            .named("where")
            .map(|v| a.callable(v, "where"))
            .transpose()?;
        let timeout = a.duration_or("timeout", Duration::ZERO)?;
        let run = run_of(eval, "assert_eventually")?;
        run.count_assertion();
        let deadline = Instant::now() + timeout;
        loop {
            let found = matching(eval, run.events(), &filter, pred)?;
            if let Some(e) = found.first() {
                if e.kind == "service_exited" {
                    run.acknowledge_exit(&e.service);
                }
                return Ok(NoneType);
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let what = if pred.is_some() {
            format!("where=<fn>, {}", filter.describe())
        } else {
            filter.describe()
        };
        Err(assertion_failed(
            eval,
            Some(&run),
            AssertionDetail {
                func: "assert_eventually".into(),
                expected: Some(what.clone()),
                message: a.named("message").map(|v| v.to_str()),
                ..Default::default()
            },
            format!("assert_eventually: no matching event found (filters: {what})"),
        ))
    }

    /// `assert_never(where=fn, **filters)`: no event matches.
    fn assert_never<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("assert_never", args, kwargs)?;
        if !a.pos.is_empty() {
            return Err(err("assert_never(): takes keyword filters only"));
        }
        let filter = filter_from(&a, &["where", "message"])?;
        let pred = a
            .named("where")
            .map(|v| a.callable(v, "where"))
            .transpose()?;
        let run = run_of(eval, "assert_never")?;
        run.count_assertion();
        let found = matching(eval, run.events(), &filter, pred)?;
        match found.first() {
            None => Ok(NoneType),
            Some(e) => Err(assertion_failed(
                eval,
                Some(&run),
                AssertionDetail {
                    func: "assert_never".into(),
                    actual: Some(describe_event(e)),
                    message: a.named("message").map(|v| v.to_str()),
                    ..Default::default()
                },
                format!(
                    "assert_never: found matching event #{} ({})",
                    e.seq,
                    describe_event(e)
                ),
            )),
        }
    }

    /// `assert_before(first={...}, then={...})`: the first event matching
    /// `first` comes before the first matching `then`.
    fn assert_before<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("assert_before", args, kwargs)?;
        a.check(0, &["first", "then", "message"])?;
        let first = dict_filter(
            &a,
            a.named("first")
                .ok_or_else(|| err("assert_before(): missing first={...}"))?,
            "first",
        )?;
        let then = dict_filter(
            &a,
            a.named("then")
                .ok_or_else(|| err("assert_before(): missing then={...}"))?,
            "then",
        )?;
        let run = run_of(eval, "assert_before")?;
        run.count_assertion();
        let events = run.events();
        let f = events.iter().find(|e| first.matches(e)).map(|e| e.seq);
        let t = events.iter().find(|e| then.matches(e)).map(|e| e.seq);
        let problem = match (f, t) {
            (Some(f), Some(t)) if f < t => return Ok(NoneType),
            (Some(f), Some(t)) => format!(
                "the first event ({}) is #{f}, after the then event #{t}",
                first.describe()
            ),
            (None, _) => format!("no event matches first ({})", first.describe()),
            (_, None) => format!("no event matches then ({})", then.describe()),
        };
        Err(assertion_failed(
            eval,
            Some(&run),
            AssertionDetail {
                func: "assert_before".into(),
                expected: Some(format!("{} before {}", first.describe(), then.describe())),
                message: a.named("message").map(|v| v.to_str()),
                ..Default::default()
            },
            format!("assert_before: {problem}"),
        ))
    }

    /// `events(where=fn, **filters)`: the matching events, oldest first.
    fn events<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("events", args, kwargs)?;
        if !a.pos.is_empty() {
            return Err(err("events(): takes keyword filters only"));
        }
        let filter = filter_from(&a, &["where"])?;
        let pred = a
            .named("where")
            .map(|v| a.callable(v, "where"))
            .transpose()?;
        let run = run_of(eval, "events")?;
        let found = matching(eval, run.events(), &filter, pred)?;
        let heap = eval.heap();
        Ok(heap.alloc(
            found
                .into_iter()
                .map(|e| heap.alloc(EventValue { event: e }))
                .collect::<Vec<_>>(),
        ))
    }
}

fn path_arg<'v>(
    builtin: &'static str,
    args: UnpackTuple<Value<'v>>,
    kwargs: DictRef<'v>,
) -> Res<String> {
    let a = Args::new(builtin, args, kwargs)?;
    a.check(1, &["path"])?;
    a.string(a.required(0, "path")?, "path")
}

#[starlark_module]
pub(crate) fn files(builder: &mut GlobalsBuilder) {
    /// `load_file(path)`: a file's text, relative to the calling spec.
    fn load_file<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let path = path_arg("load_file", args, kwargs)?;
        let text = read_spec_file(eval, "load_file", &path)?;
        Ok(eval.heap().alloc(text))
    }

    /// `load_json(path)`: a JSON file, decoded.
    fn load_json<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let path = path_arg("load_json", args, kwargs)?;
        let text = read_spec_file(eval, "load_json", &path)?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("load_json({path:?}): {e}")))?;
        Ok(json_to_value(&json, eval.heap()))
    }

    /// `load_yaml(path)`: a YAML file, decoded.
    fn load_yaml<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let path = path_arg("load_yaml", args, kwargs)?;
        let text = read_spec_file(eval, "load_yaml", &path)?;
        let json: serde_json::Value =
            serde_saphyr::from_str(&text).map_err(|e| err(format!("load_yaml({path:?}): {e}")))?;
        Ok(json_to_value(&json, eval.heap()))
    }
}

/// Builtins of the Faultbox language this build does not have: calling one
/// says so, instead of Starlark's bare "variable not found".
fn unsupported(name: &str, what: &str) -> starlark::Error {
    err(format!(
        "{name}() is not supported by this build of faultbox ({what} are not implemented yet)"
    ))
}

#[starlark_module]
pub(crate) fn not_in_this_build(builder: &mut GlobalsBuilder) {
    fn scenario<'v>(
        #[starlark(args)] _args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] _kwargs: DictRef<'v>,
    ) -> starlark::Result<NoneType> {
        Err(unsupported("scenario", "scenarios and faultbox generate"))
    }

    fn fault_scenario<'v>(
        #[starlark(args)] _args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] _kwargs: DictRef<'v>,
    ) -> starlark::Result<NoneType> {
        Err(unsupported("fault_scenario", "fault scenarios"))
    }

    fn fault_matrix<'v>(
        #[starlark(args)] _args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] _kwargs: DictRef<'v>,
    ) -> starlark::Result<NoneType> {
        Err(unsupported("fault_matrix", "fault matrices"))
    }

    fn fault_assumption<'v>(
        #[starlark(args)] _args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] _kwargs: DictRef<'v>,
    ) -> starlark::Result<NoneType> {
        Err(unsupported("fault_assumption", "fault assumptions"))
    }

    fn monitor<'v>(
        #[starlark(args)] _args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] _kwargs: DictRef<'v>,
    ) -> starlark::Result<NoneType> {
        Err(unsupported("monitor", "monitors"))
    }

    fn parallel<'v>(
        #[starlark(args)] _args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] _kwargs: DictRef<'v>,
    ) -> starlark::Result<NoneType> {
        Err(unsupported(
            "parallel",
            "parallel() and interleaving exploration",
        ))
    }

    fn partition<'v>(
        #[starlark(args)] _args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] _kwargs: DictRef<'v>,
    ) -> starlark::Result<NoneType> {
        Err(unsupported("partition", "network partitions"))
    }

    fn mock_service<'v>(
        #[starlark(args)] _args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] _kwargs: DictRef<'v>,
    ) -> starlark::Result<NoneType> {
        Err(unsupported("mock_service", "mock services"))
    }
}

/// Runs one step: `svc.iface.post(path=..., body=...)` and friends.
pub(crate) fn call_step<'v>(
    step: &StepMethod,
    args: &Arguments<'v, '_>,
    eval: &mut Evaluator<'v, '_, '_>,
) -> starlark::Result<Value<'v>> {
    let protocol = step.iface.protocol.as_str();
    let builtin = faultbox_proxy::protocol::get(protocol).map_or("step", |p| p.step_label());
    let def = steps::step_def(protocol, &step.method).ok_or_else(|| {
        err(format!(
            "{}.{}: {protocol} interfaces have no step {:?}",
            step.service, step.iface.name, step.method
        ))
    })?;
    let a = Args::from_arguments(builtin, args, eval)?;
    let names: Vec<&str> = def.params.iter().map(|p| p.name).collect();
    a.check(if def.rest.is_some() { usize::MAX } else { 1 }, &names)?;
    let mut checked = BTreeMap::new();
    if let Some(rest) = def.rest {
        let items = a
            .pos
            .iter()
            .map(|v| Ok(text_of(*v)))
            .collect::<Res<Vec<String>>>()?;
        checked.insert(rest.to_string(), StepArg::List(items));
    }
    for (i, p) in def.params.iter().enumerate() {
        let given = if i == 0 && def.rest.is_none() {
            a.arg(0, p.name)?
        } else {
            a.named(p.name)
        };
        let Some(v) = given else {
            if p.required {
                return Err(err(format!(
                    "{builtin}(): missing required argument {}",
                    p.name
                )));
            }
            continue;
        };
        let value = match p.kind {
            Kind::Str => StepArg::Str(a.string(v, p.name)?),
            Kind::Int => StepArg::Int(v.unpack_i32().map(i64::from).ok_or_else(|| {
                err(format!(
                    "{builtin}(): {} must be an int, got {} ({})",
                    p.name,
                    v.get_type(),
                    v.to_repr()
                ))
            })?),
            Kind::Duration => StepArg::Duration(a.duration(v, p.name)?),
            Kind::Headers => {
                let d = DictRef::from_value(v).ok_or_else(|| {
                    err(format!("{builtin}: {} must be a dict of strings", p.name))
                })?;
                let mut pairs = Vec::new();
                for (k, v) in d.iter() {
                    pairs.push((a.string(k, p.name)?, a.string(v, p.name)?));
                }
                StepArg::Headers(pairs)
            }
        };
        checked.insert(p.name.to_string(), value);
    }
    let call = StepCall {
        service: step.service.clone(),
        interface: step.iface.name.clone(),
        protocol: protocol.to_string(),
        port: step.iface.port,
        method: step.method.clone(),
        args: checked,
    };
    steps::check_call(&call).map_err(err)?;
    let run = run_of(
        eval,
        &format!("{}.{}.{}", step.service, step.iface.name, step.method),
    )?;
    match run.step(&call) {
        StepResult::Reply(r) => Ok(eval.heap().alloc(ResponseValue {
            status: r.status,
            body: r.body,
            headers: r.headers,
            ok: r.ok,
            error: r.error,
            duration_ms: r.duration_ms,
            data: r.data,
        })),
        StepResult::Text(line) => Ok(eval.heap().alloc(line)),
        StepResult::Raise(message) => Err(err(message)),
    }
}
