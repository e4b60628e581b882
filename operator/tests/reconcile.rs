//! The reconcile against kube's mock API server (tower-test): each test
//! answers the requests one reconcile makes, in order, and asserts what
//! they are (method, path, body).

use std::pin::pin;
use std::sync::Arc;

use faultbox_operator::crd::{FaultTest, FaultTestSpec};
use faultbox_operator::metrics::Metrics;
use faultbox_operator::reconcile::{Context, reconcile};
use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn context() -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "shop");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "faultbox-operator".into(),
            instance: None,
        },
    );
    (
        Arc::new(Context {
            client,
            recorder,
            runner: "localhost/faultbox:test".into(),
            metrics: Metrics::default(),
        }),
        handle,
    )
}

fn faulttest(source: &str) -> FaultTest {
    let mut ft = FaultTest::new(
        "checkout",
        FaultTestSpec {
            source: Some(source.into()),
            seed: Some(7),
            ..Default::default()
        },
    );
    ft.metadata.namespace = Some("shop".into());
    ft.metadata.uid = Some("0000-1111".into());
    ft.metadata.generation = Some(2);
    ft
}

/// Takes the next request: its method, path with query, and JSON body.
async fn next(
    handle: &mut std::pin::Pin<&mut Handle>,
) -> (
    Method,
    String,
    Value,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (request, send) = handle.next_request().await.expect("a request");
    let method = request.method().clone();
    let uri = request.uri().to_string();
    let bytes = request.into_body().collect_bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (method, uri, body, send)
}

fn reply(send: tower_test::mock::SendResponse<Response<Body>>, value: Value) {
    send.send_response(Response::new(Body::from(
        serde_json::to_vec(&value).expect("json"),
    )));
}

fn not_found(send: tower_test::mock::SendResponse<Response<Body>>) {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
    let body = Body::from(serde_json::to_vec(&status).expect("json"));
    send.send_response(
        Response::builder()
            .status(404)
            .body(body)
            .expect("response"),
    );
}

fn empty_list(kind: &str) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": []})
}

#[tokio::test]
async fn an_invalid_spec_gets_phase_invalid_a_condition_and_an_event_and_nothing_else() {
    let (ctx, handle) = context();
    let ft = faulttest("def test_a(:\n    pass\n");
    let verifier = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (m, uri, _, send) = next(&mut handle).await;
        assert_eq!(m, Method::GET);
        assert!(uri.starts_with("/api/v1/namespaces/shop/pods?"), "{uri}");
        assert!(
            uri.contains("labelSelector=faultbox.io%2Ffaulttest%3Dcheckout"),
            "{uri}"
        );
        reply(send, empty_list("PodList"));

        let (m, uri, body, send) = next(&mut handle).await;
        assert_eq!(m, Method::PATCH);
        assert!(
            uri.starts_with(
                "/apis/faultbox.io/v1alpha1/namespaces/shop/faulttests/checkout/status?"
            ),
            "{uri}"
        );
        assert!(
            uri.contains("fieldManager=faultbox-operator") && uri.contains("force=true"),
            "{uri}"
        );
        let status = &body["status"];
        assert_eq!(status["phase"], "Invalid", "{body:#}");
        assert_eq!(status["observedGeneration"], 2);
        let c = &status["conditions"][0];
        assert_eq!(
            (
                c["type"].as_str(),
                c["status"].as_str(),
                c["reason"].as_str()
            ),
            (Some("Validated"), Some("False"), Some("InvalidSpec"))
        );
        assert!(
            c["message"]
                .as_str()
                .is_some_and(|m| m.contains("spec.star:1:")),
            "{c}"
        );
        reply(
            send,
            json!({"apiVersion": "faultbox.io/v1alpha1", "kind": "FaultTest", "metadata": {"name": "checkout", "namespace": "shop"}, "spec": {}}),
        );

        let (m, uri, body, send) = next(&mut handle).await;
        assert_eq!(m, Method::POST);
        assert_eq!(uri, "/apis/events.k8s.io/v1/namespaces/shop/events?");
        assert_eq!(body["reason"], "InvalidSpec");
        assert_eq!(body["type"], "Warning");
        assert_eq!(body["regarding"]["name"], "checkout");
        reply(send, body);
    });
    let action = reconcile(Arc::new(ft), ctx).await.expect("reconcile");
    verifier.await.expect("verifier");
    assert_eq!(
        format!("{action:?}"),
        format!("{:?}", kube::runtime::controller::Action::await_change())
    );
}

#[tokio::test]
async fn a_valid_spec_gets_its_configmap_and_runner_pod_then_pending() {
    let (ctx, handle) = context();
    let ft = faulttest("def test_a():\n    pass\n");
    let verifier = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (_, uri, _, send) = next(&mut handle).await;
        assert!(uri.starts_with("/api/v1/namespaces/shop/pods?"), "{uri}");
        reply(send, empty_list("PodList"));

        // The spec ConfigMap: looked for, then created, owned.
        let (m, uri, _, send) = next(&mut handle).await;
        assert_eq!(
            (m, uri.as_str()),
            (
                Method::GET,
                "/api/v1/namespaces/shop/configmaps/checkout-spec-2"
            )
        );
        not_found(send);
        let (m, uri, body, send) = next(&mut handle).await;
        assert_eq!(
            (m, uri.as_str()),
            (Method::POST, "/api/v1/namespaces/shop/configmaps?")
        );
        assert_eq!(body["metadata"]["name"], "checkout-spec-2");
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "0000-1111");
        assert_eq!(body["data"]["spec.star"], "def test_a():\n    pass\n");
        reply(send, body);

        // The pod: looked for, then created.
        let (m, uri, _, send) = next(&mut handle).await;
        assert_eq!(
            (m, uri.as_str()),
            (Method::GET, "/api/v1/namespaces/shop/pods/checkout-run-2")
        );
        not_found(send);
        let (m, uri, body, send) = next(&mut handle).await;
        assert_eq!(
            (m, uri.as_str()),
            (Method::POST, "/api/v1/namespaces/shop/pods?")
        );
        assert_eq!(body["metadata"]["name"], "checkout-run-2");
        assert_eq!(body["metadata"]["ownerReferences"][0]["kind"], "FaultTest");
        assert_eq!(
            body["spec"]["containers"][0]["image"],
            "localhost/faultbox:test"
        );
        let args: Vec<&str> = body["spec"]["containers"][0]["args"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(
            args,
            [
                "test",
                "/spec/spec.star",
                "--format",
                "json-line",
                "--seed",
                "7"
            ]
        );
        reply(send, body);

        let (m, uri, body, send) = next(&mut handle).await;
        assert_eq!(m, Method::PATCH);
        assert!(uri.contains("/faulttests/checkout/status?"), "{uri}");
        assert_eq!(body["status"]["phase"], "Pending", "{body:#}");
        assert_eq!(body["status"]["runner"], "checkout-run-2");
        assert!(
            body["status"].get("verdict").is_none_or(Value::is_null),
            "no verdict before the end"
        );
        reply(
            send,
            json!({"apiVersion": "faultbox.io/v1alpha1", "kind": "FaultTest", "metadata": {"name": "checkout", "namespace": "shop"}, "spec": {}}),
        );

        let (m, _, body, send) = next(&mut handle).await;
        assert_eq!(m, Method::POST);
        assert_eq!(body["reason"], "RunStarted");
        reply(send, body);
    });
    reconcile(Arc::new(ft), ctx).await.expect("reconcile");
    verifier.await.expect("verifier");
}

#[tokio::test]
async fn a_finished_runner_becomes_the_verdict_the_result_configmap_and_a_deleted_pod() {
    let (ctx, handle) = context();
    let mut ft = faulttest("def test_a():\n    pass\n");
    ft.status = Some(faultbox_operator::crd::FaultTestStatus {
        phase: Some(faultbox_operator::crd::Phase::Running),
        observed_generation: Some(2),
        runner: Some("checkout-run-2".into()),
        ..Default::default()
    });
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "checkout-run-2", "namespace": "shop", "labels": {"faultbox.io/faulttest": "checkout", "faultbox.io/generation": "2"}},
        "spec": {"containers": [{"name": "runner", "image": "x"}]},
        "status": {"phase": "Succeeded", "containerStatuses": [{"name": "runner", "ready": false, "restartCount": 0, "image": "x", "imageID": "", "state": {"terminated": {"exitCode": 0}}}]}
    });
    let log = "Seed: 7\n{\"version\":1,\"pass\":1,\"fail\":0,\"error\":0,\"tests\":[{\"name\":\"test_a\",\"result\":\"pass\",\"seed\":7,\"duration_ms\":3}]}\n\n1 passed, 0 failed\n";
    let verifier = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (_, uri, _, send) = next(&mut handle).await;
        assert!(uri.starts_with("/api/v1/namespaces/shop/pods?"), "{uri}");
        reply(
            send,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod.clone()]}),
        );

        let (m, uri, _, send) = next(&mut handle).await;
        assert_eq!(
            (m, uri.as_str()),
            (
                Method::GET,
                "/api/v1/namespaces/shop/configmaps/checkout-spec-2"
            )
        );
        reply(
            send,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "checkout-spec-2"}}),
        );

        let (m, uri, _, send) = next(&mut handle).await;
        assert_eq!(
            (m, uri.as_str()),
            (Method::GET, "/api/v1/namespaces/shop/pods/checkout-run-2")
        );
        reply(send, pod);

        let (m, uri, _, send) = next(&mut handle).await;
        assert_eq!(m, Method::GET);
        assert!(
            uri.starts_with("/api/v1/namespaces/shop/pods/checkout-run-2/log"),
            "{uri}"
        );
        send.send_response(Response::new(Body::from(log.as_bytes().to_vec())));

        let (m, uri, body, send) = next(&mut handle).await;
        assert_eq!(
            (m, uri.as_str()),
            (Method::POST, "/api/v1/namespaces/shop/configmaps?")
        );
        assert_eq!(body["metadata"]["name"], "checkout-result-2");
        let doc: Value =
            serde_json::from_str(body["data"]["result.json"].as_str().expect("result"))
                .expect("doc");
        assert_eq!(doc["tests"][0]["name"], "test_a");
        reply(send, body);

        let (m, uri, body, send) = next(&mut handle).await;
        assert_eq!(m, Method::PATCH);
        assert!(uri.contains("/faulttests/checkout/status?"), "{uri}");
        let st = &body["status"];
        assert_eq!(
            (
                st["phase"].as_str(),
                st["verdict"].as_str(),
                st["passed"].as_u64()
            ),
            (Some("Succeeded"), Some("Pass"), Some(1)),
            "{body:#}"
        );
        assert_eq!(st["resultRef"], "checkout-result-2");
        assert_eq!(st["tests"][0]["durationMs"], 3);
        reply(
            send,
            json!({"apiVersion": "faultbox.io/v1alpha1", "kind": "FaultTest", "metadata": {"name": "checkout", "namespace": "shop"}, "spec": {}}),
        );

        let (m, _, body, send) = next(&mut handle).await;
        assert_eq!(
            (m, body["reason"].as_str()),
            (Method::POST, Some("RunSucceeded"))
        );
        reply(send, body);

        let (m, uri, _, send) = next(&mut handle).await;
        assert_eq!(m, Method::DELETE);
        assert!(
            uri.starts_with("/api/v1/namespaces/shop/pods/checkout-run-2"),
            "{uri}"
        );
        reply(
            send,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        );
    });
    reconcile(Arc::new(ft), ctx).await.expect("reconcile");
    verifier.await.expect("verifier");
}

/// Takes the next request, asserts its method and the start of its path.
async fn expect(
    handle: &mut std::pin::Pin<&mut Handle>,
    method: Method,
    path: &str,
) -> (Value, tower_test::mock::SendResponse<Response<Body>>) {
    let (m, uri, body, send) = next(handle).await;
    assert_eq!(m, method, "{uri}");
    assert!(uri.starts_with(path), "{method} {path}: got {uri}");
    (body, send)
}

fn runner(name: &str, generation: i64, state: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"faultbox.io/faulttest": "checkout", "faultbox.io/generation": generation.to_string()}},
        "spec": {"containers": [{"name": "runner", "image": "x"}]},
        "status": state,
    })
}

fn echo_ft(send: tower_test::mock::SendResponse<Response<Body>>) {
    reply(
        send,
        json!({"apiVersion": "faultbox.io/v1alpha1", "kind": "FaultTest", "metadata": {"name": "checkout", "namespace": "shop"}, "spec": {}}),
    );
}

fn pod_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
}

fn existing_spec() -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "checkout-spec-2"}})
}

#[tokio::test]
async fn a_new_generation_cancels_the_old_run_and_starts_its_own() {
    let (ctx, handle) = context();
    let mut ft = faulttest("def test_a():\n    pass\n");
    ft.status = Some(faultbox_operator::crd::FaultTestStatus {
        phase: Some(faultbox_operator::crd::Phase::Running),
        observed_generation: Some(1),
        runner: Some("checkout-run-1".into()),
        ..Default::default()
    });
    let old = runner("checkout-run-1", 1, json!({"phase": "Running"}));
    let verifier = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (_, send) = expect(&mut handle, Method::GET, "/api/v1/namespaces/shop/pods?").await;
        reply(send, pod_list(vec![old]));
        let (_, send) = expect(
            &mut handle,
            Method::DELETE,
            "/api/v1/namespaces/shop/pods/checkout-run-1",
        )
        .await;
        reply(
            send,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        );
        let (_, send) = expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/configmaps/checkout-spec-2",
        )
        .await;
        not_found(send);
        let (body, send) = expect(
            &mut handle,
            Method::POST,
            "/api/v1/namespaces/shop/configmaps?",
        )
        .await;
        assert_eq!(body["metadata"]["name"], "checkout-spec-2");
        reply(send, body);
        let (_, send) = expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/pods/checkout-run-2",
        )
        .await;
        not_found(send);
        let (body, send) = expect(&mut handle, Method::POST, "/api/v1/namespaces/shop/pods?").await;
        assert_eq!(body["metadata"]["name"], "checkout-run-2");
        reply(send, body);
        let (body, send) = expect(
            &mut handle,
            Method::PATCH,
            "/apis/faultbox.io/v1alpha1/namespaces/shop/faulttests/checkout/status",
        )
        .await;
        let st = &body["status"];
        assert_eq!(
            (
                st["phase"].as_str(),
                st["observedGeneration"].as_i64(),
                st["runner"].as_str()
            ),
            (Some("Pending"), Some(2), Some("checkout-run-2")),
            "{body:#}"
        );
        echo_ft(send);
        let (body, send) = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/shop/events",
        )
        .await;
        assert_eq!(body["reason"], "RunStarted");
        reply(send, body);
    });
    reconcile(Arc::new(ft), ctx).await.expect("reconcile");
    verifier.await.expect("verifier");
}

#[tokio::test]
async fn a_runner_that_ends_without_a_result_is_an_error_with_its_last_lines() {
    let (ctx, handle) = context();
    let mut ft = faulttest("def test_a():\n    pass\n");
    ft.status = Some(faultbox_operator::crd::FaultTestStatus {
        phase: Some(faultbox_operator::crd::Phase::Running),
        observed_generation: Some(2),
        runner: Some("checkout-run-2".into()),
        ..Default::default()
    });
    let pod = runner(
        "checkout-run-2",
        2,
        json!({"phase": "Failed", "containerStatuses": [{"name": "runner", "ready": false, "restartCount": 0, "image": "x", "imageID": "", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
    );
    let verifier = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (_, send) = expect(&mut handle, Method::GET, "/api/v1/namespaces/shop/pods?").await;
        reply(send, pod_list(vec![pod.clone()]));
        let (_, send) = expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/configmaps/checkout-spec-2",
        )
        .await;
        reply(send, existing_spec());
        let (_, send) = expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/pods/checkout-run-2",
        )
        .await;
        reply(send, pod);
        let (_, send) = expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/pods/checkout-run-2/log",
        )
        .await;
        send.send_response(Response::new(Body::from(
            b"Seed: 7\nloading a very large fixture\n".to_vec(),
        )));
        let (body, send) = expect(
            &mut handle,
            Method::PATCH,
            "/apis/faultbox.io/v1alpha1/namespaces/shop/faulttests/checkout/status",
        )
        .await;
        let st = &body["status"];
        assert_eq!(
            (st["phase"].as_str(), st["verdict"].as_str()),
            (Some("Error"), Some("Error")),
            "{body:#}"
        );
        let c = st["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Completed"))
            .expect("Completed");
        assert_eq!(c["reason"], "RunnerFailed");
        let m = c["message"].as_str().unwrap_or_default();
        assert!(
            m.contains("exit code 137 (OOMKilled)") && m.contains("loading a very large fixture"),
            "{m}"
        );
        echo_ft(send);
        let (body, send) = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/shop/events",
        )
        .await;
        assert_eq!(
            (body["reason"].as_str(), body["type"].as_str()),
            (Some("RunnerFailed"), Some("Warning"))
        );
        reply(send, body);
        let (_, send) = expect(
            &mut handle,
            Method::DELETE,
            "/api/v1/namespaces/shop/pods/checkout-run-2",
        )
        .await;
        reply(
            send,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        );
    });
    reconcile(Arc::new(ft), ctx).await.expect("reconcile");
    verifier.await.expect("verifier");
}

#[tokio::test]
async fn an_operator_restarted_mid_run_follows_the_existing_runner_and_makes_no_second() {
    let (ctx, handle) = context();
    let mut ft = faulttest("def test_a():\n    pass\n");
    // What the previous operator wrote before it went away.
    ft.status = Some(faultbox_operator::crd::FaultTestStatus {
        phase: Some(faultbox_operator::crd::Phase::Pending),
        observed_generation: Some(2),
        runner: Some("checkout-run-2".into()),
        start_time: Some("2026-12-03T10:00:00Z".into()),
        ..Default::default()
    });
    let pod = runner("checkout-run-2", 2, json!({"phase": "Running"}));
    let verifier = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (_, send) = expect(&mut handle, Method::GET, "/api/v1/namespaces/shop/pods?").await;
        reply(send, pod_list(vec![pod.clone()]));
        let (_, send) = expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/configmaps/checkout-spec-2",
        )
        .await;
        reply(send, existing_spec());
        let (_, send) = expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/pods/checkout-run-2",
        )
        .await;
        reply(send, pod);
        // No POST of a pod: the status moves to Running, nothing else.
        let (body, send) = expect(
            &mut handle,
            Method::PATCH,
            "/apis/faultbox.io/v1alpha1/namespaces/shop/faulttests/checkout/status",
        )
        .await;
        let st = &body["status"];
        assert_eq!(st["phase"], "Running", "{body:#}");
        assert_eq!(
            st["startTime"], "2026-12-03T10:00:00Z",
            "the run's start stays"
        );
        echo_ft(send);
    });
    let action = reconcile(Arc::new(ft), ctx).await.expect("reconcile");
    verifier.await.expect("verifier");
    assert_eq!(
        format!("{action:?}"),
        format!(
            "{:?}",
            kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5))
        )
    );
}

#[tokio::test]
async fn a_schedule_tick_after_a_finished_run_starts_the_next_run() {
    let (ctx, handle) = context();
    let mut ft = faulttest("def test_a():\n    pass\n");
    ft.spec.schedule = Some("* * * * *".into());
    let earlier = faultbox_operator::crd::RunRecord {
        runner: "checkout-run-2".into(),
        verdict: Some(faultbox_operator::crd::Verdict::Pass),
        ..Default::default()
    };
    ft.status = Some(faultbox_operator::crd::FaultTestStatus {
        phase: Some(faultbox_operator::crd::Phase::Succeeded),
        verdict: Some(faultbox_operator::crd::Verdict::Pass),
        observed_generation: Some(2),
        runner: Some("checkout-run-2".into()),
        start_time: Some("2026-12-03T10:00:00Z".into()),
        completion_time: Some("2026-12-03T10:00:05Z".into()),
        history: vec![earlier],
        ..Default::default()
    });
    let verifier = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (_, send) = expect(&mut handle, Method::GET, "/api/v1/namespaces/shop/pods?").await;
        reply(send, pod_list(vec![]));
        let (_, send) = expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/configmaps/checkout-spec-2-1",
        )
        .await;
        not_found(send);
        let (body, send) = expect(
            &mut handle,
            Method::POST,
            "/api/v1/namespaces/shop/configmaps?",
        )
        .await;
        assert_eq!(body["metadata"]["name"], "checkout-spec-2-1");
        reply(send, body);
        let (_, send) = expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/pods/checkout-run-2-1",
        )
        .await;
        not_found(send);
        let (body, send) = expect(&mut handle, Method::POST, "/api/v1/namespaces/shop/pods?").await;
        assert_eq!(body["metadata"]["name"], "checkout-run-2-1");
        reply(send, body);
        let (body, send) = expect(
            &mut handle,
            Method::PATCH,
            "/apis/faultbox.io/v1alpha1/namespaces/shop/faulttests/checkout/status",
        )
        .await;
        let st = &body["status"];
        assert_eq!(
            (
                st["phase"].as_str(),
                st["runIndex"].as_u64(),
                st["runner"].as_str()
            ),
            (Some("Pending"), Some(1), Some("checkout-run-2-1")),
            "{body:#}"
        );
        assert!(
            st.get("verdict").is_none_or(Value::is_null),
            "a new run has no verdict yet"
        );
        assert!(st["lastScheduleTime"].is_string(), "{body:#}");
        assert_eq!(
            st["history"][0]["runner"], "checkout-run-2",
            "the history stays"
        );
        echo_ft(send);
        let (body, send) = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/shop/events",
        )
        .await;
        assert_eq!(body["reason"], "RunStarted");
        reply(send, body);
    });
    reconcile(Arc::new(ft), ctx).await.expect("reconcile");
    verifier.await.expect("verifier");
}

#[tokio::test]
async fn a_missing_source_configmap_is_invalid_and_nothing_is_created() {
    let (ctx, handle) = context();
    let mut ft = faulttest("unused");
    ft.spec.source = None;
    ft.spec.source_from = Some(faultbox_operator::crd::SourceFrom {
        config_map_key_ref: faultbox_operator::crd::ConfigMapKeyRef {
            name: "checkout-spec".into(),
            key: "spec.star".into(),
        },
    });
    let verifier = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (_, send) = expect(&mut handle, Method::GET, "/api/v1/namespaces/shop/pods?").await;
        reply(send, pod_list(vec![]));
        let (_, send) = expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/shop/configmaps/checkout-spec",
        )
        .await;
        not_found(send);
        // Straight to the status: no ConfigMap, no pod.
        let (body, send) = expect(
            &mut handle,
            Method::PATCH,
            "/apis/faultbox.io/v1alpha1/namespaces/shop/faulttests/checkout/status",
        )
        .await;
        let st = &body["status"];
        assert_eq!(st["phase"], "Invalid", "{body:#}");
        let c = &st["conditions"][0];
        assert_eq!(
            (c["type"].as_str(), c["reason"].as_str()),
            (Some("Validated"), Some("ConfigMapMissing"))
        );
        assert!(
            c["message"]
                .as_str()
                .is_some_and(|m| m.contains("\"checkout-spec\"") && m.contains("\"shop\"")),
            "{c}"
        );
        echo_ft(send);
        let (body, send) = expect(
            &mut handle,
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/shop/events",
        )
        .await;
        assert_eq!(body["reason"], "ConfigMapMissing");
        reply(send, body);
    });
    reconcile(Arc::new(ft), ctx).await.expect("reconcile");
    verifier.await.expect("verifier");
}
