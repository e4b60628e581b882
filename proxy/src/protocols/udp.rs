//! `udp`: datagrams, relayed one by one. Rules match a prefix of a
//! datagram (`method=`) and can hold it (`delay`), lose it (`drop`) or
//! send it twice (`duplicate`); a datagram has no error form. Each client
//! address gets its own upstream socket, so answers find their way back.
//! Steps: `send(data=)` waits for one answer datagram; `send_no_reply`
//! does not.

use crate::Fields;
use crate::protocol::{Protocol, ProtocolError, Traits};
use crate::rules::{ProxyAction, ProxyRuleDef};
use crate::steps::{Kind, Param, StepCall, StepDef};

/// The `udp` protocol.
pub struct Udp;

const STEPS: &[StepDef] = &[
    StepDef::new("send", super::tcp::SEND),
    StepDef::new("send_no_reply", &[Param::req("data", Kind::Str)]),
];

const TRAITS: Traits = Traits {
    name: "udp",
    step_label: "udp step",
    steps: STEPS,
    matchers: &["method"],
    matcher_help: "method= (a prefix of the datagram)",
    duplicates: true,
    datagrams: true,
    ..Traits::DEFAULT
};

impl Protocol for Udp {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn check(&self, rule: &ProxyRuleDef) -> Result<(), ProtocolError> {
        match rule.action {
            ProxyAction::Error { .. } | ProxyAction::Respond { .. } => Err(self.refuse(
                "error() and response() do not apply to udp interfaces (the proxy does not answer for the service); use drop(), delay(delay=...) or duplicate()",
            )),
            _ => Ok(()),
        }
    }

    fn describe_step(&self, call: &StepCall) -> Fields {
        crate::steps::sent(call, "data", call.str("data").unwrap_or_default())
    }

    #[cfg(feature = "serve")]
    fn io(&self) -> &'static crate::protocol::Io {
        &io::IO
    }
}

/// The most client addresses a UDP proxy relays at once.
#[cfg(feature = "serve")]
pub const MAX_CLIENTS: usize = io::MAX_CLIENTS;

#[cfg(feature = "serve")]
pub(crate) mod io {
    use std::collections::HashMap;
    use std::net::{SocketAddr, UdpSocket};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use crate::rules::{ProxyAction, Request};
    use crate::server::{Ctx, lock};
    use crate::steps::{StepCall, StepReply, StepResult};

    pub(super) const IO: crate::protocol::Io = crate::protocol::Io {
        // Datagram proxies run `relay`; no stream ever reaches here.
        serve: |_, _| crate::server::Closed::new(0, 0, "not a stream protocol"),
        step,
        ready: |to, timeout| ready(to.addr, timeout),
    };

    /// How often blocked receives look at the stop flag.
    const TICK: Duration = Duration::from_millis(100);

    /// A client address with no datagram either way for this long is
    /// forgotten: UDP has no close, and every client address costs an
    /// upstream socket and its reader thread.
    const IDLE: Duration = Duration::from_secs(30);

    /// The most client addresses relayed at once; past it the one idle
    /// longest is forgotten (its next datagram gets a fresh upstream).
    pub(crate) const MAX_CLIENTS: usize = 1024;

    /// One client address's upstream socket.
    struct Upstream {
        sock: Arc<UdpSocket>,
        /// Milliseconds since the proxy started, at the last datagram.
        last: AtomicU64,
        /// Set to end its reader thread (which drops the socket).
        done: AtomicBool,
    }

    /// Relays datagrams from clients on `sock` to the upstream until the
    /// proxy stops.
    pub(crate) fn relay(sock: UdpSocket, ctx: Arc<Ctx>) {
        let sock = Arc::new(sock);
        let _ = sock.set_read_timeout(Some(TICK));
        let started = Instant::now();
        let mut upstreams: HashMap<SocketAddr, Arc<Upstream>> = HashMap::new();
        let mut buf = vec![0u8; 64 << 10];
        while !ctx.stop.load(Ordering::SeqCst) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                upstreams.retain(|_, u| !u.done.load(Ordering::SeqCst));
                continue;
            };
            let datagram = buf[..n].to_vec();
            let now = started.elapsed().as_millis() as u64;
            let up = match upstreams
                .get(&from)
                .filter(|u| !u.done.load(Ordering::SeqCst))
            {
                Some(u) => Arc::clone(u),
                None => {
                    upstreams.retain(|_, u| !u.done.load(Ordering::SeqCst));
                    if upstreams.len() >= MAX_CLIENTS
                        && let Some(oldest) = upstreams
                            .iter()
                            .min_by_key(|(_, u)| u.last.load(Ordering::SeqCst))
                            .map(|(a, _)| *a)
                        && let Some(u) = upstreams.remove(&oldest)
                    {
                        u.done.store(true, Ordering::SeqCst);
                    }
                    match open_upstream(&sock, from, &ctx, started) {
                        Some(u) => {
                            upstreams.insert(from, Arc::clone(&u));
                            u
                        }
                        None => continue,
                    }
                }
            };
            up.last.store(now, Ordering::SeqCst);
            let up = Arc::clone(&up.sock);
            let verdict = lock(&ctx.rules).decide(&Request {
                first_bytes: &datagram,
                ..Request::default()
            });
            if !verdict.fired.is_empty() {
                ctx.fired(
                    &verdict,
                    &String::from_utf8_lossy(&datagram[..datagram.len().min(64)]),
                );
            }
            if matches!(verdict.action, Some(ProxyAction::Drop { .. })) {
                continue;
            }
            let copies = if verdict.duplicate { 2 } else { 1 };
            if verdict.delay_ns == 0 {
                for _ in 0..copies {
                    let _ = up.send(&datagram);
                }
            } else {
                // A held datagram does not hold up the ones after it.
                let delay = Duration::from_nanos(verdict.delay_ns);
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    for _ in 0..copies {
                        let _ = up.send(&datagram);
                    }
                });
            }
        }
    }

    /// A socket connected to the upstream for client `from`, and the
    /// thread that carries its answers back.
    fn open_upstream(
        sock: &Arc<UdpSocket>,
        from: SocketAddr,
        ctx: &Arc<Ctx>,
        started: Instant,
    ) -> Option<Arc<Upstream>> {
        let up = UdpSocket::bind(("127.0.0.1", 0)).ok()?;
        up.connect(ctx.upstream).ok()?;
        let _ = up.set_read_timeout(Some(TICK));
        let up = Arc::new(Upstream {
            sock: Arc::new(up),
            last: AtomicU64::new(started.elapsed().as_millis() as u64),
            done: AtomicBool::new(false),
        });
        ctx.conn_opened(&from.to_string());
        let (back, reply_to, ctx) = (Arc::clone(&up), Arc::clone(sock), Arc::clone(ctx));
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let idle = IDLE.as_millis() as u64;
            while !ctx.stop.load(Ordering::SeqCst) && !back.done.load(Ordering::SeqCst) {
                let now = started.elapsed().as_millis() as u64;
                if let Ok(n) = back.sock.recv(&mut buf) {
                    back.last.store(now, Ordering::SeqCst);
                    let _ = reply_to.send_to(&buf[..n], from);
                } else if now.saturating_sub(back.last.load(Ordering::SeqCst)) > idle {
                    back.done.store(true, Ordering::SeqCst);
                }
            }
        });
        Some(up)
    }

    fn socket_to(addr: &str, timeout: Duration) -> std::io::Result<UdpSocket> {
        let target = crate::net::resolve(addr)?[0];
        let sock = UdpSocket::bind(("127.0.0.1", 0))?;
        sock.connect(target)?;
        sock.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        Ok(sock)
    }

    pub(super) fn step(call: &StepCall, to: &crate::protocol::Target) -> StepResult {
        let data = call.str("data").unwrap_or_default();
        let timeout = call.timeout(Duration::from_secs(2));
        let fail = |e: String| {
            StepResult::Raise(format!(
                "udp send failed: {}.{} ({}): {e}",
                call.service, call.interface, to.addr
            ))
        };
        let sock = match socket_to(to.addr, timeout) {
            Ok(s) => s,
            Err(e) => return fail(e.to_string()),
        };
        if let Err(e) = sock.send(data.as_bytes()) {
            return fail(e.to_string());
        }
        if call.method == "send_no_reply" {
            return StepResult::Reply(StepReply {
                ok: true,
                ..StepReply::default()
            });
        }
        let mut buf = vec![0u8; 64 << 10];
        match sock.recv(&mut buf) {
            Ok(n) => StepResult::Text(String::from_utf8_lossy(&buf[..n]).trim_end().to_string()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                fail(format!("no answer within {timeout:?}"))
            }
            Err(e) => fail(e.to_string()),
        }
    }

    /// Ready when nothing refuses a datagram: a closed port answers with
    /// ICMP port unreachable, which a connected socket reports as
    /// ECONNREFUSED; silence or an answer means something listens.
    pub(super) fn ready(addr: &str, timeout: Duration) -> Result<(), String> {
        let sock =
            socket_to(addr, timeout.min(Duration::from_millis(200))).map_err(|e| e.to_string())?;
        sock.send(b"").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        match sock.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err("nothing listens on that UDP port".into())
            }
            _ => Ok(()),
        }
    }
}
