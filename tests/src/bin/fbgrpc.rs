//! A real gRPC server and a real gRPC client (tonic) for the end-to-end
//! tests of the gRPC proxy.
//!
//! * `fbgrpc serve PORT [CERT KEY]`: serves `faultbox.test.Echo/Say`
//!   (plaintext h2c, or TLS with the given PEM files). `Say` answers
//!   `echo: <text>` and how many calls the server has seen, so a test can
//!   tell whether a call reached it; the text `fail` is answered with
//!   FAILED_PRECONDITION.
//! * `fbgrpc front PORT`: an HTTP/1.1 service that, for `GET /say/<text>`,
//!   calls `Say` on `$ECHO_ADDR` with tonic's client (over TLS when
//!   `ECHO_TLS=1`, trusting `$ECHO_CA` or else `$FAULTBOX_CA_FILE`) and
//!   answers `ok <text> <calls>` or
//!   `grpc <code> <message>`: the answer a real caller would see.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub text: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(uint64, tag = "2")]
    pub calls: u64,
}

mod echo {
    include!(concat!(env!("OUT_DIR"), "/faultbox.test.Echo.rs"));
}

#[derive(Default)]
struct Echo {
    calls: AtomicU64,
}

#[tonic::async_trait]
impl echo::echo_server::Echo for Echo {
    async fn say(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let calls = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let text = req.into_inner().text;
        if text == "fail" {
            return Err(tonic::Status::failed_precondition("asked to fail"));
        }
        Ok(tonic::Response::new(EchoReply {
            text: format!("echo: {text}"),
            calls,
        }))
    }
}

fn fail(what: &str) -> ! {
    eprintln!("fbgrpc: {what}");
    std::process::exit(2);
}

async fn serve(port: u16, tls: Option<(String, String)>) {
    let mut server = tonic::transport::Server::builder();
    if let Some((cert, key)) = tls {
        let (Ok(cert), Ok(key)) = (std::fs::read(&cert), std::fs::read(&key)) else {
            fail("cannot read the certificate or key");
        };
        let identity = tonic::transport::Identity::from_pem(cert, key);
        server =
            match server.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity)) {
                Ok(s) => s,
                Err(e) => fail(&format!("tls: {e}")),
            };
    }
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let svc = echo::echo_server::EchoServer::new(Echo::default());
    if let Err(e) = server.add_service(svc).serve(addr).await {
        fail(&format!("serve: {e}"));
    }
}

/// One `Say` call through a fresh tonic channel, as a line of text.
async fn call(text: String) -> String {
    let addr = std::env::var("ECHO_ADDR").unwrap_or_else(|_| fail("ECHO_ADDR is not set"));
    let ca = std::env::var("ECHO_CA")
        .ok()
        .or_else(|| std::env::var("FAULTBOX_CA_FILE").ok())
        .filter(|_| std::env::var("ECHO_TLS").is_ok_and(|v| v == "1"));
    let scheme = if ca.is_some() { "https" } else { "http" };
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}")) {
        Ok(e) => e,
        Err(e) => return format!("grpc 3 bad address: {e}"),
    };
    let endpoint = match ca {
        Some(path) => {
            let Ok(pem) = std::fs::read(&path) else {
                return format!("grpc 2 cannot read {path}");
            };
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                .domain_name("localhost");
            match endpoint.tls_config(tls) {
                Ok(e) => e,
                Err(e) => return format!("grpc 2 tls: {e}"),
            }
        }
        None => endpoint,
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return format!("grpc 14 connect: {e}"),
    };
    let mut client = echo::echo_client::EchoClient::new(channel);
    match client.say(EchoRequest { text: text.clone() }).await {
        Ok(r) => {
            let r = r.into_inner();
            format!("ok {} {}", r.text, r.calls)
        }
        Err(status) => format!("grpc {} {}", status.code() as i32, status.message()),
    }
}

async fn front(port: u16) {
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => fail(&format!("bind {port}: {e}")),
    };
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut reader = BufReader::new(sock);
            let mut start = String::new();
            if reader.read_line(&mut start).await.is_err() {
                return;
            }
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line.trim().is_empty() => break,
                    Ok(_) => {}
                }
            }
            let path = start.split_whitespace().nth(1).unwrap_or("/").to_string();
            let body = match path.strip_prefix("/say/") {
                Some(text) => call(text.to_string()).await,
                None => "fbgrpc front".to_string(),
            };
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let mut sock = reader.into_inner();
            let _ = sock.write_all(answer.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port = |i: usize| -> u16 {
        args.get(i)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| fail("missing or bad PORT"))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    match args.get(1).map(String::as_str) {
        Some("serve") => {
            let tls = match (args.get(3), args.get(4)) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                _ => None,
            };
            rt.block_on(serve(port(2), tls));
        }
        Some("front") => rt.block_on(front(port(2))),
        _ => fail("usage: fbgrpc serve PORT [CERT KEY] | fbgrpc front PORT"),
    }
}
