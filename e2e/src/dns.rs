//! Cluster DNS for the pods: A records for `<svc>.<ns>.svc.cluster.local` (a headless
//! Service answers with its ready endpoints, others with their ClusterIP) and
//! `<hostname>.<svc>.<ns>.svc.cluster.local` (StatefulSet pods), from the API's
//! Services and Endpoints, refreshed continuously. Message parsing and encoding is
//! hickory-proto's; the server loop is a plain UDP socket.

use crate::error::Result;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::Client;
use kube::api::{Api, ListParams};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::UdpSocket;

pub const DOMAIN: &str = "cluster.local";

/// name (lower case, no trailing dot) -> addresses.
#[derive(Default, Debug, Clone)]
pub struct Records(pub HashMap<String, Vec<Ipv4Addr>>);

impl Records {
    pub fn build(services: &[Service], endpoints: &[Endpoints]) -> Records {
        let mut map: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
        let eps: HashMap<(String, String), &Endpoints> = endpoints
            .iter()
            .filter_map(|e| Some(((e.metadata.namespace.clone()?, e.metadata.name.clone()?), e)))
            .collect();
        for s in services {
            let (Some(ns), Some(name)) = (&s.metadata.namespace, &s.metadata.name) else {
                continue;
            };
            let fqdn = format!("{name}.{ns}.svc.{DOMAIN}");
            let spec = s.spec.clone().unwrap_or_default();
            let headless = spec.cluster_ip.as_deref() == Some("None");
            let entry = map.entry(fqdn.clone()).or_default();
            if !headless && let Some(ip) = spec.cluster_ip.and_then(|c| c.parse().ok()) {
                entry.push(ip);
            }
            let Some(ep) = eps.get(&(ns.clone(), name.clone())) else {
                continue;
            };
            for subset in ep.subsets.iter().flatten() {
                let mut addrs: Vec<_> = subset.addresses.iter().flatten().collect();
                if spec.publish_not_ready_addresses == Some(true) {
                    addrs.extend(subset.not_ready_addresses.iter().flatten());
                }
                for a in addrs {
                    let Ok(ip) = a.ip.parse::<Ipv4Addr>() else {
                        continue;
                    };
                    if headless {
                        map.entry(fqdn.clone()).or_default().push(ip);
                    }
                    if let Some(h) = &a.hostname {
                        map.entry(format!("{h}.{fqdn}")).or_default().push(ip);
                    }
                }
            }
        }
        for v in map.values_mut() {
            v.sort();
            v.dedup();
        }
        Records(map)
    }

    /// The answer to a question: None = no such name.
    pub fn lookup(&self, name: &str) -> Option<&[Ipv4Addr]> {
        let n = name.trim_end_matches('.').to_ascii_lowercase();
        self.0.get(&n).map(|v| v.as_slice())
    }
}

/// Answers one query message (NXDOMAIN for unknown names, an empty NOERROR for
/// other record types of a known name).
pub fn answer(records: &Records, request: &[u8]) -> Result<Vec<u8>> {
    let req = Message::from_vec(request)?;
    let mut resp = Message::new();
    resp.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(false);
    let mut code = ResponseCode::NoError;
    for q in req.queries() {
        resp.add_query(q.clone());
        let name = q.name().to_ascii();
        match records.lookup(&name) {
            None => code = ResponseCode::NXDomain,
            Some(ips) => {
                if q.query_type() == RecordType::A {
                    for ip in ips {
                        resp.add_answer(Record::from_rdata(q.name().clone(), 1, RData::A(A(*ip))));
                    }
                }
            }
        }
    }
    resp.set_response_code(code);
    Ok(resp.to_vec()?)
}

/// The server: a refresher task and a UDP loop on `addr`.
pub struct DnsServer {
    pub records: Arc<RwLock<Records>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DnsServer {
    pub async fn start(client: Client, addr: SocketAddr) -> Result<DnsServer> {
        let records = Arc::new(RwLock::new(Records::default()));
        let sock = UdpSocket::bind(addr).await?;
        let r = records.clone();
        let refresher = tokio::spawn(async move {
            let svcs: Api<Service> = Api::all(client.clone());
            let eps: Api<Endpoints> = Api::all(client);
            loop {
                let lp = ListParams::default();
                match (svcs.list(&lp).await, eps.list(&lp).await) {
                    (Ok(s), Ok(e)) => *r.write().unwrap() = Records::build(&s.items, &e.items),
                    (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "dns refresh"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let r = records.clone();
        let server = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let snapshot = r.read().unwrap().clone();
                match answer(&snapshot, &buf[..n]) {
                    Ok(out) => {
                        let _ = sock.send_to(&out, peer).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "bad dns query"),
                }
            }
        });
        Ok(DnsServer {
            records,
            tasks: vec![refresher, server],
        })
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn records() -> Records {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "sluice-orders", "namespace": "shop"},
            "spec": {"clusterIP": "None"}
        }))
        .unwrap();
        let ep: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "sluice-orders", "namespace": "shop"},
            "subsets": [{"addresses": [
                {"ip": "10.244.0.7", "hostname": "sluice-orders-0"},
                {"ip": "10.244.0.8", "hostname": "sluice-orders-1"}],
              "notReadyAddresses": [{"ip": "10.244.0.9", "hostname": "sluice-orders-2"}]}]
        }))
        .unwrap();
        Records::build(&[svc], &[ep])
    }

    fn ask(name: &str, t: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(7)
            .add_query(Query::query(Name::from_str(name).unwrap(), t));
        Message::from_vec(&answer(&records(), &m.to_vec().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn headless_service_answers_ready_pods_and_pod_names() {
        let r = ask("sluice-orders.shop.svc.cluster.local.", RecordType::A);
        assert_eq!(r.id(), 7);
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert_eq!(r.answers().len(), 2, "not-ready pods are not published");
        let r = ask(
            "sluice-orders-1.sluice-orders.shop.svc.cluster.local.",
            RecordType::A,
        );
        assert_eq!(r.answers()[0].data(), &RData::A(A::new(10, 244, 0, 8)));
        let r = ask(
            "sluice-orders-2.sluice-orders.shop.svc.cluster.local.",
            RecordType::A,
        );
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
        let r = ask("sluice-orders.shop.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.answers().is_empty());
        let r = ask("example.com.", RecordType::A);
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
    }
}
