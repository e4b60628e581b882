//! Leader election on a `coordination.k8s.io/v1` Lease, so several
//! replicas never run the same FaultTest twice: one holds the lease and
//! reconciles, the others wait for it to lapse. Writes use the lease's
//! resourceVersion, so two candidates racing for a lapsed lease cannot
//! both win. A leader that stops (SIGTERM) gives the lease up at once; one
//! that dies is replaced once the lease lapses.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};

/// How long a lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often the holder renews it, and candidates retry.
const RENEW: Duration = Duration::from_secs(5);

/// One candidate for the lease `name`.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str) -> Elector {
        Elector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
        }
    }

    /// Takes the lease if it is free, lapsed or already ours; renews it
    /// when ours. Returns whether this candidate holds it now.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let spec = |acquired: Option<MicroTime>, transitions: i32| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE.as_secs() as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(spec(None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let current = lease.spec.clone().unwrap_or_default();
        let holder = current.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        let lapsed = current.renew_time.as_ref().is_none_or(|r| {
            let secs = i64::from(current.lease_duration_seconds.unwrap_or(15));
            r.0.saturating_add(SignedDuration::from_secs(secs))
                .is_ok_and(|end| end < now)
        });
        if !(ours || holder.is_empty() || lapsed) {
            return Ok(false);
        }
        let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours { current.acquire_time } else { None };
        lease.spec = Some(spec(acquired, transitions));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Someone else wrote it first.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_hold().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "lease"),
            }
            tokio::time::sleep(RENEW).await;
        }
    }

    /// Renews the lease until it is lost (another holder, or no renewal
    /// within its duration); then returns.
    pub async fn hold(&self) {
        let mut last = std::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW).await;
            match self.try_hold().await {
                Ok(true) => last = std::time::Instant::now(),
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal");
                    if last.elapsed() > LEASE {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up (a clean stop), so a successor takes it at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            let _ = self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await;
        }
    }
}
