//! Syscall interception costs, measured against baselines in the same run.
//!
//! ```text
//! cargo bench -p faultbox-agent --bench notify            # full run
//! cargo bench -p faultbox-agent --bench notify -- --quick # fewer repetitions
//! ```
//!
//! Every measurement runs a target loop (this binary re-executed in its
//! `child` mode) under one setup; setups are shuffled inside each
//! repetition, ratios are taken against the baseline of the same repetition
//! and the report gives medians, as in `shared/reference/performance.md`.
//!
//! `FB_MARKS=1` prints the launch path's phases (µs) for every launch.
//!
//! The plain fork+exec baseline calls the kernel directly, so this file
//! holds the one `unsafe` block outside the agent's kernel modules.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use faultbox_agent::process::{self, ChildSpec};
use faultbox_agent::rule::parse_fault;
use faultbox_agent::seccomp::{Insn, Listener, RET_ALLOW, Response};
use faultbox_agent::supervisor::{LiveKernel, Supervisor};
use faultbox_agent::syscalls::Arch;
use faultbox_agent::wire::{EventQueue, ShimMessage};

const ARCH: Arch = Arch::native();

// ---------------------------------------------------------------- child mode

/// `child LOOP N OUT`: run N iterations of LOOP, write elapsed ns to OUT.
/// `child hammer THREADS MILLIS OUT`: THREADS threads call getppid for
/// MILLIS, write each thread's count to OUT.
fn child(args: &[String]) {
    let out = &args[args.len() - 1];
    let report = |text: String| {
        let _ = std::fs::write(out, text);
    };
    match args[0].as_str() {
        "hammer" => {
            let threads: usize = args[1].parse().unwrap_or(4);
            let millis: u64 = args[2].parse().unwrap_or(1000);
            let stop = Arc::new(AtomicBool::new(false));
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let stop = Arc::clone(&stop);
                    thread::spawn(move || {
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            std::hint::black_box(std::os::unix::process::parent_id());
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            thread::sleep(Duration::from_millis(millis));
            stop.store(true, Ordering::Relaxed);
            let counts: Vec<String> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0).to_string())
                .collect();
            report(counts.join(" "));
        }
        kind => {
            let n: u64 = args[1].parse().unwrap_or(1000);
            let mut devnull = OpenOptions::new().write(true).open("/dev/null").ok();
            let path = bench_file();
            let _ = std::fs::write(&path, b"x");
            let buf = [0u8; 64];
            let start = Instant::now();
            for _ in 0..n {
                match kind {
                    "getppid" => {
                        std::hint::black_box(std::os::unix::process::parent_id());
                    }
                    "write" => {
                        if let Some(f) = devnull.as_mut() {
                            let _ = std::hint::black_box(f.write(&buf));
                        }
                    }
                    "openat" => {
                        let _ = std::hint::black_box(File::open(&path));
                    }
                    _ => {}
                }
            }
            report(start.elapsed().as_nanos().to_string());
        }
    }
}

// ------------------------------------------------------------ setups

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Setup {
    /// No filter.
    Native,
    /// A filter that only says ALLOW.
    BareAllow,
    /// Our filter, intercepting 24 syscalls the loop does not make.
    OursUntargeted,
    /// The loop's syscall intercepted; a minimal RECV/continue loop answers.
    MinimalSupervisor,
    /// The loop's syscall intercepted; our supervisor answers "allow" (a 0% rule).
    OursAllow,
    /// Our supervisor answers with an errno (a 100% rule).
    OursErrno,
    /// strace -f -e inject=SYSCALL:error=EPERM.
    Strace,
}

const UNTARGETED: &[&str] = &[
    "fsync",
    "fdatasync",
    "connect",
    "accept4",
    "bind",
    "listen",
    "mkdirat",
    "unlinkat",
    "renameat2",
    "ftruncate",
    "fallocate",
    "sendmsg",
    "recvmsg",
    "sendto",
    "recvfrom",
    "socket",
    "clone3",
    "execve",
    "wait4",
    "kill",
    "getrandom",
    "mmap",
    "mprotect",
    "brk",
];

fn exe() -> String {
    std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn scratch(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("faultbox-bench-{}-{name}", std::process::id()))
        .to_string_lossy()
        .into_owned()
}

fn read_result(path: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let _ = std::fs::remove_file(path);
    text
}

/// Runs `child <kind> <n>` under `setup`; returns ns per call.
fn measure(setup: Setup, kind: &str, n: u64) -> f64 {
    let out = scratch(kind);
    let argv: Vec<String> = vec![
        "bench".into(),
        "child".into(),
        kind.into(),
        n.to_string(),
        out.clone(),
    ];
    if setup == Setup::Strace {
        // -P limits tracing (and so injection) to the loop's file, as our
        // rule's glob does; the loader's opens run untouched.
        let mut strace = Command::new("strace");
        strace.args(["-f", "-qq", "-o", "/dev/null"]);
        if kind == "openat" {
            strace.arg("-P").arg(bench_file());
        }
        let status = strace
            .arg("-e")
            .arg(format!("trace={kind}"))
            .arg("-e")
            .arg(format!("inject={kind}:error=EPERM"))
            .arg(exe())
            .args(&argv[1..])
            .status();
        if !status.is_ok_and(|s| s.success()) {
            return f64::NAN;
        }
        return read_result(&out).trim().parse::<f64>().unwrap_or(f64::NAN) / n as f64;
    }
    let nr = ARCH.number(kind).unwrap_or(0);
    let untargeted: Vec<u32> = UNTARGETED.iter().filter_map(|s| ARCH.number(s)).collect();
    let nrs: Vec<u32> = match setup {
        Setup::Native | Setup::BareAllow => Vec::new(),
        Setup::OursUntargeted => untargeted,
        _ => vec![nr],
    };
    let env = vec!["PATH=/usr/bin:/bin".to_string()];
    let mut spec = match ChildSpec::new(&exe(), &argv, &env, None, ARCH, &nrs) {
        Ok(s) => s,
        Err(e) => panic!("child spec: {e}"),
    };
    if setup == Setup::BareAllow {
        spec = spec.with_filter(&[Insn {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: RET_ALLOW,
        }]);
    }
    let mut child = process::spawn(&spec).unwrap_or_else(|e| panic!("spawn: {e}"));
    let listener = child.listener.take();
    let rule = |text: &str| vec![parse_fault(text, ARCH).unwrap_or_else(|e| panic!("{e}"))];
    let (events, sink) = event_sink();
    enum Server {
        None,
        Minimal(thread::JoinHandle<()>),
        Ours(Supervisor<LiveKernel>),
    }
    let ours = |l: Listener, nrs: Vec<u32>, rules| {
        Server::Ours(
            Supervisor::new(LiveKernel::new(l), ARCH, 1, nrs, rules, Arc::clone(&events))
                .and_then(Supervisor::start)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    };
    let server = match (setup, listener) {
        (Setup::MinimalSupervisor, Some(l)) => Server::Minimal(thread::spawn(move || minimal(l))),
        // Startup calls (mmap, brk, …) are among the 24 and are served with
        // no rules; the loop's own syscall is not intercepted at all.
        (Setup::OursUntargeted, Some(l)) => ours(l, nrs.clone(), Vec::new()),
        (Setup::OursAllow, Some(l)) => ours(l, vec![nr], rule(&format!("{kind}=EPERM:0%"))),
        // The errno rule for openat is limited to the loop's file, or the
        // child could not write its result.
        (Setup::OursErrno, Some(l)) => ours(l, vec![nr], rule(&errno_rule(kind))),
        (_, l) => {
            drop(l);
            Server::None
        }
    };
    child.release().unwrap_or_else(|e| panic!("release: {e}"));
    process::wait_for(child.pid);
    match server {
        Server::Ours(s) => s.stop(),
        // RECV does not return when the filter loses its last user, so the
        // minimal loop stays parked: left behind on purpose, since stop
        // machinery would make the baseline slower than it is.
        Server::Minimal(h) => drop(h),
        Server::None => {}
    }
    close_sink(&events, sink);
    read_result(&out).trim().parse::<f64>().unwrap_or(f64::NAN) / n as f64
}

fn bench_file() -> std::path::PathBuf {
    std::env::temp_dir().join("faultbox-bench-open")
}

fn errno_rule(kind: &str) -> String {
    match kind {
        "openat" => format!("openat=EPERM:100%:{}", bench_file().display()),
        _ => format!("{kind}=EPERM:100%"),
    }
}

/// The smallest possible supervisor: receive, continue, repeat.
fn minimal(listener: Listener) {
    listener.set_sync_wakeup();
    while let Ok(n) = listener.recv() {
        let _ = listener.respond(n.id, Response::Continue);
    }
}

/// Consumes supervisor events the way the shim does: JSON lines to a
/// stream, until an `Exited` message.
fn event_sink() -> (Arc<EventQueue>, thread::JoinHandle<()>) {
    let queue = Arc::new(EventQueue::new());
    let drain = Arc::clone(&queue);
    let handle = thread::spawn(move || {
        let Ok(null) = OpenOptions::new().write(true).open("/dev/null") else {
            return;
        };
        let mut out = BufWriter::new(null);
        loop {
            let batch = drain.take_batch();
            let done = batch
                .iter()
                .any(|m| matches!(m, ShimMessage::Exited { .. }));
            for m in &batch {
                let _ = faultbox_agent::wire::send(&mut out, m);
            }
            let _ = out.flush();
            if done {
                return;
            }
        }
    });
    (queue, handle)
}

/// Ends an event sink.
fn close_sink(queue: &EventQueue, sink: thread::JoinHandle<()>) {
    queue.push_now(ShimMessage::Exited {
        code: Some(0),
        signal: None,
        interrupted: 0,
    });
    let _ = sink.join();
}

// ------------------------------------------------------------ launch

/// Plain fork + execve + waitpid of `path`, nothing else.
fn plain_fork_exec(path: &CString) -> Duration {
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    let start = Instant::now();
    // SAFETY: the child only calls execve and _exit, both async-signal-safe,
    // on pointers prepared before the fork.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
    start.elapsed()
}

/// The shim's launch path with one rule, in the shim's order: the event
/// writer already runs; spawn (filter + hand-off); the
/// supervisor is prepared and the child released; the launching thread
/// serves the notifications itself until the target is gone; reap.
fn shim_launch(program: &str) -> Duration {
    // The shim starts its event writer when its controller connects,
    // before the launch message; like the shim's own process, it is not
    // part of the launch.
    let (events, sink) = event_sink();
    let start = Instant::now();
    let mut marks: Vec<(&str, Instant)> = Vec::new();
    let argv = vec![program.to_string()];
    let rules = vec![
        parse_fault("openat=ENOENT:100%:/nonexistent/*", ARCH).unwrap_or_else(|e| panic!("{e}")),
    ];
    let nrs = rules[0].validate(ARCH).unwrap_or_default();
    let spec =
        ChildSpec::new(program, &argv, &[], None, ARCH, &nrs).unwrap_or_else(|e| panic!("{e}"));
    marks.push(("spec", Instant::now()));
    let mut child = process::spawn(&spec).unwrap_or_else(|e| panic!("{e}"));
    marks.push(("spawn", Instant::now()));
    let listener = child
        .listener
        .take()
        .unwrap_or_else(|| panic!("no listener"));
    child.go().unwrap_or_else(|e| panic!("{e}"));
    let sup = Supervisor::new(
        LiveKernel::new(listener),
        ARCH,
        1,
        nrs,
        rules,
        Arc::clone(&events),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    marks.push(("go+supervisor", Instant::now()));
    child.exec_result().unwrap_or_else(|e| panic!("{e}"));
    marks.push(("exec", Instant::now()));
    sup.serve();
    marks.push(("serve", Instant::now()));
    process::wait_for(child.pid);
    marks.push(("wait", Instant::now()));
    // What the shim does before reporting the exit; it never joins.
    sup.quiesce();
    marks.push(("quiesce", Instant::now()));
    let elapsed = start.elapsed();
    drop(sup);
    if std::env::var_os("FB_MARKS").is_some() {
        let mut prev = start;
        let text: Vec<String> = marks
            .iter()
            .map(|(n, t)| {
                let d = t.duration_since(prev);
                prev = *t;
                format!("{n}={}", d.as_micros())
            })
            .collect();
        eprintln!("{}", text.join(" "));
    }
    close_sink(&events, sink);
    elapsed
}

/// `faultbox run [flags] -- program`, end to end, if the CLI is built.
fn cli_run(faultbox: &str, flags: &[&str], program: &str) -> Duration {
    let start = Instant::now();
    let _ = Command::new(faultbox)
        .arg("run")
        .arg("--log-format=json")
        .args(flags)
        .arg("--")
        .arg(program)
        .stderr(std::process::Stdio::null())
        .status();
    start.elapsed()
}

// ------------------------------------------------------------ report

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A tiny deterministic shuffle (no RNG dependency for a benchmark order).
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..items.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        items.swap(i, (s % (i as u64 + 1)) as usize);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child") {
        child(&args[1..]);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 7 };
    // --only=untargeted|intercepted|launch|hammer runs one section.
    let only: Option<String> = args
        .iter()
        .find_map(|a| a.strip_prefix("--only=").map(str::to_string));
    let section = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let have_strace = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    println!(
        "faultbox notify benchmark: {reps} repetitions, medians; {} CPUs",
        thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 1. Untargeted syscalls: ours vs a bare ALLOW filter vs native.
    let untargeted_loops: &[(&str, u64)] = if section("untargeted") {
        &[("getppid", 2_000_000), ("write", 1_000_000)]
    } else {
        &[]
    };
    for (kind, n) in untargeted_loops {
        let mut samples: BTreeMap<Setup, Vec<f64>> = BTreeMap::new();
        let mut ratios = Vec::new();
        for rep in 0..reps {
            let mut setups = [Setup::Native, Setup::BareAllow, Setup::OursUntargeted];
            shuffle(&mut setups, rep as u64 + 1);
            let mut got = BTreeMap::new();
            for s in setups {
                got.insert(s, measure(s, kind, *n));
            }
            ratios.push(got[&Setup::OursUntargeted] / got[&Setup::BareAllow]);
            for (s, v) in got {
                samples.entry(s).or_default().push(v);
            }
        }
        println!(
            "untargeted {kind:8} native {:7.1} ns | bare ALLOW filter {:7.1} ns | ours (24 syscalls intercepted) {:7.1} ns | ours / bare = {:.3}",
            median(samples[&Setup::Native].clone()),
            median(samples[&Setup::BareAllow].clone()),
            median(samples[&Setup::OursUntargeted].clone()),
            median(ratios)
        );
    }

    // 2. Intercepted syscalls: ours vs the minimal supervisor vs strace.
    let intercepted_loops: &[(&str, u64)] = if section("intercepted") {
        &[("getppid", 100_000), ("openat", 50_000)]
    } else {
        &[]
    };
    for (kind, n) in intercepted_loops {
        let mut samples: BTreeMap<Setup, Vec<f64>> = BTreeMap::new();
        let mut allow_ratio = Vec::new();
        let mut errno_ratio = Vec::new();
        let mut strace_ratio = Vec::new();
        for rep in 0..reps {
            let mut setups = vec![
                Setup::Native,
                Setup::MinimalSupervisor,
                Setup::OursAllow,
                Setup::OursErrno,
            ];
            if have_strace {
                setups.push(Setup::Strace);
            }
            shuffle(&mut setups, rep as u64 + 11);
            let mut got = BTreeMap::new();
            for s in setups {
                let calls = if s == Setup::Strace { n / 10 } else { *n };
                got.insert(s, measure(s, kind, calls));
            }
            allow_ratio.push(got[&Setup::OursAllow] / got[&Setup::MinimalSupervisor]);
            errno_ratio.push(got[&Setup::OursErrno] / got[&Setup::MinimalSupervisor]);
            if let Some(st) = got.get(&Setup::Strace) {
                strace_ratio.push(st / got[&Setup::OursErrno]);
            }
            for (s, v) in got {
                samples.entry(s).or_default().push(v);
            }
        }
        let m = |s: Setup| {
            samples
                .get(&s)
                .map_or(f64::NAN, |v| median(v.clone()) / 1000.0)
        };
        println!(
            "intercepted {kind:8} native {:6.2} µs | minimal supervisor {:6.2} µs | ours allow {:6.2} µs ({:.2}×) | ours errno {:6.2} µs ({:.2}×) | strace inject {:6.2} µs ({:.1}× ours)",
            m(Setup::Native),
            m(Setup::MinimalSupervisor),
            m(Setup::OursAllow),
            median(allow_ratio),
            m(Setup::OursErrno),
            median(errno_ratio),
            m(Setup::Strace),
            median(strace_ratio),
        );
    }

    if section("launch") {
        // 3. Launch: the shim's launch path with one rule vs plain fork+exec.
        let target = if std::path::Path::new("/bin/true").exists() {
            "/bin/true"
        } else {
            "/usr/bin/true"
        };
        let program = CString::new(target).unwrap_or_default();
        let faultbox = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent()?.parent().map(|d| d.join("faultbox")))
            .filter(|p| p.exists())
            .map(|p| p.to_string_lossy().into_owned());
        let launches = if quick { 40 } else { 200 };
        let mut plain = Vec::new();
        let mut ours = Vec::new();
        let mut ratio = Vec::new();
        let mut cli_plain = Vec::new();
        let mut cli_isolated = Vec::new();
        for rep in 0..reps {
            let mut p = Vec::new();
            let mut o = Vec::new();
            for i in 0..launches {
                // Alternate so drift hits both equally.
                if (i + rep) % 2 == 0 {
                    p.push(plain_fork_exec(&program).as_secs_f64());
                    o.push(shim_launch(target).as_secs_f64());
                } else {
                    o.push(shim_launch(target).as_secs_f64());
                    p.push(plain_fork_exec(&program).as_secs_f64());
                }
            }
            let (mp, mo) = (median(p), median(o));
            plain.push(mp);
            ours.push(mo);
            ratio.push(mo / mp);
            if let Some(fb) = &faultbox {
                let runs = if quick { 5 } else { 20 };
                cli_plain.push(median(
                    (0..runs)
                        .map(|_| {
                            cli_run(
                                fb,
                                &[
                                    "--no-isolation",
                                    "--fault",
                                    "openat=ENOENT:100%:/nonexistent/*",
                                ],
                                target,
                            )
                            .as_secs_f64()
                        })
                        .collect(),
                ));
                cli_isolated.push(median(
                    (0..runs)
                        .map(|_| {
                            cli_run(
                                fb,
                                &["--fault", "openat=ENOENT:100%:/nonexistent/*"],
                                target,
                            )
                            .as_secs_f64()
                        })
                        .collect(),
                ));
            }
        }
        println!(
            "launch {target}: plain fork+exec {:.0} µs | shim launch path, one rule {:.0} µs | ratio {:.2}",
            median(plain.clone()) * 1e6,
            median(ours) * 1e6,
            median(ratio)
        );
        if faultbox.is_some() {
            println!(
                "launch end to end: faultbox run --no-isolation {:.2} ms | faultbox run (user+pid+mount+net namespaces) {:.2} ms | plain fork+exec {:.2} ms",
                median(cli_plain) * 1e3,
                median(cli_isolated) * 1e3,
                median(plain) * 1e3
            );
        }
    }
    // 4. Four threads hammering an intercepted syscall.
    if section("hammer") {
        let millis = if quick { 500 } else { 2000 };
        let out = scratch("hammer");
        let argv: Vec<String> = vec![
            "bench".into(),
            "child".into(),
            "hammer".into(),
            "4".into(),
            millis.to_string(),
            out.clone(),
        ];
        let nr = ARCH.number("getppid").unwrap_or(0);
        let spec =
            ChildSpec::new(&exe(), &argv, &[], None, ARCH, &[nr]).unwrap_or_else(|e| panic!("{e}"));
        let mut child = process::spawn(&spec).unwrap_or_else(|e| panic!("{e}"));
        let (events, sink) = event_sink();
        let listener = child
            .listener
            .take()
            .unwrap_or_else(|| panic!("no listener"));
        let rules = vec![parse_fault("getppid=EPERM:0%", ARCH).unwrap_or_else(|e| panic!("{e}"))];
        let sup = Supervisor::new(
            LiveKernel::new(listener),
            ARCH,
            1,
            vec![nr],
            rules,
            Arc::clone(&events),
        )
        .and_then(Supervisor::start)
        .unwrap_or_else(|e| panic!("{e}"));
        child.release().unwrap_or_else(|e| panic!("{e}"));
        process::wait_for(child.pid);
        drop(sup);
        close_sink(&events, sink);
        let counts: Vec<u64> = read_result(&out)
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .collect();
        let total: u64 = counts.iter().sum();
        println!(
            "4 threads hammering intercepted getppid for {millis} ms: {:.0} notifications/s; per thread {:?} (min/max {:.2})",
            total as f64 / (millis as f64 / 1000.0),
            counts,
            counts.iter().min().copied().unwrap_or(0) as f64
                / counts.iter().max().copied().unwrap_or(1).max(1) as f64
        );
    }
}
