//! TLS around the protocol proxies. An interface declared with
//! `tls=tls_cert(...)` is served as
//!
//! ```text
//! client ─TLS─▶ front ─plain─▶ proxy (rules) ─plain─▶ back ─TLS─▶ upstream
//! ```
//!
//! so every rule of the plaintext proxy applies between the two TLS legs,
//! and the proxies themselves know nothing about TLS. Without a proxy
//! certificate, a CA and a leaf for `localhost`/`127.0.0.1` (and the
//! upstream's name) are generated per test; the CA's file is given to
//! services (`FAULTBOX_CA_FILE`) and trusted by steps.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::protocol::Wire;
use crate::{TlsError, TlsSpec, read_certs, read_key};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, Connection, DigitallySignedStruct, RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS configuration of one interface for one test.
pub struct TlsSetup {
    /// What the front presents to clients.
    pub server: Arc<ServerConfig>,
    /// How the back talks to the upstream.
    pub upstream: Arc<ClientConfig>,
    /// How steps talk to the front.
    pub steps: Arc<ClientConfig>,
    /// A PEM file clients can trust the front with.
    pub ca_file: PathBuf,
}

/// A CA that signs the generated certificates instead of a fresh one per
/// test: a FaultTest's run CA, so clients in the cluster can trust every
/// test's proxy with the one CA the operator published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issuer {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Builds the configurations; `names` are the names the front's generated
/// certificate covers; generated files go in `dir`.
pub fn setup(
    spec: &TlsSpec,
    names: &[String],
    issuer: Option<&Issuer>,
    dir: &Path,
    tag: &str,
) -> Result<TlsSetup, TlsError> {
    let versions = |e: rustls::Error| TlsError::Setup {
        step: "TLS versions",
        reason: e.to_string(),
    };
    let (chain, key, ca_file) = match (&spec.proxy_cert, &spec.proxy_key) {
        (Some(c), Some(k)) => (
            read_certs(c)?,
            read_key(k)?,
            spec.proxy_ca.clone().unwrap_or_else(|| c.clone()),
        ),
        _ => {
            let (chain, key, ca_pem) = generate(names, issuer)?;
            let ca_file = dir.join(format!("{tag}.ca.pem"));
            std::fs::write(&ca_file, ca_pem).map_err(|e| TlsError::file(&ca_file, e))?;
            (chain, key, ca_file)
        }
    };
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(versions)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Setup {
            step: "proxy certificate",
            reason: e.to_string(),
        })?;
    let mut step_roots = RootCertStore::empty();
    for c in read_certs(&ca_file)? {
        step_roots.add(c).map_err(|e| TlsError::file(&ca_file, e))?;
    }
    let steps = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(versions)?
        .with_root_certificates(step_roots)
        .with_no_client_auth();
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(versions)?;
    let mut roots = RootCertStore::empty();
    match &spec.ca {
        Some(ca) => {
            for c in read_certs(ca)? {
                roots.add(c).map_err(|e| TlsError::file(ca, e))?;
            }
        }
        None => {
            // The system's store, as the service's own clients would use.
            for path in [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
            ] {
                if let Ok(certs) = read_certs(Path::new(path)) {
                    for c in certs {
                        let _ = roots.add(c);
                    }
                    break;
                }
            }
        }
    }
    let with_roots = builder.with_root_certificates(roots);
    let mut upstream = match (&spec.client_cert, &spec.client_key) {
        (Some(c), Some(k)) => with_roots
            .with_client_auth_cert(read_certs(c)?, read_key(k)?)
            .map_err(|e| TlsError::Setup {
                step: "client certificate",
                reason: e.to_string(),
            })?,
        _ => with_roots.with_no_client_auth(),
    };
    if spec.insecure {
        upstream
            .dangerous()
            .set_certificate_verifier(Arc::new(AcceptAnything(provider())));
    }
    Ok(TlsSetup {
        server: Arc::new(server),
        upstream: Arc::new(upstream),
        steps: Arc::new(steps),
        ca_file,
    })
}

type Chain = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, String);

/// A new CA named `name`: its certificate and key, in PEM.
pub fn new_ca(name: &str) -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let cert = ca_params(name)?.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn ca_params(name: &str) -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    Ok(params)
}

/// A certificate for `names` signed by the CA in `issuer` (the run CA),
/// as PEM, with its key's PEM: the two sides of the shim channel.
pub fn issue(issuer: &Issuer, names: &[String]) -> Result<(String, String), TlsError> {
    let (leaf, key, _, _) = signed(names, Some(issuer))?;
    Ok((leaf.pem(), key.serialize_pem()))
}

/// A leaf for `names`, signed by `issuer` or by a CA made for it.
fn generate(names: &[String], issuer: Option<&Issuer>) -> Result<Chain, TlsError> {
    let (leaf, leaf_key, ca_cert, ca_pem) = signed(names, issuer)?;
    let key = PrivateKeyDer::try_from(leaf_key.serialize_der()).map_err(|e| TlsError::Setup {
        step: "generated key",
        reason: e.to_string(),
    })?;
    Ok((vec![leaf.der().clone(), ca_cert], key, ca_pem))
}

type Signed = (
    rcgen::Certificate,
    rcgen::KeyPair,
    CertificateDer<'static>,
    String,
);

/// The leaf, its key, and the CA's certificate as DER and PEM.
fn signed(names: &[String], issuer: Option<&Issuer>) -> Result<Signed, TlsError> {
    let fail = |e: rcgen::Error| TlsError::Setup {
        step: "generate a certificate",
        reason: e.to_string(),
    };
    let (issuer, ca_cert, ca_pem) = match issuer {
        Some(i) => {
            let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| TlsError::file(p, e));
            let cert_pem = read(&i.cert)?;
            let key =
                rcgen::KeyPair::from_pem(&read(&i.key)?).map_err(|e| TlsError::file(&i.key, e))?;
            let ca_cert = read_certs(&i.cert)?.remove(0);
            let issuer = rcgen::Issuer::from_ca_cert_pem(&cert_pem, key)
                .map_err(|e| TlsError::file(&i.cert, e))?;
            (issuer, ca_cert, cert_pem)
        }
        None => {
            let ca_key = rcgen::KeyPair::generate().map_err(fail)?;
            let params = ca_params("Faultbox test CA").map_err(fail)?;
            let ca_cert = params.self_signed(&ca_key).map_err(fail)?;
            let (der, pem) = (ca_cert.der().clone(), ca_cert.pem());
            (rcgen::Issuer::new(params, ca_key), der, pem)
        }
    };
    let leaf_key = rcgen::KeyPair::generate().map_err(fail)?;
    let leaf_params = rcgen::CertificateParams::new(names.to_vec()).map_err(fail)?;
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).map_err(fail)?;
    Ok((leaf, leaf_key, ca_cert, ca_pem))
}

/// `insecure=True`: the upstream's certificate is not checked.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One TLS connection shared by its two relay threads. Socket writes
/// happen under the lock, so TLS records from both threads never
/// interleave.
struct Shared {
    conn: Mutex<Connection>,
    sock: TcpStream,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flush(&self, conn: &mut Connection) -> io::Result<()> {
        while conn.wants_write() {
            let mut out = Vec::new();
            conn.write_tls(&mut out)?;
            (&self.sock).write_all(&out)?;
        }
        Ok(())
    }
}

/// Decrypts from the TLS side into `plain` until either side ends.
fn tls_to_plain(shared: &Shared, mut raw: TcpStream, mut plain: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    let mut net = vec![0u8; 64 << 10];
    'outer: loop {
        // Everything already decrypted first.
        loop {
            let got = shared.lock().reader().read(&mut buf);
            match got {
                Ok(0) => break 'outer,
                Ok(n) => {
                    if plain.write_all(&buf[..n]).is_err() {
                        break 'outer;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break 'outer,
            }
        }
        let n = match raw.read(&mut net) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut conn = shared.lock();
        let mut slice = &net[..n];
        while !slice.is_empty() {
            if conn.read_tls(&mut slice).is_err() || conn.process_new_packets().is_err() {
                break 'outer;
            }
        }
        if shared.flush(&mut conn).is_err() {
            break;
        }
    }
    let _ = plain.shutdown(Shutdown::Write);
}

/// Encrypts what `plain` sends onto the TLS side.
fn plain_to_tls(shared: &Shared, mut plain: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match plain.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut conn = shared.lock();
        if conn.writer().write_all(&buf[..n]).is_err() || shared.flush(&mut conn).is_err() {
            break;
        }
    }
    let mut conn = shared.lock();
    conn.send_close_notify();
    let _ = shared.flush(&mut conn);
    let _ = shared.sock.shutdown(Shutdown::Write);
}

fn handshake(conn: &mut Connection, sock: &mut TcpStream) -> io::Result<()> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    while conn.is_handshaking() {
        conn.complete_io(sock)?;
    }
    sock.set_read_timeout(None)
}

fn relay(mut conn: Connection, mut sock: TcpStream, plain: TcpStream, pending: &[u8]) {
    if handshake(&mut conn, &mut sock).is_err() {
        let _ = sock.shutdown(Shutdown::Both);
        let _ = plain.shutdown(Shutdown::Both);
        return;
    }
    if !pending.is_empty() {
        let sent = conn.writer().write_all(pending).and_then(|()| {
            while conn.wants_write() {
                conn.write_tls(&mut sock)?;
            }
            Ok(())
        });
        if sent.is_err() {
            let _ = plain.shutdown(Shutdown::Both);
            return;
        }
    }
    let (Ok(raw), Ok(plain_w), Ok(sock_w)) =
        (sock.try_clone(), plain.try_clone(), sock.try_clone())
    else {
        return;
    };
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        sock: sock_w,
    });
    let other = Arc::clone(&shared);
    let up = std::thread::spawn(move || plain_to_tls(&other, plain));
    tls_to_plain(&shared, raw, plain_w);
    let _ = up.join();
}

/// Relays bytes untouched both ways (a client that did not ask for TLS).
fn relay_plain(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let t = std::thread::spawn(move || copy_then_close(a2, b2));
    copy_then_close(b, a);
    let _ = t.join();
}

fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// The ALPN protocols the TLS legs offer for `wire`.
fn alpn(wire: Wire) -> Vec<Vec<u8>> {
    match wire {
        Wire::H2 => vec![b"h2".to_vec()],
        _ => Vec::new(),
    }
}

const PG_SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const PG_GSS_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
/// MySQL's CLIENT_SSL capability bit.
const MYSQL_CLIENT_SSL: u32 = 0x0800;

/// What the front does with a new client before TLS.
enum Opening {
    /// Start TLS now; `pending` is plaintext to send inward first.
    Tls { pending: Vec<u8> },
    /// The client did not ask for TLS: relay it as it is.
    Plain { pending: Vec<u8> },
}

/// One MySQL packet, its 4-byte header (length, sequence number)
/// included, read exactly (what follows is not read: it may be TLS).
pub(crate) fn read_mysql_packet(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head)?;
    let mut packet = head.to_vec();
    packet.resize(crate::protocols::mysql::length(head), 0);
    r.read_exact(&mut packet[4..])?;
    Ok(packet)
}

/// The capability flags a client's first packet (SSLRequest or handshake
/// response) asks for.
fn mysql_client_caps(packet: &[u8]) -> u32 {
    packet
        .get(4..8)
        .map_or(0, |c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// The capability flags of a greeting (protocol 10), and where their two
/// halves are.
fn mysql_greeting_caps(packet: &[u8]) -> Option<(u32, usize, usize)> {
    let body = packet.get(4..)?;
    if body.first() != Some(&10) {
        return None;
    }
    let version_end = 1 + body[1..].iter().position(|b| *b == 0)?;
    // version NUL, thread id (4), auth data part 1 (8), filler (1)
    let low = 4 + version_end + 1 + 4 + 8 + 1;
    // charset (1), status (2)
    let high = low + 2 + 1 + 2;
    let lo = u16::from_le_bytes([*packet.get(low)?, *packet.get(low + 1)?]);
    let hi = u16::from_le_bytes([*packet.get(high)?, *packet.get(high + 1)?]);
    Some((u32::from(lo) | u32::from(hi) << 16, low, high))
}

/// The front's side of the preamble: reads what the client opens with.
fn front_opening(wire: Wire, client: &mut TcpStream, inner: &mut TcpStream) -> io::Result<Opening> {
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let opening = match wire {
        Wire::Direct | Wire::H2 => Opening::Tls {
            pending: Vec::new(),
        },
        Wire::Postgres => loop {
            let mut first = [0u8; 1];
            if client.peek(&mut first)? == 1 && first[0] == 0x16 {
                // A TLS ClientHello straight away (sslnegotiation=direct).
                break Opening::Tls {
                    pending: Vec::new(),
                };
            }
            let mut head = [0u8; 8];
            client.read_exact(&mut head)?;
            if head == PG_SSL_REQUEST {
                client.write_all(b"S")?;
                break Opening::Tls {
                    pending: Vec::new(),
                };
            }
            if head == PG_GSS_REQUEST {
                // No GSSAPI encryption here; the client asks for TLS next.
                client.write_all(b"N")?;
                continue;
            }
            break Opening::Plain {
                pending: head.to_vec(),
            };
        },
        Wire::Mysql => {
            // The greeting comes from the upstream (through the proxy and
            // the back); it must offer TLS to this client.
            inner.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut greeting = read_mysql_packet(inner)?;
            inner.set_read_timeout(None)?;
            if let Some((_, low, _)) = mysql_greeting_caps(&greeting) {
                greeting[low + 1] |= (MYSQL_CLIENT_SSL >> 8) as u8;
            }
            client.write_all(&greeting)?;
            let first = read_mysql_packet(client)?;
            if first.len() == 4 + 32 && mysql_client_caps(&first) & MYSQL_CLIENT_SSL != 0 {
                // The SSLRequest stays here: the back makes its own.
                Opening::Tls {
                    pending: Vec::new(),
                }
            } else {
                Opening::Plain { pending: first }
            }
        }
    };
    client.set_read_timeout(None)?;
    Ok(opening)
}

/// The back's side of the preamble towards the upstream. Returns the
/// plaintext to send over TLS once it is up, or `None` when the client
/// chose plaintext and the connection is to be relayed as it is.
fn back_opening(
    wire: Wire,
    plain: &mut TcpStream,
    upstream: &mut TcpStream,
) -> io::Result<Option<Vec<u8>>> {
    upstream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let refused = |what: &str| io::Error::new(io::ErrorKind::ConnectionRefused, what.to_string());
    plain.set_read_timeout(Some(Duration::from_secs(10)))?;
    let pending = match wire {
        Wire::Direct | Wire::H2 => Some(Vec::new()),
        Wire::Postgres => {
            upstream.write_all(&PG_SSL_REQUEST)?;
            let mut answer = [0u8; 1];
            upstream.read_exact(&mut answer)?;
            if answer[0] != b'S' {
                return Err(refused("the postgres upstream refused TLS"));
            }
            Some(Vec::new())
        }
        Wire::Mysql => {
            let greeting = read_mysql_packet(upstream)?;
            plain.write_all(&greeting)?;
            let response = read_mysql_packet(plain)?;
            // After the front swallowed the client's SSLRequest, the
            // handshake response is packet 2 and asks for TLS.
            if response[3] == 2
                && mysql_client_caps(&response) & MYSQL_CLIENT_SSL != 0
                && response.len() >= 4 + 32
            {
                let offers = mysql_greeting_caps(&greeting).map_or(0, |(c, _, _)| c);
                if offers & MYSQL_CLIENT_SSL == 0 {
                    return Err(refused("the mysql upstream does not offer TLS"));
                }
                // SSLRequest: the response's first 32 bytes, as packet 1.
                let mut request = vec![32, 0, 0, 1];
                request.extend_from_slice(&response[4..36]);
                upstream.write_all(&request)?;
                Some(response)
            } else {
                upstream.write_all(&response)?;
                None
            }
        }
    };
    upstream.set_read_timeout(None)?;
    plain.set_read_timeout(None)?;
    Ok(pending)
}

/// A running front or back relay.
pub struct Relay {
    pub listen: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Terminates TLS from clients and forwards plaintext to `plain`.
    pub fn front(plain: SocketAddr, config: &ServerConfig, wire: Wire) -> io::Result<Relay> {
        Relay::front_on(Ipv4Addr::LOCALHOST.into(), plain, config, wire)
    }

    /// [`Relay::front`] listening on `bind` (where containers reach it).
    pub fn front_on(
        bind: IpAddr,
        plain: SocketAddr,
        config: &ServerConfig,
        wire: Wire,
    ) -> io::Result<Relay> {
        let mut config = config.clone();
        config.alpn_protocols = alpn(wire);
        let config = Arc::new(config);
        Relay::start(bind, move |mut client: TcpStream| {
            let Ok(mut inner) = TcpStream::connect_timeout(&plain, Duration::from_secs(5)) else {
                let _ = client.shutdown(Shutdown::Both);
                return;
            };
            let _ = inner.set_nodelay(true);
            match front_opening(wire, &mut client, &mut inner) {
                Ok(Opening::Tls { pending }) => {
                    if let Ok(conn) = rustls::ServerConnection::new(Arc::clone(&config))
                        && inner.write_all(&pending).is_ok()
                    {
                        relay(conn.into(), client, inner, &[]);
                    }
                }
                Ok(Opening::Plain { pending }) => {
                    if inner.write_all(&pending).is_ok() {
                        relay_plain(client, inner);
                    }
                }
                Err(_) => {
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = inner.shutdown(Shutdown::Both);
                }
            }
        })
    }

    /// Accepts plaintext and re-originates TLS to `upstream` as `name`.
    pub fn back(
        upstream: SocketAddr,
        name: ServerName<'static>,
        config: &ClientConfig,
        wire: Wire,
    ) -> io::Result<Relay> {
        let mut config = config.clone();
        config.alpn_protocols = alpn(wire);
        let config = Arc::new(config);
        Relay::start(Ipv4Addr::LOCALHOST.into(), move |mut plain: TcpStream| {
            let Ok(mut sock) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
                let _ = plain.shutdown(Shutdown::Both);
                return;
            };
            let _ = sock.set_nodelay(true);
            match back_opening(wire, &mut plain, &mut sock) {
                Ok(Some(pending)) => {
                    if let Ok(conn) =
                        rustls::ClientConnection::new(Arc::clone(&config), name.clone())
                    {
                        relay(conn.into(), sock, plain, &pending);
                    }
                }
                Ok(None) => relay_plain(plain, sock),
                Err(_) => {
                    let _ = plain.shutdown(Shutdown::Both);
                    let _ = sock.shutdown(Shutdown::Both);
                }
            }
        })
    }

    fn start(bind: IpAddr, serve: impl Fn(TcpStream) + Send + Sync + 'static) -> io::Result<Relay> {
        let listener = TcpListener::bind((bind, 0))?;
        let listen = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let serve = Arc::new(serve);
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let _ = conn.set_nodelay(true);
                let serve = Arc::clone(&serve);
                std::thread::spawn(move || serve(conn));
            }
        });
        Ok(Relay {
            listen,
            stop,
            accept: Some(accept),
        })
    }

    /// Stops accepting.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.listen, Duration::from_millis(200));
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

/// Opens a TLS connection to `addr` for a step.
pub fn connect_client(
    sock: TcpStream,
    config: Arc<ClientConfig>,
    name: &str,
) -> io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let name = ServerName::try_from(name.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_and_back_relay_plaintext_between_verified_tls_legs() {
        let dir = std::env::temp_dir().join(format!("faultbox-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        // A TLS echo server, with a certificate signed by a run CA.
        let (ca_pem, key_pem) = new_ca("Faultbox run CA").expect("ca");
        let issuer = Issuer {
            cert: dir.join("run-ca.crt"),
            key: dir.join("run-ca.key"),
        };
        std::fs::write(&issuer.cert, &ca_pem).expect("write");
        std::fs::write(&issuer.key, key_pem).expect("write");
        let up = setup(
            &TlsSpec::default(),
            &["localhost".into(), "127.0.0.1".into()],
            Some(&issuer),
            &dir,
            "up",
        )
        .expect("upstream tls");
        assert_eq!(
            std::fs::read_to_string(&up.ca_file).expect("ca file"),
            ca_pem,
            "clients are told to trust the run CA"
        );
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        let up_server = Arc::clone(&up.server);
        std::thread::spawn(move || {
            for c in echo.incoming().flatten() {
                let conn = rustls::ServerConnection::new(Arc::clone(&up_server)).expect("conn");
                let mut s = rustls::StreamOwned::new(conn, c);
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).is_ok() {
                    let _ = s.write_all(&buf);
                    let _ = s.flush();
                }
            }
        });
        // The proxy chain: front (its own CA) → plain → back (trusts only
        // the run CA: the upstream's leaf must have been signed by it).
        let spec = TlsSpec {
            ca: Some(issuer.cert.clone()),
            ..TlsSpec::default()
        };
        let mine = setup(
            &spec,
            &["localhost".into(), "127.0.0.1".into()],
            None,
            &dir,
            "front",
        )
        .expect("front tls");
        let back = Relay::back(
            echo_addr,
            ServerName::try_from("localhost".to_string()).expect("name"),
            &mine.upstream,
            Wire::Direct,
        )
        .expect("back");
        let front = Relay::front(back.listen, &mine.server, Wire::Direct).expect("front");
        let sock = TcpStream::connect(front.listen).expect("connect");
        let mut s = connect_client(sock, Arc::clone(&mine.steps), "localhost").expect("tls");
        s.write_all(b"hello").expect("write");
        let mut got = [0u8; 5];
        s.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello");
        front.stop();
        back.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_secret_is_its_mounted_files_and_only_in_a_cluster() {
        let root = std::env::temp_dir().join(format!("faultbox-secrets-{}", std::process::id()));
        let dir = root.join("front-tls");
        std::fs::create_dir_all(&dir).expect("dir");
        let spec = TlsSpec {
            secret: Some("front-tls".into()),
            ..TlsSpec::default()
        };
        let e = spec.resolve(None).expect_err("no cluster");
        assert!(
            e.to_string().contains("only a FaultTest's runner has"),
            "{e}"
        );
        let e = spec.resolve(Some(&root)).expect_err("empty secret");
        assert!(
            e.to_string()
                .contains("create a kubernetes.io/tls Secret \"front-tls\""),
            "{e}"
        );
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            std::fs::write(dir.join(f), "x").expect("write");
        }
        let r = spec.resolve(Some(&root)).expect("resolved");
        assert_eq!(r.proxy_cert, Some(dir.join("tls.crt")));
        assert_eq!(r.proxy_key, Some(dir.join("tls.key")));
        assert_eq!(r.proxy_ca, Some(dir.join("ca.crt")));
        assert_eq!(r.secret, None);
        let both = TlsSpec {
            proxy_cert: Some(dir.join("tls.crt")),
            proxy_key: Some(dir.join("tls.key")),
            ..spec
        };
        assert!(matches!(
            both.validate(),
            Err(TlsError::SecretWithProxyCert)
        ));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn incomplete_tls_declarations_are_refused() {
        let spec = TlsSpec {
            proxy_cert: Some("/nonexistent.pem".into()),
            ..TlsSpec::default()
        };
        let e = spec.validate().expect_err("half a pair");
        assert!(e.to_string().contains("give both or neither"), "{e}");
        let spec = TlsSpec {
            ca: Some("/etc/hostname".into()),
            insecure: true,
            ..TlsSpec::default()
        };
        let e = spec.validate().expect_err("insecure and ca");
        assert!(e.to_string().contains("insecure=True"), "{e}");
    }
}
