//! The operator on the real cluster (docs/benchmarks.md):
//!
//! 1. from `kubectl apply` of a one-test FaultTest against a remote
//!    in-cluster Service to its verdict, split into validation and runner
//!    creation (phase Pending), pod scheduling and start (Running), the
//!    test and the status write (the verdict), medians of several;
//! 2. 100 FaultTests applied at once: every one reaches a verdict, no
//!    FaultTest gets a second runner, and the operator's reconcile rate
//!    and peak memory (VmHWM of its process on this node);
//! 3. the runner's proxy in pass-through against a direct connection
//!    between the same two pods: p50 ping-pong added, bulk share.
//!
//! Needs `KUBECONFIG`, the images loaded (`scripts/images`, then
//! `../shared/k8s/load-image localhost/faultbox:dev
//! localhost/faultbox-operator:dev faultbox/http:test`) and helm.
//! `cargo bench -p faultbox-e2e --bench cluster -- [--quick]`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn tool(name: &str, fallback: &str) -> String {
    if std::path::Path::new(fallback).exists() {
        fallback.to_string()
    } else {
        name.to_string()
    }
}

fn kubectl(args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new(tool("kubectl", "/opt/k8s/bin/kubectl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().expect("kubectl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn faulttest(name: &str, ns: &str, addr: &str) -> String {
    format!(
        "apiVersion: faultbox.io/v1alpha1\nkind: FaultTest\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  seed: 1\n  source: |\n    web = service(\"web\", interface(\"main\", \"http\", 8080), remote = \"{addr}\", healthcheck = http(\"{addr}/health\"))\n    def test_hello():\n        assert_eq(web.main.get(path = \"/hello\").status, 200)\n"
    )
}

fn phases(ns: &str) -> Vec<(String, String)> {
    let out = kubectl(&["get", "ft", "-n", ns, "-o", "json"], None);
    let doc: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    doc["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    (
                        i["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        i["status"]["phase"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("SKIPPED: no KUBECONFIG (../shared/k8s/up starts a cluster)");
        return;
    }
    let pid = std::process::id();
    let op_ns = format!("faultbox-bench-op-{pid}");
    let ns = format!("faultbox-bench-{pid}");
    let release = format!("fbb{pid}");
    kubectl(&["create", "namespace", &ns], None);
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/faultbox");
    let ok = Command::new(tool("helm", "/opt/helm/helm"))
        .args([
            "install",
            &release,
            chart,
            "-n",
            &op_ns,
            "--create-namespace",
        ])
        .arg(format!("--set=watchNamespaces={{{ns}}}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "helm install");
    kubectl(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: {ns}, labels: {{app: web}}}}\nspec:\n  containers: [{{name: web, image: faultbox/http:test, imagePullPolicy: Never}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {ns}}}\nspec:\n  selector: {{app: web}}\n  ports: [{{port: 8080, targetPort: 8080, protocol: TCP}}]\n"
        )),
    );
    kubectl(
        &[
            "wait",
            "--for=condition=Ready",
            "pod/web",
            "-n",
            &ns,
            "--timeout=120s",
        ],
        None,
    );
    kubectl(
        &[
            "wait",
            "--for=condition=Available",
            "deployment/faultbox-operator",
            "-n",
            &op_ns,
            "--timeout=120s",
        ],
        None,
    );
    let addr = format!("web.{ns}.svc.cluster.local:8080");

    // 1. One FaultTest at a time.
    let reps = if quick { 3 } else { 7 };
    let (mut pending, mut running, mut done, mut test_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..reps {
        let name = format!("one-{i}");
        let t = Instant::now();
        kubectl(&["apply", "-f", "-"], Some(&faulttest(&name, &ns, &addr)));
        let (mut p, mut r) = (None, None);
        loop {
            let phase = phases(&ns)
                .into_iter()
                .find(|(n, _)| *n == name)
                .map(|(_, p)| p)
                .unwrap_or_default();
            let now = t.elapsed().as_secs_f64() * 1e3;
            if p.is_none() && !phase.is_empty() {
                p = Some(now);
            }
            if r.is_none() && (phase == "Running" || phase == "Succeeded") {
                r = Some(now);
            }
            if phase == "Succeeded" || phase == "Failed" || phase == "Error" {
                assert_eq!(phase, "Succeeded", "{name}");
                done.push(now);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "{name} never finished"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pending.push(p.unwrap_or(0.0));
        running.push(r.unwrap_or(0.0));
        let out = kubectl(&["get", "ft", &name, "-n", &ns, "-o", "json"], None);
        let doc: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        test_ms.push(
            doc["status"]["tests"][0]["durationMs"]
                .as_f64()
                .unwrap_or(0.0),
        );
        kubectl(&["delete", "ft", &name, "-n", &ns], None);
    }
    let (p, r, d, tm) = (
        median(pending),
        median(running),
        median(done),
        median(test_ms),
    );
    println!(
        "kubectl apply -> verdict, one test against a remote Service, medians of {reps} (20 ms polling):"
    );
    println!("  validated, spec ConfigMap and runner pod created (Pending): {p:.0} ms");
    println!(
        "  runner pod scheduled and started (Running):                {r:.0} ms (+{:.0})",
        r - p
    );
    println!(
        "  verdict in the status (Succeeded):                         {d:.0} ms (+{:.0}; the test itself {tm:.0} ms)",
        d - r
    );

    // 2. 100 at once.
    let n = if quick { 30 } else { 100 };
    let all: String = (0..n)
        .map(|i| faulttest(&format!("many-{i}"), &ns, &addr))
        .collect::<Vec<_>>()
        .join("---\n");
    let metrics_path =
        format!("/api/v1/namespaces/{op_ns}/services/faultbox-operator-metrics:8080/proxy/metrics");
    let before = kubectl(&["get", "--raw", &metrics_path], None);
    let t = Instant::now();
    kubectl(&["apply", "-f", "-"], Some(&all));
    let mut peak_kib = 0u64;
    loop {
        let ps = phases(&ns);
        let finished = ps
            .iter()
            .filter(|(n, p)| {
                n.starts_with("many-") && ["Succeeded", "Failed", "Error"].contains(&p.as_str())
            })
            .count();
        if let Ok(pids) = Command::new("pgrep")
            .args(["-f", "^/faultbox-operator"])
            .output()
        {
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    peak_kib = peak_kib.max(kib);
                }
            }
        }
        if finished == n {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "{finished} of {n} finished"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = t.elapsed().as_secs_f64();
    let after = kubectl(&["get", "--raw", &metrics_path], None);
    let passed = phases(&ns)
        .iter()
        .filter(|(n, p)| n.starts_with("many-") && p == "Succeeded")
        .count();
    let started = metric(&after, "faultbox_operator_runs_started_total")
        - metric(&before, "faultbox_operator_runs_started_total");
    let reconciles = metric(&after, "faultbox_operator_reconciles_total")
        - metric(&before, "faultbox_operator_reconciles_total");
    let errors = metric(&after, "faultbox_operator_reconcile_errors_total")
        - metric(&before, "faultbox_operator_reconcile_errors_total");
    println!("{n} FaultTests applied at once:");
    println!("  all reached a verdict in {took:.1} s ({passed} passed)");
    println!(
        "  runner pods created: {started:.0} (one per FaultTest: {})",
        if started as usize == n { "yes" } else { "NO" }
    );
    println!(
        "  reconciles: {reconciles:.0} ({:.1}/s), {errors:.0} retried",
        reconciles / took
    );
    println!(
        "  operator peak memory (VmHWM): {:.1} MiB",
        peak_kib as f64 / 1024.0
    );

    // 3. The runner's proxy in pass-through, between the same two pods as
    // the direct path: `faultbox bench proxy` in one pod, its servers
    // (`faultbox bench serve`) in another.
    let pod = |name: &str, args: &str, restart: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  restartPolicy: {restart}\n  securityContext: {{runAsNonRoot: true, runAsUser: 65532, seccompProfile: {{type: RuntimeDefault}}}}\n  containers:\n    - name: bench\n      image: localhost/faultbox:dev\n      imagePullPolicy: IfNotPresent\n      command: [/faultbox]\n      args: {args}\n      securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}\n"
        )
    };
    kubectl(
        &["apply", "-f", "-"],
        Some(&pod("bench-servers", "[bench, serve]", "Always")),
    );
    kubectl(
        &[
            "wait",
            "--for=condition=Ready",
            "pod/bench-servers",
            "-n",
            &ns,
            "--timeout=120s",
        ],
        None,
    );
    let ip = kubectl(
        &[
            "get",
            "pod",
            "bench-servers",
            "-n",
            &ns,
            "-o",
            "jsonpath={.status.podIP}",
        ],
        None,
    );
    let (reps, mib) = if quick { (3, 64) } else { (7, 256) };
    kubectl(
        &["apply", "-f", "-"],
        Some(&pod(
            "bench-client",
            &format!(
                "[bench, proxy, --echo, \"{ip}:7000\", --sink, \"{ip}:7001\", --reps, \"{reps}\", --mib, \"{mib}\"]"
            ),
            "Never",
        )),
    );
    let t = Instant::now();
    loop {
        let phase = kubectl(
            &[
                "get",
                "pod",
                "bench-client",
                "-n",
                &ns,
                "-o",
                "jsonpath={.status.phase}",
            ],
            None,
        );
        if phase == "Succeeded" || phase == "Failed" {
            assert_eq!(phase, "Succeeded", "bench-client");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "bench-client never finished"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = kubectl(&["logs", "bench-client", "-n", &ns], None);
    let doc: Value = log
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("the bench's JSON line");
    println!("the runner's TCP proxy in pass-through, pod to pod ({reps} reps, medians):");
    println!(
        "  64-byte ping-pong p50: direct {:.1} µs, through the proxy {:.1} µs (adds {:.1} µs)",
        doc["ping_pong_us"]["direct"].as_f64().unwrap_or(0.0),
        doc["ping_pong_us"]["proxy"].as_f64().unwrap_or(0.0),
        doc["ping_pong_us"]["added"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  bulk {mib} MiB one way: direct {:.0} MiB/s, through the proxy {:.0} MiB/s ({:.1}% of direct)",
        doc["bulk_mib_s"]["direct"].as_f64().unwrap_or(0.0),
        doc["bulk_mib_s"]["proxy"].as_f64().unwrap_or(0.0),
        doc["bulk_mib_s"]["share"].as_f64().unwrap_or(0.0) * 100.0
    );

    let _ = Command::new(tool("helm", "/opt/helm/helm"))
        .args(["uninstall", &release, "-n", &op_ns])
        .stdout(Stdio::null())
        .status();
    kubectl(&["delete", "namespace", &ns, &op_ns, "--wait=false"], None);
}
