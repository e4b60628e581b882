//! The shim channel's throughput: syscall events written by a session
//! and read by a controller, over the local Unix socket pair against the
//! mutual-TLS tunnel a service pod uses (on loopback, both ends in this
//! process, so the difference is the TLS and the pump threads, not the
//! network). Medians of repetitions, both measured in the same run.
//!
//! `cargo bench -p faultbox-agent --bench channel -- [--quick]`

use std::borrow::Cow;
use std::io::{BufReader, BufWriter, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use faultbox_agent::tunnel::{self, Credentials};
use faultbox_agent::wire::{self, ShimMessage, SyscallEvent};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn event(seq: u64) -> ShimMessage {
    ShimMessage::Syscall(SyscallEvent {
        seq,
        time_ns: 1_764_000_000_000_000_000 + seq,
        pid: 4242,
        syscall: Cow::Borrowed("openat"),
        decision: Cow::Borrowed("deny(no such file or directory)"),
        errno: Some(Cow::Borrowed("ENOENT")),
        path: Some("/var/lib/postgresql/data/pg_wal/000000010000000000000001".into()),
        latency_ns: None,
        rule: Some("fdatasync=EIO:100%".into()),
        label: None,
    })
}

/// Events per second from `writer` to `reader`, `n` of them.
fn rate(writer: UnixStream, reader: UnixStream, n: u64) -> f64 {
    let t = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut w = BufWriter::with_capacity(64 << 10, writer);
        for seq in 1..=n {
            wire::send(&mut w, &event(seq)).expect("send");
        }
        w.flush().expect("flush");
    });
    let mut r = BufReader::with_capacity(64 << 10, reader);
    let mut got = 0;
    while got < n {
        match wire::recv::<_, ShimMessage>(&mut r) {
            Ok(Some(_)) => got += 1,
            other => panic!("the stream ended after {got}: {other:?}"),
        }
    }
    sender.join().expect("sender");
    n as f64 / t.elapsed().as_secs_f64()
}

fn credentials(root: &Path) -> (Credentials, Credentials) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let mut out = Vec::new();
    for (name, subject) in [("controller", tunnel::CONTROLLER_NAME), ("shim", "shim")] {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![subject.to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        std::fs::write(dir.join("ca.crt"), ca_cert.pem()).expect("write");
        std::fs::write(dir.join("tls.crt"), cert.pem()).expect("write");
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write");
        out.push(Credentials::in_dir(&dir));
    }
    let shim = out.pop().expect("shim");
    (out.pop().expect("controller"), shim)
}

fn tls_pair(controller: &Credentials, shim: &Credentials) -> (UnixStream, UnixStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tunnel::server_config(controller).expect("server");
    let accepted = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        tunnel::accept(tcp, server).expect("accept tls")
    });
    let shim_end = tunnel::dial(addr, tunnel::client_config(shim).expect("client")).expect("dial");
    (shim_end, accepted.join().expect("accepted"))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (reps, n) = if quick { (3, 100_000) } else { (7, 500_000) };
    let root = std::env::temp_dir().join(format!("faultbox-channel-{}", std::process::id()));
    let (controller, shim) = credentials(&root);
    let bytes = serde_json::to_string(&event(1)).expect("json").len() + 1;
    let (mut unix, mut tls, mut handshakes) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let (a, b) = UnixStream::pair().expect("pair");
        unix.push(rate(a, b, n));
        let t = Instant::now();
        let (a, b) = tls_pair(&controller, &shim);
        handshakes.push(t.elapsed().as_secs_f64() * 1e3);
        tls.push(rate(a, b, n));
    }
    let (u, t) = (median(unix), median(tls));
    println!("shim channel, {n} syscall events of {bytes} bytes ({reps} reps, medians):");
    println!("  Unix socket pair (local runs):      {u:>10.0} events/s");
    println!(
        "  mutual TLS over TCP (service pods): {t:>10.0} events/s ({:.1}% of the socket pair)",
        t / u * 100.0
    );
    println!(
        "  TLS cost per event: {:.0} ns; connection set-up (TCP + handshake, both sides verified): {:.1} ms",
        (1.0 / t - 1.0 / u) * 1e9,
        median(handshakes)
    );
    let _ = std::fs::remove_dir_all(&root);
}
