//! Benchmarks of the spec language and the test runtime (issue budgets in
//! docs/benchmarks.md):
//!
//! 1. loading and dry-running a generated spec with 10 services and 500
//!    tests (budget: under 200 ms), against bare Starlark evaluating an
//!    equivalent file without Faultbox's builtins, in the same process;
//! 2. restarting one trivial service per test (start under the shim,
//!    healthcheck, stop, ports confirmed free), against the same program
//!    started, probed and killed directly (budget: under 100 ms more).
//!
//! The trivial service is this binary re-executed as `serve PORT`.
//! Run with `scripts/bench` (which builds the static shim first), or
//! `cargo bench -p faultbox-engine --bench lifecycle -- [--quick]`.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultbox_engine::runtime::{RunConfig, TestRun};
use faultbox_spec::load as spec;
use faultbox_spec::model::{Healthcheck, InterfaceDef, ServiceDef};
use starlark::environment::{Globals, Module};
use starlark::eval::Evaluator;
use starlark::syntax::{AstModule, Dialect};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn generated_spec(faultbox: bool) -> String {
    let mut s = String::new();
    for i in 0..10 {
        if faultbox {
            s.push_str(&format!(
                "svc{i} = service(\"svc{i}\", \"/bin/true\", interface(\"main\", \"tcp\", {}), env = {{\"N\": \"{i}\"}}, healthcheck = tcp(\"localhost:{}\"), ops = {{\"persist\": op(syscalls = [\"write\", \"fsync\"], path = \"*.wal\")}})\n",
                20000 + i,
                20000 + i
            ));
        } else {
            s.push_str(&format!(
                "svc{i} = dict(name = \"svc{i}\", binary = \"/bin/true\", iface = dict(name = \"main\", protocol = \"tcp\", port = {}), env = {{\"N\": \"{i}\"}})\n",
                20000 + i
            ));
        }
    }
    for t in 0..500 {
        let svc = t % 10;
        if faultbox {
            s.push_str(&format!(
                "def test_case_{t:03}():\n    r = fault(svc{svc}, fsync = deny(\"EIO\", probability = \"50%\"), run = lambda: svc{svc}.main.send(data = \"PING\"))\n    assert_eq(r, \"PONG\")\n\n"
            ));
        } else {
            s.push_str(&format!(
                "def test_case_{t:03}():\n    r = svc{svc}[\"iface\"][\"port\"]\n    return r == 1\n\n"
            ));
        }
    }
    s
}

fn bare_starlark(text: &str) -> usize {
    let ast = AstModule::parse("bare.star", text.to_string(), &Dialect::Extended).expect("parse");
    let globals = Globals::standard();
    Module::with_temp_heap(|module| {
        {
            let mut eval = Evaluator::new(&module);
            eval.eval_module(ast, &globals).expect("eval");
        }
        let frozen = module.freeze().expect("freeze");
        let mut names: Vec<String> = frozen
            .names()
            .map(|n| n.as_str().to_string())
            .filter(|n| n.starts_with("test_"))
            .collect();
        names.sort();
        names.len()
    })
}

fn bench_load(reps: usize, faultbox_bin: &Path) {
    let dir = std::env::temp_dir().join(format!("faultbox-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("big.star");
    std::fs::write(&path, generated_spec(true)).expect("write");
    let bare = generated_spec(false);
    let (mut ours, mut base, mut cli) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        let loaded = spec::load(&path).expect("load");
        // What --dry-run prints.
        let mut listing = String::new();
        for s in &loaded.services {
            listing.push_str(&s.name);
        }
        for t in &loaded.tests {
            listing.push_str(t);
        }
        ours.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(loaded.tests.len(), 500);
        assert_eq!(loaded.services.len(), 10);
        let t = Instant::now();
        assert_eq!(bare_starlark(&bare), 500);
        base.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let out = Command::new(faultbox_bin)
            .arg("test")
            .arg(&path)
            .arg("--dry-run")
            .output()
            .expect("faultbox");
        assert!(out.status.success());
        cli.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (o, b, c) = (median(ours), median(base), median(cli));
    println!("spec load + dry-run, 10 services / 500 tests ({reps} reps, medians):");
    println!("  bare Starlark, equivalent file without Faultbox builtins: {b:.1} ms");
    println!(
        "  faultbox engine (spec::load + listing):                 {o:.1} ms  ({:.2}x bare)",
        o / b
    );
    println!(
        "  `faultbox test --dry-run` process, end to end:           {c:.1} ms  budget < 200 ms {}",
        if c < 200.0 { "OK" } else { "OVER" }
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server never listened");
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn bench_restart(reps: usize, shim: &Path) {
    let me = std::env::current_exe().expect("exe");
    let logs = std::env::temp_dir().join(format!("faultbox-bench-logs-{}", std::process::id()));
    std::fs::create_dir_all(&logs).expect("logs");
    let config = RunConfig {
        shim: shim.to_path_buf(),
        log_dir: logs.clone(),
        test_timeout: Duration::from_secs(30),
        stop_grace: Duration::from_secs(2),
        stop: Default::default(),
        docker: None,
        cluster: None,
        kept: Default::default(),
        explore: None,
    };
    let (mut base, mut total, mut launch, mut health, mut stop) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        // Baseline: the service's own start-up, probe and death.
        let port = free_port();
        let t = Instant::now();
        let mut child = Command::new(&me)
            .args(["serve", &port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn");
        wait_port(port);
        let _ = child.kill();
        let _ = child.wait();
        base.push(t.elapsed().as_secs_f64() * 1e3);

        // Faultbox: the same program as a service of a test.
        let port = free_port();
        let def = ServiceDef {
            name: "svc".into(),
            binary: me.to_string_lossy().into_owned(),
            args: vec!["serve".into(), port.to_string()],
            env: Vec::new(),
            interfaces: vec![InterfaceDef {
                name: "main".into(),
                protocol: "tcp".into(),
                port,
                tls: None,
            }],
            depends_on: Vec::new(),
            healthcheck: Some(Healthcheck::Tcp {
                addr: format!("localhost:{port}"),
                timeout: Duration::from_secs(10),
            }),
            ops: Default::default(),
            user: None,
            remote: Default::default(),
            container: None,
            seccomp: true,
            reuse: false,
            declared_at: String::new(),
        };
        let run = TestRun::new(
            &format!("bench{rep}"),
            rep as u64,
            vec![def],
            vec!["fsync".into(), "fdatasync".into()],
            config.clone(),
        );
        let t = Instant::now();
        run.start_services(Path::new(".")).expect("start");
        let started = t.elapsed();
        let t2 = Instant::now();
        let busy = run.stop_services();
        let stopped = t2.elapsed();
        assert!(busy.is_empty(), "{busy:?}");
        let events = run.events();
        let at = |kind: &str| {
            events
                .iter()
                .find(|e| e.kind == kind)
                .map(|e| e.time_ns)
                .expect("event")
        };
        let t0 = at("service_started");
        let t1 = at("service_ready");
        let begin_ns = t1 - (started.as_nanos() as u64).min(t1);
        launch.push((t0.saturating_sub(begin_ns)) as f64 / 1e6);
        health.push((t1 - t0) as f64 / 1e6);
        stop.push(stopped.as_secs_f64() * 1e3);
        total.push((started + stopped).as_secs_f64() * 1e3);
    }
    let (b, tot) = (median(base), median(total));
    println!("restart one trivial service per test ({reps} reps, medians):");
    println!("  baseline: spawn, first accepted connection, kill, wait: {b:.1} ms");
    println!(
        "  faultbox: start under the shim + healthcheck + stop:   {tot:.1} ms  (overhead {:.1} ms, budget < 100 ms {})",
        tot - b,
        if tot - b < 100.0 { "OK" } else { "OVER" }
    );
    println!(
        "    launch (shim, filter, exec) {:.1} ms | healthcheck {:.1} ms | stop + ports free {:.1} ms",
        median(launch),
        median(health),
        median(stop)
    );
    let _ = std::fs::remove_dir_all(&logs);
}

fn serve(port: u16) {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    for mut c in listener.incoming().flatten() {
        let _ = c.write_all(b"PONG\n");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        serve(args.get(2).and_then(|p| p.parse().ok()).expect("port"));
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let reps = if quick { 5 } else { 15 };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = std::env::var_os("FAULTBOX_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release"));
    let shim = std::env::var_os("FAULTBOX_SHIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir.join("faultbox-shim"));
    assert!(
        shim.exists(),
        "{} is missing: run scripts/build --release (scripts/bench does)",
        shim.display()
    );
    bench_load(reps, &bin_dir.join("faultbox"));
    println!();
    bench_restart(reps, &shim);
}
