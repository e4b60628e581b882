//! Protocol rules as plain data, and how one request is decided: no IO.
//!
//! A rule is what `response()`, `error()`, `delay()`, `drop()` and
//! `duplicate()` build; [`ProxyRuleDef::check`] refuses what a protocol
//! cannot apply; [`RuleSet::decide`] answers one request.

use faultbox_agent::engine::{Odds, RuleStats, Shares};
use faultbox_agent::glob::{Glob, GlobError, wildcard};
use faultbox_agent::rule::{RuleId, Trigger};

use crate::protocol::ProtocolError;

/// A protocol rule that cannot be applied where the spec puts it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// An interface protocol with no proxy in this build.
    #[error(
        "protocol faults on {protocol} interfaces are not supported by this build ({supported} are)"
    )]
    UnknownProtocol {
        /// The protocol.
        protocol: String,
        /// The ones that are.
        supported: String,
    },
    /// A matcher, field or action the protocol does not have.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The rule's path glob does not compile.
    #[error("path {path:?}: {source}")]
    Path {
        /// The glob.
        path: String,
        /// Why.
        source: GlobError,
    },
}

/// Whether interfaces of `protocol` get a proxy.
pub fn proxied(protocol: &str) -> bool {
    crate::protocol::get(protocol).is_some()
}

/// What a protocol rule does when it fires.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyAction {
    /// Answer for the upstream: HTTP status (default 200) and body; raw
    /// bytes on tcp; an OK gRPC answer carrying `body` on grpc.
    Respond { status: Option<u16>, body: String },
    /// Answer with an error: HTTP status (default 500) and a JSON body;
    /// a gRPC status (default 13, INTERNAL); on postgres an ErrorResponse
    /// with SQLSTATE `code` (default XX000).
    Error {
        status: Option<u16>,
        message: String,
        code: Option<String>,
        /// MySQL's error number (default 1105, ER_UNKNOWN_ERROR).
        number: Option<u16>,
    },
    /// Hold the request, then go on (later rules still apply).
    Delay { ns: u64 },
    /// End the client's connection without an answer: with a reset (RST)
    /// or an orderly close (FIN). Unset: a reset on http and grpc (what a
    /// crashed backend behind a load balancer looks like), a close on the
    /// others.
    Drop { reset: Option<bool> },
    /// Forward the request as usual, and send it a second time on a
    /// connection of its own (its answer discarded): the upstream sees a
    /// retry the client never made.
    Duplicate,
}

impl ProxyAction {
    /// `respond`, `error`, `delay`, `drop`.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyAction::Respond { .. } => "respond",
            ProxyAction::Error { .. } => "error",
            ProxyAction::Delay { .. } => "delay",
            ProxyAction::Drop { .. } => "drop",
            ProxyAction::Duplicate => "duplicate",
        }
    }
}

/// A protocol rule as the spec wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyRuleDef {
    pub action: ProxyAction,
    /// HTTP method (case-insensitive), or on tcp a prefix of the first
    /// bytes the client sends.
    pub method: Option<String>,
    /// HTTP path glob (query string excluded).
    pub path: Option<String>,
    /// Redis command name (case-insensitive, `*` allowed).
    pub command: Option<String>,
    /// Redis key (the command's first argument), `*` allowed.
    pub key: Option<String>,
    /// SQL statement pattern (postgres), compared after canonicalization.
    pub query: Option<String>,
    pub probability: f64,
    pub trigger: Trigger,
    pub label: Option<String>,
}

impl ProxyRuleDef {
    /// `POST /orders`, `*`: what the rule matches, for reports.
    pub fn matcher(&self) -> String {
        let parts: Vec<&str> = [
            &self.method,
            &self.path,
            &self.command,
            &self.key,
            &self.query,
        ]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
        if parts.is_empty() {
            "*".into()
        } else {
            parts.join(" ")
        }
    }

    /// Refuses what `protocol` cannot apply, naming what it supports.
    pub fn check(&self, protocol: &str) -> Result<(), RuleError> {
        let Some(p) = crate::protocol::get(protocol) else {
            return Err(RuleError::UnknownProtocol {
                protocol: protocol.to_string(),
                supported: crate::protocol::names().join(", "),
            });
        };
        let refuse = |reason: String| {
            RuleError::Protocol(ProtocolError::Rule {
                protocol: p.name(),
                reason,
            })
        };
        let owners = |pick: &dyn Fn(&dyn crate::protocol::Protocol) -> bool| {
            let names: Vec<&str> = crate::protocol::REGISTRY
                .iter()
                .filter(|q| pick(**q))
                .map(|q| q.name())
                .collect();
            match names.as_slice() {
                [] => "no".to_string(),
                [one] => one.to_string(),
                [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
            }
        };
        let given = [
            ("method", self.method.is_some()),
            ("path", self.path.is_some()),
            ("command", self.command.is_some()),
            ("key", self.key.is_some()),
            ("query", self.query.is_some()),
        ];
        for (m, set) in given {
            if set && !p.matchers().contains(&m) {
                return Err(refuse(format!(
                    "{m}= applies to {} interfaces, not {protocol}; {protocol} rules match {}",
                    owners(&|q| q.matchers().contains(&m)),
                    p.matcher_help()
                )));
            }
        }
        p.check(self)?;
        let fields: &[(&str, &str, bool)] = match &self.action {
            ProxyAction::Respond { status, .. } => &[("status", "", status.is_some())],
            ProxyAction::Error {
                status,
                code,
                number,
                ..
            } => &[
                ("status", "", status.is_some()),
                ("code", " (a SQLSTATE)", code.is_some()),
                ("number", " (a MySQL error number)", number.is_some()),
            ],
            _ => &[],
        };
        for (f, what, set) in fields {
            if *set && !p.error_fields().contains(f) {
                return Err(refuse(format!(
                    "{f}={what} applies to {} interfaces, not {protocol}",
                    owners(&|q| q.error_fields().contains(f))
                )));
            }
        }
        if matches!(self.action, ProxyAction::Duplicate) && !p.duplicates() {
            return Err(refuse(format!(
                "duplicate() applies to {} interfaces (where a request can be sent twice), not {protocol}",
                owners(&|q| q.duplicates())
            )));
        }
        Ok(())
    }
}

struct Active {
    id: RuleId,
    def: ProxyRuleDef,
    path: Option<Glob>,
    odds: Odds,
}

/// What one request looks like to the rules.
#[derive(Default)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// Redis: the command (upper case) and its first argument.
    pub command: &'a str,
    pub key: &'a str,
    /// Postgres: the statement, canonicalized.
    pub query: &'a str,
    /// On tcp: the first bytes of the connection.
    pub first_bytes: &'a [u8],
}

/// The rules' verdict on one request.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    /// Total delay before acting.
    pub delay_ns: u64,
    /// The action that ends the request, if any.
    pub action: Option<ProxyAction>,
    /// Send the request once more on a connection of its own.
    pub duplicate: bool,
    /// Ids of the rules that fired, in order.
    pub fired: Vec<(RuleId, &'static str)>,
}

/// The rules of one proxy, in the order their windows opened (newest
/// window first).
#[derive(Default)]
pub struct RuleSet {
    rules: Vec<Active>,
}

fn method_matches(want: &str, have: &str) -> bool {
    if want.contains('*') {
        wildcard(&want.to_ascii_uppercase(), &have.to_ascii_uppercase())
    } else {
        want.eq_ignore_ascii_case(have)
    }
}

impl RuleSet {
    /// Adds `rules` in front (a newer window wins while it is open).
    pub fn push_front(
        &mut self,
        seed: u64,
        rules: Vec<(RuleId, ProxyRuleDef)>,
    ) -> Result<(), RuleError> {
        let mut fresh = Vec::new();
        for (id, def) in rules {
            let path = match &def.path {
                Some(p) => Some(Glob::new(p).map_err(|source| RuleError::Path {
                    path: p.clone(),
                    source,
                })?),
                None => None,
            };
            fresh.push(Active {
                odds: Odds::new(seed, &id.to_string()),
                id,
                def,
                path,
            });
        }
        fresh.append(&mut self.rules);
        self.rules = fresh;
        Ok(())
    }

    /// Removes the rules of fault window `window`, and returns their
    /// final counters.
    pub fn remove(&mut self, window: u64) -> Vec<RuleStats> {
        let mut gone = Vec::new();
        self.rules.retain(|r| {
            if r.id.window == Some(window) {
                gone.push(RuleStats {
                    id: r.id.clone(),
                    matched: r.odds.matched,
                    fired: r.odds.fired,
                });
                false
            } else {
                true
            }
        });
        gone
    }

    /// Whether any rule looks at the first bytes of a tcp connection.
    pub fn wants_first_bytes(&self) -> bool {
        self.rules.iter().any(|r| r.def.method.is_some())
    }

    /// Decides one request. Delays add up and let later rules apply; the
    /// first other action that fires ends the evaluation.
    pub fn decide(&mut self, req: &Request) -> Verdict {
        let mut v = Verdict::default();
        let mut shares = Shares::default();
        for r in &mut self.rules {
            let method_ok = match &r.def.method {
                None => true,
                Some(m) if !req.first_bytes.is_empty() => req.first_bytes.starts_with(m.as_bytes()),
                Some(m) => method_matches(m, req.method),
            };
            if !method_ok {
                continue;
            }
            let redis_ok = r
                .def
                .command
                .as_ref()
                .is_none_or(|c| wildcard(&c.to_ascii_uppercase(), req.command))
                && r.def.key.as_ref().is_none_or(|k| wildcard(k, req.key));
            if !redis_ok {
                continue;
            }
            if let Some(q) = &r.def.query
                && !wildcard(&canonical_sql(q), req.query)
            {
                continue;
            }
            let path_ok = match &r.path {
                None => true,
                Some(g) => g.matches(req.path.split('?').next().unwrap_or("")),
            };
            if !path_ok {
                continue;
            }
            // Rules that end the request split the traffic in shares, as
            // syscall rules do ("30% error, 20% drop"); a delay or a
            // duplicate adds to the request whatever else fires, so each
            // draws against the whole.
            let mut own = Shares::default();
            let pool = match r.def.action {
                ProxyAction::Delay { .. } | ProxyAction::Duplicate => &mut own,
                _ => &mut shares,
            };
            if !r.odds.consider(r.def.trigger, r.def.probability, pool) {
                continue;
            }
            v.fired.push((r.id.clone(), r.def.action.kind()));
            match &r.def.action {
                ProxyAction::Delay { ns } => v.delay_ns += ns,
                ProxyAction::Duplicate => v.duplicate = true,
                other => {
                    v.action = Some(other.clone());
                    break;
                }
            }
        }
        v
    }
}

/// SQL as rules compare it: outside string literals lower-cased, `?` and
/// `$N` parameters as `$?`, operators and punctuation spaced, whitespace
/// collapsed, trailing `;` dropped. So `UPDATE users SET role = ?` matches
/// `update users set role=$1;`.
pub fn canonical_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    // Every trailing `;` and blank, however they alternate (`x; ;`).
    let body = sql
        .trim_start()
        .trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    let mut chars = body.chars().peekable();
    let mut in_literal = false;
    while let Some(c) = chars.next() {
        if in_literal {
            out.push(c);
            if c == '\'' {
                in_literal = false;
            }
            continue;
        }
        match c {
            '\'' => {
                in_literal = true;
                out.push(c);
            }
            '?' => out.push_str("$?"),
            // The canonical placeholder itself, as a rule may write it.
            '$' if chars.peek() == Some(&'?') => {
                chars.next();
                out.push_str("$?");
            }
            '$' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                while chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                    chars.next();
                }
                out.push_str("$?");
            }
            '=' | '<' | '>' | '!' | ',' | '(' | ')' => {
                out.push(' ');
                out.push(c);
                while let Some(&n) = chars.peek() {
                    if matches!(n, '=' | '>') && matches!(c, '<' | '>' | '!' | '=') {
                        out.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(' ');
            }
            c => out.push(c.to_ascii_lowercase()),
        }
    }
    let mut collapsed = String::with_capacity(out.len());
    let mut literal = false;
    let mut space = false;
    for c in out.chars() {
        if c == '\'' {
            literal = !literal;
        }
        if c.is_whitespace() && !literal {
            space = true;
            continue;
        }
        if space && !collapsed.is_empty() {
            collapsed.push(' ');
        }
        space = false;
        collapsed.push(c);
    }
    collapsed
}

/// gRPC status codes by name, in code order (0..=16).
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The gRPC code of `name` (`UNAVAILABLE`, `unavailable`).
pub fn grpc_code(name: &str) -> Option<u16> {
    GRPC_CODES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name))
        .map(|i| i as u16)
}

/// The name of gRPC code `code`.
pub fn grpc_code_name(code: u32) -> &'static str {
    GRPC_CODES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

/// A rule with only an action and HTTP matchers (unit tests).
#[cfg(test)]
pub(crate) fn test_rule(
    action: ProxyAction,
    method: Option<&str>,
    path: Option<&str>,
) -> ProxyRuleDef {
    ProxyRuleDef {
        action,
        method: method.map(str::to_string),
        path: path.map(str::to_string),
        command: None,
        key: None,
        query: None,
        probability: 1.0,
        trigger: Trigger::Always,
        label: None,
    }
}

#[cfg(test)]
mod tests {
    use super::test_rule as rule;
    use super::*;

    fn req<'a>(method: &'a str, path: &'a str) -> Request<'a> {
        Request {
            method,
            path,
            command: "",
            key: "",
            query: "",
            first_bytes: &[],
        }
    }

    #[test]
    fn first_terminal_rule_wins_and_delays_stack() {
        let mut set = RuleSet::default();
        set.push_front(
            1,
            vec![
                (
                    RuleId::in_window(1, "0"),
                    rule(ProxyAction::Delay { ns: 5 }, None, None),
                ),
                (
                    RuleId::in_window(1, "1"),
                    rule(
                        ProxyAction::Error {
                            status: Some(503),
                            message: "down".into(),
                            code: None,
                            number: None,
                        },
                        Some("post"),
                        Some("/orders"),
                    ),
                ),
                (
                    RuleId::in_window(1, "2"),
                    rule(ProxyAction::Drop { reset: None }, None, None),
                ),
            ],
        )
        .expect("rules");
        let v = set.decide(&req("POST", "/orders?x=1"));
        assert_eq!(v.delay_ns, 5);
        assert_eq!(
            v.action,
            Some(ProxyAction::Error {
                status: Some(503),
                message: "down".into(),
                code: None,
                number: None,
            })
        );
        assert_eq!(v.fired.len(), 2);
        let v = set.decide(&req("GET", "/orders"));
        assert_eq!(v.action, Some(ProxyAction::Drop { reset: None }));
    }

    #[test]
    fn paths_use_the_spec_glob_dialect() {
        let mut set = RuleSet::default();
        set.push_front(
            1,
            vec![(
                RuleId::in_window(1, "0"),
                rule(ProxyAction::Drop { reset: None }, None, Some("/api/**")),
            )],
        )
        .expect("rules");
        assert!(set.decide(&req("GET", "/api/v1/items")).action.is_some());
        assert!(set.decide(&req("GET", "/health")).action.is_none());
    }

    #[test]
    fn newer_windows_come_first_and_leave_cleanly() {
        let mut set = RuleSet::default();
        set.push_front(
            1,
            vec![(
                RuleId::in_window(1, "0"),
                rule(ProxyAction::Drop { reset: None }, None, None),
            )],
        )
        .expect("rules");
        set.push_front(
            1,
            vec![(
                RuleId::in_window(2, "0"),
                rule(
                    ProxyAction::Respond {
                        status: Some(200),
                        body: "x".into(),
                    },
                    None,
                    None,
                ),
            )],
        )
        .expect("rules");
        assert_eq!(
            set.decide(&req("GET", "/")).action.map(|a| a.kind()),
            Some("respond")
        );
        set.remove(2);
        assert_eq!(
            set.decide(&req("GET", "/")).action.map(|a| a.kind()),
            Some("drop")
        );
    }

    #[test]
    fn sql_canonicalization_makes_equivalent_statements_equal() {
        assert_eq!(
            canonical_sql("UPDATE users SET role = ? WHERE id = ?"),
            canonical_sql("update users set role=$1 where id=$2;")
        );
        assert_eq!(
            canonical_sql("SELECT 'A  B' FROM t"),
            "select 'A  B' from t"
        );
        assert_eq!(canonical_sql("a<>b"), "a <> b");
        // Found by the sql_canonical fuzz target: a rule written in the
        // canonical form (`$?`) must match what it stands for.
        assert_eq!(canonical_sql("x = $?"), canonical_sql("x = $1"));
        for sql in [
            "select  *\n from t where x = $1",
            "a=?",
            "f('it''s', $12)",
            "lsdc0;?; ;;",
        ] {
            let once = canonical_sql(sql);
            assert_eq!(canonical_sql(&once), once, "{sql:?}");
        }
        assert!(wildcard(
            &canonical_sql("INSERT*"),
            &canonical_sql("insert into t values (1)")
        ));
    }

    #[test]
    fn probability_replays_for_a_seed() {
        let draws = |seed| {
            let mut set = RuleSet::default();
            let mut r = rule(ProxyAction::Drop { reset: None }, None, None);
            r.probability = 0.5;
            set.push_front(seed, vec![(RuleId::in_window(1, "0"), r)])
                .expect("rules");
            (0..40)
                .map(|_| set.decide(&req("GET", "/")).action.is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        assert!(draws(7).iter().any(|d| *d) && draws(7).iter().any(|d| !*d));
    }

    #[test]
    fn tcp_refuses_what_it_cannot_apply() {
        let e = rule(
            ProxyAction::Error {
                status: Some(500),
                message: "x".into(),
                code: None,
                number: None,
            },
            None,
            None,
        )
        .check("tcp")
        .expect_err("error on tcp");
        assert!(
            e.to_string().contains("error() does not apply to tcp"),
            "{e}"
        );
        assert!(
            rule(ProxyAction::Drop { reset: None }, None, Some("/x"))
                .check("tcp")
                .is_err()
        );
        assert!(
            rule(ProxyAction::Drop { reset: None }, None, None)
                .check("amqp")
                .is_err()
        );
        assert!(
            rule(ProxyAction::Duplicate, None, None)
                .check("tcp")
                .is_err()
        );
        assert!(
            rule(ProxyAction::Duplicate, None, None)
                .check("http")
                .is_ok()
        );
        let respond = ProxyAction::Respond {
            status: Some(200),
            body: String::new(),
        };
        assert!(rule(respond, None, None).check("postgres").is_err());
        assert!(
            rule(ProxyAction::Drop { reset: None }, Some("GET"), None)
                .check("redis")
                .is_err()
        );
        assert!(
            rule(ProxyAction::Drop { reset: None }, Some("GET"), Some("/x"))
                .check("http")
                .is_ok()
        );
    }

    #[test]
    fn codes_have_their_names() {
        assert_eq!(grpc_code("unavailable"), Some(14));
        assert_eq!(grpc_code("UNAUTHENTICATED"), Some(16));
        assert_eq!(grpc_code("nope"), None);
        assert_eq!(grpc_code_name(4), "DEADLINE_EXCEEDED");
        assert_eq!(grpc_code_name(99), "UNKNOWN");
    }
}
