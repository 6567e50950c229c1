//! Where the copies of a queue's partitions live: which brokers (by ordinal) hold a
//! copy of each partition. A queue starts with the [`replica_set`] formula; once
//! its brokers change, the operator computes the next placement with [`rebalance`]
//! (moving as few copies as it can) and records it in the queue's settings, and the
//! partitions' leaders move the copies there (see the broker's `replica` module).

use std::collections::BTreeSet;

/// The brokers (ordinals) holding copies of `partition` when nothing was moved: its
/// home broker (`partition % replicas`) and the next `replication - 1` after it, so
/// that no two copies share a broker and each broker leads about as many partitions
/// as it follows.
pub fn replica_set(partition: u32, replicas: u32, replication: u32) -> Vec<u32> {
    let replicas = replicas.max(1);
    (0..replication.clamp(1, replicas))
        .map(|i| (partition + i) % replicas)
        .collect()
}

/// The placement of `partitions` partitions over `brokers` brokers, starting from
/// `current` (the copies of the partitions that exist; shorter than `partitions`
/// when partitions are added): copies on brokers that go away move, new partitions
/// are placed by the formula, then copies move from the fullest brokers to the
/// emptiest until no two brokers differ by more than one copy. Each list is sorted.
/// Deterministic, so the operator computes the same placement every time.
pub fn rebalance(
    current: &[Vec<u32>],
    partitions: u32,
    brokers: u32,
    replication: u32,
) -> Vec<Vec<u32>> {
    let brokers = brokers.max(1);
    let replication = replication.clamp(1, brokers) as usize;
    let mut placed: Vec<BTreeSet<u32>> = (0..partitions)
        .map(|p| match current.get(p as usize) {
            Some(copies) => copies.iter().copied().filter(|&b| b < brokers).collect(),
            None => replica_set(p, brokers, replication as u32)
                .into_iter()
                .collect(),
        })
        .collect();
    let load = |placed: &[BTreeSet<u32>]| {
        let mut load = vec![0usize; brokers as usize];
        for copies in placed {
            for &b in copies {
                load[b as usize] += 1;
            }
        }
        load
    };
    // Copies that left with their broker (or a replication that grew): the
    // emptiest broker without a copy of the partition takes one.
    for p in 0..placed.len() {
        while placed[p].len() < replication {
            let l = load(&placed);
            let to = (0..brokers)
                .filter(|b| !placed[p].contains(b))
                .min_by_key(|&b| (l[b as usize], b))
                .expect("replication is at most the brokers");
            placed[p].insert(to);
        }
        while placed[p].len() > replication {
            let l = load(&placed);
            let from = *placed[p]
                .iter()
                .max_by_key(|&&b| (l[b as usize], b))
                .expect("not empty");
            placed[p].remove(&from);
        }
    }
    // Even out: one copy at a time from the fullest broker to the emptiest one.
    loop {
        let l = load(&placed);
        let (full, empty) = (
            (0..brokers).max_by_key(|&b| (l[b as usize], u32::MAX - b)),
            (0..brokers).min_by_key(|&b| (l[b as usize], b)),
        );
        let (Some(full), Some(empty)) = (full, empty) else {
            break;
        };
        if l[full as usize] <= l[empty as usize] + 1 {
            break;
        }
        // The highest partition that can move, so that the oldest ones stay put.
        let Some(p) = (0..placed.len())
            .rev()
            .find(|&p| placed[p].contains(&full) && !placed[p].contains(&empty))
        else {
            break;
        };
        placed[p].remove(&full);
        placed[p].insert(empty);
    }
    placed
        .into_iter()
        .map(|s| s.into_iter().collect())
        .collect()
}

/// The copies `to` adds over `from`, as (partition, broker) pairs: each is a copy
/// made from the partition's log on a broker that had none.
pub fn additions(from: &[Vec<u32>], to: &[Vec<u32>]) -> Vec<(u32, u32)> {
    to.iter()
        .enumerate()
        .flat_map(|(p, copies)| {
            let before = from.get(p);
            copies
                .iter()
                .filter(move |b| before.is_none_or(|f| !f.contains(b)))
                .map(move |&b| (p as u32, b))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formula(partitions: u32, brokers: u32, replication: u32) -> Vec<Vec<u32>> {
        (0..partitions)
            .map(|p| {
                let mut s = replica_set(p, brokers, replication);
                s.sort_unstable();
                s
            })
            .collect()
    }

    fn loads(placed: &[Vec<u32>], brokers: u32) -> Vec<usize> {
        (0..brokers)
            .map(|b| placed.iter().filter(|c| c.contains(&b)).count())
            .collect()
    }

    fn check(placed: &[Vec<u32>], brokers: u32, replication: usize) {
        for copies in placed {
            assert_eq!(copies.len(), replication, "{placed:?}");
            assert!(copies.windows(2).all(|w| w[0] < w[1]), "{placed:?}");
            assert!(copies.iter().all(|&b| b < brokers), "{placed:?}");
        }
        let l = loads(placed, brokers);
        assert!(
            l.iter().max().unwrap() - l.iter().min().unwrap() <= 1,
            "uneven {l:?} in {placed:?}"
        );
    }

    #[test]
    fn copies_of_a_partition_sit_on_different_brokers() {
        assert_eq!(replica_set(0, 3, 3), vec![0, 1, 2]);
        assert_eq!(replica_set(2, 3, 3), vec![2, 0, 1]);
        assert_eq!(replica_set(4, 5, 3), vec![4, 0, 1]);
        assert_eq!(replica_set(1, 1, 1), vec![0]);
        for p in 0..20 {
            let mut set = replica_set(p, 5, 5);
            set.sort_unstable();
            assert_eq!(set, vec![0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn the_formula_is_already_balanced() {
        let f = formula(6, 3, 3);
        assert_eq!(rebalance(&f, 6, 3, 3), f);
        let f = formula(10, 5, 3);
        let again = rebalance(&f, 10, 5, 3);
        assert!(additions(&f, &again).is_empty(), "{again:?}");
    }

    #[test]
    fn new_brokers_take_a_fair_share_and_few_copies_move() {
        let before = formula(6, 3, 3);
        let after = rebalance(&before, 6, 5, 3);
        check(&after, 5, 3);
        // 18 copies over 5 brokers: 3 or 4 each, so the new two take 6 or 7 copies,
        // and nothing else moves.
        let moved = additions(&before, &after);
        assert!(moved.iter().all(|&(_, b)| b >= 3), "{moved:?}");
        assert!((6..=7).contains(&moved.len()), "{moved:?}");
    }

    #[test]
    fn leaving_brokers_hand_their_copies_to_the_others() {
        let five = rebalance(&formula(6, 3, 3), 6, 5, 3);
        let back = rebalance(&five, 6, 3, 3);
        check(&back, 3, 3);
        assert!(back.iter().all(|c| c == &vec![0, 1, 2]));
        let many = formula(12, 5, 3);
        let four = rebalance(&many, 12, 4, 3);
        check(&four, 4, 3);
        // Only the copies broker 4 held move.
        let moved = additions(&many, &four);
        assert_eq!(moved.len(), loads(&many, 5)[4], "{moved:?}");
    }

    #[test]
    fn new_partitions_are_placed_and_the_old_stay() {
        let before = formula(4, 3, 3);
        let after = rebalance(&before, 8, 3, 3);
        check(&after, 3, 3);
        assert_eq!(&after[..4], &before[..]);
        let before = formula(6, 5, 3);
        let after = rebalance(&before, 9, 5, 3);
        check(&after, 5, 3);
    }

    #[test]
    fn one_copy_per_partition_spreads_too() {
        let before = formula(6, 1, 1);
        let after = rebalance(&before, 6, 3, 1);
        check(&after, 3, 1);
        assert_eq!(additions(&before, &after).len(), 4);
    }
}
