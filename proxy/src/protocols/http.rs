//! `http` (and `http2`): HTTP/1.1 requests decided one by one on their
//! method and path, and HTTP/2 (a client opening with the h2c preface)
//! decided per stream by the hyper-based proxy in `h2.rs`.

use crate::Fields;
use crate::protocol::{Frame, FrameError, Protocol, ProtocolError, Traits};
use crate::rules::{ProxyAction, ProxyRuleDef};
use crate::steps::{Kind, Param, StepCall, StepDef};

/// The `http` protocol; `http2` is the same with prior-knowledge steps.
pub struct Http {
    pub h2: bool,
}

const PARAMS: &[Param] = &[
    Param::opt("path", Kind::Str),
    Param::opt("body", Kind::Str),
    Param::opt("headers", Kind::Headers),
    Param::opt("timeout", Kind::Duration),
];
const STEPS: &[StepDef] = &[
    StepDef::new("get", PARAMS),
    StepDef::new("post", PARAMS),
    StepDef::new("put", PARAMS),
    StepDef::new("delete", PARAMS),
    StepDef::new("patch", PARAMS),
];

/// The longest request head the proxy reads (request line included).
pub const MAX_HEAD: usize = 64 << 10;

/// What follows a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `Content-Length: N` (0 when absent: a request without a length has
    /// no body).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Its length, the blank line included (and any empty lines before
    /// the request line).
    pub len: usize,
    /// Where the request line starts and ends (without CRLF).
    pub line: (usize, usize),
    pub body: Body,
    /// The `Upgrade` header's value.
    pub upgrade: Option<String>,
}

impl Head {
    /// The method and the path of the request line.
    pub fn target<'a>(&self, buf: &'a [u8]) -> (&'a str, &'a str) {
        let line = std::str::from_utf8(&buf[self.line.0..self.line.1]).unwrap_or("");
        let mut parts = line.split_ascii_whitespace();
        (parts.next().unwrap_or(""), parts.next().unwrap_or("/"))
    }
}

fn bad(what: impl Into<String>) -> FrameError {
    FrameError(what.into())
}

/// The value of header line `line` if its name is `name`.
pub fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let colon = line.iter().position(|c| *c == b':')?;
    if !line[..colon].trim_ascii().eq_ignore_ascii_case(name) {
        return None;
    }
    Some(line[colon + 1..].trim_ascii())
}

/// Parses the request head at the start of `buf`: `None` until it is
/// complete. Refuses heads over [`MAX_HEAD`] (a request line without an
/// end included) and lengths that are not plain decimal numbers.
pub fn request_head(buf: &[u8]) -> Result<Option<Head>, FrameError> {
    // Empty lines before a request line are tolerated (RFC 9112 §2.2).
    let skip = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buf.len());
    let scan = &buf[..buf.len().min(MAX_HEAD)];
    let Some(end) = scan[skip..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| skip + p + 4)
    else {
        return if buf.len() >= MAX_HEAD {
            Err(bad("HTTP head over 64 KiB"))
        } else {
            Ok(None)
        };
    };
    let line_end = skip + buf[skip..end].iter().position(|b| *b == b'\r').unwrap_or(0);
    let mut body = Body::Length(0);
    let mut upgrade = None;
    for line in buf[line_end..end]
        .split(|c| *c == b'\n')
        .map(<[u8]>::trim_ascii)
    {
        if let Some(v) = header_value(line, b"content-length") {
            let text = std::str::from_utf8(v).map_err(|_| bad("bad Content-Length"))?;
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(format!("bad Content-Length {text:?}")));
            }
            let n = text
                .parse()
                .map_err(|_| bad(format!("Content-Length {text} is too large")))?;
            if body != Body::Chunked {
                body = Body::Length(n);
            }
        } else if let Some(v) = header_value(line, b"transfer-encoding") {
            if v.to_ascii_lowercase().windows(7).any(|w| w == b"chunked") {
                body = Body::Chunked;
            }
        } else if let Some(v) = header_value(line, b"upgrade") {
            upgrade = Some(String::from_utf8_lossy(v).into_owned());
        }
    }
    Ok(Some(Head {
        len: end,
        line: (skip, line_end),
        body,
        upgrade,
    }))
}

/// The length of the chunked body at the start of `buf`, trailers
/// included. Chunk sizes are hex without sign; one that does not fit in
/// memory is refused rather than waited for.
pub fn chunked_len(buf: &[u8]) -> Frame {
    let mut at = 0;
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return if buf.len() - at > 1024 {
                Err(bad("chunk size line over 1 KiB"))
            } else {
                Ok(None)
            };
        };
        let line = &buf[at..at + eol];
        let size_text = line
            .split(|b| *b == b';')
            .next()
            .unwrap_or(b"")
            .trim_ascii();
        if size_text.is_empty()
            || !size_text.iter().all(u8::is_ascii_hexdigit)
            || size_text.len() > 8
        {
            return Err(bad(format!(
                "bad chunk size {:?}",
                String::from_utf8_lossy(size_text)
            )));
        }
        let size = usize::from_str_radix(std::str::from_utf8(size_text).unwrap_or("0"), 16)
            .map_err(|_| bad("bad chunk size"))?;
        if size > crate::protocol::MAX_FRAME {
            return Err(bad(format!(
                "a chunk of {size} bytes is over the proxy's limit"
            )));
        }
        at += eol + 2;
        if size == 0 {
            // Trailers, up to an empty line.
            loop {
                let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some(at));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(bad("chunk not followed by CRLF"));
        }
        at += size + 2;
    }
}

/// One whole request (head and body) at the start of `buf`.
pub fn request_frame(buf: &[u8]) -> Frame {
    let Some(head) = request_head(buf)? else {
        return Ok(None);
    };
    match head.body {
        Body::Length(n) => {
            let total = (head.len as u64).saturating_add(n);
            Ok((total <= buf.len() as u64).then_some(total as usize))
        }
        Body::Chunked => Ok(chunked_len(&buf[head.len..])?.map(|n| head.len + n)),
    }
}

/// A request head without its h2c upgrade: the `Upgrade` and
/// `HTTP2-Settings` headers, and their tokens in `Connection`.
pub fn without_h2c_upgrade(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len());
    for line in head.split_inclusive(|c| *c == b'\n') {
        let bare = line.trim_ascii();
        if header_value(bare, b"upgrade").is_some()
            || header_value(bare, b"http2-settings").is_some()
        {
            continue;
        }
        if let Some(v) = header_value(bare, b"connection") {
            let kept: Vec<&str> = std::str::from_utf8(v)
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|t| {
                    !t.eq_ignore_ascii_case("upgrade") && !t.eq_ignore_ascii_case("http2-settings")
                })
                .collect();
            if !kept.is_empty() {
                out.extend_from_slice(format!("Connection: {}\r\n", kept.join(", ")).as_bytes());
            }
            continue;
        }
        out.extend_from_slice(line);
    }
    out
}

/// An HTTP/1.1 answer the proxy makes up.
pub fn response(status: u16, body: &str, content_type: &str) -> String {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Injected",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nX-Faultbox: injected\r\n\r\n{body}",
        body.len()
    )
}

const HTTP: Traits = Traits {
    name: "http",
    step_label: "http step",
    steps: STEPS,
    matchers: &["method", "path"],
    matcher_help: "method= and path=",
    error_fields: &["status"],
    duplicates: true,
    resets_on_drop: true,
    ..Traits::DEFAULT
};
const HTTP2: Traits = Traits {
    name: "http2",
    ..HTTP
};

impl Protocol for Http {
    fn traits(&self) -> &'static Traits {
        if self.h2 { &HTTP2 } else { &HTTP }
    }

    fn check(&self, rule: &ProxyRuleDef) -> Result<(), ProtocolError> {
        match rule.action {
            ProxyAction::Respond {
                status: Some(s), ..
            }
            | ProxyAction::Error {
                status: Some(s), ..
            } if !(100..=599).contains(&s) => {
                Err(self.refuse(format!("status={s} is not an HTTP status (100..599)")))
            }
            _ => Ok(()),
        }
    }

    fn describe_step(&self, call: &StepCall) -> Fields {
        let path = call.str("path").unwrap_or("/");
        let mut f = Fields::from([("path".to_string(), path.to_string())]);
        if let Some(body) = call.str("body").filter(|b| !b.is_empty()) {
            f.insert("body".into(), body.chars().take(200).collect());
        }
        f.insert(
            "summary".into(),
            format!("→ {}.{} {path}", call.service, call.method),
        );
        f
    }

    #[cfg(feature = "serve")]
    fn io(&self) -> &'static crate::protocol::Io {
        if self.h2 { &io::HTTP2 } else { &io::HTTP1 }
    }
}

#[cfg(feature = "serve")]
mod io {
    use std::io::{self, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use super::{Body, request_head, without_h2c_upgrade};
    use crate::protocol::Target;
    use crate::protocols::http::chunked_len;
    use crate::rules::{ProxyAction, Request};
    use crate::server::{Closed, Ctx, Session, decide, pump, send_duplicate};
    use crate::steps::{StepCall, StepReply, StepResult};

    /// HTTP with a thread per direction, like the fastest plain relay:
    /// this thread reads requests, applies the rules and forwards what
    /// passes; a second thread copies the upstream's answers back byte for
    /// byte. A rule that answers for the upstream writes to the client
    /// from this thread, which keeps responses in order for clients that
    /// wait for each answer before the next request (all common ones); a
    /// pipelining client could see an injected answer overtake a real one.
    pub(super) const HTTP1: crate::protocol::Io = crate::protocol::Io {
        serve: serve_any,
        step,
        ready,
    };
    pub(super) const HTTP2: crate::protocol::Io = crate::protocol::Io {
        serve: serve_any,
        step: crate::h2::http2_step,
        ready,
    };

    /// Either version on the same port: HTTP/2 by its preface.
    fn serve_any(client: TcpStream, ctx: &crate::protocol::Shared) -> Closed {
        if crate::h2::starts_with_preface(&client) {
            return crate::h2::serve(client, ctx);
        }
        serve(client, ctx)
    }

    fn ready(to: &Target, timeout: Duration) -> Result<(), String> {
        let r = crate::net::http_request(to.addr, "GET", "/", &[], &[], timeout, to.tls)
            .map_err(|e| e.to_string())?;
        if (200..400).contains(&r.status) {
            Ok(())
        } else {
            Err(format!("status {}", r.status))
        }
    }

    pub(super) fn serve(client: TcpStream, ctx: &crate::protocol::Shared) -> Closed {
        let mut s = match Session::open(client, ctx) {
            Ok(s) => s,
            Err(reason) => return Closed::new(0, 0, reason),
        };
        let reason = loop {
            match one_request(&mut s, ctx) {
                Ok(true) => {}
                Ok(false) => break "closed",
                Err(Stop::Reason(r)) => break r,
                Err(Stop::Upgraded) => {
                    // `Upgrade` (WebSocket and the like): what follows is
                    // not HTTP. Relay the rest as bytes; the answers
                    // already are.
                    let (client, rest) = s.reader.into_parts();
                    if s.link.upstream.write_all(&rest).is_err() {
                        let _ = s.link.upstream.shutdown(std::net::Shutdown::Write);
                        return Closed::new(
                            s.link.up,
                            s.link.answers.join().unwrap_or(0),
                            "upstream closed",
                        );
                    }
                    let up = s.link.up + rest.len() as u64 + pump(client, s.link.upstream);
                    let down = s.link.answers.join().unwrap_or(0) + s.link.injected;
                    return Closed::new(up, down, "upgraded");
                }
            }
        };
        s.link.finish(reason)
    }

    enum Stop {
        Reason(&'static str),
        Upgraded,
    }

    fn stop(reason: &'static str) -> Stop {
        Stop::Reason(reason)
    }

    /// Reads, decides and relays one request; false at a clean end.
    fn one_request(s: &mut Session, ctx: &Ctx) -> Result<bool, Stop> {
        let head = loop {
            match request_head(s.reader.buffered()) {
                Ok(Some(head)) => break head,
                Ok(None) => match s.reader.fill() {
                    Ok(0) if s.reader.buffered().is_empty() => return Ok(false),
                    Ok(0) => return Err(stop("closed mid-request")),
                    Ok(_) => {}
                    Err(_) => return Err(stop("request too large")),
                },
                Err(_) => return Err(stop("bad request")),
            }
        };
        // A chunked body is framed whole before anything is decided; a
        // body of known length that is not all here yet is streamed.
        let body_len = match head.body {
            Body::Length(n) => n,
            Body::Chunked => loop {
                match chunked_len(&s.reader.buffered()[head.len..]) {
                    Ok(Some(n)) => break n as u64,
                    Ok(None) => match s.reader.fill() {
                        Ok(0) => return Err(stop("closed mid-request")),
                        Ok(_) => {}
                        Err(_) => return Err(stop("request too large")),
                    },
                    Err(_) => return Err(stop("bad request")),
                }
            },
        };
        let buffered = s.reader.buffered();
        let whole = (head.len as u64 + body_len) <= buffered.len() as u64;
        let (method, path) = head.target(buffered);
        let verdict = decide(
            ctx,
            &Request {
                method,
                path,
                ..Request::default()
            },
            || format!("{method} {path}"),
        );
        let h2c = head
            .upgrade
            .as_deref()
            .is_some_and(|u| u.to_ascii_lowercase().contains("h2c"));
        let answer = match verdict.action {
            Some(ProxyAction::Drop { reset }) => return Err(stop(s.link.drop_client(ctx, reset))),
            Some(ProxyAction::Respond { status, body }) => {
                let ctype = if body.trim_start().starts_with(['{', '[']) {
                    "application/json"
                } else {
                    "text/plain"
                };
                Some(super::response(status.unwrap_or(200), &body, ctype))
            }
            Some(ProxyAction::Error {
                status, message, ..
            }) => {
                let body = serde_json::json!({ "error": message }).to_string();
                Some(super::response(
                    status.unwrap_or(500),
                    &body,
                    "application/json",
                ))
            }
            _ => None,
        };
        s.link.up += head.len as u64 + body_len;
        if let Some(text) = answer {
            // The request goes nowhere: read past its body.
            s.reader
                .relay(head.len as u64 + body_len, &mut io::sink())
                .map_err(|_| stop("closed mid-request"))?;
            s.link.answer(text.as_bytes()).map_err(stop)?;
            return Ok(true);
        }
        let duplicate = (verdict.duplicate && whole)
            .then(|| s.reader.buffered()[..(head.len as u64 + body_len) as usize].to_vec());
        if h2c {
            // Stay on HTTP/1.1, where the rules apply per request; the
            // server answers as if asked plainly.
            let plain = without_h2c_upgrade(&s.reader.buffered()[..head.len]);
            s.link
                .upstream
                .write_all(&plain)
                .map_err(|_| stop("upstream closed"))?;
            s.reader
                .relay(head.len as u64, &mut io::sink())
                .map_err(|_| stop("closed"))?;
            s.reader
                .relay(body_len, &mut s.link.upstream)
                .map_err(|_| stop("upstream closed"))?;
        } else {
            s.reader
                .relay(head.len as u64 + body_len, &mut s.link.upstream)
                .map_err(|_| stop("upstream closed"))?;
        }
        if let Some(request) = duplicate {
            send_duplicate(ctx.upstream, request);
        }
        if head.upgrade.is_some() && !h2c {
            return Err(Stop::Upgraded);
        }
        Ok(true)
    }

    pub(super) fn step(call: &StepCall, to: &Target) -> StepResult {
        let method = call.method.to_ascii_uppercase();
        let body = call.str("body").unwrap_or_default();
        match crate::net::http_request(
            to.addr,
            &method,
            call.str("path").unwrap_or("/"),
            call.headers("headers"),
            body.as_bytes(),
            call.timeout(Duration::from_secs(30)),
            to.tls,
        ) {
            Ok(r) => {
                let mut body = String::from_utf8_lossy(&r.body).into_owned();
                if body.len() > 64 << 10 {
                    let mut cut = 64 << 10;
                    while !body.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    body.truncate(cut);
                }
                StepResult::Reply(StepReply {
                    status: i64::from(r.status),
                    body: body.trim_end().to_string(),
                    headers: r.headers,
                    ok: true,
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
    fn captured_requests_frame_on_every_prefix() {
        let counts = every_prefix("http", "c2s", request_frame);
        // chunked-request, chunked-request-stream, chunked-response, get,
        // head, keep-alive (two requests on one connection),
        // not-found-close, post
        assert_eq!(counts, [1, 1, 1, 1, 1, 2, 1, 1]);
    }

    #[test]
    fn heads_refuse_what_they_cannot_hold() {
        let long = vec![b'a'; MAX_HEAD + 1];
        assert!(
            request_head(&long).is_err(),
            "a request line without an end"
        );
        assert!(request_head(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").is_err());
        assert!(request_head(b"POST / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n").is_err());
        let huge = request_head(b"POST / HTTP/1.1\r\nContent-Length: 10000000000000\r\n\r\n")
            .expect("parses")
            .expect("complete");
        assert_eq!(
            huge.body,
            Body::Length(10_000_000_000_000),
            "streamed, not held"
        );
        assert_eq!(
            request_frame(b"POST / HTTP/1.1\r\nContent-Length: 10000000000000\r\n\r\n"),
            Ok(None)
        );
        assert!(chunked_len(b"9184E72A000\r\n").is_err(), "a 10 TB chunk");
        assert!(chunked_len(b"-5\r\n").is_err());
        assert_eq!(chunked_len(b"5\r\nhello\r\n0\r\n\r\n"), Ok(Some(15)));
    }

    #[test]
    fn request_lines_give_method_and_path() {
        let buf = b"\r\nGET /orders?x=1 HTTP/1.1\r\nHost: x\r\n\r\n";
        let head = request_head(buf).expect("ok").expect("complete");
        assert_eq!(head.target(buf), ("GET", "/orders?x=1"));
        assert_eq!(head.len, buf.len());
    }
}
