//! Step: what the brokers say of the partitions. Each ready broker pod is asked for
//! its report (`GET /partitions` on its metrics port, [`PartitionReport`]); the
//! reports are summed up per partition ([`summarize`], pure): its leader, how many
//! copies are in sync, and which partitions have no leader (fewer than a majority of
//! their copies answer) or run on fewer copies than they have.

use crate::crd::{MessagesStatus, PartitionStatus};
use crate::resources;
use futures::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sluice_config::report::{Depth, PARTITIONS_PATH, PartitionReport};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// How long one broker may take to answer: a broker that does not answer in time
/// counts as a copy that does not answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks broker pods for their reports (plain HTTP on the metrics port, which serves
/// nothing secret: the same as `/metrics`).
#[derive(Clone)]
pub struct BrokerClient {
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for BrokerClient {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(ASK_TIMEOUT));
        BrokerClient {
            http: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

/// One broker pod's answer, or why there is none.
pub type Answer = (String, Result<Vec<PartitionReport>, String>);

impl BrokerClient {
    /// The reports of every ready broker pod with an address, asked at once. None
    /// when no pod could be asked (none ready, or none with an IP yet).
    pub async fn ask(&self, pods: &[Pod]) -> Option<Vec<Answer>> {
        let asked: Vec<_> = pods
            .iter()
            .filter(|p| is_ready(p))
            .filter_map(|p| Some((p.name_any(), report_addr(p)?)))
            .collect();
        if asked.is_empty() {
            return None;
        }
        let answers = asked.into_iter().map(|(name, addr)| async move {
            let answer = tokio::time::timeout(ASK_TIMEOUT, self.get(addr))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {ASK_TIMEOUT:?}")));
            (name, answer)
        });
        Some(join_all(answers).await)
    }

    async fn get(&self, addr: SocketAddr) -> Result<Vec<PartitionReport>, String> {
        let uri = format!("http://{addr}{PARTITIONS_PATH}")
            .parse()
            .map_err(|e| format!("{e}"))?;
        let res = self.http.get(uri).await.map_err(|e| e.to_string())?;
        let status = res.status();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("{PARTITIONS_PATH} answered {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("{PARTITIONS_PATH}: {e}"))
    }
}

/// The pod's `Ready` condition is True.
pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod's IP and the port its broker container names `metrics`.
fn report_addr(p: &Pod) -> Option<SocketAddr> {
    let ip: IpAddr = p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    let port = p
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == "broker"))
        .and_then(|c| c.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.name.as_deref() == Some("metrics")))
        .map_or(resources::METRICS_PORT, |p| p.container_port);
    Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
}

/// The partitions of a Queue as its brokers report them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionsSeen {
    /// Partitions `0..partitions`, each with its leader and copies in sync.
    pub partitions: Vec<PartitionStatus>,
    /// Partitions no copy leads.
    pub leaderless: Vec<i32>,
    /// Partitions led, with fewer copies in sync than they have.
    pub under_replicated: Vec<i32>,
    /// Brokers asked that did not answer, with why.
    pub unanswered: Vec<String>,
    /// Copies of each partition.
    pub replication: i32,
}

impl PartitionsSeen {
    /// Every partition led, every copy in sync.
    pub fn healthy(&self) -> bool {
        self.leaderless.is_empty() && self.under_replicated.is_empty()
    }
}

/// The copy leading each partition of `queue` (by partition), with the pod that
/// reports it: of two copies claiming to lead, for a moment around an election, the
/// later term's.
fn leaders<'a>(
    queue: &str,
    answers: &'a [Answer],
) -> BTreeMap<u32, (&'a str, &'a PartitionReport)> {
    let mut led: BTreeMap<u32, (&str, &PartitionReport)> = BTreeMap::new();
    for (pod, answer) in answers {
        for r in answer.iter().flatten() {
            if r.queue != queue || !r.leader {
                continue;
            }
            let slot = led.entry(r.partition).or_insert((pod.as_str(), r));
            if r.term > slot.1.term {
                *slot = (pod.as_str(), r);
            }
        }
    }
    led
}

/// Sums up the answers of a Queue's brokers for `partitions` partitions of
/// `replication` copies each. A partition's leader is the copy that says it leads
/// (of two, for a moment around an election, the later term).
pub fn summarize(
    queue: &str,
    partitions: i32,
    replication: i32,
    answers: &[Answer],
) -> PartitionsSeen {
    let mut seen = PartitionsSeen {
        replication,
        ..Default::default()
    };
    for (pod, answer) in answers {
        if let Err(e) = answer {
            seen.unanswered.push(format!("{pod}: {e}"));
        }
    }
    let led = leaders(queue, answers);
    for p in 0..partitions.max(0) {
        match led.get(&(p as u32)) {
            Some((pod, r)) => {
                let in_sync = r.in_sync.map(|n| n as i32);
                if in_sync.is_some_and(|n| n < replication) {
                    seen.under_replicated.push(p);
                }
                seen.partitions.push(PartitionStatus {
                    partition: p,
                    leader: Some(pod.to_string()),
                    in_sync,
                });
            }
            None => {
                seen.leaderless.push(p);
                seen.partitions.push(PartitionStatus {
                    partition: p,
                    leader: None,
                    in_sync: None,
                });
            }
        }
    }
    seen
}

/// The messages of a queue and of its dead-letter queue, summed over the
/// partitions' serving copies: what the status and the KEDA scaler show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// The queue's ready, in flight and delayed messages and its oldest ready one.
    pub queue: Depth,
    /// In the dead-letter queue, in any state.
    pub dead_lettered: u64,
}

/// The [`Backlog`] of `queue` (of two copies claiming one partition around an
/// election, the later term's counts). None when no broker answered.
pub fn backlog(queue: &str, answers: &[Answer]) -> Option<Backlog> {
    if answers.iter().all(|(_, a)| a.is_err()) {
        return None;
    }
    let dlq = format!("{queue}{}", sluice_config::DLQ_SUFFIX);
    let depths = |name: &str| -> Vec<Depth> {
        leaders(name, answers)
            .into_values()
            .filter_map(|(_, r)| r.depth)
            .collect()
    };
    let mut b = Backlog::default();
    for d in depths(&dlq) {
        b.dead_lettered += d.ready + d.in_flight + d.delayed;
    }
    for d in depths(queue) {
        let q = &mut b.queue;
        q.ready += d.ready;
        q.in_flight += d.in_flight;
        q.delayed += d.delayed;
        q.oldest_ready_ms = match (q.oldest_ready_ms, d.oldest_ready_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Some(b)
}

/// The [`Backlog`] of `queue` as the status shows it. None when no broker answered.
pub fn messages(queue: &str, answers: &[Answer]) -> Option<MessagesStatus> {
    let b = backlog(queue, answers)?;
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    Some(MessagesStatus {
        ready: n(b.queue.ready),
        in_flight: n(b.queue.in_flight),
        delayed: n(b.queue.delayed),
        dead_lettered: n(b.dead_lettered),
        oldest_ready_time: b.queue.oldest_ready_ms.and_then(|ms| {
            let t = k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64).ok()?;
            // RFC 3339 in seconds, as Kubernetes writes times.
            Some(format!(
                "{:.0}",
                t.round(k8s_openapi::jiff::Unit::Second).ok()?
            ))
        }),
    })
}

/// The partitions (of the queue and, with `dead_letter`, of its dead-letter queue,
/// which moves with it) whose group has not yet committed `target` as its members:
/// no leader reports them (the latest term's leader counts). Sorted, no repeats.
pub fn moves_left(
    queue: &str,
    dead_letter: bool,
    target: &[Vec<u32>],
    answers: &[Answer],
) -> Vec<i32> {
    let dlq = format!("{queue}{}", sluice_config::DLQ_SUFFIX);
    let mut left = Vec::new();
    let names = if dead_letter {
        vec![queue, dlq.as_str()]
    } else {
        vec![queue]
    };
    for name in names {
        let led = leaders(name, answers);
        for (p, want) in target.iter().enumerate() {
            let members = led.get(&(p as u32)).and_then(|(_, r)| r.members.as_ref());
            let there = members.is_some_and(|m| {
                let mut m = m.clone();
                m.sort_unstable();
                &m == want
            });
            if !there {
                left.push(p as i32);
            }
        }
    }
    left.sort_unstable();
    left.dedup();
    left
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(partition: u32, leader: bool, term: u64, in_sync: Option<u32>) -> PartitionReport {
        PartitionReport {
            queue: "orders".into(),
            partition,
            copies: 3,
            leader,
            term,
            in_sync,
            members: None,
            depth: None,
        }
    }

    #[test]
    fn the_messages_are_summed_over_serving_copies_and_dead_letters_apart() {
        let serving =
            |queue: &str, p: u32, term: u64, ready: u64, oldest: Option<u64>| PartitionReport {
                queue: queue.into(),
                depth: Some(Depth {
                    ready,
                    in_flight: 1,
                    delayed: 2,
                    oldest_ready_ms: oldest,
                }),
                ..report(p, true, term, Some(3))
            };
        let answers: Vec<Answer> = vec![
            (
                "b-0".into(),
                Ok(vec![
                    serving("orders", 0, 1, 10, Some(1_764_540_000_400)),
                    // A deposed leader's copy, from an older term: not counted.
                    serving("orders", 1, 1, 99, Some(1)),
                    serving("orders.dlq", 0, 1, 4, None),
                    serving("other", 0, 1, 1000, Some(2)),
                ]),
            ),
            (
                "b-1".into(),
                Ok(vec![
                    serving("orders", 1, 2, 5, Some(1_764_540_060_000)),
                    // A follower reports no depth.
                    PartitionReport {
                        depth: None,
                        ..report(0, false, 1, None)
                    },
                ]),
            ),
            ("b-2".into(), Err("down".into())),
        ];
        let m = messages("orders", &answers).unwrap();
        assert_eq!(
            (m.ready, m.in_flight, m.delayed, m.dead_lettered),
            (15, 2, 4, 7)
        );
        assert_eq!(m.oldest_ready_time.as_deref(), Some("2025-11-30T22:00:00Z"));
        assert_eq!(messages("orders", &answers[2..]), None, "nobody answered");
    }

    #[test]
    fn a_move_is_done_when_every_leader_of_queue_and_dead_letters_reports_the_target() {
        let target = vec![vec![0, 1, 3], vec![1, 2, 4]];
        let led = |queue: &str, p: u32, term: u64, members: &[u32]| PartitionReport {
            queue: queue.into(),
            members: Some(members.to_vec()),
            ..report(p, true, term, Some(3))
        };
        let answers: Vec<Answer> = vec![
            (
                "b-0".into(),
                Ok(vec![
                    led("orders", 0, 2, &[3, 1, 0]),
                    led("orders.dlq", 0, 2, &[0, 1, 3]),
                    // An old leader of partition 1, from before the move.
                    led("orders", 1, 1, &[1, 2, 4]),
                ]),
            ),
            (
                "b-1".into(),
                Ok(vec![
                    led("orders", 1, 3, &[0, 1, 2]),
                    led("orders.dlq", 1, 1, &[1, 2, 4]),
                ]),
            ),
            ("b-2".into(), Err("refused".into())),
        ];
        // Partition 1's latest leader still has the old members.
        assert_eq!(moves_left("orders", true, &target, &answers), vec![1]);
        // A leader mid-change reports no members: not done.
        let mut mid = answers.clone();
        mid[1].1 = Ok(vec![
            PartitionReport {
                members: None,
                ..led("orders", 1, 3, &[])
            },
            led("orders.dlq", 1, 1, &[1, 2, 4]),
        ]);
        assert_eq!(moves_left("orders", true, &target, &mid), vec![1]);
        let mut done = answers;
        done[1].1 = Ok(vec![
            led("orders", 1, 3, &[4, 2, 1]),
            led("orders.dlq", 1, 1, &[1, 2, 4]),
        ]);
        assert!(moves_left("orders", true, &target, &done).is_empty());
        // Without dead letters only the queue's own partitions count.
        let no_dlq: Vec<Answer> = vec![(
            "b-0".into(),
            Ok(vec![
                led("orders", 0, 2, &[0, 1, 3]),
                led("orders", 1, 2, &[1, 2, 4]),
            ]),
        )];
        assert!(moves_left("orders", false, &target, &no_dlq).is_empty());
        assert_eq!(moves_left("orders", true, &target, &no_dlq), vec![0, 1]);
    }

    #[test]
    fn each_partition_gets_the_copy_that_leads_it_and_what_is_missing_is_named() {
        let answers: Vec<Answer> = vec![
            (
                "sluice-orders-0".into(),
                Ok(vec![
                    report(0, true, 2, Some(3)),
                    report(1, false, 2, None),
                    // An old leader that has not heard of the election yet.
                    report(2, true, 1, Some(2)),
                ]),
            ),
            (
                "sluice-orders-1".into(),
                Ok(vec![
                    report(1, true, 2, Some(2)),
                    report(2, true, 3, Some(3)),
                    // Another queue's partition: not ours.
                    PartitionReport {
                        queue: "orders.dlq".into(),
                        ..report(3, true, 1, Some(3))
                    },
                ]),
            ),
            ("sluice-orders-2".into(), Err("connection refused".into())),
        ];
        let seen = summarize("orders", 4, 3, &answers);
        let leaders: Vec<_> = seen
            .partitions
            .iter()
            .map(|p| (p.leader.as_deref(), p.in_sync))
            .collect();
        assert_eq!(
            leaders,
            vec![
                (Some("sluice-orders-0"), Some(3)),
                (Some("sluice-orders-1"), Some(2)),
                (Some("sluice-orders-1"), Some(3)),
                (None, None),
            ]
        );
        assert_eq!(seen.leaderless, vec![3]);
        assert_eq!(seen.under_replicated, vec![1]);
        assert_eq!(seen.unanswered, vec!["sluice-orders-2: connection refused"]);
        assert!(!seen.healthy());
    }

    #[test]
    fn only_ready_pods_with_an_address_are_asked_on_their_metrics_port() {
        let pod = |v: serde_json::Value| -> Pod { serde_json::from_value(v).unwrap() };
        let ready = json!([{ "type": "Ready", "status": "True" }]);
        let named = pod(json!({
            "metadata": { "name": "a" },
            "spec": { "containers": [{ "name": "broker",
                "ports": [{ "name": "metrics", "containerPort": 9999 }] }] },
            "status": { "podIP": "fd00::7", "conditions": ready }
        }));
        assert_eq!(report_addr(&named), Some("[fd00::7]:9999".parse().unwrap()));
        let plain = pod(json!({
            "metadata": { "name": "b" },
            "status": { "podIP": "10.0.0.2", "conditions": ready }
        }));
        assert_eq!(
            report_addr(&plain),
            Some(SocketAddr::new("10.0.0.2".parse().unwrap(), 9090))
        );
        let no_ip = pod(json!({ "metadata": { "name": "c" }, "status": { "conditions": ready } }));
        assert_eq!(report_addr(&no_ip), None);
        let unready =
            pod(json!({ "metadata": { "name": "d" }, "status": { "podIP": "10.0.0.3" } }));
        assert!(!is_ready(&unready));
    }
}
