//! Mutual TLS between sidecar and broker, as real processes: certificates issued as
//! the operator issues them (sluice_operator::tls), files passed by flag.

use sluice_integration::*;
use sluice_operator::tls::{Ca, Usage};
use sluice_proto::v1::queues_client::QueuesClient;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const QUEUES: &str = "[[queue]]\nname = \"orders\"\npartitions = 2\n";
const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// Writes cert, key and CA for one party; returns the three paths.
fn party(dir: &Path, name: &str, ca: &Ca, usage: Usage, sans: &[&str]) -> [PathBuf; 3] {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let leaf = ca.issue(name, &sans, usage, YEAR).unwrap();
    let paths = [
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}-ca.crt")),
    ];
    std::fs::write(&paths[0], &leaf.cert_pem).unwrap();
    std::fs::write(&paths[1], &leaf.key_pem).unwrap();
    std::fs::write(&paths[2], &ca.cert_pem).unwrap();
    paths
}

fn tls_args(p: &[PathBuf; 3]) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        p[0].display().to_string(),
        "--tls-key".into(),
        p[1].display().to_string(),
        "--tls-ca".into(),
        p[2].display().to_string(),
    ]
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A direct TLS client of the broker with the given identity (or none); Err if the
/// connection or the first call fails.
async fn direct_call(
    addr: std::net::SocketAddr,
    ca: &Ca,
    identity: Option<&[PathBuf; 3]>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.cert_pem))
        .domain_name(addr.ip().to_string());
    if let Some(p) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&p[0]).unwrap(),
            std::fs::read(&p[1]).unwrap(),
        ));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut c = QueuesClient::new(channel);
    enqueue(&mut c, "orders", msg("direct"))
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn sidecar_and_broker_speak_mutual_tls_and_refuse_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("sluice-test-ca", YEAR).unwrap();
    // The broker's certificate names the address the sidecar routes to.
    let addr = free_addr();
    let ip = addr.ip().to_string();
    let broker_files = party(dir.path(), "broker", &ca, Usage::Server, &[&ip]);
    let sidecar_files = party(dir.path(), "sidecar", &ca, Usage::Client, &[]);
    let b = Broker::start_at(
        dir.path(),
        QUEUES,
        0,
        dir.path().join("data"),
        addr,
        &refs(&tls_args(&broker_files)),
    )
    .await;

    // Through a sidecar with the CA's client certificate: everything works.
    let s = Sidecar::start_with(
        dir.path(),
        &format!("orders={}", b.addr),
        &refs(&tls_args(&sidecar_files)),
    )
    .await;
    let mut c = s.client().await;
    eventually_within("sidecar ready over TLS", Duration::from_secs(20), || {
        let m = s.metrics;
        async move { (http_get(m, "/readyz").0 == 200).then_some(()) }
    })
    .await;
    for i in 0..20 {
        enqueue(&mut c, "orders", msg(&format!("m{i}")))
            .await
            .unwrap();
    }
    let got = drain(&mut c, "orders", 300).await;
    assert_eq!(got.len(), 20);

    // Straight to the broker: the same certificate gets in...
    direct_call(b.addr, &ca, Some(&sidecar_files))
        .await
        .unwrap();
    // ...a TLS client without a certificate is refused in the handshake...
    let e = direct_call(b.addr, &ca, None).await.unwrap_err();
    assert!(!e.is_empty());
    // ...so is one whose certificate another CA signed...
    let rogue_ca = Ca::generate("sluice-test-ca", YEAR).unwrap();
    let rogue = party(dir.path(), "rogue", &rogue_ca, Usage::Client, &[]);
    let e = direct_call(b.addr, &ca, Some(&rogue)).await.unwrap_err();
    assert!(!e.is_empty());
    // ...and a plaintext client gets nowhere.
    let plain = Endpoint::from_shared(format!("http://{}", b.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(ch) = plain {
        let r = enqueue(&mut QueuesClient::new(ch), "orders", msg("plain")).await;
        assert!(r.is_err(), "plaintext call answered: {r:?}");
    }

    // A sidecar that trusts another CA does not talk to this broker: never ready,
    // its calls UNAVAILABLE, and nothing reaches the queue.
    let mut wrong_trust = party(dir.path(), "sidecar2", &ca, Usage::Client, &[]);
    wrong_trust[2] = rogue[2].clone();
    let s2 = Sidecar::start_with(
        dir.path(),
        &format!("orders={}", b.addr),
        &refs(&tls_args(&wrong_trust)),
    )
    .await;
    let mut c2 = s2.client().await;
    let e = enqueue(&mut c2, "orders", msg("x")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert_eq!(http_get(s2.metrics, "/readyz").0, 503);
    assert_eq!(
        stats(&mut c, "orders").await.ready,
        1,
        "only the direct message"
    );
}

/// Replicating brokers that serve mutual TLS reach each other with the certificate
/// they serve (issued for serving and for peers, as the operator does), and their
/// replication service takes messages only from a client presenting that
/// certificate: a sidecar's certificate of the same CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicating_brokers_speak_tls_to_each_other_and_refuse_sidecars_as_peers() {
    use sluice_proto::replication as pb;
    use sluice_proto::replication::replication_client::ReplicationClient;

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("sluice-test-ca", YEAR).unwrap();
    let addrs: Vec<std::net::SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let ips: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    let broker_files = party(
        dir.path(),
        "broker",
        &ca,
        Usage::Peer,
        &ips.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let sidecar_files = party(dir.path(), "sidecar", &ca, Usage::Client, &[]);
    let peers: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    let settings = format!(
        "[[queue]]\nname = \"orders\"\npartitions = 1\nreplicas = 3\nreplication = 3\npeers = [{}]\n",
        peers.join(", ")
    );
    let mut brokers = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        brokers.push(
            Broker::start_at(
                dir.path(),
                &settings,
                i as u32,
                dir.path().join(format!("data-{i}")),
                *addr,
                &refs(&tls_args(&broker_files)),
            )
            .await,
        );
    }

    // The group elects a leader over TLS: writes through the sidecar are taken.
    let routes: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let s = Sidecar::start_with(
        dir.path(),
        &format!("orders={}", routes.join(",")),
        &refs(&tls_args(&sidecar_files)),
    )
    .await;
    let c = s.client().await;
    eventually_within("a write taken", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { enqueue(&mut c, "orders", msg("m")).await.ok() }
    })
    .await;

    // The replication service, asked with the sidecar's certificate and with the
    // brokers' own: refused, and let through (to a malformed request).
    let ask = |files: [PathBuf; 3]| {
        let (ca, addr) = (ca.cert_pem.clone(), addrs[0]);
        async move {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(addr.ip().to_string())
                .identity(Identity::from_pem(
                    std::fs::read(&files[0]).unwrap(),
                    std::fs::read(&files[1]).unwrap(),
                ));
            let channel = Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            ReplicationClient::new(channel)
                .vote(pb::VoteRequest {
                    group: Some(pb::Group {
                        queue: "orders".into(),
                        partition: 0,
                        to: None,
                    }),
                    vote: None,
                    last_log_id: None,
                })
                .await
                .unwrap_err()
                .code()
        }
    };
    assert_eq!(
        ask(sidecar_files.clone()).await,
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        ask(broker_files.clone()).await,
        tonic::Code::InvalidArgument
    );
}
