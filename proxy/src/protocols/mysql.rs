//! `mysql` (MySQL and MariaDB): the server speaks first and the handshake
//! is relayed as it is. Every client packet with sequence number 0 starts
//! a command; COM_QUERY and COM_STMT_PREPARE are matched on their SQL. An
//! injected error is an ERR packet (`number=`, default 1105; the SQLSTATE
//! of `code=`, default HY000), and the connection stays usable.

use crate::Fields;
use crate::protocol::{Frame, Protocol, ProtocolError, Traits, Wire};
use crate::rules::ProxyRuleDef;
use crate::steps::StepCall;

/// The `mysql` protocol.
pub struct Mysql;

/// The length of the packet a 4-byte header announces, header included.
/// (The 3-byte length field cannot exceed 16 MiB.)
pub fn length(head: [u8; 4]) -> usize {
    4 + u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize
}

/// One packet, in either direction.
pub fn packet_frame(buf: &[u8]) -> Frame {
    let Some(h) = buf.get(..4) else {
        return Ok(None);
    };
    let total = length([h[0], h[1], h[2], h[3]]);
    Ok((buf.len() >= total).then_some(total))
}

/// The SQL of a COM_QUERY or COM_STMT_PREPARE packet (sequence 0).
pub fn sql_of(packet: &[u8]) -> Option<&[u8]> {
    if packet.get(3) != Some(&0) {
        return None;
    }
    match packet.get(4) {
        Some(0x03) | Some(0x16) => packet.get(5..),
        _ => None,
    }
}

/// An ERR packet (sequence 1, the answer to a command).
pub fn err_packet(number: u16, sqlstate: &str, message: &str) -> Vec<u8> {
    let mut body = vec![0xff];
    body.extend_from_slice(&number.to_le_bytes());
    body.push(b'#');
    body.extend_from_slice(sqlstate.as_bytes());
    body.extend_from_slice(message.as_bytes());
    let len = (body.len() as u32).to_le_bytes();
    let mut packet = vec![len[0], len[1], len[2], 1];
    packet.extend_from_slice(&body);
    packet
}

const TRAITS: Traits = Traits {
    name: "mysql",
    step_label: "mysql step",
    steps: super::postgres::STEPS,
    matchers: &["query"],
    matcher_help: "query= only",
    error_fields: &["code", "number"],
    wire: Wire::Mysql,
    ..Traits::DEFAULT
};

impl Protocol for Mysql {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn check(&self, rule: &ProxyRuleDef) -> Result<(), ProtocolError> {
        super::postgres::check_sql(self, rule)
    }

    fn describe_step(&self, call: &StepCall) -> Fields {
        super::postgres::sql_fields(call)
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

    use crate::rules::ProxyAction;
    use crate::server::{Closed, relay_messages, sql_verdict};

    pub(super) const IO: crate::protocol::Io = crate::protocol::Io {
        serve,
        step: |call, to| crate::net::sql_step("mysql", call, to),
        ready: |to, timeout| crate::net::sql_ready("mysql", to, timeout),
    };

    pub(super) fn serve(client: TcpStream, ctx: &crate::protocol::Shared) -> Closed {
        relay_messages(client, ctx, super::packet_frame, |s, ctx, packet| {
            let Some(sql) = super::sql_of(packet) else {
                return s.upstream.write_all(packet).map_err(|_| "upstream closed");
            };
            let verdict = sql_verdict(ctx, &String::from_utf8_lossy(sql));
            match verdict.action {
                Some(ProxyAction::Drop { reset }) => Err(s.drop_client(ctx, reset)),
                Some(ProxyAction::Error {
                    message,
                    code,
                    number,
                    ..
                }) => s.answer(&super::err_packet(
                    number.unwrap_or(1105),
                    code.as_deref().unwrap_or("HY000"),
                    &message,
                )),
                _ => s.upstream.write_all(packet).map_err(|_| "upstream closed"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::{captured, every_prefix};

    #[test]
    fn captured_sessions_frame_on_every_prefix() {
        let c2s = every_prefix("mysql", "c2s", packet_frame);
        let s2c = every_prefix("mysql", "s2c", packet_frame);
        // auth-denied (the client's one handshake response), basic,
        // password-auth
        assert_eq!(c2s.len(), 3);
        assert!(c2s.iter().all(|n| *n >= 1) && s2c.iter().all(|n| *n >= 2));
        let (_, basic) = captured("mysql", "c2s")
            .into_iter()
            .find(|(n, _)| n == "basic")
            .expect("capture");
        let (frames, _) = crate::protocol::split(&basic, packet_frame).expect("frames");
        let sql: Vec<String> = frames
            .iter()
            .filter_map(|f| sql_of(f))
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        assert!(
            sql.iter().any(|s| s.contains("SELECT * FROM nope")),
            "{sql:?}"
        );
    }
}
