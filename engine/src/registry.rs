//! What an image runs, read from its registry: the OCI distribution API
//! (`/v2/<name>/manifests/<ref>`, then the config blob) with the
//! credentials of the run's imagePullSecrets.
//!
//! Cluster mode needs it because a pod's command replaces the image's
//! entrypoint: to run the image's own entrypoint under the shim, the
//! runner must know it, and only the registry can say (the kubelet does
//! not report it). The same lookup gives the image's user, which the
//! restricted pod security standard needs numeric.
//!
//! A registry answers 401 with a challenge: `Basic` (send the secret's
//! user and password) or `Bearer realm=…,service=…,scope=…` (ask the
//! realm for a token, with the user and password when there are any, as
//! Docker Hub, GHCR and Harbor do). An index (multi-platform image) is
//! resolved to this machine's platform (the runner's node). The config blob is checked
//! against its digest. Registries named in `FAULTBOX_INSECURE_REGISTRIES`
//! (and loopback ones) are spoken to in plain HTTP, as containerd's
//! `insecure` mirrors are.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use sha2::{Digest as _, Sha256};

/// The longest one lookup may take, every request included.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest manifest or config accepted: real ones are a few KiB.
const MAX_DOCUMENT: usize = 4 << 20;

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Why an image's configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference is not an image reference.
    #[error("{0:?} is not an image reference")]
    Reference(String),
    /// The registry could not be reached or spoke no HTTP.
    #[error("{url}: {reason}")]
    Transport {
        /// What was asked.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// The registry wants credentials that the run does not have, or
    /// refused them.
    #[error(
        "{registry} refused access to {repository} ({status}): the repository does not exist there, or it needs an imagePullSecret for {registry} on the FaultTest"
    )]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// The repository.
        repository: String,
        /// What it answered.
        status: u16,
    },
    /// The registry answered, but not with what was asked.
    #[error("{url}: {status}{detail}")]
    Status {
        /// What was asked.
        url: String,
        /// Its status.
        status: u16,
        /// The registry's own words, when it gave any.
        detail: String,
    },
    /// The answer is not a manifest or config this client reads.
    #[error("{url}: {reason}")]
    Document {
        /// What was asked.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The whole lookup took too long.
    #[error("no answer within {}s", LOOKUP_TIMEOUT.as_secs())]
    Timeout,
}

/// An image reference, split as the registry API needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` of the registry API.
    pub registry: String,
    /// The repository, `library/` added for Docker Hub's short names.
    pub repository: String,
    /// A tag or a `sha256:` digest.
    pub reference: String,
}

impl Reference {
    /// Reads `[host[:port]/]path[:tag][@digest]` as Docker does: the first
    /// component is a registry when it has a dot or a port or is
    /// `localhost`; otherwise the image is on Docker Hub.
    pub fn parse(image: &str) -> Result<Reference, RegistryError> {
        let bad = || RegistryError::Reference(image.to_string());
        let (rest, digest) = match image.split_once('@') {
            Some((r, d)) if d.starts_with("sha256:") => (r, Some(d)),
            Some(_) => return Err(bad()),
            None => (image, None),
        };
        let (first, tail) = match rest.split_once('/') {
            Some((f, t)) if f.contains('.') || f.contains(':') || f == "localhost" => (Some(f), t),
            _ => (None, rest),
        };
        let (path, tag) = match tail.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, Some(t)),
            _ => (tail, None),
        };
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c);
        if path.is_empty() || !path.chars().all(ok) || path.starts_with('/') {
            return Err(bad());
        }
        let registry = match first {
            None | Some("docker.io" | "index.docker.io") => "registry-1.docker.io".to_string(),
            Some(host) => host.to_string(),
        };
        let repository = if registry == "registry-1.docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let reference = digest.or(tag).unwrap_or("latest").to_string();
        Ok(Reference {
            registry,
            repository,
            reference,
        })
    }
}

/// What an image runs, from its config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `User`, as written (a name, a uid, `uid:gid`), empty for root.
    pub user: String,
    /// The digest of the manifest that was resolved (for an index, the
    /// entry of this machine's platform).
    pub digest: String,
}

/// Where and how to ask registries.
#[derive(Debug, Clone, Default)]
pub struct Registries {
    /// Hosts spoken to in plain HTTP.
    pub insecure: Vec<String>,
    /// `user:password` by registry host, from the pull secrets.
    pub auths: BTreeMap<String, String>,
}

impl Registries {
    /// The runner's: `FAULTBOX_INSECURE_REGISTRIES` (comma separated) and
    /// every pull secret mounted under `FAULTBOX_PULL_SECRETS_DIR`
    /// (`<dir>/<secret>/.dockerconfigjson` or `.dockercfg`).
    pub fn from_env() -> Registries {
        let insecure = std::env::var("FAULTBOX_INSECURE_REGISTRIES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let mut auths = BTreeMap::new();
        if let Some(dir) = std::env::var_os("FAULTBOX_PULL_SECRETS_DIR") {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                for file in [".dockerconfigjson", ".dockercfg"] {
                    let path = entry.path().join(file);
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        match docker_auths(&text) {
                            Ok(found) => auths.extend(found),
                            Err(e) => {
                                tracing::warn!(path = %path.display(), error = %e, "a pull secret that cannot be read")
                            }
                        }
                    }
                }
            }
        }
        Registries { insecure, auths }
    }

    fn plain(&self, registry: &str) -> bool {
        let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
        self.insecure.iter().any(|i| i == registry || i == host)
            || matches!(host, "localhost" | "127.0.0.1" | "[::1]")
    }

    /// The credentials for `registry`: Docker Hub's secrets are keyed by
    /// its index URL, others by host with or without a scheme.
    fn auth(&self, registry: &str) -> Option<&String> {
        self.auths.get(registry).or_else(|| {
            (registry == "registry-1.docker.io")
                .then(|| {
                    self.auths
                        .get("index.docker.io")
                        .or_else(|| self.auths.get("docker.io"))
                })
                .flatten()
        })
    }

    /// The configuration of `image`.
    pub async fn config(&self, image: &str) -> Result<ImageConfig, RegistryError> {
        let r = Reference::parse(image)?;
        tokio::time::timeout(LOOKUP_TIMEOUT, Lookup::new(self, &r)?.run())
            .await
            .map_err(|_| RegistryError::Timeout)?
    }
}

/// `{"auths": {"host": {"auth": base64(user:pass)} | {"username", "password"}}}`
/// (`kubernetes.io/dockerconfigjson`) or the same map without `auths`
/// (`kubernetes.io/dockercfg`), keyed by bare host.
pub fn docker_auths(text: &str) -> Result<BTreeMap<String, String>, String> {
    let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let map = doc
        .get("auths")
        .unwrap_or(&doc)
        .as_object()
        .ok_or("not a map of registries")?;
    let mut out = BTreeMap::new();
    for (key, entry) in map {
        let pair = match (
            entry.get("auth").and_then(|a| a.as_str()),
            entry.get("username"),
        ) {
            (Some(b64), _) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| format!("{key}: auth: {e}"))?;
                String::from_utf8(raw).map_err(|e| format!("{key}: auth: {e}"))?
            }
            (None, Some(user)) => format!(
                "{}:{}",
                user.as_str().unwrap_or_default(),
                entry
                    .get("password")
                    .and_then(|p| p.as_str())
                    .unwrap_or_default()
            ),
            (None, None) => continue,
        };
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        out.insert(host, pair);
    }
    Ok(out)
}

type Http = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

struct Lookup<'a> {
    http: Http,
    base: String,
    r: &'a Reference,
    basic: Option<String>,
    /// The Authorization header that worked, reused for the blob.
    authorization: Option<String>,
}

struct Answer {
    status: StatusCode,
    content_type: String,
    challenge: Option<String>,
    location: Option<String>,
    body: Bytes,
}

impl<'a> Lookup<'a> {
    fn new(reg: &Registries, r: &'a Reference) -> Result<Lookup<'a>, RegistryError> {
        let mut roots = rustls::RootCertStore::empty();
        // A runner image without a CA bundle gets an empty store: HTTPS
        // registries then fail with an unknown-issuer error that says so.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::Transport {
            url: r.registry.clone(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        let scheme = if reg.plain(&r.registry) {
            "http"
        } else {
            "https"
        };
        Ok(Lookup {
            http,
            base: format!("{scheme}://{}/v2/{}", r.registry, r.repository),
            r,
            basic: reg.auth(&r.registry).map(|pair| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                )
            }),
            authorization: None,
        })
    }

    async fn run(mut self) -> Result<ImageConfig, RegistryError> {
        let url = format!("{}/manifests/{}", self.base, self.r.reference);
        let mut answer = self.authorized(&url, MANIFEST_TYPES).await?;
        // The digest is that of the bytes, whatever a header says; a
        // pinned reference must match it.
        let mut digest = sha256(&answer.body);
        if self.r.reference.starts_with("sha256:") {
            expect_digest(&url, &digest, &self.r.reference)?;
        }
        let mut doc = json(&url, &answer.body)?;
        if is_index(&answer.content_type, &doc) {
            let chosen = platform_manifest(&url, &doc)?;
            let url = format!("{}/manifests/{chosen}", self.base);
            answer = self.authorized(&url, MANIFEST_TYPES).await?;
            digest = sha256(&answer.body);
            expect_digest(&url, &digest, &chosen)?;
            doc = json(&url, &answer.body)?;
        }
        let config = doc["config"]["digest"]
            .as_str()
            .ok_or_else(|| RegistryError::Document {
                url: url.clone(),
                reason: format!(
                    "a manifest of type {:?} without config.digest (schema 1 manifests are not read)",
                    answer.content_type
                ),
            })?
            .to_string();
        let url = format!("{}/blobs/{config}", self.base);
        let blob = self.authorized(&url, "*/*").await?;
        if sha256(&blob.body) != config {
            return Err(RegistryError::Document {
                url,
                reason: "the config does not match its digest".into(),
            });
        }
        let cfg = json(&url, &blob.body)?;
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let c = &cfg["config"];
        Ok(ImageConfig {
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            user: c["User"].as_str().unwrap_or_default().to_string(),
            digest,
        })
    }

    /// GETs `url`, answering one challenge, and following redirects (a
    /// blob often lives in object storage elsewhere, which gets no
    /// Authorization header).
    async fn authorized(&mut self, url: &str, accept: &str) -> Result<Answer, RegistryError> {
        let mut answer = self.get(url, accept, self.authorization.clone()).await?;
        if answer.status == StatusCode::UNAUTHORIZED {
            let challenge = answer.challenge.clone().unwrap_or_default();
            let auth = if challenge.to_ascii_lowercase().starts_with("bearer") {
                Some(self.token(&challenge).await?)
            } else {
                self.basic.clone()
            };
            let Some(auth) = auth else {
                return Err(self.unauthorized(answer.status));
            };
            answer = self.get(url, accept, Some(auth.clone())).await?;
            if matches!(
                answer.status,
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ) {
                return Err(self.unauthorized(answer.status));
            }
            self.authorization = Some(auth);
        }
        if answer.status == StatusCode::FORBIDDEN {
            return Err(self.unauthorized(answer.status));
        }
        let mut hops = 0;
        let mut here = url.to_string();
        while answer.status.is_redirection() {
            let Some(next) = answer.location.clone() else {
                break;
            };
            hops += 1;
            if hops > 5 {
                return Err(RegistryError::Document {
                    url: url.to_string(),
                    reason: "more than 5 redirects".into(),
                });
            }
            let next = absolute(&here, &next);
            let same = origin(&next) == origin(&here);
            let auth = if same {
                self.authorization.clone()
            } else {
                None
            };
            answer = self.get(&next, accept, auth).await?;
            here = next;
        }
        if !answer.status.is_success() {
            let detail = serde_json::from_slice::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|d| d["errors"][0]["message"].as_str().map(String::from))
                .map(|m| format!(" ({m})"))
                .unwrap_or_default();
            return Err(RegistryError::Status {
                url: here,
                status: answer.status.as_u16(),
                detail,
            });
        }
        Ok(answer)
    }

    fn unauthorized(&self, status: StatusCode) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.r.registry.clone(),
            repository: self.r.repository.clone(),
            status: status.as_u16(),
        }
    }

    /// A token from a Bearer challenge's realm.
    async fn token(&self, challenge: &str) -> Result<String, RegistryError> {
        let params = challenge_params(challenge);
        let Some(realm) = params.get("realm") else {
            return Err(RegistryError::Document {
                url: self.base.clone(),
                reason: format!("a Bearer challenge without a realm: {challenge:?}"),
            });
        };
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.r.repository));
        // The password goes to the realm: never in plain text unless the
        // registry itself is spoken to that way.
        if !realm.starts_with("https://") && !self.base.starts_with("http://") {
            return Err(RegistryError::Document {
                url: self.base.clone(),
                reason: format!(
                    "its token service {realm:?} is not HTTPS; credentials are not sent there"
                ),
            });
        }
        let sep = if realm.contains('?') { '&' } else { '?' };
        let mut url = format!("{realm}{sep}scope={}", encode(&scope));
        if let Some(service) = params.get("service") {
            url.push_str(&format!("&service={}", encode(service)));
        }
        let answer = self
            .get(&url, "application/json", self.basic.clone())
            .await?;
        if !answer.status.is_success() {
            return Err(self.unauthorized(answer.status));
        }
        let doc = json(&url, &answer.body)?;
        doc["token"]
            .as_str()
            .or_else(|| doc["access_token"].as_str())
            .map(|t| format!("Bearer {t}"))
            .ok_or_else(|| RegistryError::Document {
                url,
                reason: "a token answer without a token".into(),
            })
    }

    async fn get(
        &self,
        url: &str,
        accept: &str,
        auth: Option<String>,
    ) -> Result<Answer, RegistryError> {
        let failed = |reason: String| RegistryError::Transport {
            url: url.to_string(),
            reason,
        };
        let mut req = Request::get(url).header(header::ACCEPT, accept);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(e.to_string()))?;
        let resp = self.http.request(req).await.map_err(|e| {
            // hyper-util's error says only "client error (Connect)": the
            // cause says what happened.
            let mut text = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                text = format!("{text}: {s}");
                src = s.source();
            }
            failed(text)
        })?;
        let head = |name: header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let status = resp.status();
        let content_type = head(header::CONTENT_TYPE).unwrap_or_default();
        let challenge = head(header::WWW_AUTHENTICATE);
        let location = head(header::LOCATION);
        let body = http_body_util::Limited::new(resp.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| failed(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok(Answer {
            status,
            content_type,
            challenge,
            location,
            body,
        })
    }
}

fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::from("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn expect_digest(url: &str, got: &str, want: &str) -> Result<(), RegistryError> {
    if got == want {
        Ok(())
    } else {
        Err(RegistryError::Document {
            url: url.to_string(),
            reason: format!("the manifest's digest is {got}, not {want}"),
        })
    }
}

fn json(url: &str, body: &[u8]) -> Result<serde_json::Value, RegistryError> {
    serde_json::from_slice(body).map_err(|e| RegistryError::Document {
        url: url.to_string(),
        reason: format!("not JSON: {e}"),
    })
}

fn is_index(content_type: &str, doc: &serde_json::Value) -> bool {
    content_type.contains("image.index") || content_type.contains("manifest.list") || {
        doc["manifests"].is_array() && doc["config"].is_null()
    }
}

/// The entry of an index for this machine's platform.
fn platform_manifest(url: &str, index: &serde_json::Value) -> Result<String, RegistryError> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let entries = index["manifests"].as_array().cloned().unwrap_or_default();
    entries
        .iter()
        .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
        .and_then(|m| m["digest"].as_str().map(String::from))
        .ok_or_else(|| RegistryError::Document {
            url: url.to_string(),
            reason: format!(
                "the image has no linux/{arch} manifest (it has {})",
                entries
                    .iter()
                    .map(|m| format!(
                        "{}/{}",
                        m["platform"]["os"].as_str().unwrap_or("?"),
                        m["platform"]["architecture"].as_str().unwrap_or("?")
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// `Bearer realm="https://auth",service="reg",scope="repository:x:pull"`.
fn challenge_params(challenge: &str) -> BTreeMap<String, String> {
    let rest = challenge.split_once(' ').map_or("", |(_, r)| r).trim();
    let mut out = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .skip_while(|c| *c == ',' || c.is_whitespace())
            .take_while(|c| *c != '=')
            .collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
                value.push(c);
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        out.insert(key.trim().to_ascii_lowercase(), value);
    }
    out
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    url[after..].find('/').map_or(url, |i| &url[..after + i])
}

fn absolute(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else {
        format!("{}{location}", origin(base))
    }
}

/// The image's user as a uid the restricted standard can check: `101`,
/// `101:101`; a name or root is `None`.
pub fn numeric_uid(user: &str) -> Option<i64> {
    let uid = user.split(':').next().unwrap_or_default();
    uid.parse::<i64>().ok().filter(|u| *u > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_as_docker_reads_them() {
        let r = |s: &str| Reference::parse(s).expect(s);
        assert_eq!(
            r("redis"),
            Reference {
                registry: "registry-1.docker.io".into(),
                repository: "library/redis".into(),
                reference: "latest".into()
            }
        );
        assert_eq!(r("faultbox/http:test").repository, "faultbox/http");
        let local = r("10.244.0.1:5000/team/app:v2");
        assert_eq!(local.registry, "10.244.0.1:5000");
        assert_eq!(local.repository, "team/app");
        assert_eq!(local.reference, "v2");
        let pinned = r("ghcr.io/o/app@sha256:abc");
        assert_eq!(pinned.registry, "ghcr.io");
        assert_eq!(pinned.reference, "sha256:abc");
        assert_eq!(r("localhost/app").registry, "localhost");
        assert_eq!(r("localhost:5000/app").reference, "latest");
        for bad in ["", "UPPER/case", "app@md5:1", "/abs"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pull_secrets_in_both_formats() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("u:p");
        let json = format!(
            r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{b64}"}}, "reg:5000": {{"username": "a", "password": "b"}}}}}}"#
        );
        let auths = docker_auths(&json).expect("dockerconfigjson");
        assert_eq!(auths["index.docker.io"], "u:p");
        assert_eq!(auths["reg:5000"], "a:b");
        let old = format!(r#"{{"reg:5000": {{"auth": "{b64}"}}}}"#);
        assert_eq!(docker_auths(&old).expect("dockercfg")["reg:5000"], "u:p");
        assert!(docker_auths("[1]").is_err());
        let reg = Registries {
            insecure: vec![],
            auths,
        };
        assert_eq!(
            reg.auth("registry-1.docker.io").map(String::as_str),
            Some("u:p")
        );
    }

    #[test]
    fn challenges_and_uids() {
        let p = challenge_params(
            r#"Bearer realm="http://127.0.0.1:1/token",service="registry.test",scope="repository:a/b:pull""#,
        );
        assert_eq!(p["realm"], "http://127.0.0.1:1/token");
        assert_eq!(p["service"], "registry.test");
        assert_eq!(p["scope"], "repository:a/b:pull");
        assert_eq!(numeric_uid("101"), Some(101));
        assert_eq!(numeric_uid("65532:65532"), Some(65532));
        assert_eq!(numeric_uid("postgres"), None);
        assert_eq!(numeric_uid("0"), None);
        assert_eq!(numeric_uid(""), None);
        assert_eq!(absolute("http://a:1/v2/x", "/blob?y"), "http://a:1/blob?y");
        assert_eq!(origin("https://s3.test/bucket/k"), "https://s3.test");
    }
}
