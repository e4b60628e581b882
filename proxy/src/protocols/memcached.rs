//! `memcached`: the text protocol. Commands are matched on their name and
//! first key (`command=`, `key=`); an injected error is a
//! `SERVER_ERROR <message>` line (or the message itself when it already is
//! a `CLIENT_ERROR`/`SERVER_ERROR`/`ERROR` line), an injected response the
//! item a retrieval asked for (`VALUE ... END`; a miss without `value=`)
//! or, for other commands, the reply line given. Steps: `get`, `set`,
//! `delete`, `incr`.

use serde_json::{Value as Json, json};

use crate::Fields;
use crate::protocol::{Frame, FrameError, MAX_FRAME, Protocol, ProtocolError, Traits};
use crate::rules::{ProxyAction, ProxyRuleDef};
use crate::steps::{Kind, Param, StepCall, StepDef};

/// The `memcached` protocol.
pub struct Memcached;

const KEY: &[Param] = &[
    Param::req("key", Kind::Str),
    Param::opt("timeout", Kind::Duration),
];
const SET: &[Param] = &[
    Param::req("key", Kind::Str),
    Param::req("value", Kind::Str),
    Param::opt("ttl", Kind::Int),
    Param::opt("timeout", Kind::Duration),
];
const INCR: &[Param] = &[
    Param::req("key", Kind::Str),
    Param::opt("by", Kind::Int),
    Param::opt("timeout", Kind::Duration),
];
const STEPS: &[StepDef] = &[
    StepDef::new("get", KEY),
    StepDef::new("set", SET),
    StepDef::new("delete", KEY),
    StepDef::new("incr", INCR),
];

/// The longest command or reply line the proxy reads (memcached's own
/// limit on a key is 250 bytes; a multi-get line can be long).
const MAX_LINE: usize = 64 << 10;

fn bad(what: impl Into<String>) -> FrameError {
    FrameError(what.into())
}

/// The line at the start of `buf`, `\r\n` included.
fn line(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(i) => Ok(Some(i + 1)),
        None if buf.len() > MAX_LINE => Err(bad("memcached line over 64 KiB")),
        None => Ok(None),
    }
}

fn words(line: &[u8]) -> Vec<&str> {
    std::str::from_utf8(line)
        .unwrap_or("")
        .split_ascii_whitespace()
        .collect()
}

/// A data block's length field: plain digits within the proxy's limit.
fn data_len(text: Option<&&str>) -> Result<usize, FrameError> {
    let t = text.ok_or_else(|| bad("storage command without a byte count"))?;
    if t.is_empty() || t.len() > 10 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(format!("bad byte count {t:?}")));
    }
    let n: usize = t.parse().map_err(|_| bad("bad byte count"))?;
    if n > MAX_FRAME {
        return Err(bad(format!("a {n}-byte item is over the proxy's limit")));
    }
    Ok(n)
}

/// One client command: a line, and for storage commands
/// (`set add replace append prepend cas`) the data block after it.
pub fn command_frame(buf: &[u8]) -> Frame {
    let Some(head) = line(buf)? else {
        return Ok(None);
    };
    let w = words(&buf[..head]);
    let storage = matches!(
        w.first().copied(),
        Some("set" | "add" | "replace" | "append" | "prepend" | "cas")
    );
    if !storage {
        return Ok(Some(head));
    }
    let total = head + data_len(w.get(4))? + 2;
    Ok((buf.len() >= total).then_some(total))
}

/// One server reply: a line, or `VALUE` items up to `END`.
pub fn reply_frame(buf: &[u8]) -> Frame {
    let mut at = 0;
    loop {
        let Some(n) = line(&buf[at..])? else {
            return Ok(None);
        };
        let w = words(&buf[at..at + n]);
        if w.first() != Some(&"VALUE") {
            // END after items, or a reply that is one line.
            return Ok(Some(at + n));
        }
        at += n + data_len(w.get(3))? + 2;
        if buf.len() < at {
            return Ok(None);
        }
    }
}

/// The command name and first key of a command frame.
pub fn command_and_key(frame: &[u8]) -> (String, String) {
    let end = frame
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(frame.len());
    let w = words(&frame[..end]);
    (
        w.first().copied().unwrap_or("").to_string(),
        w.get(1).copied().unwrap_or("").to_string(),
    )
}

/// A reply decoded: `VALUE` items as `{key: value}`, numbers as numbers,
/// other lines as text; errors as `{"error": line}`.
pub fn decode(reply: &[u8]) -> Json {
    let text = String::from_utf8_lossy(reply);
    let first = text.lines().next().unwrap_or("").trim_end();
    if first.starts_with("ERROR")
        || first.starts_with("CLIENT_ERROR")
        || first.starts_with("SERVER_ERROR")
    {
        return json!({ "error": first });
    }
    if let Ok(n) = first.parse::<u64>() {
        return json!(n);
    }
    if !first.starts_with("VALUE ") {
        return json!(first);
    }
    let mut items = serde_json::Map::new();
    let mut at = 0;
    while let Ok(Some(n)) = line(&reply[at..]) {
        let w = words(&reply[at..at + n]);
        if w.first() != Some(&"VALUE") {
            break;
        }
        let Ok(len) = data_len(w.get(3)) else { break };
        let data = reply.get(at + n..at + n + len).unwrap_or(&[]);
        items.insert(
            w.get(1).copied().unwrap_or("").to_string(),
            json!(String::from_utf8_lossy(data)),
        );
        at += n + len + 2;
    }
    Json::Object(items)
}

/// The line `error(message=)` answers with: the message as it is when it
/// is already one of memcached's error lines, else a `SERVER_ERROR`.
pub fn error_line(message: &str) -> String {
    let own = ["SERVER_ERROR", "CLIENT_ERROR", "ERROR"]
        .iter()
        .any(|p| message == *p || message.starts_with(&format!("{p} ")));
    if own {
        message.to_string()
    } else {
        format!("SERVER_ERROR {message}")
    }
}

/// The command a step sends.
fn step_command(call: &StepCall) -> Vec<u8> {
    let key = call.str("key").unwrap_or_default();
    match call.method.as_str() {
        "set" => {
            let value = call.str("value").unwrap_or_default();
            format!(
                "set {key} 0 {} {}\r\n{value}\r\n",
                call.int("ttl").unwrap_or(0),
                value.len()
            )
            .into_bytes()
        }
        "incr" => format!("incr {key} {}\r\n", call.int("by").unwrap_or(1)).into_bytes(),
        "delete" => format!("delete {key}\r\n").into_bytes(),
        _ => format!("get {key}\r\n").into_bytes(),
    }
}

const TRAITS: Traits = Traits {
    name: "memcached",
    step_label: "memcached step",
    steps: STEPS,
    matchers: &["command", "key"],
    matcher_help: "command= (get, set, delete, incr, ...) and key=",
    duplicates: true,
    ..Traits::DEFAULT
};

impl Protocol for Memcached {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn check(&self, rule: &ProxyRuleDef) -> Result<(), ProtocolError> {
        match &rule.action {
            ProxyAction::Error { message, .. } if message.contains(['\r', '\n']) => {
                Err(self.refuse("error(message=) on memcached is one line: no CR or LF"))
            }
            _ => Ok(()),
        }
    }

    fn check_step(&self, call: &StepCall) -> Result<(), ProtocolError> {
        let key = call.str("key").unwrap_or_default();
        if key.is_empty() || key.len() > 250 || key.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(self.refuse_step(call, format!(
                "memcached step: key={key:?} is not a memcached key (1 to 250 bytes, no spaces or control characters)"
            )));
        }
        Ok(())
    }

    fn describe_step(&self, call: &StepCall) -> Fields {
        let command = String::from_utf8_lossy(&step_command(call)).into_owned();
        crate::steps::sent(call, "data", command.lines().next().unwrap_or(""))
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
    use std::time::Duration;

    use serde_json::Value as Json;

    use crate::protocol::Target;
    use crate::rules::{ProxyAction, Request};
    use crate::server::{Closed, FrameReader, decide, relay_messages, send_duplicate};
    use crate::steps::{StepCall, StepReply, StepResult};

    pub(super) const IO: crate::protocol::Io = crate::protocol::Io {
        serve,
        step: |call, to| step(&super::step_command(call), call, to),
        ready: |to, timeout| {
            let reply = exchange(b"version\r\n", to, timeout)?;
            if reply.starts_with(b"VERSION ") {
                Ok(())
            } else {
                Err(format!(
                    "answered {:?} to version",
                    String::from_utf8_lossy(&reply).trim_end()
                ))
            }
        },
    };

    pub(super) fn serve(client: TcpStream, ctx: &crate::protocol::Shared) -> Closed {
        relay_messages(client, ctx, super::command_frame, |s, ctx, wire| {
            let (command, key) = super::command_and_key(wire);
            // Rules compare command names upper-cased, whatever the case
            // a protocol writes them in.
            let upper = command.to_ascii_uppercase();
            let verdict = decide(
                ctx,
                &Request {
                    command: &upper,
                    key: &key,
                    ..Request::default()
                },
                || format!("{command} {key}").trim_end().to_string(),
            );
            let retrieval = matches!(command.as_str(), "get" | "gets" | "gat" | "gats");
            let reply = match verdict.action {
                Some(ProxyAction::Drop { reset }) => return Err(s.drop_client(ctx, reset)),
                Some(ProxyAction::Error { message, .. }) => {
                    Some(format!("{}\r\n", super::error_line(&message)))
                }
                Some(ProxyAction::Respond { body, .. }) if retrieval && body.is_empty() => {
                    Some("END\r\n".to_string())
                }
                Some(ProxyAction::Respond { body, .. }) if retrieval => {
                    Some(format!("VALUE {key} 0 {}\r\n{body}\r\nEND\r\n", body.len()))
                }
                Some(ProxyAction::Respond { body, .. }) => Some(format!("{body}\r\n")),
                _ => None,
            };
            match reply {
                Some(text) => s.answer(text.as_bytes()),
                None => {
                    s.upstream.write_all(wire).map_err(|_| "upstream closed")?;
                    if verdict.duplicate {
                        send_duplicate(ctx.upstream, wire.to_vec());
                    }
                    Ok(())
                }
            }
        })
    }

    pub(super) fn exchange(
        command: &[u8],
        to: &Target,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let mut stream = crate::net::open(to.addr, timeout, to.tls).map_err(|e| e.to_string())?;
        stream.write_all(command).map_err(|e| e.to_string())?;
        let mut reader = FrameReader::new(stream);
        reader
            .next(super::reply_frame)
            .map_err(|e| e.to_string())?
            .map(<[u8]>::to_vec)
            .ok_or_else(|| "connection closed without an answer".to_string())
    }

    pub(super) fn step(command: &[u8], call: &StepCall, to: &Target) -> StepResult {
        let reply = match exchange(command, to, call.timeout(Duration::from_secs(10))) {
            Ok(r) => r,
            Err(e) => return crate::net::failed(e),
        };
        let decoded = super::decode(&reply);
        let error = decoded
            .get("error")
            .and_then(Json::as_str)
            .map(str::to_string);
        let key = call.str("key").unwrap_or_default();
        // `get` gives the value (null when missing), not the item map.
        let data = match (call.method.as_str(), &decoded) {
            ("get", Json::Object(items)) => items.get(key).cloned().unwrap_or(Json::Null),
            ("get", Json::String(end)) if end == "END" => Json::Null,
            (_, other) => other.clone(),
        };
        StepResult::Reply(StepReply {
            ok: error.is_none(),
            body: String::from_utf8_lossy(&reply).trim_end().to_string(),
            error: error.unwrap_or_default(),
            data: Some(data),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::every_prefix;

    #[test]
    fn captured_sessions_frame_on_every_prefix() {
        // pipelined, text
        assert_eq!(every_prefix("memcached", "c2s", command_frame), [7, 15]);
        assert_eq!(every_prefix("memcached", "s2c", reply_frame), [6, 15]);
    }

    #[test]
    fn replies_decode() {
        assert_eq!(
            decode(b"VALUE a 5 2\r\naa\r\nVALUE c 0 3\r\nccc\r\nEND\r\n"),
            json!({"a": "aa", "c": "ccc"})
        );
        assert_eq!(decode(b"8\r\n"), json!(8));
        assert_eq!(decode(b"NOT_FOUND\r\n"), json!("NOT_FOUND"));
        assert_eq!(
            decode(b"CLIENT_ERROR cannot increment\r\n"),
            json!({"error": "CLIENT_ERROR cannot increment"})
        );
        assert_eq!(
            command_and_key(b"set k 0 0 1\r\nv\r\n"),
            ("set".into(), "k".into())
        );
    }

    #[test]
    fn claimed_sizes_are_refused() {
        assert!(command_frame(b"set k 0 0 99999999999\r\n").is_err());
        assert!(command_frame(b"set k 0 0 -1\r\n").is_err());
        assert!(reply_frame(b"VALUE k 0 99999999999\r\n").is_err());
        assert_eq!(command_frame(b"set k 0 0 5\r\nhel"), Ok(None));
    }
}
