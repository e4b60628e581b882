//! `/metrics` (Prometheus text), `/healthz` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

/// The operator's counters.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    runs_started: Counter,
    runs_finished: Family<ResultLabel, Counter>,
    reconciles: Counter,
    reconcile_errors: Counter,
    reconcile_seconds: Histogram,
    /// Set once the controller watches.
    pub ready: Arc<AtomicBool>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("faultbox_operator");
        let runs_started = Counter::default();
        let runs_finished = Family::<ResultLabel, Counter>::default();
        let reconciles = Counter::default();
        let reconcile_errors = Counter::default();
        let reconcile_seconds = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register("runs_started", "Runner pods created", runs_started.clone());
        registry.register(
            "runs_finished",
            "Runs by result (pass, fail, error, invalid)",
            runs_finished.clone(),
        );
        registry.register("reconciles", "Reconciles", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and are retried",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long a reconcile took",
            reconcile_seconds.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            runs_started,
            runs_finished,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Metrics {
    pub fn started(&self) {
        self.runs_started.inc();
    }

    pub fn finished(&self, result: &str) {
        self.runs_finished
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn reconciled(&self, took: Duration, failed: bool) {
        self.reconciles.inc();
        if failed {
            self.reconcile_errors.inc();
        }
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `listener` (plain
    /// HTTP/1.0 answers; nothing here needs more).
    pub async fn serve(self, listener: tokio::net::TcpListener) {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/metrics" => ("200 OK", me.render()),
                    "/healthz" => ("200 OK", "ok\n".to_string()),
                    "/readyz" if me.ready.load(Ordering::SeqCst) => ("200 OK", "ok\n".to_string()),
                    "/readyz" => ("503 Service Unavailable", "not watching yet\n".to_string()),
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let reply = format!(
                    "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    }
}
