//! The builtins a spec calls, one file per family: topology and
//! healthchecks, syscall faults, protocol faults, assertions and events,
//! steps, files and helpers.
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
use crate::model::{ContainerDef, Healthcheck, ImageSource, InterfaceDef, OpDef, ServiceDef};
use crate::values::{
    Ctx, EventValue, FaultValue, HealthcheckValue, InterfaceRef, InterfaceValue, OpValue,
    ProxyRuleValue, ResponseValue, ServiceValue, StepMethod, TlsValue, json_to_value,
};
use faultbox_proxy::TlsSpec;
use faultbox_proxy::rules::{ProxyAction, ProxyRuleDef};
use faultbox_proxy::steps::{self, Arg as StepArg, Kind, StepCall, StepResult};

mod assertions;
mod concurrency;
mod files;
mod monitors;
mod protocol_faults;
mod step;
mod syscall_faults;
mod topology;

pub(crate) use assertions::assertions;
pub(crate) use concurrency::{Dispatch, concurrency};
pub(crate) use files::files;
pub(crate) use monitors::{check_monitors, monitors, spec_monitors_name, start_test_monitors};
pub(crate) use protocol_faults::protocol_faults;
pub(crate) use step::call_step;
pub(crate) use syscall_faults::syscall_faults;
pub(crate) use topology::topology;

fn err(message: impl std::fmt::Display) -> starlark::Error {
    starlark::Error::new_other(anyhow::anyhow!(message.to_string()))
}

type Res<T> = starlark::Result<T>;

fn ctx<'a>(eval: &'a Evaluator<'_, '_, '_>) -> Res<&'a Ctx> {
    eval.extra
        .and_then(|e| e.downcast_ref::<Ctx>())
        .ok_or_else(|| err("internal: builtin called outside a Faultbox evaluation"))
}

fn run_of(eval: &Evaluator<'_, '_, '_>, builtin: &str) -> Res<Arc<dyn TestHost>> {
    let c = ctx(eval)?;
    if c.in_monitor.get() {
        return Err(err(format!(
            "{builtin}() cannot be called from a monitor's callback: a monitor looks at events, it does not act (use the event it is given, assert_* or fail())"
        )));
    }
    c.run.clone().ok_or_else(|| {
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

    /// A fault's delay: at most an hour, or a day written in hours.
    fn delay(&self, v: Value<'v>, key: &str) -> Res<Duration> {
        let text = self.string(v, key)?;
        rule::parse_delay(&text)
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

fn text_of(v: Value) -> String {
    v.unpack_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_str())
}

/// Builtins of the Faultbox language this build does not have: calling one
/// says so, instead of Starlark's bare "variable not found".
/// Builtins of the original Faultbox this build does not have yet, and
/// what each would have done: calling one fails the spec with a message
/// that says so, rather than as an unknown name.
const NOT_IN_THIS_BUILD: &[(&str, &str)] = &[
    ("scenario", "scenarios and faultbox generate"),
    ("fault_scenario", "fault scenarios"),
    ("fault_matrix", "fault matrices"),
    ("fault_assumption", "fault assumptions"),
    ("mock_service", "mock services"),
];

pub(crate) fn not_in_this_build(builder: &mut GlobalsBuilder) {
    for (name, what) in NOT_IN_THIS_BUILD {
        builder.set(name, crate::values::Unsupported { name, what });
    }
}

#[cfg(test)]
mod tests;
