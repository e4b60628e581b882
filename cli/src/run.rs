//! `faultbox run`: one target under the shim, faults from `--fault` and
//! `--fs-fault`, events logged as they happen, the target's exit code
//! passed through.

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::log::LogFormat;
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use faultbox_agent::process::{self, SignalSet};
use faultbox_agent::rule::{self, Rule};
use faultbox_agent::seccomp;
use faultbox_agent::syscalls::Arch;
use faultbox_agent::wire::{Isolation, LaunchSpec, OnDisconnect};
use faultbox_engine::shim::{Shim, ShimEvent};

/// Flags of `faultbox run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Inject a syscall fault: SYSCALL=ERRNO:PROB%[:PATH_GLOB][:nth=N|after=N]
    /// or SYSCALL=delay:DURATION:PROB%[:PATH_GLOB][:TRIGGER]. Repeatable.
    #[arg(long = "fault", value_name = "SPEC")]
    faults: Vec<OsString>,
    /// Like --fault, naming a filesystem operation (open, read, write, sync,
    /// mkdir, delete, stat) instead of a syscall. Repeatable.
    #[arg(long = "fs-fault", value_name = "SPEC")]
    fs_faults: Vec<OsString>,
    /// Set an environment variable for the target (overrides the inherited
    /// value). Repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Log every intercepted syscall, including allowed ones.
    #[arg(long)]
    debug: bool,
    /// Log format: console or json (default: console on a terminal, json when piped).
    #[arg(long = "log-format", value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Seed for fault probabilities; the same seed replays the same
    /// decisions for a single-threaded target (random when omitted).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the host network (the target can reach and be reached from the
    /// host) while still isolating PIDs, mounts and users.
    #[arg(long = "host-network")]
    host_network: bool,
    /// Run the target in the caller's namespaces (no PID, mount, user or
    /// network isolation).
    #[arg(long = "no-isolation")]
    no_isolation: bool,
    /// The program to run and its arguments.
    #[arg(
        value_name = "BINARY [ARGS]...",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<String>,
}

/// A run that could not start: printed as one line, exit code 1.
fn user_error(message: impl Into<String>) -> anyhow::Error {
    anyhow!(message.into())
}

/// Runs the command and returns the exit code for the CLI.
pub fn run(args: RunArgs) -> Result<i32> {
    let arch = Arch::native();
    let rules = parse_rules(&args, arch)?;
    let (program, argv) = resolve_command(&args.command)?;
    let env = build_env(&args.env)?;
    if !rules.is_empty() && !seccomp::user_notification_available() {
        bail!(
            "this kernel does not support seccomp user notification, so faults cannot be injected (needs Linux 5.0+ built with CONFIG_SECCOMP_FILTER; check: grep SECCOMP /boot/config-$(uname -r))"
        );
    }
    let shim = faultbox_engine::shim::locate()?;
    let seed = args
        .seed
        .unwrap_or_else(faultbox_agent::engine::random_seed);
    let session_id = format!("{:016x}", faultbox_agent::engine::random_seed());
    crate::log::init(args.log_format, args.debug, session_id);
    let cwd = std::env::current_dir()
        .ok()
        .map(|p| p.to_string_lossy().into_owned());

    // Signals are handled by a thread from here on, so Ctrl-C cannot kill
    // the CLI while its target is still running and leave it orphaned.
    let signals = SignalSet::block(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT])
        .context("block signals")?;
    let fault_texts: Vec<String> = rules.iter().map(|r| r.id.to_string()).collect();
    let launch = LaunchSpec {
        program: program.clone(),
        argv,
        env,
        inherit_env: false,
        cwd,
        intercept: Vec::new(),
        rules,
        seed,
        isolation: Isolation {
            namespaces: !args.no_isolation,
            network: !args.no_isolation && !args.host_network,
        },
        on_disconnect: OnDisconnect::StopTarget,
        stop_grace_ms: 2_000,
        user: None,
    };
    let started = Instant::now();
    tracing::info!(
        state = "starting",
        target = %program,
        seed,
        faults = %fault_texts.join(","),
        "session starting"
    );
    let events = Box::new(move |event| log_event(event, started));
    // The target writes to our own stdout and stderr.
    let shim = match Shim::launch(&shim, launch, None, events) {
        Ok(shim) => shim,
        Err(failure) => {
            tracing::error!(state = "failed", error = %failure, "state changed");
            if failure.exit_code() == Some(127) {
                eprintln!("faultbox: {failure}");
                return Ok(127);
            }
            return Err(user_error(failure.to_string()));
        }
    };
    // Shim::launch always starts a local shim.
    let shim_pid = shim.shim_pid().unwrap_or(0) as i32;
    std::thread::spawn(move || {
        loop {
            let (sig, explicit) = signals.wait();
            // Ctrl-C on a terminal already reached the shim (same process
            // group); only a signal sent to the CLI alone needs forwarding.
            if explicit && shim_pid > 0 {
                process::kill(shim_pid, sig);
            }
        }
    });
    let exit = shim.wait_done();
    shim.stop(Duration::from_secs(2));
    match exit {
        Some(exit) => Ok(exit.shell_code()),
        None => {
            bail!("faultbox-shim ended without reporting the target's exit; the target was stopped")
        }
    }
}

/// Logs one thing the shim reported, in the CLI reference's log shapes.
fn log_event(event: ShimEvent, started: Instant) {
    match event {
        ShimEvent::FilterInstalled {
            syscalls,
            wait_killable,
        } => tracing::debug!(
            syscalls = %syscalls.join(","),
            wait_killable,
            "seccomp filter installed"
        ),
        ShimEvent::Started { pid } => {
            tracing::info!(pid, "target started");
            tracing::debug!(state = "running", "state changed");
        }
        ShimEvent::Syscall(e) => {
            // tracing's levels are fixed per call site, hence one site
            // per level with the same fields.
            macro_rules! intercepted {
                ($level:ident) => {
                    tracing::$level!(
                        name = %e.syscall,
                        pid = e.pid,
                        decision = %e.decision,
                        path = e.path.as_deref(),
                        latency_ms = e.latency_ns.map(|ns| ns / 1_000_000),
                        rule = e.rule.as_ref().map(tracing::field::display),
                        seq = e.seq,
                        "syscall intercepted"
                    )
                };
            }
            if e.decision.starts_with("deny") || e.decision.starts_with("delay") {
                intercepted!(info);
            } else {
                intercepted!(debug);
            }
        }
        ShimEvent::RulesRejected(message) => {
            tracing::error!(error = %message, "rules rejected");
        }
        ShimEvent::Exited { exit, interrupted } => {
            let shell = exit.shell_code();
            if shell == 0 {
                tracing::info!(exit_code = shell, signal = exit.signal, "target exited");
            } else {
                tracing::warn!(
                    exit_code = shell,
                    signal = exit.signal,
                    "target exited with error"
                );
            }
            tracing::info!(
                state = "stopped",
                exit_code = shell,
                duration = started.elapsed().as_nanos() as u64,
                dropped_notifications = interrupted,
                "session completed"
            );
        }
    }
}

fn parse_rules(args: &RunArgs, arch: Arch) -> Result<Vec<Rule>> {
    let mut rules: Vec<Rule> = Vec::new();
    // Taken as raw bytes, so a value that is not UTF-8 gets the same
    // one-line error as any other bad rule instead of a usage dump.
    let text = |flag: &str, raw: &OsString| {
        raw.to_str().map(str::to_string).ok_or_else(|| {
            let lossy = raw.to_string_lossy();
            let at = lossy.find('\u{fffd}').unwrap_or(0);
            user_error(format!(
                "{flag} {lossy:?}: not valid UTF-8 (at byte {at}); write the rule in plain text"
            ))
        })
    };
    let mut parsed = Vec::new();
    for raw in &args.faults {
        parsed.push(rule::parse_fault(&text("--fault", raw)?, arch));
    }
    for raw in &args.fs_faults {
        parsed.push(rule::parse_fs_fault(&text("--fs-fault", raw)?, arch));
    }
    for rule in parsed {
        let mut rule = rule.map_err(|e| user_error(e.to_string()))?;
        // Two identical flags are two rules: give each its own RNG stream.
        let copies = rules
            .iter()
            .filter(|r| r.id.name.split('#').next() == Some(rule.id.name.as_str()))
            .count();
        if copies > 0 {
            rule.id.name = format!("{}#{}", rule.id.name, copies + 1);
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// The path to execute and argv, checked before anything starts.
fn resolve_command(command: &[String]) -> Result<(String, Vec<String>)> {
    let Some(binary) = command.first() else {
        bail!("no binary specified (usage: faultbox run [flags] [--] <binary> [args...])");
    };
    let path_var = std::env::var("PATH").ok();
    let program = match process::resolve_program(binary, path_var.as_deref()) {
        Some(p) => p,
        None => bail!(
            "binary {binary:?} not found in PATH (give a path such as ./{binary}, or check the name)"
        ),
    };
    let path = Path::new(&program);
    match std::fs::metadata(path) {
        Err(_) => bail!(
            "binary {binary:?} not found (relative paths are resolved against {})",
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "the current directory".into())
        ),
        Ok(m) if m.is_dir() => bail!("{binary:?} is a directory, not a program"),
        Ok(_) if !process::is_executable(path) => {
            bail!(
                "{binary:?} is not executable (chmod +x {binary}, or run it through its interpreter)"
            )
        }
        Ok(_) => {}
    }
    Ok((program, command.to_vec()))
}

/// The inherited environment with each `--env` applied; a key given with
/// `--env` replaces the inherited value.
fn build_env(overrides: &[String]) -> Result<Vec<String>> {
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    for entry in overrides {
        let Some((key, value)) = entry.split_once('=') else {
            bail!("--env {entry:?}: expected KEY=VALUE");
        };
        if key.is_empty() {
            bail!("--env {entry:?}: the variable name is empty");
        }
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}
