//! `GET /tunnel` with `Upgrade: sluice-grpc` on the HTTP port: after `101 Switching
//! Protocols` the connection is joined, byte for byte, to the gRPC listener.
//!
//! It is how `sluice --kube` reaches a broker from outside the cluster: the
//! Kubernetes API server's pod proxy speaks HTTP/1.1 to pods and passes upgrades
//! through once it has checked the caller's RBAC (`pods/proxy`), and Kubernetes
//! before 1.30 serves port-forward over SPDY only, which no Rust client speaks. The
//! tunnel gives no access the gRPC port does not: what runs through it is the same
//! gRPC, with the same mutual TLS and token checks, end to end.

use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use std::net::SocketAddr;

pub const TUNNEL_PATH: &str = "/tunnel";
/// The `Upgrade` protocol a tunnel asks for.
pub const TUNNEL_PROTOCOL: &str = "sluice-grpc";

/// The tunnel route, joining upgraded connections to the gRPC listener at `grpc`
/// (an unspecified address means this host's loopback).
pub fn tunnel_route(grpc: SocketAddr) -> axum::Router {
    let target = if grpc.ip().is_unspecified() {
        let loopback = match grpc {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        SocketAddr::new(loopback, grpc.port())
    } else {
        grpc
    };
    axum::Router::new().route(
        TUNNEL_PATH,
        axum::routing::get(move |req: Request<Body>| tunnel(target, req)),
    )
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(text))
        .expect("a valid response")
}

async fn tunnel(target: SocketAddr, mut req: Request<Body>) -> Response<Body> {
    let asked = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(TUNNEL_PROTOCOL));
    if !asked {
        let mut r = plain(
            StatusCode::UPGRADE_REQUIRED,
            format!("ask for `Upgrade: {TUNNEL_PROTOCOL}`\n"),
        );
        r.headers_mut().insert(
            header::UPGRADE,
            header::HeaderValue::from_static(TUNNEL_PROTOCOL),
        );
        return r;
    }
    // Connected before answering: a listener that is not there is a 502, not a 101
    // followed by a closed connection.
    let mut grpc = match tokio::net::TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            return plain(
                StatusCode::BAD_GATEWAY,
                format!("the gRPC listener at {target} does not answer: {e}\n"),
            );
        }
    };
    let _ = grpc.set_nodelay(true);
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let mut client = hyper_util::rt::TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut grpc).await;
            }
            Err(e) => tracing::debug!(error = %e, "tunnel upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, TUNNEL_PROTOCOL)
        .body(Body::empty())
        .expect("a valid response")
}
