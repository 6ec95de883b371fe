//! Which samples each node's functions train on, per round (PS worker i trains on peer i's):
//! deterministic from the seed, so any peer can compute any other's batches (for shard
//! take-over) and a replay repeats them.
//!
//! The training set is split IID into one shard per initial peer. Peer `p`'s epoch `e` is a
//! permutation of its shard drawn from `Rng::derive(seed, "p2p-order", p << 32 | e)`; round `r`
//! uses the next `k` mini-batches of it. An epoch is as many rounds as the largest shard needs.

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
}

impl Sampler {
    /// `n` training samples split among `peers`; `k` batches of `batch` per peer per round.
    pub fn new(n: usize, peers: u32, k: u32, batch: usize, seed: u64) -> Sampler {
        let shards = peerless_ml::data::iid(n, peers as usize, seed);
        let (k, batch) = (k as usize, batch.max(1));
        let largest = shards.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let rounds_per_epoch = largest.div_ceil(k * batch) as u64;
        Sampler { shards, k, batch, seed, rounds_per_epoch }
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
        let mut perm = shard.clone();
        Rng::derive(self.seed, "p2p-order", (u64::from(p) << 32) | epoch).shuffle(&mut perm);
        let start = (round % self.rounds_per_epoch) as usize * self.k * self.batch;
        (0..self.k)
            .map(|j| {
                (0..self.batch).map(|i| perm[(start + j * self.batch + i) % perm.len()] as u32).collect()
            })
            .collect()
    }

    /// The batches `me` computes in `round` given the active `view`: its own, plus (with
    /// `takeover`) a share of those of initial peers missing from the view: batch `j` of a
    /// missing peer goes to the survivor of rank `j mod survivors`.
    pub fn assignment(&self, me: PeerIdx, round: u64, view: &[PeerIdx], takeover: bool) -> Vec<Vec<u32>> {
        let mut out = self.batches(me, round);
        if takeover && !view.is_empty() {
            let rank = view.iter().position(|&p| p == me).unwrap_or(0);
            for gone in (0..self.shards.len() as u32).filter(|p| !view.contains(p)) {
                for (j, b) in self.batches(gone, round).into_iter().enumerate() {
                    if j % view.len() == rank {
                        out.push(b);
                    }
                }
            }
        }
        out
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

    #[test]
    fn takeover_covers_every_batch_of_the_missing_peers_exactly_once() {
        let s = Sampler::new(1000, 4, 4, 10, 1);
        let view = [0, 2];
        let mut all: Vec<Vec<u32>> = Vec::new();
        for &p in &view {
            all.extend(s.assignment(p, 3, &view, true));
        }
        let mut expected: Vec<Vec<u32>> = (0..4).flat_map(|p| s.batches(p, 3)).collect();
        all.sort();
        expected.sort();
        assert_eq!(all, expected);
        assert_eq!(s.assignment(0, 3, &view, false), s.batches(0, 3));
    }
}
