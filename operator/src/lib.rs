//! Sluice control plane: the `Queue` CRD, its reconciler, leader election, metrics
//! the sidecar-injection webhook and KEDA's external scaler. The binary is `sluice-operator`.

pub mod admission;
pub mod crd;
pub mod inject;
pub mod layout;
pub mod leader;
pub mod metrics;
pub mod pod_security;
pub mod reconcile;
pub mod resources;
pub mod scaler;
pub mod settings;
pub mod tls;
