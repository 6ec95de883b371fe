//! Which samples each node's functions train on, per round (PS worker i trains on peer i's):
//! deterministic from the seed, so any peer can compute any other's batches (for shard
//! take-over) and a replay repeats them.
//!
//! The training set is split IID into one shard per initial peer. Peer `p`'s epoch `e` is a
//! permutation of its shard drawn from `Rng::derive(seed, "p2p-order", p << 32 | e)`; round `r`
//! uses the next `k` mini-batches of it. An epoch is as many rounds as the largest shard needs.
//!
//! A round's samples are the `k` batches of every shard, whoever is there to compute them:
//! membership changes who computes which sample, never which samples a round trains on (so the
//! global batch, and with it the learning rate, stays as configured). With take-over, the
//! peers of the round's view share them evenly, to a sample: each keeps its own shard's samples
//! up to its share, and the rest (those of shards whose owner is not in the view, and a
//! starting member's beyond its share when joiners are there) are dealt in shard order to the
//! members still short of theirs, by rank; each member computes its share as `k` batches. With
//! every starting member there and no joiner, that is each peer's own `k` batches. Every peer
//! computes the same deal from the same view.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use peerless_core::protocol::PeerIdx;
use peerless_core::rng::Rng;

/// Batches of every peer, every round.
#[derive(Debug, Clone)]
pub struct Sampler {
    shards: Vec<Vec<usize>>,
    k: usize,
    batch: usize,
    seed: u64,
    rounds_per_epoch: u64,
    /// The epoch permutations drawn, by shard and epoch (the newest two epochs kept): drawing
    /// one shuffles a whole shard, which every round of the epoch would otherwise repeat.
    perms: Arc<Mutex<HashMap<(PeerIdx, u64), Arc<Vec<usize>>>>>,
}

impl Sampler {
    /// `n` training samples split among `peers`; `k` batches of `batch` per peer per round.
    pub fn new(n: usize, peers: u32, k: u32, batch: usize, seed: u64) -> Sampler {
        let shards = peerless_ml::data::iid(n, peers as usize, seed);
        let (k, batch) = (k as usize, batch.max(1));
        let largest = shards.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let rounds_per_epoch = largest.div_ceil(k * batch) as u64;
        Sampler { shards, k, batch, seed, rounds_per_epoch, perms: Arc::default() }
    }

    /// Rounds in one epoch.
    pub fn rounds_per_epoch(&self) -> u64 {
        self.rounds_per_epoch
    }

    /// The `k` batches of peer `p` in `round` (empty when `p` has no shard).
    pub fn batches(&self, p: PeerIdx, round: u64) -> Vec<Vec<u32>> {
        let Some(shard) = self.shards.get(p as usize).filter(|s| !s.is_empty()) else {
            return Vec::new();
        };
        let epoch = round / self.rounds_per_epoch;
        let perm = self.permutation(p, epoch, shard);
        let start = (round % self.rounds_per_epoch) as usize * self.k * self.batch;
        (0..self.k)
            .map(|j| {
                (0..self.batch).map(|i| perm[(start + j * self.batch + i) % perm.len()] as u32).collect()
            })
            .collect()
    }

    /// Shard `p`'s order in `epoch`: drawn once, then taken from the cache.
    fn permutation(&self, p: PeerIdx, epoch: u64, shard: &[usize]) -> Arc<Vec<usize>> {
        let mut perms = self.perms.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(perm) = perms.get(&(p, epoch)) {
            return perm.clone();
        }
        let mut perm = shard.to_vec();
        Rng::derive(self.seed, "p2p-order", (u64::from(p) << 32) | epoch).shuffle(&mut perm);
        let perm = Arc::new(perm);
        perms.retain(|&(_, e), _| e + 1 >= epoch && e <= epoch + 1);
        perms.insert((p, epoch), perm.clone());
        perm
    }

    /// The batches `me` computes in `round` given the active `view` (sorted, `me` in it): its
    /// own shard's alone without `takeover`; with it, its share of the deal (module docs).
    pub fn assignment(&self, me: PeerIdx, round: u64, view: &[PeerIdx], takeover: bool) -> Vec<Vec<u32>> {
        let Some(rank) = view.iter().position(|&p| p == me).filter(|_| takeover) else {
            return self.batches(me, round);
        };
        let per_shard = self.k * self.batch;
        let total = self.shards.len() * per_shard;
        let share = |r: usize| total / view.len() + usize::from(r < total % view.len());
        // Each member keeps its own shard's samples up to its share; the rest go to the pool.
        let mut kept = vec![0usize; view.len()];
        let mut mine = Vec::new();
        let mut pool = Vec::new();
        for s in 0..self.shards.len() as u32 {
            let owner = view.iter().position(|&p| p == s);
            for (i, x) in self.batches(s, round).into_iter().flatten().enumerate() {
                match owner {
                    Some(r) if i < share(r) => {
                        kept[r] += 1;
                        if r == rank {
                            mine.push(x);
                        }
                    }
                    _ => pool.push(x),
                }
            }
        }
        // The pool is dealt in order to the members short of their share, by rank.
        let before: usize = (0..rank).map(|r| share(r) - kept[r]).sum();
        mine.extend(pool.into_iter().skip(before).take(share(rank) - kept[rank]));
        // In `k` batches (fewer if it has fewer samples), sizes differing by at most one.
        let parts = self.k.min(mine.len());
        let mut rest = mine.as_slice();
        (0..parts)
            .map(|j| {
                let (batch, tail) =
                    rest.split_at(rest.len() / (parts - j) + usize::from(rest.len() % (parts - j) > 0));
                rest = tail;
                batch.to_vec()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_covers_each_shard_and_shards_are_disjoint() {
        let s = Sampler::new(1000, 4, 2, 25, 7);
        assert_eq!(s.rounds_per_epoch(), 5);
        let mut seen = vec![0u32; 1000];
        for p in 0..4 {
            for r in 0..5 {
                for b in s.batches(p, r) {
                    for i in b {
                        seen[i as usize] += 1;
                    }
                }
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
        assert_ne!(s.batches(0, 0), s.batches(0, 5), "each epoch reshuffles");
    }

    /// Every sample of the round, from the assignments of every member of `view`.
    fn dealt(s: &Sampler, view: &[PeerIdx], round: u64) -> Vec<u32> {
        let mut all: Vec<u32> =
            view.iter().flat_map(|&p| s.assignment(p, round, view, true)).flatten().collect();
        all.sort();
        all
    }

    #[test]
    fn any_view_computes_every_batch_of_the_round_exactly_once_in_even_shares() {
        let s = Sampler::new(1000, 4, 3, 10, 1);
        let mut expected: Vec<u32> = (0..4).flat_map(|p| s.batches(p, 3)).flatten().collect();
        expected.sort();
        let views: [&[PeerIdx]; 6] =
            [&[0, 1, 2, 3], &[0, 2], &[1], &[0, 1, 2, 3, 4, 5], &[2, 3, 4, 5, 6], &[7, 9]];
        for view in views {
            assert_eq!(dealt(&s, view, 3), expected, "view {view:?}");
            let samples: Vec<usize> =
                view.iter().map(|&p| s.assignment(p, 3, view, true).iter().map(Vec::len).sum()).collect();
            assert!(
                samples.iter().max().unwrap() - samples.iter().min().unwrap() <= 1,
                "{view:?}: {samples:?}"
            );
            assert!(view.iter().all(|&p| s.assignment(p, 3, view, true).len() <= 3), "k batches at most");
        }
        // With every starting member there and no joiner, each computes its own batches.
        for p in 0..4 {
            assert_eq!(s.assignment(p, 3, &[0, 1, 2, 3], true), s.batches(p, 3));
        }
        // A joiner (index 4) takes batches from the starting members, not only from the gone.
        assert!(!s.assignment(4, 3, &[0, 1, 2, 3, 4], true).is_empty());
        // Without take-over, a peer computes its own batches whatever the view.
        assert_eq!(s.assignment(0, 3, &[0, 2], false), s.batches(0, 3));
    }
}
