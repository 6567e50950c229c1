//! Helpers for tests of replicated partitions: queue [`QUEUE`], partition 0, over
//! brokers some of which may be down or cut off (`alive` lists the ones to ask).

use crate::{Broker, body_str, msg};
use sluice_proto::v1;
use sluice_testkit::eventually_within;
use std::collections::HashSet;
use std::time::Duration;
use tonic::transport::Channel;

pub type Client = v1::queues_client::QueuesClient<Channel>;

pub const QUEUE: &str = "orders";

pub fn keyed(body: &str) -> v1::NewMessage {
    v1::NewMessage {
        dedup_id: body.chars().take(64).collect(),
        ..msg(body)
    }
}

/// Enqueues to partition 0 on `c`: Ok, or the broker's refusal.
pub async fn enqueue_p0(c: &mut Client, body: &str) -> Result<(), tonic::Status> {
    c.enqueue(v1::EnqueueRequest {
        queue: QUEUE.into(),
        message: Some(keyed(body)),
        partition: Some(0),
    })
    .await
    .map(|_| ())
}

/// The broker (index into `alive`) that leads partition 0, once there is one: the
/// others refuse with UNAVAILABLE naming it.
pub async fn leader(brokers: &[Broker], alive: &[usize]) -> usize {
    eventually_within(
        "a leader of partition 0",
        Duration::from_secs(30),
        || async {
            for &i in alive {
                let mut c = brokers[i].client().await;
                // A probe message (filtered out when the queue is drained).
                match enqueue_p0(&mut c, &format!("probe-{i}")).await {
                    Ok(()) => return Some(i),
                    Err(s) => {
                        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                        // The leader's ordinal, or `none` during an election.
                        if let Some(hint) = s.metadata().get("sluice-leader") {
                            let hint = hint.to_str().unwrap();
                            assert!(
                                hint == "none"
                                    || hint.parse::<usize>().is_ok_and(|l| l < brokers.len()),
                                "hint {hint}"
                            );
                        }
                    }
                }
            }
            None
        },
    )
    .await
}

/// Dequeues and acks until the queue stays empty for `quiet_ms`. An ack may fail
/// after a failover (the lease was the old leader's): the message comes again. The
/// errors met on the way are printed (shown when a test fails): a dequeue that keeps
/// failing leaves messages behind that would otherwise look lost.
pub async fn drain_through_failovers(c: &mut Client, quiet_ms: u64) -> Vec<v1::Message> {
    let mut all = Vec::new();
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    loop {
        let got = match c
            .dequeue(v1::DequeueRequest {
                queue: QUEUE.into(),
                max_messages: 500,
                wait_ms: quiet_ms,
                visibility_timeout_ms: 0,
            })
            .await
        {
            Ok(r) => r.into_inner().messages,
            Err(e) => {
                *errors
                    .entry(format!("dequeue: {:?} {}", e.code(), e.message()))
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if got.is_empty() {
            if !errors.is_empty() {
                eprintln!(
                    "drained {} messages; errors on the way: {errors:?}",
                    all.len()
                );
            }
            return all;
        }
        let receipts = got.iter().map(|m| m.receipt.clone()).collect();
        if let Err(e) = c
            .ack(v1::AckRequest {
                queue: QUEUE.into(),
                receipts,
            })
            .await
        {
            *errors
                .entry(format!("ack: {:?} {}", e.code(), e.message()))
                .or_default() += 1;
        }
        all.extend(got);
    }
}

/// Enqueues to partition 0 through whichever of `alive` leads it, as a client that
/// follows the leader would (the group may still be settling, or failing over).
pub async fn send(brokers: &[Broker], alive: &[usize], body: &str) {
    eventually_within(
        "an acknowledged enqueue",
        Duration::from_secs(30),
        || async {
            for &i in alive {
                if enqueue_p0(&mut brokers[i].client().await, body)
                    .await
                    .is_ok()
                {
                    return Some(());
                }
            }
            None
        },
    )
    .await
}

/// What [`take_and_ack`] saw: bodies delivered, and those whose ack was answered OK.
pub struct Taken {
    pub delivered: HashSet<String>,
    pub acked: HashSet<String>,
}

/// Takes messages from the leader among `alive` and acks them, until `n` acks were
/// answered (0: until the queue stays empty for a few seconds). Leases are short, so a
/// message whose ack failed comes back meanwhile.
pub async fn take_and_ack(brokers: &[Broker], alive: &[usize], n: usize) -> Taken {
    let mut acked = HashSet::new();
    let mut delivered = HashSet::new();
    let mut quiet = 0;
    while (n == 0 || acked.len() < n) && quiet < 8 {
        let l = leader(brokers, alive).await;
        let mut c = brokers[l].client().await;
        let max = if n == 0 { 500 } else { n - acked.len() };
        let got = match c
            .dequeue(v1::DequeueRequest {
                queue: QUEUE.into(),
                max_messages: max as u32,
                wait_ms: 500,
                visibility_timeout_ms: 2000,
            })
            .await
        {
            Ok(r) => r.into_inner().messages,
            Err(_) => continue,
        };
        // Finding the leader leaves a probe now and then: not traffic.
        let probes_only = got.iter().all(|m| body_str(m).starts_with("probe-"));
        quiet = if probes_only { quiet + 1 } else { 0 };
        delivered.extend(got.iter().map(body_str));
        let receipts = got.iter().map(|m| m.receipt.clone()).collect();
        if let Ok(r) = c
            .ack(v1::AckRequest {
                queue: QUEUE.into(),
                receipts,
            })
            .await
        {
            for (m, r) in got.iter().zip(r.into_inner().results) {
                if r.code == 0 && !body_str(m).starts_with("probe-") {
                    acked.insert(body_str(m));
                }
            }
        }
    }
    delivered.retain(|b| !b.starts_with("probe-"));
    Taken { delivered, acked }
}
