//! `faultbox test --kube`: the same run, as a FaultTest in a cluster. The
//! spec is loaded here first (so a spec error reads as it does locally),
//! the files it loaded go into a ConfigMap, the FaultTest is created and
//! followed to its end, and the runner's own output and result document
//! are printed as a local run prints them, with the same exit code. The
//! FaultTest and its objects are deleted afterwards, and on Ctrl-C.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use faultbox_operator::crd::{
    ConfigMapRef, FaultTest, FaultTestSpec, FaultTestStatus, FilesFrom, Phase, Verdict,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Resource, ResourceExt};

use crate::test::{Format, TestArgs};

/// How long a FaultTest may wait for an operator to notice it.
const PICKUP: Duration = Duration::from_secs(60);
/// A ConfigMap holds at most 1 MiB.
const FILES_LIMIT: usize = 900 * 1024;

/// The spec's files, keyed by file name: the spec itself as
/// `spec.star`'s source, the others as the operator lays them out (flat,
/// next to the spec).
fn files(spec: &faultbox_spec::load::Spec) -> Result<(String, BTreeMap<String, String>)> {
    let source = std::fs::read_to_string(&spec.path)
        .with_context(|| format!("read {}", spec.path.display()))?;
    let dir = spec.dir.canonicalize().unwrap_or_else(|_| spec.dir.clone());
    let mut out = BTreeMap::new();
    let mut total = source.len();
    for f in &spec.files {
        let full = f.canonicalize().unwrap_or_else(|_| f.clone());
        let name = full
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|_| full.parent() == Some(dir.as_path()))
            .ok_or_else(|| {
                anyhow!(
                    "--kube: the spec reads {}, which is not in its own directory ({}); a FaultTest's files sit next to its spec, so move it there",
                    f.display(),
                    dir.display()
                )
            })?;
        if name == "spec.star" {
            bail!(
                "--kube: the spec reads a file named spec.star, the name its own source takes in the cluster; rename it"
            );
        }
        let text = std::fs::read_to_string(&full).with_context(|| {
            format!(
                "--kube: read {} (files sent to a cluster are text)",
                full.display()
            )
        })?;
        total += text.len();
        out.insert(name.to_string(), text);
    }
    if total > FILES_LIMIT {
        bail!(
            "--kube: the spec and its files are {total} bytes; a ConfigMap holds at most {FILES_LIMIT}"
        );
    }
    Ok((source, out))
}

/// A DNS-1123 name for the FaultTest: the spec's file stem and a random
/// suffix.
fn object_name(path: &Path) -> String {
    let stem: String = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("spec")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let stem = stem.trim_matches('-');
    let stem = if stem.is_empty() { "spec" } else { stem };
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{stem}-{:06x}", random & 0xff_ffff)
}

pub fn run(args: &TestArgs, spec: &faultbox_spec::load::Spec) -> Result<i32> {
    let (source, files) = files(spec)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the Kubernetes client's runtime")?;
    runtime.block_on(async {
        let options = KubeConfigOptions {
            context: args.context.clone(),
            ..Default::default()
        };
        // A kubeconfig (KUBECONFIG or ~/.kube/config) when there is one,
        // else the in-cluster service account.
        let config = if args.context.is_some() || Kubeconfig::read().is_ok() {
            kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|e| e.to_string())
        } else {
            kube::Config::infer().await.map_err(|e| e.to_string())
        }
        .map_err(|e| {
            anyhow!("--kube: no usable cluster configuration ({e}); set KUBECONFIG or give --context")
        })?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).context("--kube: make a Kubernetes client")?;
        let name = object_name(&spec.path);
        let run = Run {
            fts: Api::namespaced(client.clone(), &namespace),
            configmaps: Api::namespaced(client, &namespace),
            name,
            namespace,
        };
        tokio::select! {
            code = run.go(args, source, files) => {
                run.delete().await;
                code
            }
            _ = interrupted() => {
                eprintln!("\nfaultbox: interrupted: deleting FaultTest {}/{}", run.namespace, run.name);
                run.delete().await;
                Ok(130)
            }
        }
    })
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

struct Run {
    fts: Api<FaultTest>,
    configmaps: Api<ConfigMap>,
    name: String,
    namespace: String,
}

impl Run {
    fn files_name(&self) -> String {
        format!("{}-files", self.name)
    }

    async fn delete(&self) {
        // Its runner, spec, result and CA objects go with it (owned).
        let _ = self
            .fts
            .delete(&self.name, &DeleteParams::background())
            .await;
        let _ = self
            .configmaps
            .delete(&self.files_name(), &DeleteParams::default())
            .await;
    }

    async fn go(
        &self,
        args: &TestArgs,
        source: String,
        files: BTreeMap<String, String>,
    ) -> Result<i32> {
        let has_files = !files.is_empty();
        if has_files {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(self.files_name()),
                    ..Default::default()
                },
                data: Some(files),
                ..Default::default()
            };
            self.configmaps
                .create(&PostParams::default(), &cm)
                .await
                .map_err(|e| self.api_error("create the ConfigMap of the spec's files", e))?;
        }
        let ft = FaultTest::new(
            &self.name,
            FaultTestSpec {
                source: Some(source),
                files: has_files.then(|| FilesFrom {
                    config_map_ref: ConfigMapRef {
                        name: self.files_name(),
                    },
                }),
                test: args.test.clone(),
                runs: (args.runs > 1).then_some(args.runs),
                seed: args.seed,
                ..Default::default()
            },
        );
        let created = self
            .fts
            .create(&PostParams::default(), &ft)
            .await
            .map_err(|e| self.api_error("create the FaultTest", e))?;
        if has_files {
            // Owned by the FaultTest, so it goes with it even if this
            // process does not live to delete it.
            if let Some(owner) = created.controller_owner_ref(&()) {
                let patch = serde_json::json!({"metadata": {"ownerReferences": [owner]}});
                let _ = self
                    .configmaps
                    .patch(
                        &self.files_name(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
            }
        }
        eprintln!("FaultTest {}/{} created", self.namespace, self.name);
        let status = self.follow().await?;
        self.report(args, &status).await
    }

    fn api_error(&self, what: &str, e: kube::Error) -> anyhow::Error {
        match &e {
            kube::Error::Api(s) if s.code == 404 && what.contains("FaultTest") => anyhow!(
                "--kube: the cluster has no FaultTest resource (faultbox.io/v1alpha1): install the operator's chart (helm install faultbox charts/faultbox -n faultbox --create-namespace)"
            ),
            kube::Error::Api(s) if s.code == 404 => anyhow!(
                "--kube: namespace {:?} does not exist (give --namespace)",
                self.namespace
            ),
            kube::Error::Api(s) if s.code == 403 => anyhow!(
                "--kube: {what} in namespace {:?} is forbidden: {}",
                self.namespace,
                s.message
            ),
            _ => anyhow!("--kube: {what}: {e}"),
        }
    }

    /// Polls the status until the run is over; says when the phase moves.
    async fn follow(&self) -> Result<FaultTestStatus> {
        let started = Instant::now();
        let mut said = String::new();
        loop {
            let ft = self
                .fts
                .get(&self.name)
                .await
                .map_err(|e| self.api_error("read the FaultTest", e))?;
            let status = ft.status.clone().unwrap_or_default();
            if let Some(phase) = status.phase {
                let why = status
                    .conditions
                    .iter()
                    .rev()
                    .find(|c| c.status != "True" || phase == Phase::Running)
                    .map(|c| format!(" ({})", c.message))
                    .unwrap_or_default();
                let line = format!("{phase:?}{why}");
                if line != said {
                    eprintln!("FaultTest {}: {line}", ft.name_any());
                    said = line;
                }
                if phase.done() && status.observed_generation == ft.metadata.generation {
                    return Ok(status);
                }
            } else if started.elapsed() > PICKUP {
                bail!(
                    "--kube: no operator picked FaultTest {}/{} up within {}s: is faultbox-operator running and watching namespace {:?}?",
                    self.namespace,
                    self.name,
                    PICKUP.as_secs(),
                    self.namespace
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn report(&self, args: &TestArgs, status: &FaultTestStatus) -> Result<i32> {
        let Some(result) = &status.result_ref else {
            // Invalid, or broken before a result: the condition says why.
            let why = status
                .conditions
                .iter()
                .find(|c| c.status == "False")
                .map(|c| format!("{}: {}", c.reason, c.message))
                .unwrap_or_else(|| "the run ended without a result".into());
            eprintln!("error: {why}");
            return Ok(1);
        };
        let cm = self
            .configmaps
            .get(result)
            .await
            .map_err(|e| self.api_error("read the result ConfigMap", e))?;
        let data = cm.data.unwrap_or_default();
        if let Some(text) = data.get("output.txt") {
            eprint!("{text}");
        }
        let doc = data.get("result.json").cloned().unwrap_or_default();
        let doc: serde_json::Value =
            serde_json::from_str(&doc).context("--kube: the result document is not JSON")?;
        let pretty = serde_json::to_string_pretty(&doc)?;
        if let Some(path) = &args.output {
            std::fs::write(path, format!("{pretty}\n"))
                .with_context(|| format!("write {}", path.display()))?;
        }
        match args.format {
            Some(Format::Json) => crate::print_stdout(&format!("{pretty}\n"))?,
            Some(Format::JsonLine) => crate::print_stdout(&format!("{doc}\n"))?,
            _ => {}
        }
        Ok(match status.verdict {
            Some(Verdict::Pass) => 0,
            Some(Verdict::Fail) => 2,
            _ => 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels_from_the_spec() {
        let n = object_name(Path::new("/x/My_Checkout.Spec.star"));
        assert!(n.starts_with("my-checkout-spec-"), "{n}");
        assert_eq!(n.len(), "my-checkout-spec-".len() + 6);
        assert!(object_name(Path::new("/x/__.star")).starts_with("spec-"));
    }
}
