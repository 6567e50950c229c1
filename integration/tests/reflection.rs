//! Server reflection in both protocol versions, `grpc.reflection.v1` and
//! `grpc.reflection.v1alpha` (the only one Python's grpcio-reflection speaks), on every
//! server an app may talk to: the broker, the sidecar and `sluice dev`. Each is asked,
//! with a client of each version, for its services and for the file that defines
//! `sluice.v1.Queues`.

use prost::Message;
use sluice_integration::*;
use std::net::SocketAddr;
use tonic::transport::Channel;

const QUEUES: &str = "sluice.v1.Queues";

/// What a reflection client found out: the services listed, and the names of the
/// services declared in the files that resolve `sluice.v1.Queues`.
#[derive(Debug)]
struct Found {
    services: Vec<String>,
    resolved: Vec<String>,
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"))
}

/// Declared services (`package.Service`) of encoded FileDescriptorProtos.
fn declared_services(files: &[Vec<u8>]) -> Vec<String> {
    files
        .iter()
        .flat_map(|bytes| {
            let f = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
            let package = f.package().to_string();
            f.service
                .into_iter()
                .map(move |s| format!("{package}.{}", s.name()))
        })
        .collect()
}

/// One reflection conversation per protocol version: the two generated clients are
/// alike but of distinct types, so the same steps are written once for each.
macro_rules! ask {
    ($version:ident, $addr:expr) => {{
        use tonic_reflection::pb::$version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client = ServerReflectionClient::new(channel($addr).await);
        let requests = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol(QUEUES.to_string()),
        ]
        .map(|r| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(r),
        });
        let mut answers = client
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .unwrap_or_else(|e| panic!("{} reflection on {}: {e}", stringify!($version), $addr))
            .into_inner();
        let services = match answers.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("{other:?}"),
        };
        let resolved = match answers.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::FileDescriptorResponse(f)) => {
                declared_services(&f.file_descriptor_proto)
            }
            other => panic!("{other:?}"),
        };
        Found { services, resolved }
    }};
}

/// Both versions answer on `addr`, and each lists and resolves the API.
async fn both_versions_answer(addr: SocketAddr, server: &str) {
    for (version, found) in [("v1", ask!(v1, addr)), ("v1alpha", ask!(v1alpha, addr))] {
        for service in [
            QUEUES,
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                found.services.iter().any(|s| s == service),
                "{server}, {version}: {service} not listed in {:?}",
                found.services
            );
        }
        assert!(
            found.resolved.iter().any(|s| s == QUEUES),
            "{server}, {version}: {QUEUES} not resolved: {:?}",
            found.resolved
        );
    }
}

#[tokio::test]
async fn broker_serves_reflection_v1_and_v1alpha() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), "", 0).await;
    both_versions_answer(b.addr, "broker").await;
}

#[tokio::test]
async fn sidecar_serves_reflection_v1_and_v1alpha() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), "", 0).await;
    let sidecar = Sidecar::start(dir.path(), &format!("orders={}", b.addr)).await;
    both_versions_answer(sidecar.addr, "sidecar").await;
}

#[tokio::test]
async fn sluice_dev_serves_reflection_v1_and_v1alpha() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path()).await;
    both_versions_answer(dev.addr, "sluice dev").await;
    // And it is the API, not only its description.
    let mut c = dev.client().await;
    enqueue(&mut c, "work", msg("x")).await.unwrap();
}
