//! Waiting until a condition holds, with a failure that says what was awaited.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long [`eventually`] waits: generous, as a slow CI machine must not fail a
/// correct system.
pub const PATIENCE: Duration = Duration::from_secs(180);

/// How often a wait of `limit` looks: every 50 ms for waits of up to a minute (local
/// processes), every 300 ms for longer ones (a control plane, a whole job: not to
/// flood the API server).
pub fn interval(limit: Duration) -> Duration {
    if limit <= Duration::from_secs(60) {
        Duration::from_millis(50)
    } else {
        Duration::from_millis(300)
    }
}

/// Polls `poll` until it returns Some (its value is returned); panics naming `what`
/// after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, PATIENCE, poll).await
}

/// Polls `poll` until it returns Some (its value is returned); panics naming `what`
/// once `limit` has passed. Looks every [`interval`]`(limit)`.
pub async fn eventually_within<T, F, Fut>(what: &str, limit: Duration, mut poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let every = interval(limit);
    let mut tries = 0u64;
    loop {
        if let Some(v) = poll().await {
            return v;
        }
        tries += 1;
        let waited = start.elapsed();
        if waited >= limit {
            panic!(
                "timed out waiting for: {what} (looked {tries} times in {waited:.1?}, limit {limit:?})"
            );
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test]
    async fn returns_the_first_value() {
        let n = Cell::new(0);
        let v = eventually_within("the third try", Duration::from_secs(5), || {
            n.set(n.get() + 1);
            let v = n.get();
            async move { (v == 3).then_some(v * 10) }
        })
        .await;
        assert_eq!(v, 30);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out waiting for: what never comes")]
    async fn names_what_it_waited_for() {
        eventually_within("what never comes", Duration::from_millis(120), || async {
            None::<()>
        })
        .await;
    }

    #[test]
    fn local_waits_look_more_often_than_control_plane_waits() {
        assert_eq!(interval(Duration::from_secs(60)), Duration::from_millis(50));
        assert_eq!(interval(PATIENCE), Duration::from_millis(300));
    }
}
