//! Test support shared by the integration tests, the e2e suite, the operator's
//! control-plane tests and the benchmark harness: one way to wait for a condition,
//! to pick a free port, to own a child process, and to ask a raw HTTP question; with
//! the `kube` feature, the Kubernetes pieces the operator tests and e2e share.

pub mod eventually;
pub mod http;
#[cfg(feature = "kube")]
pub mod k8s;
pub mod netns;
pub mod ports;
pub mod process;

pub use eventually::{eventually, eventually_within};
pub use ports::{free_addr, free_port};
pub use process::ChildGuard;
