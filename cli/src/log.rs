//! Session logs in the two documented formats: coloured console lines
//! (`HH:MM:SS.mmm LVL [component] msg key=value`) and JSON lines with
//! `time, level, msg, component, session_id` plus event fields.

use std::io::{IsTerminal, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use serde_json::{Map, Value};

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Coloured, human-readable lines.
    Console,
    /// One JSON object per line.
    Json,
}

/// Log severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }

    fn short(self) -> (&'static str, &'static str) {
        match self {
            Level::Debug => ("DBG", "\x1b[90m"),
            Level::Info => ("INF", "\x1b[32m"),
            Level::Warn => ("WRN", "\x1b[33m"),
            Level::Error => ("ERR", "\x1b[31m"),
        }
    }
}

/// Writes session logs to stderr.
pub struct Logger {
    format: LogFormat,
    min: Level,
    session_id: String,
}

impl Logger {
    /// A logger in `format` (auto-detected from stderr when `None`).
    pub fn new(format: Option<LogFormat>, debug: bool, session_id: String) -> Logger {
        let format = format.unwrap_or(if std::io::stderr().is_terminal() {
            LogFormat::Console
        } else {
            LogFormat::Json
        });
        Logger {
            format,
            min: if debug { Level::Debug } else { Level::Info },
            session_id,
        }
    }

    /// Logs `msg` with `fields` at `level`.
    pub fn log(&self, level: Level, msg: &str, fields: &[(&str, Value)]) {
        if level < self.min {
            return;
        }
        let (secs, nanos) = now();
        let line = match self.format {
            LogFormat::Json => {
                let mut obj = Map::new();
                obj.insert("time".into(), Value::String(iso8601(secs, nanos)));
                obj.insert("level".into(), Value::String(level.name().into()));
                obj.insert("msg".into(), Value::String(msg.into()));
                obj.insert("component".into(), Value::String("engine".into()));
                obj.insert("session_id".into(), Value::String(self.session_id.clone()));
                for (k, v) in fields {
                    obj.insert((*k).to_string(), v.clone());
                }
                Value::Object(obj).to_string()
            }
            LogFormat::Console => {
                let (short, color) = level.short();
                let mut line = format!(
                    "{} {color}{short}\x1b[0m \x1b[36m[engine]\x1b[0m {msg}",
                    clock(secs, nanos)
                );
                for (k, v) in fields {
                    let v = match v {
                        Value::String(s) if !s.contains(' ') && !s.is_empty() => s.clone(),
                        other => other.to_string(),
                    };
                    line.push_str(&format!(" \x1b[90m{k}=\x1b[0m{v}"));
                }
                line
            }
        };
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    }
}

fn now() -> (u64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

/// `HH:MM:SS.mmm`, UTC.
fn clock(secs: u64, nanos: u32) -> String {
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        nanos / 1_000_000
    )
}

/// RFC 3339 with nanoseconds, UTC.
pub fn iso8601(secs: u64, nanos: u32) -> String {
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{}{:09}Z", &clock(secs, 0)[..9], nanos)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_with_nanoseconds() {
        assert_eq!(iso8601(0, 5), "1970-01-01T00:00:00.000000005Z");
        assert_eq!(
            iso8601(1_795_000_000, 123_456_789),
            "2026-11-18T11:06:40.123456789Z"
        );
        assert_eq!(iso8601(951_782_400, 0), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn console_clock_has_milliseconds() {
        assert_eq!(clock(3_723, 45_000_000), "01:02:03.045");
    }
}
