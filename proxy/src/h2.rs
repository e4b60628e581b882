//! HTTP/2 through the proxy, and the gRPC step client.
//!
//! A `grpc` interface, and an `http` interface whose client opens with the
//! HTTP/2 preface (h2c with prior knowledge), are served here instead of by
//! the HTTP/1.1 relay in `proxy.rs`: HTTP/2 multiplexes requests on one
//! connection, so rules must apply per stream, which a byte relay cannot
//! do. Each client connection gets its own upstream HTTP/2 connection, and
//! each stream is decided on its own:
//!
//! * gRPC rules match the full method path (`/pkg.Service/Method`);
//!   `error()` answers with a real gRPC status (trailers-only response),
//!   `response()` answers OK with the given message bytes, `drop()` cuts the
//!   TCP connection with every call on it, as a network failure would;
//!   how a client reports that is its own (grpc-go: UNAVAILABLE; tonic:
//!   UNKNOWN "transport error").
//! * HTTP/2 rules match method and path like HTTP/1.1 ones.
//!
//! hyper drives both sides; one current-thread tokio runtime per client
//! connection keeps this inside the proxy's thread-per-connection model.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::protocol::Target;
use crate::rules::{ProxyAction, Request as RuleRequest};
use crate::server::{Closed, Ctx, lock};
use crate::steps::{StepCall, StepReply, StepResult};

type Body = BoxBody<Bytes, hyper::Error>;

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client on `sock` opened with the HTTP/2 preface. Waits
/// (up to 5 s) only while what arrived so far is still a prefix of it.
pub(crate) fn starts_with_preface(sock: &TcpStream) -> bool {
    let mut buf = [0u8; 24];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = match sock.peek(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if !PREFACE.starts_with(&buf[..n]) {
            return false;
        }
        if n == PREFACE.len() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[derive(Default)]
struct Counts {
    read: AtomicU64,
    written: AtomicU64,
}

/// A socket that counts the bytes through it, for `proxy_conn_close`.
struct Counted<T> {
    inner: T,
    counts: Arc<Counts>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = (buf.filled().len() - before) as u64;
            self.counts.read.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counts.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.counts.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Serves one HTTP/2 client connection; returns the bytes each way and
/// why it ended.
pub(crate) fn serve(client: TcpStream, ctx: &Arc<Ctx>) -> Closed {
    let Ok(rt) = runtime() else {
        return Closed::new(0, 0, "runtime failed");
    };
    let counts = Arc::new(Counts::default());
    let reason = rt.block_on(serve_conn(client, Arc::clone(ctx), Arc::clone(&counts)));
    Closed::new(
        counts.read.load(Ordering::Relaxed),
        counts.written.load(Ordering::Relaxed),
        reason,
    )
}

async fn serve_conn(client: TcpStream, ctx: Arc<Ctx>, counts: Arc<Counts>) -> &'static str {
    let Ok(cut) = client.try_clone() else {
        return "clone failed";
    };
    if client.set_nonblocking(true).is_err() {
        return "socket setup failed";
    }
    let Ok(client) = tokio::net::TcpStream::from_std(client) else {
        return "socket setup failed";
    };
    let ctx_protocol = ctx.protocol;
    let upstream = match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(ctx.upstream),
    )
    .await
    {
        Ok(Ok(s)) => s,
        _ => {
            // As transparent as a byte relay: the client sees its
            // connection end, as it would without the proxy.
            let _ = cut.shutdown(Shutdown::Both);
            return "upstream unreachable";
        }
    };
    let _ = upstream.set_nodelay(true);
    let sender = match hyper::client::conn::http2::handshake::<_, _, Body>(
        TokioExecutor::new(),
        TokioIo::new(upstream),
    )
    .await
    {
        Ok((sender, conn)) => {
            tokio::spawn(conn);
            sender
        }
        Err(_) => {
            let _ = cut.shutdown(Shutdown::Both);
            return "upstream handshake failed";
        }
    };
    let dropped = Arc::new(Dropped::default());
    let service = {
        let dropped = Arc::clone(&dropped);
        hyper::service::service_fn(move |req| {
            handle(req, Arc::clone(&ctx), sender.clone(), Arc::clone(&dropped))
        })
    };
    let io = TokioIo::new(Counted {
        inner: client,
        counts,
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(io, service);
    tokio::select! {
        r = conn => if r.is_ok() { "closed" } else { "protocol error" },
        _ = dropped.notify.notified() => {
            let reset = *dropped.reset.lock().unwrap_or_else(|p| p.into_inner());
            crate::server::cut(&cut, ctx_protocol, reset);
            "dropped"
        }
    }
}

/// A `drop()` decided on one stream, for the connection task to carry out.
#[derive(Default)]
struct Dropped {
    notify: Notify,
    reset: std::sync::Mutex<Option<bool>>,
}

fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|n| match n {}).boxed()
}

/// One length-prefixed gRPC message (uncompressed).
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

/// Percent-encodes a grpc-message value (the gRPC HTTP/2 spec's rule:
/// printable ASCII except `%` stays).
fn grpc_message_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn grpc_message_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(h) = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(h);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A trailers-only gRPC answer carrying status `code`.
fn grpc_status(code: u16, message: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&grpc_message_encode(message)) {
        h.insert("grpc-message", v);
    }
    h.insert("x-faultbox", HeaderValue::from_static("injected"));
    r
}

/// An OK gRPC answer with one message.
fn grpc_ok(message: &[u8]) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(0u16));
    let body = Full::new(grpc_frame(message))
        .with_trailers(async move { Some(Ok::<_, Infallible>(trailers)) })
        .map_err(|n| match n {})
        .boxed();
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert("x-faultbox", HeaderValue::from_static("injected"));
    r
}

fn http_answer(status: u16, body: String, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static(content_type));
    h.insert("x-faultbox", HeaderValue::from_static("injected"));
    r
}

async fn handle(
    req: Request<Incoming>,
    ctx: Arc<Ctx>,
    mut sender: SendRequest<Body>,
    dropped: Arc<Dropped>,
) -> Result<Response<Body>, Infallible> {
    let grpc = ctx.protocol.name() == "grpc";
    let path = req.uri().path().to_string();
    let method = req.method().as_str().to_string();
    let verdict = lock(&ctx.rules).decide(&RuleRequest {
        method: if grpc { &path } else { &method },
        path: &path,
        command: "",
        key: "",
        query: "",
        first_bytes: &[],
    });
    if !verdict.fired.is_empty() {
        let what = if grpc {
            path.clone()
        } else {
            format!("{method} {path}")
        };
        ctx.fired(&verdict, &what);
    }
    if verdict.delay_ns > 0 {
        tokio::time::sleep(Duration::from_nanos(verdict.delay_ns)).await;
    }
    match verdict.action {
        Some(ProxyAction::Drop { reset }) => {
            // The connection task cuts the socket; this stream never
            // answers.
            *dropped.reset.lock().unwrap_or_else(|p| p.into_inner()) = reset;
            dropped.notify.notify_one();
            std::future::pending::<()>().await;
        }
        Some(ProxyAction::Respond { status, body }) => {
            return Ok(if grpc {
                grpc_ok(body.as_bytes())
            } else {
                let ctype = if body.trim_start().starts_with(['{', '[']) {
                    "application/json"
                } else {
                    "text/plain"
                };
                http_answer(status.unwrap_or(200), body, ctype)
            });
        }
        Some(ProxyAction::Error {
            status, message, ..
        }) => {
            return Ok(if grpc {
                grpc_status(status.unwrap_or(13), &message)
            } else {
                let body = serde_json::json!({ "error": message }).to_string();
                http_answer(status.unwrap_or(500), body, "application/json")
            });
        }
        _ => {}
    }
    let (parts, body) = req.into_parts();
    let forwarded = if verdict.duplicate {
        // The copy needs the body twice: buffer it.
        let Ok(collected) = body.collect().await else {
            return Ok(http_answer(502, "client body failed".into(), "text/plain"));
        };
        let bytes = collected.to_bytes();
        let copy = Request::from_parts(parts.clone(), full(bytes.clone()));
        let mut second = sender.clone();
        tokio::spawn(async move {
            if second.ready().await.is_ok()
                && let Ok(r) = second.send_request(copy).await
            {
                let _ = r.into_body().collect().await;
            }
        });
        Request::from_parts(parts, full(bytes))
    } else {
        Request::from_parts(parts, body.boxed())
    };
    let answer = match sender.ready().await {
        Ok(()) => sender.send_request(forwarded).await,
        Err(e) => Err(e),
    };
    Ok(match answer {
        Ok(r) => r.map(BodyExt::boxed),
        Err(e) if grpc => grpc_status(14, &format!("upstream: {e}")),
        Err(e) => http_answer(502, format!("upstream: {e}"), "text/plain"),
    })
}

/// A gRPC call's outcome as the step sees it.
#[derive(Debug, Default)]
pub struct GrpcReply {
    pub code: u32,
    pub message: String,
    /// The first response message, as sent (protobuf bytes, usually).
    pub body: Vec<u8>,
    pub messages: usize,
    pub headers: BTreeMap<String, String>,
}

/// gRPC's mapping of HTTP statuses that are not 200 (gRPC's
/// http-grpc-status-mapping document).
fn code_of_http(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// Calls `method` (`/pkg.Service/Method`) on `addr` with one raw message
/// over HTTP/2 (TLS with ALPN `h2` when `tls` is given). Transport
/// failures come back as UNAVAILABLE, as gRPC clients report them.
pub fn grpc_call(
    addr: &str,
    method: &str,
    body: &[u8],
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> io::Result<GrpcReply> {
    let rt = runtime()?;
    let call = async {
        let (sender, scheme) = connect_h2(addr, tls).await?;
        exchange(sender, scheme, addr, method, body).await
    };
    Ok(
        match rt.block_on(async { tokio::time::timeout(timeout, call).await }) {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => GrpcReply {
                code: 14,
                message: e.to_string(),
                ..GrpcReply::default()
            },
            Err(_) => GrpcReply {
                code: 4,
                message: format!("no answer within {timeout:?}"),
                ..GrpcReply::default()
            },
        },
    )
}

/// An HTTP/2 client connection to `addr`: h2c, or TLS with ALPN `h2`
/// when `tls` is given. Returns the sender and the URL scheme.
async fn connect_h2(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> io::Result<(SendRequest<Body>, &'static str)> {
    async fn handshake<T>(io: T) -> io::Result<SendRequest<Body>>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
            TokioExecutor::new(),
            TokioIo::new(io),
        )
        .await
        .map_err(io::Error::other)?;
        tokio::spawn(conn);
        Ok(sender)
    }
    let target: SocketAddr = crate::net::resolve(addr)?[0];
    let sock = tokio::net::TcpStream::connect(target).await?;
    let _ = sock.set_nodelay(true);
    let Some(config) = tls else {
        return Ok((handshake(sock).await?, "http"));
    };
    let mut config = (**config).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost")
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, sock)
        .await?;
    Ok((handshake(stream).await?, "https"))
}

async fn exchange(
    mut sender: SendRequest<Body>,
    scheme: &str,
    authority: &str,
    method: &str,
    body: &[u8],
) -> io::Result<GrpcReply> {
    let req = Request::post(format!("{scheme}://{authority}{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(grpc_frame(body)))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    sender.ready().await.map_err(io::Error::other)?;
    let resp = sender.send_request(req).await.map_err(io::Error::other)?;
    let status = resp.status().as_u16();
    let head = resp.headers().clone();
    let mut reply = GrpcReply::default();
    for (k, v) in resp.headers() {
        reply.headers.insert(
            k.as_str().to_string(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        );
    }
    let collected = resp.into_body().collect().await.map_err(io::Error::other)?;
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    if status != 200 {
        reply.code = code_of_http(status);
        reply.message = format!("HTTP status {status}");
        return Ok(reply);
    }
    // Trailers-only answers carry the status in the headers.
    let status_from = |h: &HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .map(|code| {
                let message = h
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .map(grpc_message_decode)
                    .unwrap_or_default();
                (code, message)
            })
    };
    let (code, message) = trailers
        .as_ref()
        .and_then(status_from)
        .or_else(|| status_from(&head))
        .unwrap_or((2, "no grpc-status in the answer".into()));
    reply.code = code;
    reply.message = message;
    let mut rest = &data[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let Some(msg) = rest.get(5..5 + len) else {
            break;
        };
        if reply.messages == 0 {
            reply.body = msg.to_vec();
        }
        reply.messages += 1;
        rest = &rest[5 + len..];
    }
    Ok(reply)
}

/// An `http2` interface's step: one request over HTTP/2 with prior
/// knowledge (h2c), or over TLS with ALPN `h2`.
pub(crate) fn http2_step(call: &StepCall, to: &Target) -> StepResult {
    let timeout = call.timeout(Duration::from_secs(30));
    let method = call.method.to_ascii_uppercase();
    let path = call.str("path").unwrap_or("/").to_string();
    let body = call.str("body").unwrap_or_default().as_bytes().to_vec();
    let headers = call.headers("headers").to_vec();
    let addr = to.addr.to_string();
    let tls = to.tls.cloned();
    let Ok(rt) = runtime() else {
        return crate::net::failed("cannot start an HTTP/2 client");
    };
    let request = async move {
        let (sender, scheme) = connect_h2(&addr, tls.as_ref()).await?;
        h2_request(sender, scheme, &addr, &method, &path, &headers, body).await
    };
    match rt.block_on(async { tokio::time::timeout(timeout, request).await }) {
        Ok(Ok(reply)) => StepResult::Reply(reply),
        Ok(Err(e)) => crate::net::failed(e),
        Err(_) => crate::net::failed(format!("no answer within {timeout:?}")),
    }
}

async fn h2_request(
    mut sender: SendRequest<Body>,
    scheme: &str,
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> io::Result<StepReply> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{scheme}://{authority}{path}"));
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(full(Bytes::from(body)))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    sender.ready().await.map_err(io::Error::other)?;
    let resp = sender.send_request(req).await.map_err(io::Error::other)?;
    let mut reply = StepReply {
        status: i64::from(resp.status().as_u16()),
        ok: true,
        ..StepReply::default()
    };
    for (k, v) in resp.headers() {
        reply.headers.insert(
            k.as_str().to_string(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        );
    }
    let data = resp
        .into_body()
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes();
    reply.body = String::from_utf8_lossy(&data).trim_end().to_string();
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_round_trip_their_percent_encoding() {
        let text = "disk 100% full: naïve\nretry";
        let enc = grpc_message_encode(text);
        assert!(enc.is_ascii() && !enc.contains('\n'), "{enc}");
        assert_eq!(grpc_message_decode(&enc), text);
        assert_eq!(grpc_message_decode("50%"), "50%");
    }

    /// An HTTP/2 (h2c) upstream answering `hello <path>`.
    fn overloaded() -> ProxyAction {
        ProxyAction::Error {
            status: Some(503),
            message: "overloaded".into(),
            code: None,
            number: None,
        }
    }

    fn h2_upstream() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            let Ok(rt) = runtime() else { return };
            rt.block_on(async move {
                listener.set_nonblocking(true).expect("nonblocking");
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                while let Ok((sock, _)) = listener.accept().await {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let body = format!("hello {}", req.uri().path());
                        Ok::<_, Infallible>(Response::new(full(body)))
                    });
                    tokio::spawn(
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(sock), svc),
                    );
                }
            });
        });
        addr
    }

    fn curl(args: &[&str]) -> String {
        let out = std::process::Command::new("curl")
            .args(["-s", "--max-time", "5", "--http2-prior-knowledge"])
            .args(["-w", " %{http_version} %{http_code}"])
            .args(args)
            .output()
            .expect("curl (scripts/setup installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn h2c_on_an_http_interface_applies_rules_per_stream() {
        let upstream = h2_upstream();
        let trace = Arc::new(crate::NoEvents);
        let proxy =
            crate::server::Proxy::start("web", "api", "http", upstream, trace).expect("proxy");
        let rule = crate::rules::test_rule(overloaded(), Some("GET"), Some("/blocked/*"));
        proxy
            .rules()
            .push_front(
                1,
                vec![(faultbox_agent::rule::RuleId::in_window(1, "0"), rule)],
            )
            .expect("rules");
        let base = format!("http://{}", proxy.listen);
        // Both requests on one HTTP/2 connection: one passes, one is
        // answered by the rule.
        // curl 7.88 does not reuse a prior-knowledge connection for a
        // second URL, so one request per run.
        assert_eq!(curl(&[&format!("{base}/fine")]), "hello /fine 2 200");
        assert_eq!(
            curl(&[&format!("{base}/blocked/x")]),
            "{\"error\":\"overloaded\"} 2 503"
        );
        // Two streams on one connection, each decided on its own.
        let rt = runtime().expect("runtime");
        let answers = rt.block_on(async {
            let sock = tokio::net::TcpStream::connect(proxy.listen)
                .await
                .expect("connect");
            let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
                TokioExecutor::new(),
                TokioIo::new(sock),
            )
            .await
            .expect("handshake");
            tokio::spawn(conn);
            let get = |path: &str| {
                let mut s = sender.clone();
                let req = Request::get(format!("{base}{path}"))
                    .body(full(Bytes::new()))
                    .expect("request");
                async move {
                    let r = s.send_request(req).await.expect("answer");
                    let status = r.status().as_u16();
                    let body = r.into_body().collect().await.expect("body").to_bytes();
                    (status, String::from_utf8_lossy(&body).into_owned())
                }
            };
            tokio::join!(get("/blocked/1"), get("/fine/2"))
        });
        assert_eq!(answers.0.0, 503);
        assert_eq!(answers.1, (200, "hello /fine/2".to_string()));
        proxy.stop();
    }

    #[test]
    fn http2_steps_go_over_h2c_and_see_the_rules_per_stream() {
        let upstream = h2_upstream();
        let proxy =
            crate::server::Proxy::start("web", "api", "http2", upstream, Arc::new(crate::NoEvents))
                .expect("proxy");
        let rule = crate::rules::test_rule(overloaded(), None, Some("/blocked"));
        proxy
            .rules()
            .push_front(
                1,
                vec![(faultbox_agent::rule::RuleId::in_window(1, "0"), rule)],
            )
            .expect("rules");
        let addr = proxy.listen.to_string();
        let call = |path: &str| StepCall {
            service: "web".into(),
            interface: "api".into(),
            protocol: "http2".into(),
            port: 0,
            method: "get".into(),
            args: [("path".to_string(), crate::steps::Arg::Str(path.into()))].into(),
        };
        let to = Target {
            addr: &addr,
            tls: None,
            env: &[],
        };
        let StepResult::Reply(fine) = http2_step(&call("/fine"), &to) else {
            panic!("a reply");
        };
        assert_eq!((fine.status, fine.body.as_str()), (200, "hello /fine"));
        let StepResult::Reply(blocked) = http2_step(&call("/blocked"), &to) else {
            panic!("a reply");
        };
        assert_eq!(blocked.status, 503);
        assert!(blocked.body.contains("overloaded"), "{}", blocked.body);
        proxy.stop();
    }
}
