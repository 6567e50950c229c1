//! Ack, Nack and ExtendVisibility through the sidecar: receipts grouped by partition
//! (`sluice_dataplane::receipts`), each group sent to the broker owning its partition,
//! answered in the call's order. A relayed subscription may offer its broker streams
//! for acks and nacks ([`InlineSettle`]); this module does not know subscriptions, so
//! it sits below them.

use sluice_dataplane::SettleOp;
use sluice_dataplane::receipts::Settlement;
use sluice_proto::v1;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;
use tonic::{Code, Status};

use crate::router::{QueueRoute, timed};

/// The answers of an inline settle, when they come.
pub type InlineAnswers =
    Pin<Box<dyn Future<Output = Result<Vec<v1::ReceiptResult>, Status>> + Send>>;

/// Something that can carry acks and nacks to a broker other than as calls (a relayed
/// subscription's open stream to it).
pub trait InlineSettle: Sync {
    /// Sends `op` on `receipts` to `broker` inline, if it can; None to make a call.
    fn settle_inline(
        &self,
        broker: SocketAddr,
        receipts: &[String],
        op: SettleOp,
    ) -> Option<InlineAnswers>;
}

/// Sends receipts to the brokers owning their partitions; answers in order. Acks and
/// nacks of a relayed subscription go inline on its stream to the owner when it has
/// one, everything else as calls.
pub(crate) async fn settle(
    route: &QueueRoute,
    queue: &str,
    receipts: Vec<String>,
    op: SettleOp,
    inline: Option<&dyn InlineSettle>,
) -> Result<Vec<v1::ReceiptResult>, Status> {
    let mut settlement = Settlement::new(&receipts)?;
    let calls = settlement.take_groups().into_iter().map(|(p, items)| {
        let idx: Vec<usize> = items.iter().map(|x| x.0).collect();
        let batch: Vec<String> = idx.iter().map(|&i| receipts[i].clone()).collect();
        async move {
            let broker = route.owner(p)?;
            if let Some(inline) = inline.and_then(|r| r.settle_inline(broker.addr, &batch, op)) {
                // The stream's reader has judged the broker's health already.
                return inline.await;
            }
            let mut c = broker.client();
            let q = queue.to_string();
            let out = match op {
                SettleOp::Ack => c
                    .ack(timed(
                        v1::AckRequest {
                            queue: q,
                            receipts: batch,
                        },
                        Duration::ZERO,
                    ))
                    .await
                    .map(|r| r.into_inner().results),
                SettleOp::Nack {
                    delay_ms,
                    dead_letter,
                } => c
                    .nack(timed(
                        v1::NackRequest {
                            queue: q,
                            receipts: batch,
                            delay_ms,
                            dead_letter,
                        },
                        Duration::ZERO,
                    ))
                    .await
                    .map(|r| r.into_inner().results),
                SettleOp::Extend { visibility_ms } => c
                    .extend_visibility(timed(
                        v1::ExtendVisibilityRequest {
                            queue: q,
                            receipts: batch,
                            visibility_timeout_ms: visibility_ms,
                        },
                        Duration::ZERO,
                    ))
                    .await
                    .map(|r| r.into_inner().results),
            };
            out.map_err(|e| broker.failed(e))
        }
        .then_map(idx)
    });
    for (idx, outcome) in futures::future::join_all(calls).await {
        match outcome {
            Ok(rs) => {
                for (i, r) in idx.into_iter().zip(rs) {
                    settlement.answer(i, r);
                }
            }
            Err(status) if status.code() == Code::InvalidArgument => return Err(status),
            Err(status) => {
                for i in idx {
                    settlement.answer_code(i, status.code(), status.message());
                }
            }
        }
    }
    Ok(settlement.finish())
}

/// Pairs a future's output with a value known up front.
pub(crate) trait ThenMap: std::future::Future + Sized {
    fn then_map<T>(self, t: T) -> impl std::future::Future<Output = (T, Self::Output)> {
        async move { (t, self.await) }
    }
}
impl<F: std::future::Future> ThenMap for F {}
