//! `parallel(fn1, fn2, ...)`: callables run concurrently, results in
//! argument order.
//!
//! Starlark values live on the test's heap and cannot cross threads, so
//! the branches are not threads. `parallel` calls each branch on the test
//! thread in turn, and while it does, the builtins that block (steps and
//! `release()`) do not wait: each hands its work to the branch's worker
//! thread, which runs the branch's calls one after another, and returns a
//! pending result at once. The branches' workers run side by side, so
//! their steps overlap as real concurrent clients do. A pending result
//! becomes the real one when it is first looked at (`r.status` waits for
//! that step), and `parallel` waits for every worker before it returns.
//! What this cannot overlap is a branch that reads a result before its
//! next step: that branch's later calls start only when the earlier ones
//! have answered, and the branches after it are dispatched only then.

#[allow(unused_imports)]
use super::*;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

pub(crate) use crate::values::Outcome;
use crate::values::{Pending, Slot, outcome_value};

type Job = Box<dyn FnOnce() + Send>;

/// The workers of a `parallel()` call, one per branch.
pub struct Dispatch {
    current: usize,
    workers: Vec<mpsc::Sender<Job>>,
    /// Calls handed to the workers and not yet answered.
    pending: Arc<AtomicUsize>,
    /// Deferred calls that failed, with their branch (from 0): a branch
    /// that never looks at a result must still fail for it.
    failures: Arc<std::sync::Mutex<Vec<(usize, String)>>>,
}

/// Answers the slot and counts the call done even if the work panics:
/// `parallel()` waits on both.
struct Done {
    slot: Arc<Slot>,
    pending: Arc<AtomicUsize>,
    branch: usize,
    failures: Arc<std::sync::Mutex<Vec<(usize, String)>>>,
    what: String,
    outcome: Option<Outcome>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or_else(|| {
            Outcome::Step(StepResult::Raise(format!(
                "{} failed inside Faultbox",
                self.what
            )))
        });
        let failed = match &outcome {
            Outcome::Step(StepResult::Raise(m)) | Outcome::Released(Err(m)) => Some(m.clone()),
            _ => None,
        };
        if let Some(m) = failed
            && let Ok(mut f) = self.failures.lock()
        {
            f.push((self.branch, format!("{}: {m}", self.what)));
        }
        self.slot.fill(outcome);
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Hands `work` to the running branch's worker when a `parallel()` is
/// dispatching, returning the pending value; `None` otherwise (the caller
/// runs the call itself).
pub(crate) fn defer<'v>(
    eval: &Evaluator<'v, '_, '_>,
    what: String,
    work: impl FnOnce() -> Outcome + Send + 'static,
) -> Option<Value<'v>> {
    let c = eval.extra.and_then(|e| e.downcast_ref::<Ctx>())?;
    let dispatch = c.dispatch.borrow();
    let d = dispatch.as_ref()?;
    let slot = Arc::new(Slot::default());
    d.pending.fetch_add(1, Ordering::SeqCst);
    let done = Done {
        slot: Arc::clone(&slot),
        pending: Arc::clone(&d.pending),
        branch: d.current,
        failures: Arc::clone(&d.failures),
        what: what.clone(),
        outcome: None,
    };
    // Moves the whole guard in (a closure would capture only the field).
    let job: Job = Box::new(move || {
        let mut done = done;
        done.outcome = Some(work());
    });
    if let Err(mpsc::SendError(job)) = d.workers[d.current].send(job) {
        job();
    }
    Some(eval.heap().alloc(Pending { slot, what }))
}

/// Waits, when a `parallel()` is dispatching, until the running branch's
/// worker has done every call handed to it so far: a window a branch
/// opens around its steps (`fault(..., run=)`, `partition`, `trace`) must
/// not close before they ran.
pub(crate) fn settle_branch(eval: &Evaluator<'_, '_, '_>) {
    let Some(c) = eval.extra.and_then(|e| e.downcast_ref::<Ctx>()) else {
        return;
    };
    let slot = {
        let dispatch = c.dispatch.borrow();
        let Some(d) = dispatch.as_ref() else { return };
        let slot = Arc::new(Slot::default());
        let filled = Arc::clone(&slot);
        let job: Job = Box::new(move || filled.fill(Outcome::Released(Ok(0))));
        if d.workers[d.current].send(job).is_err() {
            return;
        }
        slot
    };
    slot.wait();
}

#[starlark_module]
pub(crate) fn concurrency(builder: &mut GlobalsBuilder) {
    /// `parallel(fn1, fn2, ...)`: runs the callables concurrently (see the
    /// module's notes); returns their results in argument order. A failed
    /// callable fails the call, naming it.
    fn parallel<'v>(
        #[starlark(args)] args: UnpackTuple<Value<'v>>,
        #[starlark(kwargs)] kwargs: DictRef<'v>,
        eval: &mut Evaluator<'v, '_, '_>,
    ) -> starlark::Result<Value<'v>> {
        let a = Args::new("parallel", args, kwargs)?;
        a.check(usize::MAX, &[])?;
        if a.pos.len() < 2 {
            return Err(err(format!(
                "parallel(): give two callables or more (got {}); one runs as a plain call",
                a.pos.len()
            )));
        }
        let branches = a
            .pos
            .iter()
            .map(|v| a.callable(*v, "callable"))
            .collect::<Res<Vec<_>>>()?;
        run_of(eval, "parallel")?;
        // The context outlives this call; holding it must not hold `eval`.
        let c = eval
            .extra
            .and_then(|e| e.downcast_ref::<Ctx>())
            .ok_or_else(|| err("internal: parallel() outside a Faultbox evaluation"))?;
        if c.dispatch.borrow().is_some() {
            return Err(err(
                "parallel() inside a parallel() branch: flatten them into one call",
            ));
        }
        let mut workers = Vec::new();
        let mut threads = Vec::new();
        for i in 0..branches.len() {
            let (tx, rx) = mpsc::channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name(format!("parallel branch {}", i + 1))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                });
            match spawned {
                Ok(t) => {
                    workers.push(tx);
                    threads.push(t);
                }
                Err(e) => return Err(err(format!("parallel(): cannot start a branch: {e}"))),
            }
        }
        let pending = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        // Under --explore the rounds run beside the dispatch: a branch
        // that waits on its own result needs its held calls let go.
        let dispatching = Arc::new(AtomicBool::new(true));
        let explorer = match &c.run {
            Some(run) if run.explore_begin() => {
                let (run, pending, dispatching) = (
                    Arc::clone(run),
                    Arc::clone(&pending),
                    Arc::clone(&dispatching),
                );
                std::thread::Builder::new()
                    .name("explore".into())
                    .spawn(move || {
                        run.explore_finish(&|| {
                            let n = pending.load(Ordering::SeqCst);
                            if dispatching.load(Ordering::SeqCst) {
                                n.max(1)
                            } else {
                                n
                            }
                        })
                    })
                    .ok()
            }
            _ => None,
        };
        *c.dispatch.borrow_mut() = Some(Dispatch {
            current: 0,
            workers,
            pending: Arc::clone(&pending),
            failures: Arc::clone(&failures),
        });
        let mut results = Vec::new();
        for (i, f) in branches.iter().enumerate() {
            if let Some(d) = c.dispatch.borrow_mut().as_mut() {
                d.current = i;
            }
            results.push(eval.eval_function(*f, &[], &[]));
        }
        // Closing the queues lets each worker finish what it was given.
        drop(c.dispatch.borrow_mut().take());
        dispatching.store(false, Ordering::SeqCst);
        if let Some(explorer) = explorer {
            let _ = explorer.join();
        }
        for t in threads {
            let _ = t.join();
        }
        let heap = eval.heap();
        let mut values = Vec::new();
        for (i, (r, f)) in results.into_iter().zip(&branches).enumerate() {
            let failed = |m: String| {
                // A lambda's repr starts with its file's full path.
                let repr = f.to_repr();
                let name = repr.rsplit('/').next().unwrap_or(&repr).to_string();
                err(format!(
                    "parallel(): callable {} ({name}) failed: {m}",
                    i + 1
                ))
            };
            let v = r.map_err(|e| failed(e.without_diagnostic().to_string()))?;
            let v = match Pending::from_value(v) {
                Some(p) => outcome_value(p.slot.wait(), heap).map_err(failed)?,
                None => v,
            };
            // A call of the branch that failed though it returned fine.
            let lost = failures
                .lock()
                .ok()
                .and_then(|f| f.iter().find(|(b, _)| *b == i).map(|(_, m)| m.clone()));
            if let Some(m) = lost {
                return Err(failed(m));
            }
            values.push(v);
        }
        check_monitors(eval)?;
        Ok(heap.alloc(values))
    }
}
