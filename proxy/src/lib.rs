//! Faultbox's protocol proxies: what a protocol rule is and how a request
//! is decided (no IO, always built), and, with the `serve` feature, the
//! proxies themselves, TLS around them, and the clients that steps use.
//!
//! The spec crate links this crate without `serve`: loading a spec needs
//! the rule model and the protocols' rules of what applies, never a
//! socket. The runtime turns `serve` on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub mod protocol;
pub mod protocols;
pub mod rules;
pub mod steps;

#[cfg(feature = "serve")]
pub mod h2;
#[cfg(feature = "serve")]
pub mod load;
#[cfg(feature = "serve")]
pub mod net;
#[cfg(feature = "serve")]
pub mod pipe;
#[cfg(feature = "serve")]
pub mod server;
#[cfg(feature = "serve")]
pub mod tls;

/// An event's fields, by name.
pub type Fields = BTreeMap<String, String>;

/// Where proxies report what they see (`proxy_conn_open`, `proxy`, ...):
/// the runtime's trace.
pub trait EventSink: Send + Sync {
    /// Records one event of `service`.
    fn emit(&self, kind: &str, service: &str, fields: Fields);
}

/// A sink that drops everything (benchmarks and unit tests).
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _kind: &str, _service: &str, _fields: Fields) {}
}

/// Builds a field map from pairs, leaving out empty values.
pub fn fields<const N: usize>(pairs: [(&str, String); N]) -> Fields {
    pairs
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// A `tls_cert(...)` declaration, or a TLS setup, that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Half of a certificate and key pair.
    #[error("{what} go together: give both or neither")]
    HalfPair {
        /// The two keywords.
        what: &'static str,
    },
    /// `insecure=True` with `ca=`.
    #[error(
        "insecure=True skips verifying the upstream, so ca= would be ignored: give one or the other"
    )]
    InsecureWithCa,
    /// A certificate or key file that cannot be used.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `secret=` with `proxy_cert=`/`proxy_key=`.
    #[error(
        "secret= gives the proxy's certificate and key, so proxy_cert= and proxy_key= would be ignored: give one or the other"
    )]
    SecretWithProxyCert,
    /// `secret=` outside a cluster.
    #[error(
        "tls_cert(secret={name:?}) reads a Kubernetes Secret, which only a FaultTest's runner has; locally give proxy_cert= and proxy_key="
    )]
    SecretOutsideCluster {
        /// The Secret.
        name: String,
    },
    /// `secret=` naming a Secret the runner did not get.
    #[error(
        "tls_cert(secret={name:?}): the Secret has no tls.crt and tls.key (looked in {}); create a kubernetes.io/tls Secret {name:?} in the FaultTest's namespace",
        dir.display()
    )]
    SecretMissing {
        /// The Secret.
        name: String,
        /// Where it would be mounted.
        dir: PathBuf,
    },
    /// rustls or rcgen refused a step of the setup.
    #[error("{step}: {reason}")]
    Setup {
        /// What was being set up.
        step: &'static str,
        /// Why.
        reason: String,
    },
}

impl TlsError {
    pub(crate) fn file(path: &Path, reason: impl std::fmt::Display) -> TlsError {
        TlsError::File {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// What `tls_cert(...)` declared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSpec {
    pub proxy_cert: Option<PathBuf>,
    pub proxy_key: Option<PathBuf>,
    /// What steps trust the proxy's certificate with (default: the
    /// proxy_cert file itself); a Secret's `ca.crt`.
    pub proxy_ca: Option<PathBuf>,
    /// A Kubernetes Secret (`tls.crt`, `tls.key`, optional `ca.crt`)
    /// with the proxy's certificate, mounted into the runner pod.
    pub secret: Option<String>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub insecure: bool,
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::file(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::file(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::file(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::file(path, e))
}

impl TlsSpec {
    /// Checks what can be checked when the spec loads: pairs complete,
    /// files readable, the CA parses, `insecure` without `ca`.
    pub fn validate(&self) -> Result<(), TlsError> {
        for (a, b, what) in [
            (
                &self.proxy_cert,
                &self.proxy_key,
                "proxy_cert and proxy_key",
            ),
            (
                &self.client_cert,
                &self.client_key,
                "client_cert and client_key",
            ),
        ] {
            if a.is_some() != b.is_some() {
                return Err(TlsError::HalfPair { what });
            }
        }
        if self.insecure && self.ca.is_some() {
            return Err(TlsError::InsecureWithCa);
        }
        if self.secret.is_some() && (self.proxy_cert.is_some() || self.proxy_key.is_some()) {
            return Err(TlsError::SecretWithProxyCert);
        }
        for p in [&self.proxy_cert, &self.client_cert, &self.ca]
            .into_iter()
            .flatten()
        {
            read_certs(p)?;
        }
        for p in [&self.proxy_key, &self.client_key].into_iter().flatten() {
            read_key(p)?;
        }
        Ok(())
    }

    /// The spec with `secret=` turned into the files of the Secret
    /// mounted under `secrets` (a directory per Secret).
    pub fn resolve(&self, secrets: Option<&Path>) -> Result<TlsSpec, TlsError> {
        let Some(name) = &self.secret else {
            return Ok(self.clone());
        };
        let Some(root) = secrets else {
            return Err(TlsError::SecretOutsideCluster { name: name.clone() });
        };
        let dir = root.join(name);
        let (cert, key, ca) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
        if !cert.is_file() || !key.is_file() {
            return Err(TlsError::SecretMissing {
                name: name.clone(),
                dir,
            });
        }
        Ok(TlsSpec {
            proxy_cert: Some(cert),
            proxy_key: Some(key),
            proxy_ca: ca.is_file().then_some(ca),
            secret: None,
            ..self.clone()
        })
    }
}
