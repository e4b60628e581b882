//! The shim's session: everything `faultbox-shim` does between reaching
//! its controller and exiting. One target under a seccomp
//! user-notification filter; its intercepted syscalls answered from the
//! rules the controller sent; its process tree reaped; every event
//! reported back.
//!
//! It is the same code locally (the `faultbox` CLI starts the shim over a
//! socket pair) and as a container entrypoint (PID 1, dialling a socket).

use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use crate::process::{self, ChildSpec, ExitStatus, LaunchError, Pidfd, SignalSet};
use crate::rule::{RuleError, resolve_syscall};
use crate::supervisor::{Kernel, LiveKernel, Supervisor};
use crate::syscalls::Arch;
use crate::wire::{
    self, ControlMessage, Endpoint, EndpointError, EventQueue, LaunchSpec, OnDisconnect,
    ShimMessage,
};

/// Why a session ended before it could report to its controller.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The controller cannot be reached.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The shim's signals cannot be blocked.
    #[error("block signals: {0}")]
    Signals(std::io::Error),
    /// The control socket failed.
    #[error("control socket: {0}")]
    Control(std::io::Error),
    /// The controller spoke out of turn.
    #[error("expected a launch message first, got {got}")]
    NotLaunch {
        /// What it sent.
        got: String,
    },
    /// The controller left before launching.
    #[error("controller closed the connection before launching")]
    ClosedBeforeLaunch,
    /// The target's pidfd cannot be opened.
    #[error("pidfd_open: {0}")]
    Pidfd(std::io::Error),
}

/// Signals the shim forwards to its target.
const FORWARDED: &[i32] = &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Runs one session on the controller at `endpoint`: greet, take the
/// launch, start the target under its filter, serve its notifications,
/// stream events, obey rule changes and stops, and return the exit code
/// the shim should exit with.
pub fn run(endpoint: &Endpoint) -> Result<i32, SessionError> {
    // Before any thread exists, so every thread inherits the mask and only
    // the signal thread sees these signals (SIGCHLD included: it reaps
    // orphans and notices the target's exit).
    let signals =
        SignalSet::block(&[FORWARDED, &[libc::SIGCHLD]].concat()).map_err(SessionError::Signals)?;
    let stream = endpoint.connect()?;
    let mut reader = BufReader::new(stream.try_clone().map_err(SessionError::Control)?);
    let mut early = BufWriter::new(stream.try_clone().map_err(SessionError::Control)?);
    let hello = ShimMessage::Hello {
        version: wire::PROTOCOL_VERSION,
        pid: std::process::id(),
    };
    wire::send(&mut early, &hello)
        .and_then(|_| early.flush())
        .map_err(SessionError::Control)?;
    // The event writer starts with the session, before the launch message.
    let events = Arc::new(EventQueue::new());
    let writer = {
        let events = Arc::clone(&events);
        thread::spawn(move || write_loop(early, &events))
    };
    let spec = match wire::recv::<_, ControlMessage>(&mut reader) {
        Ok(Some(ControlMessage::Launch(spec))) => spec,
        other => {
            let error = match other {
                Ok(Some(got)) => SessionError::NotLaunch {
                    got: format!("{got:?}"),
                },
                Ok(None) => SessionError::ClosedBeforeLaunch,
                Err(e) => SessionError::Control(e),
            };
            finish_failed(events, writer, error.to_string(), 1);
            return Err(error);
        }
    };
    // Every thread the session needs exists before the fork: a thread
    // created while the child sets itself up or execs competes with it
    // (copy-on-write faults, a busy second CPU) and made launches slower
    // (docs/benchmarks.md). The control and signal threads get the session
    // once the target runs.
    let (to_control, control_session) = mpsc::channel::<Arc<Session>>();
    thread::spawn(move || {
        if let Ok(session) = control_session.recv() {
            control_loop(&session, reader);
        }
    });
    let (to_signals, signal_session) = mpsc::channel::<Arc<Session>>();
    thread::spawn(move || {
        if let Ok(session) = signal_session.recv() {
            signal_loop(&session, &signals);
        }
    });

    let arch = Arch::native();
    let nrs = match intercepted(arch, &spec) {
        Ok(nrs) => nrs,
        Err(message) => return Ok(finish_failed(events, writer, message, 1)),
    };
    let credentials = match spec.user.as_deref().map(lookup_user).transpose() {
        Ok(c) => c,
        Err(e) => return Ok(finish_failed(events, writer, e.to_string(), 1)),
    };
    if let Err(e) = process::isolate(spec.isolation) {
        return Ok(finish_failed(events, writer, e.to_string(), 1));
    }
    if let Err(e) = process::become_subreaper() {
        return Ok(finish_failed(
            events,
            writer,
            format!("become the subreaper: {e}"),
            1,
        ));
    }
    // A container's entrypoint names its program as the image does, often
    // bare ("docker-entrypoint.sh"): look it up on the target's own PATH,
    // as exec would in the container.
    let env: Vec<String> = if spec.inherit_env {
        let mut merged: std::collections::BTreeMap<String, String> = std::env::vars().collect();
        for e in &spec.env {
            let (k, v) = e.split_once('=').unwrap_or((e.as_str(), ""));
            merged.insert(k.to_string(), v.to_string());
        }
        merged
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    } else {
        spec.env.clone()
    };
    let path_var = env.iter().find_map(|e| e.strip_prefix("PATH="));
    let Some(program) = process::resolve_program(&spec.program, path_var) else {
        let message = format!(
            "{:?} was not found on the target's PATH ({})",
            spec.program,
            path_var.unwrap_or("unset")
        );
        return Ok(finish_failed(events, writer, message, 127));
    };
    let mut child =
        match ChildSpec::new(&program, &spec.argv, &env, spec.cwd.as_deref(), arch, &nrs)
            .map(|c| match credentials {
                Some((uid, gid)) => c.with_credentials(uid, gid),
                None => c,
            })
            .and_then(|c| process::spawn(&c.in_new_pid_namespace(spec.isolation.namespaces)))
        {
            Ok(child) => child,
            Err(e) => return Ok(finish_failed(events, writer, e.to_string(), 1)),
        };
    // The child execs on the go-ahead while the supervisor is prepared:
    // its intercepted calls wait in the kernel until `serve` below.
    if let Err(e) = child.go() {
        return Ok(finish_failed(events, writer, e.to_string(), 1));
    }
    let supervisor = match child.listener.take() {
        Some(listener) => match Supervisor::new(
            LiveKernel::new(listener),
            arch,
            spec.seed,
            nrs.clone(),
            spec.rules.clone(),
            Arc::clone(&events),
        ) {
            Ok(s) => Some(s),
            Err(e) => {
                process::kill(child.pid, libc::SIGKILL);
                let _ = process::wait_for(child.pid);
                return Ok(finish_failed(events, writer, e.to_string(), 1));
            }
        },
        None => None,
    };
    events.push_now(ShimMessage::FilterInstalled {
        syscalls: nrs
            .iter()
            .filter_map(|nr| arch.name(*nr).map(str::to_string))
            .collect(),
        wait_killable: child.wait_killable,
    });
    if let Err(e) = child.exec_result() {
        // The child is gone: nothing can be parked on the listener.
        let message = match &e {
            LaunchError::Exec { program, errno }
                if *errno == libc::ENOENT && std::path::Path::new(program).exists() =>
            {
                format!("{e} (the file exists: its interpreter or dynamic loader is missing)")
            }
            _ => e.to_string(),
        };
        let code = if matches!(e, LaunchError::Exec { .. }) {
            127
        } else {
            1
        };
        return Ok(finish_failed(events, writer, message, code));
    }
    let target = Pidfd::open(child.pid).map_err(SessionError::Pidfd)?;
    events.push_now(ShimMessage::Started {
        pid: child.pid as u32,
    });

    let session = Arc::new(Session {
        supervisor,
        target,
        target_pid: child.pid,
        pid_one: spec.isolation.namespaces,
        policy: spec.on_disconnect,
        grace: Duration::from_millis(spec.stop_grace_ms),
        escalating: AtomicBool::new(false),
        lost: AtomicBool::new(false),
        events: Arc::clone(&events),
    });
    let _ = to_control.send(Arc::clone(&session));
    let _ = to_signals.send(Arc::clone(&session));

    // This thread serves the notifications until every filtered task is
    // gone, or the target exits (the signal thread sees its SIGCHLD and
    // calls `leave`) while descendants still run.
    if let Some(s) = &session.supervisor {
        s.serve();
    }
    let status = loop {
        match process::wait_any() {
            Some((pid, status)) if pid == child.pid => break status,
            Some(_) => continue,
            None => break ExitStatus::Code(1),
        }
    };
    // Nothing the target started may outlive it.
    loop {
        for pid in process::children_of(std::process::id()) {
            process::kill(pid, libc::SIGKILL);
        }
        if process::wait_any().is_none() {
            break;
        }
    }
    let interrupted = session.supervisor.as_ref().map_or(0, |s| {
        s.quiesce();
        // The rules in force hand over their final counters with the
        // exit: a target killed by a fault cannot answer the barrier
        // that would otherwise report them, and its window would count
        // no hit.
        let stats = s.stats();
        if !stats.is_empty() {
            events.push_now(ShimMessage::RulesRetired { stats });
        }
        s.interrupted()
    });
    let (code, signal) = match status {
        ExitStatus::Code(c) => (Some(c), None),
        ExitStatus::Signal(s) => (None, Some(s)),
    };
    events.push_now(ShimMessage::Exited {
        code,
        signal,
        interrupted,
    });
    let _ = writer.join();
    crate::tunnel::drain(Duration::from_secs(5));
    Ok(status.shell_code())
}

/// Forwards signals sent to the shim, and watches the target's children:
/// orphans reparented to the shim are reaped as they exit, and the
/// target's own exit ends `serve` even while its descendants live on.
fn signal_loop(session: &Arc<Session>, signals: &SignalSet) {
    loop {
        let (sig, explicit) = signals.wait();
        if sig == libc::SIGCHLD {
            process::reap_orphans(session.target_pid);
            if process::has_exited(session.target_pid)
                && let Some(s) = &session.supervisor
            {
                s.leave();
            }
            continue;
        }
        // A terminal's Ctrl-C reached the target already (same process
        // group); forwarding it again would deliver it twice.
        if explicit {
            session.target.signal(sig);
        }
        if sig != libc::SIGHUP {
            session.escalate_after_grace();
        }
    }
}

/// The syscall numbers the filter intercepts: every syscall a rule names,
/// plus those the controller asked for so that later rules can use them.
fn intercepted(arch: Arch, spec: &LaunchSpec) -> Result<Vec<u32>, String> {
    let mut nrs = Vec::new();
    for rule in &spec.rules {
        nrs.extend(rule.validate(arch).map_err(|e| e.to_string())?);
    }
    for name in &spec.intercept {
        nrs.push(resolve_syscall(arch, name).map_err(|e| e.to_string())?);
    }
    nrs.sort_unstable();
    nrs.dedup();
    Ok(nrs)
}

/// Reports a launch that failed and returns the shim's exit code.
fn finish_failed(
    events: Arc<EventQueue>,
    writer: thread::JoinHandle<()>,
    message: String,
    exit_code: i32,
) -> i32 {
    events.push_now(ShimMessage::LaunchFailed { message, exit_code });
    drop(events);
    let _ = writer.join();
    crate::tunnel::drain(Duration::from_secs(5));
    exit_code
}

struct Session {
    supervisor: Option<Supervisor<LiveKernel>>,
    target: Pidfd,
    target_pid: i32,
    /// The target is PID 1 of its own namespace.
    pid_one: bool,
    policy: OnDisconnect,
    grace: Duration,
    escalating: AtomicBool,
    lost: AtomicBool,
    events: Arc<EventQueue>,
}

impl Session {
    /// SIGTERM now, SIGKILL after the grace period.
    fn stop_target(self: &Arc<Self>) {
        // The kernel drops signals a PID 1 has no handler for, so SIGTERM
        // to a target that never asked for it would only cost the grace
        // period (most interpreters and C servers install no handler).
        if self.pid_one && !process::catches_signal(self.target_pid, libc::SIGTERM) {
            self.target.signal(libc::SIGKILL);
            return;
        }
        self.target.signal(libc::SIGTERM);
        self.escalate_after_grace();
    }

    fn escalate_after_grace(self: &Arc<Self>) {
        if self.escalating.swap(true, Ordering::SeqCst) {
            return;
        }
        let session = Arc::clone(self);
        thread::spawn(move || {
            thread::sleep(session.grace);
            // Through the pidfd: a recycled pid can never be hit.
            session.target.signal(libc::SIGKILL);
        });
    }

    fn controller_lost(self: &Arc<Self>) {
        if self.lost.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(s) = &self.supervisor {
            s.detach();
        }
        if self.policy == OnDisconnect::StopTarget {
            // The polite path even for a PID 1 that ignores SIGTERM: the
            // calls just released get the grace period to complete, so the
            // target sees them succeed rather than dying mid-call.
            self.target.signal(libc::SIGTERM);
            self.escalate_after_grace();
        }
    }
}

fn control_loop(session: &Arc<Session>, mut reader: BufReader<UnixStream>) {
    loop {
        let message = match wire::recv::<_, ControlMessage>(&mut reader) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => {
                session.controller_lost();
                return;
            }
        };
        match obey(session.supervisor.as_ref(), message) {
            Obey::Reply(reply) => session.events.push_now(reply),
            Obey::Signal(signal) => session.target.signal(signal),
            Obey::Stop => session.stop_target(),
            Obey::Nothing => {}
        }
    }
}

/// What a control message asks of the session.
#[derive(Debug, PartialEq)]
enum Obey {
    /// Report this to the controller.
    Reply(ShimMessage),
    /// Send the target this signal.
    Signal(i32),
    /// Stop the target politely.
    Stop,
    /// Nothing to do or say.
    Nothing,
}

/// Carries out one control message on the rules and says what else the
/// session must do: the policy of the control loop, without its socket
/// or its target.
fn obey<K: Kernel>(supervisor: Option<&Supervisor<K>>, message: ControlMessage) -> Obey {
    match message {
        ControlMessage::SetRules { rules } => {
            let result = match supervisor {
                Some(s) => s.set_rules(rules),
                None => Err(RuleError::NoFilter),
            };
            match result {
                Ok(stats) if stats.is_empty() => Obey::Nothing,
                Ok(stats) => Obey::Reply(ShimMessage::RulesRetired { stats }),
                Err(e) => Obey::Reply(ShimMessage::RulesRejected {
                    message: e.to_string(),
                }),
            }
        }
        ControlMessage::Signal { signal } => Obey::Signal(signal),
        ControlMessage::Stop => Obey::Stop,
        // Events are queued before the target sees its answer, so this
        // lands after every call decided so far.
        ControlMessage::Sync { token } => Obey::Reply(ShimMessage::Synced {
            token,
            stats: supervisor.map(Supervisor::stats).unwrap_or_default(),
        }),
        ControlMessage::Release {
            token,
            tag,
            deny,
            limit,
            call,
        } => Obey::Reply(ShimMessage::Released {
            token,
            count: supervisor.map_or(0, |s| s.release(&tag, deny, limit, call)),
        }),
        ControlMessage::Held { token, tag } => Obey::Reply(ShimMessage::HeldCalls {
            token,
            calls: supervisor.map(|s| s.held(&tag)).unwrap_or_default(),
        }),
        ControlMessage::Launch(_) => Obey::Reply(ShimMessage::RulesRejected {
            message: "a shim runs one target; launch another shim".into(),
        }),
    }
}

/// Writes messages until the last one of a session (`Exited` or
/// `LaunchFailed`).
fn write_loop(mut out: BufWriter<UnixStream>, events: &EventQueue) {
    let mut healthy = true;
    loop {
        let batch = events.take_batch();
        if batch.is_empty() {
            continue;
        }
        let last = batch.iter().any(|m| {
            matches!(
                m,
                ShimMessage::Exited { .. } | ShimMessage::LaunchFailed { .. }
            )
        });
        for message in &batch {
            if healthy && wire::send(&mut out, message).is_err() {
                healthy = false;
            }
        }
        if healthy && out.flush().is_err() {
            healthy = false;
        }
        if last {
            // The end of the stream: over TLS, this is what lets the pump
            // send the rest and close, before the shim exits.
            let _ = out.get_ref().shutdown(std::net::Shutdown::Write);
            return;
        }
    }
}

/// Finds `name` in `/etc/passwd`. A static binary has no NSS, so accounts
/// from LDAP and the like are not visible; a numeric `uid[:gid]` works for
/// those.
fn lookup_user(name: &str) -> Result<(u32, u32), LaunchError> {
    if !process::is_root() {
        return Err(LaunchError::Account {
            name: name.to_string(),
            reason: "needs faultbox to run as root (switching accounts needs CAP_SETUID)".into(),
        });
    }
    process::lookup_account(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::parse_fault;
    use crate::seccomp::Response;
    use crate::supervisor::fake::*;

    fn supervisor(fake: &Arc<Fake>, intercept: &[&str]) -> Supervisor<Arc<Fake>> {
        let nrs = intercept.iter().filter_map(|n| X86.number(n)).collect();
        Supervisor::new(
            Arc::clone(fake),
            X86,
            7,
            nrs,
            Vec::new(),
            Arc::new(EventQueue::new()),
        )
        .and_then(Supervisor::start)
        .expect("supervisor")
    }

    fn set_rules(specs: &[&str]) -> ControlMessage {
        ControlMessage::SetRules {
            rules: specs
                .iter()
                .map(|s| parse_fault(s, X86).expect("rule"))
                .collect(),
        }
    }

    #[test]
    fn rules_apply_and_sync_reports_their_counters() {
        let fake = Arc::new(Fake::default());
        let sup = supervisor(&fake, &["fsync"]);
        assert_eq!(
            obey(Some(&sup), set_rules(&["fsync=EIO:100%"])),
            Obey::Nothing
        );
        push(&fake, notif(1, "fsync", [3, 0, 0, 0, 0, 0]));
        wait_answers(&fake, 1);
        assert_eq!(answers(&fake), [(1, Response::Errno(libc::EIO))]);
        let Obey::Reply(ShimMessage::Synced { token, stats }) =
            obey(Some(&sup), ControlMessage::Sync { token: 9 })
        else {
            panic!("no Synced reply");
        };
        assert_eq!(token, 9);
        assert_eq!((stats[0].matched, stats[0].fired), (1, 1));
    }

    #[test]
    fn replaced_rules_are_retired_with_their_final_counters() {
        let fake = Arc::new(Fake::default());
        let sup = supervisor(&fake, &["fsync", "write"]);
        obey(Some(&sup), set_rules(&["fsync=EIO:100%"]));
        push(&fake, notif(1, "fsync", [3, 0, 0, 0, 0, 0]));
        push(&fake, notif(2, "fsync", [3, 0, 0, 0, 0, 0]));
        wait_answers(&fake, 2);
        let Obey::Reply(ShimMessage::RulesRetired { stats }) =
            obey(Some(&sup), set_rules(&["write=ENOSPC:100%"]))
        else {
            panic!("no RulesRetired reply");
        };
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].id.to_string(), "fsync=EIO:100%");
        assert_eq!((stats[0].matched, stats[0].fired), (2, 2));
        // The retired rule no longer decides: fsync runs.
        push(&fake, notif(3, "fsync", [3, 0, 0, 0, 0, 0]));
        wait_answers(&fake, 3);
        assert_eq!(answers(&fake)[2], (3, Response::Continue));
    }

    #[test]
    fn a_rule_outside_the_launch_filter_is_rejected_and_the_old_rules_stay() {
        let fake = Arc::new(Fake::default());
        let sup = supervisor(&fake, &["fsync"]);
        obey(Some(&sup), set_rules(&["fsync=EIO:100%"]));
        let Obey::Reply(ShimMessage::RulesRejected { message }) =
            obey(Some(&sup), set_rules(&["connect=ECONNREFUSED:100%"]))
        else {
            panic!("no RulesRejected reply");
        };
        assert!(
            message.contains("targets connect") && message.contains("fixed at launch"),
            "{message}"
        );
        push(&fake, notif(1, "fsync", [3, 0, 0, 0, 0, 0]));
        wait_answers(&fake, 1);
        assert_eq!(answers(&fake), [(1, Response::Errno(libc::EIO))]);
    }

    #[test]
    fn a_target_without_a_filter_refuses_rules_and_syncs_with_no_counters() {
        let none: Option<&Supervisor<Arc<Fake>>> = None;
        let Obey::Reply(ShimMessage::RulesRejected { message }) =
            obey(none, set_rules(&["fsync=EIO:100%"]))
        else {
            panic!("no RulesRejected reply");
        };
        assert!(message.contains("without a seccomp filter"), "{message}");
        assert_eq!(
            obey(none, ControlMessage::Sync { token: 1 }),
            Obey::Reply(ShimMessage::Synced {
                token: 1,
                stats: Vec::new()
            })
        );
    }

    #[test]
    fn signals_stops_and_a_second_launch_go_where_they_belong() {
        let none: Option<&Supervisor<Arc<Fake>>> = None;
        assert_eq!(
            obey(
                none,
                ControlMessage::Signal {
                    signal: libc::SIGUSR1
                }
            ),
            Obey::Signal(libc::SIGUSR1)
        );
        assert_eq!(obey(none, ControlMessage::Stop), Obey::Stop);
        let spec = LaunchSpec::default();
        let Obey::Reply(ShimMessage::RulesRejected { message }) =
            obey(none, ControlMessage::Launch(Box::new(spec)))
        else {
            panic!("no RulesRejected reply");
        };
        assert!(message.contains("one target"), "{message}");
    }
}
