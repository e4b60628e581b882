//! Benchmarks of cluster mode (issue budgets in docs/benchmarks.md), on
//! the real cluster of `../shared/k8s` with the images `scripts/test`
//! loads into it. This process plays a FaultTest's runner from the node
//! (the engine's `Cluster` reads its kubeconfig, and the node's bridge
//! address, 10.244.0.1, is where the pods' shims dial):
//!
//! 1. a service pod under the shim (its init container, the shim dialling
//!    in, the target's launch) from create to healthy, against the same
//!    image, command and restricted securityContext in a pod without the
//!    shim, created through the same API and probed the same way (budget:
//!    within 1.1x, medians of at least 10);
//! 2. an intercepted syscall (`getppid`, answered "allow") in a pod
//!    against the same loop as a binary-mode service (budget: within
//!    1.1x), with the loop's native cost beside them.
//!
//! The syscall loop is this binary, re-executed as `child getppid N`: an
//! image of it (`FROM faultbox/services:bookworm`, Debian 12 like the
//! machine) is built and loaded into the cluster first. Run with
//! `cargo bench -p faultbox-engine --bench pods -- [--quick] [start|syscall]`
//! with KUBECONFIG set.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultbox_engine::kubernetes::{Cluster, RunnerPlace};
use faultbox_engine::runtime::{RunConfig, TestRun};
use faultbox_spec::model::{ContainerDef, Healthcheck, ImageSource, InterfaceDef, ServiceDef};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};

const NODE_IP: &str = "10.244.0.1";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `child getppid N [OUT]`: the loop, its ns on stdout (or in OUT), then
/// (in a pod) it waits to be stopped, so the pod's log can be read.
fn child(args: &[String]) {
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(std::os::unix::process::parent_id());
    }
    let ns = t.elapsed().as_nanos();
    match args.get(3) {
        Some(out) => {
            let tmp = format!("{out}.tmp");
            std::fs::write(&tmp, ns.to_string()).expect("write result");
            std::fs::rename(&tmp, out).expect("publish result");
        }
        None => {
            println!("loop-ns={ns}");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
    }
}

fn tool(name: &str, fallback: &str) -> String {
    if Path::new(fallback).exists() {
        fallback.to_string()
    } else {
        name.to_string()
    }
}

fn kubectl(args: &[&str], input: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(tool("kubectl", "/opt/k8s/bin/kubectl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.unwrap_or_default().as_bytes());
    }
    let out = child.wait_with_output().expect("kubectl");
    assert!(out.status.success(), "kubectl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn service(name: &str, image: &str, argv: &[&str], port: u16) -> ServiceDef {
    ServiceDef {
        name: name.into(),
        binary: String::new(),
        args: vec![],
        env: vec![],
        interfaces: vec![InterfaceDef {
            name: "main".into(),
            protocol: "tcp".into(),
            port,
            tls: None,
        }],
        depends_on: vec![],
        healthcheck: None,
        ops: BTreeMap::new(),
        user: Some("65532".into()),
        remote: BTreeMap::new(),
        container: Some(ContainerDef {
            image: ImageSource::Pull(image.into()),
            entrypoint: Some(vec![argv[0].to_string()]),
            cmd: Some(argv[1..].iter().map(|s| s.to_string()).collect()),
            ports: BTreeMap::new(),
            volumes: vec![],
        }),
        seccomp: true,
        reuse: false,
        declared_at: String::new(),
    }
}

const REDIS: &[&str] = &[
    "redis-server",
    "--protected-mode",
    "no",
    "--save",
    "",
    "--appendonly",
    "no",
];

fn config(logs: &Path, cluster: Option<Arc<Cluster>>, shim: &Path) -> RunConfig {
    RunConfig {
        shim: shim.to_path_buf(),
        log_dir: logs.to_path_buf(),
        test_timeout: Duration::from_secs(120),
        stop_grace: Duration::from_secs(2),
        stop: Default::default(),
        docker: None,
        cluster,
        kept: Default::default(),
        explore: None,
    }
}

/// Milliseconds from nothing to healthy for a redis pod under the shim.
fn shimmed_once(cfg: &RunConfig, logs: &Path) -> f64 {
    let mut def = service("cache", "faultbox/redis:test", REDIS, 6379);
    def.healthcheck = Some(Healthcheck::Tcp {
        addr: "localhost:6379".into(),
        timeout: Duration::from_secs(60),
    });
    let run = TestRun::new("bench", 1, vec![def], vec!["write".into()], cfg.clone());
    let t = Instant::now();
    run.start_services(logs).expect("start");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    run.stop_services();
    ms
}

/// The same image, command and securityContext in a pod of its own, no
/// init container and no shim: created, its address read as soon as the
/// API has it, then the same TCP probe.
fn plain_once(rt: &tokio::runtime::Runtime, pods: &Api<Pod>, n: usize) -> f64 {
    let name = format!("plain-{n}");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "cache",
                "image": "faultbox/redis:test",
                "imagePullPolicy": "IfNotPresent",
                "command": REDIS,
                "ports": [{"containerPort": 6379}],
                "securityContext": {"allowPrivilegeEscalation": false, "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }))
    .expect("pod");
    let t = Instant::now();
    rt.block_on(pods.create(&PostParams::default(), &pod))
        .expect("create");
    let deadline = Instant::now() + Duration::from_secs(60);
    let ip = loop {
        let p = rt.block_on(pods.get(&name)).expect("get");
        if let Some(ip) = p.status.and_then(|s| s.pod_ip).filter(|ip| !ip.is_empty()) {
            break ip;
        }
        assert!(Instant::now() < deadline, "{name}: no address");
        std::thread::sleep(Duration::from_millis(5));
    };
    let addr: SocketAddr = format!("{ip}:6379").parse().expect("addr");
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "{name}: never listened");
        std::thread::sleep(Duration::from_millis(1));
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = rt.block_on(pods.delete(&name, &DeleteParams::background().grace_period(0)));
    ms
}

fn bench_start(reps: usize, cfg: &RunConfig, logs: &Path, ns: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt.block_on(kube::Client::try_default()).expect("client");
    let pods: Api<Pod> = Api::namespaced(client, ns);
    // One warm-up of each.
    shimmed_once(cfg, logs);
    plain_once(&rt, &pods, 0);
    let (mut shimmed, mut plain) = (Vec::new(), Vec::new());
    for i in 0..reps {
        shimmed.push(shimmed_once(cfg, logs));
        plain.push(plain_once(&rt, &pods, i + 1));
    }
    let (s, p) = (median(shimmed.clone()), median(plain.clone()));
    println!("service pod, create to healthy (redis, restricted), medians of {reps}:");
    println!("  under faultbox-shim (init container + shim): {s:.0} ms   (all: {shimmed:.0?})");
    println!(
        "  same pod without the shim:                   {p:.0} ms   shim {:.2}x  budget 1.1x {}",
        s / p,
        if s / p <= 1.1 { "OK" } else { "OVER" }
    );
}

/// Builds `localhost/faultbox-bench-loop:<pid>`: this binary on Debian 12.
fn loop_image() -> String {
    let me = std::env::current_exe().expect("exe");
    let ctx = std::env::temp_dir().join(format!("fb-bench-loop-{}", std::process::id()));
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::copy(&me, ctx.join("loop")).expect("copy");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM faultbox/services:bookworm\nCOPY loop /usr/local/bin/loop\n",
    )
    .expect("Dockerfile");
    let image = format!("localhost/faultbox-bench-loop:{}", std::process::id());
    let st = Command::new("docker")
        .args(["build", "-q", "-t", &image, &ctx.to_string_lossy()])
        .stdout(Stdio::null())
        .status()
        .expect("docker build");
    assert!(st.success(), "docker build {image}");
    let _ = std::fs::remove_dir_all(&ctx);
    let k8s = std::env::var("K8S_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/k8s").to_string());
    let st = Command::new(format!("{k8s}/load-image"))
        .arg(&image)
        .stdout(Stdio::null())
        .status()
        .expect("load-image");
    assert!(st.success(), "load-image {image}");
    image
}

/// ns per intercepted getppid in a pod: the loop's line in its log, read
/// through the API every 250 ms (spawning kubectl this often would take
/// a core from the loop being measured).
/// `rt` must be the runtime the client was made on: its requests are
/// served by a task there.
fn pod_loop_once(
    def: &ServiceDef,
    cfg: &RunConfig,
    logs: &Path,
    rt: &tokio::runtime::Runtime,
    pods: &Api<Pod>,
) -> f64 {
    let run = TestRun::new(
        "bench",
        1,
        vec![def.clone()],
        vec!["getppid".into()],
        cfg.clone(),
    );
    run.start_services(logs).expect("start");
    let list = ListParams::default().labels("faultbox.io/service=loop");
    let deadline = Instant::now() + Duration::from_secs(120);
    let ns_total = loop {
        std::thread::sleep(Duration::from_millis(250));
        let mut text = String::new();
        for p in rt
            .block_on(pods.list(&list))
            .map(|l| l.items)
            .unwrap_or_default()
        {
            let name = p.metadata.name.unwrap_or_default();
            text.push_str(
                &rt.block_on(pods.logs(&name, &LogParams::default()))
                    .unwrap_or_default(),
            );
        }
        if let Some(v) = text
            .lines()
            .find_map(|l| l.strip_prefix("loop-ns="))
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            break v;
        }
        assert!(Instant::now() < deadline, "the loop never reported: {text}");
    };
    run.stop_services();
    ns_total
}

/// The loop in a pod of its own, without the shim: ns for `n` calls.
fn plain_loop_once(
    rt: &tokio::runtime::Runtime,
    pods: &Api<Pod>,
    image: &str,
    n: u64,
    i: usize,
) -> f64 {
    let name = format!("bare-loop-{i}");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "loop",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/usr/local/bin/loop", "child", "getppid", n.to_string()],
                "securityContext": {"allowPrivilegeEscalation": false, "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }))
    .expect("pod");
    rt.block_on(pods.create(&PostParams::default(), &pod))
        .expect("create");
    let deadline = Instant::now() + Duration::from_secs(120);
    let ns = loop {
        std::thread::sleep(Duration::from_millis(250));
        let text = rt
            .block_on(pods.logs(&name, &LogParams::default()))
            .unwrap_or_default();
        if let Some(v) = text
            .lines()
            .find_map(|l| l.strip_prefix("loop-ns="))
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            break v;
        }
        assert!(Instant::now() < deadline, "{name} never reported: {text}");
    };
    let _ = rt.block_on(pods.delete(&name, &DeleteParams::background().grace_period(0)));
    ns
}

fn binary_loop_once(def: &ServiceDef, out: &Path, cfg: &RunConfig, logs: &Path) -> f64 {
    let _ = std::fs::remove_file(out);
    let run = TestRun::new(
        "bench",
        1,
        vec![def.clone()],
        vec!["getppid".into()],
        cfg.clone(),
    );
    run.start_services(logs).expect("start");
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

fn bench_syscall(reps: usize, n: u64, cfg: &RunConfig, local: &RunConfig, logs: &Path, ns: &str) {
    let image = loop_image();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt.block_on(kube::Client::try_default()).expect("client");
    let pods: Api<Pod> = Api::namespaced(client, ns);
    let me = std::env::current_exe().expect("exe");
    let pod = service(
        "loop",
        &image,
        &["/usr/local/bin/loop", "child", "getppid", &n.to_string()],
        1,
    );
    let host_out = logs.join("binary-loop");
    let mut binary = service("loop", "", &["x"], 1);
    binary.container = None;
    binary.user = None;
    binary.binary = me.to_string_lossy().into_owned();
    binary.args = vec![
        "child".into(),
        "getppid".into(),
        n.to_string(),
        host_out.to_string_lossy().into_owned(),
    ];
    let (mut native, mut bin, mut inpod) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let native_out = logs.join("native-loop");
        let _ = std::fs::remove_file(&native_out);
        let status = Command::new(&me)
            .args(["child", "getppid", &n.to_string()])
            .arg(&native_out)
            .status()
            .expect("native loop");
        assert!(status.success());
        let t: f64 = std::fs::read_to_string(&native_out)
            .expect("native result")
            .trim()
            .parse()
            .expect("ns");
        native.push(t / n as f64);
        bin.push(binary_loop_once(&binary, &host_out, local, logs) / n as f64);
        inpod.push(pod_loop_once(&pod, cfg, logs, &rt, &pods) / n as f64);
    }
    // The loop alone in a pod, no shim: what the runtime's seccomp
    // profile (RuntimeDefault, which "restricted" requires) adds to every
    // syscall, the target's and the shim's alike.
    let mut bare = Vec::new();
    for i in 0..reps.min(5) {
        bare.push(plain_loop_once(&rt, &pods, &image, n, i) / n as f64);
    }
    let (na, b, p) = (median(native), median(bin), median(inpod));
    let bp = median(bare);
    println!("intercepted getppid (answered allow), {n} calls, medians of {reps}:");
    println!("  native, not intercepted:                 {na:.0} ns/call");
    println!("  native in a pod (RuntimeDefault only):   {bp:.0} ns/call");
    println!("  binary mode under the shim:              {b:.0} ns/call");
    println!(
        "  in a pod under the shim:                 {p:.0} ns/call   {:.2}x binary mode  budget 1.1x {}",
        p / b,
        if p / b <= 1.1 { "OK" } else { "OVER" }
    );
    let _ = Command::new("docker").args(["rmi", &image]).output();
    // And the cluster's copy: the kubelet collects images only when its
    // disk is nearly full, and then it takes the test images too.
    let _ = Command::new("ctr")
        .args([
            "--address",
            "/run/k8s/containerd/containerd.sock",
            "-n",
            "k8s.io",
        ])
        .args(["images", "rm", &image])
        .output();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child") {
        child(&args);
        return;
    }
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: start the cluster with ../shared/k8s/up and export what it prints"
    );
    let quick = args.iter().any(|a| a == "--quick");
    let only: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["start", "syscall"].contains(a))
        .collect();
    let part = |name: &str| only.is_empty() || only.contains(&name);
    let bin_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    let shim = std::env::var_os("FAULTBOX_SHIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir.join("faultbox-shim"));
    assert!(
        shim.exists(),
        "no static shim at {} (scripts/build makes it)",
        shim.display()
    );
    let pid = std::process::id();
    // The pods are BestEffort: the kubelet gives each pod's cgroup
    // cpu.shares 2, against 1024 for a process, so a runner that is a plain
    // process (on the node, or directly in the BestEffort cgroup) wins
    // every contended slice from the pods it measures. In a cluster the
    // runner is a BestEffort pod too: run in a cgroup of our own beside the
    // pods, with the same 2 shares (binary mode's children inherit it).
    let besteffort = Path::new("/sys/fs/cgroup/cpu/kubepods/besteffort");
    if besteffort.is_dir() {
        let mine = besteffort.join(format!("faultbox-bench-{pid}"));
        std::fs::create_dir_all(&mine).expect("a cpu cgroup for the bench");
        std::fs::write(mine.join("cpu.shares"), "2").expect("its shares");
        std::fs::write(mine.join("cgroup.procs"), pid.to_string()).expect("join it");
        println!("(in a BestEffort pod's cpu cgroup, cpu.shares 2, as a runner pod is)");
    }
    let ns = format!("faultbox-bench-pods-{pid}");
    let logs = std::env::temp_dir().join(format!("faultbox-bench-pods-{pid}"));
    std::fs::create_dir_all(&logs).expect("logs");
    // The FaultTest the pods belong to: the CRD (as the chart installs
    // it) and an object no operator watches here.
    let crd = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../operator/crds/faulttest.yaml"
    );
    kubectl(&["apply", "-f", crd], None);
    kubectl(&["create", "namespace", &ns], None);
    let ft = format!(
        "apiVersion: faultbox.io/v1alpha1\nkind: FaultTest\nmetadata: {{name: bench, namespace: {ns}}}\nspec: {{source: \"def test_a():\\n    pass\\n\"}}\n"
    );
    kubectl(&["apply", "-f", "-"], Some(&ft));
    let uid = kubectl(
        &[
            "get",
            "ft",
            "bench",
            "-n",
            &ns,
            "-o",
            "jsonpath={.metadata.uid}",
        ],
        None,
    );
    let place = RunnerPlace {
        namespace: ns.clone(),
        ip: NODE_IP.parse().expect("node ip"),
        faulttest: "bench".into(),
        uid: uid.trim().to_string(),
        image: "localhost/faultbox:dev".into(),
        generation: "1".into(),
        ca_dir: logs.join("run-ca"),
    };
    let cluster = Arc::new(Cluster::connect_as(&logs, place).unwrap_or_else(|e| panic!("{e}")));
    let cfg = config(&logs, Some(Arc::clone(&cluster)), &shim);
    let local = config(&logs, None, &shim);
    let reps = if quick { 5 } else { 11 };
    if part("start") {
        bench_start(reps, &cfg, &logs, &ns);
        println!();
    }
    if part("syscall") {
        bench_syscall(
            reps,
            if quick { 50_000 } else { 200_000 },
            &cfg,
            &local,
            &logs,
            &ns,
        );
    }
    drop(cfg);
    drop(cluster);
    let _ = Command::new(tool("kubectl", "/opt/k8s/bin/kubectl"))
        .args(["delete", "namespace", &ns, "--wait=false"])
        .output();
    let _ = std::fs::remove_dir_all(&logs);
    if besteffort.is_dir() {
        // Out of our cgroup, so that it can go.
        let _ = std::fs::write("/sys/fs/cgroup/cpu/cgroup.procs", pid.to_string());
        let _ = std::fs::remove_dir(besteffort.join(format!("faultbox-bench-{pid}")));
    }
}
