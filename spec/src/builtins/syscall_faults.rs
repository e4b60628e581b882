//! Syscall faults and their windows: `deny`, `delay`, `allow`, `fault`,
//! `fault_start`, `fault_stop`, `fault_all`, `trace`, `trace_start`,
//! `trace_stop` (the window builtins also take an interface, for
//! protocol faults).

use super::protocol_faults::{proxy_rule, proxy_rules};
#[allow(unused_imports)]
use super::*;

/// `probability=`: `"30%"` or `0.3` (the agent's one reading); a bare
/// number above 1 is refused with the percentage to write instead.
pub(super) fn parse_probability(builtin: &str, v: Value) -> Res<f64> {
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

pub(super) fn parse_trigger(builtin: &str, text: &str) -> Res<Trigger> {
    let bad = || {
        err(format!(
            "{builtin}(): trigger={text:?} is not valid; use \"nth=N\" (only the Nth call, N ≥ 1) or \"after=N\" (every call after the first N)"
        ))
    };
    // The `--fault` grammar's own parser: exactly nth=N or after=N.
    rule::parse_trigger(text).map_err(|_| bad())
}

pub(super) fn fault_common(a: &Args, action: Action, errno: Option<String>) -> Res<FaultValue> {
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

/// Collects `**faults` keywords: each value must be a fault rule.
pub(super) fn fault_kwargs(a: &Args, skip: &[&str]) -> Res<Vec<(String, FaultValue)>> {
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
pub(super) fn with_windows<'v>(
    eval: &mut Evaluator<'v, '_, '_>,
    run: &dyn TestHost,
    ids: Vec<u64>,
    f: Value<'v>,
) -> Res<Value<'v>> {
    let result = eval.eval_function(f, &[], &[]);
    super::concurrency::settle_branch(eval);
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

pub(super) fn open_windows(
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
pub(super) fn stop_window(a: Args, eval: &Evaluator, trace: bool) -> Res<NoneType> {
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

pub(super) fn trace_faults(a: &Args) -> Res<Vec<(String, FaultValue)>> {
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

#[starlark_module]
pub(crate) fn syscall_faults(builder: &mut GlobalsBuilder) {
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
            let d = a.delay(d, "delay")?;
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
        let d = a.delay(a.required(0, "duration")?, "duration")?;
        let f = fault_common(
            &a,
            Action::Delay {
                ns: d.as_nanos() as u64,
            },
            None,
        )?;
        Ok(eval.heap().alloc(f))
    }

    /// `hold(tag=, trigger=)`: park the call until `release(tag)` (or
    /// the window's end, the test's end, or losing the runner, which let
    /// it run).
    fn hold<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("hold", args, kwargs)?;
        a.check(0, &["tag", "trigger"])?;
        let tag = a
            .named("tag")
            .map(|v| a.string(v, "tag"))
            .transpose()?
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                err("hold(): give tag=\"name\", the name release() answers the held calls by")
            })?;
        let mut f = fault_common(&a, Action::Hold, None)?;
        f.label = Some(tag);
        Ok(eval.heap().alloc(f))
    }

    /// `release(tag, decision=allow(), count=None, timeout="5s")`: answers
    /// the calls held under `tag` (waiting up to `timeout` for a first
    /// one), letting them run or failing them as `decision` says; returns
    /// how many.
    fn release<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("release", args, kwargs)?;
        a.check(1, &["tag", "decision", "count", "timeout"])?;
        let tag = a.string(a.required(0, "tag")?, "tag")?;
        let deny = match a.named("decision") {
            None => None,
            Some(v) => match FaultValue::from_value(v).map(|f| f.action) {
                Some(Action::Allow) => None,
                Some(Action::Deny { errno }) => Some(errno),
                _ => {
                    return Err(err(format!(
                        "release({tag:?}): decision= is allow() or deny(\"ERRNO\"), got {}",
                        v.to_repr()
                    )));
                }
            },
        };
        let limit = match a.named("count") {
            None => None,
            Some(v) => match v.unpack_i32() {
                Some(n) if n > 0 => Some(n as u64),
                _ => {
                    return Err(err(format!(
                        "release({tag:?}): count= is a positive number of calls, got {}",
                        v.to_repr()
                    )));
                }
            },
        };
        let timeout = a.duration_or("timeout", Duration::from_secs(5))?;
        let run = run_of(eval, "release")?;
        let deferred = {
            let (run, tag) = (Arc::clone(&run), tag.clone());
            super::concurrency::defer(eval, format!("release({tag:?})"), move || {
                super::concurrency::Outcome::Released(
                    run.release(&tag, deny, limit, timeout)
                        .map_err(|e| e.to_string()),
                )
            })
        };
        if let Some(pending) = deferred {
            return Ok(pending);
        }
        let n = run.release(&tag, deny, limit, timeout).map_err(err)?;
        Ok(eval.heap().alloc(n as i64))
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
            super::concurrency::settle_branch(eval);
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

    /// `partition(a, b, run=fn)`: while `fn` runs, `a` and `b` cannot
    /// reach each other (their connects either way are refused, directly
    /// or through proxies); every other path stays. Returns what `fn`
    /// returned.
    fn partition<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("partition", args, kwargs)?;
        a.check(2, &["a", "b", "run"])?;
        let (x, y) = partition_sides(&a, "partition")?;
        let f = a.callable(
            a.named("run").ok_or_else(|| {
                err("partition(): missing run=fn (use partition_start/partition_stop for an open split)")
            })?,
            "run",
        )?;
        let run = run_of(eval, "partition")?;
        let id = run.open_partition(&x, &y).map_err(err)?;
        let result = eval.eval_function(f, &[], &[]);
        super::concurrency::settle_branch(eval);
        let closed = run.close_partition(id).map_err(err);
        let value = result?;
        closed?;
        Ok(value)
    }

    /// `partition_start(a, b)`: splits `a` from `b` until `partition_stop`.
    fn partition_start<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("partition_start", args, kwargs)?;
        a.check(2, &["a", "b"])?;
        let (x, y) = partition_sides(&a, "partition_start")?;
        let run = run_of(eval, "partition_start")?;
        run.open_partition(&x, &y).map_err(err)?;
        Ok(NoneType)
    }

    /// `partition_stop(a, b)`: heals the newest split between them.
    fn partition_stop<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("partition_stop", args, kwargs)?;
        a.check(2, &["a", "b"])?;
        let (x, y) = partition_sides(&a, "partition_stop")?;
        let run = run_of(eval, "partition_stop")?;
        let id = run.latest_partition(&x, &y).ok_or_else(|| {
            err(format!(
                "partition_stop({x}, {y}): no partition_start split between them is in force"
            ))
        })?;
        run.close_partition(id).map_err(err)?;
        Ok(NoneType)
    }
}

/// The two services of a partition builtin, which must differ.
fn partition_sides(a: &Args, builtin: &str) -> Res<(String, String)> {
    let x = service_name(a.required(0, "a")?, builtin)?;
    let y = service_name(a.required(1, "b")?, builtin)?;
    if x == y {
        return Err(err(format!(
            "{builtin}({x}, {y}): a service cannot be split from itself; give two services"
        )));
    }
    Ok((x, y))
}
