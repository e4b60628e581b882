//! The Helm chart, rendered offline: `helm lint` is clean, and what
//! `helm template` renders meets the "restricted" pod security standard,
//! grants only what the operator uses, and scopes RBAC to the watched
//! namespaces. `scripts/setup` installs helm.

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

fn render(sets: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "fb", CHART, "-n", "faultbox"]);
    for s in sets {
        cmd.arg(format!("--set={s}"));
    }
    let out = cmd.output().expect("helm template");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("\n---")
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
    let roles = kinds(&scoped, "Role");
    let namespaces: Vec<&str> = roles
        .iter()
        .filter_map(|r| r["metadata"]["namespace"].as_str())
        .collect();
    assert_eq!(
        namespaces,
        ["faultbox", "shop", "billing"],
        "the lease's, then the watched ones"
    );
    assert_eq!(kinds(&scoped, "RoleBinding").len(), 3);
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
