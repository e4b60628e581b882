//! Load-only validation: what `faultbox check` reports and what the
//! operator refuses a FaultTest for. A spec is checked by loading it
//! exactly as a run would, then looking at what it declares.

use std::path::Path;

use crate::load::{Spec, SpecError, load, select_tests};

/// How bad a finding is: an error means a run would refuse the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// A run would refuse the spec.
    Error,
    /// The spec runs, but probably not as meant.
    Warning,
}

/// One thing `check` found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// Error or warning.
    pub level: Level,
    /// A stable code: `SPEC_SYNTAX`, `SPEC_LOAD_FAILED`,
    /// `SPEC_TOPOLOGY`, `SPEC_PROTOCOL_RULE`, `NO_TESTS_DISCOVERED`,
    /// `NO_MATCHING_TEST`.
    pub code: &'static str,
    /// What is wrong, naming the place.
    pub message: String,
}

/// The spec (when it loads) and what is wrong with it. `filter` is a
/// `--test` selection, which must match a test.
pub fn check(path: &Path, filter: Option<&str>) -> (Option<Spec>, Vec<Finding>) {
    let spec = match load(path) {
        Ok(s) => s,
        Err(e) => {
            let code = match &e {
                SpecError::Invalid { message } if is_syntax(message) => "SPEC_SYNTAX",
                SpecError::Topology(_) => "SPEC_TOPOLOGY",
                SpecError::ProtocolRule { .. } => "SPEC_PROTOCOL_RULE",
                _ => "SPEC_LOAD_FAILED",
            };
            return (
                None,
                vec![Finding {
                    level: Level::Error,
                    code,
                    message: e.to_string(),
                }],
            );
        }
    };
    let mut findings = Vec::new();
    if spec.tests.is_empty() {
        findings.push(Finding {
            level: Level::Warning,
            code: "NO_TESTS_DISCOVERED",
            message: "the spec defines no test_* function".into(),
        });
    } else if let Some(f) = filter
        && select_tests(&spec.tests, f).is_empty()
    {
        findings.push(Finding {
            level: Level::Error,
            code: "NO_MATCHING_TEST",
            message: crate::load::test_filter_error(f).unwrap_or_else(|| {
                format!(
                    "{f:?} matches none of the spec's tests ({})",
                    spec.tests.join(", ")
                )
            }),
        });
    }
    (Some(spec), findings)
}

/// Whether Starlark's message is about the text rather than its meaning.
fn is_syntax(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("parse error") || m.contains("unexpected") || m.contains("syntax error")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fb-check-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("spec.star");
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn findings_have_codes_and_levels() {
        let ok = write("ok", "def test_a():\n    pass\n");
        assert_eq!(check(&ok, None).1, vec![]);
        assert_eq!(check(&ok, Some("a")).1, vec![]);
        let none = check(&ok, Some("zzz")).1;
        assert_eq!(
            (none[0].level, none[0].code),
            (Level::Error, "NO_MATCHING_TEST")
        );
        assert!(none[0].message.contains("test_a"), "{none:?}");
        let empty = write("empty", "x = 1\n");
        let f = check(&empty, None).1;
        assert_eq!(
            (f[0].level, f[0].code),
            (Level::Warning, "NO_TESTS_DISCOVERED")
        );
        let syntax = write("syntax", "def test_a(:\n    pass\n");
        let f = check(&syntax, None).1;
        assert_eq!(
            (f[0].level, f[0].code),
            (Level::Error, "SPEC_SYNTAX"),
            "{f:?}"
        );
        assert!(f[0].message.contains("spec.star:1:"), "{f:?}");
        let bad = write("bad", "service(\"a\", \"/bin/true\", bogus = 1)\n");
        let f = check(&bad, None).1;
        assert_eq!(
            (f[0].level, f[0].code),
            (Level::Error, "SPEC_LOAD_FAILED"),
            "{f:?}"
        );
        assert!(f[0].message.contains("bogus"), "{f:?}");
    }
}
