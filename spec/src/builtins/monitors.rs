//! Monitors: `monitor(callback, **filters)` (a callback per matching
//! event; raising is a violation) and `monitor(name, on=, state_init=,
//! update=, check=)` (state folded over the matching events; a falsy
//! `check` is a violation).
//!
//! A monitor declared at the top of a spec watches every test, with fresh
//! state each time, from the test's first event; one declared in a test
//! body watches the rest of that test. Callbacks are Starlark values, so
//! they run on the test's own thread: the monitors look at the new events
//! whenever the body hands control to Faultbox (a step, a wait, a sleep)
//! and once more when the body returns. A violation fails the test there,
//! naming the event that broke it.
//!
//! The monitor list lives in module variables rather than in [`Ctx`]:
//! [`Ctx`] cannot hold heap values, and a variable of the spec's module is
//! frozen with it, which is how a top-level monitor survives the load.

#[allow(unused_imports)]
use super::*;

use super::assertions::{dict_filter, filter_from};
use starlark::values::dict::AllocDict;
use starlark::values::list::AllocList;
use starlark::values::structs::AllocStruct;

/// The spec-wide monitors (a list in the spec's module).
const SPEC_MONITORS: &str = "faultbox_spec_monitors__";
/// The running test's monitors and their states (lists in its module).
const TEST_MONITORS: &str = "faultbox_test_monitors__";
const TEST_STATES: &str = "faultbox_monitor_states__";

fn list_of<'v>(v: Option<Value<'v>>) -> Vec<Value<'v>> {
    v.and_then(ListRef::from_value)
        .map(|l| l.iter().collect())
        .unwrap_or_default()
}

fn field<'v>(m: Value<'v>, name: &str, heap: starlark::values::Heap<'v>) -> Option<Value<'v>> {
    m.get_attr(name, heap)
        .ok()
        .flatten()
        .filter(|v| !v.is_none())
}

/// A copy of a (possibly frozen) initial state that `update` may change
/// in place: dicts and lists are copied one level deep.
fn fresh_state<'v>(v: Value<'v>, heap: starlark::values::Heap<'v>) -> Value<'v> {
    if let Some(d) = DictRef::from_value(v) {
        let items: Vec<(Value, Value)> = d.iter().collect();
        return heap.alloc(AllocDict(items));
    }
    if let Some(l) = ListRef::from_value(v) {
        return heap.alloc(AllocList(l.iter().collect::<Vec<_>>()));
    }
    v
}

/// Starts a test's monitors: the spec-wide ones with their initial
/// states, and no cursor past the test's first event.
pub(crate) fn start_test_monitors<'v>(
    module: &starlark::environment::Module<'v>,
    spec_monitors: Option<Value<'v>>,
    ctx: &Ctx,
) {
    let monitors = list_of(spec_monitors);
    let heap = module.heap();
    let states: Vec<Value> = monitors
        .iter()
        .map(|m| {
            field(*m, "state_init", heap)
                .map(|s| fresh_state(s, heap))
                .unwrap_or_else(Value::new_none)
        })
        .collect();
    *ctx.monitors.borrow_mut() = vec![0; monitors.len()];
    module.set(TEST_MONITORS, heap.alloc(AllocList(monitors)));
    module.set(TEST_STATES, heap.alloc(AllocList(states)));
}

/// The name of the spec-wide monitor list, for the runtime to hand to
/// [`start_test_monitors`].
pub(crate) fn spec_monitors_name() -> &'static str {
    SPEC_MONITORS
}

/// The short text a violation names an event with.
fn event_words(e: &Event) -> String {
    format!("event #{} (service={} type={})", e.seq, e.service, e.kind)
}

/// Stops the body if something outside it has failed the test (see
/// [`TestHost::violation`]), then runs every monitor of the running test
/// over the events it has not seen. The first violation is the error; a monitor's own callback that
/// fails (not an assertion) is an error naming the monitor.
pub(crate) fn check_monitors(eval: &mut Evaluator<'_, '_, '_>) -> Res<()> {
    let Some(c) = eval.extra.and_then(|e| e.downcast_ref::<Ctx>()) else {
        return Ok(());
    };
    if c.in_monitor.get() {
        return Ok(());
    }
    let Some(run) = c.run.clone() else {
        return Ok(());
    };
    if let Some(reason) = run.violation() {
        return Err(err(reason));
    }
    let monitors = list_of(eval.module().get(TEST_MONITORS));
    if monitors.is_empty() {
        return Ok(());
    }
    let cursors: Vec<u64> = c.monitors.borrow().clone();
    let from = cursors.iter().copied().min().unwrap_or(0);
    let fresh = run.events_after(from);
    if fresh.is_empty() {
        return Ok(());
    }
    c.in_monitor.set(true);
    let result = run_monitors(eval, c, &monitors, &cursors, &fresh);
    c.in_monitor.set(false);
    result
}

fn run_monitors<'v>(
    eval: &mut Evaluator<'v, '_, '_>,
    c: &Ctx,
    monitors: &[Value<'v>],
    cursors: &[u64],
    fresh: &[Event],
) -> Res<()> {
    let heap = eval.heap();
    let mut states = list_of(eval.module().get(TEST_STATES));
    states.resize(monitors.len(), Value::new_none());
    let mut outcome = Ok(());
    let mut seen: Vec<u64> = cursors.to_vec();
    seen.resize(monitors.len(), 0);
    'monitors: for (i, m) in monitors.iter().enumerate() {
        let name = field(*m, "name", heap)
            .map(text_of)
            .unwrap_or_else(|| "monitor".into());
        let filters = match field(*m, "filters", heap) {
            Some(d) => filter_of(d)?,
            None => Filter { conditions: vec![] },
        };
        let on = field(*m, "on", heap);
        let after = seen[i];
        for e in fresh.iter().filter(|e| e.seq > after) {
            seen[i] = e.seq;
            if !filters.matches(e) {
                continue;
            }
            let arg = heap.alloc(EventValue { event: e.clone() });
            if let Some(on) = on {
                let wanted = if on.get_type() == "function" {
                    match eval.eval_function(on, &[arg], &[]) {
                        Ok(v) => v.to_bool(),
                        Err(err) => {
                            outcome = Err(callback_failed(&name, "on", e, err));
                            break 'monitors;
                        }
                    }
                } else {
                    filter_of(on)?.matches(e)
                };
                if !wanted {
                    continue;
                }
            }
            c.assertion_raised.set(false);
            if let Some(callback) = field(*m, "callback", heap) {
                if let Err(err) = eval.eval_function(callback, &[arg], &[]) {
                    outcome = Err(if raised_assertion(c, &err) {
                        violated(&name, e, Some(err))
                    } else {
                        callback_failed(&name, "callback", e, err)
                    });
                    break 'monitors;
                }
                continue;
            }
            if let Some(update) = field(*m, "update", heap) {
                match eval.eval_function(update, &[arg, states[i]], &[]) {
                    Ok(s) => states[i] = s,
                    Err(err) => {
                        outcome = Err(callback_failed(&name, "update", e, err));
                        break 'monitors;
                    }
                }
            }
            if let Some(check) = field(*m, "check", heap) {
                match eval.eval_function(check, &[arg, states[i]], &[]) {
                    Ok(v) if v.to_bool() => {}
                    Ok(_) => {
                        outcome = Err(violated(&name, e, None));
                        break 'monitors;
                    }
                    Err(err) if raised_assertion(c, &err) => {
                        outcome = Err(violated(&name, e, Some(err)));
                        break 'monitors;
                    }
                    Err(err) => {
                        outcome = Err(callback_failed(&name, "check", e, err));
                        break 'monitors;
                    }
                }
            }
        }
    }
    *c.monitors.borrow_mut() = seen;
    eval.module()
        .set(TEST_STATES, heap.alloc(AllocList(states)));
    outcome
}

fn filter_of(v: Value) -> Res<Filter> {
    let d =
        DictRef::from_value(v).ok_or_else(|| err("monitor(): on= must be a dict or a function"))?;
    Ok(Filter {
        conditions: d.iter().map(|(k, v)| (text_of(k), text_of(v))).collect(),
    })
}

/// Whether a callback's error is an assertion (a violation) rather than
/// a mistake in the callback: `fail()`, or one of the `assert_*`
/// builtins, which say so through the context.
fn raised_assertion(c: &Ctx, e: &starlark::Error) -> bool {
    c.assertion_raised.get() || matches!(e.kind(), starlark::ErrorKind::Fail(_))
}

fn violated(name: &str, e: &Event, why: Option<starlark::Error>) -> starlark::Error {
    let mut text = format!("monitor {name:?} violated at {}", event_words(e));
    if let Some(why) = why {
        text.push_str(": ");
        text.push_str(&why.without_diagnostic().to_string());
    }
    err(text)
}

fn callback_failed(name: &str, which: &str, e: &Event, why: starlark::Error) -> starlark::Error {
    err(format!(
        "monitor {name:?}: its {which} function failed at {}: {}",
        event_words(e),
        why.without_diagnostic()
    ))
}

#[starlark_module]
pub(crate) fn monitors(builder: &mut GlobalsBuilder) {
    /// `monitor(callback, **filters)` or `monitor(name, on=, state_init=,
    /// update=, check=)`: see the module's notes. Returns the monitor.
    fn monitor<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("monitor", args, kwargs)?;
        let heap = eval.heap();
        let first = a.required(0, "callback or name")?;
        let none = Value::new_none();
        let fields: Vec<(&str, Value)> = if first.get_type() == "function" {
            if a.pos.len() > 1 {
                return Err(err(
                    "monitor(callback, **filters): one callback, then keyword filters (service=, type=, syscall=, ...)",
                ));
            }
            let filters = filter_from(&a, &[])?;
            let name = first.to_str();
            let filters: Vec<(String, String)> = filters.conditions;
            vec![
                ("name", heap.alloc(name)),
                ("callback", first),
                ("filters", heap.alloc(AllocDict(filters))),
                ("on", none),
                ("state_init", none),
                ("update", none),
                ("check", none),
            ]
        } else if let Some(name) = first.unpack_str() {
            a.check(1, &["on", "state_init", "update", "check"])?;
            if name.is_empty() {
                return Err(err("monitor(): the name must not be empty"));
            }
            let on = match a.named("on") {
                Some(v) if v.get_type() == "function" => v,
                Some(v) if DictRef::from_value(v).is_some() => {
                    dict_filter(&a, v, "on")?;
                    v
                }
                Some(v) => {
                    return Err(err(format!(
                        "monitor({name:?}): on= must be a dict of filters or a function of the event, got {} ({})",
                        v.get_type(),
                        v.to_repr()
                    )));
                }
                None => none,
            };
            let update = a
                .named("update")
                .map(|v| a.callable(v, "update"))
                .transpose()?;
            let check = a
                .named("check")
                .map(|v| a.callable(v, "check"))
                .transpose()?;
            if update.is_none() && check.is_none() {
                return Err(err(format!(
                    "monitor({name:?}): give check=fn(event, state) (and update=fn(event, state) with state_init= to carry state)"
                )));
            }
            vec![
                ("name", heap.alloc(name)),
                ("callback", none),
                ("filters", none),
                ("on", on),
                ("state_init", a.named("state_init").unwrap_or(none)),
                ("update", update.unwrap_or(none)),
                ("check", check.unwrap_or(none)),
            ]
        } else {
            return Err(err(format!(
                "monitor(): the first argument is a callback or a name, got {} ({})",
                first.get_type(),
                first.to_repr()
            )));
        };
        let value = heap.alloc(AllocStruct(fields));
        let c = ctx(eval)?;
        if c.in_monitor.get() {
            return Err(err("monitor() cannot be called from a monitor's callback"));
        }
        if c.run.is_none() {
            let mut all = list_of(eval.module().get(SPEC_MONITORS));
            all.push(value);
            eval.module().set(SPEC_MONITORS, heap.alloc(AllocList(all)));
            return Ok(value);
        }
        // In a test: watch from the newest event on.
        let seen = c
            .run
            .as_ref()
            .and_then(|r| r.events().last().map(|e| e.seq))
            .unwrap_or(0);
        let state = field(value, "state_init", heap)
            .map(|s| fresh_state(s, heap))
            .unwrap_or(none);
        let mut all = list_of(eval.module().get(TEST_MONITORS));
        let mut states = list_of(eval.module().get(TEST_STATES));
        states.resize(all.len(), none);
        all.push(value);
        states.push(state);
        c.monitors.borrow_mut().push(seen);
        eval.module().set(TEST_MONITORS, heap.alloc(AllocList(all)));
        eval.module()
            .set(TEST_STATES, heap.alloc(AllocList(states)));
        Ok(value)
    }
}
