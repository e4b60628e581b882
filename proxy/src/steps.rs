//! Steps as plain data: which methods each protocol's interfaces offer
//! (`svc.iface.post(...)`), the arguments each takes, a call with its
//! arguments checked, and what a call gave back. No IO: the spec crate
//! checks a call against these, the runtime carries it out.

use std::collections::BTreeMap;
use std::time::Duration;

/// The type of one step argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Int,
    /// A Go-style duration string (`"500ms"`).
    Duration,
    /// A dict of strings.
    Headers,
}

/// One argument a step method takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    pub name: &'static str,
    pub kind: Kind,
    pub required: bool,
}

impl Param {
    /// An optional argument.
    pub const fn opt(name: &'static str, kind: Kind) -> Param {
        Param {
            name,
            kind,
            required: false,
        }
    }

    /// A required argument.
    pub const fn req(name: &'static str, kind: Kind) -> Param {
        Param {
            name,
            kind,
            required: true,
        }
    }
}

/// One step method. Its first parameter may also be given by position;
/// with `rest`, every positional argument is a string of a list (Redis's
/// `command("SET", "k", "v")`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepDef {
    pub method: &'static str,
    pub params: &'static [Param],
    /// Positional arguments are collected as a list under this name.
    pub rest: Option<&'static str>,
}

impl StepDef {
    /// Method `method` with `params`.
    pub const fn new(method: &'static str, params: &'static [Param]) -> StepDef {
        StepDef {
            method,
            params,
            rest: None,
        }
    }

    /// A method whose positional arguments are a list of strings.
    pub const fn with_rest(
        method: &'static str,
        rest: &'static str,
        params: &'static [Param],
    ) -> StepDef {
        StepDef {
            method,
            params,
            rest: Some(rest),
        }
    }
}

/// A checked argument value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Str(String),
    Int(i64),
    Duration(Duration),
    Headers(Vec<(String, String)>),
    List(Vec<String>),
}

/// One step call, its arguments checked against its [`StepDef`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepCall {
    pub service: String,
    pub interface: String,
    pub protocol: String,
    /// The interface's declared port.
    pub port: u16,
    pub method: String,
    pub args: BTreeMap<String, Arg>,
}

impl StepCall {
    /// A string argument, if given.
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.args.get(name) {
            Some(Arg::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// An integer argument, if given.
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.args.get(name) {
            Some(Arg::Int(i)) => Some(*i),
            _ => None,
        }
    }

    /// `timeout=`, or `default`.
    pub fn timeout(&self, default: Duration) -> Duration {
        match self.args.get("timeout") {
            Some(Arg::Duration(d)) => *d,
            _ => default,
        }
    }

    /// The headers argument (empty when not given).
    pub fn headers(&self, name: &str) -> &[(String, String)] {
        match self.args.get(name) {
            Some(Arg::Headers(h)) => h,
            _ => &[],
        }
    }

    /// The list argument (empty when not given).
    pub fn list(&self, name: &str) -> &[String] {
        match self.args.get(name) {
            Some(Arg::List(l)) => l,
            _ => &[],
        }
    }
}

/// What a step gave back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepReply {
    /// HTTP status, gRPC code; 0 when the protocol has none.
    pub status: i64,
    pub body: String,
    pub headers: BTreeMap<String, String>,
    pub ok: bool,
    /// The error the client saw (the server's error text, or why the
    /// connection failed).
    pub error: String,
    pub duration_ms: i64,
    /// Structured data when the protocol has it (rows, decoded replies).
    pub data: Option<serde_json::Value>,
}

/// The outcome of a step as the spec sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum StepResult {
    /// A response value (`.status`, `.body`, `.ok`, ...).
    Reply(StepReply),
    /// A plain string (tcp `send`: the line the server answered).
    Text(String),
    /// The step raised: the message.
    Raise(String),
}

/// The step methods of `protocol`'s interfaces.
pub fn step_defs(protocol: &str) -> &'static [StepDef] {
    crate::protocol::get(protocol).map_or(&[], |p| p.steps())
}

/// `protocol`'s step method `method`.
pub fn step_def(protocol: &str, method: &str) -> Option<&'static StepDef> {
    step_defs(protocol).iter().find(|d| d.method == method)
}

/// The `step_send` fields of a call that sends `shown` (kept as field
/// `key`, 200 characters at most) and its summary line.
pub fn sent(call: &StepCall, key: &str, shown: &str) -> crate::Fields {
    crate::Fields::from([
        (key.to_string(), shown.chars().take(200).collect()),
        (
            "summary".to_string(),
            format!("→ {}.{} {shown}", call.service, call.method),
        ),
    ])
}

/// Checks what an argument's type cannot (a gRPC method is a full path).
pub fn check_call(call: &StepCall) -> Result<(), crate::protocol::ProtocolError> {
    match crate::protocol::get(&call.protocol) {
        Some(p) => p.check_step(call),
        None => Ok(()),
    }
}

/// A URL a step or healthcheck cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url:?}: only http:// URLs are supported")]
pub struct UrlError {
    /// The URL as written.
    pub url: String,
}

/// Splits `http://host:port/path` into (`host:port`, `/path`).
pub fn split_url(url: &str) -> Result<(String, String), UrlError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| UrlError {
        url: url.to_string(),
    })?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok((host, path.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_address_and_path() {
        assert_eq!(
            split_url("http://localhost:8080/health").expect("url"),
            ("localhost:8080".into(), "/health".into())
        );
        assert_eq!(
            split_url("http://example").expect("url"),
            ("example:80".into(), "/".into())
        );
        assert!(split_url("https://x").is_err());
    }
}
