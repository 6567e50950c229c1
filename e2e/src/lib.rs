//! Sluice's end-to-end tier: worlds of a real kube-apiserver, controller-manager and
//! scheduler with either a real node (kubelet, kube-proxy, containerd running the
//! images) or a node agent that stands in for the kubelet; cluster DNS for the pods;
//! and the harness the scenario tests (e2e/tests) run in. See docs/e2e.md.

pub mod agent;
pub mod dns;
pub mod error;
pub mod harness;
pub mod net;
pub mod node;
pub mod volumes;

pub use error::{Error, Result};
