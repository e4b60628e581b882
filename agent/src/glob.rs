//! Path globs for rules that target files.
//!
//! The dialect:
//! - `*` matches any run of characters inside one path segment (never `/`);
//! - `**` matches any run of characters, `/` included; `a/**/b` also
//!   matches `a/b`, and a trailing `/**` also matches the directory itself;
//! - `?` matches one character other than `/`;
//! - `[abc]`, `[a-z]`, `[!abc]` / `[^abc]` match one character of a class;
//! - `\x` matches `x` literally;
//! - a pattern with no `/` matches the file name (`*.wal` matches
//!   `/var/db/0001.wal`); a pattern with a `/` matches the whole path.

use std::fmt;

use thiserror::Error;

/// A compiled path glob.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    tokens: Vec<Token>,
    basename_only: bool,
    /// The literal characters every match starts with: most subjects
    /// (paths a target opens, requests a proxy sees) fail here without
    /// the allocations of the full match.
    prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    AnyChar,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    Star,
    DoubleStar,
    /// `/**/`: a `/`, then any number of whole segments each ending in `/`.
    Dirs,
    /// A trailing `/**`: nothing, or `/` followed by anything.
    TrailingDirs,
}

/// Why a glob could not be compiled.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum GlobError {
    /// The pattern is empty.
    #[error("path glob is empty")]
    Empty,
    /// A `[` class is never closed.
    #[error("path glob {pattern:?} has an unclosed '['")]
    UnclosedClass {
        /// The pattern.
        pattern: String,
    },
    /// The pattern ends in a lone backslash.
    #[error("path glob {pattern:?} ends with a lone '\\'")]
    TrailingEscape {
        /// The pattern.
        pattern: String,
    },
    /// Longer than any path (PATH_MAX): matching recurses once per
    /// character, on the shim's notification thread.
    #[error("path glob is {len} characters long; a path has at most {PATH_MAX}")]
    TooLong {
        /// Its length in characters.
        len: usize,
    },
}

/// The longest path Linux takes, and so the longest useful glob.
const PATH_MAX: usize = 4096;

impl Glob {
    /// Compiles `pattern`.
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        let chars: Vec<char> = pattern.chars().collect();
        if chars.len() > PATH_MAX {
            return Err(GlobError::TooLong { len: chars.len() });
        }
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            match c {
                '*' if chars.get(i + 1) == Some(&'*') => {
                    let after = chars.get(i + 2);
                    let slash_before = tokens.last() == Some(&Token::Char('/'));
                    if slash_before && after == Some(&'/') {
                        tokens.pop();
                        tokens.push(Token::Dirs);
                        i += 3;
                    } else if slash_before && after.is_none() {
                        tokens.pop();
                        tokens.push(Token::TrailingDirs);
                        i += 2;
                    } else {
                        tokens.push(Token::DoubleStar);
                        i += 2;
                    }
                    while chars.get(i) == Some(&'*') {
                        i += 1;
                    }
                    continue;
                }
                '*' => tokens.push(Token::Star),
                '?' => tokens.push(Token::AnyChar),
                '\\' => {
                    let Some(&next) = chars.get(i + 1) else {
                        return Err(GlobError::TrailingEscape {
                            pattern: pattern.to_string(),
                        });
                    };
                    tokens.push(Token::Char(next));
                    i += 1;
                }
                '[' => {
                    let (token, end) =
                        parse_class(&chars, i).ok_or_else(|| GlobError::UnclosedClass {
                            pattern: pattern.to_string(),
                        })?;
                    tokens.push(token);
                    i = end;
                }
                other => tokens.push(Token::Char(other)),
            }
            i += 1;
        }
        let prefix = tokens
            .iter()
            .map_while(|t| match t {
                Token::Char(c) => Some(*c),
                _ => None,
            })
            .collect();
        Ok(Glob {
            source: pattern.to_string(),
            tokens,
            basename_only: !pattern.contains('/'),
            prefix,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        let subject = if self.basename_only {
            path.rsplit('/').next().unwrap_or(path)
        } else {
            path
        };
        // Longer than the kernel takes: no file has that path, and the
        // match below recurses per character.
        if !subject.starts_with(&self.prefix) || subject.len() > PATH_MAX {
            return false;
        }
        let text: Vec<char> = subject.chars().collect();
        let mut memo = vec![None; (self.tokens.len() + 1) * (text.len() + 1)];
        self.match_from(0, 0, &text, &mut memo)
    }

    fn match_from(&self, t: usize, s: usize, text: &[char], memo: &mut [Option<bool>]) -> bool {
        let key = t * (text.len() + 1) + s;
        if let Some(known) = memo[key] {
            return known;
        }
        let result = match self.tokens.get(t) {
            None => s == text.len(),
            Some(token) => match token {
                Token::Char(c) => {
                    text.get(s) == Some(c) && self.match_from(t + 1, s + 1, text, memo)
                }
                Token::AnyChar => {
                    matches!(text.get(s), Some(c) if *c != '/')
                        && self.match_from(t + 1, s + 1, text, memo)
                }
                Token::Class { negated, ranges } => match text.get(s) {
                    Some(&c) if c != '/' => {
                        let inside = ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c));
                        inside != *negated && self.match_from(t + 1, s + 1, text, memo)
                    }
                    _ => false,
                },
                Token::Star => {
                    let mut end = s;
                    loop {
                        if self.match_from(t + 1, end, text, memo) {
                            break true;
                        }
                        if end == text.len() || text[end] == '/' {
                            break false;
                        }
                        end += 1;
                    }
                }
                Token::DoubleStar => {
                    (s..=text.len()).any(|end| self.match_from(t + 1, end, text, memo))
                }
                Token::Dirs => {
                    text.get(s) == Some(&'/')
                        && (s..text.len())
                            .filter(|&i| text[i] == '/')
                            .any(|i| self.match_from(t + 1, i + 1, text, memo))
                }
                Token::TrailingDirs => s == text.len() || text.get(s) == Some(&'/'),
            },
        };
        memo[key] = Some(result);
        result
    }
}

fn parse_class(chars: &[char], open: usize) -> Option<(Token, usize)> {
    let mut i = open + 1;
    let negated = matches!(chars.get(i), Some('!') | Some('^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = *chars.get(i)?;
        if c == ']' && !first {
            return Some((Token::Class { negated, ranges }, i));
        }
        first = false;
        let lo = if c == '\\' {
            i += 1;
            *chars.get(i)?
        } else {
            c
        };
        if chars.get(i + 1) == Some(&'-') && chars.get(i + 2).is_some_and(|c| *c != ']') {
            let hi = *chars.get(i + 2)?;
            ranges.push((lo, hi));
            i += 3;
        } else {
            ranges.push((lo, lo));
            i += 1;
        }
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Shell-style match of a whole string: `*` any run (slashes included),
/// `?` one character. Filter values are mostly decisions and paths, where
/// "deny*" or "*.wal" should just work.
pub fn wildcard(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_prefix_suffix_and_middle() {
        assert!(wildcard("deny*", "deny(input/output error)"));
        assert!(wildcard("*.wal", "/tmp/x/inventory.wal"));
        assert!(wildcard("/tmp/*/x", "/tmp/a/b/x"));
        assert!(!wildcard("write", "writev"));
        assert!(wildcard("", ""));
        assert!(!wildcard("", "x"));
    }

    fn m(pattern: &str, path: &str) -> bool {
        Glob::new(pattern).map(|g| g.matches(path)).unwrap_or(false)
    }

    #[test]
    fn single_star_stays_inside_a_segment() {
        assert!(m("/data/*", "/data/file"));
        assert!(!m("/data/*", "/data/sub/file"));
        assert!(!m("/data/*", "/data"));
        assert!(m("/tmp/test-*", "/tmp/test-123"));
        assert!(!m("/tmp/test-*", "/tmp/other"));
        assert!(m("/a/*/c", "/a/b/c"));
        assert!(!m("/a/*/c", "/a/b/x/c"));
    }

    #[test]
    fn double_star_crosses_segments() {
        assert!(m("/data/**", "/data/sub/file"));
        assert!(m("/data/**", "/data"));
        assert!(m("/data/**", "/data/x"));
        assert!(!m("/data/**", "/database"));
        assert!(m("/a/**/b", "/a/b"));
        assert!(m("/a/**/b", "/a/x/y/b"));
        assert!(!m("/a/**/b", "/a/xb"));
        assert!(m("/var/**.wal", "/var/lib/db/0001.wal"));
    }

    #[test]
    fn pattern_without_slash_matches_the_file_name() {
        assert!(m("*.wal", "/var/lib/inventory.wal"));
        assert!(m("*.wal", "inventory.wal"));
        assert!(!m("*.wal", "/var/lib/inventory.wal.tmp"));
        assert!(!m("*.wal", "/var/x.wal/other"));
    }

    #[test]
    fn classes_question_marks_and_escapes() {
        assert!(m("/d/file[0-9]", "/d/file7"));
        assert!(!m("/d/file[0-9]", "/d/filex"));
        assert!(m("/d/file[!0-9]", "/d/filex"));
        assert!(m("/d/file[^0-9]", "/d/filex"));
        assert!(m("/d/?.log", "/d/a.log"));
        assert!(!m("/d/?.log", "/d/ab.log"));
        assert!(!m("/d?x", "/d/x"));
        assert!(m("/d/\\*", "/d/*"));
        assert!(!m("/d/\\*", "/d/a"));
        assert!(m("/d/[]]", "/d/]"));
    }

    #[test]
    fn malformed_patterns_are_errors() {
        assert_eq!(Glob::new(""), Err(GlobError::Empty));
        assert!(matches!(
            Glob::new("/d/[abc"),
            Err(GlobError::UnclosedClass { .. })
        ));
        assert!(matches!(
            Glob::new("/d/\\"),
            Err(GlobError::TrailingEscape { .. })
        ));
    }

    #[test]
    fn pathological_patterns_finish_quickly() {
        let pattern = "/**a**a**a**a**a**a**a**b";
        let path = format!("/{}", "a".repeat(200));
        assert!(!m(pattern, &path));
    }

    #[test]
    fn a_glob_longer_than_any_path_is_refused_and_long_paths_never_match() {
        let long = "a".repeat(5000);
        assert_eq!(Glob::new(&long), Err(GlobError::TooLong { len: 5000 }));
        let g = Glob::new("/data/**").expect("glob");
        assert!(g.matches("/data/x"));
        assert!(!g.matches(&format!("/data/{}", "x".repeat(5000))));
    }
}
