//! The notification loop: receive each intercepted call, resolve its path,
//! ask the [`Engine`], answer, and report an event.
//!
//! One thread blocks in RECV (cheapest per notification; a `poll` in front
//! would add 0.5–0.8 µs) and answers allow/deny at once. Delays go to a
//! timer thread, so a held call never holds up the others. Talking to the
//! kernel goes through [`Kernel`], so the policy here is tested with a fake.

use std::collections::BinaryHeap;
use std::io;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::engine::{Call, Engine};
use crate::errno;
use crate::process;
use crate::rule::{Action, Rule, RuleError};
use crate::seccomp::{self, Listener, Notification, Response};
use crate::syscalls::{self, Arch, PathSource};
use crate::wire::{EventQueue, ShimMessage, SyscallEvent};

/// Why a supervisor could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A rule it was given is unusable.
    #[error(transparent)]
    Rules(#[from] RuleError),
    /// The notification thread could not be spawned.
    #[error("cannot start the notification thread: {0}")]
    Thread(io::Error),
}

/// What the supervisor needs from the kernel.
pub trait Kernel: Send + Sync + 'static {
    /// Blocks for the next notification.
    fn recv(&self) -> io::Result<Notification>;
    /// Answers one notification.
    fn respond(&self, id: u64, response: Response) -> io::Result<()>;
    /// Whether the notification is still pending.
    fn id_valid(&self, id: u64) -> bool;
    /// Reads a NUL-terminated string from the caller's memory.
    fn read_string(&self, pid: u32, addr: u64) -> Option<String>;
    /// Reads a symlink, such as `/proc/<pid>/fd/<n>`.
    fn readlink(&self, path: &str) -> Option<String>;
    /// Reads `len` bytes (at most 128: a `struct sockaddr_storage`) from
    /// the caller's memory.
    fn read_bytes(&self, pid: u32, addr: u64, len: usize) -> Option<Vec<u8>>;
    /// Whether no notification can arrive any more (every filtered task
    /// is gone).
    fn orphaned(&self) -> bool {
        false
    }
}

/// The real kernel, through a filter's listener.
pub struct LiveKernel {
    listener: Listener,
}

impl LiveKernel {
    /// Serves `listener`.
    pub fn new(listener: Listener) -> LiveKernel {
        listener.set_sync_wakeup();
        LiveKernel { listener }
    }
}

impl Kernel for LiveKernel {
    fn recv(&self) -> io::Result<Notification> {
        self.listener.recv()
    }
    fn respond(&self, id: u64, response: Response) -> io::Result<()> {
        self.listener.respond(id, response)
    }
    fn id_valid(&self, id: u64) -> bool {
        self.listener.id_valid(id)
    }
    fn read_string(&self, pid: u32, addr: u64) -> Option<String> {
        seccomp::read_c_string(pid, addr)
    }
    fn read_bytes(&self, pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
        seccomp::read_bytes(pid, addr, len)
    }
    fn readlink(&self, path: &str) -> Option<String> {
        std::fs::read_link(path)
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }
    fn orphaned(&self) -> bool {
        self.listener.orphaned()
    }
}

struct Shared<K> {
    kernel: K,
    arch: Arch,
    engine: Mutex<Engine>,
    events: Arc<EventQueue>,
    seq: AtomicU64,
    interrupted: AtomicU64,
    detached: AtomicBool,
    stopping: AtomicBool,
    /// `leave()`: stop serving, but keep the timer and the rules.
    leaving: AtomicBool,
    timer: Mutex<Timer>,
    /// Notifications received whose event is not yet queued (held ones
    /// included): zero means every answered call has been reported.
    in_flight: Arc<AtomicU64>,
    /// Calls parked by hold rules, oldest first, until released; and the
    /// tags of the hold rules in force, under the same lock so a call
    /// decided by a rule that went meanwhile is not parked for good.
    parked: Mutex<ParkedCalls>,
}

#[derive(Default)]
struct ParkedCalls {
    calls: Vec<Parked>,
    tags: Vec<String>,
}

/// The labels of the hold rules among `rules`.
fn hold_tags(rules: &[Rule]) -> Vec<String> {
    rules
        .iter()
        .filter(|r| r.action == Action::Hold)
        .filter_map(|r| r.label.clone())
        .collect()
}

/// A call a hold rule parked.
struct Parked {
    id: u64,
    nr: u32,
    /// Its `hold(...)` event's sequence number.
    seq: u64,
    tag: String,
    started: Instant,
    event: SyscallEvent,
    _in_flight: InFlight,
}

/// Counts one notification as in flight until dropped.
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn new(counter: &Arc<AtomicU64>) -> InFlight {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(counter))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

enum TimerMsg {
    Hold(Box<Held>),
    ReleaseAll,
}

struct Held {
    due: Instant,
    id: u64,
    started: Instant,
    event: SyscallEvent,
    _in_flight: InFlight,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // BinaryHeap is a max-heap: the earliest deadline must compare greatest.
        other.due.cmp(&self.due)
    }
}

/// A notification loop: on a thread of its own ([`Supervisor::start`]) or
/// on the caller's ([`Supervisor::new`], then [`Supervisor::serve`]).
pub struct Supervisor<K: Kernel> {
    shared: Arc<Shared<K>>,
    server: Mutex<Option<Server>>,
}

/// The thread serving notifications, and how to tell it has left.
struct Server {
    thread: libc::pthread_t,
    done: mpsc::Receiver<()>,
    join: Option<JoinHandle<()>>,
}

/// The delay timer, started on the first delayed call: most launches have
/// no delay rule, and a thread costs ~50 µs to start on a busy VM.
#[derive(Default)]
struct Timer {
    tx: Option<Sender<TimerMsg>>,
    thread: Option<JoinHandle<()>>,
}

impl<K: Kernel> Supervisor<K> {
    /// Prepares to serve `kernel`, whose filter intercepts `intercepted`,
    /// with `rules`, queueing events on `events`. Nothing is served until
    /// a thread calls [`Supervisor::serve`].
    pub fn new(
        kernel: K,
        arch: Arch,
        seed: u64,
        intercepted: Vec<u32>,
        rules: Vec<Rule>,
        events: Arc<EventQueue>,
    ) -> Result<Supervisor<K>, SupervisorError> {
        let mut engine = Engine::new(arch, seed);
        engine.restrict_to(intercepted);
        let tags = hold_tags(&rules);
        engine.set_rules(rules)?;
        // The wake handler lets stop() interrupt a RECV blocked in the kernel.
        let _ = process::install_wake_handler();
        Ok(Supervisor {
            shared: Arc::new(Shared {
                kernel,
                arch,
                engine: Mutex::new(engine),
                events,
                seq: AtomicU64::new(0),
                interrupted: AtomicU64::new(0),
                detached: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                leaving: AtomicBool::new(false),
                timer: Mutex::new(Timer::default()),
                in_flight: Arc::new(AtomicU64::new(0)),
                parked: Mutex::new(ParkedCalls {
                    calls: Vec::new(),
                    tags,
                }),
            }),
            server: Mutex::new(None),
        })
    }

    /// Serves on a thread of its own: `Supervisor::new(...)?.start()`.
    pub fn start(self) -> Result<Supervisor<K>, SupervisorError> {
        let sup = self;
        let recv_shared = Arc::clone(&sup.shared);
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let recv_thread = thread::Builder::new()
            .name("faultbox-notify".into())
            .spawn(move || {
                recv_loop(&recv_shared);
                drop(done_tx);
            })
            .map_err(SupervisorError::Thread)?;
        *sup.server() = Some(Server {
            thread: recv_thread.as_pthread_t(),
            done: done_rx,
            join: Some(recv_thread),
        });
        Ok(sup)
    }

    /// Serves notifications on the calling thread until every task under
    /// the filter is gone, or [`Supervisor::leave`] or
    /// [`Supervisor::stop`] is called. No thread is created: a launch that
    /// creates none after its fork is measurably faster (see
    /// docs/benchmarks.md). The calling thread must outlive the
    /// supervisor, which may signal it.
    pub fn serve(&self) {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        *self.server() = Some(Server {
            thread: process::current_thread(),
            done: done_rx,
            join: None,
        });
        recv_loop(&self.shared);
        drop(done_tx);
    }

    /// Makes [`Supervisor::serve`] return soon (or at once, if it has not
    /// started), leaving held calls to the timer. For a target that has
    /// exited while its descendants still hold the filter.
    pub fn leave(&self) {
        self.shared.leaving.store(true, Ordering::SeqCst);
        if let Some(server) = &*self.server() {
            wake_until_done(server);
        }
    }

    fn server(&self) -> MutexGuard<'_, Option<Server>> {
        self.server.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the rules; on error the old rules stay. Returns the final
    /// counters of the rules that are gone.
    pub fn set_rules(&self, rules: Vec<Rule>) -> Result<Vec<crate::engine::RuleStats>, RuleError> {
        let holding = hold_tags(&rules);
        let retired = self.shared.engine().set_rules(rules)?;
        self.shared.parked().tags = holding.clone();
        // A call parked by a rule that is gone would wait forever.
        unpark_where(&self.shared, |p| !holding.contains(&p.tag), None, None);
        Ok(retired)
    }

    /// Answers the calls parked under `tag`, oldest first (at most
    /// `limit`): fails them with `deny`, or lets them run. Returns how
    /// many it answered.
    pub fn release(
        &self,
        tag: &str,
        deny: Option<i32>,
        limit: Option<u64>,
        call: Option<u64>,
    ) -> u64 {
        unpark_where(
            &self.shared,
            |p| p.tag == tag && call.is_none_or(|seq| p.seq == seq),
            deny,
            limit,
        )
    }

    /// The calls parked under `tag`, oldest first.
    pub fn held(&self, tag: &str) -> Vec<crate::wire::HeldCall> {
        let parked = self.shared.parked();
        parked
            .calls
            .iter()
            .filter(|p| p.tag == tag && self.shared.kernel.id_valid(p.id))
            .map(|p| crate::wire::HeldCall {
                seq: p.seq,
                syscall: p.event.syscall.to_string(),
                path: p.event.path.clone(),
            })
            .collect()
    }

    /// The controller is gone: answer everything held now, and from here on
    /// allow every call without consulting the rules.
    pub fn detach(&self) {
        self.shared.detached.store(true, Ordering::SeqCst);
        unpark_where(&self.shared, |_| true, None, None);
        if let Some(tx) = &self.shared.timer().tx {
            let _ = tx.send(TimerMsg::ReleaseAll);
        }
    }

    /// Notifications whose caller vanished before it got an answer.
    pub fn interrupted(&self) -> u64 {
        self.shared.interrupted.load(Ordering::Relaxed)
    }

    /// Per-rule counters.
    pub fn stats(&self) -> Vec<crate::engine::RuleStats> {
        self.shared.engine().stats()
    }

    /// Releases everything held and waits until every call answered so far
    /// has its event queued. Call it once the target tree is reaped: then no
    /// new notification can arrive, and the threads may simply be left to
    /// die with the process (the shim does), which is cheaper than joining.
    pub fn quiesce(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        unpark_where(&self.shared, |_| true, None, None);
        if let Some(tx) = &self.shared.timer().tx {
            let _ = tx.send(TimerMsg::ReleaseAll);
        }
        while self.shared.in_flight.load(Ordering::SeqCst) > 0 {
            thread::yield_now();
        }
    }

    /// Releases everything held and stops serving (joining the thread
    /// `start` made). Every event of a call answered before `stop` returns
    /// has been queued. Idempotent.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        unpark_where(&self.shared, |_| true, None, None);
        let server = self.server().take();
        if let Some(mut server) = server {
            wake_until_done(&server);
            if let Some(join) = server.join.take() {
                let _ = join.join();
            }
        }
        // Dropping the only sender makes the timer release all and exit.
        let timer = std::mem::take(&mut *self.shared.timer());
        drop(timer.tx);
        if let Some(thread) = timer.thread {
            let _ = thread.join();
        }
    }
}

/// Signals the serving thread until it reports that it has left the loop:
/// a signal can land just before the thread enters RECV and be lost.
fn wake_until_done(server: &Server) {
    let mut pause = Duration::from_micros(50);
    loop {
        match server.done.try_recv() {
            Err(mpsc::TryRecvError::Empty) => {}
            _ => return,
        }
        process::wake_thread(server.thread);
        match server.done.recv_timeout(pause) {
            Err(RecvTimeoutError::Timeout) => pause = (pause * 2).min(Duration::from_millis(5)),
            _ => return,
        }
    }
}

impl<K: Kernel> Drop for Supervisor<K> {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<K: Kernel> Shared<K> {
    fn timer(&self) -> MutexGuard<'_, Timer> {
        self.timer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn parked(&self) -> MutexGuard<'_, ParkedCalls> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        // A panic while holding the lock would be a bug in the engine; the
        // rules themselves are still consistent, so keep serving.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, mut event: SyscallEvent) -> u64 {
        event.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let seq = event.seq;
        self.events.push(ShimMessage::Syscall(event));
        seq
    }

    fn answer(&self, id: u64, response: Response) -> bool {
        match self.kernel.respond(id, response) {
            Ok(()) => true,
            Err(_) => {
                // ENOENT: the caller was killed or restarted the call.
                self.interrupted.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

fn recv_loop<K: Kernel>(shared: &Arc<Shared<K>>) {
    let kernel = &shared.kernel;
    loop {
        if shared.stopping.load(Ordering::SeqCst) || shared.leaving.load(Ordering::SeqCst) {
            return;
        }
        match kernel.recv() {
            Ok(n) => handle(shared, kernel, n),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // The caller vanished before we read its notification, or
                // (once the last filtered task has exited) RECV returns
                // this at once, forever: leave then, instead of spinning on
                // a CPU the exiting target's parent needs. Measured: the
                // spin added ~1 ms to every launch on 2 vCPUs.
                Some(libc::ENOENT) if kernel.orphaned() => return,
                Some(libc::ENOENT) => continue,
                _ => return,
            },
        }
    }
}

fn handle<K: Kernel>(shared: &Arc<Shared<K>>, kernel: &K, n: Notification) {
    let in_flight = InFlight::new(&shared.in_flight);
    if shared.detached.load(Ordering::Relaxed) {
        shared.answer(n.id, Response::Continue);
        return;
    }
    let name = shared.arch.name(n.nr).unwrap_or("unknown");
    let path = resolve_path(kernel, name, &n);
    if path.is_some() && !kernel.id_valid(n.id) {
        shared.interrupted.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let (decision, rule, label) = {
        let mut engine = shared.engine();
        let decision = engine.decide(Call {
            nr: n.nr,
            path: path.as_deref(),
        });
        let rule = decision.rule.and_then(|i| engine.rule(i));
        let (id, label) = match rule {
            Some(r) => (Some(r.id.clone()), r.label.clone()),
            None => (None, None),
        };
        (decision, id, label)
    };
    let event = SyscallEvent {
        seq: 0,
        time_ns: now_ns(),
        pid: n.pid,
        syscall: name.into(),
        decision: decision.describe(),
        errno: match decision.action {
            Action::Deny { errno } => errno::by_number(errno).map(|e| e.name.into()),
            _ => None,
        },
        path,
        latency_ns: None,
        rule,
        label,
    };
    let response = match decision.action {
        Action::Hold => {
            let tag = event.label.clone().unwrap_or_default();
            let mut parked_event = event.clone();
            parked_event.decision = format!("hold({tag})").into();
            let mut parked = shared.parked();
            // Under the lock: a listing never misses a call whose hold
            // event has been sent.
            let seq = shared.emit(parked_event);
            let call = Parked {
                id: n.id,
                nr: n.nr,
                seq,
                tag,
                started: Instant::now(),
                event,
                _in_flight: in_flight,
            };
            // Checked under the lock the releases take: a call parked
            // after the last release-all, or by a rule already gone,
            // would never be answered.
            let gone = !parked.tags.contains(&call.tag);
            if gone
                || shared.detached.load(Ordering::SeqCst)
                || shared.stopping.load(Ordering::SeqCst)
            {
                drop(parked);
                answer_parked(shared, call, None);
                return;
            }
            parked.calls.push(call);
            return;
        }
        Action::Allow | Action::Trace => Response::Continue,
        Action::Deny { errno } => Response::Errno(errno),
        Action::Delay { ns } => {
            let started = Instant::now();
            let held = Held {
                due: started + Duration::from_nanos(ns),
                id: n.id,
                started,
                event,
                _in_flight: in_flight,
            };
            if let Err(held) = hold(shared, held) {
                // No timer (stopping): never leave a call parked.
                shared.answer(held.id, Response::Continue);
            }
            return;
        }
    };
    if shared.answer(n.id, response) {
        shared.emit(event);
    }
}

/// Answers the parked calls `which` selects (at most `limit`, oldest
/// first), each with an event saying it was released: failed with `deny`,
/// or decided by the rules under the hold (run, failed or delayed).
fn unpark_where<K: Kernel>(
    shared: &Arc<Shared<K>>,
    which: impl Fn(&Parked) -> bool,
    deny: Option<i32>,
    limit: Option<u64>,
) -> u64 {
    let taken: Vec<Parked> = {
        let mut parked = shared.parked();
        let mut taken = Vec::new();
        let mut kept = Vec::new();
        for p in parked.calls.drain(..) {
            if !which(&p) {
                kept.push(p);
            } else if !shared.kernel.id_valid(p.id) {
                // Its caller is gone: drop it, and do not count it.
                shared.interrupted.fetch_add(1, Ordering::Relaxed);
            } else if limit.is_none_or(|n| (taken.len() as u64) < n) {
                taken.push(p);
            } else {
                kept.push(p);
            }
        }
        parked.calls = kept;
        taken
    };
    taken
        .into_iter()
        .map(|p| u64::from(answer_parked(shared, p, deny)))
        .sum()
}

/// Answers one parked call: fails it with `deny`, or lets the rules under
/// the hold decide it (run, failed or delayed); its event says it was
/// released. False when its caller is gone.
fn answer_parked<K: Kernel>(shared: &Arc<Shared<K>>, p: Parked, deny: Option<i32>) -> bool {
    let action = match deny {
        Some(errno) => Action::Deny { errno },
        // Stopping or detached: no rule applies any more.
        None if shared.stopping.load(Ordering::SeqCst)
            || shared.detached.load(Ordering::SeqCst) =>
        {
            Action::Allow
        }
        None => {
            shared
                .engine()
                .decide_released(Call {
                    nr: p.nr,
                    path: p.event.path.as_deref(),
                })
                .action
        }
    };
    let mut event = p.event;
    event.decision = format!("{} (released)", action.describe()).into();
    let response = match action {
        Action::Deny { errno } => {
            event.errno = errno::by_number(errno).map(|e| e.name.into());
            Response::Errno(errno)
        }
        Action::Delay { ns } => {
            let held = Held {
                due: Instant::now() + Duration::from_nanos(ns),
                id: p.id,
                started: p.started,
                event,
                _in_flight: p._in_flight,
            };
            if let Err(held) = hold(shared, held) {
                return shared.answer(held.id, Response::Continue);
            }
            return true;
        }
        Action::Allow | Action::Trace | Action::Hold => Response::Continue,
    };
    event.latency_ns = Some(p.started.elapsed().as_nanos() as u64);
    let answered = shared.answer(p.id, response);
    if answered {
        shared.emit(event);
    }
    answered
}

/// Hands a delayed call to the timer, starting it on first use.
fn hold<K: Kernel>(shared: &Arc<Shared<K>>, held: Held) -> Result<(), Box<Held>> {
    let mut timer = shared.timer();
    if timer.tx.is_none() && !shared.stopping.load(Ordering::SeqCst) {
        let (tx, rx) = mpsc::channel();
        let timer_shared = Arc::clone(shared);
        if let Ok(thread) = thread::Builder::new()
            .name("faultbox-timer".into())
            .spawn(move || timer_loop(&timer_shared, rx))
        {
            timer.tx = Some(tx);
            timer.thread = Some(thread);
        }
    }
    let Some(tx) = &timer.tx else {
        return Err(Box::new(held));
    };
    match tx.send(TimerMsg::Hold(Box::new(held))) {
        Err(mpsc::SendError(TimerMsg::Hold(held))) => Err(held),
        _ => Ok(()),
    }
}

fn timer_loop<K: Kernel>(shared: &Shared<K>, rx: mpsc::Receiver<TimerMsg>) {
    let mut heap: BinaryHeap<Held> = BinaryHeap::new();
    let release = |held: Held| {
        let mut event = held.event;
        event.latency_ns = Some(held.started.elapsed().as_nanos() as u64);
        if shared.answer(held.id, Response::Continue) {
            shared.emit(event);
        }
    };
    loop {
        let msg = match heap.peek() {
            Some(next) => rx.recv_timeout(next.due.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match msg {
            Ok(TimerMsg::Hold(held)) => heap.push(*held),
            Ok(TimerMsg::ReleaseAll) => {
                while let Some(held) = heap.pop() {
                    release(held);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                while let Some(held) = heap.pop() {
                    release(held);
                }
                return;
            }
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|h| h.due <= now) {
            if let Some(held) = heap.pop() {
                release(held);
            }
        }
    }
}

fn resolve_path<K: Kernel>(kernel: &K, name: &str, n: &Notification) -> Option<String> {
    match syscalls::path_source(name)? {
        PathSource::Pointer { path, dirfd } => {
            let raw = kernel.read_string(n.pid, n.args[path])?;
            if raw.starts_with('/') {
                return Some(if needs_normalizing(&raw) {
                    normalize(Path::new(&raw))
                } else {
                    raw
                });
            }
            let base = match dirfd.map(|i| n.args[i] as i32) {
                None | Some(libc::AT_FDCWD) => kernel.readlink(&format!("/proc/{}/cwd", n.pid)),
                Some(fd) if fd >= 0 => kernel.readlink(&format!("/proc/{}/fd/{fd}", n.pid)),
                Some(_) => None,
            };
            Some(match base {
                Some(base) => normalize(&Path::new(&base).join(&raw)),
                None => raw,
            })
        }
        PathSource::Fd => {
            let fd = n.args[0] as i32;
            if fd < 0 {
                return None;
            }
            kernel.readlink(&format!("/proc/{}/fd/{fd}", n.pid))
        }
        PathSource::Sockaddr { addr, len } => {
            let len = (n.args[len] as usize).min(128);
            let raw = kernel.read_bytes(n.pid, n.args[addr], len)?;
            syscalls::describe_sockaddr(&raw)
        }
    }
}

/// Whether an absolute path has `.` or `..` components, doubled or
/// trailing slashes: the common clean path skips [`normalize`].
fn needs_normalizing(path: &str) -> bool {
    path.contains("//")
        || path.contains("/./")
        || path.contains("/../")
        || path.ends_with("/.")
        || path.ends_with("/..")
        || (path.len() > 1 && path.ends_with('/'))
}

/// Removes `.` and `..` lexically, the way a user reads the path.
fn normalize(path: &Path) -> String {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(c) => out.push(c),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out.to_string_lossy().into_owned()
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths_skip_normalizing_and_stay_the_same() {
        for p in [
            "/",
            "/etc/passwd",
            "/a/b.c",
            "/a//b",
            "/a/./b",
            "/a/../b",
            "/a/b/",
            "/a/.",
            "/a/..",
            "/.hidden/x",
            "/a/..b/c",
            "/a/b..",
        ] {
            let clean = normalize(Path::new(p));
            assert!(needs_normalizing(p) || clean == p, "{p} -> {clean}");
        }
    }
    use super::fake::*;
    use crate::rule::parse_fault;

    fn start(fake: &Arc<Fake>, specs: &[&str]) -> (Supervisor<Arc<Fake>>, Arc<EventQueue>) {
        let rules = specs
            .iter()
            .map(|s| parse_fault(s, X86).expect("rule"))
            .collect();
        let all = X86
            .all_names()
            .iter()
            .filter_map(|n| X86.number(n))
            .collect();
        let queue = Arc::new(EventQueue::new());
        let sup = Supervisor::new(Arc::clone(fake), X86, 1, all, rules, Arc::clone(&queue))
            .and_then(Supervisor::start)
            .expect("start");
        (sup, queue)
    }

    fn events(queue: &EventQueue) -> Vec<SyscallEvent> {
        queue
            .take_batch()
            .into_iter()
            .filter_map(|m| match m {
                ShimMessage::Syscall(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn relative_openat_is_resolved_against_the_callers_cwd() {
        let mut fake = Fake::default();
        fake.strings.insert(0x1000, "data/../data/x".into());
        fake.links.insert("/proc/100/cwd".into(), "/srv".into());
        let fake = Arc::new(fake);
        let (sup, rx) = start(&fake, &["openat=ENOENT:100%:/srv/data/*"]);
        push(
            &fake,
            notif(1, "openat", [libc::AT_FDCWD as u64, 0x1000, 0, 0, 0, 0]),
        );
        wait_answers(&fake, 1);
        sup.stop();
        assert_eq!(answers(&fake), vec![(1, Response::Errno(libc::ENOENT))]);
        let ev = events(&rx);
        assert_eq!(ev[0].path.as_deref(), Some("/srv/data/x"));
        assert_eq!(ev[0].errno.as_deref(), Some("ENOENT"));
        assert_eq!(ev[0].seq, 1);
    }

    #[test]
    fn fd_syscalls_use_the_fd_link_and_spare_dev_null() {
        let mut fake = Fake::default();
        fake.links
            .insert("/proc/100/fd/3".into(), "/tmp/wal".into());
        fake.links
            .insert("/proc/100/fd/4".into(), "/dev/null".into());
        let fake = Arc::new(fake);
        let (sup, rx) = start(&fake, &["write=EIO:100%"]);
        push(&fake, notif(1, "write", [3, 0, 0, 0, 0, 0]));
        push(&fake, notif(2, "write", [4, 0, 0, 0, 0, 0]));
        wait_answers(&fake, 2);
        sup.stop();
        assert_eq!(
            answers(&fake),
            vec![(1, Response::Errno(libc::EIO)), (2, Response::Continue)]
        );
        let ev = events(&rx);
        assert_eq!(ev[1].decision, "allow (system path)");
    }

    #[test]
    fn connect_rules_select_calls_by_destination() {
        let sockaddr = |port: u16| {
            let mut v = vec![0u8; 16];
            v[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            v[2..4].copy_from_slice(&port.to_be_bytes());
            v[4..8].copy_from_slice(&[127, 0, 0, 1]);
            v
        };
        let fake = Arc::new(Fake {
            bytes: std::collections::HashMap::from([
                (0x1000, sockaddr(5432)),
                (0x2000, sockaddr(6379)),
            ]),
            ..Fake::default()
        });
        let mut rule = parse_fault("connect=ECONNREFUSED:100%", X86).expect("rule");
        rule.path = Some("*:5432".into());
        let queue = Arc::new(EventQueue::new());
        let sup = Supervisor::new(
            Arc::clone(&fake),
            X86,
            1,
            vec![X86.number("connect").expect("nr")],
            vec![rule],
            Arc::clone(&queue),
        )
        .and_then(Supervisor::start)
        .expect("supervisor");
        push(&fake, notif(1, "connect", [3, 0x1000, 16, 0, 0, 0]));
        push(&fake, notif(2, "connect", [3, 0x2000, 16, 0, 0, 0]));
        wait_answers(&fake, 2);
        sup.stop();
        assert_eq!(
            answers(&fake),
            vec![
                (1, Response::Errno(libc::ECONNREFUSED)),
                (2, Response::Continue)
            ]
        );
        let paths: Vec<Option<String>> = events(&queue).into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            vec![Some("127.0.0.1:5432".into()), Some("127.0.0.1:6379".into())]
        );
    }

    /// A rule holding every getpid under tag "w".
    fn hold_w() -> Rule {
        let mut rule = parse_fault("getpid=EPERM:100%", X86).expect("rule");
        rule.action = Action::Hold;
        rule.label = Some("w".into());
        rule
    }

    /// A supervisor of getpid alone, with `rules`.
    fn getpid_supervisor(
        fake: &Arc<Fake>,
        rules: Vec<Rule>,
    ) -> (Supervisor<Arc<Fake>>, Arc<EventQueue>) {
        let queue = Arc::new(EventQueue::new());
        let sup = Supervisor::new(
            Arc::clone(fake),
            X86,
            1,
            vec![X86.number("getpid").expect("nr")],
            rules,
            Arc::clone(&queue),
        )
        .and_then(Supervisor::start)
        .expect("supervisor");
        (sup, queue)
    }

    #[test]
    fn held_calls_wait_for_their_release_and_are_always_answered() {
        let fake = Arc::new(Fake::default());
        let rule = hold_w();
        let (sup, queue) = getpid_supervisor(&fake, vec![rule.clone()]);
        push(&fake, notif(1, "getpid", [0; 6]));
        push(&fake, notif(2, "getpid", [0; 6]));
        let parked = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while sup.shared.parked().calls.len() < n {
                assert!(Instant::now() < deadline, "never parked");
                thread::sleep(Duration::from_millis(2));
            }
        };
        parked(2);
        assert!(answers(&fake).is_empty(), "a held call is not answered");
        assert_eq!(sup.release("other", None, None, None), 0);
        assert_eq!(sup.held("w").len(), 2);
        // Oldest first, one at a time.
        assert_eq!(sup.release("w", Some(libc::EIO), Some(1), None), 1);
        assert_eq!(answers(&fake), vec![(1, Response::Errno(libc::EIO))]);
        // Its rule going away answers the rest.
        sup.set_rules(vec![]).expect("rules");
        assert_eq!(
            answers(&fake),
            vec![(1, Response::Errno(libc::EIO)), (2, Response::Continue)]
        );
        sup.set_rules(vec![rule]).expect("rules");
        push(&fake, notif(3, "getpid", [0; 6]));
        parked(1);
        // Losing the controller answers it too.
        sup.detach();
        wait_answers(&fake, 3);
        sup.stop();
        let decisions: Vec<String> = events(&queue)
            .into_iter()
            .map(|e| e.decision.into_owned())
            .collect();
        assert_eq!(
            decisions,
            vec![
                "hold(w)",
                "hold(w)",
                "deny(input/output error) (released)",
                "allow (released)",
                "hold(w)",
                "allow (released)"
            ]
        );
    }

    #[test]
    fn a_call_held_by_a_rule_that_just_went_is_decided_not_parked() {
        let fake = Arc::new(Fake::default());
        let (sup, _queue) = getpid_supervisor(&fake, vec![hold_w()]);
        // What a rule change racing the decision leaves: the engine said
        // hold, but the tag is no longer in force when the call parks.
        sup.shared.parked().tags.clear();
        push(&fake, notif(1, "getpid", [0; 6]));
        wait_answers(&fake, 1);
        sup.stop();
        assert_eq!(answers(&fake), vec![(1, Response::Continue)]);
        assert!(sup.held("w").is_empty());
    }

    #[test]
    fn a_delayed_call_does_not_hold_up_the_next_one() {
        let fake = Arc::new(Fake::default());
        let (sup, rx) = start(&fake, &["connect=delay:300ms:100%", "getpid=EPERM:100%"]);
        let begin = Instant::now();
        push(&fake, notif(1, "connect", [0; 6]));
        push(&fake, notif(2, "getpid", [0; 6]));
        wait_answers(&fake, 2);
        sup.stop();
        let recorded = fake
            .answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        assert_eq!(recorded[0].0, 2, "getpid answered first");
        assert!(recorded[0].2 - begin < Duration::from_millis(200));
        assert_eq!(recorded[1].0, 1);
        assert!(recorded[1].2 - begin >= Duration::from_millis(300));
        let ev = events(&rx);
        let delayed = ev
            .iter()
            .find(|e| e.syscall == "connect")
            .expect("connect event");
        assert!(delayed.latency_ns.unwrap_or(0) >= 300_000_000);
        assert_eq!(delayed.decision, "delay(300ms)");
    }

    #[test]
    fn detaching_releases_held_calls_and_allows_everything_after() {
        let fake = Arc::new(Fake::default());
        let (sup, _rx) = start(&fake, &["connect=delay:60s:100%", "getpid=EPERM:100%"]);
        push(&fake, notif(1, "connect", [0; 6]));
        thread::sleep(Duration::from_millis(50));
        sup.detach();
        push(&fake, notif(2, "getpid", [0; 6]));
        wait_answers(&fake, 2);
        sup.stop();
        let got = answers(&fake);
        assert!(got.contains(&(1, Response::Continue)));
        assert!(got.contains(&(2, Response::Continue)));
    }

    #[test]
    fn stopping_releases_a_long_delay_immediately() {
        let fake = Arc::new(Fake::default());
        let (sup, _rx) = start(&fake, &["connect=delay:60s:100%"]);
        push(&fake, notif(1, "connect", [0; 6]));
        thread::sleep(Duration::from_millis(50));
        let begin = Instant::now();
        sup.stop();
        assert!(begin.elapsed() < Duration::from_secs(2));
        assert_eq!(answers(&fake), vec![(1, Response::Continue)]);
    }

    #[test]
    fn vanished_callers_are_counted_not_answered() {
        let mut fake = Fake::default();
        fake.strings.insert(0x1000, "/data/x".into());
        fake.vanished = vec![7];
        let fake = Arc::new(fake);
        let (sup, rx) = start(&fake, &["openat=ENOENT:100%"]);
        push(&fake, notif(7, "openat", [0, 0x1000, 0, 0, 0, 0]));
        let deadline = Instant::now() + Duration::from_secs(5);
        while sup.interrupted() == 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sup.interrupted(), 1);
        sup.stop();
        assert!(events(&rx).is_empty());
    }

    #[test]
    fn new_rules_take_effect_and_bad_rules_keep_the_old_ones() {
        let fake = Arc::new(Fake::default());
        let (sup, _rx) = start(&fake, &["getpid=EPERM:100%"]);
        let bad = Rule {
            syscalls: vec!["nosuch".into()],
            ..parse_fault("getpid=EIO:100%", X86).expect("rule")
        };
        assert!(sup.set_rules(vec![bad]).is_err());
        push(&fake, notif(1, "getpid", [0; 6]));
        wait_answers(&fake, 1);
        sup.set_rules(vec![parse_fault("getpid=EIO:100%", X86).expect("rule")])
            .expect("valid");
        push(&fake, notif(2, "getpid", [0; 6]));
        wait_answers(&fake, 2);
        sup.stop();
        assert_eq!(
            answers(&fake),
            vec![
                (1, Response::Errno(libc::EPERM)),
                (2, Response::Errno(libc::EIO))
            ]
        );
    }

    #[test]
    fn normalize_handles_dots_and_repeated_slashes() {
        assert_eq!(normalize(Path::new("/a//b/./c/../d")), "/a/b/d");
        assert_eq!(normalize(Path::new("/..")), "/");
    }
}

/// A scripted kernel for unit tests of the supervisor and the session.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::HashMap;
    use std::io;
    use std::sync::{Arc, Condvar, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    use super::Kernel;
    use crate::seccomp::{Notification, Response};
    use crate::syscalls::Arch;

    pub(crate) const X86: Arch = Arch::X86_64;

    /// A scripted kernel: notifications are queued by the test, answers recorded.
    #[derive(Default)]
    pub(crate) struct Fake {
        pub(crate) queue: Mutex<Vec<Notification>>,
        pub(crate) ready: Condvar,
        pub(crate) answers: Mutex<Vec<(u64, Response, Instant)>>,
        pub(crate) strings: HashMap<u64, String>,
        pub(crate) links: HashMap<String, String>,
        pub(crate) bytes: HashMap<u64, Vec<u8>>,
        pub(crate) vanished: Vec<u64>,
    }

    impl Kernel for Arc<Fake> {
        fn recv(&self) -> io::Result<Notification> {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if !q.is_empty() {
                    return Ok(q.remove(0));
                }
                let (guard, timeout) = self
                    .ready
                    .wait_timeout(q, Duration::from_millis(5))
                    .unwrap_or_else(|p| p.into_inner());
                q = guard;
                if timeout.timed_out() && q.is_empty() {
                    return Err(io::Error::from_raw_os_error(libc::EINTR));
                }
            }
        }
        fn respond(&self, id: u64, response: Response) -> io::Result<()> {
            if self.vanished.contains(&id) {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            self.answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((id, response, Instant::now()));
            Ok(())
        }
        fn id_valid(&self, id: u64) -> bool {
            !self.vanished.contains(&id)
        }
        fn read_string(&self, _pid: u32, addr: u64) -> Option<String> {
            self.strings.get(&addr).cloned()
        }
        fn readlink(&self, path: &str) -> Option<String> {
            self.links.get(path).cloned()
        }
        fn read_bytes(&self, _pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
            self.bytes
                .get(&addr)
                .map(|b| b[..len.min(b.len())].to_vec())
        }
    }

    pub(crate) fn notif(id: u64, name: &str, args: [u64; 6]) -> Notification {
        Notification {
            id,
            pid: 100,
            nr: X86.number(name).unwrap_or(u32::MAX),
            args,
        }
    }

    pub(crate) fn push(fake: &Fake, n: Notification) {
        fake.queue.lock().unwrap_or_else(|p| p.into_inner()).push(n);
        fake.ready.notify_all();
    }

    pub(crate) fn answers(fake: &Fake) -> Vec<(u64, Response)> {
        fake.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, r, _)| (*id, *r))
            .collect()
    }

    pub(crate) fn wait_answers(fake: &Fake, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while answers(fake).len() < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
    }
}
