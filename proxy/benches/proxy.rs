//! The protocol proxy in pass-through (no rule, and 20 rules that never
//! match) against a direct connection and against socat, all in one run:
//!
//! 1. TCP 64-byte ping-pong: p50 round trip, and what each relay adds;
//! 2. TCP bulk: throughput of a 256 MiB one-way stream;
//! 3. HTTP/1.1 keep-alive requests per second (4 connections) through the
//!    HTTP proxy.
//!
//! Echo and HTTP servers are threads of this process; socat is Debian's.
//! `cargo bench -p faultbox-engine --bench proxy -- [--quick]`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faultbox_agent::rule::{RuleId, Trigger};
use faultbox_proxy::load::{bulk, echo_server, median, ping_pong, sink_server};
use faultbox_proxy::rules::{ProxyAction, ProxyRuleDef};
use faultbox_proxy::server::Proxy;

fn http_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let _ = c.set_nodelay(true);
            std::thread::spawn(move || {
                let Ok(w) = c.try_clone() else { return };
                let mut w = w;
                let mut r = BufReader::new(c);
                let body = b"{\"ok\": true}";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let mut out = resp.into_bytes();
                out.extend_from_slice(body);
                loop {
                    let mut line = String::new();
                    // Request line and headers up to the blank line.
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    if w.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

struct Socat(Child);

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn socat(upstream: SocketAddr) -> Option<(Socat, SocketAddr)> {
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("socat")
        .arg(format!(
            "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay"
        ))
        .arg(format!("TCP:{upstream},nodelay"))
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Some((Socat(child), addr))
}

fn http_rps(addr: SocketAddr, conns: usize, duration: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let (stop, count) = (Arc::clone(&stop), Arc::clone(&count));
            std::thread::spawn(move || {
                let s = TcpStream::connect(addr).expect("connect");
                s.set_nodelay(true).expect("nodelay");
                let mut w = s.try_clone().expect("clone");
                let mut r = BufReader::new(s);
                let req = format!("GET /items/1 HTTP/1.1\r\nHost: {addr}\r\n\r\n");
                let mut line = String::new();
                while !stop.load(Ordering::Relaxed) {
                    w.write_all(req.as_bytes()).expect("write");
                    let mut length = 0;
                    loop {
                        line.clear();
                        r.read_line(&mut line).expect("read");
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length];
                    r.read_exact(&mut body).expect("body");
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    count.load(Ordering::Relaxed) as f64 / duration.as_secs_f64()
}

/// Requests per second measured by Debian's wrk (a separate, efficient
/// load generator, as in shared/reference/performance.md); `None` when
/// wrk is not installed.
fn wrk_rps(addr: SocketAddr, conns: usize, duration: Duration) -> Option<f64> {
    let out = Command::new("wrk")
        .args(["-t", "1", "-c", &conns.to_string(), "-d"])
        .arg(format!("{}s", duration.as_secs().max(1)))
        .arg(format!("http://{addr}/items/1"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

fn non_matching_rules() -> Vec<(RuleId, ProxyRuleDef)> {
    (0..20)
        .map(|i| {
            (
                RuleId::in_window(1, i.to_string()),
                ProxyRuleDef {
                    action: ProxyAction::Error {
                        status: Some(503),
                        message: "never".into(),
                        code: None,
                        number: None,
                    },
                    method: Some("DELETE".into()),
                    path: Some(format!("/never/{i}/**")),
                    command: None,
                    key: None,
                    query: None,
                    probability: 1.0,
                    trigger: Trigger::Always,
                    label: None,
                },
            )
        })
        .collect()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 7 };
    let trace: Arc<dyn faultbox_proxy::EventSink> = Arc::new(faultbox_proxy::NoEvents);
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let echo = echo_server(any).expect("echo server");
    let sink = sink_server(any).expect("sink server");
    let http = http_server();
    let start = |protocol: &str, upstream, rules: bool| {
        let p =
            Proxy::start("bench", "main", protocol, upstream, Arc::clone(&trace)).expect("proxy");
        if rules {
            p.rules()
                .push_front(1, non_matching_rules())
                .expect("rules");
        }
        p
    };
    let (tcp_plain, tcp_rules) = (start("tcp", echo, false), start("tcp", echo, true));
    let (bulk_plain, bulk_rules) = (start("tcp", sink, false), start("tcp", sink, true));
    let (http_plain, http_rules) = (start("http", http, false), start("http", http, true));
    let http_as_tcp = start("tcp", http, false);
    let socat_echo = socat(echo);
    let socat_sink = socat(sink);
    let socat_http = socat(http);
    if socat_echo.is_none() {
        println!("(socat not found: its columns are empty; scripts/setup installs it)");
    }

    let rounds = if quick { 2_000 } else { 10_000 };
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("direct", vec![]),
        ("faultbox", vec![]),
        ("faultbox+20 rules", vec![]),
        ("socat", vec![]),
    ];
    for _ in 0..reps {
        rows[0].1.push(ping_pong(echo, rounds).expect("ping-pong"));
        rows[1]
            .1
            .push(ping_pong(tcp_plain.listen, rounds).expect("measure"));
        rows[2]
            .1
            .push(ping_pong(tcp_rules.listen, rounds).expect("measure"));
        if let Some((_, a)) = &socat_echo {
            rows[3].1.push(ping_pong(*a, rounds).expect("measure"));
        }
    }
    let direct = median(rows[0].1.clone());
    println!("TCP 64-byte ping-pong, p50 round trip ({reps} reps x {rounds} rounds, medians):");
    for (name, v) in &rows {
        if v.is_empty() {
            continue;
        }
        let m = median(v.clone());
        println!("  {name:<18} {m:7.1} µs  (adds {:6.1} µs)", m - direct);
    }

    let bytes: u64 = if quick { 128 << 20 } else { 256 << 20 };
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("direct", vec![]),
        ("faultbox", vec![]),
        ("faultbox+20 rules", vec![]),
        ("socat", vec![]),
    ];
    for _ in 0..reps {
        rows[0].1.push(bulk(sink, bytes).expect("measure"));
        rows[1]
            .1
            .push(bulk(bulk_plain.listen, bytes).expect("measure"));
        rows[2]
            .1
            .push(bulk(bulk_rules.listen, bytes).expect("measure"));
        if let Some((_, a)) = &socat_sink {
            rows[3].1.push(bulk(*a, bytes).expect("measure"));
        }
    }
    let direct = median(rows[0].1.clone());
    println!(
        "TCP bulk, {} MiB one way ({reps} reps, medians):",
        bytes >> 20
    );
    for (name, v) in &rows {
        if v.is_empty() {
            continue;
        }
        let m = median(v.clone());
        println!(
            "  {name:<18} {m:8.0} MiB/s  ({:5.1}% of direct)",
            m / direct * 100.0
        );
    }

    let secs = Duration::from_secs(if quick { 1 } else { 3 });
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("direct", vec![]),
        ("faultbox", vec![]),
        ("faultbox+20 rules", vec![]),
        ("socat", vec![]),
        ("faultbox tcp relay", vec![]),
    ];
    let have_wrk = wrk_rps(http, 1, Duration::from_secs(1)).is_some();
    let rps = |addr| {
        if have_wrk {
            wrk_rps(addr, 4, secs).unwrap_or(0.0)
        } else {
            http_rps(addr, 4, secs)
        }
    };
    for _ in 0..reps {
        rows[0].1.push(rps(http));
        rows[1].1.push(rps(http_plain.listen));
        rows[2].1.push(rps(http_rules.listen));
        if let Some((_, a)) = &socat_http {
            rows[3].1.push(rps(*a));
        }
        rows[4].1.push(rps(http_as_tcp.listen));
    }
    let direct = median(rows[0].1.clone());
    println!(
        "HTTP/1.1 keep-alive GET, 4 connections, load from {} ({reps} reps, medians):",
        if have_wrk {
            "wrk -t1 -c4"
        } else {
            "in-process clients (wrk not installed)"
        }
    );
    for (name, v) in &rows {
        if v.is_empty() {
            continue;
        }
        let m = median(v.clone());
        println!(
            "  {name:<18} {m:8.0} req/s  ({:5.1}% of direct)",
            m / direct * 100.0
        );
    }
    for p in [
        tcp_plain,
        tcp_rules,
        bulk_plain,
        bulk_rules,
        http_plain,
        http_rules,
        http_as_tcp,
    ] {
        p.stop();
    }
}
