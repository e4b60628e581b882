//! The Helm chart, rendered offline: `helm lint` is clean, and what
//! `helm template` renders meets the "restricted" pod security standard,
//! grants only what the operator uses, and scopes RBAC to the watched
//! namespaces; the rendered manifests and the pods the operator makes
//! validate against the Kubernetes schemas (kubernetes-validate, offline),
//! and the example FaultTests against the CRD's schema. `scripts/setup`
//! installs helm and the validator.

use std::process::Command;

use serde_yaml::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/faultbox");

fn helm() -> String {
    for p in ["/opt/helm/helm", "/usr/local/bin/helm", "/usr/bin/helm"] {
        if std::path::Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!("helm is not installed (scripts/setup installs it into /opt/helm)");
}

/// `helm template` with `--set` for each of `sets`, the CRD included or not.
fn template(sets: &[&str], crds: bool) -> String {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "fb", CHART, "-n", "faultbox"]);
    if crds {
        cmd.arg("--include-crds");
    }
    for s in sets {
        cmd.arg(format!("--set={s}"));
    }
    let out = cmd.output().expect("helm template");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn render(sets: &[&str]) -> Vec<Value> {
    template(sets, false)
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<Value>(doc).ok())
        .filter(|v| v.get("kind").is_some())
        .collect()
}

fn kinds(docs: &[Value], kind: &str) -> Vec<Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .cloned()
        .collect()
}

#[test]
fn the_chart_lints_clean() {
    let out = Command::new(helm())
        .args(["lint", CHART, "--strict"])
        .output()
        .expect("helm lint");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rendered_pods_are_restricted() {
    let docs = render(&[]);
    let deployments = kinds(&docs, "Deployment");
    assert_eq!(deployments.len(), 1);
    let pod = &deployments[0]["spec"]["template"]["spec"];
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], Value::Bool(true));
    assert!(psc["runAsUser"].as_u64().is_some_and(|u| u != 0), "{psc:?}");
    assert_eq!(
        psc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let containers = pod["containers"].as_sequence().expect("containers");
    for c in containers {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false), "{c:?}");
        assert_eq!(sc["readOnlyRootFilesystem"], Value::Bool(true), "{c:?}");
        let drop: Vec<&str> = sc["capabilities"]["drop"]
            .as_sequence()
            .map(|d| d.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(drop, ["ALL"], "{c:?}");
        assert!(sc["capabilities"].get("add").is_none(), "{c:?}");
    }
    assert!(pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none());
}

#[test]
fn replicas_elect_a_leader_on_a_lease_in_the_release_namespace() {
    let docs = render(&["replicas=2", "watchNamespaces={shop}"]);
    let env = &kinds(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"];
    let lease_ns = env
        .as_sequence()
        .and_then(|e| {
            e.iter()
                .find(|v| v["name"].as_str() == Some("LEASE_NAMESPACE"))
        })
        .and_then(|v| v["value"].as_str());
    assert_eq!(lease_ns, Some("faultbox"));
    let lease_role = kinds(&docs, "Role")
        .into_iter()
        .find(|r| r["metadata"]["namespace"].as_str() == Some("faultbox"))
        .expect("a Role for the lease in the release namespace");
    let text = serde_yaml::to_string(&lease_role["rules"]).expect("yaml");
    assert!(
        text.contains("leases") && text.contains("coordination.k8s.io"),
        "{text}"
    );
}

#[test]
fn rbac_is_least_privilege_and_scoped_to_the_watched_namespaces() {
    let everywhere = render(&[]);
    assert_eq!(kinds(&everywhere, "ClusterRole").len(), 1);
    assert_eq!(kinds(&everywhere, "Role").len(), 1, "only the lease's");

    let scoped = render(&["watchNamespaces={shop,billing}"]);
    assert!(
        kinds(&scoped, "ClusterRole").is_empty(),
        "no cluster-wide grant"
    );
    let all_roles = kinds(&scoped, "Role");
    let (runner_roles, roles): (Vec<Value>, Vec<Value>) = all_roles
        .into_iter()
        .partition(|r| r["metadata"]["name"].as_str() == Some("faultbox-runner"));
    let namespaces: Vec<&str> = roles
        .iter()
        .filter_map(|r| r["metadata"]["namespace"].as_str())
        .collect();
    assert_eq!(
        namespaces,
        ["faultbox", "shop", "billing"],
        "the lease's, then the watched ones"
    );
    assert_eq!(kinds(&scoped, "RoleBinding").len(), 5);
    // The runners' account: in each watched namespace, pods and their
    // logs, and Secrets it may create but never read.
    let runner_namespaces: Vec<&str> = runner_roles
        .iter()
        .filter_map(|r| r["metadata"]["namespace"].as_str())
        .collect();
    assert_eq!(runner_namespaces, ["shop", "billing"]);
    for role in &runner_roles {
        for rule in role["rules"].as_sequence().expect("rules") {
            let strings = |field: &str| -> Vec<String> {
                rule[field]
                    .as_sequence()
                    .map(|v| {
                        v.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            // It makes (and removes) the channel's Secret and the
            // services' Services, and never reads a Secret.
            if strings("resources") == ["secrets"] || strings("resources") == ["services"] {
                assert_eq!(strings("verbs"), ["create", "delete"], "{rule:?}");
            }
            assert!(!strings("verbs").contains(&"*".to_string()), "{rule:?}");
        }
    }
    let extra = render(&["runnerNamespaces={batch}"]);
    assert_eq!(
        kinds(&extra, "ServiceAccount")
            .iter()
            .filter(|a| a["metadata"]["name"].as_str() == Some("faultbox-runner"))
            .filter_map(|a| a["metadata"]["namespace"].as_str())
            .collect::<Vec<_>>(),
        ["batch"],
        "cluster-wide, runners go where runnerNamespaces says"
    );
    for role in roles.iter().chain(kinds(&everywhere, "ClusterRole").iter()) {
        for rule in role["rules"].as_sequence().expect("rules") {
            for field in ["apiGroups", "resources", "verbs"] {
                let items: Vec<&str> = rule[field]
                    .as_sequence()
                    .map(|v| v.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                assert!(!items.contains(&"*"), "no wildcard {field}: {rule:?}");
            }
            let verbs: Vec<&str> = rule["verbs"]
                .as_sequence()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let resources: Vec<&str> = rule["resources"]
                .as_sequence()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if resources.contains(&"faulttests") {
                assert!(
                    !verbs.contains(&"delete") && !verbs.contains(&"create"),
                    "the operator never writes specs: {rule:?}"
                );
            }
            assert!(!resources.contains(&"secrets"), "no secrets: {rule:?}");
        }
    }
}

#[test]
fn the_values_schema_refuses_what_the_operator_cannot_do() {
    let out = Command::new(helm())
        .args(["template", "fb", CHART, "--set=replicas=0"])
        .output()
        .expect("helm template");
    assert!(!out.status.success(), "at least one replica");
    let out = Command::new(helm())
        .args(["template", "fb", CHART, "--set=imageTypo=x"])
        .output()
        .expect("helm template");
    assert!(!out.status.success(), "unknown values are refused");
}

const VALIDATOR: &str = "/opt/faultbox-validate/bin/kubernetes-validate";
/// k8s-openapi's version feature in the operator (v1_33).
const SCHEMA_VERSION: &str = "1.33.0";

/// Runs kubernetes-validate --strict on `yaml`: its success and output.
fn validate(yaml: &str) -> (bool, String) {
    assert!(
        std::path::Path::new(VALIDATOR).exists(),
        "kubernetes-validate is not installed (scripts/setup installs it into /opt/faultbox-validate)"
    );
    let file = std::env::temp_dir().join(format!(
        "faultbox-validate-{}-{}.yaml",
        std::process::id(),
        yaml.len()
    ));
    std::fs::write(&file, yaml).expect("write manifests");
    let out = Command::new(VALIDATOR)
        .args(["--strict", "-k", SCHEMA_VERSION])
        .arg(&file)
        .output()
        .expect("kubernetes-validate");
    let _ = std::fs::remove_file(&file);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn rendered_manifests_validate_against_the_kubernetes_schemas() {
    for sets in [
        &[][..],
        &["watchNamespaces={shop,billing}", "replicas=2"][..],
    ] {
        let yaml = template(sets, true);
        let (ok, out) = validate(&yaml);
        assert!(ok, "{sets:?}: {out}");
        for kind in [
            "deployment",
            "customresourcedefinition",
            "serviceaccount",
            "service/",
        ] {
            assert!(
                out.contains(&format!("resource {kind}")),
                "{kind} checked: {out}"
            );
        }
    }
    // The validator is not a yes-machine: a wrong type and an unknown field fail.
    let bad = template(&[], true).replacen("replicas: 1", "replicas: \"one\"", 1);
    assert!(!validate(&bad).0, "a string replica count must be refused");
    let bad = template(&[], true).replacen("containers:", "containerz: []\n      containers:", 1);
    assert!(
        !validate(&bad).0,
        "an unknown field must be refused (--strict)"
    );
}

#[test]
fn runner_pods_the_operator_makes_validate_against_the_kubernetes_schemas() {
    use faultbox_operator::crd::{FaultTest, FaultTestSpec, RunnerSpec};
    use faultbox_operator::reconcile::{Needs, runner_pod};
    let mut ft = FaultTest::new(
        "checkout",
        FaultTestSpec {
            source: Some("def test_a():\n    pass\n".into()),
            runner: Some(RunnerSpec {
                cpu: Some("500m".into()),
                memory: Some("256Mi".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    ft.metadata.namespace = Some("shop".into());
    ft.metadata.uid = Some("0000-1111".into());
    ft.metadata.generation = Some(1);
    let needs = Needs {
        secrets: vec!["orders-tls".into()],
        tls: true,
        pods: true,
    };
    for run in [0, 3] {
        let pod = runner_pod(
            &ft,
            run,
            &"localhost/faultbox:dev".into(),
            std::time::Duration::from_secs(600),
            &needs,
        );
        let json = serde_json::to_value(&pod).expect("pod json");
        // Through JSON text, as the CRD generator does: serde_json's
        // arbitrary_precision would otherwise write numbers as maps.
        let yaml: Value = serde_yaml::from_str(&json.to_string()).expect("yaml");
        let (ok, out) = validate(&serde_yaml::to_string(&yaml).expect("yaml text"));
        assert!(ok, "run {run}: {out}");
    }
}

#[test]
fn example_faulttests_match_the_crd_schema() {
    let crd = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../operator/crds/faulttest.yaml"
    ))
    .expect("crd");
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/kubernetes/checkout.yaml"
    ))
    .expect("example");
    // jsonschema (kubernetes-validate's own dependency) on the CRD's
    // openAPIV3Schema: structural schemas are JSON Schema with extensions.
    let check = |doc: &str| -> (bool, String) {
        let script = r#"
import sys, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
doc = yaml.safe_load(open(sys.argv[2]))
try:
    jsonschema.validate(doc, schema)
    print("valid")
except jsonschema.ValidationError as e:
    print("invalid:", e.message)
    sys.exit(1)
"#;
        let dir = std::env::temp_dir().join(format!("faultbox-crd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (c, d) = (
            dir.join("crd.yaml"),
            dir.join(format!("doc-{}.yaml", doc.len())),
        );
        std::fs::write(&c, &crd).expect("write");
        std::fs::write(&d, doc).expect("write");
        let out = Command::new("/opt/faultbox-validate/bin/python")
            .arg("-c")
            .arg(script)
            .arg(&c)
            .arg(&d)
            .output()
            .expect("python of /opt/faultbox-validate (scripts/setup)");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = check(&example);
    assert!(ok, "{out}");
    let (ok, out) = check(&example.replace("keepPods: OnFailure", "keepPods: Sometimes"));
    assert!(!ok && out.contains("Sometimes"), "{out}");
    let (ok, out) = check(&example.replace("seed: 42", "seed: \"forty-two\""));
    assert!(!ok, "{out}");
}
