//! Protocol faults: `response`, `error`, `duplicate`, `drop`, the rules
//! a window on an interface applies.

use super::syscall_faults::fault_common;
#[allow(unused_imports)]
use super::*;

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
pub(super) fn proxy_rule(a: &Args, action: ProxyAction, extra: &[&str]) -> Res<ProxyRuleValue> {
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
pub(super) fn status_arg(a: &Args) -> Res<Option<u16>> {
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
pub(super) fn proxy_rules(a: &Args, from: usize) -> Res<Vec<ProxyRuleDef>> {
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

#[starlark_module]
pub(crate) fn protocol_faults(builder: &mut GlobalsBuilder) {
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
}
