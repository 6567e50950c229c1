//! The sidecar's shutdown, so that the app's own shutdown loses no work. Once asked
//! (SIGTERM, or `POST /shutdown` from inside the pod, which a Job's app sends when it
//! is done):
//!
//! - new Dequeue and Subscribe calls are refused (UNAVAILABLE) and open
//!   subscriptions end, their delivered but unsettled messages given back to the
//!   queue at once for other consumers;
//! - Enqueue, Ack, Nack and ExtendVisibility keep working for the grace period, so
//!   the app can settle what it holds and send what it has while it stops;
//! - readiness turns false; then the server stops.
//!
//! Messages the app leased with Dequeue stay leased until it settles them or their
//! visibility timeout passes: the sidecar does not hold their receipts.

use std::sync::Arc;
use tokio::sync::watch;
use tonic::Status;

/// Whether the sidecar is shutting down, shared by the service and the server.
#[derive(Clone)]
pub struct Drain(Arc<watch::Sender<bool>>);

impl Default for Drain {
    fn default() -> Self {
        Drain(Arc::new(watch::channel(false).0))
    }
}

impl Drain {
    pub fn start(&self) {
        if !self.0.send_replace(true) {
            tracing::info!(
                "shutting down: no new deliveries; enqueue and settle until the grace period ends"
            );
        }
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the shutdown started.
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// The answer to a call for deliveries once the shutdown started.
    pub fn refusal() -> Status {
        Status::unavailable(
            "the sidecar is shutting down: no new deliveries (enqueue, ack and nack still work until it stops)",
        )
    }

    /// Refuses a call for deliveries once the shutdown started.
    pub fn check(&self) -> Result<(), Status> {
        if self.is_draining() {
            Err(Self::refusal())
        } else {
            Ok(())
        }
    }
}
