//! The shim channel across machines: mutual TLS over TCP, from one run's
//! CA, presented to the session (and to the controller) as the same Unix
//! stream a local channel is. A socket pair's far end is pumped to and
//! from the TLS connection by two threads, so the session's reader and
//! writer threads keep their own ends as they do locally.
//!
//! The shim dials out to the controller (a service pod exposes no port
//! for it), and both sides verify the other against the run's CA before a
//! single message is read: a peer without the run's credentials is cut off
//! in the handshake.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// The name the controller's certificate carries and the shim checks,
/// whatever address it dials: pod addresses change, the name does not.
pub const CONTROLLER_NAME: &str = "faultbox-controller";
/// How long a handshake may take before the peer is dropped.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// A side's credentials: the run CA, and this side's certificate and key
/// (PEM files; in a pod, the keys `ca.crt`, `tls.crt`, `tls.key` of the
/// run's Secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Credentials {
    /// The three files of a Secret mounted at `dir`.
    pub fn in_dir(dir: &Path) -> Credentials {
        Credentials {
            ca: dir.join("ca.crt"),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }
}

/// Why a TLS channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Setup(String),
    #[error("cannot connect to controller at {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake { peer: String, source: io::Error },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TunnelError> {
    let file = |reason: String| TunnelError::File {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file(e.to_string()))?;
    if certs.is_empty() {
        return Err(file("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TunnelError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TunnelError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TunnelError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| TunnelError::File {
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn setup(e: impl std::fmt::Display) -> TunnelError {
    TunnelError::Setup(e.to_string())
}

/// The shim's side: what it trusts and presents.
pub fn client_config(c: &Credentials) -> Result<Arc<ClientConfig>, TunnelError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(setup)?
        .with_root_certificates(roots(&c.ca)?)
        .with_client_auth_cert(certs(&c.cert)?, key(&c.key)?)
        .map_err(setup)?;
    Ok(Arc::new(config))
}

/// The controller's side: it presents its certificate and requires one
/// from the run's CA of every peer.
pub fn server_config(c: &Credentials) -> Result<Arc<ServerConfig>, TunnelError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&c.ca)?, provider())
        .build()
        .map_err(setup)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(setup)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&c.cert)?, key(&c.key)?)
        .map_err(setup)?;
    Ok(Arc::new(config))
}

/// Dials the controller at `addr` and completes the handshake; the
/// session's end of the channel.
pub fn dial(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<UnixStream, TunnelError> {
    let tcp = TcpStream::connect_timeout(&addr, HANDSHAKE)
        .map_err(|source| TunnelError::Connect { addr, source })?;
    let name = ServerName::try_from(CONTROLLER_NAME).map_err(setup)?;
    let conn = ClientConnection::new(config, name).map_err(setup)?;
    handshake(rustls::Connection::Client(conn), tcp, addr.to_string())
}

/// Completes the server side of the handshake on an accepted connection;
/// the controller's end of the channel. A peer without a certificate of
/// the run's CA fails here, before anything is read from it.
pub fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> Result<UnixStream, TunnelError> {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "a peer".into());
    let conn = ServerConnection::new(config).map_err(setup)?;
    handshake(rustls::Connection::Server(conn), tcp, peer)
}

fn handshake(
    mut conn: rustls::Connection,
    mut tcp: TcpStream,
    peer: String,
) -> Result<UnixStream, TunnelError> {
    let failed = |source: io::Error| TunnelError::Handshake {
        peer: peer.clone(),
        source,
    };
    tcp.set_nodelay(true).map_err(failed)?;
    tcp.set_read_timeout(Some(HANDSHAKE)).map_err(failed)?;
    tcp.set_write_timeout(Some(HANDSHAKE)).map_err(failed)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(failed)?;
    }
    // TLS 1.3: the client's certificate is checked when the server reads
    // its Finished, which complete_io has done; flush what is left (the
    // server's tickets) so the peer is not waiting on them.
    while conn.wants_write() {
        conn.write_tls(&mut tcp).map_err(failed)?;
    }
    tcp.set_read_timeout(None).map_err(failed)?;
    tcp.set_write_timeout(None).map_err(failed)?;
    let (mine, theirs) = UnixStream::pair().map_err(failed)?;
    pump(conn, tcp, theirs).map_err(failed)?;
    Ok(mine)
}

/// The local → TLS pumps of this process, so an exiting shim can wait
/// for its last messages to leave (a process exit kills the threads with
/// whatever they still hold).
static OUTGOING: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits, at most `limit`, for every outgoing pump to have sent what its
/// local end was given; the local end must have been shut down for
/// writing (the session does so after its last message).
pub fn drain(limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    let handles: Vec<_> = OUTGOING
        .lock()
        .map(|mut v| v.drain(..).collect())
        .unwrap_or_default();
    for h in handles {
        while !h.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if h.is_finished() {
            let _ = h.join();
        }
    }
}

/// Two threads: local → TLS, and TLS → local. The connection is shared
/// under a lock that no thread holds while blocked on a socket.
fn pump(conn: rustls::Connection, tcp: TcpStream, local: UnixStream) -> io::Result<()> {
    let conn = Arc::new(Mutex::new(conn));
    let (tcp_in, mut tcp_out) = (tcp.try_clone()?, tcp);
    let (mut local_in, local_out) = (local.try_clone()?, local);
    {
        let conn = Arc::clone(&conn);
        let mut tcp_out = tcp_out.try_clone()?;
        let handle = std::thread::Builder::new()
            .name("tls out".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match local_in.read(&mut buf) {
                        Ok(0) | Err(_) => 0,
                        Ok(n) => n,
                    };
                    let Ok(mut c) = conn.lock() else { return };
                    if n == 0 {
                        c.send_close_notify();
                    } else if c.writer().write_all(&buf[..n]).is_err() {
                        return;
                    }
                    while c.wants_write() {
                        if c.write_tls(&mut tcp_out).is_err() {
                            return;
                        }
                    }
                    if n == 0 {
                        let _ = tcp_out.shutdown(Shutdown::Write);
                        return;
                    }
                }
            })?;
        if let Ok(mut v) = OUTGOING.lock() {
            v.retain(|h| !h.is_finished());
            v.push(handle);
        }
    }
    std::thread::Builder::new()
        .name("tls in".into())
        .spawn(move || {
            let mut tcp_in = tcp_in;
            let mut local_out = local_out;
            let mut raw = vec![0u8; 64 << 10];
            let mut plain = vec![0u8; 64 << 10];
            // Hands the plaintext rustls holds to the local end; false once
            // the peer closed or the local end is gone.
            let mut drain = |c: &mut rustls::Connection, out: &mut UnixStream| loop {
                match c.reader().read(&mut plain) {
                    Ok(0) => return false, // close_notify
                    Ok(m) => {
                        if out.write_all(&plain[..m]).is_err() {
                            return false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                    Err(_) => return false,
                }
            };
            // The handshake may have read past its end: a first message
            // sent right behind the peer's Finished is already decrypted
            // here, and no more bytes may come until it is answered.
            let early = match conn.lock() {
                Ok(mut c) => drain(&mut c, &mut local_out),
                Err(_) => false,
            };
            'read: loop {
                if !early {
                    break;
                }
                let n = match tcp_in.read(&mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let Ok(mut c) = conn.lock() else { break };
                let mut fed = &raw[..n];
                while !fed.is_empty() {
                    if c.read_tls(&mut fed).is_err() || c.process_new_packets().is_err() {
                        break 'read;
                    }
                    if !drain(&mut c, &mut local_out) {
                        break 'read;
                    }
                }
                while c.wants_write() {
                    if c.write_tls(&mut tcp_out).is_err() {
                        break 'read;
                    }
                }
            }
            // The far side is gone: the local reader sees the end.
            let _ = local_out.shutdown(Shutdown::Write);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    /// A CA and two leaves, as the runner makes them (rcgen is only a
    /// test dependency here; the runner's own code makes them in the
    /// engine).
    fn credentials(dir: &Path, ca_name: &str) -> (Credentials, Credentials) {
        std::fs::create_dir_all(dir).expect("dir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        std::fs::write(dir.join("ca.crt"), ca_cert.pem()).expect("write");
        let leaf = |name: &str, file: &str| {
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .expect("params")
                .signed_by(&key, &issuer)
                .expect("leaf");
            std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).expect("write");
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).expect("write");
            Credentials {
                ca: dir.join("ca.crt"),
                cert: dir.join(format!("{file}.crt")),
                key: dir.join(format!("{file}.key")),
            }
        };
        (leaf(CONTROLLER_NAME, "controller"), leaf("shim", "shim"))
    }

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("faultbox-tunnel-{}-{name}", std::process::id()))
    }

    #[test]
    fn lines_cross_the_tunnel_both_ways_and_the_end_is_seen() {
        let dir = scratch("ok");
        let (controller, shim) = credentials(&dir, "run CA");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = server_config(&controller).expect("server config");
        let accepted = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().expect("accept");
            accept(tcp, server)
        });
        let mut shim_end = dial(addr, client_config(&shim).expect("client config")).expect("dial");
        let ctl_end = accepted.join().expect("thread").expect("accept");
        shim_end.write_all(b"hello from the shim\n").expect("write");
        let mut ctl_reader = BufReader::new(ctl_end.try_clone().expect("clone"));
        let mut line = String::new();
        ctl_reader.read_line(&mut line).expect("read");
        assert_eq!(line, "hello from the shim\n");
        (&ctl_end).write_all(b"rules\n").expect("write");
        let mut shim_reader = BufReader::new(shim_end.try_clone().expect("clone"));
        line.clear();
        shim_reader.read_line(&mut line).expect("read");
        assert_eq!(line, "rules\n");
        // The controller goes away: the shim reads the end of the stream.
        drop(ctl_reader);
        drop(ctl_end);
        line.clear();
        assert_eq!(shim_reader.read_line(&mut line).expect("eof"), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_message_riding_with_the_handshakes_last_flight_is_delivered() {
        // A shim greets as soon as its handshake ends; its Finished and
        // its first line can reach the controller in one segment, read
        // whole by the handshake. That line must still come out.
        let dir = scratch("early");
        let (controller, shim) = credentials(&dir, "run CA");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = server_config(&controller).expect("server config");
        let accepted = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().expect("accept");
            accept(tcp, server)
        });
        let mut tcp = TcpStream::connect(addr).expect("connect");
        let name = ServerName::try_from(CONTROLLER_NAME).expect("name");
        let mut conn =
            ClientConnection::new(client_config(&shim).expect("config"), name).expect("conn");
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(&mut tcp).expect("write");
            }
            if !conn.is_handshaking() {
                break;
            }
            conn.read_tls(&mut tcp).expect("read");
            conn.process_new_packets().expect("process");
            if !conn.is_handshaking() {
                // Finished and the first line, in one write.
                conn.writer().write_all(b"hello early\n").expect("queue");
                let mut out = Vec::new();
                while conn.wants_write() {
                    conn.write_tls(&mut out).expect("encode");
                }
                tcp.write_all(&out).expect("send");
            }
        }
        let ctl_end = accepted.join().expect("thread").expect("accept");
        ctl_end
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut line = String::new();
        BufReader::new(ctl_end)
            .read_line(&mut line)
            .expect("the early line arrives");
        assert_eq!(line, "hello early\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_peer_without_the_runs_credentials_is_refused_in_the_handshake() {
        let dir = scratch("refused");
        let (controller, _) = credentials(&dir.join("run"), "run CA");
        let (_, stranger) = credentials(&dir.join("other"), "another CA");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = server_config(&controller).expect("server config");
        let accepted = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().expect("accept");
            accept(tcp, server).map(|_| ())
        });
        // The stranger trusts the run's CA (it read it somewhere) but its
        // own certificate is from another CA.
        let mixed = Credentials {
            ca: controller.ca.clone(),
            ..stranger
        };
        let dialled = dial(addr, client_config(&mixed).expect("client config"));
        let refused = accepted.join().expect("thread");
        let e = refused.expect_err("the controller refuses the stranger");
        assert!(matches!(e, TunnelError::Handshake { .. }), "{e}");
        // Whatever the dialler believed, nothing it writes is read.
        if let Ok(mut s) = dialled {
            let _ = s.write_all(b"{\"type\":\"hello\"}\n");
            let mut buf = [0u8; 1];
            assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
