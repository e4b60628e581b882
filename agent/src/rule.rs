//! Fault rules: what the controller sends the shim, and the `--fault` /
//! `--fs-fault` grammar that produces them.
//!
//! ```text
//! SYSCALL=ERRNO:PROBABILITY%[:PATH_GLOB][:TRIGGER]
//! SYSCALL=delay:DURATION:PROBABILITY%[:PATH_GLOB][:TRIGGER]
//! TRIGGER = nth=N | after=N
//! ```

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::errno;
use crate::glob::{Glob, GlobError};
use crate::syscalls::{self, Arch};

/// A rule's identity: the fault window that opened it (none for the
/// rules of `faultbox run`) and the name it was written under (a syscall,
/// a family or an op in a spec; the `--fault` text on the command line).
/// It names the rule in events and seeds its RNG, so it must be stable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuleId {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
    pub name: String,
}

impl RuleId {
    /// The id of rule `name` of fault window `window`.
    pub fn in_window(window: u64, name: impl Into<String>) -> RuleId {
        RuleId {
            window: Some(window),
            name: name.into(),
        }
    }
}

impl From<&str> for RuleId {
    fn from(name: &str) -> RuleId {
        RuleId {
            window: None,
            name: name.to_string(),
        }
    }
}

/// `w3:fsync` for a window's rule, the bare name otherwise (the text its
/// RNG stream is derived from).
impl std::fmt::Display for RuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.window {
            Some(w) => write!(f, "w{w}:{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One fault rule, as the controller sends it to the shim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub id: RuleId,
    /// The syscalls the rule targets, already expanded from families.
    pub syscalls: Vec<String>,
    /// What happens when the rule fires.
    pub action: Action,
    /// Share of matching calls on which the rule fires, from 0.0 to 1.0.
    pub probability: f64,
    /// Only calls whose path matches this glob are considered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Which matching calls may fire.
    #[serde(default)]
    pub trigger: Trigger,
    /// A user label carried into events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// What a rule does to a call when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the call run.
    Allow,
    /// Let the call run and record it: a `trace()` window. Decided like
    /// [`Action::Allow`], reported as `trace`.
    Trace,
    /// Fail the call with `errno` without running it.
    Deny {
        /// The errno number returned to the target.
        errno: i32,
    },
    /// Hold the call for `ns` nanoseconds, then run it.
    Delay {
        /// Delay in nanoseconds.
        ns: u64,
    },
    /// Park the call until the controller releases it (allowed or denied),
    /// its rule goes away, or the controller does. The rule's label is
    /// the tag releases name.
    Hold,
}

/// Which of a rule's matching calls may fire, counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// Every matching call.
    #[default]
    Always,
    /// Only the Nth matching call.
    Nth(u64),
    /// Every matching call after the first N.
    After(u64),
}

impl Trigger {
    /// Whether the `count`-th matching call (1-based) may fire.
    pub fn allows(self, count: u64) -> bool {
        match self {
            Trigger::Always => true,
            Trigger::Nth(n) => count == n,
            Trigger::After(n) => count > n,
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Always => Ok(()),
            Trigger::Nth(n) => write!(f, "nth={n}"),
            Trigger::After(n) => write!(f, "after={n}"),
        }
    }
}

impl Action {
    /// The decision text for this action: `deny(input/output error)`,
    /// `delay(200ms)`. Allow and deny texts are static (no allocation on
    /// the notification path).
    pub fn describe(self) -> Cow<'static, str> {
        match self {
            Action::Allow => Cow::Borrowed("allow"),
            Action::Trace => Cow::Borrowed("trace"),
            Action::Deny { errno } => match deny_text(errno) {
                Some(text) => Cow::Borrowed(text),
                None => Cow::Owned(format!("deny(errno {errno})")),
            },
            Action::Delay { ns } => Cow::Owned(format!(
                "delay({})",
                format_duration(Duration::from_nanos(ns))
            )),
            Action::Hold => Cow::Borrowed("hold"),
        }
    }
}

/// `deny(<text>)` for every errno of the table, built once.
fn deny_text(errno: i32) -> Option<&'static str> {
    static TEXTS: std::sync::OnceLock<std::collections::HashMap<i32, String>> =
        std::sync::OnceLock::new();
    TEXTS
        .get_or_init(|| {
            errno::ERRNOS
                .iter()
                .map(|e| (e.number, format!("deny({})", e.text)))
                .collect()
        })
        .get(&errno)
        .map(String::as_str)
}

/// A rule the shim or the controller cannot use.
#[derive(Debug, Error, PartialEq)]
pub enum RuleError {
    /// The rule names no syscall.
    #[error("rule \"{rule}\" targets no syscall")]
    NoSyscall {
        /// The rule.
        rule: RuleId,
    },
    /// The probability is not a fraction of 1.
    #[error("rule \"{rule}\": probability {probability} is outside 0..1")]
    Probability {
        /// The rule.
        rule: RuleId,
        /// The value it carries.
        probability: f64,
    },
    /// `nth=0`.
    #[error("rule \"{rule}\": nth must be at least 1")]
    NthZero {
        /// The rule.
        rule: RuleId,
    },
    /// The path glob does not compile.
    #[error("rule \"{rule}\": {source}")]
    Glob {
        /// The rule.
        rule: RuleId,
        /// Why.
        source: GlobError,
    },
    /// A path glob on a syscall that takes no path.
    #[error(
        "rule \"{rule}\": a path glob applies to file and fd syscalls (the file) and connect (the destination, ip:port), and {syscall:?} has no path"
    )]
    PathlessSyscall {
        /// The rule.
        rule: RuleId,
        /// The syscall without a path.
        syscall: String,
    },
    /// A syscall name the architecture does not have.
    #[error("{source}")]
    Syscall {
        /// The rule.
        rule: RuleId,
        /// Why.
        source: ValueError,
    },
    /// A syscall the target's filter, fixed at launch, does not intercept.
    #[error(
        "rule \"{rule}\" targets {syscall}, which this target's seccomp filter does not intercept (the filter is fixed at launch: declare the syscall when the service starts)"
    )]
    NotIntercepted {
        /// The rule.
        rule: RuleId,
        /// The syscall.
        syscall: String,
    },
    /// The target has no filter at all.
    #[error(
        "this target runs without a seccomp filter (no syscall was declared at launch), so syscall rules cannot apply"
    )]
    NoFilter,
}

impl RuleError {
    /// What is wrong, without the rule's name in front (for messages that
    /// already quote the rule).
    pub fn reason(&self) -> String {
        let text = self.to_string();
        let rule = match self {
            RuleError::NoSyscall { rule }
            | RuleError::Probability { rule, .. }
            | RuleError::NthZero { rule }
            | RuleError::Glob { rule, .. }
            | RuleError::PathlessSyscall { rule, .. }
            | RuleError::Syscall { rule, .. }
            | RuleError::NotIntercepted { rule, .. } => rule,
            RuleError::NoFilter => return text,
        };
        let prefix = format!("rule \"{rule}\": ");
        text.strip_prefix(&prefix).unwrap_or(&text).to_string()
    }
}

/// A value inside a rule (syscall name, trigger, delay, probability,
/// duration) that does not read, with the text as written.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum ValueError {
    /// No syscall of that name on any architecture.
    #[error("unknown syscall {name:?}{hint}")]
    UnknownSyscall {
        /// The name.
        name: String,
        /// A suggestion, with its leading space.
        hint: String,
    },
    /// A syscall of the other architecture.
    #[error("syscall {name:?} does not exist on {arch}{hint}")]
    NotOnArch {
        /// The name.
        name: String,
        /// This architecture.
        arch: Arch,
        /// The replacement, if one is well known.
        hint: &'static str,
    },
    /// Neither `nth` nor `after`.
    #[error("unknown trigger {text:?}{hint}")]
    UnknownTrigger {
        /// The trigger as written.
        text: String,
        /// A suggestion, with its leading space.
        hint: String,
    },
    /// `nth=`/`after=` with a value that is not a whole number from 1.
    #[error("invalid trigger {text:?}{reason}")]
    InvalidTrigger {
        /// The trigger as written.
        text: String,
        /// Why, with its leading separator.
        reason: String,
    },
    /// Not a number with a unit.
    #[error("invalid duration {text:?} (use a number with a unit, like 500us, 200ms, 1s or 2m)")]
    Duration {
        /// The duration as written.
        text: String,
    },
    /// More nanoseconds than a u64 holds with room.
    #[error("duration {text:?} is too long")]
    DurationTooLong {
        /// The duration as written.
        text: String,
    },
    /// A delay past the hour or day limit.
    #[error("delay {text:?} is longer than {limit}; {advice}")]
    DelayTooLong {
        /// The delay as written.
        text: String,
        /// "an hour" or "a day".
        limit: &'static str,
        /// What to do.
        advice: &'static str,
    },
    /// Not a percentage or a plain decimal fraction.
    #[error("invalid probability {text:?} (write a percentage like 25% or a fraction like 0.25)")]
    Probability {
        /// The probability as written.
        text: String,
    },
    /// A percentage past 100%.
    #[error("probability {text:?} is out of range (outside 0%..100%)")]
    PercentOutOfRange {
        /// The probability as written.
        text: String,
    },
    /// A bare number above 1, which may have meant a percentage.
    #[error(
        "probability {text:?} is a bare number above 1: write \"{number}%\" for a percentage, or a fraction from 0 to 1"
    )]
    BareNumberAboveOne {
        /// The probability as written.
        text: String,
        /// Its number part.
        number: String,
    },
}

impl Rule {
    /// Checks the rule against an architecture's syscall table and returns
    /// the syscall numbers it targets.
    pub fn validate(&self, arch: Arch) -> Result<Vec<u32>, RuleError> {
        let rule = || self.id.clone();
        if self.syscalls.is_empty() {
            return Err(RuleError::NoSyscall { rule: rule() });
        }
        if !(0.0..=1.0).contains(&self.probability) || self.probability.is_nan() {
            return Err(RuleError::Probability {
                rule: rule(),
                probability: self.probability,
            });
        }
        if let Trigger::Nth(0) = self.trigger {
            return Err(RuleError::NthZero { rule: rule() });
        }
        if let Some(pattern) = &self.path {
            Glob::new(pattern).map_err(|source| RuleError::Glob {
                rule: rule(),
                source,
            })?;
            if let Some(name) = self
                .syscalls
                .iter()
                .find(|s| syscalls::path_source(s).is_none())
            {
                return Err(RuleError::PathlessSyscall {
                    rule: rule(),
                    syscall: name.clone(),
                });
            }
        }
        self.syscalls
            .iter()
            .map(|name| {
                resolve_syscall(arch, name).map_err(|source| RuleError::Syscall {
                    rule: rule(),
                    source,
                })
            })
            .collect()
    }
}

/// The number of syscall `name` on `arch`, or a message that names the
/// problem and the closest known syscall.
pub fn resolve_syscall(arch: Arch, name: &str) -> Result<u32, ValueError> {
    if let Some(nr) = arch.number(name) {
        return Ok(nr);
    }
    let other = match arch {
        Arch::X86_64 => Arch::Aarch64,
        Arch::Aarch64 => Arch::X86_64,
    };
    if other.number(name).is_some() {
        let hint = match name {
            "open" => " (use openat)",
            "stat" | "lstat" => " (use fstatat)",
            "unlink" | "rmdir" => " (use unlinkat)",
            "mkdir" => " (use mkdirat)",
            _ => "",
        };
        return Err(ValueError::NotOnArch {
            name: name.to_string(),
            arch,
            hint,
        });
    }
    let names = arch.all_names();
    let hint = match errno::closest(name, names.iter().copied()) {
        Some(s) => format!(" (did you mean {s}?)"),
        None => " (use a Linux syscall name such as openat, write, fsync or connect)".to_string(),
    };
    Err(ValueError::UnknownSyscall {
        name: name.to_string(),
        hint,
    })
}

/// A `--fault` or `--fs-fault` value that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{flag} {spec:?}: {reason}")]
pub struct FaultSpecError {
    /// `--fault` or `--fs-fault`.
    pub flag: &'static str,
    /// The value as the user wrote it.
    pub spec: String,
    /// What is wrong, with a suggestion.
    pub reason: String,
}

/// Parses one `--fault` value into rules (one rule; the syscall is taken literally).
pub fn parse_fault(spec: &str, arch: Arch) -> Result<Rule, FaultSpecError> {
    parse_with(spec, arch, "--fault", |name| {
        resolve_syscall(arch, name).map_err(|e| e.to_string())?;
        Ok(vec![name.to_string()])
    })
}

/// Parses one `--fs-fault` value, whose left side names a filesystem operation.
pub fn parse_fs_fault(spec: &str, arch: Arch) -> Result<Rule, FaultSpecError> {
    parse_with(
        spec,
        arch,
        "--fs-fault",
        |op| match syscalls::fs_operation(arch, op) {
            Some(names) => Ok(names.into_iter().map(str::to_string).collect()),
            None => {
                let hint = errno::closest(op, syscalls::FS_OPERATIONS.iter().copied())
                    .map(|s| format!("did you mean {s}? "))
                    .unwrap_or_default();
                Err(format!(
                    "unknown filesystem operation {op:?} ({hint}operations: {}; use --fault for raw syscalls)",
                    syscalls::FS_OPERATIONS.join(", ")
                ))
            }
        },
    )
}

fn parse_with(
    spec: &str,
    arch: Arch,
    flag: &'static str,
    targets: impl Fn(&str) -> Result<Vec<String>, String>,
) -> Result<Rule, FaultSpecError> {
    let fail = |reason: String| FaultSpecError {
        flag,
        spec: spec.to_string(),
        reason,
    };
    let Some((target, rest)) = spec.split_once('=') else {
        return Err(fail(
            "missing '=' (write SYSCALL=ERRNO:PROBABILITY%, for example openat=ENOENT:100%)".into(),
        ));
    };
    let target = target.trim();
    if target.is_empty() {
        return Err(fail("missing syscall name before '='".into()));
    }
    let syscalls = targets(target).map_err(fail)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (action, probability, extra) = if parts[0].eq_ignore_ascii_case("delay") {
        let duration = parts
            .get(1)
            .ok_or_else(|| fail("delay needs a duration (for example delay:200ms:100%)".into()))?;
        let ns = parse_delay(duration).map_err(|e| fail(e.to_string()))?;
        let probability = parts.get(2).ok_or_else(|| {
            fail(format!(
                "missing probability (write it as {target}=delay:{duration}:100%)"
            ))
        })?;
        (Action::Delay { ns }, *probability, &parts[3..])
    } else {
        let name = parts[0];
        let errno = errno::lookup(name).ok_or_else(|| {
            let hint = errno::closest(name, errno::ERRNOS.iter().map(|e| e.name))
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_else(|| {
                    " (use a name such as EIO, ENOENT, ENOSPC or ECONNREFUSED, or delay)".into()
                });
            if name.is_empty() {
                "missing errno after '='".to_string()
            } else {
                format!("unknown errno {name:?}{hint}")
            }
        });
        let errno = errno.map_err(fail)?;
        let probability = parts.get(1).ok_or_else(|| {
            fail(format!(
                "missing probability (write it as {target}={}:100%)",
                errno.name
            ))
        })?;
        (
            Action::Deny {
                errno: errno.number,
            },
            *probability,
            &parts[2..],
        )
    };
    let probability = parse_probability(probability).map_err(|e| fail(e.to_string()))?;
    if extra.len() > 2 {
        return Err(fail(
            "too many ':' parts (after the probability come at most a path glob and a trigger)"
                .into(),
        ));
    }
    let mut path = None;
    let mut trigger = None;
    for part in extra {
        if part.contains('=') {
            if trigger
                .replace(parse_trigger(part).map_err(|e| fail(e.to_string()))?)
                .is_some()
            {
                return Err(fail(
                    "more than one trigger (use either nth=N or after=N)".into(),
                ));
            }
        } else if part.is_empty() {
            return Err(fail("empty part after ':'".into()));
        } else if !looks_like_path(part) {
            // A misspelled trigger must not become a glob that matches
            // nothing and silently never fires.
            let hint = errno::closest(part, ["nth", "after"])
                .map(|k| format!("; did you mean {k}=N?"))
                .unwrap_or_default();
            return Err(fail(format!(
                "{part:?} is neither a trigger (nth=N, after=N) nor a path glob (a glob starts with /, * or ., or names a file such as app.log){hint}"
            )));
        } else if path.replace(part.to_string()).is_some() {
            return Err(fail(format!(
                "{part:?} is neither a trigger (nth=N, after=N) nor the only path glob"
            )));
        }
    }
    let rule = Rule {
        id: RuleId::from(spec),
        syscalls,
        action,
        probability,
        path,
        trigger: trigger.unwrap_or_default(),
        label: None,
    };
    rule.validate(arch).map_err(|e| fail(e.reason()))?;
    Ok(rule)
}

/// Whether a rule part can be a path glob: absolute, a pattern, relative
/// to here, or a file name.
fn looks_like_path(part: &str) -> bool {
    part.starts_with(['/', '*', '.']) || part.contains(['/', '.'])
}

/// `nth=N` or `after=N`, exactly: lower-case key, no spaces, no sign.
pub fn parse_trigger(part: &str) -> Result<Trigger, ValueError> {
    let (key, value) = part.split_once('=').unwrap_or((part, ""));
    let invalid = |reason: String| ValueError::InvalidTrigger {
        text: part.to_string(),
        reason,
    };
    if key != "nth" && key != "after" {
        let lower = key.trim().to_ascii_lowercase();
        let hint = if lower == "nth" || lower == "after" {
            format!(" (did you mean {lower}={}?)", value.trim())
        } else {
            errno::closest(&lower, ["nth", "after"])
                .map(|k| format!(" (did you mean {k}={}?)", value.trim()))
                .unwrap_or_else(|| " (triggers are nth=N and after=N)".into())
        };
        return Err(ValueError::UnknownTrigger {
            text: part.to_string(),
            hint,
        });
    }
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        let plain = value.trim().trim_start_matches('+');
        let hint = if !plain.is_empty() && plain.bytes().all(|b| b.is_ascii_digit()) {
            format!(" (write {key}={plain})")
        } else {
            format!(" ({key} takes a whole number, for example {key}=3)")
        };
        return Err(invalid(hint));
    }
    let n: u64 = value
        .parse()
        .map_err(|_| invalid(format!(": {value} is too large")))?;
    match key {
        "nth" if n == 0 => Err(invalid(
            ": nth counts calls from 1, so use nth=1 for the first call".into(),
        )),
        "nth" => Ok(Trigger::Nth(n)),
        _ => Ok(Trigger::After(n)),
    }
}

/// The longest delay written without hours, and the longest at all: a
/// longer hold is a typo (a missing unit, an extra digit), and an
/// enormous one would leave a target hanging for good.
const MAX_DELAY_UNLESS_HOURS: u64 = 3_600_000_000_000;
const MAX_DELAY: u64 = 24 * 3_600_000_000_000;

/// Parses a fault's delay: a duration of at most an hour, or at most a
/// day when written in hours (`2h`).
pub fn parse_delay(text: &str) -> Result<u64, ValueError> {
    let ns = parse_duration(text)?;
    let too_long = |limit, advice| ValueError::DelayTooLong {
        text: text.to_string(),
        limit,
        advice,
    };
    if ns > MAX_DELAY {
        return Err(too_long(
            "a day",
            "a fault that holds a call that long is refused",
        ));
    }
    if ns > MAX_DELAY_UNLESS_HOURS && !text.contains('h') {
        return Err(too_long(
            "an hour",
            "write it in hours (for example 2h) if that is meant",
        ));
    }
    Ok(ns)
}

/// Parses a probability into a fraction of 1, with one reading
/// everywhere (`--fault`, `deny()`, protocol rules): `30%` is a
/// percentage (0 to 100), `0.3` a fraction (0 to 1). Plain decimal digits
/// only: no sign, no exponent. A bare number above 1 is refused rather
/// than guessed to be a percentage.
pub fn parse_probability(text: &str) -> Result<f64, ValueError> {
    let t = text.trim();
    let (number, percent) = match t.strip_suffix('%') {
        Some(n) => (n, true),
        None => (t, false),
    };
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    let plain = match number.split_once('.') {
        Some((int, frac)) => digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty()),
        None => !number.is_empty() && digits(number),
    };
    let value: f64 = match number.parse() {
        Ok(v) if plain => v,
        _ => {
            return Err(ValueError::Probability {
                text: text.to_string(),
            });
        }
    };
    match (percent, value) {
        (true, v) if v <= 100.0 => Ok(v / 100.0),
        (true, _) => Err(ValueError::PercentOutOfRange {
            text: text.to_string(),
        }),
        (false, v) if v <= 1.0 => Ok(v),
        (false, _) => Err(ValueError::BareNumberAboveOne {
            text: text.to_string(),
            number: number.to_string(),
        }),
    }
}

/// Parses a Go-style duration (`500us`, `200ms`, `1.5s`, `1m30s`) into nanoseconds.
pub fn parse_duration(text: &str) -> Result<u64, ValueError> {
    let bad = || ValueError::Duration {
        text: text.to_string(),
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    if total > u64::MAX as f64 / 2.0 {
        return Err(ValueError::DurationTooLong {
            text: text.to_string(),
        });
    }
    Ok(total.round() as u64)
}

/// Formats a duration the way users write it: `500µs`, `200ms`, `1.5s`.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    let trim = |v: f64| {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    if ns == 0 {
        "0s".to_string()
    } else if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{}µs", trim(ns as f64 / 1e3))
    } else if ns < 1_000_000_000 {
        format!("{}ms", trim(ns as f64 / 1e6))
    } else {
        format!("{}s", trim(ns as f64 / 1e9))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X86: Arch = Arch::X86_64;

    fn err(spec: &str) -> String {
        match parse_fault(spec, X86) {
            Ok(rule) => panic!("{spec} parsed as {rule:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn deny_rule_with_every_optional_part() {
        let rule = parse_fault("openat=ENOENT:100%:/data/*:nth=3", X86).expect("valid");
        assert_eq!(rule.syscalls, vec!["openat"]);
        assert_eq!(
            rule.action,
            Action::Deny {
                errno: libc::ENOENT
            }
        );
        assert_eq!(rule.probability, 1.0);
        assert_eq!(rule.path.as_deref(), Some("/data/*"));
        assert_eq!(rule.trigger, Trigger::Nth(3));
    }

    #[test]
    fn errno_is_case_insensitive_and_a_probability_is_a_percentage_or_a_fraction() {
        let rule = parse_fault("write=eio:20%", X86).expect("valid");
        assert_eq!(rule.action, Action::Deny { errno: libc::EIO });
        assert!((rule.probability - 0.2).abs() < 1e-9);
        let rule = parse_fault("write=EIO:0.2", X86).expect("valid");
        assert!((rule.probability - 0.2).abs() < 1e-9);
        assert_eq!(parse_probability("1").expect("one"), 1.0);
        assert_eq!(parse_probability(".5").expect("fraction"), 0.5);
        assert_eq!(parse_probability("12.5%").expect("percent"), 0.125);
    }

    #[test]
    fn probabilities_outside_the_plain_grammar_are_refused() {
        let e = parse_probability("20").expect_err("bare 20").to_string();
        assert!(e.contains("write \"20%\""), "{e}");
        for bad in [
            "1e2%", "1e-400%", "+50%", "-0%", "50 %", "0x10%", ".%", "", "%", "inf", "NaN%",
            "101%", "1.5",
        ] {
            assert!(parse_probability(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn delay_rules_take_a_duration_and_optional_path_and_trigger() {
        let rule = parse_fault("connect=delay:200ms:100%", X86).expect("valid");
        assert_eq!(rule.action, Action::Delay { ns: 200_000_000 });
        let rule = parse_fault("openat=delay:100ms:100%:/data/*", X86).expect("valid");
        assert_eq!(rule.path.as_deref(), Some("/data/*"));
        let rule = parse_fault("sendto=delay:50ms:20%:after=2", X86).expect("valid");
        assert_eq!(rule.trigger, Trigger::After(2));
    }

    #[test]
    fn after_trigger_without_path() {
        let rule = parse_fault("fsync=EIO:100%:after=2", X86).expect("valid");
        assert_eq!(rule.trigger, Trigger::After(2));
        assert_eq!(rule.path, None);
        assert!(!rule.trigger.allows(2) && rule.trigger.allows(3));
    }

    #[test]
    fn malformed_rules_name_the_problem_and_a_fix() {
        assert_eq!(
            err("openat=EIOO:100%"),
            r#"--fault "openat=EIOO:100%": unknown errno "EIOO" (did you mean EIO?)"#
        );
        assert_eq!(
            err("write=EIO:150%"),
            r#"--fault "write=EIO:150%": probability "150%" is out of range (outside 0%..100%)"#
        );
        assert!(err("fsync=EIO:100%:nth=0").contains("nth counts calls from 1"));
        assert!(err("connect=delay:fast:100%").contains(r#"invalid duration "fast""#));
        assert!(
            err("opnat=EIO:100%").contains(r#"unknown syscall "opnat" (did you mean openat?)"#)
        );
        assert!(err("openat").contains("missing '='"));
        assert!(
            err("openat=ENOENT").contains("missing probability (write it as openat=ENOENT:100%)")
        );
        assert!(err("getpid=EPERM:100%:/data/*").contains("has no path"));
        assert!(err("openat=ENOENT:100%:/a:/b").contains("neither a trigger"));
        assert!(err("openat=ENOENT:100%:nth=1:after=2").contains("more than one trigger"));
        assert!(err("openat=ENOENT:100%:nth=x").contains("whole number"));
        assert!(err("openat=ENOENT:abc%").contains("invalid probability"));
    }

    #[test]
    fn triggers_and_globs_outside_the_grammar_are_refused_with_a_suggestion() {
        let err = |spec: &str| parse_fault(spec, X86).expect_err(spec).to_string();
        assert!(err("openat=ENOENT:100%:NTH=1").contains("did you mean nth=1?"));
        assert!(err("openat=ENOENT:100%:nth =1").contains("did you mean nth=1?"));
        assert!(err("openat=ENOENT:100%:nth=+1").contains("(write nth=1)"));
        assert!(err("openat=ENOENT:100%:nth= 3").contains("(write nth=3)"));
        assert!(err("openat=ENOENT:100%:first=1").contains("triggers are nth=N and after=N"));
        assert!(err("openat=ENOENT:100%:after").contains("did you mean after=N?"));
        assert!(err("openat=ENOENT:100%:data").contains("nor a path glob"));
        for ok in [
            "openat=ENOENT:100%:/data/*",
            "openat=ENOENT:100%:*.wal",
            "openat=ENOENT:100%:./x",
            "openat=ENOENT:100%:app.log:nth=2",
        ] {
            parse_fault(ok, X86).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn delays_are_bounded() {
        assert!(
            parse_delay("90m")
                .expect_err("90m")
                .to_string()
                .contains("write it in hours")
        );
        assert_eq!(parse_delay("2h"), Ok(7_200_000_000_000));
        assert!(
            parse_delay("25h")
                .expect_err("25h")
                .to_string()
                .contains("longer than a day")
        );
        assert!(parse_delay("9223372036854775807ns").is_err());
        assert!(parse_delay("9223372036854775808ns").is_err());
        assert_eq!(parse_delay("500ms"), Ok(500_000_000));
    }

    #[test]
    fn fs_fault_maps_operations_to_syscalls() {
        let rule = parse_fs_fault("write=EIO:10%", X86).expect("valid");
        assert_eq!(rule.syscalls, vec!["write", "writev"]);
        let rule = parse_fs_fault("sync=EIO:100%:after=2", X86).expect("valid");
        assert_eq!(rule.syscalls, vec!["fsync", "fdatasync"]);
        let rule = parse_fs_fault("stat=ENOENT:100%", X86).expect("valid");
        assert!(rule.syscalls.contains(&"newfstatat".to_string()));
        let e = parse_fs_fault("wirte=EIO:1%", X86).expect_err("unknown op");
        assert!(e.to_string().contains("did you mean write?"), "{e}");
    }

    #[test]
    fn fstatat_alias_is_accepted_on_x86_64() {
        let rule = parse_fault("fstatat=ENOENT:100%", X86).expect("valid");
        assert_eq!(rule.validate(X86), Ok(vec![262]));
    }

    #[test]
    fn durations_follow_go_syntax() {
        assert_eq!(parse_duration("500us"), Ok(500_000));
        assert_eq!(parse_duration("500µs"), Ok(500_000));
        assert_eq!(parse_duration("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_duration("1m30s"), Ok(90_000_000_000));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ms").is_err());
        assert_eq!(format_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
    }

    #[test]
    fn rules_round_trip_through_json() {
        let rule = parse_fault("openat=ENOENT:50%:/data/*:nth=2", X86).expect("valid");
        let json = serde_json::to_string(&rule).expect("serialize");
        let back: Rule = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, rule);
    }
}
