//! The operator on a real cluster (`../shared/k8s`): the chart installed
//! with helm, FaultTests applied with kubectl, their status, printer
//! columns, Events and result ConfigMaps read back, and deletion leaving
//! nothing behind. Runs when `KUBECONFIG` names a cluster; `scripts/test`
//! builds and loads the images first (`scripts/images`, `load-image`) and
//! says loudly when it skips this, and `.ci/run` brings the cluster up so
//! CI never does.

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

fn kubectl(args: &[&str]) -> (bool, String) {
    let out = Command::new(tool("kubectl", "/opt/k8s/bin/kubectl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("kubectl");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), text)
}

fn kubectl_stdin(args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(tool("kubectl", "/opt/k8s/bin/kubectl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().expect("kubectl");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn must(args: &[&str]) -> String {
    let (ok, out) = kubectl(args);
    assert!(ok, "kubectl {args:?}: {out}");
    out
}

/// Removes the namespaces and the release however the test ends.
struct Cleanup {
    namespaces: Vec<String>,
    release: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new(tool("helm", "/opt/helm/helm"))
            .args(["uninstall", &self.release, "-n", &self.namespaces[0]])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        for ns in &self.namespaces {
            let _ = kubectl(&["delete", "namespace", ns, "--wait=false"]);
        }
    }
}

fn faulttest(name: &str, ns: &str, source: &str, extra: &str) -> String {
    let indented: String = source.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: faultbox.io/v1alpha1\nkind: FaultTest\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{extra}  source: |\n{indented}"
    )
}

fn status(ns: &str, name: &str) -> Value {
    let (_, out) = kubectl(&["get", "ft", name, "-n", ns, "-o", "json"]);
    serde_json::from_str::<Value>(&out)
        .map(|v| v["status"].clone())
        .unwrap_or(Value::Null)
}

fn wait_done(ns: &str, name: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let st = status(ns, name);
        let phase = st["phase"].as_str().unwrap_or_default().to_string();
        if ["Succeeded", "Failed", "Invalid", "Error"].contains(&phase.as_str()) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{name} still {phase:?} after {limit:?}: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn faulttests_run_in_the_cluster_and_report_their_verdicts() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!(
            "SKIPPED: no KUBECONFIG, so the operator's cluster tests did not run (../shared/k8s/up starts a cluster; .ci/run does)"
        );
        return;
    }
    let pid = std::process::id();
    let op_ns = format!("faultbox-e2e-op-{pid}");
    let ns = format!("faultbox-e2e-{pid}");
    let release = format!("fb{pid}");
    let _cleanup = Cleanup {
        namespaces: vec![op_ns.clone(), ns.clone()],
        release: release.clone(),
    };
    must(&["create", "namespace", &ns]);
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/faultbox");
    let helm = Command::new(tool("helm", "/opt/helm/helm"))
        .args([
            "install",
            &release,
            chart,
            "-n",
            &op_ns,
            "--create-namespace",
        ])
        .arg(format!("--set=watchNamespaces={{{ns}}}"))
        // Two replicas: one leads, and nothing may run twice.
        .arg("--set=replicas=2")
        .output()
        .expect("helm");
    assert!(helm.status.success(), "helm install: {helm:?}");

    // A real HTTP Service in the cluster for the FaultTests to fault.
    let web = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: {ns}, labels: {{app: web}}}}
spec:
  containers:
    - name: web
      image: faultbox/http:test
      imagePullPolicy: Never
      ports: [{{containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{app: web}}
  ports: [{{port: 8080, targetPort: 8080}}]
"#
    );
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &web);
    assert!(ok, "{out}");
    must(&[
        "wait",
        "--for=condition=Ready",
        "pod/web",
        "-n",
        &ns,
        "--timeout=120s",
    ]);
    let addr = format!("web.{ns}.svc.cluster.local:8080");
    let pass = format!(
        r#"load("@faultbox/discovery/k8s.star", "k8s")
web = service("web", interface("main", "http", 8080), remote = k8s.endpoint("web", 8080, namespace = "{ns}"), healthcheck = http("{addr}/health"))

def test_hello():
    assert_eq(web.main.get(path = "/hello").status, 200)

def test_unavailable():
    r = fault(web.main, error(path = "/hello", status = 503), run = lambda: web.main.get(path = "/hello"))
    assert_eq(r.status, 503)
"#
    );
    let fail = format!(
        r#"web = service("web", interface("main", "http", 8080), remote = "{addr}", healthcheck = http("{addr}/health"))

def test_wrong_expectation():
    assert_eq(web.main.get(path = "/hello").status, 201, "the service answers 200")
"#
    );
    let invalid = "def test_broken(:\n    pass\n";
    let manifests = [
        faulttest("passes", &ns, &pass, "  seed: 42\n"),
        faulttest("fails", &ns, &fail, ""),
        faulttest("invalid", &ns, invalid, ""),
        faulttest(
            "two-sources",
            &ns,
            "def test_a():\n    pass\n",
            "  sourceFrom: {configMapKeyRef: {name: x, key: spec.star}}\n",
        ),
        faulttest(
            "zero-timeout",
            &ns,
            "def test_a():\n    pass\n",
            "  timeout: 0s\n",
        ),
    ]
    .join("---\n");
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &manifests);
    assert!(ok, "{out}");

    let limit = Duration::from_secs(240);
    let passes = wait_done(&ns, "passes", limit);
    assert_eq!(passes["phase"], "Succeeded", "{passes:#}");
    assert_eq!(passes["verdict"], "Pass");
    assert_eq!(passes["passed"], 2);
    let tests = passes["tests"].as_array().expect("tests");
    assert_eq!(tests.len(), 2);
    assert!(tests.iter().all(|t| t["seed"] == 42), "{tests:?}");
    let result_ref = passes["resultRef"].as_str().expect("resultRef").to_string();
    let cm = must(&["get", "configmap", &result_ref, "-n", &ns, "-o", "json"]);
    let cm: Value = serde_json::from_str(&cm).expect("configmap json");
    let doc: Value = serde_json::from_str(cm["data"]["result.json"].as_str().expect("result.json"))
        .expect("result document");
    let unavailable = doc["tests"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == "test_unavailable"))
        .expect("test_unavailable in the document");
    assert_eq!(unavailable["faults"][0]["hits"], 1, "{unavailable:#}");

    let fails = wait_done(&ns, "fails", limit);
    assert_eq!(fails["phase"], "Failed", "{fails:#}");
    assert_eq!(fails["verdict"], "Fail");
    assert!(
        fails["tests"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("200 != 201")),
        "{fails:#}"
    );

    for (name, reason, words) in [
        ("invalid", "InvalidSpec", "spec.star:1:"),
        ("two-sources", "BothSources", "keep one"),
        ("zero-timeout", "BadTimeout", "zero"),
    ] {
        let st = wait_done(&ns, name, limit);
        assert_eq!(st["phase"], "Invalid", "{name}: {st:#}");
        assert!(st.get("verdict").is_none_or(Value::is_null), "{st:#}");
        let c = st["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Validated"))
            .expect("Validated condition");
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("False"), Some(reason))
        );
        assert!(
            c["message"].as_str().is_some_and(|m| m.contains(words)),
            "{c}"
        );
        // Nothing was created for it.
        let (_, pods) = kubectl(&[
            "get",
            "pods",
            "-n",
            &ns,
            "-l",
            &format!("faultbox.io/faulttest={name}"),
            "-o",
            "name",
        ]);
        assert!(pods.trim().is_empty(), "{name}: {pods}");
    }

    // Printer columns.
    let table = must(&["get", "ft", "-n", &ns]);
    let header = table.lines().next().unwrap_or_default();
    for col in ["NAME", "PHASE", "VERDICT", "PASSED", "FAILED", "AGE"] {
        assert!(header.contains(col), "{table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("passes") && l.contains("Succeeded") && l.contains("Pass")),
        "{table}"
    );
    // Events.
    let events = must(&["get", "events", "-n", &ns, "-o", "json"]);
    let events: Value = serde_json::from_str(&events).expect("events json");
    let reasons: Vec<String> = events["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|e| e["reason"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for want in [
        "RunStarted",
        "RunSucceeded",
        "RunFailed",
        "TestFailed",
        "InvalidSpec",
    ] {
        assert!(reasons.iter().any(|r| r == want), "{want} in {reasons:?}");
    }
    // Finished runner pods are gone.
    let (_, pods) = kubectl(&[
        "get",
        "pods",
        "-n",
        &ns,
        "-l",
        "faultbox.io/faulttest",
        "-o",
        "name",
    ]);
    assert!(pods.trim().is_empty(), "{pods}");
    // The operator's metrics.
    let path =
        format!("/api/v1/namespaces/{op_ns}/services/faultbox-operator-metrics:8080/proxy/metrics");
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        // The Service has endpoints once the readiness probe passed.
        let (ok, metrics) = kubectl(&["get", "--raw", &path]);
        if ok || Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for want in [
        "faultbox_operator_runs_finished_total{result=\"pass\"} 1",
        "faultbox_operator_runs_finished_total{result=\"fail\"} 1",
        "faultbox_operator_runs_finished_total{result=\"invalid\"} 3",
        "faultbox_operator_reconcile_duration_seconds_count",
    ] {
        assert!(metrics.contains(want), "{want} in {metrics}");
    }

    // Deleting a FaultTest mid-run leaves no pod behind.
    let slow = format!(
        r#"web = service("web", interface("main", "http", 8080), remote = "{addr}", healthcheck = http("{addr}/health"))

def test_slow():
    fault(web.main, delay(path = "/hello", delay = "120s"), run = lambda: web.main.get(path = "/hello"))
"#
    );
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &faulttest("slow", &ns, &slow, ""));
    assert!(ok, "{out}");
    wait_phase(&ns, "slow", "Running");
    must(&["delete", "ft", "slow", "-n", &ns]);
    wait_gone(
        &ns,
        &["pods", "configmaps"],
        "slow",
        Duration::from_secs(90),
    );

    // A runner image that cannot be pulled: phase Error, the reason named.
    let quick = "def test_a():\n    pass\n";
    let (ok, out) = kubectl_stdin(
        &["apply", "-f", "-"],
        &faulttest(
            "no-image",
            &ns,
            quick,
            "  runner: {image: \"localhost/faultbox-missing:none\"}\n",
        ),
    );
    assert!(ok, "{out}");
    let st = wait_done(&ns, "no-image", Duration::from_secs(120));
    assert_eq!(st["phase"], "Error", "{st:#}");
    let c = condition(&st, "RunnerReady");
    assert_eq!(c["reason"], "ImagePull", "{st:#}");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("localhost/faultbox-missing:none")),
        "{c}"
    );

    // A runner no node can take: Pending, with the scheduler's reason.
    let (ok, out) = kubectl_stdin(
        &["apply", "-f", "-"],
        &faulttest("too-big", &ns, quick, "  runner: {cpu: \"64\"}\n"),
    );
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(&ns, "too-big");
        let c = condition(&st, "RunnerReady");
        if c["reason"] == "Unschedulable" {
            assert_eq!(st["phase"], "Pending");
            assert!(
                c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("Insufficient cpu")),
                "{c}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never unschedulable: {st:#}");
        std::thread::sleep(Duration::from_millis(500));
    }
    must(&["delete", "ft", "too-big", "-n", &ns]);

    // Two operators, one leader: only it is ready (and holds the Lease).
    let ops = must(&[
        "get",
        "pods",
        "-n",
        &op_ns,
        "-l",
        "app.kubernetes.io/name=faultbox-operator",
        "-o",
        "json",
    ]);
    let ops: Value = serde_json::from_str(&ops).expect("pods json");
    let ready = ops["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|p| {
                    p["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
                })
                .count()
        })
        .unwrap_or(0);
    assert_eq!(ready, 1, "{ops:#}");
    let lease = must(&[
        "get",
        "lease",
        "faultbox-operator",
        "-n",
        &op_ns,
        "-o",
        "json",
    ]);
    let lease: Value = serde_json::from_str(&lease).expect("lease json");
    assert!(
        lease["spec"]["holderIdentity"]
            .as_str()
            .is_some_and(|h| h.starts_with("faultbox-operator-")),
        "{lease:#}"
    );

    // An edited spec (a new generation) cancels the running one.
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &faulttest("edited", &ns, &slow, ""));
    assert!(ok, "{out}");
    wait_phase(&ns, "edited", "Running");
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &faulttest("edited", &ns, quick, ""));
    assert!(ok, "{out}");
    let st = wait_done(&ns, "edited", Duration::from_secs(120));
    assert_eq!(
        (st["phase"].as_str(), st["observedGeneration"].as_i64()),
        (Some("Succeeded"), Some(2)),
        "{st:#}"
    );
    // The first generation's runner goes too (it was told to stop).
    wait_gone(&ns, &["pods"], "edited", Duration::from_secs(60));

    // The operators restarted mid-run (the leader and its standby): the
    // new leader picks the run up: one runner, one result.
    let held = format!(
        r#"web = service("web", interface("main", "http", 8080), remote = "{addr}", healthcheck = http("{addr}/health"))

def test_held():
    r = fault(web.main, delay(path = "/hello", delay = "8s"), run = lambda: web.main.get(path = "/hello"))
    assert_eq(r.status, 200)
"#
    );
    let (ok, out) = kubectl_stdin(
        &["apply", "-f", "-"],
        &faulttest("restarted", &ns, &held, ""),
    );
    assert!(ok, "{out}");
    wait_phase(&ns, "restarted", "Running");
    must(&[
        "delete",
        "pod",
        "-n",
        &op_ns,
        "-l",
        "app.kubernetes.io/name=faultbox-operator",
        "--wait=false",
    ]);
    let st = wait_done(&ns, "restarted", Duration::from_secs(180));
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    let events = must(&["get", "events", "-n", &ns, "-o", "json"]);
    let events: Value = serde_json::from_str(&events).expect("events json");
    let started = events["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                // `kubectl get events` shows the core/v1 view of them.
                .filter(|e| {
                    e["reason"] == "RunStarted"
                        && (e["involvedObject"]["name"] == "restarted"
                            || e["regarding"]["name"] == "restarted")
                })
                .map(|e| e["count"].as_u64().unwrap_or(1))
                .sum::<u64>()
        })
        .unwrap_or(0);
    assert_eq!(started, 1, "one runner for the generation");
}

fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or(Value::Null)
}

fn wait_phase(ns: &str, name: &str, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while status(ns, name)["phase"] != phase {
        assert!(
            Instant::now() < deadline,
            "{name} never {phase}: {:#}",
            status(ns, name)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until no object of `kinds` is labelled as `name`'s.
fn wait_gone(ns: &str, kinds: &[&str], name: &str, limit: Duration) {
    let label = format!("faultbox.io/faulttest={name}");
    let deadline = Instant::now() + limit;
    loop {
        let left: Vec<String> = kinds
            .iter()
            .map(|k| kubectl(&["get", k, "-n", ns, "-l", &label, "-o", "name"]).1)
            .filter(|out| !out.trim().is_empty())
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}
