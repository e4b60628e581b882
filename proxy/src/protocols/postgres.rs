//! `postgres`: the frontend/backend protocol v3. The startup exchange is
//! relayed as it is; simple queries (`Q`) and parses (`P`) are matched on
//! their SQL (`query=`, compared canonicalized). An injected error is an
//! ErrorResponse with a SQLSTATE, then ReadyForQuery.

use crate::Fields;
use crate::protocol::{Frame, FrameError, MAX_FRAME, Protocol, ProtocolError, Traits, Wire};
use crate::rules::{ProxyAction, ProxyRuleDef};
use crate::steps::{Kind, Param, StepCall, StepDef};

/// The `postgres` protocol.
pub struct Postgres;

pub(crate) const SQL: &[Param] = &[
    Param::req("sql", Kind::Str),
    Param::opt("user", Kind::Str),
    Param::opt("password", Kind::Str),
    Param::opt("database", Kind::Str),
    Param::opt("timeout", Kind::Duration),
];
pub(crate) const STEPS: &[StepDef] = &[StepDef::new("query", SQL), StepDef::new("exec", SQL)];

/// `SSLRequest` and `GSSENCRequest` codes: the client asks to encrypt.
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSS_REQUEST: u32 = 80_877_104;

/// The length a message's 4-byte length field announces (itself
/// included), checked against what a proxy will hold.
pub fn length(field: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(field) as usize;
    if len < 4 {
        return Err(FrameError(format!(
            "PostgreSQL message length {len} is under 4"
        )));
    }
    if len > MAX_FRAME {
        return Err(FrameError(format!(
            "a PostgreSQL message of {len} bytes is over the proxy's limit"
        )));
    }
    Ok(len)
}

fn sized(buf: &[u8], at: usize) -> Frame {
    let Some(f) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    let total = at + length([f[0], f[1], f[2], f[3]])?;
    Ok((buf.len() >= total).then_some(total))
}

/// One message from the client. Startup-phase messages (startup,
/// SSLRequest, CancelRequest) have no type byte and start with their
/// length, whose first byte is 0 for any length a proxy holds; typed
/// messages start with a letter. So one parser frames the whole stream.
pub fn frontend_frame(buf: &[u8]) -> Frame {
    match buf.first() {
        None => Ok(None),
        Some(0) => sized(buf, 0),
        Some(_) => sized(buf, 1),
    }
}

/// One message from the server (always typed; the one-byte answer to an
/// SSLRequest is read by the TLS front, not framed).
pub fn backend_frame(buf: &[u8]) -> Frame {
    sized(buf, 1)
}

/// The SQL of a `Q` or `P` message.
pub fn sql_of(message: &[u8]) -> Option<&[u8]> {
    let body = message.get(5..)?;
    let sql = match message[0] {
        b'Q' => body,
        // Parse: statement name, then the query, both NUL-terminated.
        b'P' => &body[body.iter().position(|c| *c == 0)? + 1..],
        _ => return None,
    };
    Some(&sql[..sql.iter().position(|c| *c == 0).unwrap_or(sql.len())])
}

/// An ErrorResponse with SQLSTATE `code`.
pub fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (t, v) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(t);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// ReadyForQuery, idle.
pub const READY_IDLE: [u8; 6] = [b'Z', 0, 0, 0, 5, b'I'];

/// What SQL protocols refuse (postgres and mysql share it).
pub(crate) fn check_sql(
    protocol: &impl Protocol,
    rule: &ProxyRuleDef,
) -> Result<(), ProtocolError> {
    if matches!(rule.action, ProxyAction::Respond { .. }) {
        return Err(protocol.refuse(format!(
            "response() does not apply to {} interfaces (a made-up result set would need its column types); use error(code=..., message=...), drop() or delay(delay=...)",
            protocol.name()
        )));
    }
    Ok(())
}

/// The `step_send` fields of a SQL step.
pub(crate) fn sql_fields(call: &StepCall) -> Fields {
    crate::steps::sent(call, "sql", call.str("sql").unwrap_or_default())
}

const TRAITS: Traits = Traits {
    name: "postgres",
    step_label: "postgres step",
    steps: STEPS,
    matchers: &["query"],
    matcher_help: "query= only",
    error_fields: &["code"],
    wire: Wire::Postgres,
    ..Traits::DEFAULT
};

impl Protocol for Postgres {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn check(&self, rule: &ProxyRuleDef) -> Result<(), ProtocolError> {
        check_sql(self, rule)
    }

    fn describe_step(&self, call: &StepCall) -> Fields {
        sql_fields(call)
    }

    #[cfg(feature = "serve")]
    fn io(&self) -> &'static crate::protocol::Io {
        &io::IO
    }
}

#[cfg(feature = "serve")]
mod io {
    use std::io::Write;
    use std::net::TcpStream;

    use super::{GSS_REQUEST, READY_IDLE, SSL_REQUEST, error_response, frontend_frame, sql_of};
    use crate::rules::ProxyAction;
    use crate::server::{Closed, Session, pump, sql_verdict};

    pub(super) const IO: crate::protocol::Io = crate::protocol::Io {
        serve,
        step: |call, to| crate::net::sql_step("postgres", call, to),
        ready: |to, timeout| crate::net::sql_ready("postgres", to, timeout),
    };

    /// After a failed Parse, the rest of that extended-query batch is
    /// discarded up to its Sync, as a server would. A session that
    /// switches to TLS is relayed untouched.
    pub(super) fn serve(client: TcpStream, ctx: &crate::protocol::Shared) -> Closed {
        let Session {
            mut reader,
            mut link,
        } = match Session::open(client, ctx) {
            Ok(s) => s,
            Err(reason) => return Closed::new(0, 0, reason),
        };
        let mut discarding = false;
        let reason = loop {
            let message = match reader.next(frontend_frame) {
                Ok(Some(m)) => m,
                Ok(None) => break "closed",
                Err(_) => break "bad message",
            };
            link.up += message.len() as u64;
            if message[0] == 0 {
                // Startup phase: relayed as it is.
                if link.upstream.write_all(message).is_err() {
                    break "upstream closed";
                }
                let code = u32::from_be_bytes([message[4], message[5], message[6], message[7]]);
                // After an SSL request, a TLS handshake (0x16) means the
                // session is encrypted from here: relay it blind.
                if matches!(code, SSL_REQUEST | GSS_REQUEST) {
                    while reader.buffered().is_empty() {
                        if !matches!(reader.fill(), Ok(n) if n > 0) {
                            break;
                        }
                    }
                    if reader.buffered().first() == Some(&0x16) {
                        let (client, rest) = reader.into_parts();
                        let _ = link.upstream.write_all(&rest);
                        let Ok(upstream) = link.upstream.try_clone() else {
                            return Closed::new(link.up, 0, "clone failed");
                        };
                        let n = pump(client, upstream);
                        return Closed::new(
                            link.up + rest.len() as u64 + n,
                            link.answers.join().unwrap_or(0),
                            "tls passthrough",
                        );
                    }
                }
                continue;
            }
            let tag = message[0];
            if discarding {
                if tag == b'S' {
                    discarding = false;
                    if let Err(r) = link.answer(&READY_IDLE) {
                        break r;
                    }
                }
                continue;
            }
            let Some(sql) = sql_of(message) else {
                if link.upstream.write_all(message).is_err() {
                    break "upstream closed";
                }
                continue;
            };
            let verdict = sql_verdict(ctx, &String::from_utf8_lossy(sql));
            match verdict.action {
                Some(ProxyAction::Drop { reset }) => break link.drop_client(ctx, reset),
                Some(ProxyAction::Error {
                    message: text,
                    code,
                    ..
                }) => {
                    let mut reply = error_response(code.as_deref().unwrap_or("XX000"), &text);
                    if tag == b'Q' {
                        reply.extend_from_slice(&READY_IDLE);
                    } else {
                        discarding = true;
                    }
                    if let Err(r) = link.answer(&reply) {
                        break r;
                    }
                }
                _ => {
                    if link.upstream.write_all(message).is_err() {
                        break "upstream closed";
                    }
                }
            }
        };
        link.finish(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::every_prefix;

    #[test]
    fn captured_sessions_frame_on_every_prefix() {
        // extended-query, pipeline, simple-query
        let c2s = every_prefix("postgres", "c2s", frontend_frame);
        assert!(c2s.iter().all(|n| *n >= 3), "{c2s:?}");
        let s2c = every_prefix("postgres", "s2c", backend_frame);
        assert!(s2c.iter().all(|n| *n >= 5), "{s2c:?}");
    }

    #[test]
    fn the_simple_query_capture_holds_its_statement() {
        let (_, bytes) = crate::protocol::testing::captured("postgres", "c2s")
            .into_iter()
            .find(|(n, _)| n == "simple-query")
            .expect("capture");
        let (frames, _) = crate::protocol::split(&bytes, frontend_frame).expect("frames");
        let sql: Vec<String> = frames
            .iter()
            .filter_map(|f| sql_of(f))
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        assert!(sql.iter().any(|s| s.contains("SELECT 1/0")), "{sql:?}");
    }

    #[test]
    fn claimed_lengths_are_refused() {
        assert!(frontend_frame(b"Q\xff\xff\xff\xff").is_err());
        assert!(frontend_frame(b"Q\0\0\0\x02").is_err());
        assert_eq!(frontend_frame(b"Q\0\0\0\x09SEL"), Ok(None));
    }
}
