//! Step: semantic validation of the spec (what the schema cannot check).

use super::conditions::{self, ConditionType, Observed};
use super::{Context, Error, EventReason, patch_status, publish};
use crate::crd::{Queue, QueueStatus};
use crate::settings;
use kube::ResourceExt;
use kube::runtime::events::EventType;

/// Whether the reconciliation may go on to the applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    Valid,
    /// Reported; nothing is applied until the spec is fixed.
    Invalid,
}

/// Checks the spec. An invalid one is reported (conditions `InvalidSpec`, a Warning
/// Event once per message, the `invalid_specs` metric) and nothing is applied.
/// `status` is the status this reconciliation builds (its address already set).
pub async fn validate(ctx: &Context, q: &Queue, status: &QueueStatus) -> Result<Validation, Error> {
    let Err(e) = settings::validate(
        &q.name_any(),
        q.namespace().as_deref().unwrap_or_default(),
        &q.spec,
    ) else {
        return Ok(Validation::Valid);
    };
    let msg = e.to_string();
    let generation = q.metadata.generation;
    let mut status = status.clone();
    let already = conditions::find(&status, ConditionType::Ready)
        .is_some_and(|c| c.reason == conditions::Reason::InvalidSpec.as_str() && c.message == msg);
    conditions::merge(
        &mut status,
        conditions::compute(&Observed::InvalidSpec { error: &msg }),
        generation,
        &super::now(),
    );
    status.observed_generation = generation;
    patch_status(ctx, q, status).await?;
    if !already {
        publish(
            ctx,
            q,
            EventType::Warning,
            EventReason::InvalidSpec,
            "Validate",
            &msg,
        )
        .await;
    }
    ctx.metrics.invalid_specs.inc();
    Ok(Validation::Invalid)
}

#[cfg(test)]
mod tests {
    use super::super::conditions::{self, Observed};
    use super::super::fixtures::{NAME, NS, Scenario, reconcile_with};
    use crate::crd::{Queue, QueueStatus};
    use crate::{resources, settings};
    use kube::runtime::controller::Action;
    use serde_json::json;

    fn lopsided() -> Queue {
        // The schema cannot say that every broker must hold a copy of a partition.
        Queue::test(json!({ "replicas": 4, "partitions": 2, "replication": 1 }))
    }

    #[tokio::test]
    async fn an_invalid_spec_is_reported_and_nothing_is_applied() {
        let (res, metrics) = reconcile_with(lopsided(), Scenario::InvalidSpec).await;
        assert_eq!(res.unwrap(), Action::await_change());
        assert_eq!(metrics.invalid_specs.get(), 1);
        assert_eq!(metrics.queues_reconciled.get(), 0);
    }

    #[tokio::test]
    async fn an_invalid_spec_already_reported_makes_no_request() {
        // The status the first reconciliation wrote.
        let q = lopsided();
        let msg = settings::validate(NAME, NS, &q.spec)
            .unwrap_err()
            .to_string();
        let mut status = QueueStatus {
            address: Some(resources::address(NAME, NS, "cluster.local")),
            observed_generation: q.metadata.generation,
            ..Default::default()
        };
        conditions::merge(
            &mut status,
            conditions::compute(&Observed::InvalidSpec { error: &msg }),
            q.metadata.generation,
            &super::super::now(),
        );
        let (res, metrics) = reconcile_with(q.with_status(status), Scenario::Quiet).await;
        assert_eq!(res.unwrap(), Action::await_change());
        assert_eq!(metrics.invalid_specs.get(), 1);
    }
}
