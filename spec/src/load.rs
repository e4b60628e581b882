//! Loading a spec: parse and evaluate the `.star` file (and what it
//! `load()`s), collect the topology, discover the tests, and work out the
//! syscall filter every service needs.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use faultbox_agent::process::{ExitStatus, SharedPage};

use faultbox_agent::syscalls::{self, Arch};
use starlark::codemap::FileSpanRef;
use starlark::environment::{FrozenModule, Globals, GlobalsBuilder, LibraryExtension, Module};
use starlark::eval::{BeforeStmtFunc, BeforeStmtFuncDyn, Evaluator, FileLoader};
use starlark::syntax::{AstModule, Dialect};

use crate::builtins;
use crate::host::TestHost;
use crate::model::ServiceDef;
use crate::values::Ctx;

/// Modules embedded in the binary, loaded with `load("@faultbox/...")`.
pub const STDLIB: &[(&str, &str)] = &[
    (
        "@faultbox/discovery/k8s.star",
        include_str!("../stdlib/discovery/k8s.star"),
    ),
    (
        "@faultbox/recipes/http.star",
        include_str!("../stdlib/recipes/http.star"),
    ),
    (
        "@faultbox/recipes/grpc.star",
        include_str!("../stdlib/recipes/grpc.star"),
    ),
    (
        "@faultbox/recipes/redis.star",
        include_str!("../stdlib/recipes/redis.star"),
    ),
    (
        "@faultbox/recipes/postgres.star",
        include_str!("../stdlib/recipes/postgres.star"),
    ),
    (
        "@faultbox/recipes/mysql.star",
        include_str!("../stdlib/recipes/mysql.star"),
    ),
    (
        "@faultbox/recipes/memcached.star",
        include_str!("../stdlib/recipes/memcached.star"),
    ),
];

/// One named failure of the recipe library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// `postgres`
    pub protocol: String,
    /// `disk_full`
    pub name: String,
    /// `query = None`
    pub params: String,
    /// The first line of its docstring.
    pub doc: String,
    /// Its definition, as written.
    pub source: String,
}

/// Every recipe, in file order: `def _<name>(...)` followed by a
/// docstring, in `@faultbox/recipes/<protocol>.star`.
pub fn recipes() -> Vec<Recipe> {
    let mut out = Vec::new();
    for (path, source) in STDLIB {
        let Some(protocol) = path
            .strip_prefix("@faultbox/recipes/")
            .and_then(|p| p.strip_suffix(".star"))
        else {
            continue;
        };
        let lines: Vec<&str> = source.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(rest) = line.strip_prefix("def _") else {
                continue;
            };
            let Some((name, params)) = rest.split_once('(') else {
                continue;
            };
            let params = params.trim_end_matches("):").to_string();
            let doc = lines
                .get(i + 1)
                .map(|d| d.trim().trim_matches('"').to_string())
                .unwrap_or_default();
            let end = lines[i + 1..]
                .iter()
                .position(|l| !l.starts_with(' ') && !l.is_empty())
                .map(|n| i + 1 + n)
                .unwrap_or(lines.len());
            out.push(Recipe {
                protocol: protocol.to_string(),
                name: name.to_string(),
                params,
                doc,
                source: lines[i..end].join("\n").trim_end().to_string(),
            });
        }
    }
    out
}

/// A spec that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Starlark refused or failed the spec; the message carries
    /// `file:line:col` and the offending line when Starlark knows them.
    #[error("{message}")]
    Invalid {
        /// What Starlark said, message first.
        message: String,
    },
    /// The spec file itself cannot be read.
    #[error("cannot read spec {0}")]
    Read(#[from] ReadError),
    /// The services do not form a startable topology.
    #[error(transparent)]
    Topology(#[from] crate::model::TopologyError),
    /// A literal protocol rule the interface's protocol does not accept.
    #[error("{at}: {call}: {reason}")]
    ProtocolRule {
        /// `file:line` of the rule.
        at: String,
        /// The call as written, shortened: `fault(db.main, error(...))`.
        call: String,
        /// Why the protocol refuses it.
        reason: String,
    },
    /// Evaluation needed more memory than its budget.
    #[error(
        "evaluating the spec took more than its memory budget of {budget} (at {at}); raise it with --load-memory if that much is meant"
    )]
    Memory {
        /// The budget.
        budget: String,
        /// The statement evaluation was at.
        at: String,
    },
    /// The interpreter itself gave up on a value (starlark panics on,
    /// for example, a list too long for its size fields).
    #[error(
        "evaluating the spec failed inside the Starlark interpreter (at {at}): {what}; is a value far too large?"
    )]
    Interpreter {
        /// The statement evaluation was at.
        at: String,
        /// What the interpreter said.
        what: String,
    },
    /// The loader thread could not start or died.
    #[error("the spec loader failed: {0}")]
    Loader(String),
}

/// A file a spec names (itself, a module, a `load_file`) that cannot be
/// read as text.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening or reading failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Over [`MAX_SOURCE`].
    #[error("{} is over the 50 MiB a spec may read", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not UTF-8.
    #[error("{} is not UTF-8 text: byte {byte} (line {line}) is not valid UTF-8", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// The first bad byte's offset.
        byte: usize,
        /// Its line.
        line: usize,
    },
}

/// Source text nested or chained past what the parser can take safely.
#[derive(Debug, thiserror::Error)]
#[error("{what} (at {file}:{line}:{col}); split it into smaller pieces")]
pub struct TooComplex {
    /// What went past its limit.
    pub what: String,
    /// The module's name.
    pub file: String,
    /// Where.
    pub line: usize,
    /// Where.
    pub col: usize,
}

fn spec_error(e: starlark::Error) -> SpecError {
    let text = e.to_string();
    // Starlark renders runtime errors as a traceback followed by
    // "error: <message>" and the located snippet. The message comes first
    // here (one line that says what is wrong), then where; the CLI adds
    // its own "error: ".
    let text = match text.rfind("\nerror: ") {
        Some(i) if text.contains("Traceback (most recent call last)") => &text[i + 1..],
        _ => text.as_str(),
    };
    let text = text.strip_prefix("error: ").unwrap_or(text);
    SpecError::Invalid {
        message: text.trim_end().to_string(),
    }
}

/// Why `pattern` cannot select anything (a `~REGEX` that does not
/// compile), if it cannot.
pub fn test_filter_error(pattern: &str) -> Option<String> {
    let re = pattern.strip_prefix('~')?;
    regex::Regex::new(re)
        .err()
        .map(|e| format!("--test {pattern:?}: not a regular expression: {e}"))
}

/// The tests `pattern` selects: a name, a name without `test_`, a glob
/// over either, or `~REGEX` (a regular expression found in the name).
pub fn select_tests(tests: &[String], pattern: &str) -> Vec<String> {
    if let Some(re) = pattern.strip_prefix('~') {
        return match regex::Regex::new(re) {
            Ok(re) => tests.iter().filter(|t| re.is_match(t)).cloned().collect(),
            Err(_) => Vec::new(),
        };
    }
    let with_prefix = format!("test_{pattern}");
    let glob = pattern.contains(['*', '?']);
    tests
        .iter()
        .filter(|t| {
            *t == pattern
                || *t == &with_prefix
                || (glob
                    && (faultbox_agent::glob::wildcard(pattern, t)
                        || faultbox_agent::glob::wildcard(&with_prefix, t)))
        })
        .cloned()
        .collect()
}

/// A loaded spec.
pub struct Spec {
    /// The file as given on the command line.
    pub path: PathBuf,
    /// Its directory (relative binaries and loads resolve against it).
    pub dir: PathBuf,
    /// Declared services, in declaration order.
    pub services: Vec<ServiceDef>,
    /// Test function names, sorted.
    pub tests: Vec<String>,
    /// Syscalls every service's filter intercepts (empty: no filter).
    pub intercept: Vec<String>,
    /// `determinism(...)`, when the spec calls it.
    pub determinism: Option<crate::model::Determinism>,
    /// The local files it read while loading, besides itself: modules it
    /// load()s, `load_file`/`load_json`/`load_yaml`, TLS files.
    pub files: Vec<PathBuf>,
    module: Arc<FrozenModule>,
    globals: Arc<Globals>,
}

/// The globals every spec sees.
pub fn globals() -> Globals {
    GlobalsBuilder::extended_by(&[
        LibraryExtension::StructType,
        LibraryExtension::Print,
        LibraryExtension::Json,
        LibraryExtension::Map,
        LibraryExtension::Filter,
    ])
    .with(builtins::topology)
    .with(builtins::syscall_faults)
    .with(builtins::protocol_faults)
    .with(builtins::assertions)
    .with(builtins::files)
    .with(builtins::monitors)
    .with(builtins::concurrency)
    .with(builtins::not_in_this_build)
    .build()
}

fn dialect() -> Dialect {
    Dialect {
        enable_top_level_stmt: true,
        ..Dialect::Extended
    }
}

struct Loader<'a> {
    dir: PathBuf,
    ctx: &'a Ctx,
    globals: &'a Globals,
    cache: &'a RefCell<HashMap<PathBuf, FrozenModule>>,
    loading: &'a RefCell<Vec<PathBuf>>,
    sources: &'a RefCell<Vec<String>>,
    /// When loading must have finished (every loaded module included).
    deadline: Deadline,
}

/// Ends a spec's evaluation once its time is up, naming the statement it
/// was at. starlark's only per-statement hook is the one its debugger
/// uses (`Evaluator::before_stmt_for_dap`, public but doc-hidden in 0.14);
/// it costs one counter increment per statement.
#[derive(Clone)]
struct Deadline {
    start: Instant,
    limit: Duration,
    statements: u64,
    /// In the memory probe: where evaluation is, kept where the parent
    /// can read it after an allocation the budget refused killed us.
    whereabouts: Option<Arc<SharedPage>>,
}

impl<'e> BeforeStmtFuncDyn<'e> for Deadline {
    fn call<'v>(
        &mut self,
        span: FileSpanRef,
        _continued: bool,
        _eval: &mut Evaluator<'v, '_, 'e>,
    ) -> starlark::Result<()> {
        self.statements += 1;
        if let Some(page) = &self.whereabouts {
            use std::io::Write;
            let mut buf = [0u8; 1024];
            let mut at = &mut buf[..];
            let line = span.file.find_line(span.span.begin()) + 1;
            let _ = write!(at, "L{}:{line}", span.file.filename());
            let left = at.len();
            page.write(&buf[..buf.len() - left]);
        }
        if self.statements.is_multiple_of(4096) && self.start.elapsed() > self.limit {
            return Err(starlark::Error::new_other(anyhow::anyhow!(
                "the spec did not finish loading within {:?} (evaluating {}); a loop that never ends?",
                self.limit,
                span.to_file_span()
            )));
        }
        Ok(())
    }
}

impl Loader<'_> {
    fn eval_file(&self, path: &Path, source: String) -> starlark::Result<FrozenModule> {
        let name = path.to_string_lossy().into_owned();
        check_depth(&name, &source).map_err(|e| starlark::Error::new_other(anyhow::anyhow!(e)))?;
        let ast = AstModule::parse(&name, source.clone(), &dialect())?;
        self.sources.borrow_mut().push(source);
        let child = Loader {
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            ctx: self.ctx,
            globals: self.globals,
            cache: self.cache,
            loading: self.loading,
            sources: self.sources,
            deadline: self.deadline.clone(),
        };
        Module::with_temp_heap(|module| {
            {
                let mut eval = Evaluator::new(&module);
                eval.extra = Some(self.ctx);
                eval.set_loader(&child);
                eval.before_stmt_for_dap(BeforeStmtFunc::Dyn(Box::new(self.deadline.clone())));
                eval.eval_module(ast, self.globals)?;
            }
            module
                .freeze()
                .map_err(|e| starlark::Error::new_other(anyhow::anyhow!("{e:?}")))
        })
    }
}

impl FileLoader for Loader<'_> {
    fn load(&self, path: &str) -> starlark::Result<FrozenModule> {
        let fail = |m: String| starlark::Error::new_other(anyhow::anyhow!(m));
        if path.starts_with("@faultbox/") {
            let Some((_, source)) = STDLIB.iter().find(|(name, _)| *name == path) else {
                let known: Vec<&str> = STDLIB.iter().map(|(n, _)| *n).collect();
                return Err(fail(format!(
                    "load({path:?}): no embedded module by that name (SPEC_RECIPE_NOT_FOUND); embedded: {}",
                    known.join(", ")
                )));
            };
            let key = PathBuf::from(path);
            if let Some(m) = self.cache.borrow().get(&key) {
                return Ok(m.clone());
            }
            let module = self.eval_file(&key, source.to_string())?;
            self.cache.borrow_mut().insert(key, module.clone());
            return Ok(module);
        }
        // Relative to the loading file, as a reader expects.
        let full = self.dir.join(path);
        let key = full
            .canonicalize()
            .map_err(|e| fail(format!("load({path:?}): {}: {e}", full.display())))?;
        if let Some(m) = self.cache.borrow().get(&key) {
            return Ok(m.clone());
        }
        if self.loading.borrow().contains(&key) {
            return Err(fail(format!(
                "load({path:?}): {} loads itself (a load cycle)",
                key.display()
            )));
        }
        let source = read_source(&key).map_err(|e| fail(format!("load({path:?}): {e}")))?;
        self.ctx.files.borrow_mut().push(full.clone());
        self.loading.borrow_mut().push(key.clone());
        let result = self.eval_file(&key, source);
        self.loading.borrow_mut().pop();
        let module = result?;
        self.cache.borrow_mut().insert(key, module.clone());
        Ok(module)
    }
}

/// The most a spec, a loaded module or a `load_file` may read.
pub const MAX_SOURCE: u64 = 50 << 20;

/// Reads a file the spec names, bounded by what is read (not by what
/// `stat` says: `/dev/zero` has no size), as UTF-8 text.
pub fn read_source(path: &Path) -> Result<String, ReadError> {
    use std::io::Read;
    let io = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_SOURCE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_SOURCE {
        return Err(ReadError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        let byte = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..byte].iter().filter(|b| **b == b'\n').count() + 1;
        ReadError::NotUtf8 {
            path: path.to_path_buf(),
            byte,
            line,
        }
    })
}

/// How deep an expression may nest, how many operators one statement may
/// chain, and how far a block may indent. The parser and the evaluator
/// recurse on expressions: past these a spec could overflow the stack and
/// abort the process, so it is refused, with its location, before it is
/// parsed. (Loading also runs on a thread with a large stack, so anything
/// within the limits is safe.)
const MAX_NESTING: usize = 200;
const MAX_OPERATORS: usize = 1_000;
const MAX_INDENT: usize = 400;

/// Refuses source text nested or chained beyond the limits above.
fn check_depth(name: &str, source: &str) -> Result<(), TooComplex> {
    let (mut depth, mut operators) = (0usize, 0usize);
    let (mut line, mut col) = (1usize, 0usize);
    let mut quote: Option<(char, bool)> = None;
    let mut chars = source.chars().peekable();
    let mut at_line_start = true;
    let mut indent = 0usize;
    let too = |what: String, line: usize, col: usize| {
        Err(TooComplex {
            what,
            file: name.to_string(),
            line,
            col,
        })
    };
    while let Some(c) = chars.next() {
        col += 1;
        if c == '\n' {
            line += 1;
            col = 0;
            at_line_start = true;
            indent = 0;
            // A one-line string ends with its line (else the parser will
            // say so); a statement ends with a line outside brackets.
            if quote.is_some_and(|(_, triple)| !triple) {
                quote = None;
            }
            if depth == 0 && quote.is_none() {
                operators = 0;
            }
            continue;
        }
        if at_line_start && quote.is_none() {
            match c {
                ' ' => indent += 1,
                '\t' => indent += 8,
                _ => {
                    at_line_start = false;
                    if indent > MAX_INDENT {
                        return too(
                            format!("a block indented {indent} columns deep (limit {MAX_INDENT})"),
                            line,
                            col,
                        );
                    }
                }
            }
            if matches!(c, ' ' | '\t') {
                continue;
            }
        }
        if let Some((q, triple)) = quote {
            if c == '\\' {
                chars.next();
                col += 1;
            } else if c == q {
                if !triple {
                    quote = None;
                } else if chars.peek() == Some(&q) {
                    chars.next();
                    if chars.peek() == Some(&q) {
                        chars.next();
                        quote = None;
                    }
                }
            }
            continue;
        }
        match c {
            '#' => {
                while chars.peek().is_some_and(|n| *n != '\n') {
                    chars.next();
                }
            }
            '"' | '\'' => {
                let triple = chars.peek() == Some(&c) && {
                    let mut look = chars.clone();
                    look.next();
                    look.peek() == Some(&c)
                };
                if triple {
                    chars.next();
                    chars.next();
                }
                quote = Some((c, triple));
            }
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return too(
                        format!("brackets nested more than {MAX_NESTING} deep"),
                        line,
                        col,
                    );
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            '+' | '-' | '*' | '/' | '%' | '|' | '&' | '^' | '~' => {
                operators += 1;
                if operators > MAX_OPERATORS {
                    return too(
                        format!("more than {MAX_OPERATORS} operators in one statement"),
                        line,
                        col,
                    );
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// What loading a spec may use: time, and memory for its evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest loading may take (`--load-timeout`).
    pub timeout: Duration,
    /// How much memory evaluating it may take (`--load-memory`); 0 for no
    /// limit.
    pub memory: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            timeout: Duration::from_secs(30),
            memory: 1 << 30,
        }
    }
}

/// Loads and evaluates `path` within the default [`Limits`].
pub fn load(path: &Path) -> Result<Spec, SpecError> {
    load_with(path, Limits::default())
}

/// Loads and evaluates `path` within `limits`, on a thread with a large
/// stack: the parser and the evaluator recurse on the spec's nesting.
///
/// With a memory limit the spec is first evaluated in a forked copy of
/// this process whose address space may grow by that much: an allocation
/// past it kills the copy (Rust aborts on a failed allocation; nothing in
/// the process that made it can recover), and the error names the line
/// the copy was at. Only a spec the copy loaded is evaluated here, so
/// top-level code runs twice; the copy's output is discarded.
pub fn load_with(path: &Path, limits: Limits) -> Result<Spec, SpecError> {
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("spec load".into())
        .stack_size(256 << 20)
        .spawn(move || {
            // Read once, here: a file that cannot be read gets its own
            // error without a fork, and the probe evaluates the same text.
            let source = read_source(&path)?;
            if limits.memory > 0 {
                probe(&path, &source, limits)?;
            }
            load_here(&path, source, limits.timeout, None)
        })
        .map_err(|e| SpecError::Loader(format!("cannot start its thread: {e}")))?
        .join()
        .unwrap_or_else(|_| Err(SpecError::Loader("its thread panicked".into())))
}

/// Evaluates `path` in a memory-limited copy of this process (see
/// [`load_with`]); returns its error, if it had one.
fn probe(path: &Path, source: &str, limits: Limits) -> Result<(), SpecError> {
    let Ok(page) = SharedPage::new().map(Arc::new) else {
        // Without a shared page there is no probe; loading goes on
        // unguarded rather than failing.
        return Ok(());
    };
    let whereabouts = Arc::clone(&page);
    let status = faultbox_agent::process::run_limited(limits.memory, move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            load_here(
                path,
                source.to_string(),
                limits.timeout,
                Some(Arc::clone(&whereabouts)),
            )
        }));
        let report = match outcome {
            Ok(Ok(_)) => "O".to_string(),
            Ok(Err(e)) => format!("E{e}"),
            Err(payload) => {
                let at = String::from_utf8_lossy(&whereabouts.read()).into_owned();
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                format!("P{}\u{0}{what}", at.strip_prefix('L').unwrap_or(""))
            }
        };
        whereabouts.write(report.as_bytes());
    });
    let seen = String::from_utf8_lossy(&page.read()).into_owned();
    match status {
        Ok(ExitStatus::Code(0)) => {
            if let Some(message) = seen.strip_prefix('E') {
                return Err(SpecError::Invalid {
                    message: message.to_string(),
                });
            }
            if let Some((at, what)) = seen.strip_prefix('P').and_then(|p| p.split_once('\u{0}')) {
                // starlark's heap turns a refused allocation into this
                // panic rather than an abort.
                if what.contains("out of memory") {
                    return Err(SpecError::Memory {
                        budget: format_size(limits.memory),
                        at: at.to_string(),
                    });
                }
                return Err(SpecError::Interpreter {
                    at: at.to_string(),
                    what: what.to_string(),
                });
            }
            Ok(())
        }
        // A panic in the copy is left for the real load to report.
        Ok(ExitStatus::Code(_)) | Err(_) => Ok(()),
        Ok(ExitStatus::Signal(_)) => Err(SpecError::Memory {
            budget: format_size(limits.memory),
            at: seen
                .strip_prefix('L')
                .map(str::to_string)
                .unwrap_or_else(|| path.display().to_string()),
        }),
    }
}

/// Reads a size as `--load-memory` takes it: `512MiB`, `2GiB`, `1G`,
/// `300m`, `65536` (bytes); units are binary and any case.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().ok()?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// `512 MiB`, `1 GiB`: how [`parse_size`] values are shown.
pub fn format_size(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= MIB {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

fn load_here(
    path: &Path,
    source: String,
    timeout: Duration,
    whereabouts: Option<Arc<SharedPage>>,
) -> Result<Spec, SpecError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let globals = globals();
    let ctx = Ctx::default();
    let cache = RefCell::new(HashMap::new());
    let loading = RefCell::new(Vec::new());
    let sources = RefCell::new(Vec::new());
    let loader = Loader {
        dir: dir.clone(),
        ctx: &ctx,
        globals: &globals,
        cache: &cache,
        loading: &loading,
        sources: &sources,
        deadline: Deadline {
            start: Instant::now(),
            limit: timeout,
            statements: 0,
            whereabouts,
        },
    };
    let module = loader.eval_file(path, source).map_err(spec_error)?;
    let services = ctx.services.take();
    crate::model::start_order(&services)?;
    let mut tests: Vec<String> = module
        .names()
        .map(|n| n.as_str().to_string())
        .filter(|n| n.starts_with("test_"))
        .filter(|n| {
            module
                .get(n)
                .map(|v| v.value().get_type() == "function")
                .unwrap_or(false)
        })
        .collect();
    tests.sort();
    // Each source is tokenized once, for both scans.
    let tokens: Vec<Tokens> = sources.borrow().iter().map(|s| tokenize_lines(s)).collect();
    if let Some(main) = tokens.first() {
        check_literal_protocol_rules(path, main, &module)?;
    }
    let mut intercept = filter_from_tokens(Arch::native(), &tokens, &services);
    let tolerated = ctx.tolerated.take();
    let determinism = match ctx.determinism.take() {
        Some(mut d) => {
            d.tolerated = tolerated;
            for name in crate::model::DETERMINISM_SYSCALLS {
                if Arch::native().number(name).is_some() && !intercept.iter().any(|s| s == name) {
                    intercept.push(name.to_string());
                }
            }
            intercept.sort();
            Some(d)
        }
        None => {
            if let Some(service) = tolerated.keys().next() {
                return Err(SpecError::Invalid {
                    message: format!(
                        "service({service:?}): nondeterministic_ok= tolerates what determinism() reports, and the spec never calls it; add determinism() at the top of the spec, or drop nondeterministic_ok="
                    ),
                });
            }
            None
        }
    };
    let mut files = ctx.files.take();
    files.dedup();
    Ok(Spec {
        path: path.to_path_buf(),
        dir,
        services,
        tests,
        intercept,
        determinism,
        files,
        module: Arc::new(module),
        globals: Arc::new(globals),
    })
}

/// What a test body ended with.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyOutcome {
    /// Returned; the repr of a non-None value.
    Returned(Option<String>),
    /// Raised: the message and where (`file:line:col`).
    Failed {
        message: String,
        location: Option<String>,
    },
    /// Still running when the test timed out.
    TimedOut,
    /// Still running when the run was interrupted (SIGINT, SIGTERM).
    Interrupted,
}

impl Spec {
    /// Runs test `name`'s body against `run`, giving up after `timeout`
    /// or as soon as `stop` is set.
    pub fn run_body(
        &self,
        name: &str,
        run: Arc<dyn TestHost>,
        timeout: Duration,
        stop: &AtomicBool,
    ) -> BodyOutcome {
        let (tx, rx) = mpsc::channel();
        let module = Arc::clone(&self.module);
        let globals = Arc::clone(&self.globals);
        let name = name.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("test {name}"))
            .spawn(move || {
                let outcome = Module::with_temp_heap(|heap_module| {
                    // Calling the frozen function through a one-line module
                    // that imports the spec keeps every value on a heap the
                    // evaluator owns.
                    heap_module.import_public_symbols(&module);
                    let call = match AstModule::parse("<test>", format!("{name}()"), &dialect()) {
                        Ok(ast) => ast,
                        Err(e) => {
                            return BodyOutcome::Failed {
                                message: e.to_string(),
                                location: None,
                            };
                        }
                    };
                    let ctx = Ctx {
                        run: Some(Arc::clone(&run)),
                        deadline: Some(std::time::Instant::now() + timeout),
                        ..Ctx::default()
                    };
                    let spec_monitors = module
                        .get_option(builtins::spec_monitors_name())
                        .ok()
                        .flatten()
                        .map(|v| heap_module.heap().access_owned_frozen_value(&v));
                    builtins::start_test_monitors(&heap_module, spec_monitors, &ctx);
                    let mut eval = Evaluator::new(&heap_module);
                    eval.extra = Some(&ctx);
                    // The monitors look once more at what the body left.
                    let body = || -> starlark::Result<Option<String>> {
                        let v = eval.eval_module(call, &globals)?;
                        let shown = (!v.is_none()).then(|| v.to_str());
                        builtins::check_monitors(&mut eval)?;
                        Ok(shown)
                    };
                    match crate::values::while_running(run, body) {
                        Ok(shown) => BodyOutcome::Returned(shown),
                        Err(e) => BodyOutcome::Failed {
                            message: e.without_diagnostic().to_string(),
                            location: e.span().map(|s| s.to_string()),
                        },
                    }
                });
                let _ = tx.send(outcome);
            });
        if let Err(e) = spawned {
            return BodyOutcome::Failed {
                message: format!("cannot start the test thread: {e}"),
                location: None,
            };
        }
        // A body given up on keeps its thread: a step or a loop cannot be
        // cancelled from outside. The caller stops the services next,
        // which makes any step it is blocked in fail.
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(20))) {
                Ok(outcome) => return outcome,
                Err(mpsc::RecvTimeoutError::Disconnected) => return BodyOutcome::TimedOut,
                Err(mpsc::RecvTimeoutError::Timeout) if stop.load(Ordering::SeqCst) => {
                    return BodyOutcome::Interrupted;
                }
                Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                    return BodyOutcome::TimedOut;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

/// The syscalls the spec can target, from the names it spells out: a
/// keyword argument (`write=deny(...)`), a dict key (`{"fsync": ...}`) or
/// an entry of a `syscalls=[...]` list, when the name is a syscall, a
/// family or an op. Faults are applied at run time, but the filter is
/// fixed when a service starts, so the set is decided from the text; a
/// rule built from a computed name is refused at run time instead of
/// silently never firing.
pub fn filter_syscalls(arch: Arch, sources: &[String], services: &[ServiceDef]) -> Vec<String> {
    let tokens: Vec<Tokens> = sources.iter().map(|s| tokenize_lines(s)).collect();
    filter_from_tokens(arch, &tokens, services)
}

/// [`filter_syscalls`] on sources already tokenized.
fn filter_from_tokens(arch: Arch, sources: &[Tokens], services: &[ServiceDef]) -> Vec<String> {
    let mut names = BTreeSet::new();
    for toks in sources {
        names.extend(candidate_names(toks));
    }
    let mut out: Vec<String> = Vec::new();
    let mut add = |name: &str| {
        for s in syscalls::expand_family(arch, name) {
            if arch.number(s).is_some() && !out.iter().any(|o| o == s) {
                out.push(s.to_string());
            }
        }
    };
    // A partition is connect rules by destination.
    let splits = sources
        .iter()
        .flatten()
        .any(|(t, _)| matches!(t, Tok::Ident(n) if n == "partition" || n == "partition_start"));
    if splits {
        add("connect");
    }
    for name in &names {
        add(name);
        for svc in services {
            if let Some(op) = svc.ops.get(name) {
                for s in &op.syscalls {
                    add(s);
                }
            }
        }
    }
    out.sort();
    out
}

/// A source's tokens, each with its 1-based line.
type Tokens = Vec<(Tok, usize)>;

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Punct(char),
    EqEq,
}

/// The tokens of `src`, each with its 1-based line.
fn tokenize_lines(src: &str) -> Vec<(Tok, usize)> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1;
    let mut counted = 0;
    while i < chars.len() {
        line += chars[counted..i].iter().filter(|c| **c == '\n').count();
        counted = i;
        let c = chars[i];
        if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), line));
        } else if c == '"' || c == '\'' {
            let triple = i + 2 < chars.len() && chars[i + 1] == c && chars[i + 2] == c;
            let quote_len = if triple { 3 } else { 1 };
            i += quote_len;
            let mut s = String::new();
            while i < chars.len() {
                if chars[i] == '\\' {
                    i += 2;
                    continue;
                }
                if chars[i] == c
                    && (!triple || (i + 2 < chars.len() && chars[i + 1] == c && chars[i + 2] == c))
                {
                    i += quote_len;
                    break;
                }
                if !triple && chars[i] == '\n' {
                    break;
                }
                s.push(chars[i]);
                i += 1;
            }
            out.push((Tok::Str(s), line));
        } else if c == '=' && chars.get(i + 1) == Some(&'=') {
            out.push((Tok::EqEq, line));
            i += 2;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            out.push((Tok::Num(chars[start..i].iter().collect()), line));
        } else if c.is_whitespace() {
            i += 1;
        } else {
            out.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    out
}

fn candidate_names(toks: &[(Tok, usize)]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut in_syscalls_list = 0usize;
    for (i, (t, _)) in toks.iter().enumerate() {
        let next = toks.get(i + 1).map(|(t, _)| t);
        match t {
            Tok::Ident(name) if next == Some(&Tok::Punct('=')) => {
                out.insert(name.clone());
                if name == "syscalls" && toks.get(i + 2).map(|(t, _)| t) == Some(&Tok::Punct('[')) {
                    in_syscalls_list = i + 2;
                }
            }
            Tok::Str(s) if next == Some(&Tok::Punct(':')) => {
                out.insert(s.clone());
            }
            Tok::Str(s) if in_syscalls_list > 0 => {
                out.insert(s.clone());
            }
            Tok::Punct(']') => in_syscalls_list = 0,
            _ => {}
        }
    }
    out
}

/// Protocol rules written out in a fault window on an interface of the
/// spec's own file (`fault(db.main, error(query="..."), run=fn)`) are
/// checked against the interface's protocol when the spec loads, so a
/// rule the protocol cannot apply stops the run before anything starts.
/// Rules built any other way (a variable, a recipe, a loaded file) are
/// checked when their window opens.
fn check_literal_protocol_rules(
    file: &Path,
    toks: &[(Tok, usize)],
    module: &FrozenModule,
) -> Result<(), SpecError> {
    const RULES: &[&str] = &["error", "response", "drop", "delay", "duplicate"];
    let tok = |i: usize| toks.get(i).map(|(t, _)| t);
    let punct = |i: usize, c: char| tok(i) == Some(&Tok::Punct(c));
    for i in 0..toks.len() {
        let Some(Tok::Ident(window)) = tok(i) else {
            continue;
        };
        if !matches!(window.as_str(), "fault" | "fault_start")
            || (i > 0 && punct(i - 1, '.'))
            || !punct(i + 1, '(')
            || !punct(i + 3, '.')
            || !(punct(i + 5, ',') || punct(i + 5, ')'))
        {
            continue;
        }
        let (Some(Tok::Ident(var)), Some(Tok::Ident(iface))) = (tok(i + 2), tok(i + 4)) else {
            continue;
        };
        let Some(protocol) = module
            .get(var)
            .ok()
            .and_then(|v| crate::values::ServiceValue::from_value(v.value()).map(|s| s.def.clone()))
            .and_then(|def| {
                def.interfaces
                    .iter()
                    .find(|f| &f.name == iface)
                    .map(|f| f.protocol.clone())
            })
        else {
            continue;
        };
        let mut depth = 1;
        let mut j = i + 6;
        while j < toks.len() && depth > 0 {
            match tok(j) {
                Some(Tok::Punct('(' | '[' | '{')) => depth += 1,
                Some(Tok::Punct(')' | ']' | '}')) => depth -= 1,
                Some(Tok::Ident(rule))
                    if depth == 1
                        && RULES.contains(&rule.as_str())
                        && punct(j - 1, ',')
                        && punct(j + 1, '(') =>
                {
                    let (def, end) = literal_rule(rule, toks, j + 1);
                    if let Err(e) = def.check(&protocol) {
                        return Err(SpecError::ProtocolRule {
                            at: format!("{}:{}", file.display(), toks[j].1),
                            call: format!("{window}({var}.{iface}, {rule}(...))"),
                            reason: e.to_string(),
                        });
                    }
                    j = end;
                    continue;
                }
                _ => {}
            }
            j += 1;
        }
    }
    Ok(())
}

/// The rule a literal `name(k=v, ...)` call at `open` (its parenthesis)
/// builds, as far as its keywords tell, and the index after the call.
/// Values the check does not look at are placeholders.
fn literal_rule(
    name: &str,
    toks: &[(Tok, usize)],
    open: usize,
) -> (faultbox_proxy::rules::ProxyRuleDef, usize) {
    use faultbox_proxy::rules::{ProxyAction, ProxyRuleDef};
    let mut keywords: HashMap<String, Option<&Tok>> = HashMap::new();
    let mut depth = 0;
    let mut j = open;
    while j < toks.len() {
        match &toks[j].0 {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth == 0 {
                    j += 1;
                    break;
                }
            }
            Tok::Ident(k)
                if depth == 1 && toks.get(j + 1).map(|t| &t.0) == Some(&Tok::Punct('=')) =>
            {
                keywords.insert(k.clone(), toks.get(j + 2).map(|t| &t.0));
            }
            _ => {}
        }
        j += 1;
    }
    let present = |k: &str| keywords.contains_key(k).then(|| "x".to_string());
    let status = match keywords.get("status") {
        Some(Some(Tok::Str(code))) => faultbox_proxy::rules::grpc_code(code),
        Some(Some(Tok::Num(n))) => n.parse().ok(),
        Some(_) if name == "response" => Some(200),
        _ => None,
    };
    let action = match name {
        "error" => ProxyAction::Error {
            status,
            message: String::new(),
            code: present("code"),
            number: keywords.contains_key("number").then_some(1105),
        },
        "response" => ProxyAction::Respond {
            status,
            body: String::new(),
        },
        "drop" => ProxyAction::Drop { reset: None },
        "duplicate" => ProxyAction::Duplicate,
        _ => ProxyAction::Delay { ns: 0 },
    };
    let def = ProxyRuleDef {
        action,
        method: present("method"),
        path: present("path"),
        command: present("command"),
        key: present("key"),
        query: present("query"),
        probability: 1.0,
        trigger: faultbox_agent::rule::Trigger::Always,
        label: None,
    };
    (def, j)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Spec, SpecError> {
        let dir = std::env::temp_dir().join(format!("fb-depth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(format!("s{}.star", text.len()));
        std::fs::write(&path, text).expect("write");
        let r = load(&path);
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn deep_or_long_expressions_are_refused_with_their_place_not_a_crash() {
        let cases = [
            (
                format!("x = {}1{}\n", "(".repeat(6_000), ")".repeat(6_000)),
                "brackets nested",
            ),
            (
                format!("x = 1{}\n", "+1".repeat(4_000)),
                "operators in one statement",
            ),
            (
                format!("x = {}{}\n", "[".repeat(10_000), "]".repeat(10_000)),
                "brackets nested",
            ),
            (
                format!("x = {}{}\n", "{\"a\": ".repeat(5_000), "}".repeat(5_000)),
                "brackets nested",
            ),
            (
                format!("x = {}1\n", "-".repeat(20_000)),
                "operators in one statement",
            ),
            (
                (0..3_000)
                    .map(|i| format!("{}if True:\n", "    ".repeat(i)))
                    .collect::<String>()
                    + &format!("{}x = 1\n", "    ".repeat(3_000)),
                "indented",
            ),
        ];
        for (text, want) in cases {
            let e = load_text(&text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(want) && e.contains("(at "), "{want}: {e}");
        }
        // Within the limits, deep is fine.
        assert!(load_text(&format!("x = {}1{}\n", "(".repeat(150), ")".repeat(150))).is_ok());
        assert!(load_text(&format!("x = 1{}\n", "+1".repeat(900))).is_ok());
        // Operators inside strings and comments do not count.
        let quiet = format!("x = \"{}\"  # {}\n", "-".repeat(5_000), "+".repeat(5_000));
        assert!(load_text(&quiet).is_ok());
    }

    #[test]
    fn sizes_read_in_binary_units_of_any_case_and_show_back() {
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("99999999999999G"), None);
        assert_eq!(format_size(Limits::default().memory), "1 GiB");
        assert_eq!(format_size(16 << 20), "16 MiB");
    }

    #[test]
    fn reads_are_bounded_by_what_is_read_and_must_be_utf8() {
        let e = read_source(Path::new("/dev/zero"))
            .expect_err("/dev/zero")
            .to_string();
        assert!(e.contains("over the 50 MiB"), "{e}");
        let dir = std::env::temp_dir().join(format!("fb-utf8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("bad.star");
        std::fs::write(&path, b"x = 1\ny = \"\xff\"\n").expect("write");
        let e = read_source(&path).expect_err("not utf-8").to_string();
        assert!(e.contains("byte 11 (line 2)"), "{e}");
    }

    #[test]
    fn filter_covers_keywords_dict_keys_and_syscall_lists() {
        let src = r#"
def test_a():
    fault(db, write=deny("EIO"), run=lambda: None)   # read=deny in a comment
    fault_all([db], **{"connect": deny("ECONNREFUSED")}, run=f)
    trace(db, syscalls=["openat", 'fsync'], run=f)
    x = "unlinkat"
    if a == b: pass
"#;
        let got = filter_syscalls(Arch::native(), &[src.to_string()], &[]);
        assert_eq!(
            got,
            [
                "connect",
                "fdatasync",
                "fsync",
                "openat",
                "pwrite64",
                "pwritev",
                "pwritev2",
                "write",
                "writev"
            ]
        );
    }

    #[test]
    fn ops_bring_their_syscalls() {
        let mut svc = ServiceDef {
            name: "db".into(),
            binary: "x".into(),
            args: vec![],
            env: vec![],
            interfaces: vec![],
            depends_on: vec![],
            healthcheck: None,
            ops: Default::default(),
            user: None,
            remote: Default::default(),
            container: None,
            seccomp: true,
            reuse: false,
            declared_at: String::new(),
        };
        svc.ops.insert(
            "persist".into(),
            crate::model::OpDef {
                syscalls: vec!["fsync".into()],
                path: None,
            },
        );
        let got = filter_syscalls(
            Arch::native(),
            &["fault(db, persist=deny(\"EIO\"))".into()],
            &[svc],
        );
        assert_eq!(got, ["fdatasync", "fsync"]);
    }
}
