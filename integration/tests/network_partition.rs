//! Network partitions: three brokers, each in a network namespace of its own on a
//! bridge (veth pairs), hold three copies of a partition. The leader is cut off from
//! the other two (routes dropped both ways; the test still reaches everyone):
//! - the isolated leader, a minority of one, acknowledges no write;
//! - the other two elect a leader and go on acknowledging;
//! - after healing, everything acknowledged on the majority side and before the cut
//!   is there, nothing the isolated leader was asked to take appears, and the old
//!   leader has stepped down (it names the new one).
//!
//! Runs as root in namespaces it creates (the test re-executes itself under
//! `unshare`), so it touches nothing outside.

use sluice_integration::replicated::*;
use sluice_integration::*;
use sluice_proto::v1;
use sluice_testkit::netns;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

const BRIDGE: &str = "slpart0";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const PORT: u16 = 7400;

fn broker_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, 0, 10 + i as u8)
}

fn namespace(i: usize) -> String {
    format!("slb{i}")
}

/// Cuts (or heals) every path between broker `a` and broker `b`.
fn cut(a: usize, b: usize, on: bool) {
    netns::blackhole(&namespace(a), broker_ip(b), on).unwrap();
    netns::blackhole(&namespace(b), broker_ip(a), on).unwrap();
}

#[test]
fn an_isolated_leader_acknowledges_nothing_and_healing_loses_nothing() {
    if !netns::in_world() {
        netns::rerun_in_world("an_isolated_leader_acknowledges_nothing_and_healing_loses_nothing");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(isolated_leader());
}

async fn isolated_leader() {
    netns::setup_world(BRIDGE, GATEWAY, 24).unwrap();
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|i| SocketAddr::new(broker_ip(i).into(), PORT))
        .collect();
    for i in 0..3 {
        netns::add_namespace(
            &namespace(i),
            &format!("vslb{i}"),
            broker_ip(i),
            24,
            BRIDGE,
            GATEWAY,
        )
        .unwrap();
    }
    let peers: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    let settings = format!(
        r#"
[[queue]]
name = "{QUEUE}"
partitions = 1
replicas = 3
replication = 3
peers = [{}]
fsync = "always"
visibility_timeout = "30s"
"#,
        peers.join(", ")
    );
    let dir = tempfile::tempdir().unwrap();
    let mut brokers = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        brokers.push(
            Broker::start_in_netns(dir.path(), &settings, i as u32, *addr, &namespace(i)).await,
        );
    }
    let all = [0, 1, 2];
    for i in 0..30 {
        send(&brokers, &all, &format!("before-{i}")).await;
    }

    let l = leader(&brokers, &all).await;
    let majority: Vec<usize> = all.iter().copied().filter(|&i| i != l).collect();
    for &i in &majority {
        cut(l, i, true);
    }
    // The isolated leader cannot get a majority: no write it is given is
    // acknowledged. The first wait (deadline) or fail; once it has gone without a
    // majority for a while it refuses at once, so that callers look elsewhere.
    let mut isolated = brokers[l].client().await;
    let attempt = |i: usize| {
        let mut req = tonic::Request::new(v1::EnqueueRequest {
            queue: QUEUE.into(),
            message: Some(keyed(&format!("isolated-{i}"))),
            partition: Some(0),
        });
        req.set_timeout(Duration::from_secs(1));
        req
    };
    let mut i = 0;
    eventually_within(
        "the isolated leader refusing writes at once",
        Duration::from_secs(20),
        || {
            i += 1;
            let req = attempt(i);
            let mut c = isolated.clone();
            async move {
                match c.enqueue(req).await {
                    Ok(_) => panic!("the isolated leader acknowledged a write"),
                    Err(s) if s.code() == tonic::Code::Unavailable => {
                        assert_eq!(
                            s.metadata()
                                .get("sluice-leader")
                                .map(|v| v.to_str().unwrap()),
                            Some("none")
                        );
                        Some(())
                    }
                    Err(_) => None,
                }
            }
        },
    )
    .await;
    assert!(isolated.enqueue(attempt(0)).await.is_err());
    // The majority elects a leader of its own and goes on.
    for i in 0..30 {
        send(&brokers, &majority, &format!("majority-{i}")).await;
    }

    for &i in &majority {
        cut(l, i, false);
    }
    // Healed, the old leader hears of the newer term and steps down: it refuses
    // writes and names the new leader.
    eventually_within(
        "the old leader naming the new one",
        Duration::from_secs(20),
        || {
            let mut c = isolated.clone();
            let majority = majority.clone();
            async move {
                let refused = enqueue_p0(&mut c, "after-healing").await.err()?;
                let hint = refused.metadata().get("sluice-leader")?.to_str().ok()?;
                let named: usize = hint.parse().ok()?;
                majority.contains(&named).then_some(())
            }
        },
    )
    .await;
    let left = take_and_ack(&brokers, &all, 0).await.delivered;
    let expected: HashSet<String> = (0..30)
        .flat_map(|i| [format!("before-{i}"), format!("majority-{i}")])
        .collect();
    assert_eq!(left, expected);
    for i in 0..3 {
        netns::del_namespace(&namespace(i));
    }
}
