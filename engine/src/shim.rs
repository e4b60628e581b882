//! The controller's side of one `faultbox-shim`: start it, launch the
//! target, stream its events, change rules, wait for barriers, stop it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use faultbox_agent::engine::RuleStats;
use faultbox_agent::process;
use faultbox_agent::rule::{Rule, RuleId};
use faultbox_agent::wire::{self, ControlMessage, LaunchSpec, ShimMessage, SyscallEvent};

/// What a shim reports while its target runs.
#[derive(Debug, Clone)]
pub enum ShimEvent {
    /// The filter is in place: the syscalls it intercepts.
    FilterInstalled {
        syscalls: Vec<String>,
        wait_killable: bool,
    },
    /// The target was executed (before any of its syscalls is reported).
    Started { pid: u32 },
    /// One intercepted syscall.
    Syscall(SyscallEvent),
    /// A rule change the shim refused; the rules before it stay.
    RulesRejected(String),
    /// The target exited (on its own or because it was stopped);
    /// `interrupted` notifications lost their caller before the answer.
    Exited { exit: ExitInfo, interrupted: u64 },
}

/// How the target ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// Shell convention: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        self.code.unwrap_or_else(|| 128 + self.signal.unwrap_or(0))
    }
}

#[derive(Default)]
struct State {
    exited: Option<ExitInfo>,
    reader_done: bool,
    synced: u64,
    rejected: Vec<(u64, String)>,
    /// Counters of the rules in force at the last barrier.
    stats: Vec<RuleStats>,
    /// Final counters of rules a rule change removed, until their window
    /// takes them.
    retired: HashMap<RuleId, RuleStats>,
    /// Answers to releases, by token: how many calls each answered.
    released: HashMap<u64, u64>,
    /// Answers to held-call listings, by token.
    held: HashMap<u64, Vec<faultbox_agent::wire::HeldCall>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `done` holds or the reader has ended, for at most
    /// `timeout`; returns the state as it then is.
    fn wait_for(&self, timeout: Duration, done: impl Fn(&State) -> bool) -> MutexGuard<'_, State> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !done(&state) && !state.reader_done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = match self.changed.wait_timeout(state, left) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
        state
    }
}

/// What went wrong between faultbox and a shim.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// `$FAULTBOX_SHIM` names something that cannot run.
    #[error("FAULTBOX_SHIM={} is not an executable file (unset it, or point it at a built faultbox-shim)", path.display())]
    BadOverride {
        /// The path it names.
        path: PathBuf,
    },
    /// No shim next to the faultbox binary.
    #[error("faultbox-shim not found at {} (build it with scripts/build, or set FAULTBOX_SHIM)", path.display())]
    NotFound {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A local step of starting or talking to the shim failed.
    #[error("{step}: {source}")]
    Io {
        /// What faultbox was doing.
        step: String,
        /// Why.
        source: std::io::Error,
    },
    /// A shim from another build.
    #[error("{} speaks protocol {version}, this faultbox speaks {}: install the faultbox-shim built with this faultbox", shim.display(), wire::PROTOCOL_VERSION)]
    Version {
        /// The shim.
        shim: PathBuf,
        /// Its protocol version.
        version: u32,
    },
    /// A shim that did not greet.
    #[error("{} did not start properly ({got}); rebuild it with this faultbox", shim.display())]
    Handshake {
        /// The shim.
        shim: PathBuf,
        /// What it sent instead.
        got: String,
    },
    /// The shim could not start the target.
    #[error("{message}")]
    LaunchFailed {
        /// The shim's reason.
        message: String,
        /// The shim's exit code (127: the program could not be executed).
        exit_code: i32,
    },
    /// The shim went away before the target started.
    #[error("the shim exited before starting the target")]
    ExitedEarly,
    /// The control socket is closed.
    #[error("the shim is gone ({0})")]
    Gone(std::io::Error),
    /// The target has exited, so it takes no rules.
    #[error("the service has exited")]
    TargetExited,
    /// No confirmation of new rules in time.
    #[error("the shim did not confirm the new rules within 5s")]
    Unconfirmed,
    /// The shim refused the rules.
    #[error("{reason}")]
    Rejected {
        /// The shim's reason.
        reason: String,
    },
}

impl ShimError {
    fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
        let step = step.into();
        move |source| ShimError::Io { step, source }
    }

    /// The shim's exit code, when it reported a failed launch.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            ShimError::LaunchFailed { exit_code, .. } => Some(*exit_code),
            _ => None,
        }
    }
}

/// Finds `faultbox-shim`: `$FAULTBOX_SHIM`, else next to the running binary.
pub fn locate() -> Result<PathBuf, ShimError> {
    if let Some(path) = std::env::var_os("FAULTBOX_SHIM") {
        let path = PathBuf::from(path);
        return if process::is_executable(&path) {
            Ok(path)
        } else {
            Err(ShimError::BadOverride { path })
        };
    }
    let exe = std::env::current_exe().map_err(ShimError::io("locate faultbox itself"))?;
    let path = exe.with_file_name("faultbox-shim");
    if process::is_executable(&path) {
        Ok(path)
    } else {
        Err(ShimError::NotFound { path })
    }
}

/// A shim started and greeted, with the launch request sent.
struct Connection {
    child: Option<Child>,
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
}

/// Starts `shim` on a control socket pair, checks its greeting and sends
/// `spec`. The target's output goes to `output`, or to this process's
/// own stdout and stderr. The one way both `faultbox run` and
/// `faultbox test` start a local shim (through [`Shim::launch`]).
fn connect(shim: &Path, spec: LaunchSpec, output: Option<File>) -> Result<Connection, ShimError> {
    let (ours, theirs) = UnixStream::pair().map_err(ShimError::io("socketpair"))?;
    process::make_inheritable(&theirs).map_err(ShimError::io("control socket"))?;
    let mut command = Command::new(shim);
    command
        .arg("--control")
        .arg(format!("fd:{}", theirs.as_raw_fd()));
    if let Some(out) = output {
        let err = out.try_clone().map_err(ShimError::io("log file"))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
    }
    let mut child = command
        .spawn()
        .map_err(ShimError::io(format!("start {}", shim.display())))?;
    drop(theirs);
    match handshake(ours, spec, shim) {
        Ok((reader, writer)) => Ok(Connection {
            child: Some(child),
            reader,
            writer,
        }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Checks a shim's greeting on `stream` and sends it `spec`.
fn handshake(
    stream: UnixStream,
    spec: LaunchSpec,
    shim: &Path,
) -> Result<(BufReader<UnixStream>, BufWriter<UnixStream>), ShimError> {
    // A shim that hangs before greeting must not hang its controller.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(15)));
    let clone = stream
        .try_clone()
        .map_err(ShimError::io("control socket"))?;
    let mut reader = BufReader::new(clone);
    let mut writer = BufWriter::new(stream);
    match wire::recv::<_, ShimMessage>(&mut reader) {
        Ok(Some(ShimMessage::Hello { version, .. })) if version == wire::PROTOCOL_VERSION => {}
        Ok(Some(ShimMessage::Hello { version, .. })) => {
            return Err(ShimError::Version {
                shim: shim.to_path_buf(),
                version,
            });
        }
        other => {
            return Err(ShimError::Handshake {
                shim: shim.to_path_buf(),
                got: format!("{other:?}"),
            });
        }
    }
    let _ = reader.get_ref().set_read_timeout(None);
    wire::send(&mut writer, &ControlMessage::Launch(Box::new(spec)))
        .and_then(|_| writer.flush())
        .map_err(ShimError::io("send the launch request to the shim"))?;
    Ok((reader, writer))
}

/// A running shim and its target.
pub struct Shim {
    /// The local shim process; `None` for one that dialled in from a
    /// container, whose lifetime its backend owns.
    child: Option<Child>,
    writer: Mutex<BufWriter<UnixStream>>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    /// The target's pid in the shim's namespace.
    pub pid: u32,
    /// The target's pid as this machine's /proc names it (differs from
    /// `pid` when the shim runs in a container's pid namespace).
    host_pid: AtomicU32,
    tokens: AtomicU64,
}

impl Shim {
    /// Starts `shim`, launches the target described by `spec` with its
    /// output in `log` (or this process's own stdout and stderr), and
    /// calls `on_event` for everything the shim reports: from this thread
    /// until the target runs, then from a reader thread.
    pub fn launch(
        shim: &Path,
        spec: LaunchSpec,
        log: Option<&Path>,
        on_event: Box<dyn Fn(ShimEvent) + Send>,
    ) -> Result<Shim, ShimError> {
        let out = match log {
            Some(log) => Some(
                File::create(log).map_err(ShimError::io(format!("create {}", log.display())))?,
            ),
            None => None,
        };
        Shim::begin(connect(shim, spec, out)?, on_event)
    }

    /// Takes over a shim that dialled in on `stream` (one started as a
    /// container's entrypoint): greets it, launches the target described
    /// by `spec` and serves it like [`Shim::launch`]. Stopping the shim's
    /// container is its backend's business.
    pub fn attach(
        stream: UnixStream,
        spec: LaunchSpec,
        shim: &Path,
        on_event: Box<dyn Fn(ShimEvent) + Send>,
    ) -> Result<Shim, ShimError> {
        let (reader, writer) = handshake(stream, spec, shim)?;
        Shim::begin(
            Connection {
                child: None,
                reader,
                writer,
            },
            on_event,
        )
    }

    /// Waits for the target to start, then reads the shim's reports on a
    /// thread of their own.
    fn begin(
        connection: Connection,
        on_event: Box<dyn Fn(ShimEvent) + Send>,
    ) -> Result<Shim, ShimError> {
        let Connection {
            mut child,
            mut reader,
            writer,
        } = connection;
        let reap = |child: &mut Option<Child>, kill: bool| {
            if let Some(c) = child.as_mut() {
                if kill {
                    let _ = c.kill();
                }
                let _ = c.wait();
            }
        };
        // A shim that hangs before the target starts must not hang the run.
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(15)));
        let pid = loop {
            match wire::recv::<_, ShimMessage>(&mut reader) {
                Ok(Some(ShimMessage::Started { pid })) => {
                    on_event(ShimEvent::Started { pid });
                    break pid;
                }
                Ok(Some(ShimMessage::FilterInstalled {
                    syscalls,
                    wait_killable,
                })) => on_event(ShimEvent::FilterInstalled {
                    syscalls,
                    wait_killable,
                }),
                Ok(Some(ShimMessage::LaunchFailed { message, exit_code })) => {
                    reap(&mut child, false);
                    return Err(ShimError::LaunchFailed { message, exit_code });
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    reap(&mut child, false);
                    return Err(ShimError::ExitedEarly);
                }
                Err(e) => {
                    reap(&mut child, true);
                    return Err(ShimError::io("waiting for the target to start")(e));
                }
            }
        };
        let _ = reader.get_ref().set_read_timeout(None);
        let shared = Arc::new(Shared::default());
        let reader = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || read_loop(reader, &shared, on_event))
        };
        Ok(Shim {
            child,
            writer: Mutex::new(writer),
            shared,
            reader: Some(reader),
            pid,
            host_pid: AtomicU32::new(pid),
            tokens: AtomicU64::new(0),
        })
    }

    /// Says where /proc finds the target, when the shim's pid namespace
    /// is not this machine's.
    pub fn set_host_pid(&self, pid: u32) {
        self.host_pid.store(pid, Ordering::SeqCst);
    }

    fn send(&self, message: &ControlMessage) -> Result<(), ShimError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        wire::send(&mut *w, message)
            .and_then(|_| w.flush())
            .map_err(ShimError::Gone)
    }

    /// The local shim process's pid (signals for the target go to it).
    pub fn shim_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Blocks until the shim's session ends; returns how the target ended
    /// (`None`: the shim went away without saying).
    pub fn wait_done(&self) -> Option<ExitInfo> {
        loop {
            let state = self
                .shared
                .wait_for(Duration::from_secs(3600), |s| s.reader_done);
            if state.reader_done {
                return state.exited;
            }
        }
    }

    /// How the target ended, if it has.
    pub fn exited(&self) -> Option<ExitInfo> {
        self.shared.lock().exited
    }

    /// Whether the target process is gone, a zombie or exiting, whether or not
    /// its exit has been reported yet.
    pub fn target_gone(&self) -> bool {
        process_gone(self.host_pid.load(Ordering::SeqCst))
    }

    /// Whether a thread of the target is running or ready to run (not
    /// asleep in a syscall, a held one included).
    pub fn target_busy(&self) -> bool {
        let pid = self.host_pid.load(Ordering::SeqCst);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().any(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()
                        .map(|r| r.trim_start().starts_with('R'))
                })
                .unwrap_or(false)
        })
    }

    /// Waits up to `timeout` for the target's exit to be reported.
    pub fn wait_exited(&self, timeout: Duration) -> Option<ExitInfo> {
        self.shared.wait_for(timeout, |s| s.exited.is_some()).exited
    }

    /// Waits until every event decided so far has been delivered to
    /// `on_event`. Returns false when the shim is gone or slow.
    pub fn sync(&self, timeout: Duration) -> bool {
        self.request_sync()
            .is_some_and(|token| self.wait_synced(token, timeout))
    }

    /// Sends a barrier request; returns its token (None: the shim is gone).
    pub fn request_sync(&self) -> Option<u64> {
        let token = self.tokens.fetch_add(1, Ordering::SeqCst) + 1;
        self.send(&ControlMessage::Sync { token })
            .ok()
            .map(|_| token)
    }

    /// Waits for the answer to [`Shim::request_sync`].
    pub fn wait_synced(&self, token: u64, timeout: Duration) -> bool {
        self.shared.wait_for(timeout, |s| s.synced >= token).synced >= token
    }

    /// Replaces the target's rules; an error carries the shim's reason.
    pub fn set_rules(&self, rules: Vec<Rule>) -> Result<(), ShimError> {
        let before = self.tokens.load(Ordering::SeqCst);
        self.send(&ControlMessage::SetRules { rules })?;
        if !self.sync(Duration::from_secs(5)) {
            if self.exited().is_some() {
                return Err(ShimError::TargetExited);
            }
            return Err(ShimError::Unconfirmed);
        }
        let state = self.shared.lock();
        match state.rejected.iter().rev().find(|(t, _)| *t > before) {
            Some((_, reason)) => Err(ShimError::Rejected {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Answers the calls its hold rules parked under `tag` (at most
    /// `limit`, oldest first): fails them with `deny`, or lets them run.
    /// Returns how many; their events have arrived when it returns.
    pub fn release(
        &self,
        tag: &str,
        deny: Option<i32>,
        limit: Option<u64>,
        call: Option<u64>,
    ) -> Result<u64, ShimError> {
        let token = self.tokens.fetch_add(1, Ordering::SeqCst) + 1;
        self.send(&ControlMessage::Release {
            token,
            tag: tag.to_string(),
            deny,
            limit,
            call,
        })?;
        let mut state = self
            .shared
            .wait_for(Duration::from_secs(5), |s| s.released.contains_key(&token));
        match state.released.remove(&token) {
            Some(count) => Ok(count),
            None if state.exited.is_some() => Err(ShimError::TargetExited),
            None => Err(ShimError::Unconfirmed),
        }
    }

    /// The calls held under `tag`, oldest first.
    pub fn held(&self, tag: &str) -> Result<Vec<faultbox_agent::wire::HeldCall>, ShimError> {
        let token = self.tokens.fetch_add(1, Ordering::SeqCst) + 1;
        self.send(&ControlMessage::Held {
            token,
            tag: tag.to_string(),
        })?;
        let mut state = self
            .shared
            .wait_for(Duration::from_secs(5), |s| s.held.contains_key(&token));
        match state.held.remove(&token) {
            Some(calls) => Ok(calls),
            None if state.exited.is_some() => Err(ShimError::TargetExited),
            None => Err(ShimError::Unconfirmed),
        }
    }

    /// The counters of rule `id`, for the window that owned it: final if
    /// a rule change removed it (they are handed over once, so a test's
    /// memory does not grow per window), else as of the last barrier. A
    /// held call is counted when it is decided, not when its event
    /// arrives.
    pub fn take_rule_stats(&self, id: &RuleId) -> Option<RuleStats> {
        let mut state = self.shared.lock();
        if let Some(s) = state.retired.remove(id) {
            return Some(s);
        }
        state.stats.iter().find(|s| &s.id == id).cloned()
    }

    /// Stops the target (SIGTERM, SIGKILL after `grace`) and the shim, and
    /// waits for both. Returns how the target ended.
    pub fn stop(mut self, grace: Duration) -> Option<ExitInfo> {
        if self.exited().is_none() {
            let _ = self.send(&ControlMessage::Stop);
        }
        let ended = self
            .shared
            .wait_for(grace + Duration::from_secs(2), |_| false)
            .reader_done;
        // The shim kills its target if it dies itself (parent-death signal).
        if let Some(child) = self.child.as_mut() {
            if !ended {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.exited()
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        // Only reached when `stop` was not called (a panic, an early
        // return): never leave the shim or its target behind.
        if self.reader.is_some()
            && let Some(child) = self.child.as_mut()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_loop(
    mut reader: BufReader<UnixStream>,
    shared: &Shared,
    on_event: Box<dyn Fn(ShimEvent) + Send>,
) {
    let mut last_token = 0;
    loop {
        match wire::recv::<_, ShimMessage>(&mut reader) {
            Ok(Some(ShimMessage::Syscall(e))) => on_event(ShimEvent::Syscall(e)),
            Ok(Some(ShimMessage::Synced { token, stats })) => {
                last_token = token;
                let mut state = shared.lock();
                state.synced = token;
                state.stats = stats;
                drop(state);
                shared.changed.notify_all();
            }
            Ok(Some(ShimMessage::HeldCalls { token, calls })) => {
                shared.lock().held.insert(token, calls);
                shared.changed.notify_all();
            }
            Ok(Some(ShimMessage::Released { token, count })) => {
                shared.lock().released.insert(token, count);
                shared.changed.notify_all();
            }
            Ok(Some(ShimMessage::RulesRetired { stats })) => {
                shared
                    .lock()
                    .retired
                    .extend(stats.into_iter().map(|s| (s.id.clone(), s)));
            }
            Ok(Some(ShimMessage::RulesRejected { message })) => {
                shared
                    .lock()
                    .rejected
                    .push((last_token + 1, message.clone()));
                on_event(ShimEvent::RulesRejected(message));
            }
            Ok(Some(ShimMessage::Exited {
                code,
                signal,
                interrupted,
            })) => {
                let info = ExitInfo { code, signal };
                on_event(ShimEvent::Exited {
                    exit: info,
                    interrupted,
                });
                shared.lock().exited = Some(info);
                shared.changed.notify_all();
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    shared.lock().reader_done = true;
    shared.changed.notify_all();
}

/// Whether process `pid` (as this machine's /proc names it) is gone, a
/// zombie or exiting.
pub(crate) fn process_gone(pid: u32) -> bool {
    // PF_EXITING is set when the exit starts, before the kernel closes
    // the target's sockets: a client that saw its connection end as
    // the target exited must find it exiting here, not alive.
    const PF_EXITING: u64 = 0x4;
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let zombie = fields.first().is_some_and(|s| s.starts_with(['Z', 'X']));
            let exiting = fields
                .get(6)
                .and_then(|f| f.parse::<u64>().ok())
                .is_some_and(|flags| flags & PF_EXITING != 0);
            zombie || exiting
        }
    }
}
