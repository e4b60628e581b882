//! The operator on a real cluster (`../shared/k8s`): the chart installed
//! with helm, FaultTests applied with kubectl, their status, printer
//! columns, Events and result ConfigMaps read back, and deletion leaving
//! nothing behind. Runs when `KUBECONFIG` names a cluster; `scripts/test`
//! builds and loads the images first (`scripts/images`, `load-image`) and
//! says loudly when it skips this, and `.ci/run` brings the cluster up so
//! CI never does.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The test cluster's registry, as pods reach it (`../shared/k8s/registry`).
const REGISTRY: &str = "10.244.0.1:5000";

/// A script of `../shared/k8s` (`K8S_DIR` overrides where it is).
fn k8s_script(name: &str) -> String {
    let dir = std::env::var("K8S_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/k8s").to_string());
    format!("{dir}/{name}")
}

/// Builds `FROM faultbox/http:test` plus `lines` as `name` and pushes it
/// to the cluster's registry, returning the name pods use.
fn registry_image(name: &str, lines: &str) -> String {
    let ctx = std::env::temp_dir().join(format!("fb-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&ctx).expect("context");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM faultbox/http:test\n{lines}"),
    )
    .expect("Dockerfile");
    let local = format!("localhost/{name}:e2e");
    let built = Command::new("docker")
        .args(["build", "-q", "-t", &local, &ctx.to_string_lossy()])
        .output()
        .expect("docker build");
    let _ = std::fs::remove_dir_all(&ctx);
    assert!(built.status.success(), "docker build {local}: {built:?}");
    let pushed = Command::new(k8s_script("registry"))
        .args(["push", &local])
        .output()
        .expect("registry push");
    assert!(pushed.status.success(), "registry push {local}: {pushed:?}");
    let text = String::from_utf8_lossy(&pushed.stdout);
    let name = text.lines().last().unwrap_or_default().trim().to_string();
    assert!(name.starts_with(REGISTRY), "{text}");
    name
}

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
    // A second watched namespace, where the operator is denied pods.
    let denied_ns = format!("faultbox-e2e-denied-{pid}");
    let release = format!("fb{pid}");
    let _cleanup = Cleanup {
        namespaces: vec![op_ns.clone(), ns.clone(), denied_ns.clone()],
        release: release.clone(),
    };
    must(&["create", "namespace", &ns]);
    must(&["create", "namespace", &denied_ns]);
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
        .arg(format!("--set=watchNamespaces={{{ns},{denied_ns}}}"))
        // The cluster's own registry speaks plain HTTP.
        .arg(format!("--set=insecureRegistries={{{REGISTRY}}}"))
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
---
apiVersion: v1
kind: Pod
metadata: {{name: cache, namespace: {ns}, labels: {{app: cache}}}}
spec:
  containers:
    - name: redis
      image: faultbox/redis:test
      imagePullPolicy: Never
      ports: [{{containerPort: 6379}}]
---
apiVersion: v1
kind: Service
metadata: {{name: cache, namespace: {ns}}}
spec:
  selector: {{app: cache}}
  ports: [{{port: 6379, targetPort: 6379}}]
"#
    );
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &web);
    assert!(ok, "{out}");
    for pod in ["pod/web", "pod/cache"] {
        must(&[
            "wait",
            "--for=condition=Ready",
            pod,
            "-n",
            &ns,
            "--timeout=120s",
        ]);
    }
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
    let doc = result_document(&ns, &passes);
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

    // A schedule: a run at the apply, then one per minute; the history
    // keeps one, and the older run's result goes. Checked at the end.
    let (ok, out) = kubectl_stdin(
        &["apply", "-f", "-"],
        &faulttest(
            "scheduled",
            &ns,
            "def test_a():\n    pass\n",
            "  schedule: \"* * * * *\"\n  historyLimit: 1\n",
        ),
    );
    assert!(ok, "{out}");
    let scheduled_from = Instant::now();

    // A remote Redis Service, faulted in-cluster through the runner's proxy.
    let redis = format!(
        r#"load("@faultbox/discovery/k8s.star", "k8s")
cache = service("cache", interface("main", "redis", 6379), remote = k8s.endpoint("cache", 6379, namespace = "{ns}"), healthcheck = tcp(k8s.endpoint("cache", 6379, namespace = "{ns}")))

def test_readonly_replica():
    assert_true(cache.main.set("k", "v").ok)
    r = fault(cache.main, error(command = "SET", message = "READONLY You can't write against a read only replica."), run = lambda: cache.main.set("k", "w"))
    assert_eq(r.ok, False)
    assert_true("READONLY" in r.error, r.error)
    assert_eq(cache.main.get("k").data, "v")
"#
    );
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &faulttest("redis", &ns, &redis, ""));
    assert!(ok, "{out}");
    let st = wait_done(&ns, "redis", limit);
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    let doc = result_document(&ns, &st);
    assert_eq!(doc["tests"][0]["faults"][0]["hits"], 1, "{doc:#}");

    // The local CLI: `faultbox test --kube` runs the spec as a FaultTest
    // (its load()ed file in a ConfigMap) and prints and exits as locally.
    from_the_cli(&ns, &addr);

    // An image= service as a pod under faultbox-shim: a syscall fault in
    // the pod, over the mutual-TLS channel, under "restricted".
    service_pods(&ns, limit);

    // An image= service with no entrypoint=: its entrypoint and user come
    // from the cluster's registry, and the image's digest is in the
    // result; `cache:6379` in a pod reaches the cache's Service. And the
    // error when neither the spec nor the image gives a command.
    from_the_registry(&ns, limit);

    // A client without the run's credentials is refused by the runner's
    // shim channel, and the run goes on undisturbed.
    wrong_certificate(&ns, limit);

    // One spec file, on Docker here and as a FaultTest there: the same
    // faults (a WAL fdatasync, a forked redis's AOF write, a protocol
    // fault between two services) and the same verdicts.
    parity(&ns);

    // The runner killed mid-test: the service pod keeps serving, its held
    // call answered, and it goes with the FaultTest.
    runner_lost(&ns, limit);

    // TLS terminated by the runner's proxy and re-originated to an HTTPS
    // Service, verified against the CA the spec gives: once with the
    // proxy's certificate from a Secret the spec names, once with one
    // from the run's CA, which the operator publishes.
    tls_through_the_proxy(&ns, limit);

    // Denied pods in a namespace: phase Error, the denial named, and
    // nothing half-created (the spec ConfigMap is taken back).
    let role = must(&[
        "get",
        "role",
        "faultbox-operator",
        "-n",
        &denied_ns,
        "-o",
        "json",
    ]);
    let mut role: Value = serde_json::from_str(&role).expect("role json");
    let allowed = role.clone();
    if let Some(rules) = role["rules"].as_array_mut() {
        for r in rules.iter_mut() {
            if r["resources"] == serde_json::json!(["pods"]) {
                r["verbs"] = serde_json::json!(["get", "list", "watch"]);
            }
        }
    }
    let (ok, out) = kubectl_stdin(&["replace", "-f", "-"], &role.to_string());
    assert!(ok, "{out}");
    let (ok, out) = kubectl_stdin(
        &["apply", "-f", "-"],
        &faulttest("denied", &denied_ns, "def test_a():\n    pass\n", ""),
    );
    assert!(ok, "{out}");
    let st = wait_done(&denied_ns, "denied", limit);
    assert_eq!(st["phase"], "Error", "{st:#}");
    let c = condition(&st, "RunnerReady");
    assert_eq!(c["reason"], "Forbidden", "{st:#}");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("pods") && m.contains("create")),
        "{c}"
    );
    wait_gone(
        &denied_ns,
        &["pods", "configmaps"],
        "denied",
        Duration::from_secs(30),
    );
    // Pods allowed again, but no runner account there (as in a namespace
    // a cluster-wide install was not told of): the message names the
    // chart value that makes one.
    let mut allowed = allowed;
    if let Some(m) = allowed["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    let (ok, out) = kubectl_stdin(&["replace", "-f", "-"], &allowed.to_string());
    assert!(ok, "{out}");
    must(&[
        "delete",
        "serviceaccount",
        "faultbox-runner",
        "-n",
        &denied_ns,
    ]);
    let (ok, out) = kubectl_stdin(
        &["apply", "-f", "-"],
        &faulttest(
            "no-account",
            &denied_ns,
            "api = service(\"api\", interface(\"main\", \"http\", 8080), image = \"faultbox/http:test\", entrypoint = [\"python3\"], user = \"65532\")\n\ndef test_a():\n    pass\n",
            "",
        ),
    );
    assert!(ok, "{out}");
    let st = wait_done(&denied_ns, "no-account", limit);
    assert_eq!(st["phase"], "Error", "{st:#}");
    let c = condition(&st, "RunnerReady");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("runnerNamespaces")
                && m.contains(&format!(
                    "namespace {denied_ns} has no ServiceAccount faultbox-runner"
                ))),
        "{c}"
    );

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

    // The schedule ran again, and its history holds only the latest run.
    let deadline = scheduled_from + Duration::from_secs(150);
    let st = loop {
        let st = status(&ns, "scheduled");
        let done = ["Succeeded", "Failed", "Error"].contains(&st["phase"].as_str().unwrap_or(""));
        if done && st["runIndex"].as_u64().unwrap_or(0) >= 1 {
            break st;
        }
        assert!(Instant::now() < deadline, "no scheduled run: {st:#}");
        std::thread::sleep(Duration::from_secs(1));
    };
    let run = st["runIndex"].as_u64().unwrap_or(0);
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    assert!(st["lastScheduleTime"].is_string(), "{st:#}");
    let history = st["history"].as_array().cloned().unwrap_or_default();
    assert_eq!(history.len(), 1, "{st:#}");
    assert_eq!(
        history[0]["runner"],
        format!("scheduled-run-1-{run}"),
        "{st:#}"
    );
    assert_eq!(history[0]["verdict"], "Pass", "{st:#}");
    assert_eq!(
        st["resultRef"],
        format!("scheduled-result-1-{run}"),
        "{st:#}"
    );
    let (_, cms) = kubectl(&[
        "get",
        "configmaps",
        "-n",
        &ns,
        "-l",
        "faultbox.io/faulttest=scheduled",
        "-o",
        "name",
    ]);
    assert!(
        !cms.contains("configmap/scheduled-result-1\n"),
        "the first run's result stays: {cms}"
    );
    assert!(
        cms.contains(&format!("configmap/scheduled-result-1-{run}")),
        "{cms}"
    );
}

/// A CA, and a leaf for `names` signed by it: (CA PEM, leaf PEM, key PEM).
fn certificates(names: &[&str]) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "e2e CA");
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

fn service_pods(ns: &str, limit: Duration) {
    let spec = r#"api = service("api", interface("main", "http", 8080),
    image = "faultbox/http:test",
    entrypoint = ["python3", "/usr/local/bin/server.py"],
    user = "65532",
    healthcheck = http("localhost:8080/health"),
    ops = {"hostname": op(syscalls = ["openat"], path = "/etc/hostname")},
)

def test_reads_its_file():
    r = api.main.get(path = "/file?path=/etc/hostname")
    assert_eq(r.status, 200)

def test_open_denied_in_the_pod():
    r = fault(api, hostname = deny("EACCES"), run = lambda: api.main.get(path = "/file?path=/etc/hostname"))
    assert_eq(r.status, 500)
    assert_eq(r.body, "EACCES")
"#;
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &faulttest("pods", ns, spec, ""));
    assert!(ok, "{out}");
    // The service pod, while it lives: restricted, the init container too.
    let deadline = Instant::now() + limit;
    let pod = loop {
        let (_, out) = kubectl(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            "faultbox.io/service=api",
            "-o",
            "json",
        ]);
        let list: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        if let Some(p) = list["items"].as_array().and_then(|i| i.first()) {
            break p.clone();
        }
        let st = status(ns, "pods");
        assert!(
            Instant::now() < deadline
                && !["Succeeded", "Failed", "Error"].contains(&st["phase"].as_str().unwrap_or("")),
            "no service pod seen: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        pod["metadata"]["ownerReferences"][0]["kind"], "FaultTest",
        "{pod:#}"
    );
    let spec = &pod["spec"];
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(spec["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(spec["automountServiceAccountToken"], false);
    for c in spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten())
    {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{c:#}");
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{c:#}"
        );
        assert!(
            sc["privileged"].is_null() || sc["privileged"] == false,
            "{c:#}"
        );
    }
    let st = wait_done(ns, "pods", limit);
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    assert_eq!(st["passed"], 2, "{st:#}");
    let doc = result_document(ns, &st);
    let denied = doc["tests"]
        .as_array()
        .and_then(|ts| {
            ts.iter()
                .find(|t| t["name"] == "test_open_denied_in_the_pod")
        })
        .expect("the fault test");
    assert_eq!(denied["faults"][0]["hits"], 1, "{denied:#}");
    // The runner removed its service pods (they may still be terminating).
    wait_gone(ns, &["pods"], "pods", Duration::from_secs(60));
}

fn from_the_registry(ns: &str, limit: Duration) {
    let image = registry_image("faultbox-http-user", "USER 65532:65532\n");
    let bare = registry_image("faultbox-http-bare", "ENTRYPOINT []\nCMD []\nUSER 65532\n");
    // The digest the registry holds for the tag (what the kubelet pulls).
    let repo = image
        .trim_start_matches(&format!("{REGISTRY}/"))
        .replace(":e2e", "");
    let head = Command::new("curl")
        .args([
            "-sfI",
            "-H",
            "Accept: application/vnd.docker.distribution.manifest.v2+json",
            &format!("http://127.0.0.1:5000/v2/{repo}/manifests/e2e"),
        ])
        .output()
        .expect("curl");
    let digest = String::from_utf8_lossy(&head.stdout)
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("docker-content-digest:")
                .map(|d| d.trim().to_string())
        })
        .expect("the registry's digest");
    let spec = format!(
        r#"cache = service("cache", interface("main", "redis", 6379),
    image = "faultbox/redis:test",
    entrypoint = ["redis-server"],
    args = ["--protected-mode", "no", "--save", "", "--appendonly", "no"],
    user = "65532",
    healthcheck = tcp("localhost:6379"),
)
api = service("api", interface("main", "http", 8080),
    image = "{image}",
    healthcheck = http("localhost:8080/health"),
    depends_on = [cache],
)

def test_the_image_runs_its_own_entrypoint():
    r = api.main.get(path = "/argv")
    assert_eq(r.status, 200)
    assert_eq(r.body, "")

def test_a_service_name_reaches_its_pod():
    r = api.main.get(path = "/redis?addr=cache:6379&cmd=PING")
    assert_eq(r.body, "+PONG")
"#
    );
    let no_command = format!(
        r#"api = service("api", interface("main", "http", 8080), image = "{bare}")

def test_never_runs():
    pass
"#
    );
    let manifests = [
        faulttest("registry", ns, &spec, ""),
        faulttest("no-command", ns, &no_command, ""),
    ]
    .join("---\n");
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &manifests);
    assert!(ok, "{out}");
    let st = wait_done(ns, "registry", limit);
    assert_eq!(st["phase"], "Succeeded", "{st:#}");
    assert_eq!(st["passed"], 2, "{st:#}");
    let doc = result_document(ns, &st);
    let text = doc.to_string();
    assert!(
        text.contains(&digest),
        "the image's digest {digest} in the result: {doc:#}"
    );
    // The Service the name reached, deleted with the run.
    wait_gone(ns, &["services"], "registry", Duration::from_secs(60));

    let st = wait_done(ns, "no-command", limit);
    let text = st.to_string();
    assert!(
        text.contains("give entrypoint=") && text.contains("neither ENTRYPOINT nor CMD"),
        "{st:#}"
    );
    assert_ne!(st["phase"], "Succeeded", "{st:#}");
}

/// A client with a certificate of another CA, and one with none, dial
/// a runner's shim listener (the address is in the service pod's args)
/// while the pod starts: the TLS handshake refuses both before any
/// message, and the test itself still passes. The listener lives only
/// until the pod's shim dials in, so a spec of several tests gives several
/// chances; a connection refused at TCP (the window missed) counts as
/// neither.
fn wrong_certificate(ns: &str, limit: Duration) {
    let (_, cert, key) = certificates(&["faultbox-shim"]);
    let spec = r#"api = service("api", interface("main", "http", 8080),
    image = "faultbox/http:test",
    entrypoint = ["python3", "/usr/local/bin/server.py"],
    user = "65532",
    healthcheck = http("localhost:8080/health"),
)

def test_one():
    assert_eq(api.main.get(path = "/health").status, 200)

def test_two():
    assert_eq(api.main.get(path = "/health").status, 200)

def test_three():
    assert_eq(api.main.get(path = "/health").status, 200)

def test_four():
    assert_eq(api.main.get(path = "/health").status, 200)
"#;
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &faulttest("intruder", ns, spec, ""));
    assert!(ok, "{out}");
    let deadline = Instant::now() + limit;
    let mut seen = std::collections::BTreeSet::new();
    let mut refused = Vec::new();
    loop {
        let (_, out) = kubectl(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            "faultbox.io/faulttest=intruder,faultbox.io/service=api",
            "-o",
            "json",
        ]);
        let list: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        for pod in list["items"].as_array().into_iter().flatten() {
            let name = pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if !seen.insert(name) {
                continue;
            }
            let control = pod["spec"]["containers"][0]["args"][1]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let addr = control
                .trim_start_matches("tls:")
                .split('@')
                .next()
                .unwrap_or_default()
                .to_string();
            for with_cert in [true, false] {
                match tls_intrude(&addr, with_cert.then_some((&cert, &key))) {
                    Intrusion::Refused(why) => {
                        // The runner's TLS refused it, for the reason of
                        // the case: not a timeout or a reset.
                        let want = if with_cert {
                            "UnknownCA"
                        } else {
                            "CertificateRequired"
                        };
                        assert!(why.contains(want), "{want} expected, got {why}");
                        refused.push(why);
                    }
                    Intrusion::Missed => {}
                    Intrusion::Answered(bytes) => {
                        panic!(
                            "the runner answered a client without the run's credentials: {bytes:?}"
                        )
                    }
                }
            }
        }
        let st = status(ns, "intruder");
        if st["phase"]
            .as_str()
            .is_some_and(|p| ["Succeeded", "Failed", "Error"].contains(&p))
        {
            assert_eq!(st["phase"], "Succeeded", "{st:#}");
            assert_eq!(st["passed"], 4, "{st:#}");
            break;
        }
        assert!(Instant::now() < deadline, "intruder did not finish: {st:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !refused.is_empty(),
        "no attempt reached a listener while a pod started ({} pods seen)",
        seen.len()
    );
    eprintln!("wrong_certificate: {} refusals: {refused:?}", refused.len());
}

enum Intrusion {
    /// Nothing listened any more (the pod's shim had dialled in).
    Missed,
    /// The handshake or the first read failed: refused.
    Refused(String),
    /// The runner sent application data.
    Answered(Vec<u8>),
}

/// Dials `addr` as an intruder would: trusting any server, presenting
/// `cert` (of a CA that is not the run's) or no certificate, sending a
/// line as a shim's first message would be, and reading.
fn tls_intrude(addr: &str, cert: Option<(&String, &String)>) -> Intrusion {
    use std::io::{Read, Write};
    let Ok(sock) = addr.parse::<std::net::SocketAddr>() else {
        return Intrusion::Missed;
    };
    let Ok(tcp) = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)) else {
        return Intrusion::Missed;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer));
    let config = match cert {
        Some((c, k)) => {
            use rustls::pki_types::pem::PemObject;
            let chain = rustls::pki_types::CertificateDer::pem_slice_iter(c.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("cert");
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(k.as_bytes()).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::try_from("faultbox-controller").expect("name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    if let Err(e) = tls.write_all(b"{\"type\":\"hello\"}\n") {
        return Intrusion::Refused(e.to_string());
    }
    let mut buf = [0u8; 512];
    match tls.read(&mut buf) {
        Ok(0) => Intrusion::Refused("closed without a word".into()),
        Ok(n) => Intrusion::Answered(buf[..n].to_vec()),
        Err(e) => Intrusion::Refused(e.to_string()),
    }
}

/// Trusts every server certificate: the intruder is the one being
/// checked, not the runner.
#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn runner_lost(ns: &str, limit: Duration) {
    let spec = r#"api = service("api", interface("main", "http", 8080),
    image = "faultbox/http:test",
    entrypoint = ["python3", "/usr/local/bin/server.py"],
    user = "65532",
    healthcheck = http("localhost:8080/health"),
    ops = {"hostname": op(syscalls = ["openat"], path = "/etc/hostname")},
)

def test_held():
    fault(api, hostname = delay("300s"), run = lambda: api.main.get(path = "/file?path=/etc/hostname", timeout = "300s"))
"#;
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &faulttest("lost", ns, spec, ""));
    assert!(ok, "{out}");
    // Wait until the call is held in the pod: the delay event is in the
    // runner's log only at the end, so wait for the pod and a moment.
    let deadline = Instant::now() + limit;
    let pod = loop {
        let (_, name) = kubectl(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            "faultbox.io/faulttest=lost,faultbox.io/service=api",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ]);
        if !name.trim().is_empty() {
            let (_, phase) = kubectl(&[
                "get",
                "pod",
                name.trim(),
                "-n",
                ns,
                "-o",
                "jsonpath={.status.phase}",
            ]);
            if phase == "Running" {
                break name.trim().to_string();
            }
        }
        assert!(Instant::now() < deadline, "no service pod");
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(3));
    // Killed outright (as by the OOM killer or a lost node), not deleted:
    // a deleted runner gets SIGTERM and stops its services itself. This
    // single-node cluster runs its pods on this machine, so the runner's
    // process is found by its pod's cgroup.
    let uid = must(&[
        "get",
        "pod",
        "lost-run-1",
        "-n",
        ns,
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let uid = uid.trim().to_string();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let dir = entry.path();
        let cgroup = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if (cgroup.contains(&uid) || cgroup.contains(&uid.replace('-', "_")))
            && comm.trim() == "faultbox"
        {
            let pid = entry.file_name().to_string_lossy().into_owned();
            assert!(
                Command::new("kill")
                    .args(["-9", &pid])
                    .status()
                    .is_ok_and(|s| s.success()),
                "kill -9 {pid}"
            );
            killed += 1;
        }
    }
    assert_eq!(killed, 1, "the runner's process, on this node");
    let st = wait_done(ns, "lost", limit);
    assert_eq!(st["phase"], "Error", "{st:#}");
    // The service still serves, and the same open now goes through.
    let probe = "import urllib.request as u; r = u.urlopen('http://127.0.0.1:8080/file?path=/etc/hostname', timeout=10); print(r.status)";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = kubectl(&["exec", &pod, "-n", ns, "--", "python3", "-c", probe]);
        if ok && out.trim() == "200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the orphaned service does not serve: {out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    must(&["delete", "ft", "lost", "-n", ns]);
    wait_gone(
        ns,
        &["pods", "configmaps", "secrets"],
        "lost",
        Duration::from_secs(90),
    );
}

fn parity(ns: &str) {
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/specs/parity.star");
    let run = |extra: &[&str]| {
        let out = Command::new("timeout")
            .args(["-k", "5", "400"])
            .arg(support::faultbox())
            .args(["test", spec, "--format", "json", "--seed", "11"])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("faultbox");
        let r = support::finish(out);
        let doc: Value = serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("{extra:?}: no JSON ({e}): {}\n{}", r.stdout, r.stderr));
        (r.code, doc, r.stderr)
    };
    let (docker_code, docker, docker_err) = run(&[]);
    let (kube_code, kube, kube_err) = run(&["--kube", "--namespace", ns]);
    let verdicts = |doc: &Value| -> Vec<(String, String, u64)> {
        doc["tests"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["name"].as_str().unwrap_or_default().to_string(),
                    t["result"].as_str().unwrap_or_default().to_string(),
                    t["faults"][0]["hits"].as_u64().unwrap_or(0).min(1),
                )
            })
            .collect()
    };
    assert_eq!(docker_code, 0, "on Docker: {docker_err}");
    assert_eq!(kube_code, 0, "in the cluster: {kube_err}");
    assert_eq!(
        verdicts(&docker),
        verdicts(&kube),
        "{docker_err}\n{kube_err}"
    );
    assert_eq!(verdicts(&kube).len(), 3);
    assert!(
        verdicts(&kube)
            .iter()
            .all(|(_, r, hit)| r == "pass" && *hit == 1),
        "every fault fired: {:?}",
        verdicts(&kube)
    );
}

fn from_the_cli(ns: &str, addr: &str) {
    let dir = support::Scratch::new("kube");
    std::fs::write(dir.path("helper.star"), "expected = 200\n").expect("write helper");
    let spec = dir.path("checkout.star");
    std::fs::write(
        &spec,
        format!(
            r#"load("helper.star", "expected")
web = service("web", interface("main", "http", 8080), remote = "{addr}", healthcheck = http("{addr}/health"))

def test_hello():
    assert_eq(web.main.get(path = "/hello").status, expected)

def test_wrong():
    assert_eq(web.main.get(path = "/hello").status, 201, "the service answers 200")
"#
        ),
    )
    .expect("write spec");
    let kube = |extra: &[&str]| {
        let mut args = vec!["test", spec.as_str(), "--kube", "--namespace", ns];
        args.extend_from_slice(extra);
        let out = Command::new("timeout")
            .args(["-k", "5", "240"])
            .arg(support::faultbox())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("faultbox");
        support::finish(out)
    };
    let pass = kube(&["--test", "hello", "--format", "json", "--seed", "7"]);
    assert_eq!(pass.code, 0, "{}\n{}", pass.stdout, pass.stderr);
    let doc: Value = serde_json::from_str(&pass.stdout).expect("the JSON document");
    assert_eq!(doc["tests"][0]["name"], "test_hello", "{doc:#}");
    assert_eq!(doc["tests"][0]["seed"], 7, "{doc:#}");
    assert!(
        pass.stderr.contains("--- PASS: test_hello"),
        "{}",
        pass.stderr
    );
    assert!(
        pass.stderr.contains("1 passed, 0 failed"),
        "{}",
        pass.stderr
    );
    let fail = kube(&["--test", "wrong"]);
    assert_eq!(fail.code, 2, "{}", fail.stderr);
    assert!(
        fail.stderr.contains("--- FAIL: test_wrong"),
        "{}",
        fail.stderr
    );
    assert!(fail.stderr.contains("200 != 201"), "{}", fail.stderr);
    assert!(fail.stdout.is_empty(), "text output only: {}", fail.stdout);
    // A filter that matches nothing is refused before anything is made.
    let none = kube(&["--test", "nothing_like_this"]);
    assert_eq!(none.code, 1, "{}", none.stderr);
    assert!(none.stderr.contains("no test matched"), "{}", none.stderr);
    // Nothing of these runs is left in the namespace.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, fts) = kubectl(&["get", "ft", "-n", ns, "-o", "name"]);
        let (_, cms) = kubectl(&["get", "configmaps", "-n", ns, "-o", "name"]);
        let left: Vec<&str> = fts
            .lines()
            .chain(cms.lines())
            .filter(|l| l.contains("checkout-"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `openssl x509 -text` of a PEM certificate.
fn openssl_text(pem: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-text"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl (scripts/setup installs it)");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(pem.as_bytes());
    }
    let out = child.wait_with_output().expect("openssl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tls_secret(ns: &str, name: &str, cert: &str, key: &str, ca: Option<&str>) -> String {
    let mut data = serde_json::json!({"tls.crt": cert, "tls.key": key});
    if let Some(ca) = ca {
        data["ca.crt"] = Value::String(ca.into());
    }
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": ns},
        "stringData": data,
    })
    .to_string()
}

fn tls_through_the_proxy(ns: &str, limit: Duration) {
    let host = format!("secure.{ns}.svc.cluster.local");
    let (upstream_ca, upstream_cert, upstream_key) = certificates(&[&host]);
    let (front_ca, front_cert, front_key) = certificates(&["localhost", "127.0.0.1"]);
    for secret in [
        tls_secret(ns, "secure-serving", &upstream_cert, &upstream_key, None),
        tls_secret(
            ns,
            "front-tls",
            &format!("{front_cert}{front_ca}"),
            &front_key,
            Some(&front_ca),
        ),
    ] {
        let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &secret);
        assert!(ok, "{out}");
    }
    let files = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "tls-files", "namespace": ns},
        "data": {"upstream-ca.pem": upstream_ca},
    });
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &files.to_string());
    assert!(ok, "{out}");
    let secure = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: secure, namespace: {ns}, labels: {{app: secure}}}}
spec:
  containers:
    - name: web
      image: faultbox/http:test
      imagePullPolicy: Never
      env: [{{name: PORT, value: "8443"}}, {{name: TLS_CERT, value: /tls/tls.crt}}, {{name: TLS_KEY, value: /tls/tls.key}}]
      ports: [{{containerPort: 8443}}]
      volumeMounts: [{{name: tls, mountPath: /tls, readOnly: true}}]
  volumes: [{{name: tls, secret: {{secretName: secure-serving}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: secure, namespace: {ns}}}
spec:
  selector: {{app: secure}}
  ports: [{{port: 8443, targetPort: 8443}}]
"#
    );
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &secure);
    assert!(ok, "{out}");
    must(&[
        "wait",
        "--for=condition=Ready",
        "pod/secure",
        "-n",
        ns,
        "--timeout=120s",
    ]);
    let spec = |tls: &str| {
        format!(
            r#"web = service("secure", interface("main", "http", 8443, tls = {tls}), remote = "{host}:8443", healthcheck = tcp("{host}:8443"))

def test_tls_through_the_proxy():
    assert_eq(web.main.get(path = "/hello").status, 200)
    r = fault(web.main, error(path = "/hello", status = 503), run = lambda: web.main.get(path = "/hello"))
    assert_eq(r.status, 503)
"#
        )
    };
    let files_ref = "  files: {configMapRef: {name: tls-files}}
";
    let manifests = [
        faulttest(
            "tls-secret",
            ns,
            &spec(r#"tls_cert(secret = "front-tls", ca = "upstream-ca.pem")"#),
            files_ref,
        ),
        faulttest(
            "tls-run-ca",
            ns,
            &spec(r#"tls_cert(ca = "upstream-ca.pem")"#),
            files_ref,
        ),
        faulttest(
            "tls-no-secret",
            ns,
            &spec(r#"tls_cert(secret = "absent-tls", ca = "upstream-ca.pem")"#),
            files_ref,
        ),
    ]
    .join("---\n");
    let (ok, out) = kubectl_stdin(&["apply", "-f", "-"], &manifests);
    assert!(ok, "{out}");
    for name in ["tls-secret", "tls-run-ca"] {
        let st = wait_done(ns, name, limit);
        assert_eq!(st["phase"], "Succeeded", "{name}: {st:#}");
        let doc = result_document(ns, &st);
        assert_eq!(doc["tests"][0]["faults"][0]["hits"], 1, "{name}: {doc:#}");
    }
    // The run CA is published, and is a CA.
    let st = status(ns, "tls-run-ca");
    let ca_ref = st["caRef"].as_str().expect("caRef").to_string();
    let cm = must(&["get", "configmap", &ca_ref, "-n", ns, "-o", "json"]);
    let cm: Value = serde_json::from_str(&cm).expect("configmap json");
    let pem = cm["data"]["ca.crt"].as_str().expect("ca.crt");
    let text = openssl_text(pem);
    assert!(
        text.contains("CA:TRUE") && text.contains("Faultbox run CA"),
        "{text}"
    );
    assert!(
        status(ns, "tls-secret")["caRef"].is_string(),
        "the Secret's test had TLS too"
    );
    // A Secret that is not there: the test errors, saying what to create.
    let st = wait_done(ns, "tls-no-secret", limit);
    assert_eq!(st["verdict"], "Error", "{st:#}");
    assert!(
        st["tests"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("kubernetes.io/tls Secret \"absent-tls\"")),
        "{st:#}"
    );
}

fn result_document(ns: &str, status: &Value) -> Value {
    let name = status["resultRef"].as_str().expect("resultRef");
    let cm = must(&["get", "configmap", name, "-n", ns, "-o", "json"]);
    let cm: Value = serde_json::from_str(&cm).expect("configmap json");
    serde_json::from_str(cm["data"]["result.json"].as_str().expect("result.json"))
        .expect("result document")
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
