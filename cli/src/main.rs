//! The `faultbox` command line.

mod bench;
mod kube;
mod log;
mod recipes;
mod run;
mod test;

use clap::{Parser, Subcommand};

/// Faultbox: test how services behave when syscalls and protocols fail.
#[derive(Debug, Parser)]
#[command(name = "faultbox", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Launch a binary under Faultbox with process isolation and optional
    /// syscall-level fault injection.
    #[command(
        after_help = "Examples:\n  faultbox run --fault \"openat=ENOENT:100%:/data/*\" ./my-service\n  faultbox run --fault \"fsync=EIO:100%:after=2\" ./my-service\n  faultbox run --fault \"connect=delay:200ms:100%\" -- ./my-service --port 8080"
    )]
    Run(run::RunArgs),
    /// Run the tests of a Starlark spec: start its services, inject its
    /// faults, check its assertions.
    #[command(
        after_help = "Examples:\n  faultbox test faultbox.star\n  faultbox test faultbox.star --test happy_path\n  faultbox test faultbox.star --format json\n  faultbox test faultbox.star --runs 100 --show fail\n  faultbox test faultbox.star --seed 42\n  faultbox test faultbox.star --dry-run"
    )]
    Test(Box<test::TestArgs>),
    /// Validate a spec without running anything: load it as a run would
    /// and report what is wrong (exit 0 clean, 2 on an error finding).
    #[command(
        after_help = "Examples:\n  faultbox check faultbox.star\n  faultbox check faultbox.star --test 'disk_*' --format json"
    )]
    Check {
        /// The spec.
        file: std::path::PathBuf,
        /// A --test selection that must match a test.
        #[arg(long, value_name = "NAME")]
        test: Option<String>,
        /// `text` (default) or `json` on stdout.
        #[arg(long, value_enum)]
        format: Option<test::Format>,
    },
    /// Compare two normalized traces (`faultbox test --normalize`): exit 0
    /// when identical, 2 when they differ (each difference is printed).
    #[command(
        after_help = "Example:\n  faultbox test faultbox.star --normalize run1.norm\n  faultbox test faultbox.star --normalize run2.norm\n  faultbox diff run1.norm run2.norm"
    )]
    Diff {
        /// The first trace.
        a: std::path::PathBuf,
        /// The second trace.
        b: std::path::PathBuf,
    },
    /// Browse the embedded recipe library: named failures with the real
    /// servers' error codes and messages.
    Recipes {
        #[command(subcommand)]
        command: recipes::RecipesCommand,
    },
    /// Measurements that run where the measured thing runs (a pod).
    #[command(hide = true)]
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

/// Writes `text` to stdout. A reader that went away (`| head`) is not an
/// error: the rest of the output is simply not wanted.
pub fn print_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// An error and its causes on one line. The library errors already name
/// their cause in their message, so a cause is added only when the line
/// does not say it yet (an anyhow context says only what was being done).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

/// `faultbox check FILE`.
fn check(
    file: &std::path::Path,
    filter: Option<&str>,
    format: Option<test::Format>,
) -> anyhow::Result<i32> {
    use faultbox_spec::check::Level;
    if !file.is_file() {
        anyhow::bail!(
            "{}: no such spec file (give the path of a .star file)",
            file.display()
        );
    }
    let (spec, findings) = faultbox_spec::check::check(file, filter);
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    if matches!(format, Some(test::Format::Json | test::Format::JsonLine)) {
        let doc = serde_json::json!({
            "file": file.display().to_string(),
            "ok": errors == 0,
            "services": spec.as_ref().map(|s| s.services.iter().map(|d| d.name.clone()).collect::<Vec<_>>()),
            "tests": spec.as_ref().map(|s| s.tests.clone()),
            "findings": findings,
        });
        print_stdout(&format!("{}\n", serde_json::to_string_pretty(&doc)?))?;
    } else {
        let mut out = String::new();
        for f in &findings {
            let level = match f.level {
                Level::Error => "error",
                Level::Warning => "warning",
            };
            out.push_str(&format!("{level}: [{}] {}\n", f.code, f.message));
        }
        if let Some(s) = &spec {
            out.push_str(&format!(
                "{}: {} services, {} tests, {} errors, {} warnings\n",
                file.display(),
                s.services.len(),
                s.tests.len(),
                errors,
                findings.len() - errors
            ));
        }
        print_stdout(&out)?;
    }
    Ok(if errors > 0 { 2 } else { 0 })
}

/// `faultbox diff A B`.
fn diff(a: &std::path::Path, b: &std::path::Path) -> anyhow::Result<i32> {
    use anyhow::Context as _;
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))
    };
    let (ta, tb) = (read(a)?, read(b)?);
    let (na, nb) = (a.display().to_string(), b.display().to_string());
    match faultbox_engine::report::diff_normalized((&na, &ta), (&nb, &tb))? {
        None => {
            print_stdout("traces are identical\n")?;
            Ok(0)
        }
        Some(report) => {
            print_stdout(&report)?;
            Ok(2)
        }
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                // The CLI reference gives exit 1 for bad arguments.
                _ => 1,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    // Proxies hold two descriptors per connection and services inherit
    // the limit: take the hard limit, as servers do.
    faultbox_agent::process::raise_nofile_limit();
    let result = match cli.command {
        Commands::Run(args) => run::run(args),
        Commands::Test(args) => test::run(*args),
        Commands::Diff { a, b } => diff(&a, &b),
        Commands::Check { file, test, format } => check(&file, test.as_deref(), format),
        Commands::Recipes { command } => recipes::run(command),
        Commands::Bench { command } => bench::run(command),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("faultbox: {}", one_line(&e));
            std::process::exit(1);
        }
    }
}
