//! The controller ⇄ shim protocol: one JSON object per line over one stream
//! socket (a Unix socket locally, TCP with a per-run secret in a cluster).
//!
//! 1. The shim sends [`ShimMessage::Hello`] with its protocol version.
//! 2. The controller sends [`ControlMessage::Launch`]; the shim answers with
//!    [`ShimMessage::FilterInstalled`] and [`ShimMessage::Started`], or
//!    [`ShimMessage::LaunchFailed`].
//! 3. The shim streams [`ShimMessage::Syscall`] events; the controller may
//!    send [`ControlMessage::SetRules`] or [`ControlMessage::Signal`] at any
//!    time.
//! 4. The shim ends with [`ShimMessage::Exited`] and closes the socket.
//!
//! A line that does not parse ends the session: both sides are ours and
//! built together, so a mismatch is a bug to report, not to tolerate.
//!
//! Messages are externally tagged (`{"set_rules": {...}}`, `"stop"`), and
//! so are the rule enums inside them. serde decodes an internally tagged
//! enum by buffering it first, and under serde_json's `arbitrary_precision`
//! a buffered number can no longer be read as `f64` or `u64`. starlark
//! turns that feature on, and cargo's feature unification hands it to
//! every crate of a whole-workspace build, the shim included: with
//! internally tagged messages, `cargo build --workspace` made a shim that
//! refused every launch. Externally tagged enums decode straight from the
//! stream, whatever the features.

use std::borrow::Cow;
use std::io::{self, BufRead, Write};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::RuleStats;
use crate::rule::{Rule, RuleId};

/// Protocol version; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 3;

/// A `--control` value that does not parse, or a controller that cannot
/// be reached.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// `fd:` with something other than a descriptor number.
    #[error("bad control fd {text:?}; {}", Endpoint::USAGE)]
    BadFd {
        /// What followed `fd:`.
        text: String,
    },
    /// Neither `fd:` nor `unix:`.
    #[error("unknown control endpoint {text:?}; {}", Endpoint::USAGE)]
    Unknown {
        /// The value as given.
        text: String,
    },
    /// The inherited descriptor is not a usable Unix socket.
    #[error("control fd {fd}: {source}")]
    Adopt {
        /// The descriptor.
        fd: i32,
        /// Why.
        source: std::io::Error,
    },
    /// Nobody listens at the path.
    #[error("cannot connect to controller at {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `tls:` whose address is not `IP:PORT`.
    #[error(
        "bad control address {text:?} (an IP address and port: a static shim resolves no names); {}",
        Endpoint::USAGE
    )]
    BadAddress {
        /// What followed `tls:`.
        text: String,
    },
    /// The TLS channel cannot be set up, or the controller refused it.
    #[error(transparent)]
    Tunnel(#[from] crate::tunnel::TunnelError),
}

impl PartialEq for EndpointError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

/// Where a shim reaches its controller (`--control`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An inherited socket: one end of a socket pair the controller made.
    Fd(i32),
    /// A Unix socket the controller listens on (a bind-mounted directory
    /// in a container).
    Unix(std::path::PathBuf),
    /// The controller at an address, over mutual TLS with the credentials
    /// in a directory (a service pod: the run's Secret).
    Tls {
        addr: std::net::SocketAddr,
        credentials: std::path::PathBuf,
    },
}

impl Endpoint {
    /// The shim's usage line.
    pub const USAGE: &'static str = "usage: faultbox-shim --control fd:N | --control unix:PATH | --control tls:IP:PORT@DIR (DIR holds ca.crt, tls.crt, tls.key) | --install PATH";

    /// Parses `fd:N` or `unix:PATH`.
    pub fn parse(text: &str) -> Result<Endpoint, EndpointError> {
        if let Some(fd) = text.strip_prefix("fd:") {
            fd.parse()
                .ok()
                .filter(|n: &i32| *n >= 0)
                .map(Endpoint::Fd)
                .ok_or_else(|| EndpointError::BadFd { text: fd.into() })
        } else if let Some(path) = text.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            Ok(Endpoint::Unix(path.into()))
        } else if let Some(rest) = text.strip_prefix("tls:") {
            let (addr, dir) = rest.split_once('@').unwrap_or((rest, ""));
            let addr = addr
                .parse()
                .map_err(|_| EndpointError::BadAddress { text: addr.into() })?;
            if dir.is_empty() {
                return Err(EndpointError::Unknown { text: text.into() });
            }
            Ok(Endpoint::Tls {
                addr,
                credentials: dir.into(),
            })
        } else {
            Err(EndpointError::Unknown { text: text.into() })
        }
    }

    /// Connects (or adopts the inherited socket).
    pub fn connect(&self) -> Result<std::os::unix::net::UnixStream, EndpointError> {
        match self {
            Endpoint::Fd(fd) => crate::process::adopt_unix_stream(*fd)
                .map_err(|source| EndpointError::Adopt { fd: *fd, source }),
            Endpoint::Unix(path) => {
                std::os::unix::net::UnixStream::connect(path).map_err(|source| {
                    EndpointError::Connect {
                        path: path.clone(),
                        source,
                    }
                })
            }
            Endpoint::Tls { addr, credentials } => {
                let config =
                    crate::tunnel::client_config(&crate::tunnel::Credentials::in_dir(credentials))?;
                Ok(crate::tunnel::dial(*addr, config)?)
            }
        }
    }
}

/// What the shim does when its controller goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    /// Release every held call, then stop the target (local runs).
    #[default]
    StopTarget,
    /// Release every held call and keep the target running with no faults
    /// (cluster runs, where the pod must keep serving).
    AllowAll,
}

/// Namespaces the shim puts the target in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Isolation {
    /// New user namespace mapping the caller to root, plus new PID and mount
    /// namespaces: the target is PID 1 with a private mount table.
    pub namespaces: bool,
    /// Also a new network namespace with only loopback.
    pub network: bool,
}

/// Everything the shim needs to start a target.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// Path of the program to execute.
    pub program: String,
    /// Arguments, `argv[0]` included (usually the program as the user wrote it).
    pub argv: Vec<String>,
    /// The complete environment of the target, `KEY=VALUE`; with
    /// `inherit_env`, what overrides the shim's own.
    pub env: Vec<String>,
    /// Start from the shim's own environment (a pod's: what the image and
    /// the runtime gave the container), then apply `env` over it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inherit_env: bool,
    /// Working directory, or the shim's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Syscalls the filter intercepts besides those the rules name, so that
    /// rules sent later can target them.
    #[serde(default)]
    pub intercept: Vec<String>,
    /// The initial rules.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Seed for the rules' RNGs.
    pub seed: u64,
    /// Namespaces to create.
    #[serde(default)]
    pub isolation: Isolation,
    /// Policy when the controller disconnects.
    #[serde(default)]
    pub on_disconnect: OnDisconnect,
    /// Grace between SIGTERM and SIGKILL when the shim stops the target.
    #[serde(default = "default_stop_grace_ms")]
    pub stop_grace_ms: u64,
    /// Account to run the target as (a name from `/etc/passwd`); the shim
    /// must run as root for this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

fn default_stop_grace_ms() -> u64 {
    2_000
}

/// Messages from the controller to the shim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlMessage {
    /// Start the target.
    Launch(Box<LaunchSpec>),
    /// Replace the rules (counters restart).
    SetRules {
        /// The new rules.
        rules: Vec<Rule>,
    },
    /// Send a signal to the target.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// Stop the target: SIGTERM, then SIGKILL after the stop grace.
    Stop,
    /// Ask for [`ShimMessage::Synced`] once every event decided so far has
    /// been sent: a barrier before the controller reads its trace.
    Sync {
        /// Echoed back.
        token: u64,
    },
    /// Answer the calls held under `tag` (oldest first, at most `limit`):
    /// run them, or fail them with `deny`. Answered with
    /// [`ShimMessage::Released`].
    Release {
        /// Echoed back.
        token: u64,
        /// The hold rules' label.
        tag: String,
        /// The errno to fail them with; `None` lets them run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deny: Option<i32>,
        /// How many at most; `None` for all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
        /// Only the call whose `hold(...)` event has this sequence number.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call: Option<u64>,
    },
    /// List the calls held under `tag`: answered with
    /// [`ShimMessage::HeldCalls`].
    Held {
        /// Echoed back.
        token: u64,
        /// The hold rules' label.
        tag: String,
    },
}

/// A call a hold rule has parked, as [`ShimMessage::HeldCalls`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldCall {
    /// The sequence number of its `hold(...)` event.
    pub seq: u64,
    /// The syscall.
    pub syscall: String,
    /// Its path, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// One intercepted syscall.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyscallEvent {
    /// Sequence number within the session, from 1.
    pub seq: u64,
    /// Wall-clock time of the decision, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Process id of the caller, in the shim's PID namespace.
    pub pid: u32,
    /// Syscall name. The text fields are `Cow` so that the supervisor
    /// fills them from static tables without allocating per call.
    pub syscall: Cow<'static, str>,
    /// Decision text: `allow`, `allow (system path)`, `deny(...)`, `delay(...)`.
    pub decision: Cow<'static, str>,
    /// The errno name, for denies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<Cow<'static, str>>,
    /// The path the call touched, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// How long a delayed call was held, nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ns: Option<u64>,
    /// Id of the rule that fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleId>,
    /// The firing rule's label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// Messages from the shim to the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShimMessage {
    /// First message of a session.
    Hello {
        /// [`PROTOCOL_VERSION`] of the shim.
        version: u32,
        /// The shim's pid.
        pid: u32,
    },
    /// The filter is in place (sent even when it intercepts nothing).
    FilterInstalled {
        /// Names of the intercepted syscalls.
        syscalls: Vec<String>,
        /// Whether `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` was accepted.
        wait_killable: bool,
    },
    /// The target was executed.
    Started {
        /// Its pid, in the shim's PID namespace.
        pid: u32,
    },
    /// The target could not be started.
    LaunchFailed {
        /// What failed and how to fix it.
        message: String,
        /// Exit code the shim will exit with (127 when exec failed).
        exit_code: i32,
    },
    /// A rule set was rejected; the previous rules stay in force.
    RulesRejected {
        /// Why.
        message: String,
    },
    /// One intercepted syscall.
    Syscall(SyscallEvent),
    /// Answer to [`ControlMessage::Sync`]: every earlier event precedes it.
    Synced {
        /// The token of the request.
        token: u64,
        /// The counters of the rules in force.
        #[serde(default)]
        stats: Vec<RuleStats>,
    },
    /// A [`ControlMessage::SetRules`] replaced these rules: their final
    /// counters, every call they decided included (a held call's event
    /// may still be on its way).
    RulesRetired {
        /// One entry per rule that is gone.
        stats: Vec<RuleStats>,
    },
    /// Answer to [`ControlMessage::Release`]: how many calls it
    /// answered (their events precede this message).
    Released {
        /// The token of the request.
        token: u64,
        /// Calls answered.
        count: u64,
    },
    /// Answer to [`ControlMessage::Held`], oldest first.
    HeldCalls {
        /// The token of the request.
        token: u64,
        /// The calls.
        calls: Vec<HeldCall>,
    },
    /// The target exited.
    Exited {
        /// Exit code when it exited normally.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        /// Signal number when it was killed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        /// Notifications whose caller vanished before the answer.
        interrupted: u64,
    },
}

/// The shim's outgoing messages, in order.
///
/// The notification thread pushes one event per intercepted call; waking
/// the writer for each would cost a futex syscall per call (and, on a busy
/// machine, a context switch), a large share of the ~5 µs round trip. So
/// events are queued silently and the writer drains the queue every few
/// milliseconds; lifecycle messages, which are rare and awaited, wake it
/// at once. One queue for both keeps their relative order.
#[derive(Default)]
pub struct EventQueue {
    pending: Mutex<Vec<ShimMessage>>,
    wake: Condvar,
}

/// How long a queued event may wait for the writer.
pub const EVENT_FLUSH_INTERVAL: Duration = Duration::from_millis(2);

impl EventQueue {
    /// A new, empty queue.
    pub fn new() -> EventQueue {
        EventQueue::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ShimMessage>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message without waking the writer (hot path).
    pub fn push(&self, message: ShimMessage) {
        let mut pending = self.lock();
        pending.push(message);
        // Bound memory under a flood: past this the writer is woken anyway.
        if pending.len() == 4096 {
            self.wake.notify_one();
        }
    }

    /// Queues a message and wakes the writer.
    pub fn push_now(&self, message: ShimMessage) {
        self.lock().push(message);
        self.wake.notify_one();
    }

    /// Waits until woken or `EVENT_FLUSH_INTERVAL` passes, then takes
    /// everything queued.
    pub fn take_batch(&self) -> Vec<ShimMessage> {
        let mut pending = self.lock();
        if pending.is_empty() {
            pending = match self.wake.wait_timeout(pending, EVENT_FLUSH_INTERVAL) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        std::mem::take(&mut *pending)
    }
}

/// Writes one message as a JSON line.
pub fn send<W: Write, M: Serialize>(out: &mut W, message: &M) -> io::Result<()> {
    serde_json::to_writer(&mut *out, message)?;
    out.write_all(b"\n")
}

/// Reads one message; `Ok(None)` at end of stream.
pub fn recv<R: BufRead, M: for<'de> Deserialize<'de>>(input: &mut R) -> io::Result<Option<M>> {
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad message {line:?}: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn messages_round_trip_as_json_lines() {
        let mut buf = Vec::new();
        send(&mut buf, &ControlMessage::Signal { signal: 15 }).expect("write");
        send(&mut buf, &ControlMessage::Stop).expect("write");
        let mut input = Cursor::new(buf);
        let a: Option<ControlMessage> = recv(&mut input).expect("read");
        let b: Option<ControlMessage> = recv(&mut input).expect("read");
        let end: Option<ControlMessage> = recv(&mut input).expect("read");
        assert_eq!(a, Some(ControlMessage::Signal { signal: 15 }));
        assert_eq!(b, Some(ControlMessage::Stop));
        assert_eq!(end, None);
    }

    #[test]
    fn syscall_event_has_a_flat_documented_shape() {
        let event = ShimMessage::Syscall(SyscallEvent {
            seq: 3,
            time_ns: 1,
            pid: 42,
            syscall: "openat".into(),
            decision: "deny(no such file or directory)".into(),
            errno: Some("ENOENT".into()),
            path: Some("/data/x".into()),
            latency_ns: None,
            rule: Some("openat=ENOENT:100%".into()),
            label: None,
        });
        let json = serde_json::to_value(&event).expect("json");
        let json = &json["syscall"];
        assert_eq!(json["syscall"], "openat");
        assert_eq!(json["path"], "/data/x");
        assert!(json.get("latency_ns").is_none());
    }

    /// The agent's tests build serde_json with `arbitrary_precision` (a
    /// dev-dependency), as a whole-workspace build does.
    #[test]
    fn every_message_decodes_under_arbitrary_precision() {
        use crate::rule::{Action, Trigger};
        let rule = Rule {
            id: "w1:write".into(),
            syscalls: vec!["write".into()],
            action: Action::Delay { ns: 500_000_000 },
            probability: 0.3,
            path: Some("/tmp/*.wal".into()),
            trigger: Trigger::Nth(2),
            label: Some("slow".into()),
        };
        let control = [
            ControlMessage::Launch(Box::new(LaunchSpec {
                program: "/bin/true".into(),
                rules: vec![rule.clone()],
                ..LaunchSpec::default()
            })),
            ControlMessage::SetRules {
                rules: vec![
                    rule,
                    Rule {
                        id: "deny".into(),
                        syscalls: vec!["fsync".into()],
                        action: Action::Deny { errno: 5 },
                        probability: 1.0,
                        path: None,
                        trigger: Trigger::After(1),
                        label: None,
                    },
                ],
            },
            ControlMessage::Signal { signal: 15 },
            ControlMessage::Stop,
            ControlMessage::Sync { token: u64::MAX },
        ];
        let shim = [
            ShimMessage::Hello { version: 3, pid: 1 },
            ShimMessage::Exited {
                code: Some(0),
                signal: None,
                interrupted: 2,
            },
            ShimMessage::Synced {
                token: 7,
                stats: vec![RuleStats {
                    id: RuleId::in_window(2, "fsync"),
                    matched: 3,
                    fired: 1,
                }],
            },
            ShimMessage::RulesRetired {
                stats: vec![RuleStats {
                    id: "fsync=EIO:100%".into(),
                    matched: u64::MAX,
                    fired: 0,
                }],
            },
        ];
        let mut buf = Vec::new();
        for m in &control {
            send(&mut buf, m).expect("write");
        }
        let mut input = Cursor::new(buf);
        for m in &control {
            let got: Option<ControlMessage> = recv(&mut input).expect("read");
            assert_eq!(got.as_ref(), Some(m));
        }
        let mut buf = Vec::new();
        for m in &shim {
            send(&mut buf, m).expect("write");
        }
        let mut input = Cursor::new(buf);
        for m in &shim {
            let got: Option<ShimMessage> = recv(&mut input).expect("read");
            assert_eq!(got.as_ref(), Some(m));
        }
    }

    #[test]
    fn control_endpoints_parse_or_say_what_is_expected() {
        assert_eq!(Endpoint::parse("fd:3"), Ok(Endpoint::Fd(3)));
        assert_eq!(
            Endpoint::parse("unix:/run/fb/control.sock"),
            Ok(Endpoint::Unix("/run/fb/control.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("tls:10.244.0.7:7443@/faultbox/tls"),
            Ok(Endpoint::Tls {
                addr: "10.244.0.7:7443".parse().expect("addr"),
                credentials: "/faultbox/tls".into()
            })
        );
        let e = Endpoint::parse("tls:runner.shop:7443@/t").expect_err("a name");
        assert!(e.to_string().contains("resolves no names"), "{e}");
        for bad in [
            "fd:-1",
            "fd:x",
            "unix:",
            "tcp:1.2.3.4:5",
            "",
            "tls:10.0.0.1:1",
            "tls:10.0.0.1:1@",
        ] {
            let e = Endpoint::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("usage: faultbox-shim"), "{e}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut input = Cursor::new(b"{not json\n".to_vec());
        let got: io::Result<Option<ControlMessage>> = recv(&mut input);
        assert!(got.is_err());
    }
}
