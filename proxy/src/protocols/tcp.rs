//! `tcp`: bytes, relayed untouched. Rules match a prefix of the first
//! bytes the client sends (`method=`); the only answers are raw bytes
//! (`response(body=)`), a cut connection and a delay. The `send` step
//! writes one line and reads one line back.

use crate::Fields;
use crate::protocol::{Frame, Protocol, ProtocolError, Traits};
use crate::rules::{ProxyAction, ProxyRuleDef};
use crate::steps::{Kind, Param, StepCall, StepDef};

/// The `tcp` protocol.
pub struct Tcp;

pub(crate) const SEND: &[Param] = &[
    Param::req("data", Kind::Str),
    Param::opt("timeout", Kind::Duration),
];
const STEPS: &[StepDef] = &[StepDef::new("send", SEND)];

/// One line, its `\n` included: how the `send` step's answers are framed.
pub fn line_frame(buf: &[u8]) -> Frame {
    Ok(buf.iter().position(|b| *b == b'\n').map(|i| i + 1))
}

const TRAITS: Traits = Traits {
    name: "tcp",
    step_label: "tcp step",
    steps: STEPS,
    matchers: &["method"],
    matcher_help: "method= (a prefix of the first bytes the client sends)",
    ..Traits::DEFAULT
};

impl Protocol for Tcp {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn check(&self, rule: &ProxyRuleDef) -> Result<(), ProtocolError> {
        match rule.action {
            ProxyAction::Error { .. } => Err(self.refuse("error() does not apply to tcp interfaces (raw bytes have no error form); use response(body=...), drop() or delay(delay=...)")),
            _ => Ok(()),
        }
    }

    fn describe_step(&self, call: &StepCall) -> Fields {
        send_fields(call)
    }

    #[cfg(feature = "serve")]
    fn io(&self) -> &'static crate::protocol::Io {
        &io::IO
    }
}

/// The `step_send` fields of a line-oriented `send` (tcp and redis).
pub(crate) fn send_fields(call: &StepCall) -> Fields {
    crate::steps::sent(call, "data", call.str("data").unwrap_or_default())
}

#[cfg(feature = "serve")]
pub(crate) mod io {
    use std::io::{Read, Write};

    use std::net::{Shutdown, TcpStream};
    use std::time::Duration;

    use crate::protocol::Target;
    use crate::rules::{ProxyAction, Request};
    use crate::server::{Closed, cut, decide, lock, pump};
    use crate::steps::{StepCall, StepResult};

    pub(super) const IO: crate::protocol::Io = crate::protocol::Io {
        serve,
        step: send,
        ready: crate::net::connect_ready,
    };

    pub(crate) fn serve(client: TcpStream, ctx: &crate::protocol::Shared) -> Closed {
        let mut first = Vec::new();
        let peek = lock(&ctx.rules).wants_first_bytes();
        if peek {
            // Only rules that match on the first bytes make the proxy wait
            // for them; a server-speaks-first protocol is never held
            // otherwise.
            let mut buf = vec![0u8; 4096];
            let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
            if let Ok(n) = (&client).read(&mut buf) {
                first.extend_from_slice(&buf[..n]);
            }
            let _ = client.set_read_timeout(None);
        }
        let verdict = decide(
            ctx,
            &Request {
                first_bytes: &first,
                ..Request::default()
            },
            || String::from_utf8_lossy(&first[..first.len().min(64)]).into_owned(),
        );
        let sent = first.len() as u64;
        match verdict.action {
            Some(ProxyAction::Drop { reset }) => {
                cut(&client, ctx.protocol, reset);
                return Closed::new(sent, 0, "dropped");
            }
            Some(ProxyAction::Respond { body, .. }) => {
                let _ = (&client).write_all(body.as_bytes());
                let _ = client.shutdown(Shutdown::Both);
                return Closed::new(sent, body.len() as u64, "answered");
            }
            _ => {}
        }
        let Ok(mut upstream) = TcpStream::connect_timeout(&ctx.upstream, Duration::from_secs(5))
        else {
            let _ = client.shutdown(Shutdown::Both);
            return Closed::new(0, 0, "upstream unreachable");
        };
        let _ = upstream.set_nodelay(true);
        if !first.is_empty() && upstream.write_all(&first).is_err() {
            return Closed::new(0, 0, "upstream closed");
        }
        let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
            return Closed::new(0, 0, "clone failed");
        };
        let up = std::thread::spawn(move || pump(c2, u2));
        let down = pump(upstream, client);
        Closed::new(up.join().unwrap_or(0) + sent, down, "closed")
    }

    /// Writes `data` and a newline, reads one line back.
    pub(crate) fn send(call: &StepCall, to: &Target) -> StepResult {
        let data = call.str("data").unwrap_or_default();
        let timeout = call.timeout(Duration::from_secs(10));
        let answer = crate::net::tcp_send(to.addr, data, timeout, to.tls);
        match answer {
            Ok(line) => StepResult::Text(line),
            Err(e) => StepResult::Raise(format!(
                "tcp send failed: {}.{} ({}): {e}",
                call.service, call.interface, to.addr
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::every_prefix;

    #[test]
    fn captured_echo_lines_frame_on_every_prefix() {
        assert_eq!(every_prefix("tcp", "c2s", line_frame), [2]);
        assert_eq!(every_prefix("tcp", "s2c", line_frame), [2]);
    }
}
