//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator
//! replicas are safe: only the holder runs the reconciler; every replica serves
//! the webhook.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use std::time::Duration;
use tracing::{debug, info};

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            lease_duration,
        }
    }

    /// Blocks until this replica holds the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) => debug!(lease = %self.name, "another replica leads; waiting"),
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.retry_period()).await;
        }
    }

    /// Renews the Lease until renewal fails for a whole lease duration (another
    /// replica may then take over) — returns when leadership is lost.
    pub async fn hold(&self) {
        let mut last_ok = std::time::Instant::now();
        loop {
            tokio::time::sleep(self.retry_period()).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = std::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.name, "leadership lost to another replica");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the leader Lease failed");
                    // Stop before the lease can have expired for the others.
                    if last_ok.elapsed() + self.retry_period() >= self.lease_duration {
                        tracing::error!("could not renew the leader Lease in time");
                        return;
                    }
                }
            }
        }
    }

    /// Releases the Lease (on a clean shutdown) so another replica takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(&self.identity) {
                spec.holder_identity = None;
                spec.acquire_time = None;
                spec.renew_time = None;
                let _ = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }

    fn retry_period(&self) -> Duration {
        self.lease_duration / 3
    }

    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = self.lease_duration.as_secs().max(1) as i32;
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let held = spec
                    .holder_identity
                    .as_deref()
                    .is_some_and(|h| !h.is_empty());
                let expired = match &spec.renew_time {
                    Some(MicroTime(t)) => {
                        let d = spec.lease_duration_seconds.unwrap_or(secs) as i64;
                        *t + SignedDuration::from_secs(d) < now
                    }
                    None => true,
                };
                if held && !mine && !expired {
                    return Ok(false);
                }
                let mut new_spec = spec.clone();
                new_spec.holder_identity = Some(self.identity.clone());
                new_spec.lease_duration_seconds = Some(secs);
                new_spec.renew_time = Some(MicroTime(now));
                if !mine {
                    new_spec.acquire_time = Some(MicroTime(now));
                    new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                lease.spec = Some(new_spec);
                // replace carries resourceVersion: a concurrent writer makes this fail
                // with 409 instead of two leaders.
                match self
                    .api
                    .replace(&lease.name_any(), &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }
}
