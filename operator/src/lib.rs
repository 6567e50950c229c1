//! Sluice control plane: the `Queue` CRD, its reconciler, leader election, metrics
//! and the sidecar-injection webhook. The binary is `sluice-operator`.

pub mod admission;
pub mod crd;
pub mod inject;
pub mod layout;
pub mod leader;
pub mod metrics;
pub mod pod_security;
pub mod reconcile;
pub mod resources;
pub mod settings;
pub mod tls;
