//! Benchmarks of container mode (issue budgets in docs/benchmarks.md),
//! on the real Docker engine with the images `scripts/setup` builds:
//!
//! 1. starting a container service under the shim (create, start,
//!    healthy), against the same image started through the same Engine
//!    API without the shim (`seccomp=False`), and against `docker run -d`
//!    plus the same probe (budget: within 1.15x);
//! 2. an intercepted syscall (`getppid`, answered "allow") inside a
//!    container against the same loop as a binary-mode service (budget:
//!    within 1.1x), with the loop's native cost beside them;
//! 3. the wall time of a three-container spec with five tests, and how
//!    much of it is spent waiting for the engine.
//!
//! The syscall loop is this binary re-executed as `child getppid N OUT`,
//! bind-mounted into the container (the test image is Debian 12, like the
//! machine, so its glibc runs it). Run with `scripts/bench`, or
//! `cargo bench -p faultbox-engine --bench containers -- [--quick]`.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultbox_engine::docker::Docker;
use faultbox_engine::report::TestResult;
use faultbox_engine::runtime::{RunConfig, TestRun};
use faultbox_engine::suite;
use faultbox_spec::model::{ContainerDef, Healthcheck, ImageSource, InterfaceDef, ServiceDef};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn child(args: &[String]) {
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    let out = args.get(3).cloned().unwrap_or_default();
    let t = Instant::now();
    for _ in 0..n {
        // getppid(2), one syscall a call.
        std::hint::black_box(std::os::unix::process::parent_id());
    }
    let ns = t.elapsed().as_nanos();
    let tmp = format!("{out}.tmp");
    std::fs::write(&tmp, ns.to_string()).expect("write result");
    std::fs::rename(&tmp, &out).expect("publish result");
}

fn service(name: &str, iface: InterfaceDef) -> ServiceDef {
    ServiceDef {
        name: name.into(),
        binary: String::new(),
        args: vec![],
        env: vec![],
        interfaces: vec![iface],
        depends_on: vec![],
        healthcheck: None,
        ops: BTreeMap::new(),
        user: None,
        remote: BTreeMap::new(),
        container: None,
        seccomp: true,
        reuse: false,
        declared_at: String::new(),
    }
}

fn container(image: &str) -> ContainerDef {
    ContainerDef {
        image: ImageSource::Pull(image.into()),
        entrypoint: None,
        cmd: None,
        ports: BTreeMap::new(),
        volumes: vec![],
    }
}

fn redis(seccomp: bool) -> ServiceDef {
    let mut def = service(
        "cache",
        InterfaceDef {
            name: "main".into(),
            protocol: "tcp".into(),
            port: 6379,
            tls: None,
        },
    );
    def.container = Some(container("faultbox/redis:test"));
    def.seccomp = seccomp;
    def.healthcheck = Some(Healthcheck::Tcp {
        addr: "localhost:6379".into(),
        timeout: Duration::from_secs(30),
    });
    def
}

fn config(shim: &Path, logs: &Path, docker: Option<Arc<Docker>>) -> RunConfig {
    RunConfig {
        shim: shim.to_path_buf(),
        log_dir: logs.to_path_buf(),
        test_timeout: Duration::from_secs(60),
        stop_grace: Duration::from_secs(2),
        stop: Default::default(),
        docker,
        cluster: None,
        kept: Default::default(),
        explore: None,
    }
}

/// Milliseconds from nothing to healthy for `def`, and the stop after.
fn start_once(def: &ServiceDef, intercept: &[&str], config: &RunConfig, dir: &Path) -> f64 {
    let run = TestRun::new(
        "bench",
        1,
        vec![def.clone()],
        intercept.iter().map(|s| s.to_string()).collect(),
        config.clone(),
    );
    let t = Instant::now();
    run.start_services(dir).expect("start");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    run.stop_services();
    ms
}

fn docker_cli(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("docker");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn bench_start(reps: usize, shim: &Path, logs: &Path, docker: &Arc<Docker>) {
    let cfg = config(shim, logs, Some(Arc::clone(docker)));
    // One warm-up of each, so neither pays for a cold page cache.
    start_once(&redis(true), &["write"], &cfg, logs);
    start_once(&redis(false), &[], &cfg, logs);
    let (mut shimmed, mut plain, mut cli) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        shimmed.push(start_once(&redis(true), &["write"], &cfg, logs));
        plain.push(start_once(&redis(false), &[], &cfg, logs));
        let t = Instant::now();
        let id = docker_cli(&[
            "run",
            "-d",
            "--label",
            "faultbox.run=bench",
            "--network",
            docker.network(),
            "faultbox/redis:test",
        ]);
        let ip = docker_cli(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &id,
        ]);
        let addr = format!("{ip}:6379");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "docker run: never listened");
            std::thread::sleep(Duration::from_millis(1));
        }
        cli.push(t.elapsed().as_secs_f64() * 1e3);
        docker_cli(&["rm", "-f", &id]);
    }
    let (s, p, c) = (median(shimmed), median(plain), median(cli));
    println!("container start to healthy (redis), medians of {reps}:");
    println!("  under faultbox-shim (Engine API):        {s:.1} ms");
    println!(
        "  same image, no shim (Engine API):        {p:.1} ms   shim {:.2}x  budget 1.15x {}",
        s / p,
        if s / p <= 1.15 { "OK" } else { "OVER" }
    );
    println!(
        "  `docker run -d` + the same probe:        {c:.1} ms   shim {:.2}x",
        s / c
    );
}

/// ns per intercepted getppid for the loop as `def`'s service.
fn loop_once(def: &ServiceDef, out: &Path, config: &RunConfig, dir: &Path) -> f64 {
    let _ = std::fs::remove_file(out);
    let run = TestRun::new(
        "bench",
        1,
        vec![def.clone()],
        vec!["getppid".into()],
        config.clone(),
    );
    run.start_services(dir).expect("start");
    let deadline = Instant::now() + Duration::from_secs(120);
    let ns = loop {
        if let Ok(text) = std::fs::read_to_string(out)
            && let Ok(ns) = text.trim().parse::<f64>()
        {
            break ns;
        }
        assert!(Instant::now() < deadline, "the loop never reported");
        std::thread::sleep(Duration::from_millis(5));
    };
    run.stop_services();
    ns
}

fn bench_syscall(reps: usize, n: u64, shim: &Path, logs: &Path, docker: &Arc<Docker>) {
    let me = std::env::current_exe().expect("exe");
    let out_dir = logs.join("out");
    std::fs::create_dir_all(&out_dir).expect("out");
    let exe_dir = me.parent().expect("dir").to_path_buf();
    let exe_name = me.file_name().expect("name").to_string_lossy().into_owned();
    let iface = InterfaceDef {
        name: "main".into(),
        protocol: "tcp".into(),
        port: 1,
        tls: None,
    };
    let mut binary = service("loop", iface.clone());
    binary.binary = me.to_string_lossy().into_owned();
    let host_out = out_dir.join("binary");
    binary.args = vec![
        "child".into(),
        "getppid".into(),
        n.to_string(),
        host_out.to_string_lossy().into_owned(),
    ];
    let mut boxed = service("loop", iface);
    let mut c = container("faultbox/services:bookworm");
    c.entrypoint = Some(vec![
        format!("/bench/{exe_name}"),
        "child".into(),
        "getppid".into(),
        n.to_string(),
        "/out/container".into(),
    ]);
    c.volumes = vec![
        (exe_dir.to_string_lossy().into_owned(), "/bench".into()),
        (out_dir.to_string_lossy().into_owned(), "/out".into()),
    ];
    boxed.container = Some(c);
    let cfg = config(shim, logs, Some(Arc::clone(docker)));
    let (mut native, mut bin, mut ctr) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let native_out = out_dir.join("native");
        let _ = std::fs::remove_file(&native_out);
        let status = Command::new(&me)
            .args(["child", "getppid", &n.to_string()])
            .arg(&native_out)
            .status()
            .expect("native loop");
        assert!(status.success());
        let ns: f64 = std::fs::read_to_string(&native_out)
            .expect("native result")
            .trim()
            .parse()
            .expect("ns");
        native.push(ns / n as f64);
        bin.push(loop_once(&binary, &host_out, &cfg, logs) / n as f64);
        ctr.push(loop_once(&boxed, &out_dir.join("container"), &cfg, logs) / n as f64);
    }
    let (na, b, c) = (median(native), median(bin), median(ctr));
    println!("intercepted getppid (answered allow), {n} calls, medians of {reps}:");
    println!("  native, not intercepted:                 {na:.0} ns/call");
    println!("  binary mode under the shim:              {b:.0} ns/call");
    println!(
        "  in a container under the shim:           {c:.0} ns/call   {:.2}x binary mode  budget 1.1x {}",
        c / b,
        if c / b <= 1.1 { "OK" } else { "OVER" }
    );
}

struct Quiet;

impl suite::Observer for Quiet {
    fn started(&mut self, _: &str, _: u64, _: u64) {}
    fn finished(&mut self, _: &TestResult, _: u64, _: u64) {}
    fn test_done(&mut self, _: &str, _: u64, _: u64) {}
    fn note(&mut self, _: &str) {}
}

const THREE: &str = r#"
db = service("db", interface("main", "postgres", 5432), image = "faultbox/postgres:test", healthcheck = ready(timeout = "60s"))
cache = service("cache", interface("main", "redis", 6379), image = "faultbox/redis:test", healthcheck = tcp("localhost:6379"))
web = service("web", interface("main", "http", 8080), image = "faultbox/http:test",
    env = {"CACHE": cache.main.internal_addr}, depends_on = [db, cache], healthcheck = http("localhost:8080/health"))

def test_query():
    assert_eq(db.main.query(sql = "SELECT 1 AS x").data, [{"x": "1"}])

def test_cache():
    assert_eq(cache.main.send(data = "SET k v"), "+OK")

def test_web():
    assert_eq(web.main.get(path = "/hello").body, "hello from web")

def test_web_503():
    r = fault(web.main, error(path = "/hello", status = 503), run = lambda: web.main.get(path = "/hello"))
    assert_eq(r.status, 503)

def test_cache_slow_writes():
    r = fault(cache, write = delay("50ms"), run = lambda: cache.main.send(data = "SET k v"))
    assert_eq(r, "+OK")
"#;

fn bench_suite(shim: &Path, logs: &Path, docker: &Arc<Docker>) {
    let path = logs.join("three.star");
    std::fs::write(&path, THREE).expect("spec");
    let spec = faultbox_spec::load::load(&path).expect("load");
    docker.prepare(&spec.services, &spec.dir).expect("images");
    let cfg = config(shim, logs, Some(Arc::clone(docker)));
    let engine_before = docker.engine_time();
    let t = Instant::now();
    let summary = suite::run(
        &spec,
        &spec.tests,
        suite::Schedule {
            runs: 1,
            base_seed: 1,
            keep_passes: false,
            explore: None,
        },
        &cfg,
        &mut Quiet,
    );
    let wall = t.elapsed();
    let engine = docker.engine_time() - engine_before;
    assert_eq!(summary.failed, 0, "{:#?}", summary.results);
    println!("three containers (postgres, redis, http), five tests:");
    println!(
        "  wall time:                               {:.2} s ({:.0} ms a test)",
        wall.as_secs_f64(),
        wall.as_secs_f64() * 1e3 / 5.0
    );
    println!(
        "  waiting for the Docker engine:           {:.2} s ({:.0}% of it)",
        engine.as_secs_f64(),
        100.0 * engine.as_secs_f64() / wall.as_secs_f64()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child") {
        child(&args);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let bin_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    let shim = std::env::var_os("FAULTBOX_SHIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir.join("faultbox-shim"));
    assert!(
        shim.exists(),
        "no static shim at {} (run scripts/bench, which builds it)",
        shim.display()
    );
    let logs = std::env::temp_dir().join(format!("faultbox-bench-docker-{}", std::process::id()));
    std::fs::create_dir_all(&logs).expect("logs");
    let docker =
        Arc::new(Docker::connect(&logs).unwrap_or_else(|e| {
            panic!("{e} (scripts/setup starts dockerd and builds the images)")
        }));
    let reps = if quick { 5 } else { 11 };
    // `-- start`, `-- syscall` or `-- suite` runs one part.
    let only: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["start", "syscall", "suite"].contains(a))
        .collect();
    let part = |name: &str| only.is_empty() || only.contains(&name);
    if part("start") {
        bench_start(reps, &shim, &logs, &docker);
        println!();
    }
    if part("syscall") {
        bench_syscall(
            reps,
            if quick { 50_000 } else { 200_000 },
            &shim,
            &logs,
            &docker,
        );
        println!();
    }
    if part("suite") {
        bench_suite(&shim, &logs, &docker);
    }
    drop(docker);
    let _ = std::fs::remove_dir_all(&logs);
}
