//! Sluice control plane: the `Queue` CRD, its reconciler, leader election, metrics
//! and the sidecar-injection webhook. The binary is `sluice-operator`.

pub mod certs;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod pki;
pub mod reconcile;
pub mod resources;
pub mod settings;
pub mod webhook;
