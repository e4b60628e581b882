//! `faultbox-operator`: watches FaultTests (in every namespace, or in
//! those `WATCH_NAMESPACES` lists) and the runner pods they own.

use std::sync::Arc;

use faultbox_operator::crd::FaultTest;
use faultbox_operator::lease::Elector;
use faultbox_operator::metrics::Metrics;
use faultbox_operator::reconcile::{Context, MANAGER, RunnerDefaults, error_policy, reconcile};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let client = Client::try_default().await?;
    let runner = RunnerDefaults {
        image: std::env::var("FAULTBOX_RUNNER_IMAGE")
            .unwrap_or_else(|_| "localhost/faultbox:dev".to_string()),
        insecure_registries: std::env::var("FAULTBOX_INSECURE_REGISTRIES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    };
    let metrics = Metrics::default();
    let addr = std::env::var("METRICS_ADDR").unwrap_or_else(|_| "0.0.0.0:8080".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tokio::spawn(metrics.clone().serve(listener));
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        runner,
        metrics: metrics.clone(),
    });
    let namespaces: Vec<String> = std::env::var("WATCH_NAMESPACES")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let pairs: Vec<(Api<FaultTest>, Api<Pod>)> = if namespaces.is_empty() {
        vec![(Api::all(client.clone()), Api::all(client.clone()))]
    } else {
        namespaces
            .iter()
            .map(|ns| {
                (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                )
            })
            .collect()
    };
    // With LEASE_NAMESPACE set (the chart sets it), only the replica that
    // holds the lease reconciles; the others wait, not ready.
    let elector = std::env::var("LEASE_NAMESPACE").ok().map(|ns| {
        let identity =
            std::env::var("POD_NAME").unwrap_or_else(|_| format!("pid-{}", std::process::id()));
        Elector::new(
            Api::namespaced(client.clone(), &ns),
            "faultbox-operator",
            &identity,
        )
    });
    if let Some(e) = &elector {
        tracing::info!("waiting for the lease");
        tokio::select! {
            _ = e.acquire() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminated() => return Ok(()),
        }
        tracing::info!("holding the lease");
    }
    tracing::info!(namespaces = ?namespaces, "watching FaultTests");
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let runs = pairs.into_iter().map(|(fts, pods)| {
        Controller::new(fts, watcher::Config::default().any_semantic())
            .owns(pods, watcher::Config::default().any_semantic())
            .shutdown_on_signal()
            .run(reconcile, error_policy, Arc::clone(&ctx))
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "reconcile");
                }
            })
    });
    match &elector {
        Some(e) => {
            tokio::select! {
                _ = futures::future::join_all(runs) => {}
                _ = e.hold() => {
                    // Another replica leads now: stop reconciling at once.
                    tracing::warn!("lost the lease; exiting so the Deployment restarts this replica as a candidate");
                    std::process::exit(1);
                }
            }
            e.release().await;
        }
        None => {
            futures::future::join_all(runs).await;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM.
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => futures::future::pending::<()>().await,
    }
}
