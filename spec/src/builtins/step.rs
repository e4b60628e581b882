//! Steps: `svc.iface.<method>(...)`, checked against the protocol's
//! step descriptors and carried out by the test host.

#[allow(unused_imports)]
use super::*;

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
    // The first parameter, and every required one that leads the list,
    // may be given by position: `set("k", "v")` as the docs write it.
    let positional = def.params.iter().take_while(|p| p.required).count().max(1);
    a.check(
        if def.rest.is_some() {
            usize::MAX
        } else {
            positional
        },
        &names,
    )?;
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
        let given = if i < positional && def.rest.is_none() {
            a.arg(i, p.name)?
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
    let what = format!("{}.{}.{}", step.service, step.iface.name, step.method);
    let run = run_of(eval, &what)?;
    let deferred = {
        let (run, call) = (Arc::clone(&run), call.clone());
        super::concurrency::defer(eval, what, move || {
            super::concurrency::Outcome::Step(run.step(&call))
        })
    };
    if let Some(pending) = deferred {
        return Ok(pending);
    }
    let result = run.step(&call);
    check_monitors(eval)?;
    match result {
        StepResult::Reply(r) => Ok(eval.heap().alloc(ResponseValue::from(r))),
        StepResult::Text(line) => Ok(eval.heap().alloc(line)),
        StepResult::Raise(message) => Err(err(message)),
    }
}
