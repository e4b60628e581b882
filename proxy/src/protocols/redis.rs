//! `redis`: RESP. Commands are matched on their name and first argument
//! (`command=`, `key=`); an injected error is a `-message` reply, an
//! injected response a bulk string (or nil). Steps speak RESP too:
//! `get`, `set`, `delete` (Redis's DEL: `del` is a reserved word in
//! Starlark), `incr`, `ping`, `lpush`, `rpush`, `lrange`, `command(*args)`,
//! and the raw line `send`.

use serde_json::{Value as Json, json};

use crate::Fields;
use crate::protocol::{Frame, FrameError, MAX_FRAME, Protocol, ProtocolError, Traits};
use crate::steps::{Kind, Param, StepCall, StepDef};

/// The `redis` protocol.
pub struct Redis;

const KEY: &[Param] = &[
    Param::req("key", Kind::Str),
    Param::opt("timeout", Kind::Duration),
];
const KEY_VALUE: &[Param] = &[
    Param::req("key", Kind::Str),
    Param::req("value", Kind::Str),
    Param::opt("timeout", Kind::Duration),
];
const SET: &[Param] = &[
    Param::req("key", Kind::Str),
    Param::req("value", Kind::Str),
    Param::opt("ex", Kind::Int),
    Param::opt("timeout", Kind::Duration),
];
const RANGE: &[Param] = &[
    Param::req("key", Kind::Str),
    Param::opt("start", Kind::Int),
    Param::opt("stop", Kind::Int),
    Param::opt("timeout", Kind::Duration),
];
const NONE: &[Param] = &[Param::opt("timeout", Kind::Duration)];
const STEPS: &[StepDef] = &[
    StepDef::new("get", KEY),
    StepDef::new("set", SET),
    // `del` is a reserved word in Starlark (`x.del(...)` does not parse):
    // the step is `delete`, and `getattr(iface, "del")` reaches it too.
    StepDef::new("delete", KEY),
    StepDef::new("del", KEY),
    StepDef::new("incr", KEY),
    StepDef::new("ping", NONE),
    StepDef::new("lpush", KEY_VALUE),
    StepDef::new("rpush", KEY_VALUE),
    StepDef::new("lrange", RANGE),
    StepDef::with_rest("command", "args", NONE),
    StepDef::new("send", super::tcp::SEND),
];

/// Arrays nest at most this deep; more is refused, not recursed into.
const MAX_DEPTH: usize = 32;

fn bad(what: impl Into<String>) -> FrameError {
    FrameError(what.into())
}

/// The line at the start of `buf` without its CRLF, and the length with
/// it; `None` until the CRLF is there.
fn line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some((&buf[..i], i + 2))),
        None if buf.len() > 64 << 10 => Err(bad("RESP line over 64 KiB")),
        None => Ok(None),
    }
}

/// A RESP length or count: `-1` or plain decimal digits, bounded.
fn number(text: &[u8], limit: usize) -> Result<Option<usize>, FrameError> {
    if text == b"-1" {
        return Ok(None);
    }
    if text.is_empty() || text.len() > 10 || !text.iter().all(u8::is_ascii_digit) {
        return Err(bad(format!(
            "bad RESP length {:?}",
            String::from_utf8_lossy(text)
        )));
    }
    let n: usize = std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| bad("bad RESP length"))?;
    if n > limit {
        return Err(bad(format!(
            "a RESP length of {n} is over the proxy's limit"
        )));
    }
    Ok(Some(n))
}

/// One RESP value at the start of `buf`, decoded, and its length.
pub fn value(buf: &[u8]) -> Result<Option<(Json, usize)>, FrameError> {
    value_at(buf, 0)
}

fn value_at(buf: &[u8], depth: usize) -> Result<Option<(Json, usize)>, FrameError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some((head, head_len)) = line(buf)? else {
        return Ok(None);
    };
    let text = || String::from_utf8_lossy(&head[1..]).into_owned();
    match kind {
        b'+' => Ok(Some((json!(text()), head_len))),
        b'-' => Ok(Some((json!({ "error": text() }), head_len))),
        b':' => {
            let t = text();
            let n: i64 = t
                .parse()
                .map_err(|_| bad(format!("bad RESP integer {t:?}")))?;
            Ok(Some((json!(n), head_len)))
        }
        b'$' => {
            let Some(len) = number(&head[1..], MAX_FRAME)? else {
                return Ok(Some((Json::Null, head_len)));
            };
            let total = head_len + len + 2;
            if buf.len() < total {
                return Ok(None);
            }
            if &buf[head_len + len..total] != b"\r\n" {
                return Err(bad("RESP bulk string not followed by CRLF"));
            }
            let body = String::from_utf8_lossy(&buf[head_len..head_len + len]).into_owned();
            Ok(Some((json!(body), total)))
        }
        b'*' => {
            if depth >= MAX_DEPTH {
                return Err(bad("RESP arrays nested over 32 deep"));
            }
            let Some(count) = number(&head[1..], 1 << 20)? else {
                return Ok(Some((Json::Null, head_len)));
            };
            let mut at = head_len;
            let mut items = Vec::with_capacity(count.min(64));
            for _ in 0..count {
                let Some((item, n)) = value_at(&buf[at..], depth + 1)? else {
                    return Ok(None);
                };
                items.push(item);
                at += n;
            }
            Ok(Some((Json::Array(items), at)))
        }
        other => Err(bad(format!("unknown RESP type byte {other:#04x}"))),
    }
}

/// One client command: a RESP array, or an inline command (a line).
pub fn command_frame(buf: &[u8]) -> Frame {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => Ok(value(buf)?.map(|(_, n)| n)),
        Some(_) => match buf.iter().position(|b| *b == b'\n') {
            Some(i) => Ok(Some(i + 1)),
            None if buf.len() > 64 << 10 => Err(bad("inline command over 64 KiB")),
            None => Ok(None),
        },
    }
}

/// One server reply.
pub fn reply_frame(buf: &[u8]) -> Frame {
    Ok(value(buf)?.map(|(_, n)| n))
}

/// The words of a command frame.
pub fn words(frame: &[u8]) -> Vec<String> {
    match value(frame) {
        Ok(Some((Json::Array(items), _))) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).unwrap_or_default())
            .collect(),
        _ => String::from_utf8_lossy(frame)
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    }
}

/// A command as RESP: an array of bulk strings.
pub fn encode(args: &[String]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The words a step sends.
fn step_args(call: &StepCall) -> Vec<String> {
    let s = |k: &str| call.str(k).unwrap_or_default().to_string();
    match call.method.as_str() {
        "get" | "incr" => vec![call.method.to_ascii_uppercase(), s("key")],
        "delete" | "del" => vec!["DEL".into(), s("key")],
        "set" => {
            let mut a = vec!["SET".into(), s("key"), s("value")];
            if let Some(ex) = call.int("ex") {
                a.extend(["EX".into(), ex.to_string()]);
            }
            a
        }
        "ping" => vec!["PING".into()],
        "lpush" | "rpush" => vec![call.method.to_ascii_uppercase(), s("key"), s("value")],
        "lrange" => vec![
            "LRANGE".into(),
            s("key"),
            call.int("start").unwrap_or(0).to_string(),
            call.int("stop").unwrap_or(-1).to_string(),
        ],
        _ => call.list("args").to_vec(),
    }
}

const TRAITS: Traits = Traits {
    name: "redis",
    step_label: "redis step",
    steps: STEPS,
    matchers: &["command", "key"],
    matcher_help: "command= and key=",
    duplicates: true,
    ..Traits::DEFAULT
};

impl Protocol for Redis {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn check_step(&self, call: &StepCall) -> Result<(), ProtocolError> {
        if call.method == "command" && call.list("args").is_empty() {
            return Err(self.refuse_step(call, "redis step: command() needs the command's words, e.g. command(\"SET\", \"k\", \"v\")"));
        }
        Ok(())
    }

    fn describe_step(&self, call: &StepCall) -> Fields {
        if call.method == "send" {
            return super::tcp::send_fields(call);
        }
        crate::steps::sent(call, "data", &step_args(call).join(" "))
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
        step: |call, to| {
            if call.method == "send" {
                return super::super::tcp::io::send(call, to);
            }
            step(&super::step_args(call), call, to)
        },
        // Any well-formed reply will do: a server that wants AUTH still
        // answers its protocol.
        ready: |to, timeout| exchange(&["PING".to_string()], to, timeout).map(|_| ()),
    };

    /// Redis, a thread per direction as for HTTP: commands are parsed and
    /// matched on their name and key; answers are copied back untouched.
    pub(super) fn serve(client: TcpStream, ctx: &crate::protocol::Shared) -> Closed {
        relay_messages(client, ctx, super::command_frame, |s, ctx, wire| {
            let words = super::words(wire);
            let command = words
                .first()
                .map(|w| w.to_ascii_uppercase())
                .unwrap_or_default();
            let key = words.get(1).map(String::as_str).unwrap_or("");
            let verdict = decide(
                ctx,
                &Request {
                    command: &command,
                    key,
                    ..Request::default()
                },
                || format!("{command} {key}").trim_end().to_string(),
            );
            let reply = match verdict.action {
                Some(ProxyAction::Drop { reset }) => return Err(s.drop_client(ctx, reset)),
                Some(ProxyAction::Error { message, .. }) => Some(format!("-{message}\r\n")),
                Some(ProxyAction::Respond { body, .. }) if body.is_empty() => {
                    Some("$-1\r\n".to_string())
                }
                Some(ProxyAction::Respond { body, .. }) => {
                    Some(format!("${}\r\n{body}\r\n", body.len()))
                }
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

    /// Sends one command, returns the decoded reply.
    pub(super) fn exchange(
        args: &[String],
        to: &Target,
        timeout: Duration,
    ) -> Result<Json, String> {
        let mut stream = crate::net::open(to.addr, timeout, to.tls).map_err(|e| e.to_string())?;
        stream
            .write_all(&super::encode(args))
            .map_err(|e| e.to_string())?;
        let mut reader = FrameReader::new(stream);
        let frame = reader
            .next(super::reply_frame)
            .map_err(|e| e.to_string())?
            .ok_or("connection closed without an answer")?;
        match super::value(frame) {
            Ok(Some((v, _))) => Ok(v),
            _ => Err("unreadable reply".into()),
        }
    }

    pub(super) fn step(args: &[String], call: &StepCall, to: &Target) -> StepResult {
        match exchange(args, to, call.timeout(Duration::from_secs(10))) {
            Ok(reply) => {
                let error = reply
                    .get("error")
                    .and_then(Json::as_str)
                    .map(str::to_string);
                StepResult::Reply(StepReply {
                    ok: error.is_none(),
                    body: match &reply {
                        Json::String(s) => s.clone(),
                        Json::Null => String::new(),
                        other => other.to_string(),
                    },
                    error: error.unwrap_or_default(),
                    data: Some(reply),
                    ..Default::default()
                })
            }
            Err(e) => crate::net::failed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::every_prefix;

    #[test]
    fn captured_commands_and_replies_frame_on_every_prefix() {
        // basic, big-bulk, pipelined
        assert_eq!(every_prefix("redis", "c2s", command_frame), [10, 2, 11]);
        assert_eq!(every_prefix("redis", "s2c", reply_frame), [10, 2, 11]);
    }

    #[test]
    fn replies_decode_to_json() {
        assert_eq!(value(b"+OK\r\n"), Ok(Some((json!("OK"), 5))));
        assert_eq!(value(b"$-1\r\n"), Ok(Some((Json::Null, 5))));
        assert_eq!(
            value(b"*2\r\n$1\r\na\r\n:3\r\n"),
            Ok(Some((json!(["a", 3]), 15)))
        );
        assert_eq!(
            value(b"-WRONGTYPE no\r\n").expect("ok").map(|v| v.0),
            Some(json!({"error": "WRONGTYPE no"}))
        );
        assert_eq!(value(b"$5\r\nhel"), Ok(None));
    }

    #[test]
    fn claimed_sizes_are_refused_not_allocated() {
        assert!(command_frame(b"*1\r\n$10000000000000\r\n").is_err());
        assert!(command_frame(b"*99999999999\r\n").is_err());
        assert!(command_frame(b"*1\r\n$-5\r\n").is_err());
        let deep = "*1\r\n".repeat(100);
        assert!(command_frame(deep.as_bytes()).is_err());
        assert_eq!(words(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"), ["GET", "k"]);
        assert_eq!(words(b"PING\r\n"), ["PING"]);
    }
}
