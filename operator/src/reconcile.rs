//! One idempotent reconcile of a FaultTest: validate its spec with
//! `faultbox-spec` (the loader `faultbox test --dry-run` uses), run the
//! current generation in a runner pod, and turn the runner's result into
//! the status. Everything a run creates is owned by the FaultTest, so a
//! delete garbage-collects it and no finalizer can hold the delete up.
//!
//! The run of generation G is the pod `<name>-run-G` with the ConfigMap
//! `<name>-spec-G`; its result goes into `<name>-result-G`. Names derived
//! from the generation make the reconcile safe to repeat and to resume
//! after an operator restart: an existing pod is the run, never a reason
//! for a second one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, LocalObjectReference, ObjectFieldSelector, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, ObjectMeta, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::crd::{
    Condition, FaultTest, FaultTestSpec, FaultTestStatus, KeepPods, Phase, RunRecord, TestSummary,
    Verdict,
};
use crate::schedule::Schedule;

/// The field manager of every write.
pub const MANAGER: &str = "faultbox-operator";
const LABEL_TEST: &str = "faultbox.io/faulttest";
const LABEL_GENERATION: &str = "faultbox.io/generation";
/// A ConfigMap holds at most 1 MiB; the result keeps under this.
const RESULT_LIMIT: usize = 900 * 1024;
/// Per-test results kept in the status itself.
const STATUS_TESTS: usize = 50;

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    /// What runner pods get unless their FaultTest says otherwise.
    pub runner: RunnerDefaults,
    pub metrics: crate::metrics::Metrics,
}

/// Why a FaultTest cannot run: the reason (one CamelCase word) and what
/// to tell its author.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

fn invalid(reason: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        reason,
        message: message.into(),
    }
}

/// The checks that need no API call.
pub fn check_fields(spec: &FaultTestSpec) -> Result<Duration, Invalid> {
    match (&spec.source, &spec.source_from) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "BothSources",
                "spec.source and spec.sourceFrom are both given; keep one",
            ));
        }
        (None, None) => {
            return Err(invalid(
                "NoSource",
                "give the Starlark spec in spec.source, or a ConfigMap key in spec.sourceFrom.configMapKeyRef",
            ));
        }
        _ => {}
    }
    if spec.runs == Some(0) {
        return Err(invalid("BadRuns", "spec.runs is 0; give 1 or more"));
    }
    if let Some(s) = &spec.schedule {
        let parsed = Schedule::parse(s).map_err(|m| invalid("BadSchedule", m))?;
        if parsed.next_after(unix_now()).is_none() {
            return Err(invalid(
                "BadSchedule",
                format!("spec.schedule {s:?} never fires (no such date)"),
            ));
        }
    }
    if spec.history_limit == Some(0) {
        return Err(invalid(
            "BadHistoryLimit",
            "spec.historyLimit is 0; give 1 or more (default 5)",
        ));
    }
    let timeout = match &spec.timeout {
        None => Duration::from_secs(30 * 60),
        Some(t) => {
            let ns = faultbox_spec::parse_duration(t).map_err(|e| {
                invalid(
                    "BadTimeout",
                    format!("spec.timeout {t:?}: {e} (e.g. \"10m\")"),
                )
            })?;
            if ns == 0 {
                return Err(invalid(
                    "BadTimeout",
                    "spec.timeout is zero; give how long the run may take, e.g. \"10m\"",
                ));
            }
            Duration::from_nanos(ns)
        }
    };
    Ok(timeout)
}

/// The spec's source and its other files, read from the FaultTest and the
/// ConfigMaps it names.
pub async fn gather(
    ft: &FaultTest,
    configmaps: &Api<ConfigMap>,
) -> Result<Result<BTreeMap<String, String>, Invalid>, Error> {
    let spec = &ft.spec;
    let mut files = BTreeMap::new();
    if let Some(f) = &spec.files {
        match configmaps.get_opt(&f.config_map_ref.name).await? {
            None => {
                return Ok(Err(invalid(
                    "ConfigMapMissing",
                    format!(
                        "spec.files names ConfigMap {:?}, which does not exist in namespace {:?}",
                        f.config_map_ref.name,
                        ft.namespace().unwrap_or_default()
                    ),
                )));
            }
            Some(cm) => files.extend(cm.data.unwrap_or_default()),
        }
    }
    let source = match (&spec.source, &spec.source_from) {
        (Some(s), _) => s.clone(),
        (None, Some(from)) => {
            let r = &from.config_map_key_ref;
            let Some(cm) = configmaps.get_opt(&r.name).await? else {
                return Ok(Err(invalid(
                    "ConfigMapMissing",
                    format!(
                        "spec.sourceFrom names ConfigMap {:?}, which does not exist in namespace {:?}",
                        r.name,
                        ft.namespace().unwrap_or_default()
                    ),
                )));
            };
            match cm.data.unwrap_or_default().remove(&r.key) {
                Some(s) => s,
                None => {
                    return Ok(Err(invalid(
                        "ConfigMapKeyMissing",
                        format!("ConfigMap {:?} has no key {:?}", r.name, r.key),
                    )));
                }
            }
        }
        (None, None) => String::new(),
    };
    files.insert("spec.star".to_string(), source);
    Ok(Ok(files))
}

/// What a valid spec needs of its runner pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Needs {
    /// Secrets `tls_cert(secret=...)` names, mounted into the runner.
    pub secrets: Vec<String>,
    /// TLS interfaces: the runner makes a run CA, which is published.
    pub tls: bool,
    /// `image=` services: the runner makes their pods, so it runs as the
    /// namespace's `faultbox-runner` account and knows where it is.
    pub pods: bool,
}

/// Why a runner pod was refused, saying what to change. A runner of
/// `image=` services runs as `faultbox-runner`, which the chart makes only
/// in the namespaces it is told of: without it the API server refuses the
/// pod as forbidden too, but the fix is another.
pub fn forbidden(api_message: &str, namespace: &str, needs: &Needs) -> String {
    if needs.pods && api_message.contains(RUNNER_ACCOUNT) {
        format!(
            "namespace {namespace} has no ServiceAccount {RUNNER_ACCOUNT}, which runs the runner of a spec with image= services: add {namespace} to the chart's runnerNamespaces (or watchNamespaces) ({api_message})"
        )
    } else {
        format!("the operator may not create pods here: {api_message}")
    }
}

/// The operator's settings for the runner pods it makes.
#[derive(Debug, Clone, Default)]
pub struct RunnerDefaults {
    /// The runner image when a FaultTest names none.
    pub image: String,
    /// Registries the runner reads image configs from in plain HTTP
    /// (the chart's insecureRegistries).
    pub insecure_registries: Vec<String>,
}

impl From<&str> for RunnerDefaults {
    fn from(image: &str) -> RunnerDefaults {
        RunnerDefaults {
            image: image.to_string(),
            insecure_registries: Vec::new(),
        }
    }
}

/// The account a runner that makes service pods runs as (the chart makes
/// it, with its Role, in every namespace it serves).
pub const RUNNER_ACCOUNT: &str = "faultbox-runner";

/// Where the runner finds what the operator mounts for it (the engine
/// reads the same variables).
// Not under /faultbox: that is the binary in the runner image.
const SECRETS_DIR: &str = "/secrets";
const RUN_CA_DIR: &str = "/tmp/faultbox-run-ca";
const PULL_SECRETS_DIR: &str = "/pull-secrets";

/// Loads the spec as `faultbox test --dry-run` would, from a scratch
/// directory holding its files; checks the test filter selects something.
pub fn validate(files: &BTreeMap<String, String>, filter: Option<&str>) -> Result<Needs, Invalid> {
    let dir = std::env::temp_dir().join(format!(
        "faultbox-operator-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let io = |e: std::io::Error| invalid("ScratchUnwritable", format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let result = (|| {
        for (name, text) in files {
            if name.contains('/') || name.starts_with('.') {
                return Err(invalid(
                    "BadFileName",
                    format!("file {name:?}: names of spec files are plain file names"),
                ));
            }
            std::fs::write(dir.join(name), text).map_err(io)?;
        }
        // The checks of `faultbox check`; here a spec without tests is
        // refused too, as a run would have nothing to do.
        let (spec, findings) = faultbox_spec::check::check(&dir.join("spec.star"), filter);
        if let Some(f) = findings.first() {
            let reason = match f.code {
                "NO_TESTS_DISCOVERED" => "NoTests",
                "NO_MATCHING_TEST" => "NoMatchingTest",
                _ => "InvalidSpec",
            };
            let message = if f.code == "NO_MATCHING_TEST" {
                format!("spec.test {}", f.message)
            } else {
                f.message.clone()
            };
            return Err(invalid(reason, message));
        }
        let Some(spec) = spec else {
            return Err(invalid("InvalidSpec", "the spec does not load"));
        };
        let tls: Vec<&faultbox_proxy::TlsSpec> = spec
            .services
            .iter()
            .flat_map(|s| s.interfaces.iter().filter_map(|i| i.tls.as_ref()))
            .collect();
        let mut secrets: Vec<String> = tls.iter().filter_map(|t| t.secret.clone()).collect();
        secrets.sort();
        secrets.dedup();
        Ok(Needs {
            secrets,
            tls: !tls.is_empty(),
            pods: spec.services.iter().any(|s| s.is_container()),
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The names of a generation's objects.
pub struct Names {
    pub pod: String,
    pub spec: String,
    pub result: String,
    pub ca: String,
}

/// The names of run `run` of the FaultTest's generation: `-G` for the
/// run the apply starts, `-G-K` for the K-th scheduled one (which reads
/// the spec's ConfigMaps again, so a nightly run tests today's spec).
pub fn names(ft: &FaultTest, run: u64) -> Names {
    let name = ft.name_any();
    let g = ft.metadata.generation.unwrap_or(0);
    let id = if run == 0 {
        g.to_string()
    } else {
        format!("{g}-{run}")
    };
    Names {
        pod: format!("{name}-run-{id}"),
        spec: format!("{name}-spec-{id}"),
        result: format!("{name}-result-{id}"),
        ca: format!("{name}-ca-{id}"),
    }
}

fn labels(ft: &FaultTest) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_TEST.to_string(), ft.name_any()),
        (
            LABEL_GENERATION.to_string(),
            ft.metadata.generation.unwrap_or(0).to_string(),
        ),
    ])
}

fn meta(ft: &FaultTest, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: ft.namespace(),
        labels: Some(labels(ft)),
        owner_references: ft.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// The runner pod of `ft`'s current generation: the faultbox image running
/// the spec from its ConfigMap, under the "restricted" pod security
/// standard, with no API access (the operator reads its result from its
/// log).
pub fn runner_pod(
    ft: &FaultTest,
    run: u64,
    defaults: &RunnerDefaults,
    timeout: Duration,
    needs: &Needs,
) -> Pod {
    let n = names(ft, run);
    let spec = &ft.spec;
    let mut args = vec![
        "test".to_string(),
        "/spec/spec.star".to_string(),
        "--format".to_string(),
        "json-line".to_string(),
    ];
    if let Some(t) = &spec.test {
        args.extend(["--test".to_string(), t.clone()]);
    }
    if let Some(r) = spec.runs {
        args.extend(["--runs".to_string(), r.to_string()]);
    }
    if let Some(s) = spec.seed {
        args.extend(["--seed".to_string(), s.to_string()]);
    }
    let runner = spec.runner.clone().unwrap_or_default();
    let mut limits = BTreeMap::new();
    if let Some(c) = &runner.cpu {
        limits.insert("cpu".to_string(), Quantity(c.clone()));
    }
    if let Some(m) = &runner.memory {
        limits.insert("memory".to_string(), Quantity(m.clone()));
    }
    let resources = (!limits.is_empty()).then(|| ResourceRequirements {
        requests: Some(limits.clone()),
        limits: Some(limits),
        ..Default::default()
    });
    let var = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    };
    let mut env = vec![var("TMPDIR", "/tmp"), var("HOME", "/tmp")];
    let mut mounts = vec![
        VolumeMount {
            name: "spec".into(),
            mount_path: "/spec".into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "spec".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: n.spec.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ];
    if needs.tls || needs.pods {
        env.push(var("FAULTBOX_RUN_CA_DIR", RUN_CA_DIR));
    }
    let runner_image = runner
        .image
        .clone()
        .unwrap_or_else(|| defaults.image.clone());
    let pull_secrets: Vec<String> = spec
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|s| s.name.clone())
        .collect();
    if needs.pods {
        let field = |name: &str, path: &str| EnvVar {
            name: name.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        env.push(field("FAULTBOX_NAMESPACE", "metadata.namespace"));
        env.push(field("FAULTBOX_POD_IP", "status.podIP"));
        env.push(var("FAULTBOX_FAULTTEST", &ft.name_any()));
        env.push(var(
            "FAULTBOX_FAULTTEST_UID",
            ft.metadata.uid.as_deref().unwrap_or_default(),
        ));
        env.push(var("FAULTBOX_IMAGE", &runner_image));
        env.push(var(
            "FAULTBOX_GENERATION",
            &ft.metadata.generation.unwrap_or(0).to_string(),
        ));
    }
    if needs.pods && !defaults.insecure_registries.is_empty() {
        env.push(var(
            "FAULTBOX_INSECURE_REGISTRIES",
            &defaults.insecure_registries.join(","),
        ));
    }
    if !needs.secrets.is_empty() {
        env.push(var("FAULTBOX_SECRETS_DIR", SECRETS_DIR));
    }
    if needs.pods && !pull_secrets.is_empty() {
        env.push(var("FAULTBOX_IMAGE_PULL_SECRETS", &pull_secrets.join(",")));
        env.push(var("FAULTBOX_PULL_SECRETS_DIR", PULL_SECRETS_DIR));
    }
    for (i, secret) in pull_secrets.iter().enumerate().filter(|_| needs.pods) {
        // Optional, as the TLS ones: the runner names a missing one.
        let name = format!("pull-secret-{i}");
        volumes.push(Volume {
            name: name.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                optional: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: format!("{PULL_SECRETS_DIR}/{secret}"),
            read_only: Some(true),
            ..Default::default()
        });
    }
    for (i, secret) in needs.secrets.iter().enumerate() {
        // Optional: a missing Secret is the runner's clear error
        // (SecretMissing) rather than a pod stuck mounting it.
        let name = format!("secret-{i}");
        volumes.push(Volume {
            name: name.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                optional: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: format!("{SECRETS_DIR}/{secret}"),
            read_only: Some(true),
            ..Default::default()
        });
    }
    Pod {
        metadata: meta(ft, &n.pod),
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(timeout.as_secs().max(1) as i64),
            // Only a runner that makes pods gets API access, as its own
            // narrow account; the result still comes back by its log.
            automount_service_account_token: Some(needs.pods),
            service_account_name: needs.pods.then(|| RUNNER_ACCOUNT.to_string()),
            enable_service_links: Some(false),
            // A private runner image is pulled with the same secrets.
            image_pull_secrets: (!pull_secrets.is_empty()).then(|| {
                pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect()
            }),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers: vec![Container {
                name: "runner".into(),
                image: Some(runner_image),
                image_pull_policy: Some("IfNotPresent".into()),
                command: Some(vec!["/faultbox".into()]),
                args: Some(args),
                env: Some(env),
                resources,
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    run_as_non_root: Some(true),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                volume_mounts: Some(mounts),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a finished runner's log says.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub passed: u64,
    pub failed: u64,
    pub errored: u64,
    pub tests: Vec<TestSummary>,
    /// The result document, as stored.
    pub document: String,
    /// What the runner printed for people (the human output of `faultbox
    /// test`), at most its last 64 KiB.
    pub text: String,
}

const TEXT_LIMIT: usize = 64 * 1024;
/// How long after a runner ended its log may still be incomplete.
const LOG_GRACE_SECS: i64 = 10;

/// Reads the result document (the last line of the log that is a JSON
/// object with `tests`) and the runner's exit code into an outcome.
pub fn outcome(log: &str, exit_code: Option<i32>) -> Option<Outcome> {
    let mut doc: Value = log
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v.get("tests").is_some_and(Value::is_array))?;
    let tests: Vec<TestSummary> = doc["tests"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| TestSummary {
                    name: t["name"].as_str().unwrap_or_default().to_string(),
                    result: t["result"].as_str().unwrap_or_default().to_string(),
                    seed: t["seed"].as_u64().unwrap_or(0),
                    duration_ms: t["duration_ms"].as_u64().unwrap_or(0),
                    reason: t["reason"].as_str().map(str::to_string),
                    replay: t["replay_command"].as_str().map(str::to_string),
                })
                .collect()
        })
        .unwrap_or_default();
    let count = |r: &str| tests.iter().filter(|t| t.result == r).count() as u64;
    let (passed, failed, errored) = (count("pass"), count("fail"), count("error"));
    let verdict = match exit_code {
        Some(0) if failed == 0 && errored == 0 => Verdict::Pass,
        Some(2) if errored == 0 => Verdict::Fail,
        _ => Verdict::Error,
    };
    let mut document = doc.to_string();
    if document.len() > RESULT_LIMIT {
        // Traces are what make a document big; the verdicts stay.
        if let Some(ts) = doc["tests"].as_array_mut() {
            for t in ts {
                t["events"] = json!([]);
            }
        }
        doc["events_dropped"] = json!("the traces did not fit in a ConfigMap");
        document = doc.to_string();
    }
    let mut text: String = log
        .lines()
        .filter(|l| !l.starts_with("run-ca: ") && !l.trim_start().starts_with("{\""))
        .flat_map(|l| [l, "\n"])
        .collect();
    if text.len() > TEXT_LIMIT {
        let mut cut = text.len() - TEXT_LIMIT;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = format!("[... the first {cut} bytes are left out]\n{}", &text[cut..]);
    }
    Some(Outcome {
        verdict,
        passed,
        failed,
        errored,
        tests,
        document,
        text,
    })
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn unix_now() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

fn rfc3339(secs: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn parse_time(t: Option<&String>) -> Option<i64> {
    t.and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| t.as_second())
}

/// What a finished run's schedule asks for at `now`.
#[derive(Debug, PartialEq)]
pub enum Due {
    /// No schedule (or nothing a schedule could fix: an invalid spec).
    Never,
    /// The next tick, that far away.
    Wait(Duration, i64),
    /// A tick has passed since the run ended: start the next run for it.
    Now(i64),
}

/// Ticks while a run runs are skipped: only one after its end counts,
/// and after an operator outage only the latest one (one run, not a
/// backlog).
pub fn due(spec: &FaultTestSpec, status: &FaultTestStatus, now: i64) -> Due {
    let Some(schedule) = spec
        .schedule
        .as_deref()
        .and_then(|s| Schedule::parse(s).ok())
    else {
        return Due::Never;
    };
    if status.phase == Some(Phase::Invalid) {
        return Due::Never;
    }
    let ended = parse_time(status.completion_time.as_ref())
        .or_else(|| parse_time(status.start_time.as_ref()))
        .unwrap_or(now);
    match schedule.latest_at_or_before(now) {
        Some(t) if t > ended => Due::Now(t),
        _ => match schedule.next_after(now.max(ended)) {
            Some(t) => Due::Wait(Duration::from_secs((t - now).max(1) as u64), t),
            None => Due::Never,
        },
    }
}

/// With a schedule, a finished run joins `st.history` (capped at the
/// history limit); returns the records that fell out.
fn record_history(ft: &FaultTest, st: &mut FaultTestStatus) -> Vec<RunRecord> {
    if ft.spec.schedule.is_none() {
        return Vec::new();
    }
    let Some(runner) = st.runner.clone() else {
        return Vec::new();
    };
    st.history.retain(|r| r.runner != runner);
    st.history.push(RunRecord {
        runner,
        verdict: st.verdict,
        passed: st.passed,
        failed: st.failed,
        errored: st.errored,
        start_time: st.start_time.clone(),
        completion_time: st.completion_time.clone(),
        result_ref: st.result_ref.clone(),
    });
    let limit = ft.spec.history_limit.unwrap_or(5).max(1) as usize;
    let over = st.history.len().saturating_sub(limit);
    st.history.drain(..over).collect()
}

/// Writes the status of a finished run: with a schedule, its history and
/// the removal of what fell out of it; the action that follows.
async fn finish(apis: &Apis, ft: &FaultTest, mut st: FaultTestStatus) -> Result<Action, Error> {
    let dropped = record_history(ft, &mut st);
    write_status(&apis.fts, ft, &st).await?;
    let prefix = format!("{}-run-", ft.name_any());
    for r in dropped {
        let _ = apis
            .pods
            .delete(&r.runner, &DeleteParams::background())
            .await;
        let spec = r
            .runner
            .strip_prefix(&prefix)
            .map(|id| format!("{}-spec-{id}", ft.name_any()));
        for cm in r.result_ref.iter().chain(spec.iter()) {
            let _ = apis.configmaps.delete(cm, &DeleteParams::default()).await;
        }
    }
    Ok(if ft.spec.schedule.is_some() {
        Action::requeue(Duration::from_secs(1))
    } else {
        Action::await_change()
    })
}

fn condition(ft: &FaultTest, type_: &str, ok: bool, reason: &str, message: &str) -> Condition {
    let g = ft.metadata.generation.unwrap_or(0);
    let status = if ok { "True" } else { "False" };
    // The transition time stays while the status does not change.
    let since = ft
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status && c.observed_generation == g)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now);
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: since,
        observed_generation: g,
    }
}

fn with_condition(mut list: Vec<Condition>, c: Condition) -> Vec<Condition> {
    list.retain(|x| x.type_ != c.type_);
    list.push(c);
    list
}

async fn write_status(
    api: &Api<FaultTest>,
    ft: &FaultTest,
    status: &FaultTestStatus,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": "faultbox.io/v1alpha1",
        "kind": "FaultTest",
        "status": status,
    });
    api.patch_status(
        &ft.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn event(ctx: &Context, ft: &FaultTest, warning: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &ft.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "could not publish an event");
    }
}

/// `base` as a run that broke: phase and verdict Error, the condition
/// `type_` false for `reason`, the run over.
fn broken(
    ft: &FaultTest,
    base: FaultTestStatus,
    type_: &str,
    reason: &str,
    message: &str,
) -> FaultTestStatus {
    FaultTestStatus {
        phase: Some(Phase::Error),
        verdict: Some(Verdict::Error),
        conditions: with_condition(
            base.conditions.clone(),
            condition(ft, type_, false, reason, message),
        ),
        completion_time: Some(now()),
        ..base
    }
}

/// Writes a broken run's status, says so in a Warning Event, counts it.
async fn report_broken(
    ctx: &Context,
    apis: &Apis,
    ft: &FaultTest,
    status: FaultTestStatus,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let action = finish(apis, ft, status).await?;
    event(ctx, ft, true, reason, message).await;
    ctx.metrics.finished("error");
    Ok(action)
}

/// Whether the finished runner pod goes.
fn remove_pod(keep: KeepPods, verdict: Verdict) -> bool {
    match keep {
        KeepPods::Never => true,
        KeepPods::OnFailure => verdict == Verdict::Pass,
        KeepPods::Always => false,
    }
}

/// The namespaced APIs a reconcile uses.
struct Apis {
    fts: Api<FaultTest>,
    pods: Api<Pod>,
    configmaps: Api<ConfigMap>,
}

/// Reconciles one FaultTest.
pub async fn reconcile(ft: Arc<FaultTest>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_inner(&ft, &ctx).await;
    ctx.metrics.reconciled(started.elapsed(), result.is_err());
    result
}

async fn reconcile_inner(ft: &FaultTest, ctx: &Context) -> Result<Action, Error> {
    let ns = ft.namespace().unwrap_or_else(|| "default".into());
    let apis = Apis {
        fts: Api::namespaced(ctx.client.clone(), &ns),
        pods: Api::namespaced(ctx.client.clone(), &ns),
        configmaps: Api::namespaced(ctx.client.clone(), &ns),
    };
    let Apis {
        fts,
        pods,
        configmaps,
    } = &apis;
    let g = ft.metadata.generation.unwrap_or(0);
    let mut status = ft.status.clone().unwrap_or_default();
    if status.observed_generation != Some(g) {
        // A new generation: a new run, whose status starts afresh.
        status = FaultTestStatus {
            conditions: status.conditions,
            history: status.history,
            ..Default::default()
        };
    } else if status.phase.is_some_and(Phase::done) {
        match due(&ft.spec, &status, unix_now()) {
            Due::Never => return Ok(Action::await_change()),
            Due::Wait(wait, next) => {
                let next = Some(rfc3339(next));
                if status.next_schedule_time != next {
                    let st = FaultTestStatus {
                        next_schedule_time: next,
                        ..status.clone()
                    };
                    write_status(fts, ft, &st).await?;
                }
                return Ok(Action::requeue(wait));
            }
            Due::Now(tick) => {
                status = FaultTestStatus {
                    conditions: status.conditions,
                    history: status.history,
                    observed_generation: Some(g),
                    run_index: status.run_index + 1,
                    last_schedule_time: Some(rfc3339(tick)),
                    ..Default::default()
                };
            }
        }
    }
    let n = names(ft, status.run_index);

    // Runs of earlier generations are cancelled: their pods go (their
    // ConfigMaps stay owned and are collected with the FaultTest).
    let mine = ListParams::default().labels(&format!("{LABEL_TEST}={}", ft.name_any()));
    for old in pods.list(&mine).await?.items {
        // Runner pods and the service pods their runners made both carry
        // their generation; a pod without one is not a run's.
        let gen_label = old.labels().get(LABEL_GENERATION).cloned();
        if gen_label.is_some_and(|l| l != g.to_string()) {
            let _ = pods
                .delete(&old.name_any(), &DeleteParams::background())
                .await;
        }
    }

    let (timeout, files) = match check_fields(&ft.spec) {
        Err(i) => (Duration::ZERO, Err(i)),
        Ok(t) => (t, gather(ft, configmaps).await?),
    };
    let files = match files {
        Ok(f) => {
            let filter = ft.spec.test.clone();
            let checked = f.clone();
            match tokio::task::spawn_blocking(move || validate(&checked, filter.as_deref())).await {
                Ok(Ok(needs)) => Ok((f, needs)),
                Ok(Err(i)) => Err(i),
                Err(e) => Err(invalid("ValidationCrashed", e.to_string())),
            }
        }
        Err(i) => Err(i),
    };
    let (files, needs) = match files {
        Ok(f) => f,
        Err(i) => {
            let st = FaultTestStatus {
                phase: Some(Phase::Invalid),
                verdict: None,
                conditions: with_condition(
                    status.conditions.clone(),
                    condition(ft, "Validated", false, i.reason, &i.message),
                ),
                observed_generation: Some(g),
                history: status.history.clone(),
                ..Default::default()
            };
            write_status(fts, ft, &st).await?;
            event(ctx, ft, true, i.reason, i.message.clone()).await;
            ctx.metrics.finished("invalid");
            return Ok(Action::await_change());
        }
    };

    // The spec ConfigMap, then the pod: both created once per generation.
    if configmaps.get_opt(&n.spec).await?.is_none() {
        let cm = ConfigMap {
            metadata: meta(ft, &n.spec),
            data: Some(files),
            ..Default::default()
        };
        match configmaps.create(&PostParams::default(), &cm).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let pod = match pods.get_opt(&n.pod).await? {
        Some(p) => p,
        None if status.runner.as_deref() == Some(n.pod.as_str())
            && status.observed_generation == Some(g) =>
        {
            // We made it and it is gone: deleted or evicted.
            let message = format!("runner pod {} disappeared before reporting", n.pod);
            let st = broken(ft, status.clone(), "Completed", "RunnerLost", &message);
            return report_broken(ctx, &apis, ft, st, "RunnerLost", message).await;
        }
        None => {
            let pod = runner_pod(ft, status.run_index, &ctx.runner, timeout, &needs);
            let created = match pods.create(&PostParams::default(), &pod).await {
                Ok(p) => p,
                Err(kube::Error::Api(e)) if e.code == 409 => pods.get(&n.pod).await?,
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    // Nothing half-created: the spec ConfigMap goes too.
                    let _ = configmaps.delete(&n.spec, &DeleteParams::default()).await;
                    let message =
                        forbidden(&e.message, &ft.namespace().unwrap_or_default(), &needs);
                    let base = FaultTestStatus {
                        observed_generation: Some(g),
                        ..status.clone()
                    };
                    let st = broken(ft, base, "RunnerReady", "Forbidden", &message);
                    return report_broken(ctx, &apis, ft, st, "Forbidden", message).await;
                }
                Err(e) => return Err(e.into()),
            };
            let st = FaultTestStatus {
                phase: Some(Phase::Pending),
                conditions: with_condition(
                    status.conditions.clone(),
                    condition(ft, "Validated", true, "Valid", "the spec loads"),
                ),
                observed_generation: Some(g),
                runner: Some(n.pod.clone()),
                start_time: Some(now()),
                ..status.clone()
            };
            write_status(fts, ft, &st).await?;
            event(
                ctx,
                ft,
                false,
                "RunStarted",
                format!("runner pod {}", n.pod),
            )
            .await;
            ctx.metrics.started();
            let _ = created;
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
    };
    follow(ft, ctx, &apis, &status, &needs, pod).await
}

/// The certificate of the runner's run CA, from its `run-ca:` log line.
pub fn run_ca(log: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.strip_prefix("run-ca: "))
        .and_then(|j| serde_json::from_str::<String>(j).ok())
        .filter(|pem| pem.contains("BEGIN CERTIFICATE"))
}

/// Publishes the run CA in the log in its ConfigMap, once; its name.
async fn publish_ca(
    ft: &FaultTest,
    configmaps: &Api<ConfigMap>,
    n: &Names,
    log: &str,
) -> Result<Option<String>, Error> {
    let Some(pem) = run_ca(log) else {
        return Ok(None);
    };
    let cm = ConfigMap {
        metadata: meta(ft, &n.ca),
        data: Some(BTreeMap::from([("ca.crt".to_string(), pem)])),
        ..Default::default()
    };
    match configmaps.create(&PostParams::default(), &cm).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Some(n.ca.clone()))
}

/// Turns the runner pod's state into the status.
async fn follow(
    ft: &FaultTest,
    ctx: &Context,
    apis: &Apis,
    status: &FaultTestStatus,
    needs: &Needs,
    pod: Pod,
) -> Result<Action, Error> {
    let n = names(ft, status.run_index);
    let Apis {
        fts,
        pods,
        configmaps,
    } = apis;
    let g = ft.metadata.generation.unwrap_or(0);
    let pod_status = pod.status.clone().unwrap_or_default();
    let phase = pod_status.phase.clone().unwrap_or_default();
    let waiting = pod_status
        .container_statuses
        .as_ref()
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.clone());
    let mut base = FaultTestStatus {
        observed_generation: Some(g),
        runner: Some(n.pod.clone()),
        start_time: status.start_time.clone().or_else(|| Some(now())),
        ..status.clone()
    };
    let publish = needs.tls && base.ca_ref.is_none() && phase == "Running";
    if publish {
        let log = pods
            .logs(&n.pod, &LogParams::default())
            .await
            .unwrap_or_default();
        base.ca_ref = publish_ca(ft, configmaps, &n, &log).await?;
    }
    if let Some(w) = &waiting
        && matches!(
            w.reason.as_deref(),
            Some("ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull")
        )
    {
        let message = format!(
            "the runner image cannot be pulled ({}): {}",
            w.reason.clone().unwrap_or_default(),
            w.message.clone().unwrap_or_default()
        );
        let st = broken(ft, base, "RunnerReady", "ImagePull", &message);
        let action = report_broken(ctx, apis, ft, st, "ImagePull", message).await?;
        let _ = pods.delete(&n.pod, &DeleteParams::background()).await;
        return Ok(action);
    }
    match phase.as_str() {
        "Succeeded" | "Failed" => {}
        _ => {
            let unschedulable = pod_status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False");
            let (ready, reason, message, phase) = match (&unschedulable, phase.as_str()) {
                (Some(c), _) => (
                    false,
                    c.reason.clone().unwrap_or_else(|| "Unschedulable".into()),
                    format!(
                        "the runner pod is not scheduled: {}",
                        c.message.clone().unwrap_or_default()
                    ),
                    Phase::Pending,
                ),
                (None, "Running") => (
                    true,
                    "Running".to_string(),
                    "the runner runs the tests".to_string(),
                    Phase::Running,
                ),
                _ => (
                    false,
                    "Starting".to_string(),
                    "the runner pod is starting".to_string(),
                    Phase::Pending,
                ),
            };
            let st = FaultTestStatus {
                phase: Some(phase),
                conditions: with_condition(
                    base.conditions.clone(),
                    condition(ft, "RunnerReady", ready, &reason, &message),
                ),
                ..base
            };
            if Some(&st) != ft.status.as_ref() {
                write_status(fts, ft, &st).await?;
            }
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
    }
    let terminated = pod_status
        .container_statuses
        .as_ref()
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.clone());
    let code = terminated.as_ref().map(|t| t.exit_code);
    let log = pods
        .logs(&n.pod, &LogParams::default())
        .await
        .unwrap_or_default();
    if needs.tls && base.ca_ref.is_none() {
        base.ca_ref = publish_ca(ft, configmaps, &n, &log).await?;
    }
    let got = outcome(&log, code);
    // The kubelet reports the container ended before the runtime has
    // necessarily written the last of its log: a result line of some
    // hundred KiB can still be on its way. Look again for a while before
    // calling the run broken.
    let ended_at = terminated
        .as_ref()
        .and_then(|t| t.finished_at.as_ref())
        .map(|t| t.0.as_second());
    if got.is_none() && ended_at.is_some_and(|at| unix_now() - at < LOG_GRACE_SECS) {
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let (st, warning, reason, note) = match got {
        Some(o) => {
            let cm = ConfigMap {
                metadata: meta(ft, &n.result),
                data: Some(BTreeMap::from([
                    ("result.json".to_string(), o.document.clone()),
                    ("output.txt".to_string(), o.text.clone()),
                ])),
                ..Default::default()
            };
            match configmaps.create(&PostParams::default(), &cm).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            for t in o.tests.iter().filter(|t| t.result != "pass").take(10) {
                event(
                    ctx,
                    ft,
                    true,
                    "TestFailed",
                    format!(
                        "{} {}: {}",
                        t.name,
                        t.result,
                        t.reason.clone().unwrap_or_default()
                    ),
                )
                .await;
            }
            let pass = o.verdict == Verdict::Pass;
            let summary = format!(
                "{} passed, {} failed, {} errored",
                o.passed, o.failed, o.errored
            );
            let st = FaultTestStatus {
                phase: Some(if pass {
                    Phase::Succeeded
                } else {
                    Phase::Failed
                }),
                verdict: Some(o.verdict),
                passed: o.passed,
                failed: o.failed,
                errored: o.errored,
                tests: o.tests.iter().take(STATUS_TESTS).cloned().collect(),
                conditions: with_condition(
                    base.conditions.clone(),
                    condition(
                        ft,
                        "Completed",
                        true,
                        if pass { "Passed" } else { "Failed" },
                        &summary,
                    ),
                ),
                completion_time: Some(now()),
                result_ref: Some(n.result.clone()),
                ..base
            };
            (
                st,
                !pass,
                if pass { "RunSucceeded" } else { "RunFailed" },
                summary,
            )
        }
        None => {
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let why = terminated
                .as_ref()
                .map(|t| {
                    format!(
                        "exit code {}{}",
                        t.exit_code,
                        t.reason
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    )
                })
                .or_else(|| pod_status.reason.clone())
                .unwrap_or_else(|| "no result".into());
            let message = format!(
                "the runner ended without a result: {why}; its last lines:\n{}",
                tail.join("\n")
            );
            let st = broken(ft, base, "Completed", "RunnerFailed", &message);
            (st, true, "RunnerFailed", message)
        }
    };
    let verdict = st.verdict.unwrap_or(Verdict::Error);
    let action = finish(apis, ft, st).await?;
    event(ctx, ft, warning, reason, note).await;
    ctx.metrics.finished(match verdict {
        Verdict::Pass => "pass",
        Verdict::Fail => "fail",
        Verdict::Error => "error",
    });
    if remove_pod(ft.spec.keep_pods.unwrap_or_default(), verdict) {
        let _ = pods.delete(&n.pod, &DeleteParams::background()).await;
    }
    Ok(action)
}

/// Retries a failed reconcile after a pause.
pub fn error_policy(_ft: Arc<FaultTest>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ConfigMapKeyRef, SecretRef, SourceFrom};

    fn ft(spec: FaultTestSpec) -> FaultTest {
        let mut ft = FaultTest::new("checkout", spec);
        ft.metadata.namespace = Some("shop".into());
        ft.metadata.uid = Some("uid-1".into());
        ft.metadata.generation = Some(3);
        ft
    }

    fn source(text: &str) -> FaultTestSpec {
        FaultTestSpec {
            source: Some(text.into()),
            ..Default::default()
        }
    }

    #[test]
    fn fields_are_checked_before_anything_is_read() {
        let both = FaultTestSpec {
            source: Some("x".into()),
            source_from: Some(SourceFrom {
                config_map_key_ref: ConfigMapKeyRef {
                    name: "a".into(),
                    key: "b".into(),
                },
            }),
            ..Default::default()
        };
        assert_eq!(
            check_fields(&both).map_err(|e| e.reason),
            Err("BothSources")
        );
        assert_eq!(
            check_fields(&FaultTestSpec::default()).map_err(|e| e.reason),
            Err("NoSource")
        );
        let zero = FaultTestSpec {
            timeout: Some("0s".into()),
            ..source("x")
        };
        assert_eq!(check_fields(&zero).map_err(|e| e.reason), Err("BadTimeout"));
        let ten = FaultTestSpec {
            timeout: Some("10m".into()),
            ..source("x")
        };
        assert_eq!(check_fields(&ten), Ok(Duration::from_secs(600)));
        for bad in ["0 3 * *", "61 * * * *", "* * * * mon-x", "*/0 * * * *"] {
            let s = FaultTestSpec {
                schedule: Some(bad.into()),
                ..source("x")
            };
            assert_eq!(
                check_fields(&s).map_err(|e| e.reason),
                Err("BadSchedule"),
                "{bad}"
            );
        }
        for good in ["0 3 * * *", "*/15 1-5 1,15 * 0-6"] {
            let s = FaultTestSpec {
                schedule: Some(good.into()),
                ..source("x")
            };
            assert!(check_fields(&s).is_ok(), "{good}");
        }
        for (field, reason) in [
            (
                FaultTestSpec {
                    schedule: Some("0 0 31 2 *".into()),
                    ..source("x")
                },
                "BadSchedule",
            ),
            (
                FaultTestSpec {
                    history_limit: Some(0),
                    ..source("x")
                },
                "BadHistoryLimit",
            ),
        ] {
            assert_eq!(check_fields(&field).map_err(|e| e.reason), Err(reason));
        }
    }

    #[test]
    fn specs_are_validated_by_the_same_loader_as_dry_run() {
        let files = |text: &str| BTreeMap::from([("spec.star".to_string(), text.to_string())]);
        let good = "def test_a():\n    pass\n\ndef test_b():\n    pass\n";
        assert_eq!(validate(&files(good), None), Ok(Needs::default()));
        assert_eq!(validate(&files(good), Some("a")), Ok(Needs::default()));
        let none = validate(&files(good), Some("zzz")).expect_err("no match");
        assert_eq!(none.reason, "NoMatchingTest");
        assert!(none.message.contains("test_a, test_b"), "{}", none.message);
        let broken = validate(&files("def test_a(:\n"), None).expect_err("syntax");
        assert_eq!(broken.reason, "InvalidSpec");
        assert!(
            broken.message.contains("spec.star:1:"),
            "{}",
            broken.message
        );
        let kwarg = validate(
            &files("service(\"s\", \"/bin/true\", helthcheck = 1)\ndef test_a():\n    pass\n"),
            None,
        )
        .expect_err("kwarg");
        assert!(
            kwarg.message.contains("did you mean healthcheck"),
            "{}",
            kwarg.message
        );
        // A helper file next to the spec, as spec.files gives it.
        let mut with_helper =
            files("load(\"helper.star\", \"x\")\ndef test_a():\n    assert_eq(x, 1)\n");
        with_helper.insert("helper.star".into(), "x = 1\n".into());
        assert_eq!(validate(&with_helper, None), Ok(Needs::default()));
        let mut escape = files(good);
        escape.insert("../evil".into(), "".into());
        assert_eq!(
            validate(&escape, None).map_err(|e| e.reason),
            Err("BadFileName")
        );
    }

    #[test]
    fn the_runner_pod_is_restricted_owned_and_named_by_generation() {
        let f = ft(FaultTestSpec {
            test: Some("orders_*".into()),
            runs: Some(2),
            seed: Some(42),
            ..source("x")
        });
        let pod = runner_pod(
            &f,
            0,
            &"localhost/faultbox:dev".into(),
            Duration::from_secs(600),
            &Needs::default(),
        );
        assert_eq!(pod.metadata.name.as_deref(), Some("checkout-run-3"));
        let owner = &pod.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("FaultTest", "checkout", Some(true))
        );
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.active_deadline_seconds, Some(600));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let psc = spec.security_context.expect("pod security");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert!(psc.run_as_user.is_some_and(|u| u != 0));
        assert_eq!(
            psc.seccomp_profile.expect("seccomp").type_,
            "RuntimeDefault"
        );
        let c = &spec.containers[0];
        let sc = c.security_context.as_ref().expect("container security");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(
            c.args.as_deref().unwrap_or_default().join(" "),
            "test /spec/spec.star --format json-line --test orders_* --runs 2 --seed 42"
        );
        let volumes = spec.volumes.expect("volumes");
        assert_eq!(
            volumes[0].config_map.as_ref().map(|c| c.name.as_str()),
            Some("checkout-spec-3")
        );
    }

    #[test]
    fn a_missing_runner_account_says_which_chart_value_to_set() {
        let pods = Needs {
            pods: true,
            ..Needs::default()
        };
        let api = r#"error looking up service account shop/faultbox-runner: serviceaccount "faultbox-runner" not found"#;
        let m = forbidden(api, "shop", &pods);
        assert!(
            m.contains("runnerNamespaces") && m.contains("namespace shop"),
            "{m}"
        );
        let m = forbidden("pods is forbidden: User cannot create", "shop", &pods);
        assert!(
            m.starts_with("the operator may not create pods here"),
            "{m}"
        );
    }

    #[test]
    fn pull_secrets_and_insecure_registries_reach_a_runner_that_makes_pods() {
        let f = ft(FaultTestSpec {
            image_pull_secrets: Some(vec![SecretRef {
                name: "regcred".into(),
            }]),
            ..source("x")
        });
        let defaults = RunnerDefaults {
            image: "localhost/faultbox:dev".into(),
            insecure_registries: vec!["10.244.0.1:5000".into(), "reg.test".into()],
        };
        let pods = Needs {
            pods: true,
            ..Needs::default()
        };
        let pod = runner_pod(&f, 0, &defaults, Duration::from_secs(60), &pods);
        let spec = pod.spec.expect("spec");
        let env: BTreeMap<String, String> = spec.containers[0]
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        assert_eq!(
            env["FAULTBOX_INSECURE_REGISTRIES"],
            "10.244.0.1:5000,reg.test"
        );
        assert_eq!(env["FAULTBOX_IMAGE_PULL_SECRETS"], "regcred");
        assert_eq!(env["FAULTBOX_PULL_SECRETS_DIR"], PULL_SECRETS_DIR);
        let mount = spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/pull-secrets/regcred")
            .expect("the pull secret's mount");
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.secret.clone())
            .expect("its volume");
        assert_eq!(volume.secret_name.as_deref(), Some("regcred"));
        assert_eq!(volume.optional, Some(true));
        assert_eq!(
            spec.image_pull_secrets
                .expect("the runner's own pull secrets")[0]
                .name,
            "regcred"
        );
        // A runner that makes no pods gets neither.
        let pod = runner_pod(&f, 0, &defaults, Duration::from_secs(60), &Needs::default());
        let env = pod.spec.expect("spec").containers[0]
            .env
            .clone()
            .unwrap_or_default();
        assert!(
            env.iter()
                .all(|e| !e.name.contains("REGISTR") && !e.name.contains("PULL")),
            "{env:?}"
        );
    }

    #[test]
    fn secrets_the_spec_names_are_mounted_and_the_run_ca_is_published() {
        let files = |text: &str| BTreeMap::from([("spec.star".to_string(), text.to_string())]);
        let needs = validate(
            &files(
                "s = service(\"s\", interface(\"main\", \"http\", 8443, tls = tls_cert(secret = \"front-tls\")), remote = \"orders:8443\", healthcheck = tcp(\"orders:8443\"))\nt = service(\"t\", interface(\"main\", \"http\", 8443, tls = tls_cert()), remote = \"pay:8443\", healthcheck = tcp(\"pay:8443\"))\ndef test_a():\n    pass\n",
            ),
            None,
        )
        .expect("valid");
        assert_eq!(
            needs,
            Needs {
                secrets: vec!["front-tls".into()],
                tls: true,
                pods: false,
            }
        );
        let pod = runner_pod(
            &ft(source("x")),
            0,
            &"localhost/faultbox:dev".into(),
            Duration::from_secs(60),
            &needs,
        );
        let spec = pod.spec.expect("spec");
        let secret = spec
            .volumes
            .as_ref()
            .and_then(|vs| vs.iter().find_map(|v| v.secret.clone()))
            .expect("a secret volume");
        assert_eq!(
            (secret.secret_name.as_deref(), secret.optional),
            (Some("front-tls"), Some(true))
        );
        let c = &spec.containers[0];
        assert!(
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == "/secrets/front-tls")
        );
        let env: Vec<(String, String)> = c
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        assert!(env.contains(&("FAULTBOX_SECRETS_DIR".into(), SECRETS_DIR.into())));
        assert!(env.contains(&("FAULTBOX_RUN_CA_DIR".into(), RUN_CA_DIR.into())));
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let log = format!(
            "Seed: 1\nrun-ca: {}\n--- PASS: test_a\n",
            serde_json::Value::String(pem.into())
        );
        assert_eq!(run_ca(&log).as_deref(), Some(pem));
        assert_eq!(run_ca("run-ca: \"not a certificate\"\n"), None);
    }

    #[test]
    fn the_result_line_becomes_the_verdict() {
        let doc = r#"{"version":1,"pass":1,"fail":1,"error":0,"tests":[{"name":"test_a","result":"pass","seed":7,"duration_ms":12,"replay_command":"faultbox test s --test a --seed 7"},{"name":"test_b","result":"fail","seed":7,"duration_ms":30,"reason":"assert_eq failed: 503 != 200"}]}"#;
        let log = format!("Seed: 7\n--- PASS: test_a\n{doc}\n1 passed, 1 failed\n");
        let o = outcome(&log, Some(2)).expect("outcome");
        assert_eq!(
            (o.verdict, o.passed, o.failed, o.errored),
            (Verdict::Fail, 1, 1, 0)
        );
        assert_eq!(
            o.tests[1].reason.as_deref(),
            Some("assert_eq failed: 503 != 200")
        );
        assert_eq!(
            o.tests[0].replay.as_deref(),
            Some("faultbox test s --test a --seed 7")
        );
        assert_eq!(o.text, "Seed: 7\n--- PASS: test_a\n1 passed, 1 failed\n");
        let pass = doc.replace("\"fail\",\"seed\"", "\"pass\",\"seed\"");
        assert_eq!(
            outcome(&pass, Some(0)).map(|o| o.verdict),
            Some(Verdict::Pass)
        );
        // The exit code must agree: a crash after printing is an error.
        assert_eq!(
            outcome(&pass, Some(137)).map(|o| o.verdict),
            Some(Verdict::Error)
        );
        assert_eq!(outcome("faultbox: spec.star:1:1: boom\n", Some(1)), None);
        let big = format!(
            r#"{{"tests":[{{"name":"test_a","result":"pass","seed":1,"duration_ms":1,"events":["{}"]}}]}}"#,
            "x".repeat(RESULT_LIMIT + 10)
        );
        let o = outcome(&big, Some(0)).expect("outcome");
        assert!(o.document.len() < RESULT_LIMIT, "{}", o.document.len());
        assert!(o.document.contains("events_dropped"));
    }

    #[test]
    fn a_schedule_starts_one_run_per_tick_after_the_last_run_ended() {
        let t = |s: &str| parse_time(Some(&s.to_string())).expect("time");
        let spec = FaultTestSpec {
            schedule: Some("0 * * * *".into()),
            ..source("x")
        };
        let done = |completion: &str| FaultTestStatus {
            phase: Some(Phase::Succeeded),
            start_time: Some("2026-12-03T09:58:00Z".into()),
            completion_time: Some(completion.into()),
            ..Default::default()
        };
        // Ended before the 10:00 tick, now 10:20: that tick's run starts.
        assert_eq!(
            due(
                &spec,
                &done("2026-12-03T09:59:00Z"),
                t("2026-12-03T10:20:00Z")
            ),
            Due::Now(t("2026-12-03T10:00:00Z"))
        );
        // The 10:00 tick fell during the run: skipped, wait for 11:00.
        assert_eq!(
            due(
                &spec,
                &done("2026-12-03T10:05:00Z"),
                t("2026-12-03T10:20:00Z")
            ),
            Due::Wait(Duration::from_secs(40 * 60), t("2026-12-03T11:00:00Z"))
        );
        // After three days away, one run for the latest tick, not 72.
        assert_eq!(
            due(
                &spec,
                &done("2026-12-03T10:05:00Z"),
                t("2026-12-06T10:20:00Z")
            ),
            Due::Now(t("2026-12-06T10:00:00Z"))
        );
        let invalid = FaultTestStatus {
            phase: Some(Phase::Invalid),
            ..done("2026-12-03T09:59:00Z")
        };
        assert_eq!(due(&spec, &invalid, t("2026-12-03T10:20:00Z")), Due::Never);
        assert_eq!(
            due(
                &source("x"),
                &done("2026-12-03T09:59:00Z"),
                t("2026-12-03T10:20:00Z")
            ),
            Due::Never
        );
    }

    #[test]
    fn the_history_keeps_the_latest_runs() {
        let f = ft(FaultTestSpec {
            schedule: Some("* * * * *".into()),
            history_limit: Some(2),
            ..source("x")
        });
        let mut st = FaultTestStatus::default();
        let mut dropped = Vec::new();
        for (run, verdict) in [(0, Verdict::Pass), (1, Verdict::Fail), (2, Verdict::Pass)] {
            let n = names(&f, run);
            st.runner = Some(n.pod);
            st.verdict = Some(verdict);
            st.result_ref = Some(n.result);
            dropped.extend(record_history(&f, &mut st));
        }
        let kept: Vec<(&str, Option<Verdict>)> = st
            .history
            .iter()
            .map(|r| (r.runner.as_str(), r.verdict))
            .collect();
        assert_eq!(
            kept,
            [
                ("checkout-run-3-1", Some(Verdict::Fail)),
                ("checkout-run-3-2", Some(Verdict::Pass))
            ]
        );
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].result_ref.as_deref(), Some("checkout-result-3"));
        // Recording the same run twice (a repeated reconcile) adds nothing.
        assert!(record_history(&f, &mut st).is_empty());
        assert_eq!(st.history.len(), 2);
        // Without a schedule there is no history.
        let once = ft(source("x"));
        let mut st = FaultTestStatus {
            runner: Some("checkout-run-3".into()),
            ..Default::default()
        };
        assert!(record_history(&once, &mut st).is_empty());
        assert!(st.history.is_empty());
    }

    #[test]
    fn the_example_faulttest_is_valid() {
        let ft: FaultTest =
            serde_yaml::from_str(include_str!("../../examples/kubernetes/checkout.yaml"))
                .expect("the example parses as a FaultTest");
        check_fields(&ft.spec).expect("its fields");
        let files = BTreeMap::from([(
            "spec.star".to_string(),
            ft.spec.source.clone().expect("source"),
        )]);
        validate(&files, None).expect("its spec loads");
    }

    #[test]
    fn finished_pods_go_unless_kept() {
        assert!(remove_pod(KeepPods::Never, Verdict::Fail));
        assert!(remove_pod(KeepPods::OnFailure, Verdict::Pass));
        assert!(!remove_pod(KeepPods::OnFailure, Verdict::Error));
        assert!(!remove_pod(KeepPods::Always, Verdict::Pass));
    }
}
