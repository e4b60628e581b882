//! The proxy in front of each interface: it accepts clients on a free
//! loopback port, relays them to the upstream, and hands each connection
//! to its protocol (`protocols/`), which applies the rules.
//!
//! Threads and blocking sockets on purpose: a relay thread per direction
//! is the fastest plain relay on these machines (see docs/benchmarks.md),
//! and a test's traffic is a handful of connections.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::protocol::{self, Frame, MAX_FRAME, Protocol};
use crate::rules::{Request, RuleSet, Verdict, canonical_sql};
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
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    accept: Option<JoinHandle<()>>,
    datagrams: bool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What every connection of one proxy shares.
pub struct Ctx {
    service: String,
    interface: String,
    pub(crate) protocol: &'static dyn Protocol,
    pub(crate) upstream: SocketAddr,
    pub(crate) rules: Arc<Mutex<RuleSet>>,
    events: Arc<dyn EventSink>,
    /// The open client connections by id, so `stop` can cut them. Each
    /// leaves the map when it ends: a closed connection keeps no fd.
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    next_conn: AtomicU64,
    pub(crate) stop: Arc<AtomicBool>,
}

impl Ctx {
    fn conn_open(&self, id: u64, client: &str) {
        self.events.emit(
            "proxy_conn_open",
            &self.service,
            fields([
                ("interface", self.interface.clone()),
                ("protocol", self.protocol.name().to_string()),
                ("client", client.to_string()),
                ("conn_id", id.to_string()),
            ]),
        );
    }

    /// A datagram client seen for the first time.
    pub(crate) fn conn_opened(&self, client: &str) {
        self.conn_open(self.next_conn.fetch_add(1, Ordering::SeqCst), client);
    }

    /// Records the rules of `v` that fired on request `what`.
    pub(crate) fn fired(&self, v: &Verdict, what: &str) {
        for (id, action) in &v.fired {
            self.events.emit(
                "proxy",
                &self.service,
                fields([
                    ("interface", self.interface.clone()),
                    ("protocol", self.protocol.name().to_string()),
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
        let local = std::net::Ipv4Addr::LOCALHOST.into();
        Proxy::start_on(local, service, interface, protocol, upstream, events)
    }

    /// [`Proxy::start`] listening on `bind`: a container reaches the
    /// proxies at its network's gateway, which this machine also owns.
    pub fn start_on(
        bind: std::net::IpAddr,
        service: &str,
        interface: &str,
        protocol: &str,
        upstream: SocketAddr,
        events: Arc<dyn EventSink>,
    ) -> io::Result<Proxy> {
        let proto = protocol::get(protocol).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "no proxy for protocol {protocol:?} (this build proxies {})",
                    protocol::names().join(", ")
                ),
            )
        })?;

        let rules = Arc::new(Mutex::new(RuleSet::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(HashMap::new()));
        let ctx = Arc::new(Ctx {
            service: service.to_string(),
            interface: interface.to_string(),
            protocol: proto,
            upstream,
            rules: Arc::clone(&rules),
            events,
            conns: Arc::clone(&conns),
            next_conn: AtomicU64::new(1),
            stop: Arc::clone(&stop),
        });
        let thread = std::thread::Builder::new().name(format!("proxy {service}.{interface}"));
        let (listen, accept) = if proto.datagrams() {
            let sock = std::net::UdpSocket::bind((bind, 0))?;
            let listen = sock.local_addr()?;
            (
                listen,
                thread.spawn(move || crate::protocols::udp::io::relay(sock, ctx))?,
            )
        } else {
            let listener = TcpListener::bind((bind, 0))?;
            let listen = listener.local_addr()?;
            (listen, thread.spawn(move || accept_loop(listener, ctx))?)
        };
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
            datagrams: proto.datagrams(),
        })
    }

    /// The rules, to add or remove a window.
    pub fn rules(&self) -> MutexGuard<'_, RuleSet> {
        lock(&self.rules)
    }

    /// Stops accepting and cuts every open connection.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop (a datagram relay wakes on its own tick).
        if !self.datagrams {
            let _ = TcpStream::connect_timeout(&self.listen, Duration::from_millis(200));
        }
        for (_, c) in lock(&self.conns).drain() {
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
        lock(&ctx.conns).insert(id, c);
    }
    ctx.conn_open(id, &peer);
    let started = Instant::now();
    let Closed { up, down, reason } = ctx.protocol.serve(client, ctx);
    lock(&ctx.conns).remove(&id);
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

/// How a proxied connection ended: bytes each way and why.
pub struct Closed {
    pub up: u64,
    pub down: u64,
    pub reason: &'static str,
}

impl Closed {
    pub(crate) fn new(up: u64, down: u64, reason: &'static str) -> Closed {
        Closed { up, down, reason }
    }
}

/// Ends a dropped client connection (see [`ProxyAction::Drop`]).
pub(crate) fn cut(client: &TcpStream, protocol: &dyn Protocol, reset: Option<bool>) {
    if reset.unwrap_or(protocol.resets_on_drop()) && crate::pipe::reset(client).is_ok() {
        return;
    }
    let _ = client.shutdown(Shutdown::Both);
}

const BUF: usize = 64 << 10;

/// Reads whole messages of a protocol from a stream: bytes accumulate
/// until the protocol's IO-free frame parser finds a message, which is
/// handed out in place. Never holds more than [`MAX_FRAME`] bytes.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: Read> FrameReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: vec![0; BUF],
            start: 0,
            end: 0,
        }
    }

    /// Bytes read but not handed out.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads at least one more byte into the buffer; Ok(0) at end of
    /// stream. Fails when a message would exceed [`MAX_FRAME`].
    pub fn fill(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() >= MAX_FRAME {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "message over the proxy's 16 MiB limit",
                ));
            } else {
                let grown = (self.buf.len() * 2).min(MAX_FRAME);
                self.buf.resize(grown, 0);
            }
        }
        let n = self.inner.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// The next whole message as `frame` delimits it; Ok(None) at a clean
    /// end of stream (no partial message pending).
    pub fn next(&mut self, frame: fn(&[u8]) -> Frame) -> io::Result<Option<&[u8]>> {
        loop {
            match frame(self.buffered()) {
                Ok(Some(n)) => {
                    let at = self.start;
                    self.start += n;
                    if self.start == self.end {
                        (self.start, self.end) = (0, 0);
                        // The message still sits at `at`: nothing reads
                        // into the buffer before the caller is done.
                    }
                    return Ok(Some(&self.buf[at..at + n]));
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            if self.fill()? == 0 {
                return if self.start == self.end {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed mid-message",
                    ))
                };
            }
        }
    }

    /// Moves exactly `n` more bytes of the stream (buffered first) to `to`.
    pub fn relay(&mut self, mut n: u64, to: &mut impl Write) -> io::Result<u64> {
        let total = n;
        while n > 0 {
            if self.start == self.end && self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-body",
                ));
            }
            let take = (self.end - self.start).min(usize::try_from(n).unwrap_or(usize::MAX));
            to.write_all(&self.buf[self.start..self.start + take])?;
            self.start += take;
            n -= take as u64;
        }
        Ok(total)
    }

    /// The stream, and the bytes read but not handed out.
    pub fn into_parts(self) -> (R, Vec<u8>) {
        let rest = self.buf[self.start..self.end].to_vec();
        (self.inner, rest)
    }
}

/// Copies until EOF; half-closes the destination so the other side sees
/// the end too. Returns the bytes copied.
pub(crate) fn pump(mut from: TcpStream, mut to: TcpStream) -> u64 {
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

/// A client connection of a protocol-aware relay: the reader of what the
/// client sends, and everything else ([`Link`]). Apart, so a message can
/// be handed out of the reader's buffer while the rest is used mutably.
pub(crate) struct Session {
    pub(crate) reader: FrameReader<TcpStream>,
    pub(crate) link: Link,
}

/// The client's write side, the upstream connection, the thread copying
/// the upstream's answers back to the client untouched, and the counts.
pub(crate) struct Link {
    pub(crate) client: TcpStream,
    pub(crate) upstream: TcpStream,
    pub(crate) answers: JoinHandle<u64>,
    /// Bytes from the client, and bytes the proxy answered itself.
    pub(crate) up: u64,
    pub(crate) injected: u64,
}

impl Session {
    pub(crate) fn open(client: TcpStream, ctx: &Ctx) -> Result<Session, &'static str> {
        let read_half = client.try_clone().map_err(|_| "clone failed")?;
        let upstream = match TcpStream::connect_timeout(&ctx.upstream, Duration::from_secs(5)) {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(upstream = %ctx.upstream, error = %e, "upstream unreachable");
                // A transparent proxy answers nothing the upstream did not:
                // the client sees its connection end, as without the proxy.
                let _ = client.shutdown(Shutdown::Both);
                return Err("upstream unreachable");
            }
        };
        let _ = upstream.set_nodelay(true);
        let (Ok(up_read), Ok(client_write)) = (upstream.try_clone(), client.try_clone()) else {
            return Err("clone failed");
        };
        Ok(Session {
            reader: FrameReader::new(read_half),
            link: Link {
                client,
                upstream,
                answers: std::thread::spawn(move || pump(up_read, client_write)),
                up: 0,
                injected: 0,
            },
        })
    }
}

impl Link {
    /// Answers the client for the upstream.
    pub(crate) fn answer(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        self.client.write_all(bytes).map_err(|_| "client closed")?;
        self.injected += bytes.len() as u64;
        Ok(())
    }

    /// Cuts the connection (a `drop()` rule).
    pub(crate) fn drop_client(&self, ctx: &Ctx, reset: Option<bool>) -> &'static str {
        cut(&self.client, ctx.protocol, reset);
        let _ = self.upstream.shutdown(Shutdown::Both);
        "dropped"
    }

    /// The end of the session: the upstream sees the end of the requests,
    /// and its answers end after.
    pub(crate) fn finish(self, reason: &'static str) -> Closed {
        let _ = self.upstream.shutdown(Shutdown::Write);
        let down = self.answers.join().unwrap_or(0) + self.injected;
        Closed::new(self.up, down, reason)
    }
}

/// Relays a client whose every message passes through `each`: it reads
/// messages with `frame`, counts them, and ends with `each`'s reason (or
/// the reader's). Each message is handed over in place, never copied.
pub(crate) fn relay_messages(
    client: TcpStream,
    ctx: &Ctx,
    frame: fn(&[u8]) -> Frame,
    mut each: impl FnMut(&mut Link, &Ctx, &[u8]) -> Result<(), &'static str>,
) -> Closed {
    let Session {
        mut reader,
        mut link,
    } = match Session::open(client, ctx) {
        Ok(s) => s,
        Err(reason) => return Closed::new(0, 0, reason),
    };
    let reason = loop {
        let message = match reader.next(frame) {
            Ok(Some(m)) => m,
            Ok(None) => break "closed",
            Err(e) if e.kind() == io::ErrorKind::InvalidData => break "bad message",
            Err(_) => break "closed",
        };
        link.up += message.len() as u64;
        if let Err(reason) = each(&mut link, ctx, message) {
            break reason;
        }
    };
    link.finish(reason)
}

/// Sends `request` once more to the upstream on a new connection, reads
/// and discards what comes back.
pub(crate) fn send_duplicate(upstream: SocketAddr, request: Vec<u8>) {
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

/// Decides one request: the rules that fire are recorded under `what`,
/// and their delays waited out before the verdict is returned.
pub(crate) fn decide(ctx: &Ctx, req: &Request, what: impl FnOnce() -> String) -> Verdict {
    let verdict = lock(&ctx.rules).decide(req);
    if !verdict.fired.is_empty() {
        ctx.fired(&verdict, &what());
    }
    if verdict.delay_ns > 0 {
        std::thread::sleep(Duration::from_nanos(verdict.delay_ns));
    }
    verdict
}

/// Decides one SQL statement (postgres, mysql) on its canonical form.
pub(crate) fn sql_verdict(ctx: &Ctx, sql: &str) -> Verdict {
    let canonical = canonical_sql(sql);
    decide(
        ctx,
        &Request {
            query: &canonical,
            ..Request::default()
        },
        || sql.chars().take(120).collect(),
    )
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{ProxyAction, test_rule as rule};
    use std::io::{BufRead, BufReader};

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

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
    }

    /// An upstream that answers every line with `+OK` (valid for the tcp
    /// line step and as a Redis reply alike) and closes with its client.
    fn ok_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for c in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = BufReader::new(c.try_clone().expect("clone"));
                    let mut w = c;
                    let mut line = String::new();
                    while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if w.write_all(b"+OK\r\n").is_err() {
                            break;
                        }
                        line.clear();
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn closed_connections_leave_no_descriptor_behind() {
        let upstream = ok_server();
        // Every stream protocol's proxy, each with what its clients send
        // first (an answer is not needed: the connection's whole life,
        // open to close, is).
        let first: &[(&str, &[u8])] = &[
            ("tcp", b"PING\r\n"),
            ("redis", b"*1\r\n$4\r\nPING\r\n"),
            ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("http2", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("grpc", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            ("memcached", b"version\r\n"),
            // A startup message (protocol 3.0) and a packet, both ending
            // in the newline the upstream answers.
            ("postgres", &[0, 0, 0, 9, 0, 3, 0, 0, b'\n']),
            ("mysql", &[1, 0, 0, 0, b'\n']),
        ];
        for (protocol, request) in first {
            let proxy = Proxy::start("svc", "main", protocol, upstream, Arc::new(crate::NoEvents))
                .expect("proxy");
            let before = open_fds();
            let started = Instant::now();
            for _ in 0..5_000 {
                let mut c = TcpStream::connect(proxy.listen).expect("connect");
                let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = c.write_all(request);
                let mut buf = [0u8; 8];
                let _ = c.read(&mut buf);
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{protocol}: 5,000 connections took {:?} (a proxy that never answers?)",
                started.elapsed()
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while open_fds() > before + 8 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                open_fds() <= before + 8,
                "{protocol}: {} fds open after 5,000 closed connections, {before} before",
                open_fds()
            );
            proxy.stop();
        }
    }

    #[test]
    fn udp_clients_cost_a_bounded_number_of_descriptors() {
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").expect("upstream");
        let to = upstream.local_addr().expect("addr");
        let proxy =
            Proxy::start("svc", "main", "udp", to, Arc::new(crate::NoEvents)).expect("proxy");
        let before = open_fds();
        for _ in 0..5_000 {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
            let _ = c.send_to(b"ping", proxy.listen);
        }
        let limit = crate::protocols::udp::MAX_CLIENTS + 8;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = 0;
        while Instant::now() < deadline {
            seen = seen.max(open_fds().saturating_sub(before));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            seen <= limit,
            "{seen} fds for 5,000 UDP clients (at most {limit} expected)"
        );
        assert!(
            seen >= 100,
            "the proxy relayed almost nothing: {seen} upstream sockets"
        );
        proxy.stop();
    }
}
