//! The `FaultTest` resource (`faultbox.io/v1alpha1`). The CRD manifest in
//! `operator/crds/faulttest.yaml` is generated from these types by the
//! `crdgen` binary; the field docs are what `kubectl explain` shows.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Faultbox spec and how to run it: the operator validates the spec,
/// runs it in a runner pod and writes the verdict and per-test results
/// into the status.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[kube(
    group = "faultbox.io",
    version = "v1alpha1",
    kind = "FaultTest",
    namespaced,
    shortname = "ft",
    category = "faultbox",
    status = "FaultTestStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Verdict","type":"string","jsonPath":".status.verdict"}"#,
    printcolumn = r#"{"name":"Passed","type":"integer","jsonPath":".status.passed"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FaultTestSpec {
    /// The Starlark spec itself. Give this or sourceFrom, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Where the Starlark spec is: a key of a ConfigMap in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_from: Option<SourceFrom>,
    /// More files the spec may load() or load_file(): every key of this
    /// ConfigMap becomes a file next to the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesFrom>,
    /// Which tests to run: a name, a name without test_, or a glob (like
    /// `faultbox test --test`). All tests when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<String>,
    /// How many times each test runs, with successive seeds (like --runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<u64>,
    /// The first seed (like --seed); a fresh one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The longest the whole run may take, e.g. "10m" (default 30m). The
    /// runner pod's activeDeadlineSeconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Run again on this cron schedule (five fields in UTC, e.g. "0 3 * *
    /// *"): the first run starts when the FaultTest is applied, then one
    /// per tick, never two at once (a tick during a run is skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// How many finished scheduled runs status.history remembers (default
    /// 5); the result ConfigMaps and kept pods of older runs are deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_limit: Option<u32>,
    /// Which runner pods stay after their run: Never (default), OnFailure
    /// or Always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_pods: Option<KeepPods>,
    /// Secrets (kubernetes.io/dockerconfigjson) for pulling the images of
    /// image= services: given to their pods, and used by the runner to read
    /// an image's entrypoint from its registry when the spec gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<SecretRef>>,
    /// The runner pod's image and resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerSpec>,
}

/// A key of a ConfigMap.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceFrom {
    /// The ConfigMap key holding the spec.
    pub config_map_key_ref: ConfigMapKeyRef,
}

/// A ConfigMap and one of its keys.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
pub struct ConfigMapKeyRef {
    /// The ConfigMap, in the FaultTest's namespace.
    pub name: String,
    /// The key.
    pub key: String,
}

/// A whole ConfigMap.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FilesFrom {
    /// The ConfigMap whose keys are file names.
    pub config_map_ref: ConfigMapRef,
}

/// A ConfigMap by name.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
pub struct ConfigMapRef {
    /// The ConfigMap, in the FaultTest's namespace.
    pub name: String,
}

/// A Secret by name.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
pub struct SecretRef {
    /// The Secret, in the FaultTest's namespace.
    pub name: String,
}

/// When a finished runner pod is kept.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
pub enum KeepPods {
    /// Removed once the status is written.
    #[default]
    Never,
    /// Kept when the run did not pass.
    OnFailure,
    /// Always kept.
    Always,
}

/// The runner pod.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunnerSpec {
    /// The faultbox image (default: the operator's FAULTBOX_RUNNER_IMAGE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU request and limit, e.g. "500m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory request and limit, e.g. "256Mi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

/// Where a FaultTest's run is.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq)]
pub enum Phase {
    /// Validated; the runner is not running yet.
    Pending,
    /// The runner runs the tests.
    Running,
    /// Every test passed.
    Succeeded,
    /// At least one test failed or errored.
    Failed,
    /// The FaultTest cannot be run (its spec, a field, a missing
    /// ConfigMap): see the Validated condition.
    Invalid,
    /// The run itself broke (the runner died, was evicted, its image
    /// cannot be pulled): see the conditions.
    Error,
}

impl Phase {
    /// Whether the run is over.
    pub fn done(self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::Failed | Phase::Invalid | Phase::Error
        )
    }
}

/// A finished run's verdict.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, JsonSchema, PartialEq, Eq)]
pub enum Verdict {
    /// Every test passed.
    Pass,
    /// At least one test failed.
    Fail,
    /// The run could not say (a test errored, or the run broke).
    Error,
}

/// What the operator last saw of a FaultTest.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultTestStatus {
    /// Pending, Running, Succeeded, Failed, Invalid or Error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Pass, Fail or Error; only once the run is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// Tests whose every run passed.
    #[serde(default)]
    pub passed: u64,
    /// Tests that failed.
    #[serde(default)]
    pub failed: u64,
    /// Tests that errored.
    #[serde(default)]
    pub errored: u64,
    /// Per-test results (at most 50; the result ConfigMap has them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<TestSummary>,
    /// Validated, RunnerReady, Completed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The runner pod of the current run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// When the current run started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When it ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// The ConfigMap holding the full result (the JSON document `faultbox
    /// test --format json` prints), key result.json.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_ref: Option<String>,
    /// A ConfigMap with the CA (key ca.crt) that signed the certificates
    /// of the run's TLS proxies, for clients that talk to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_ref: Option<String>,
    /// Which run of this generation the status describes: 0 for the run
    /// started by the apply, one more for each scheduled run.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub run_index: u64,
    /// The tick of the schedule that started the current run (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// When the schedule starts the next run (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    /// The latest finished runs of a scheduled FaultTest, newest last (at
    /// most spec.historyLimit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RunRecord>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A finished run of a scheduled FaultTest.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    /// The run's runner pod.
    pub runner: String,
    /// Pass, Fail or Error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    #[serde(default)]
    pub passed: u64,
    #[serde(default)]
    pub failed: u64,
    #[serde(default)]
    pub errored: u64,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Its result ConfigMap, when it produced one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_ref: Option<String>,
}

/// One test's result.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TestSummary {
    pub name: String,
    /// pass, fail, error or interrupted.
    pub result: String,
    pub seed: u64,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The command that replays it locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<String>,
}

/// A condition, as Kubernetes conventions describe them.
#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Validated, RunnerReady or Completed.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// One CamelCase word.
    pub reason: String,
    /// What happened, for people.
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    /// The generation it was set for.
    pub observed_generation: i64,
}

/// The CRD manifest, as `operator/crds/faulttest.yaml` holds it.
pub fn manifest() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    // Through JSON text: cargo's feature unification gives serde_json
    // `arbitrary_precision` (starlark asks for it), under which a number
    // inside a serde_json::Value serializes to other formats as a map
    // (`{"$serde_json::private::Number": "0"}`), which the API server
    // refuses. Parsed back as YAML, the numbers are numbers again.
    let json = serde_json::to_string(&FaultTest::crd())
        .map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
    let yaml: serde_yaml::Value = serde_yaml::from_str(&json)?;
    Ok(format!(
        "# Generated by `cargo run -p faultbox-operator --bin crdgen`; do not edit.\n{}",
        serde_yaml::to_string(&yaml)?
    ))
}
