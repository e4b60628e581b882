//! The protocol seam: everything Faultbox knows about one wire protocol
//! sits behind [`Protocol`], and [`REGISTRY`] lists them. `interface()`
//! accepts exactly the registry's names; rules, steps, `ready()`, TLS and
//! the proxy all look a protocol up here, never by string match.
//!
//! Adding a protocol: a module under `protocols/` implementing the trait
//! (its IO-free frame parser tested on captured traffic, the rules it
//! accepts, its fault answers, its steps and `ready()` probe), and one
//! line in [`REGISTRY`].

use crate::Fields;
use crate::protocols;
use crate::rules::ProxyRuleDef;
use crate::steps::{StepCall, StepDef};

/// How TLS starts on a protocol's connections: at once (most), at once
/// with ALPN `h2` (gRPC), or inside the protocol after a plaintext
/// preamble (PostgreSQL's SSLRequest, MySQL's greeting and SSLRequest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Direct,
    H2,
    Postgres,
    Mysql,
}

/// Why bytes are not a well-formed message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FrameError(pub String);

/// What a protocol refuses, or found wrong, in its own words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A fault rule the protocol cannot apply.
    #[error("{reason}")]
    Rule {
        /// The protocol.
        protocol: &'static str,
        /// Why, with what to use instead.
        reason: String,
    },
    /// A step argument the protocol cannot use.
    #[error("{reason}")]
    Step {
        /// The protocol.
        protocol: &'static str,
        /// The step method.
        method: String,
        /// Why.
        reason: String,
    },
    /// `ready()` did not get the protocol's answer.
    #[error("{reason}")]
    NotReady {
        /// The protocol.
        protocol: &'static str,
        /// Where it asked.
        addr: String,
        /// What happened instead.
        reason: String,
    },
}

/// The outcome of looking for one whole message at the start of a
/// buffer: its length, or how far the parser got when more bytes are
/// needed.
pub type Frame = Result<Option<usize>, FrameError>;

/// The largest message a proxy holds in memory to decide it. A peer that
/// announces more gets its connection closed: no parser allocates what a
/// peer claims.
pub const MAX_FRAME: usize = 16 << 20;

/// Where a step or probe connects, and how.
#[cfg(feature = "serve")]
pub struct Target<'a> {
    /// `host:port`: the interface's proxy, or the service itself.
    pub addr: &'a str,
    /// The TLS client configuration, for an interface with TLS.
    pub tls: Option<&'a std::sync::Arc<rustls::ClientConfig>>,
    /// The service's environment (SQL logins come from it).
    pub env: &'a [(String, String)],
}

/// What a protocol is, as data: everything a spec is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Traits {
    /// The name `interface()` accepts.
    pub name: &'static str,
    /// The word error messages of its steps start with (`http step`).
    pub step_label: &'static str,
    /// The step methods its interfaces offer.
    pub steps: &'static [StepDef],
    /// The request matchers its rules take, of `method`, `path`,
    /// `command`, `key` and `query`.
    pub matchers: &'static [&'static str],
    /// What its matchers mean, for the message refusing others.
    pub matcher_help: &'static str,
    /// Which of `status`, `code` and `number` its `error()` takes.
    pub error_fields: &'static [&'static str],
    /// Whether `duplicate()` applies (a request can be sent twice).
    pub duplicates: bool,
    /// Whether `drop()` resets the connection unless told otherwise.
    pub resets_on_drop: bool,
    /// Whether it is carried in datagrams (UDP) rather than a stream.
    pub datagrams: bool,
    /// How TLS starts on its connections.
    pub wire: Wire,
}

impl Traits {
    /// The defaults a protocol's `Traits` start from.
    pub const DEFAULT: Traits = Traits {
        name: "",
        step_label: "step",
        steps: &[],
        matchers: &[],
        matcher_help: "",
        error_fields: &[],
        duplicates: false,
        resets_on_drop: false,
        datagrams: false,
        wire: Wire::Direct,
    };
}

/// A client connection and the proxy it reached.
#[cfg(feature = "serve")]
pub type Client = std::net::TcpStream;
/// What a proxy's connections share.
#[cfg(feature = "serve")]
pub type Shared = std::sync::Arc<crate::server::Ctx>;

/// One wire protocol: its [`Traits`], the checks that need code, and (with
/// `serve`) its proxy, step client and probe.
pub trait Protocol: Sync {
    /// What it is.
    fn traits(&self) -> &'static Traits;

    /// The name `interface()` accepts.
    fn name(&self) -> &'static str {
        self.traits().name
    }

    /// The step methods its interfaces offer.
    fn steps(&self) -> &'static [StepDef] {
        self.traits().steps
    }

    /// The word error messages of its steps start with.
    fn step_label(&self) -> &'static str {
        self.traits().step_label
    }

    /// The request matchers its rules take.
    fn matchers(&self) -> &'static [&'static str] {
        self.traits().matchers
    }

    /// What its matchers mean.
    fn matcher_help(&self) -> &'static str {
        self.traits().matcher_help
    }

    /// Which fields its `error()` takes.
    fn error_fields(&self) -> &'static [&'static str] {
        self.traits().error_fields
    }

    /// Whether `duplicate()` applies.
    fn duplicates(&self) -> bool {
        self.traits().duplicates
    }

    /// Whether `drop()` resets unless told otherwise.
    fn resets_on_drop(&self) -> bool {
        self.traits().resets_on_drop
    }

    /// Whether it is carried in datagrams.
    fn datagrams(&self) -> bool {
        self.traits().datagrams
    }

    /// How TLS starts on its connections.
    fn wire(&self) -> Wire {
        self.traits().wire
    }

    /// Refuses what else this protocol cannot apply (actions, values),
    /// after the matchers and fields were checked.
    fn check(&self, _rule: &ProxyRuleDef) -> Result<(), ProtocolError> {
        Ok(())
    }

    /// Checks what a step's argument types cannot (a gRPC method path).
    fn check_step(&self, _call: &StepCall) -> Result<(), ProtocolError> {
        Ok(())
    }

    /// A rule this protocol refuses, and why.
    fn refuse(&self, reason: impl Into<String>) -> ProtocolError
    where
        Self: Sized,
    {
        ProtocolError::Rule {
            protocol: self.name(),
            reason: reason.into(),
        }
    }

    /// A step argument this protocol refuses, and why.
    fn refuse_step(&self, call: &StepCall, reason: impl Into<String>) -> ProtocolError
    where
        Self: Sized,
    {
        ProtocolError::Step {
            protocol: self.name(),
            method: call.method.clone(),
            reason: reason.into(),
        }
    }

    /// What a step sends, for its `step_send` event (a `summary` field
    /// included).
    fn describe_step(&self, call: &StepCall) -> Fields;

    /// Its proxy, step client and probe.
    #[cfg(feature = "serve")]
    fn io(&self) -> &'static Io;

    /// Relays one client connection, applying the proxy's rules.
    #[cfg(feature = "serve")]
    fn serve(&self, client: Client, ctx: &Shared) -> crate::server::Closed {
        (self.io().serve)(client, ctx)
    }

    /// Carries out one step.
    #[cfg(feature = "serve")]
    fn step(&self, call: &StepCall, to: &Target) -> crate::steps::StepResult {
        (self.io().step)(call, to)
    }

    /// `ready()`: whether the service answers its own protocol.
    #[cfg(feature = "serve")]
    fn ready(&self, to: &Target, timeout: std::time::Duration) -> Result<(), ProtocolError> {
        (self.io().ready)(to, timeout).map_err(|reason| ProtocolError::NotReady {
            protocol: self.name(),
            addr: to.addr.to_string(),
            reason,
        })
    }
}

/// How one protocol does its IO: the functions of its `io` module.
#[cfg(feature = "serve")]
pub struct Io {
    /// Relays one client connection, applying the proxy's rules.
    pub serve: fn(Client, &Shared) -> crate::server::Closed,
    /// Carries out one step.
    pub step: fn(&StepCall, &Target) -> crate::steps::StepResult,
    /// One `ready()` attempt: what the service answered instead, if not
    /// its protocol.
    pub ready: fn(&Target, std::time::Duration) -> Result<(), String>,
}

/// Every protocol of this build, in the order `interface()` lists them.
pub static REGISTRY: &[&dyn Protocol] = &[
    &protocols::http::Http { h2: false },
    &protocols::http::Http { h2: true },
    &protocols::grpc::Grpc,
    &protocols::tcp::Tcp,
    &protocols::redis::Redis,
    &protocols::postgres::Postgres,
    &protocols::mysql::Mysql,
    &protocols::memcached::Memcached,
    &protocols::udp::Udp,
];

/// The protocol named `name`.
pub fn get(name: &str) -> Option<&'static dyn Protocol> {
    REGISTRY.iter().copied().find(|p| p.name() == name)
}

/// The names of every protocol, for messages.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|p| p.name()).collect()
}

/// Splits `buf` into whole frames with `frame`; returns the frames and
/// the bytes left over (an incomplete last message). The test helper
/// every protocol's parser is checked with on captured traffic.
pub fn split(buf: &[u8], frame: fn(&[u8]) -> Frame) -> Result<(Vec<&[u8]>, usize), FrameError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        match frame(&buf[at..])? {
            Some(0) => return Err(FrameError("a frame of length 0".into())),
            Some(n) => {
                out.push(&buf[at..at + n]);
                at += n;
            }
            None => break,
        }
    }
    Ok((out, buf.len() - at))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Checks a frame parser on real captured traffic
    //! (`proxy/testdata/<protocol>/*.c2s|s2c`, see its README).
    use super::*;

    /// The captured bytes of `protocol`'s sessions in direction `dir`
    /// (`c2s` or `s2c`), by session name.
    pub fn captured(protocol: &str, dir: &str) -> Vec<(String, Vec<u8>)> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(protocol);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&root).expect("testdata dir").flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == dir) {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push((name, std::fs::read(&path).expect("read capture")));
            }
        }
        out.sort();
        assert!(!out.is_empty(), "no {dir} captures for {protocol}");
        out
    }

    /// Every prefix of every capture parses without error into whole
    /// frames plus a remainder, and each whole capture splits exactly.
    /// Returns the frame count of each capture.
    pub fn every_prefix(protocol: &str, dir: &str, frame: fn(&[u8]) -> Frame) -> Vec<usize> {
        let mut counts = Vec::new();
        for (name, bytes) in captured(protocol, dir) {
            let (frames, rest) =
                split(&bytes, frame).unwrap_or_else(|e| panic!("{protocol}/{name}.{dir}: {e}"));
            assert_eq!(rest, 0, "{protocol}/{name}.{dir}: {rest} bytes left over");
            // Big captures are checked at a stride: every prefix of a
            // 200 KB file would be 200,000 parses of up to 200 KB.
            let step = (bytes.len() / 4096).max(1);
            for cut in (0..bytes.len()).step_by(step) {
                let (partial, _) = split(&bytes[..cut], frame)
                    .unwrap_or_else(|e| panic!("{protocol}/{name}.{dir} cut at {cut}: {e}"));
                assert!(partial.len() <= frames.len());
                for (a, b) in partial.iter().zip(&frames) {
                    assert_eq!(a, b, "{protocol}/{name}.{dir} cut at {cut}");
                }
            }
            counts.push(frames.len());
        }
        counts
    }
}
