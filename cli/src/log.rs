//! The one `tracing` subscriber: every log line of a session, from the CLI
//! or a library, in the two documented formats. Coloured console lines
//! (`HH:MM:SS.mmm LVL [component] msg key=value`) and JSON lines with
//! `time, level, msg, component, session_id` plus the event's fields.
//!
//! Only Faultbox's own crates log here; hyper, h2 and the like emit
//! `tracing` events of their own that a user did not ask for.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Coloured, human-readable lines.
    Console,
    /// One JSON object per line.
    Json,
}

/// Installs the session's subscriber: `format` (auto-detected from stderr
/// when `None`), DEBUG and up with `debug`, INFO and up otherwise.
pub fn init(format: Option<LogFormat>, debug: bool, session_id: String) {
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Console
    } else {
        LogFormat::Json
    });
    let layer = SessionLog {
        format,
        max: if debug { Level::DEBUG } else { Level::INFO },
        session_id,
        write: to_stderr,
    };
    // A second init (there is none in the CLI) keeps the first subscriber.
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer));
}

struct SessionLog {
    format: LogFormat,
    max: Level,
    session_id: String,
    write: fn(&str),
}

fn to_stderr(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// The documented component of an event: the proxies log as `proxy`,
/// everything else as `engine`.
fn component(target: &str) -> &'static str {
    if target.starts_with("faultbox_proxy") {
        "proxy"
    } else {
        "engine"
    }
}

impl<S: Subscriber> Layer<S> for SessionLog {
    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        // tracing orders levels by verbosity: TRACE is the greatest.
        *metadata.level() <= self.max && metadata.target().starts_with("faultbox")
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let line = self.format_line(
            *meta.level(),
            component(meta.target()),
            &fields.message,
            &fields.values,
        );
        (self.write)(&line);
    }
}

/// An event's message and fields, in the order they were written.
#[derive(Default)]
struct Fields {
    message: String,
    values: Vec<(&'static str, Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.message = match value {
                Value::String(s) => s,
                other => other.to_string(),
            };
        } else {
            self.values.push((field.name(), value));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::from(format!("{value:?}")));
    }
}

impl SessionLog {
    fn format_line(
        &self,
        level: Level,
        component: &str,
        msg: &str,
        fields: &[(&str, Value)],
    ) -> String {
        let (secs, nanos) = now();
        match self.format {
            LogFormat::Json => {
                let mut obj = Map::new();
                obj.insert("time".into(), Value::String(iso8601(secs, nanos)));
                obj.insert("level".into(), Value::String(level.as_str().into()));
                obj.insert("msg".into(), Value::String(msg.into()));
                obj.insert("component".into(), Value::String(component.into()));
                obj.insert("session_id".into(), Value::String(self.session_id.clone()));
                for (k, v) in fields {
                    obj.insert((*k).to_string(), v.clone());
                }
                Value::Object(obj).to_string()
            }
            LogFormat::Console => {
                let (short, color) = match level {
                    Level::ERROR => ("ERR", "\x1b[31m"),
                    Level::WARN => ("WRN", "\x1b[33m"),
                    Level::INFO => ("INF", "\x1b[32m"),
                    _ => ("DBG", "\x1b[90m"),
                };
                let mut line = format!(
                    "{} {color}{short}\x1b[0m \x1b[36m[{component}]\x1b[0m {msg}",
                    clock(secs, nanos)
                );
                for (k, v) in fields {
                    let v = match v {
                        Value::String(s) if !s.contains(' ') && !s.is_empty() => s.clone(),
                        other => other.to_string(),
                    };
                    let _ = write!(line, " \x1b[90m{k}=\x1b[0m{v}");
                }
                line
            }
        }
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

    thread_local! {
        static LINES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn capture(line: &str) {
        LINES.with(|l| l.borrow_mut().push(line.to_string()));
    }

    fn logged(format: LogFormat, debug: bool, body: impl FnOnce()) -> Vec<String> {
        let layer = SessionLog {
            format,
            max: if debug { Level::DEBUG } else { Level::INFO },
            session_id: "00000000000000ab".into(),
            write: capture,
        };
        LINES.with(|l| l.borrow_mut().clear());
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), body);
        LINES.with(|l| l.borrow().clone())
    }

    #[test]
    fn json_lines_carry_the_documented_fields_with_their_types() {
        let lines = logged(LogFormat::Json, false, || {
            tracing::info!(
                state = "stopped",
                exit_code = 3,
                duration = 12u64,
                "session completed"
            );
            tracing::debug!(state = "running", "hidden without --debug");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let v: Value = serde_json::from_str(&lines[0]).expect("json");
        assert_eq!(v["msg"], "session completed");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["component"], "engine");
        assert_eq!(v["session_id"], "00000000000000ab");
        assert_eq!(v["state"], "stopped");
        assert_eq!(v["exit_code"], 3);
        assert_eq!(v["duration"], 12);
        let time = v["time"].as_str().expect("time");
        assert!(time.ends_with('Z') && time.len() == 30, "{time}");
    }

    #[test]
    fn debug_shows_debug_events_and_optional_fields_only_when_set() {
        let lines = logged(LogFormat::Json, true, || {
            let none: Option<&str> = None;
            tracing::debug!(
                name = "openat",
                path = none,
                seq = 1u64,
                "syscall intercepted"
            );
        });
        let v: Value = serde_json::from_str(&lines[0]).expect("json");
        assert_eq!(v["level"], "DEBUG");
        assert_eq!(v["name"], "openat");
        assert!(v.get("path").is_none(), "{v}");
    }

    #[test]
    fn console_lines_are_clock_level_component_message_fields() {
        let lines = logged(LogFormat::Console, false, || {
            tracing::warn!(
                exit_code = 1,
                error = "two words",
                "target exited with error"
            );
        });
        let line = &lines[0];
        let plain: String = {
            // Without the colour escapes.
            let mut out = String::new();
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                if c == '\x1b' {
                    for c in chars.by_ref() {
                        if c == 'm' {
                            break;
                        }
                    }
                } else {
                    out.push(c);
                }
            }
            out
        };
        let (clock, rest) = plain.split_at(12);
        assert!(
            clock.as_bytes()[2] == b':' && clock.as_bytes()[8] == b'.',
            "{plain}"
        );
        assert_eq!(
            rest,
            " WRN [engine] target exited with error exit_code=1 error=\"two words\""
        );
    }

    #[test]
    fn other_crates_events_are_not_logged() {
        let lines = logged(LogFormat::Json, true, || {
            tracing::info!(target: "h2::codec", "frame received");
            tracing::info!(target: "faultbox_proxy::server", "upstream unreachable");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("\"component\":\"proxy\""), "{}", lines[0]);
    }

    #[test]
    fn console_clock_has_milliseconds() {
        assert_eq!(clock(3_723, 45_000_000), "01:02:03.045");
    }
}
