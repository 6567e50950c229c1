//! Sluice's end-to-end tier: a node agent that stands in for the kubelet against a
//! real kube-apiserver, controller-manager and scheduler; cluster DNS for the pods;
//! and the harness the scenario tests (e2e/tests) run in. See docs/e2e.md.

pub mod agent;
pub mod dns;
pub mod error;
pub mod harness;
pub mod net;
pub mod volumes;

pub use error::{Error, Result};
