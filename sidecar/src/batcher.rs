//! Concurrent single enqueues to one partition, gathered into `EnqueueBatch` calls
//! without a task of their own.
//!
//! The first caller to find no batch in flight sends one: its message and whatever
//! waits. Callers arriving meanwhile wait; when the batch is answered, the oldest
//! waiter is handed the lead and sends the next batch, with its own message first.
//! So a lone enqueue goes straight out on its caller's task (no hand-off to a batcher
//! task and back, which cost each enqueue two wake-ups between threads), and under
//! load one batch is in flight per partition while the next one gathers.
//!
//! A caller dropped while it leads (its client gone at its deadline) does not strand
//! the others: the call in flight is finished by a task and answers its waiters, and
//! a lead handed to a caller that has gone passes on to the next waiter.

use futures::future::BoxFuture;
use sluice_proto::v1;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tonic::Status;

/// Most bytes one gathered batch carries.
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// One batch sent to the partition's broker: its answers, in the batch's order.
pub type BatchCall = BoxFuture<'static, Result<Vec<v1::EnqueueResponse>, Status>>;

/// One partition's gathering of enqueues.
#[derive(Default)]
pub struct Batcher {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// A batch is in flight: its leader (or the task finishing for it) owns the lead.
    in_flight: bool,
    waiting: VecDeque<Waiter>,
}

struct Waiter {
    message: v1::NewMessage,
    turn: oneshot::Sender<Turn>,
}

/// What a waiting caller is told.
enum Turn {
    Answered(Result<v1::EnqueueResponse, Status>),
    Lead(Lead),
}

/// The right to send the next batch, with the message of the caller it was handed
/// to. Dropped unused (its caller gone), it passes to the next waiter.
struct Lead {
    batcher: Arc<Batcher>,
    message: Option<v1::NewMessage>,
}

impl Drop for Lead {
    fn drop(&mut self) {
        if self.message.is_some() {
            self.batcher.hand_over();
        }
    }
}

impl Batcher {
    /// Enqueues `message` in a batch of at most `max` messages; `send` sends a batch
    /// to the partition's broker.
    pub async fn enqueue(
        self: &Arc<Self>,
        message: v1::NewMessage,
        max: usize,
        send: impl FnOnce(Vec<v1::NewMessage>) -> BatchCall,
    ) -> Result<v1::EnqueueResponse, Status> {
        let waiting = {
            let mut st = self.state.lock().unwrap();
            if st.in_flight {
                let (turn, rx) = oneshot::channel();
                st.waiting.push_back(Waiter { message, turn });
                Err(rx)
            } else {
                st.in_flight = true;
                Ok(message)
            }
        };
        let message = match waiting {
            Ok(message) => message,
            Err(rx) => match rx.await {
                Ok(Turn::Answered(result)) => return result,
                Ok(Turn::Lead(mut lead)) => lead.message.take().expect("a lead carries a message"),
                Err(_) => return Err(Status::unavailable("sidecar is shutting down")),
            },
        };
        self.lead(message, max, send).await
    }

    /// Sends `own` and what waits behind it as one batch, answers the waiters in it,
    /// and hands the lead on.
    async fn lead(
        self: &Arc<Self>,
        own: v1::NewMessage,
        max: usize,
        send: impl FnOnce(Vec<v1::NewMessage>) -> BatchCall,
    ) -> Result<v1::EnqueueResponse, Status> {
        let mut size = own.body.len();
        let mut messages = vec![own];
        let mut turns = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            while messages.len() < max.max(1) && size < BATCH_BYTES {
                let Some(w) = st.waiting.pop_front() else {
                    break;
                };
                size += w.message.body.len();
                messages.push(w.message);
                turns.push(w.turn);
            }
        }
        let mut leading = Leading {
            batcher: self.clone(),
            call: Some(send(messages)),
            turns,
        };
        let result = leading.call.as_mut().expect("sent once").await;
        leading.call = None;
        leading.answer(result)
    }

    /// Passes the lead to the oldest waiter still there; with none, the partition
    /// has no batch in flight.
    fn hand_over(self: &Arc<Self>) {
        loop {
            let next = {
                let mut st = self.state.lock().unwrap();
                match st.waiting.pop_front() {
                    Some(w) => w,
                    None => {
                        st.in_flight = false;
                        return;
                    }
                }
            };
            let lead = Lead {
                batcher: self.clone(),
                message: Some(next.message),
            };
            match next.turn.send(Turn::Lead(lead)) {
                Ok(()) => return,
                // Its caller has gone: the message goes unsent, the lead to the next.
                Err(Turn::Lead(mut lead)) => drop(lead.message.take()),
                Err(Turn::Answered(_)) => unreachable!("a lead was sent"),
            }
        }
    }
}

/// A batch in flight and the waiters it carries. Dropped before its answer (its
/// leader cancelled), a task finishes the call for the waiters; dropped after, it
/// hands the lead on.
struct Leading {
    batcher: Arc<Batcher>,
    call: Option<BatchCall>,
    turns: Vec<oneshot::Sender<Turn>>,
}

impl Leading {
    /// Answers the waiters; returns the leader's own answer (the batch's first).
    fn answer(
        &mut self,
        result: Result<Vec<v1::EnqueueResponse>, Status>,
    ) -> Result<v1::EnqueueResponse, Status> {
        let turns = std::mem::take(&mut self.turns);
        match result {
            Ok(results) if results.len() == turns.len() + 1 => {
                let mut results = results.into_iter();
                let own = results.next().expect("checked length");
                for (turn, r) in turns.into_iter().zip(results) {
                    let _ = turn.send(Turn::Answered(Ok(r)));
                }
                Ok(own)
            }
            Ok(results) => {
                let e = Status::internal(format!(
                    "the broker answered {} of a batch of {} messages",
                    results.len(),
                    turns.len() + 1
                ));
                for turn in turns {
                    let _ = turn.send(Turn::Answered(Err(e.clone())));
                }
                Err(e)
            }
            Err(e) => {
                for turn in turns {
                    let _ = turn.send(Turn::Answered(Err(e.clone())));
                }
                Err(e)
            }
        }
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            self.batcher.hand_over();
            return;
        };
        let mut rest = Leading {
            batcher: self.batcher.clone(),
            call: None,
            turns: std::mem::take(&mut self.turns),
        };
        let finish = async move {
            let result = call.await;
            let _ = rest.answer(result);
            // Dropping `rest` hands the lead on.
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(finish);
            }
            // No runtime: the sidecar is going away, and its waiters with it.
            Err(_) => drop(finish),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The broker's side is a future the test completes by hand: what is under test is
    //! who sends which batch when, and that no caller is stranded.
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn msg(body: &str) -> v1::NewMessage {
        v1::NewMessage {
            body: body.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    /// A broker whose answers the test releases: every batch sent is recorded with
    /// the sender of its answer.
    /// The bodies of a batch sent, and the release of its answer.
    type Sent = (Vec<String>, Option<oneshot::Sender<()>>);

    #[derive(Default, Clone)]
    struct HeldBroker {
        batches: Arc<Mutex<Vec<Sent>>>,
        sent: Arc<AtomicUsize>,
    }

    impl HeldBroker {
        fn send(&self) -> impl FnOnce(Vec<v1::NewMessage>) -> BatchCall + use<> {
            let this = self.clone();
            move |messages| {
                let bodies: Vec<String> = messages
                    .iter()
                    .map(|m| String::from_utf8_lossy(&m.body).into_owned())
                    .collect();
                let (tx, rx) = oneshot::channel();
                this.batches
                    .lock()
                    .unwrap()
                    .push((bodies.clone(), Some(tx)));
                this.sent.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    rx.await
                        .map_err(|_| Status::unavailable("broker call dropped"))?;
                    Ok(bodies
                        .into_iter()
                        .map(|b| v1::EnqueueResponse {
                            id: b,
                            ..Default::default()
                        })
                        .collect())
                })
            }
        }

        fn release(&self, batch: usize) {
            let tx = self.batches.lock().unwrap()[batch].1.take().unwrap();
            tx.send(()).unwrap();
        }

        fn bodies(&self, batch: usize) -> Vec<String> {
            self.batches.lock().unwrap()[batch].0.clone()
        }

        async fn wait_for_batches(&self, n: usize) {
            while self.sent.load(Ordering::SeqCst) < n {
                tokio::task::yield_now().await;
            }
        }
    }

    /// An enqueue of `body` through `b` to `broker`, in a task of its own.
    fn spawn_enqueue(
        b: &Arc<Batcher>,
        broker: &HeldBroker,
        body: &'static str,
        max: usize,
    ) -> tokio::task::JoinHandle<Result<v1::EnqueueResponse, Status>> {
        let (b, send) = (b.clone(), broker.send());
        tokio::spawn(async move { b.enqueue(msg(body), max, send).await })
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_lone_enqueue_goes_out_on_its_own_and_later_ones_gather_behind_it() {
        let b = Arc::new(Batcher::default());
        let broker = HeldBroker::default();
        let first = spawn_enqueue(&b, &broker, "a", 100);
        broker.wait_for_batches(1).await;
        let rest = ["b", "c", "d"].map(|body| spawn_enqueue(&b, &broker, body, 100));
        settle().await;
        assert_eq!(broker.bodies(0), ["a"]);
        assert_eq!(broker.sent.load(Ordering::SeqCst), 1, "one batch in flight");
        broker.release(0);
        assert_eq!(first.await.unwrap().unwrap().id, "a");
        broker.wait_for_batches(2).await;
        assert_eq!(broker.bodies(1), ["b", "c", "d"]);
        broker.release(1);
        for (h, body) in rest.into_iter().zip(["b", "c", "d"]) {
            assert_eq!(h.await.unwrap().unwrap().id, body);
        }
        assert!(!b.state.lock().unwrap().in_flight);
    }

    #[tokio::test]
    async fn a_batch_carries_at_most_max_and_the_rest_follow() {
        let b = Arc::new(Batcher::default());
        let broker = HeldBroker::default();
        let first = spawn_enqueue(&b, &broker, "a", 2);
        broker.wait_for_batches(1).await;
        let rest = ["b", "c", "d"].map(|body| spawn_enqueue(&b, &broker, body, 2));
        settle().await;
        broker.release(0);
        broker.wait_for_batches(2).await;
        assert_eq!(broker.bodies(1), ["b", "c"]);
        broker.release(1);
        broker.wait_for_batches(3).await;
        assert_eq!(broker.bodies(2), ["d"]);
        broker.release(2);
        first.await.unwrap().unwrap();
        for (h, body) in rest.into_iter().zip(["b", "c", "d"]) {
            assert_eq!(h.await.unwrap().unwrap().id, body);
        }
    }

    #[tokio::test]
    async fn a_leader_cancelled_mid_call_still_answers_its_waiters_and_hands_the_lead_on() {
        let b = Arc::new(Batcher::default());
        let broker = HeldBroker::default();
        let leader = spawn_enqueue(&b, &broker, "a", 1);
        broker.wait_for_batches(1).await;
        // "b" joins while "a" is in flight, "c" behind it.
        let waiter = spawn_enqueue(&b, &broker, "b", 1);
        settle().await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        // The call goes on without its caller; once answered, "b" leads.
        broker.release(0);
        broker.wait_for_batches(2).await;
        assert_eq!(broker.bodies(1), ["b"]);
        broker.release(1);
        assert_eq!(waiter.await.unwrap().unwrap().id, "b");
        assert!(!b.state.lock().unwrap().in_flight);
    }

    #[tokio::test]
    async fn a_lead_handed_to_a_caller_that_has_gone_passes_to_the_next() {
        let b = Arc::new(Batcher::default());
        let broker = HeldBroker::default();
        let leader = spawn_enqueue(&b, &broker, "a", 1);
        broker.wait_for_batches(1).await;
        let gone = spawn_enqueue(&b, &broker, "gone", 1);
        settle().await;
        let next = spawn_enqueue(&b, &broker, "c", 1);
        settle().await;
        gone.abort();
        let _ = gone.await;
        broker.release(0);
        assert_eq!(leader.await.unwrap().unwrap().id, "a");
        broker.wait_for_batches(2).await;
        assert_eq!(
            broker.bodies(1),
            ["c"],
            "the gone caller's message is not sent"
        );
        broker.release(1);
        assert_eq!(next.await.unwrap().unwrap().id, "c");
        assert!(!b.state.lock().unwrap().in_flight);
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_message_in_it() {
        let b = Arc::new(Batcher::default());
        let failing = |_: Vec<v1::NewMessage>| -> BatchCall {
            Box::pin(async { Err(Status::unavailable("broker down")) })
        };
        let e = b.enqueue(msg("a"), 10, failing).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(!b.state.lock().unwrap().in_flight);
    }
}
