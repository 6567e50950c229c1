//! Step: the Queue's status from what the StatefulSet, its pods and the brokers
//! (their partition reports) say.

use super::conditions::{self, ConditionType, Observed, Reason, Rollout};
use super::guard::Scale;
use super::moves::Moving;
use super::{Context, Error, partitions, patch_status, volumes};
use crate::crd::{BrokerStatus, Queue, QueueStatus};
use crate::resources;
use crate::settings::BrokerSettings;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use std::time::Duration;

/// Requeue period while everything is ready and rolled: the brokers are asked
/// again, so `status.messages` (and, replicated, a copy cut off by the network,
/// which leaves its pod Ready) is at most this old. The status is written only when
/// a figure changed, so a busy Queue costs one status write per period, whatever
/// its message rate; the applies of a reconciliation change nothing then.
pub const RESYNC_HEALTHY: Duration = Duration::from_secs(30);
/// Requeue period otherwise: pods come and go without touching what is watched
/// when no kubelet reports status.
pub const RESYNC_BUSY: Duration = Duration::from_secs(15);

/// Requeue period while partition copies move: the brokers are asked how far they
/// got (nothing watched changes when a group gets its new members).
pub const RESYNC_MOVING: Duration = Duration::from_secs(3);

/// What the applied StatefulSet reports.
pub fn rollout(applied: &StatefulSet, scale: &Scale, rendered: &BrokerSettings) -> Rollout {
    let ss = applied.status.clone().unwrap_or_default();
    Rollout {
        replicas: scale.replicas(),
        current: ss.replicas,
        ready: ss.ready_replicas.unwrap_or(0),
        updated: ss.updated_replicas.unwrap_or(0),
        generation_seen: ss.observed_generation.unwrap_or(0)
            >= applied.metadata.generation.unwrap_or(0),
        config_hash: rendered.hash.clone(),
        refused: scale.refused(),
        pods: None,
        partitions: None,
        growing: None,
        moving: None,
    }
}

/// Writes the status (replicas, endpoints, hash, layout, the settings each broker
/// runs, conditions) and says when to look again. `status` is the status this
/// reconciliation builds.
pub async fn report(
    ctx: &Context,
    q: &Queue,
    mut status: QueueStatus,
    applied: &StatefulSet,
    scale: &Scale,
    rendered: &BrokerSettings,
    moving: Option<Moving>,
) -> Result<Action, Error> {
    let ns = q.namespace().ok_or(Error::NoNamespace)?;
    let name = q.name_any();
    let generation = q.metadata.generation;
    let mut rollout = rollout(applied, scale, rendered);
    rollout.moving = moving;
    let replicas = rollout.replicas;
    status.replicas = Some(replicas);
    status.ready_replicas = Some(rollout.ready);
    status.config_hash = Some(rendered.hash.clone());
    status.layout = Some(scale.plan.layout.clone());
    status.endpoints = (0..replicas)
        .map(|i| {
            format!(
                "{}-{i}.{}.{ns}.svc.{}:{}",
                resources::sts_name(&name),
                resources::svc_name(&name),
                ctx.defaults.cluster_domain,
                resources::GRPC_PORT
            )
        })
        .collect();
    status.observed_generation = generation;
    let pods = list_pods(ctx, &ns, &name).await;
    if let Ok(pods) = &pods {
        status.brokers = brokers(pods);
    }
    if !rollout.all_ready() {
        rollout.pods = Some(pods_summary(&pods));
    }
    if let Ok(pods) = &pods
        && let Some(answers) = ctx.brokers.ask(pods).await
    {
        let layout = &scale.plan.layout;
        if let Some(m) = partitions::messages(&name, &answers) {
            status.messages = Some(m);
        }
        let seen = partitions::summarize(&name, layout.partitions, layout.replication, &answers);
        status.partitions = seen.partitions.clone();
        rollout.partitions = Some(seen);
    }
    // Claims are looked at while volumes grow: from the reconciliation that asked
    // for it until the condition says every claim has the size.
    let was_growing = status.conditions.iter().any(|c| {
        c.type_ == ConditionType::Progressing.as_str()
            && c.reason == Reason::VolumesGrowing.as_str()
    });
    if scale.plan.grows.is_some() || was_growing {
        let size = scale.plan.spec.storage.size.clone();
        let short = volumes::short_of(ctx, &ns, &name, &size).await?;
        rollout.growing = Some((size, short));
    }
    conditions::merge(
        &mut status,
        conditions::compute(&Observed::Applied(&rollout)),
        generation,
        &super::now(),
    );
    patch_status(ctx, q, status).await?;
    ctx.metrics.queues_reconciled.inc();
    let partitions_healthy = rollout.partitions.as_ref().is_none_or(|p| p.healthy());
    let grown = rollout.growing.as_ref().is_none_or(|(_, s)| s.is_empty());
    Ok(if rollout.moving.is_some() {
        Action::requeue(RESYNC_MOVING)
    } else if !(rollout.all_ready() && rollout.rolled() && partitions_healthy && grown) {
        Action::requeue(RESYNC_BUSY)
    } else {
        Action::requeue(RESYNC_HEALTHY)
    })
}

async fn list_pods(ctx: &Context, ns: &str, queue: &str) -> Result<Vec<Pod>, String> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    pods.list(&ListParams::default().labels(&resources::queue_selector(queue)))
        .await
        .map(|l| l.items)
        .map_err(|e| e.to_string())
}

/// Each broker pod with the settings hash it runs, by name.
pub fn brokers(pods: &[Pod]) -> Vec<BrokerStatus> {
    let mut out: Vec<BrokerStatus> = pods
        .iter()
        .map(|p| BrokerStatus {
            name: p.name_any(),
            config_hash: p.annotations().get(resources::HASH_ANNOTATION).cloned(),
            ready: partitions::is_ready(p),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Says why pods are not ready ("3 pod(s) Pending (0/1 nodes are available…)"),
/// from the pods' own state, or why that is unknown.
pub fn pods_summary(pods: &Result<Vec<Pod>, String>) -> String {
    let pods = match pods {
        Ok(p) => p,
        Err(e) => return format!("pods unknown ({e})"),
    };
    if pods.is_empty() {
        return "no broker pod exists yet (the StatefulSet controller creates them)".into();
    }
    let mut pending = 0;
    let mut unscheduled = None;
    let mut other = Vec::new();
    for p in pods {
        let st = p.status.clone().unwrap_or_default();
        let phase = st.phase.unwrap_or_else(|| "Unknown".into());
        if phase == "Pending" {
            pending += 1;
            if let Some(c) = st
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            {
                unscheduled = Some(c.message.unwrap_or_default());
            } else if p.spec.as_ref().and_then(|s| s.node_name.clone()).is_some()
                && unscheduled.is_none()
            {
                unscheduled = Some("scheduled, waiting for the node to start it".into());
            }
        } else {
            other.push(format!("{}: {phase}", p.name_any()));
        }
    }
    let mut s = String::new();
    if pending > 0 {
        s.push_str(&format!("{pending} pod(s) Pending"));
        match unscheduled {
            Some(m) if !m.is_empty() => s.push_str(&format!(" ({m})")),
            _ => s.push_str(" (not scheduled: no node has taken them yet)"),
        }
    }
    if !other.is_empty() {
        if !s.is_empty() {
            s.push_str("; ");
        }
        s.push_str(&other.join(", "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pods_summary_says_why_brokers_are_not_ready() {
        assert_eq!(pods_summary(&Err("boom".into())), "pods unknown (boom)");
        assert_eq!(
            pods_summary(&Ok(vec![])),
            "no broker pod exists yet (the StatefulSet controller creates them)"
        );
        let unscheduled = pod(json!({
            "metadata": {"name": "sluice-orders-0"},
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "message": "0/1 nodes are available"}
            ]}
        }));
        let waiting = pod(json!({
            "metadata": {"name": "sluice-orders-1"},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Pending"}
        }));
        let failed = pod(json!({
            "metadata": {"name": "sluice-orders-2"},
            "status": {"phase": "Failed"}
        }));
        assert_eq!(
            pods_summary(&Ok(vec![unscheduled.clone(), failed.clone()])),
            "1 pod(s) Pending (0/1 nodes are available); sluice-orders-2: Failed"
        );
        assert_eq!(
            pods_summary(&Ok(vec![waiting.clone()])),
            "1 pod(s) Pending (scheduled, waiting for the node to start it)"
        );
        assert_eq!(
            pods_summary(&Ok(vec![pod(
                json!({"metadata": {"name": "p"}, "status": {"phase": "Pending"}})
            )])),
            "1 pod(s) Pending (not scheduled: no node has taken them yet)"
        );
    }
}
