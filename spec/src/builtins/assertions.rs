//! Assertions, events and waiting: `assert_true`, `assert_eq`,
//! `assert_eventually`, `assert_never`, `assert_before`, `events`,
//! `await_event`, `await_stable`, `sleep`, `eventually`, `always`.

#[allow(unused_imports)]
use super::*;

pub(super) fn filter_from(a: &Args, skip: &[&str]) -> Res<Filter> {
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

pub(super) fn dict_filter<'v>(a: &Args<'v>, v: Value<'v>, key: &str) -> Res<Filter> {
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

/// `wanted` if the running test has that much time left; an error naming
/// what is left otherwise (a wait the timeout would cut short is a spec
/// mistake, not a hang to find out about at the end).
fn within_budget(eval: &Evaluator, builtin: &str, wanted: Duration) -> Res<Duration> {
    let Some(deadline) = ctx(eval)?.deadline else {
        return Ok(wanted);
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if wanted > left {
        return Err(err(format!(
            "{builtin}({}): the test has {} left (--timeout): wait less, or give the test a longer --timeout",
            faultbox_agent::rule::format_duration(wanted),
            faultbox_agent::rule::format_duration(left)
        )));
    }
    Ok(wanted)
}

/// A wait's timeout, cut to end a moment before the test's own: the wait
/// then fails with its own words rather than as a test timeout.
fn clamp_to_budget(eval: &Evaluator, timeout: Duration) -> Res<Duration> {
    Ok(match ctx(eval)?.deadline {
        Some(deadline) => timeout.min(
            deadline
                .saturating_duration_since(Instant::now())
                .saturating_sub(Duration::from_millis(100)),
        ),
        None => timeout,
    })
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
    if let Ok(c) = ctx(eval) {
        c.assertion_raised.set(true);
    }
    let (file, line) = call_site(eval);
    detail.file = file;
    detail.line = line;
    if let Some(run) = run {
        run.record_assertion(detail);
    }
    err(message)
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
        // Each poll looks only at what the last one did not see: the trace
        // of a long test is not copied (and `where=` not re-run) per poll.
        let mut seen = 0;
        loop {
            let fresh = run.events_after(seen);
            seen = fresh.last().map_or(seen, |e| e.seq);
            let found = matching(eval, fresh, &filter, pred)?;
            if let Some(e) = found.first() {
                if e.kind == "service_exited" {
                    run.acknowledge_exit(&e.service);
                }
                return Ok(NoneType);
            }
            if Instant::now() >= deadline {
                break;
            }
            check_monitors(eval)?;
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

    /// `await_event(matcher, timeout="10s", **filters)`: waits for the
    /// first event that matches (a dict of filters, a predicate over the
    /// event, or keyword filters; earlier events count) and returns it.
    fn await_event<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("await_event", args, kwargs)?;
        if a.pos.len() > 1 {
            return Err(err(
                "await_event(): takes one matcher (a dict of filters or a function), then keyword filters",
            ));
        }
        let mut filter = filter_from(&a, &["timeout", "message"])?;
        let mut pred = None;
        if let Some(m) = a.pos.first().copied() {
            if m.get_type() == "function" {
                pred = Some(m);
            } else if DictRef::from_value(m).is_some() {
                filter
                    .conditions
                    .extend(dict_filter(&a, m, "matcher")?.conditions);
            } else {
                return Err(err(format!(
                    "await_event(): the matcher must be a dict of filters or a function, got {} ({})",
                    m.get_type(),
                    m.to_repr()
                )));
            }
        }
        if pred.is_none() && filter.conditions.is_empty() {
            return Err(err(
                "await_event(): give what to wait for: a dict of filters, a function, or filters like type=\"syscall\"",
            ));
        }
        let timeout = clamp_to_budget(eval, a.duration_or("timeout", Duration::from_secs(10))?)?;
        let run = run_of(eval, "await_event")?;
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            let fresh = run.events_after(seen);
            seen = fresh.last().map_or(seen, |e| e.seq);
            if let Some(e) = matching(eval, fresh, &filter, pred)?.into_iter().next() {
                if e.kind == "service_exited" {
                    run.acknowledge_exit(&e.service);
                }
                return Ok(eval.heap().alloc(EventValue { event: e }));
            }
            if Instant::now() >= deadline {
                break;
            }
            check_monitors(eval)?;
            std::thread::sleep(Duration::from_millis(10));
        }
        let what = if pred.is_some() {
            format!("a function, {}", filter.describe())
        } else {
            filter.describe()
        };
        Err(assertion_failed(
            eval,
            Some(&run),
            AssertionDetail {
                func: "await_event".into(),
                expected: Some(what.clone()),
                message: a.named("message").map(|v| v.to_str()),
                ..Default::default()
            },
            format!(
                "await_event: no matching event within {} ({what})",
                faultbox_agent::rule::format_duration(timeout)
            ),
        ))
    }

    /// `eventually(predicate, timeout="10s")`: some event, earlier or to
    /// come within `timeout`, satisfies `predicate(event)`; returns it.
    fn eventually<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("eventually", args, kwargs)?;
        a.check(1, &["predicate", "timeout", "message"])?;
        let pred = a.callable(a.required(0, "predicate")?, "predicate")?;
        let timeout = clamp_to_budget(eval, a.duration_or("timeout", Duration::from_secs(10))?)?;
        let run = run_of(eval, "eventually")?;
        run.count_assertion();
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        let everything = Filter { conditions: vec![] };
        loop {
            let fresh = run.events_after(seen);
            seen = fresh.last().map_or(seen, |e| e.seq);
            if let Some(e) = matching(eval, fresh, &everything, Some(pred))?
                .into_iter()
                .next()
            {
                return Ok(eval.heap().alloc(EventValue { event: e }));
            }
            if Instant::now() >= deadline {
                break;
            }
            check_monitors(eval)?;
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(assertion_failed(
            eval,
            Some(&run),
            AssertionDetail {
                func: "eventually".into(),
                expected: Some(pred.to_repr()),
                message: a.named("message").map(|v| v.to_str()),
                ..Default::default()
            },
            format!(
                "eventually: no event satisfied {} within {} ({seen} events seen)",
                pred.to_repr(),
                faultbox_agent::rule::format_duration(timeout)
            ),
        ))
    }

    /// `always(predicate, during=fn)`: runs `fn` and checks that every
    /// event from its start to its end satisfies `predicate(event)`;
    /// returns what `fn` returned. The first event that does not fails
    /// the test, naming it.
    fn always<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("always", args, kwargs)?;
        a.check(1, &["predicate", "during", "message"])?;
        let pred = a.callable(a.required(0, "predicate")?, "predicate")?;
        let during = a.callable(
            a.named("during").ok_or_else(|| {
                err("always(): give during=fn, the part of the test it holds over")
            })?,
            "during",
        )?;
        let run = run_of(eval, "always")?;
        run.count_assertion();
        let from = run.events().last().map_or(0, |e| e.seq);
        let result = eval.eval_function(during, &[], &[])?;
        for e in run.events_after(from) {
            let arg = eval.heap().alloc(EventValue { event: e.clone() });
            if eval.eval_function(pred, &[arg], &[])?.to_bool() {
                continue;
            }
            return Err(assertion_failed(
                eval,
                Some(&run),
                AssertionDetail {
                    func: "always".into(),
                    expected: Some(pred.to_repr()),
                    actual: Some(describe_event(&e)),
                    message: a.named("message").map(|v| v.to_str()),
                    ..Default::default()
                },
                format!(
                    "always: event #{} ({}) does not satisfy {}",
                    e.seq,
                    describe_event(&e),
                    pred.to_repr()
                ),
            ));
        }
        Ok(result)
    }

    /// `await_stable(quiescence_window="1s", timeout="30s", ignore={...})`:
    /// waits until no event (but those `ignore` matches) has arrived for
    /// the window: the system has settled.
    fn await_stable<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("await_stable", args, kwargs)?;
        a.check(0, &["quiescence_window", "timeout", "ignore"])?;
        let window = a.duration_or("quiescence_window", Duration::from_secs(1))?;
        let timeout = clamp_to_budget(eval, a.duration_or("timeout", Duration::from_secs(30))?)?;
        if window > timeout {
            return Err(err(format!(
                "await_stable(): a quiet window of {} cannot fit in the {} it may wait (its timeout=, or what the test has left of --timeout)",
                faultbox_agent::rule::format_duration(window),
                faultbox_agent::rule::format_duration(timeout)
            )));
        }
        let ignore = a
            .named("ignore")
            .map(|v| dict_filter(&a, v, "ignore"))
            .transpose()?;
        let run = run_of(eval, "await_stable")?;
        let started = Instant::now();
        let mut seen = run.events().last().map_or(0, |e| e.seq);
        let mut quiet_since = Instant::now();
        loop {
            let fresh = run.events_after(seen);
            seen = fresh.last().map_or(seen, |e| e.seq);
            if fresh
                .iter()
                .any(|e| ignore.as_ref().is_none_or(|f| !f.matches(e)))
            {
                quiet_since = Instant::now();
            }
            if quiet_since.elapsed() >= window {
                return Ok(NoneType);
            }
            if started.elapsed() >= timeout {
                return Err(err(format!(
                    "await_stable: events kept coming for {} (no quiet {} in a row); the last was #{seen}",
                    faultbox_agent::rule::format_duration(timeout),
                    faultbox_agent::rule::format_duration(window)
                )));
            }
            check_monitors(eval)?;
            std::thread::sleep(Duration::from_millis(10).min(window));
        }
    }

    /// `sleep(duration)`: waits in the test body (no event). A sleep past
    /// the test's time (`--timeout`) is refused, naming what is left.
    fn sleep<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        let a = Args::new("sleep", args, kwargs)?;
        a.check(1, &["duration"])?;
        let d = a.duration(a.required(0, "duration")?, "duration")?;
        run_of(eval, "sleep")?;
        let d = within_budget(eval, "sleep", d)?;
        // In slices, so the test's monitors keep watching while it sleeps.
        let until = Instant::now() + d;
        loop {
            check_monitors(eval)?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(NoneType);
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
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
