//! Protocol-level faults: a proxy in front of each interface.
//!
//! Every declared `tcp` or `http` interface gets a proxy on a free loopback
//! port once its service is ready. Other services' environments and the
//! test's steps are pointed at the proxy, so both see the same faults. A
//! proxy relays bytes untouched until a rule matches: then it answers for
//! the upstream (`response`, `error`), holds the request (`delay`) or cuts
//! the connection (`drop`).
//!
//! Threads and blocking sockets on purpose: a relay thread per direction
//! is the fastest plain relay on these machines (see docs/benchmarks.md),
//! and a test's traffic is a handful of connections.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::rules::{ProxyAction, Request, RuleSet, Verdict, canonical_sql};
use crate::{EventSink, fields};

/// A running proxy.
pub struct Proxy {
    pub service: String,
    pub interface: String,
    pub protocol: String,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Where it relays to.
    pub upstream: SocketAddr,
    rules: Arc<Mutex<RuleSet>>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct Ctx {
    service: String,
    interface: String,
    pub(crate) protocol: String,
    pub(crate) upstream: SocketAddr,
    pub(crate) rules: Arc<Mutex<RuleSet>>,
    events: Arc<dyn EventSink>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    next_conn: AtomicU64,
    stop: Arc<AtomicBool>,
}

impl Ctx {
    pub(crate) fn fired(&self, v: &Verdict, what: &str) {
        for (id, action) in &v.fired {
            self.events.emit(
                "proxy",
                &self.service,
                fields([
                    ("interface", self.interface.clone()),
                    ("protocol", self.protocol.clone()),
                    ("action", action.to_string()),
                    ("rule", id.to_string()),
                    ("request", what.to_string()),
                ]),
            );
        }
    }
}

impl Proxy {
    /// Starts a proxy for `service.interface` relaying to `upstream`. The
    /// caller announces it (`proxy_started`): behind a TLS front, the
    /// address clients use is the front's.
    pub fn start(
        service: &str,
        interface: &str,
        protocol: &str,
        upstream: SocketAddr,
        events: Arc<dyn EventSink>,
    ) -> io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let listen = listener.local_addr()?;
        let rules = Arc::new(Mutex::new(RuleSet::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let ctx = Arc::new(Ctx {
            service: service.to_string(),
            interface: interface.to_string(),
            protocol: protocol.to_string(),
            upstream,
            rules: Arc::clone(&rules),
            events,
            conns: Arc::clone(&conns),
            next_conn: AtomicU64::new(1),
            stop: Arc::clone(&stop),
        });
        let accept = std::thread::Builder::new()
            .name(format!("proxy {service}.{interface}"))
            .spawn(move || accept_loop(listener, ctx))?;
        Ok(Proxy {
            service: service.to_string(),
            interface: interface.to_string(),
            protocol: protocol.to_string(),
            listen,
            upstream,
            rules,
            stop,
            conns,
            accept: Some(accept),
        })
    }

    /// The rules, to add or remove a window.
    pub fn rules(&self) -> MutexGuard<'_, RuleSet> {
        lock(&self.rules)
    }

    /// Stops accepting and cuts every open connection.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.listen, Duration::from_millis(200));
        for c in lock(&self.conns).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    for conn in listener.incoming() {
        if ctx.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        let _ = client.set_nodelay(true);
        let ctx = Arc::clone(&ctx);
        let _ = std::thread::Builder::new()
            .name("proxy conn".into())
            .spawn(move || serve(client, &ctx));
    }
}

fn serve(client: TcpStream, ctx: &Arc<Ctx>) {
    let id = ctx.next_conn.fetch_add(1, Ordering::SeqCst);
    let peer = client
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    if let Ok(c) = client.try_clone() {
        lock(&ctx.conns).push(c);
    }
    ctx.events.emit(
        "proxy_conn_open",
        &ctx.service,
        fields([
            ("interface", ctx.interface.clone()),
            ("protocol", ctx.protocol.clone()),
            ("client", peer),
            ("conn_id", id.to_string()),
        ]),
    );
    let started = Instant::now();
    let (up, down, reason) = match ctx.protocol.as_str() {
        "grpc" => crate::h2::serve(client, ctx),
        "http" if crate::h2::starts_with_preface(&client) => crate::h2::serve(client, ctx),
        "http" => serve_http(client, ctx),
        "redis" => serve_redis(client, ctx),
        "postgres" => serve_postgres(client, ctx),
        "mysql" => serve_mysql(client, ctx),
        _ => serve_tcp(client, ctx),
    };
    ctx.events.emit(
        "proxy_conn_close",
        &ctx.service,
        fields([
            ("interface", ctx.interface.clone()),
            ("conn_id", id.to_string()),
            ("bytes_c2s", up.to_string()),
            ("bytes_s2c", down.to_string()),
            ("duration_ms", started.elapsed().as_millis().to_string()),
            ("reason", reason.to_string()),
        ]),
    );
}

/// Ends a dropped client connection (see [`ProxyAction::Drop`]).
pub(crate) fn cut(client: &TcpStream, protocol: &str, reset: Option<bool>) {
    if reset.unwrap_or(matches!(protocol, "http" | "grpc")) && crate::pipe::reset(client).is_ok() {
        return;
    }
    let _ = client.shutdown(Shutdown::Both);
}

const BUF: usize = 64 << 10;

/// Copies until EOF; half-closes the destination so the other side sees
/// the end too. Returns the bytes copied.
fn pump(mut from: TcpStream, mut to: TcpStream) -> u64 {
    // splice first: the bytes never enter user space.
    if let Ok(n) = crate::pipe::splice_all(&from, &to) {
        let _ = to.shutdown(Shutdown::Write);
        return n;
    }
    let mut buf = vec![0u8; BUF];
    let mut total = 0;
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                total += n as u64;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    total
}

fn serve_tcp(client: TcpStream, ctx: &Ctx) -> (u64, u64, &'static str) {
    let mut first = Vec::new();
    let peek = lock(&ctx.rules).wants_first_bytes();
    if peek {
        // Only rules that match on the first bytes make the proxy wait for
        // them; a server-speaks-first protocol is never held otherwise.
        let mut buf = vec![0u8; 4096];
        let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
        if let Ok(n) = (&client).read(&mut buf) {
            first.extend_from_slice(&buf[..n]);
        }
        let _ = client.set_read_timeout(None);
    }
    let verdict = lock(&ctx.rules).decide(&Request {
        method: "",
        path: "",
        command: "",
        key: "",
        query: "",
        first_bytes: if peek { &first } else { &[] },
    });
    ctx.fired(
        &verdict,
        &String::from_utf8_lossy(&first[..first.len().min(64)]),
    );
    if verdict.delay_ns > 0 {
        std::thread::sleep(Duration::from_nanos(verdict.delay_ns));
    }
    match verdict.action {
        Some(ProxyAction::Drop { reset }) => {
            cut(&client, &ctx.protocol, reset);
            return (first.len() as u64, 0, "dropped");
        }
        Some(ProxyAction::Respond { body, .. })
        | Some(ProxyAction::Error { message: body, .. }) => {
            let _ = (&client).write_all(body.as_bytes());
            let _ = client.shutdown(Shutdown::Both);
            return (first.len() as u64, body.len() as u64, "answered");
        }
        _ => {}
    }
    let Ok(mut upstream) = TcpStream::connect_timeout(&ctx.upstream, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return (0, 0, "upstream unreachable");
    };
    let _ = upstream.set_nodelay(true);
    if !first.is_empty() && upstream.write_all(&first).is_err() {
        return (0, 0, "upstream closed");
    }
    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
        return (0, 0, "clone failed");
    };
    let up = std::thread::spawn(move || pump(c2, u2));
    let down = pump(upstream, client);
    let up = up.join().unwrap_or(0) + first.len() as u64;
    (up, down, "closed")
}

/// One HTTP/1.1 request exactly as it came: head and body (chunked
/// framing kept) in one buffer, so relaying it is one write.
struct Message {
    wire: Vec<u8>,
    start: String,
    /// The `Upgrade` header's value, if any.
    upgrade: Option<String>,
}

/// If `buf` holds a whole request without a chunked body: its length and
/// where its head ends.
fn buffered_request(buf: &[u8]) -> Option<(usize, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let mut length = 0usize;
    for line in buf[..head_end].split(|c| *c == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|c| *c == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            length = std::str::from_utf8(line[colon + 1..].trim_ascii())
                .ok()?
                .parse()
                .ok()?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            // Chunked bodies and protocol switches take the slow path.
            return None;
        }
    }
    let total = head_end.checked_add(length)?;
    (total <= buf.len()).then_some((total, head_end))
}

/// A request head without its h2c upgrade: the `Upgrade` and
/// `HTTP2-Settings` headers, and their tokens in `Connection`.
fn without_h2c_upgrade(wire: &[u8]) -> Vec<u8> {
    let head_end = wire
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(wire.len(), |p| p + 4);
    let mut out = Vec::with_capacity(wire.len());
    for line in wire[..head_end].split_inclusive(|c| *c == b'\n') {
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
    out.extend_from_slice(&wire[head_end..]);
    out
}

fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let colon = line.iter().position(|c| *c == b':')?;
    if !line[..colon].trim_ascii().eq_ignore_ascii_case(name) {
        return None;
    }
    Some(line[colon + 1..].trim_ascii())
}

fn read_message(r: &mut BufReader<TcpStream>) -> io::Result<Option<Message>> {
    let mut wire = Vec::with_capacity(512);
    let mut start = String::new();
    let (mut length, mut chunked) = (None, false);
    let mut upgrade = None;
    loop {
        let at = wire.len();
        if r.read_until(b'\n', &mut wire)? == 0 {
            return if wire.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-message",
                ))
            };
        }
        let line = wire[at..].trim_ascii();
        if start.is_empty() {
            if !line.is_empty() {
                start = String::from_utf8_lossy(line).into_owned();
            }
            continue;
        }
        if line.is_empty() {
            break;
        }
        if let Some(v) = header_value(line, b"content-length") {
            length = std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<usize>().ok());
        } else if let Some(v) = header_value(line, b"transfer-encoding") {
            chunked = v.to_ascii_lowercase().windows(7).any(|w| w == b"chunked");
        } else if let Some(v) = header_value(line, b"upgrade") {
            upgrade = Some(String::from_utf8_lossy(v).into_owned());
        }
        if wire.len() > 64 << 10 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP head over 64 KiB",
            ));
        }
    }
    // A request without a length has no body.
    if chunked {
        loop {
            let at = wire.len();
            r.read_until(b'\n', &mut wire)?;
            let size = std::str::from_utf8(wire[at..].trim_ascii())
                .ok()
                .and_then(|l| usize::from_str_radix(l.split(';').next().unwrap_or(""), 16).ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let at = wire.len();
                    if r.read_until(b'\n', &mut wire)? == 0 || wire[at..].trim_ascii().is_empty() {
                        break;
                    }
                }
                break;
            }
            let at = wire.len();
            wire.resize(at + size + 2, 0);
            r.read_exact(&mut wire[at..])?;
        }
    } else if let Some(len) = length {
        let at = wire.len();
        wire.resize(at + len, 0);
        r.read_exact(&mut wire[at..])?;
    }
    Ok(Some(Message {
        wire,
        start,
        upgrade,
    }))
}

fn write_response(
    to: &mut TcpStream,
    status: u16,
    body: &str,
    content_type: &str,
) -> io::Result<usize> {
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
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nX-Faultbox: injected\r\n\r\n{body}",
        body.len()
    );
    to.write_all(text.as_bytes())?;
    Ok(text.len())
}

/// A client connection of a protocol-aware relay: its buffered reader, the
/// upstream connection, and the thread copying the upstream's answers back
/// to the client untouched.
struct Session {
    reader: BufReader<TcpStream>,
    client: TcpStream,
    upstream: TcpStream,
    answers: JoinHandle<u64>,
}

impl Session {
    fn open(client: TcpStream, ctx: &Ctx) -> Result<Session, &'static str> {
        let read_half = client.try_clone().map_err(|_| "clone failed")?;
        let Ok(upstream) = TcpStream::connect_timeout(&ctx.upstream, Duration::from_secs(5)) else {
            // A transparent proxy answers nothing the upstream did not:
            // the client sees its connection end, as without the proxy.
            let _ = client.shutdown(Shutdown::Both);
            return Err("upstream unreachable");
        };
        let _ = upstream.set_nodelay(true);
        let (Ok(up_read), Ok(client_write)) = (upstream.try_clone(), client.try_clone()) else {
            return Err("clone failed");
        };
        Ok(Session {
            reader: BufReader::with_capacity(64 << 10, read_half),
            client,
            upstream,
            answers: std::thread::spawn(move || pump(up_read, client_write)),
        })
    }
}

/// Sends `request` once more to the upstream on a new connection, reads
/// and discards what comes back.
fn send_duplicate(upstream: SocketAddr, request: Vec<u8>) {
    std::thread::spawn(move || {
        if let Ok(mut s) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            if s.write_all(&request).is_ok() {
                let _ = s.shutdown(Shutdown::Write);
                let _ = io::copy(&mut s, &mut io::sink());
            }
        }
    });
}

/// Decides one SQL statement (postgres, mysql): canonicalizes it, records
/// the rules that fire, and waits out their delays.
fn sql_verdict(ctx: &Ctx, sql: &str) -> Verdict {
    let canonical = canonical_sql(sql);
    let verdict = lock(&ctx.rules).decide(&Request {
        method: "",
        path: "",
        command: "",
        key: "",
        query: &canonical,
        first_bytes: &[],
    });
    if !verdict.fired.is_empty() {
        let short: String = sql.chars().take(120).collect();
        ctx.fired(&verdict, &short);
    }
    if verdict.delay_ns > 0 {
        std::thread::sleep(Duration::from_nanos(verdict.delay_ns));
    }
    verdict
}

/// HTTP with a thread per direction, like the fastest plain relay: this
/// thread reads requests, applies the rules and forwards what passes; a
/// second thread copies the upstream's answers back byte for byte. A rule
/// that answers for the upstream writes to the client from this thread,
/// which keeps responses in order for clients that wait for each answer
/// before the next request (all common ones); a pipelining client could
/// see an injected answer overtake a real one.
fn serve_http(client: TcpStream, ctx: &Ctx) -> (u64, u64, &'static str) {
    let Session {
        mut reader,
        mut client,
        mut upstream,
        answers,
    } = match Session::open(client, ctx) {
        Ok(session) => session,
        Err(reason) => return (0, 0, reason),
    };
    let mut up = 0u64;
    let mut injected = 0u64;
    let mut switching = false;
    let reason = loop {
        // Fast path: a whole request already in the buffer (the usual case
        // for small requests) is parsed and relayed in place.
        let whole = match reader.fill_buf() {
            Ok([]) => break "closed",
            Ok(buf) => buffered_request(buf),
            Err(_) => break "closed",
        };
        let owned;
        let (wire, start): (&[u8], &str) = match whole {
            Some((len, head_end)) => {
                let buf = reader.buffer();
                let line_end = buf.iter().position(|c| *c == b'\n').unwrap_or(head_end);
                let start = std::str::from_utf8(buf[..line_end].trim_ascii()).unwrap_or("");
                (&buf[..len], start)
            }
            None => match read_message(&mut reader) {
                Ok(Some(mut m)) => {
                    if let Some(protocol) = &m.upgrade {
                        if protocol.to_ascii_lowercase().contains("h2c") {
                            // Stay on HTTP/1.1, where the rules apply per
                            // request; the server answers as if asked plainly.
                            m.wire = without_h2c_upgrade(&m.wire);
                            m.upgrade = None;
                        } else {
                            switching = true;
                        }
                    }
                    owned = m;
                    (&owned.wire, owned.start.as_str())
                }
                Ok(None) => break "closed",
                Err(_) => break "bad request",
            },
        };
        let wire_len = wire.len();
        up += wire_len as u64;
        let mut parts = start.split_whitespace();
        let method = parts.next().unwrap_or("");
        let path = parts.next().unwrap_or("/");
        let verdict = lock(&ctx.rules).decide(&Request {
            method,
            path,
            command: "",
            key: "",
            query: "",
            first_bytes: &[],
        });
        if !verdict.fired.is_empty() {
            ctx.fired(&verdict, &format!("{method} {path}"));
        }
        if verdict.delay_ns > 0 {
            std::thread::sleep(Duration::from_nanos(verdict.delay_ns));
        }
        let answer = match verdict.action {
            Some(ProxyAction::Drop { reset }) => {
                cut(&client, &ctx.protocol, reset);
                let _ = upstream.shutdown(Shutdown::Both);
                break "dropped";
            }
            Some(ProxyAction::Respond { status, body }) => {
                let ctype = if body.trim_start().starts_with(['{', '[']) {
                    "application/json"
                } else {
                    "text/plain"
                };
                Some(write_response(
                    &mut client,
                    status.unwrap_or(200),
                    &body,
                    ctype,
                ))
            }
            Some(ProxyAction::Error {
                status, message, ..
            }) => {
                let body = serde_json::json!({ "error": message }).to_string();
                Some(write_response(
                    &mut client,
                    status.unwrap_or(500),
                    &body,
                    "application/json",
                ))
            }
            _ => None,
        };
        match answer {
            Some(Ok(n)) => injected += n as u64,
            Some(Err(_)) => break "client closed",
            None => {
                if upstream.write_all(wire).is_err() {
                    break "upstream closed";
                }
                if verdict.duplicate {
                    send_duplicate(ctx.upstream, wire.to_vec());
                }
            }
        }
        if whole.is_some() {
            reader.consume(wire_len);
        }
        if switching {
            // `Upgrade` (WebSocket and the like): once the server agrees,
            // what follows is not HTTP. Relay the rest as bytes; the
            // answers already are. (A server that declines leaves this
            // connection without rules from here on.)
            if upstream.write_all(reader.buffer()).is_err() {
                break "upstream closed";
            }
            up += reader.buffer().len() as u64;
            up += pump(reader.into_inner(), upstream);
            let down = answers.join().unwrap_or(0) + injected;
            return (up, down, "upgraded");
        }
    };
    // The upstream sees the end of the requests; its answers end after.
    let _ = upstream.shutdown(Shutdown::Write);
    let down = answers.join().unwrap_or(0) + injected;
    (up, down, reason)
}

/// One Redis command as the client sent it: its bytes and its words.
fn read_resp_command(r: &mut BufReader<TcpStream>) -> io::Result<Option<(Vec<u8>, Vec<String>)>> {
    let mut wire = Vec::new();
    if r.read_until(b'\n', &mut wire)? == 0 {
        return Ok(None);
    }
    let first = String::from_utf8_lossy(wire.trim_ascii()).into_owned();
    let Some(count) = first.strip_prefix('*') else {
        // An inline command: words on one line.
        let words = first.split_whitespace().map(str::to_string).collect();
        return Ok(Some((wire, words)));
    };
    let count: usize = count
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad RESP array"))?;
    let mut words = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let at = wire.len();
        r.read_until(b'\n', &mut wire)?;
        let len: usize = std::str::from_utf8(wire[at..].trim_ascii())
            .ok()
            .and_then(|l| l.strip_prefix('$'))
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad RESP bulk string"))?;
        let at = wire.len();
        wire.resize(at + len + 2, 0);
        r.read_exact(&mut wire[at..])?;
        words.push(String::from_utf8_lossy(&wire[at..at + len]).into_owned());
    }
    Ok(Some((wire, words)))
}

/// Redis, a thread per direction as for HTTP: commands are parsed and
/// matched on their name and key; answers are copied back untouched.
fn serve_redis(client: TcpStream, ctx: &Ctx) -> (u64, u64, &'static str) {
    let Session {
        mut reader,
        mut client,
        mut upstream,
        answers,
    } = match Session::open(client, ctx) {
        Ok(session) => session,
        Err(reason) => return (0, 0, reason),
    };
    let (mut up, mut injected) = (0u64, 0u64);
    let reason = loop {
        let (wire, words) = match read_resp_command(&mut reader) {
            Ok(Some(c)) => c,
            Ok(None) => break "closed",
            Err(_) => break "bad command",
        };
        up += wire.len() as u64;
        let command = words
            .first()
            .map(|w| w.to_ascii_uppercase())
            .unwrap_or_default();
        let key = words.get(1).map(String::as_str).unwrap_or("");
        let verdict = lock(&ctx.rules).decide(&Request {
            method: "",
            path: "",
            command: &command,
            key,
            query: "",
            first_bytes: &[],
        });
        if !verdict.fired.is_empty() {
            ctx.fired(&verdict, format!("{command} {key}").trim_end());
        }
        if verdict.delay_ns > 0 {
            std::thread::sleep(Duration::from_nanos(verdict.delay_ns));
        }
        let reply = match verdict.action {
            Some(ProxyAction::Drop { reset }) => {
                cut(&client, &ctx.protocol, reset);
                let _ = upstream.shutdown(Shutdown::Both);
                break "dropped";
            }
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
            Some(text) => {
                if client.write_all(text.as_bytes()).is_err() {
                    break "client closed";
                }
                injected += text.len() as u64;
            }
            None => {
                if upstream.write_all(&wire).is_err() {
                    break "upstream closed";
                }
                if verdict.duplicate {
                    send_duplicate(ctx.upstream, wire.clone());
                }
            }
        }
    };
    let _ = upstream.shutdown(Shutdown::Write);
    let down = answers.join().unwrap_or(0) + injected;
    (up, down, reason)
}

fn pg_frame(r: &mut impl Read, typed: bool) -> io::Result<Option<Vec<u8>>> {
    let head = if typed { 5 } else { 4 };
    let mut wire = vec![0u8; head];
    match r.read_exact(&mut wire) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let l = &wire[head - 4..];
    let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
    if !(4..=256 << 20).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad PostgreSQL message length",
        ));
    }
    wire.resize(head + len - 4, 0);
    r.read_exact(&mut wire[head..])?;
    Ok(Some(wire))
}

fn pg_error(code: &str, message: &str) -> Vec<u8> {
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

const PG_READY_IDLE: [u8; 6] = [b'Z', 0, 0, 0, 5, b'I'];

fn finish_relay(
    upstream: &TcpStream,
    answers: JoinHandle<u64>,
    up: u64,
    injected: u64,
    reason: &'static str,
) -> (u64, u64, &'static str) {
    // The upstream sees the end of the requests; its answers end after.
    let _ = upstream.shutdown(Shutdown::Write);
    let down = answers.join().unwrap_or(0) + injected;
    (up, down, reason)
}

/// PostgreSQL: the startup exchange is relayed as it is; then simple
/// queries (`Q`) and parses (`P`) are matched on their SQL. An injected
/// error answers the query with an ErrorResponse (SQLSTATE included) and
/// ReadyForQuery; after a failed Parse, the rest of that extended-query
/// batch is discarded up to its Sync, as a server would. A session that
/// switches to TLS is relayed untouched.
fn serve_postgres(client: TcpStream, ctx: &Ctx) -> (u64, u64, &'static str) {
    let Session {
        mut reader,
        mut client,
        mut upstream,
        answers,
    } = match Session::open(client, ctx) {
        Ok(session) => session,
        Err(reason) => return (0, 0, reason),
    };
    let (mut up, mut injected) = (0u64, 0u64);
    // Untyped messages first: SSL/GSS requests, then the startup message.
    loop {
        let Ok(Some(msg)) = pg_frame(&mut reader, false) else {
            return finish_relay(&upstream, answers, up, injected, "closed");
        };
        up += msg.len() as u64;
        if upstream.write_all(&msg).is_err() {
            return finish_relay(&upstream, answers, up, injected, "upstream closed");
        }
        let code = u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]);
        if code != 80_877_103 && code != 80_877_104 {
            break;
        }
        // After an SSL request, a TLS handshake (0x16) means the session
        // is encrypted from here: relay it blind.
        if let Ok(buf) = reader.fill_buf()
            && buf.first() == Some(&0x16)
        {
            let rest = reader.buffer().to_vec();
            let _ = upstream.write_all(&rest);
            let inner = reader.into_inner();
            let n = pump(inner, upstream.try_clone().unwrap_or(upstream));
            return (up + n, answers.join().unwrap_or(0), "tls passthrough");
        }
    }
    let mut discarding = false;
    let reason = loop {
        let msg = match pg_frame(&mut reader, true) {
            Ok(Some(m)) => m,
            Ok(None) => break "closed",
            Err(_) => break "bad message",
        };
        up += msg.len() as u64;
        let tag = msg[0];
        if discarding {
            if tag == b'S' {
                discarding = false;
                if client.write_all(&PG_READY_IDLE).is_err() {
                    break "client closed";
                }
                injected += PG_READY_IDLE.len() as u64;
            }
            continue;
        }
        let sql = match tag {
            b'Q' => Some(&msg[5..]),
            // Parse: statement name, then the query, both NUL-terminated.
            b'P' => msg[5..]
                .iter()
                .position(|c| *c == 0)
                .map(|i| &msg[5 + i + 1..]),
            _ => None,
        };
        let Some(sql) = sql else {
            if upstream.write_all(&msg).is_err() {
                break "upstream closed";
            }
            continue;
        };
        let end = sql.iter().position(|c| *c == 0).unwrap_or(sql.len());
        let verdict = sql_verdict(ctx, &String::from_utf8_lossy(&sql[..end]));
        match verdict.action {
            Some(ProxyAction::Drop { reset }) => {
                cut(&client, &ctx.protocol, reset);
                let _ = upstream.shutdown(Shutdown::Both);
                break "dropped";
            }
            Some(ProxyAction::Error { message, code, .. }) => {
                let mut reply = pg_error(code.as_deref().unwrap_or("XX000"), &message);
                if tag == b'Q' {
                    reply.extend_from_slice(&PG_READY_IDLE);
                } else {
                    discarding = true;
                }
                if client.write_all(&reply).is_err() {
                    break "client closed";
                }
                injected += reply.len() as u64;
            }
            _ => {
                if upstream.write_all(&msg).is_err() {
                    break "upstream closed";
                }
            }
        }
    };
    finish_relay(&upstream, answers, up, injected, reason)
}

/// MySQL/MariaDB: the server speaks first and the handshake is relayed
/// as it is. Every client packet with sequence number 0 starts a command;
/// COM_QUERY and COM_STMT_PREPARE are matched on their SQL. An injected
/// error answers with an ERR packet (code 1105, the SQLSTATE of `code=`,
/// default HY000), and the connection stays usable.
fn serve_mysql(client: TcpStream, ctx: &Ctx) -> (u64, u64, &'static str) {
    let Session {
        mut reader,
        mut client,
        mut upstream,
        answers,
    } = match Session::open(client, ctx) {
        Ok(session) => session,
        Err(reason) => return (0, 0, reason),
    };
    let (mut up, mut injected) = (0u64, 0u64);
    let reason = loop {
        let Ok(packet) = crate::tls::read_mysql_packet(&mut reader) else {
            break "closed";
        };
        up += packet.len() as u64;
        let command = (packet[3] == 0).then(|| packet.get(4).copied()).flatten();
        let sql = match command {
            Some(0x03) | Some(0x16) => Some(String::from_utf8_lossy(&packet[5..]).into_owned()),
            _ => None,
        };
        let Some(sql) = sql else {
            if upstream.write_all(&packet).is_err() {
                break "upstream closed";
            }
            continue;
        };
        let verdict = sql_verdict(ctx, &sql);
        match verdict.action {
            Some(ProxyAction::Drop { reset }) => {
                cut(&client, &ctx.protocol, reset);
                let _ = upstream.shutdown(Shutdown::Both);
                break "dropped";
            }
            Some(ProxyAction::Error {
                message,
                code,
                number,
                ..
            }) => {
                let mut body = vec![0xff];
                body.extend_from_slice(&number.unwrap_or(1105).to_le_bytes());
                body.push(b'#');
                body.extend_from_slice(code.as_deref().unwrap_or("HY000").as_bytes());
                body.extend_from_slice(message.as_bytes());
                let len = (body.len() as u32).to_le_bytes();
                let mut reply = vec![len[0], len[1], len[2], 1];
                reply.extend_from_slice(&body);
                if client.write_all(&reply).is_err() {
                    break "client closed";
                }
                injected += reply.len() as u64;
            }
            _ => {
                if upstream.write_all(&packet).is_err() {
                    break "upstream closed";
                }
            }
        }
    };
    finish_relay(&upstream, answers, up, injected, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::ProxyRuleDef;
    use faultbox_agent::rule::Trigger;

    fn rule(action: ProxyAction, method: Option<&str>, path: Option<&str>) -> ProxyRuleDef {
        ProxyRuleDef {
            action,
            method: method.map(str::to_string),
            path: path.map(str::to_string),
            command: None,
            key: None,
            query: None,
            probability: 1.0,
            trigger: Trigger::Always,
            label: None,
        }
    }

    #[test]
    fn drop_resets_or_closes_as_asked() {
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind");
        let upstream = echo.local_addr().expect("addr");
        std::thread::spawn(move || {
            for c in echo.incoming().flatten() {
                let (Ok(mut r), mut w) = (c.try_clone(), c) else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = io::copy(&mut r, &mut w);
                });
            }
        });
        // What a client reading from a dropped connection sees.
        let seen = |protocol: &str, reset: Option<bool>| {
            let proxy = Proxy::start("svc", "main", protocol, upstream, Arc::new(crate::NoEvents))
                .expect("proxy");
            proxy
                .rules()
                .push_front(
                    1,
                    vec![(
                        faultbox_agent::rule::RuleId::in_window(1, "0"),
                        rule(ProxyAction::Drop { reset }, None, None),
                    )],
                )
                .expect("rules");
            let mut c = TcpStream::connect(proxy.listen).expect("connect");
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut buf = [0u8; 16];
            let got = c.read(&mut buf).map_err(|e| e.kind());
            proxy.stop();
            got
        };
        assert_eq!(seen("tcp", None), Ok(0), "tcp: an orderly close");
        assert_eq!(
            seen("tcp", Some(true)),
            Err(io::ErrorKind::ConnectionReset),
            "tcp: reset on request"
        );
        assert_eq!(
            seen("http", None),
            Err(io::ErrorKind::ConnectionReset),
            "http: a reset by default"
        );
        assert_eq!(seen("http", Some(false)), Ok(0), "http: close on request");
    }

    /// A server that reads one request head, then answers with `reply`
    /// (given the head) and, after a `101`, echoes raw bytes.
    fn upgrade_server(reply: fn(&str) -> String) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = BufReader::new(c.try_clone().expect("clone"));
                    let mut w = c;
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let answer = reply(&head);
                    let _ = w.write_all(answer.as_bytes());
                    if answer.starts_with("HTTP/1.1 101") {
                        let _ = io::copy(&mut r, &mut w);
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn upgraded_connections_become_byte_streams_and_h2c_upgrades_are_declined() {
        let ws = upgrade_server(|_| {
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
                .to_string()
        });
        let proxy =
            Proxy::start("svc", "api", "http", ws, Arc::new(crate::NoEvents)).expect("proxy");
        let mut c = TcpStream::connect(proxy.listen).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
            .expect("write");
        let mut head = vec![
                0u8;
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
                    .len()
            ];
        c.read_exact(&mut head).expect("101");
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        // Not HTTP, and never a complete request head: a proxy still
        // parsing requests would hold it forever.
        let raw = b"\x00\x01 a frame with no line end";
        c.write_all(raw).expect("raw");
        let mut back = vec![0u8; raw.len()];
        c.read_exact(&mut back).expect("echo");
        assert_eq!(back, raw);
        proxy.stop();

        let mirror = upgrade_server(|head| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{head}",
                head.len()
            )
        });
        let proxy =
            Proxy::start("svc", "api", "http", mirror, Arc::new(crate::NoEvents)).expect("proxy");
        let mut c = TcpStream::connect(proxy.listen).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
        )
        .expect("write");
        let mut got = vec![0u8; 4096];
        let n = c.read(&mut got).expect("answer");
        let got = String::from_utf8_lossy(&got[..n]).to_ascii_lowercase();
        assert!(got.starts_with("http/1.1 200"), "{got}");
        assert!(
            !got.contains("upgrade") && !got.contains("http2-settings"),
            "{got}"
        );
        assert!(got.contains("connection: keep-alive\r\n"), "{got}");
        proxy.stop();
    }
}
