use super::*;
use std::time::Duration;

fn settings(f: impl FnOnce(&mut QueueSettings)) -> Arc<QueueSettings> {
    let mut s = QueueSettings::named("q");
    s.partitions = 1;
    f(&mut s);
    Arc::new(s)
}

fn state(f: impl FnOnce(&mut QueueSettings)) -> PartitionState {
    PartitionState::new(settings(f), CacheBudget::new(1 << 30))
}

fn msg(body: &str) -> NewMessage {
    NewMessage {
        body: Bytes::copy_from_slice(body.as_bytes()),
        attributes: vec![],
        key: String::new(),
        dedup_id: String::new(),
        delay_ms: 0,
    }
}

fn keyed(body: &str, key: &str) -> NewMessage {
    NewMessage {
        key: key.into(),
        ..msg(body)
    }
}

fn put(p: &mut PartitionState, now: u64, m: NewMessage) -> u64 {
    let mut buf = BytesMut::new();
    let (out, reserved, _) = p.reserve(now, vec![m], &mut buf).unwrap();
    let loc = Location {
        segment: 0,
        offset: 0,
        len: 0,
    };
    p.commit(now, loc, reserved);
    match out[0] {
        EnqueueOutcome::Stored(s) | EnqueueOutcome::Duplicate(s) => s,
    }
}

fn take(p: &mut PartitionState, now: u64, max: usize) -> Vec<(u64, Receipt)> {
    p.deliver(now, max, 1000, &mut Vec::new())
        .into_iter()
        .map(|d| {
            (
                d.seq,
                Receipt {
                    partition: 0,
                    seq: d.seq,
                    delivery: d.deliveries,
                },
            )
        })
        .collect()
}

fn seqs(v: &[(u64, Receipt)]) -> Vec<u64> {
    v.iter().map(|x| x.0).collect()
}

#[test]
fn fifo_lease_ack() {
    let mut p = state(|_| {});
    let a = put(&mut p, 0, msg("a"));
    let b = put(&mut p, 0, msg("b"));
    let got = take(&mut p, 10, 10);
    assert_eq!(seqs(&got), vec![a, b]);
    assert!(
        take(&mut p, 10, 10).is_empty(),
        "leased messages are invisible"
    );
    p.ack(10, &got[0].1).unwrap();
    assert_eq!(
        p.ack(10, &got[0].1),
        Err(ReceiptError::NotFound),
        "double ack"
    );
    let s = p.snapshot();
    assert_eq!((s.ready, s.in_flight, s.counters.acked), (0, 1, 1));
}

#[test]
fn expired_lease_redelivers_with_higher_count_and_old_receipt_fails() {
    let mut p = state(|_| {});
    let a = put(&mut p, 0, msg("a"));
    let first = take(&mut p, 0, 1);
    let mut fx = Effects::default();
    p.tick(999, &mut fx);
    assert!(take(&mut p, 999, 1).is_empty(), "not yet expired");
    p.tick(1000, &mut fx);
    assert!(fx.woke);
    let second = take(&mut p, 1000, 1);
    assert_eq!(second[0].0, a);
    assert_eq!(second[0].1.delivery, 2);
    assert_eq!(p.ack(1000, &first[0].1), Err(ReceiptError::Expired));
    p.ack(1000, &second[0].1).unwrap();
}

#[test]
fn ack_after_deadline_is_refused_even_before_the_timer_runs() {
    let mut p = state(|_| {});
    put(&mut p, 0, msg("a"));
    let got = take(&mut p, 0, 1);
    assert_eq!(p.ack(1000, &got[0].1), Err(ReceiptError::Expired));
}

#[test]
fn max_deliveries_dead_letters() {
    let mut p = state(|s| s.max_deliveries = 2);
    let a = put(&mut p, 0, msg("a"));
    let mut fx = Effects::default();
    take(&mut p, 0, 1);
    p.tick(1000, &mut fx);
    take(&mut p, 1000, 1);
    p.tick(2000, &mut fx);
    assert_eq!(fx.dead_letter, vec![a]);
    assert!(take(&mut p, 2000, 1).is_empty());
    assert!(p.moving(a).is_some());
    p.moved(a, SettleReason::DeadLettered);
    assert_eq!(p.snapshot().counters.dead_lettered, 1);
    assert_eq!(p.snapshot().messages, 0);
}

#[test]
fn without_dead_letter_queue_exhausted_messages_are_dropped() {
    let mut p = state(|s| {
        s.max_deliveries = 1;
        s.dead_letter = false
    });
    put(&mut p, 0, msg("a"));
    let got = take(&mut p, 0, 1);
    let mut fx = Effects::default();
    p.nack(0, &got[0].1, 0, false, &mut fx).unwrap();
    assert!(fx.dead_letter.is_empty());
    assert!(matches!(
        fx.records[0],
        Record::Settle {
            reason: SettleReason::Dropped,
            ..
        }
    ));
    assert_eq!(p.snapshot().messages, 0);
}

#[test]
fn nack_with_delay_and_dead_letter_now() {
    let mut p = state(|_| {});
    let a = put(&mut p, 0, msg("a"));
    let b = put(&mut p, 0, msg("b"));
    let got = take(&mut p, 0, 2);
    let mut fx = Effects::default();
    p.nack(0, &got[0].1, 500, false, &mut fx).unwrap();
    p.nack(0, &got[1].1, 0, true, &mut fx).unwrap();
    assert_eq!(fx.dead_letter, vec![b]);
    assert!(take(&mut p, 499, 1).is_empty());
    let mut fx = Effects::default();
    p.tick(500, &mut fx);
    assert_eq!(seqs(&take(&mut p, 500, 1)), vec![a]);
}

#[test]
fn per_key_ordering_holds_later_messages_while_one_is_in_flight() {
    let mut p = state(|_| {});
    let k1 = put(&mut p, 0, keyed("1", "k"));
    let k2 = put(&mut p, 0, keyed("2", "k"));
    let other = put(&mut p, 0, keyed("x", "j"));
    let free = put(&mut p, 0, msg("free"));
    let got = take(&mut p, 0, 10);
    assert_eq!(
        seqs(&got),
        vec![k1, other, free],
        "only the head of each key"
    );
    // Expiry of k1 puts it back first: order is kept.
    let mut fx = Effects::default();
    p.tick(1000, &mut fx);
    let again = take(&mut p, 1000, 10);
    assert_eq!(seqs(&again), vec![k1, other, free]);
    let k1r = again.iter().find(|x| x.0 == k1).unwrap().1;
    p.ack(1000, &k1r).unwrap();
    assert_eq!(seqs(&take(&mut p, 1000, 10)), vec![k2]);
}

#[test]
fn delayed_nack_keeps_the_key_locked() {
    let mut p = state(|_| {});
    let k1 = put(&mut p, 0, keyed("1", "k"));
    let k2 = put(&mut p, 0, keyed("2", "k"));
    let got = take(&mut p, 0, 10);
    let mut fx = Effects::default();
    p.nack(0, &got[0].1, 100, false, &mut fx).unwrap();
    assert!(take(&mut p, 50, 10).is_empty(), "k2 must wait for k1");
    p.tick(100, &mut fx);
    let got = take(&mut p, 100, 10);
    assert_eq!(seqs(&got), vec![k1]);
    p.ack(100, &got[0].1).unwrap();
    assert_eq!(seqs(&take(&mut p, 100, 10)), vec![k2]);
}

#[test]
fn delay_and_default_delay() {
    let mut p = state(|s| s.default_delay = Duration::from_millis(200));
    let a = put(&mut p, 0, msg("a"));
    let b = put(
        &mut p,
        0,
        NewMessage {
            delay_ms: 50,
            ..msg("b")
        },
    );
    assert_eq!(p.next_deadline(), Some(50));
    let mut fx = Effects::default();
    p.tick(50, &mut fx);
    assert_eq!(seqs(&take(&mut p, 50, 10)), vec![b]);
    p.tick(200, &mut fx);
    assert_eq!(seqs(&take(&mut p, 200, 10)), vec![a]);
    assert_eq!(p.snapshot().delayed, 0);
}

#[test]
fn dedup_within_window_only() {
    let mut p = state(|s| s.dedup_window = Duration::from_millis(1000));
    let m = NewMessage {
        dedup_id: "d1".into(),
        ..msg("a")
    };
    let a = put(&mut p, 0, m.clone());
    let mut buf = BytesMut::new();
    let (out, reserved, _) = p.reserve(999, vec![m.clone()], &mut buf).unwrap();
    assert!(matches!(out[0], EnqueueOutcome::Duplicate(s) if s == a));
    assert!(
        reserved.is_empty() && buf.is_empty(),
        "nothing written for a duplicate"
    );
    let b = put(&mut p, 1000, m);
    assert_ne!(a, b, "window passed");
}

/// A retry that finds its first attempt still being written learns that write's
/// fate: pending until it ends, then stored, or failed (and a later retry stores it).
#[test]
fn a_duplicate_of_a_message_being_written_follows_that_write() {
    let mut p = state(|_| {});
    let m = NewMessage {
        dedup_id: "d1".into(),
        ..msg("a")
    };
    let (out, first, _) = p.reserve(0, vec![m.clone()], &mut BytesMut::new()).unwrap();
    let EnqueueOutcome::Stored(a) = out[0] else {
        panic!("{out:?}")
    };
    let (out, _, _) = p.reserve(0, vec![m.clone()], &mut BytesMut::new()).unwrap();
    assert!(matches!(out[0], EnqueueOutcome::Duplicate(s) if s == a));
    assert_eq!(p.fate("d1", a), Fate::Pending, "the write is under way");

    p.abort(first);
    assert_eq!(p.fate("d1", a), Fate::Failed, "the first write failed");
    let (out, again, _) = p.reserve(1, vec![m.clone()], &mut BytesMut::new()).unwrap();
    let EnqueueOutcome::Stored(b) = out[0] else {
        panic!("a retry after a failed write stores the message: {out:?}")
    };
    assert_eq!(p.fate("d1", b), Fate::Pending);
    let loc = Location {
        segment: 0,
        offset: 0,
        len: 0,
    };
    p.commit(1, loc, again);
    assert_eq!(p.fate("d1", b), Fate::Stored);
    let r = take(&mut p, 2, 1);
    p.ack(2, &r[0].1).unwrap();
    assert_eq!(
        p.fate("d1", b),
        Fate::Stored,
        "settled since, but it was stored"
    );
}

#[test]
fn retention_reject_new_and_drop_oldest() {
    let mut p = state(|s| s.retention_max_messages = 2);
    put(&mut p, 0, msg("a"));
    put(&mut p, 0, msg("b"));
    let err = p
        .reserve(0, vec![msg("c")], &mut BytesMut::new())
        .unwrap_err();
    assert!(matches!(
        err,
        EnqueueRefused::Full {
            what: "messages",
            limit: 2
        }
    ));

    let mut p = state(|s| {
        s.retention_max_messages = 2;
        s.overflow = Overflow::DropOldest
    });
    let a = put(&mut p, 0, msg("a"));
    let b = put(&mut p, 0, msg("b"));
    let mut buf = BytesMut::new();
    let (_, reserved, drops) = p.reserve(0, vec![msg("c")], &mut buf).unwrap();
    assert_eq!(
        drops,
        vec![Record::Settle {
            seq: a,
            reason: SettleReason::Dropped
        }]
    );
    p.commit(
        0,
        Location {
            segment: 0,
            offset: 0,
            len: 0,
        },
        reserved,
    );
    let got = take(&mut p, 0, 10);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, b);
}

#[test]
fn retention_by_bytes_and_age() {
    let mut p = state(|s| s.retention_max_bytes = 3);
    put(&mut p, 0, msg("ab"));
    assert!(p.reserve(0, vec![msg("cd")], &mut BytesMut::new()).is_err());

    let mut p = state(|s| s.retention_max_age = Duration::from_millis(100));
    put(&mut p, 0, msg("old"));
    let young = put(&mut p, 60, msg("young"));
    let mut fx = Effects::default();
    p.tick(100, &mut fx);
    assert_eq!(fx.records.len(), 1);
    assert_eq!(seqs(&take(&mut p, 100, 10)), vec![young]);
}

#[test]
fn extend_visibility() {
    let mut p = state(|_| {});
    put(&mut p, 0, msg("a"));
    let got = take(&mut p, 0, 1);
    p.extend(900, &got[0].1, 1000).unwrap();
    let mut fx = Effects::default();
    p.tick(1500, &mut fx);
    assert!(!fx.woke, "extended lease holds");
    p.ack(1500, &got[0].1).unwrap();
}

#[test]
fn replay_rebuilds_state_and_drops_leases() {
    let mut p = state(|_| {});
    let loc = |o| Location {
        segment: 1,
        offset: o,
        len: 1,
    };
    let enq = |seq, key: &str| {
        Record::Enqueue(EnqueueRecord {
            seq,
            enqueued_at_ms: 0,
            visible_at_ms: 0,
            key: key.into(),
            dedup_id: format!("d{seq}"),
            attributes: vec![],
            body: Bytes::from_static(b"x"),
        })
    };
    p.replay(10, enq(1, ""), loc(0));
    p.replay(10, enq(2, "k"), loc(1));
    p.replay(10, enq(3, "k"), loc(2));
    p.replay(
        10,
        Record::Deliver {
            seq: 2,
            delivery: 3,
        },
        loc(3),
    );
    p.replay(
        10,
        Record::Settle {
            seq: 1,
            reason: SettleReason::Acked,
        },
        loc(4),
    );
    p.finish_replay();
    let got = p.deliver(10, 10, 1000, &mut Vec::new());
    assert_eq!(got.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![2]);
    assert_eq!(got[0].deliveries, 4);
    // Replay keeps no bodies in memory: they are read back from the log.
    assert!(got[0].content.is_none());
    // The dedup ids survive a restart.
    let (out, _, _) = p
        .reserve(
            10,
            vec![NewMessage {
                dedup_id: "d3".into(),
                ..msg("y")
            }],
            &mut BytesMut::new(),
        )
        .unwrap();
    assert!(matches!(out[0], EnqueueOutcome::Duplicate(3)));
    // New sequence numbers continue after the highest seen.
    assert_eq!(put(&mut p, 10, msg("z")), 4);
}

#[test]
fn segments_become_deletable_only_in_order() {
    let mut p = state(|_| {});
    let mut buf = BytesMut::new();
    let (_, r1, _) = p.reserve(0, vec![msg("a")], &mut buf).unwrap();
    p.commit(
        0,
        Location {
            segment: 1,
            offset: 0,
            len: 1,
        },
        r1,
    );
    let (_, r2, _) = p.reserve(0, vec![msg("b")], &mut buf).unwrap();
    p.commit(
        0,
        Location {
            segment: 2,
            offset: 0,
            len: 1,
        },
        r2,
    );
    let got = take(&mut p, 0, 2);
    assert_eq!(p.take_delete_floor(0, 3), Some(1));
    p.ack(0, &got[1].1).unwrap();
    assert_eq!(
        p.take_delete_floor(0, 3),
        None,
        "segment 1 still holds a message"
    );
    p.ack(0, &got[0].1).unwrap();
    assert_eq!(p.take_delete_floor(0, 3), Some(3));
}

#[test]
fn segments_with_dedup_ids_in_their_window_are_kept() {
    let mut p = state(|s| s.dedup_window = std::time::Duration::from_millis(1000));
    let mut buf = BytesMut::new();
    let mut m = msg("a");
    m.dedup_id = "order-1".into();
    let (_, r, _) = p.reserve(0, vec![m], &mut buf).unwrap();
    p.commit(
        0,
        Location {
            segment: 1,
            offset: 0,
            len: 1,
        },
        r,
    );
    let got = take(&mut p, 0, 1);
    p.ack(0, &got[0].1).unwrap();
    assert_eq!(
        p.take_delete_floor(999, 2),
        Some(1),
        "settled, but its dedup id must survive a restart"
    );
    assert_eq!(p.take_delete_floor(1000, 2), Some(2), "window over");
}

#[test]
fn cache_budget_bounds_memory() {
    let budget = CacheBudget::new(4);
    let mut p = PartitionState::new(settings(|_| {}), budget.clone());
    put(&mut p, 0, msg("abc"));
    put(&mut p, 0, msg("def"));
    let got = p.deliver(0, 10, 1000, &mut Vec::new());
    assert!(got[0].content.is_some());
    assert!(got[1].content.is_none(), "over budget: read back from disk");
}
