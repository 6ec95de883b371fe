//! A `churn` fault's stream: which fault hits which node when, drawn from the run's seed, so a
//! soak of many faults needs no hand-written list. Pure: no clock, no signal, no I/O; the
//! injector ([`super::faults::Injector`]) asks it for the next draw and carries it out.
//!
//! Draw `k` is due at `at_s + k × every_s` (while before `at_s + duration_s`, if given). Its
//! kind is drawn uniformly from `kinds`, its target uniformly from the targets that are up,
//! both from `Rng::derive(seed, "churn", fault << 32 | k)`: a draw never depends on another's,
//! and the whole stream is a function of the seed and the spec ([`expand`]). A target is down
//! for `down_s` after the stream hits it, and whenever the launcher says so (a process not
//! running, a node another fault stopped or cut off); a tick with no target up is skipped.

use peerless_core::rng::Rng;

use crate::config::TrainArch;
use crate::scenario::{FaultKind, FaultSpec, NodeRef, resolve_target};

/// One draw of a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    /// Its number in the stream, from 0.
    pub index: u64,
    /// When it is due, s after the launch.
    pub at_s: f64,
    /// What it does.
    pub kind: FaultKind,
    /// Whom; `None` when every target was down (the tick is skipped).
    pub target: Option<NodeRef>,
}

/// The churn stream of one `[[fault]]` in one run.
#[derive(Debug, Clone)]
pub struct Stream {
    seed: u64,
    /// The fault's position in its scenario (streams of one run are independent).
    fault: usize,
    kinds: Vec<FaultKind>,
    targets: Vec<NodeRef>,
    every_s: f64,
    down_s: f64,
    first_s: f64,
    /// No draw is due at or after this, s.
    end_s: Option<f64>,
    /// The next draw's number.
    next: u64,
    /// Per target: down (hit by this stream) until, s.
    down_until: Vec<f64>,
}

/// Slack for comparing due times computed by multiplication, s.
const EPS: f64 = 1e-9;

impl Stream {
    /// The stream of `spec` (a `churn` fault, at position `fault` of its scenario) in a run of
    /// `arch` with `n` peers or workers and seed `seed`; `None` when it has no target in
    /// `arch`. Its targets: those listed that exist in `arch`, or every peer or worker.
    pub fn new(spec: &FaultSpec, fault: usize, seed: u64, arch: TrainArch, n: usize) -> Option<Stream> {
        debug_assert_eq!(spec.kind, FaultKind::Churn, "a churn stream from a {} fault", spec.kind.name());
        let mut targets: Vec<NodeRef> = if spec.targets.is_empty() {
            let role = if arch == TrainArch::Ps { "worker" } else { "peer" };
            (0..n).map(|index| NodeRef { index, role }).collect()
        } else {
            spec.targets.iter().filter_map(|t| resolve_target(t, arch, n)).collect()
        };
        // `ps` and `node:0` are the same peer in a P2P run.
        targets.sort_by_key(|t| t.index);
        targets.dedup();
        if targets.is_empty() {
            return None;
        }
        let every_s = spec.every_s.unwrap_or(1.0);
        let first_s = spec.at_s.unwrap_or(every_s);
        Some(Stream {
            seed,
            fault,
            kinds: spec.churn_kinds(),
            every_s,
            down_s: spec.down_s.unwrap_or(0.0),
            first_s,
            end_s: spec.duration_s.map(|d| first_s + d),
            next: 0,
            down_until: vec![f64::NEG_INFINITY; targets.len()],
            targets,
        })
    }

    /// The nodes it may hit.
    pub fn targets(&self) -> &[NodeRef] {
        &self.targets
    }

    /// How long each fault lasts, s.
    pub fn down_s(&self) -> f64 {
        self.down_s
    }

    /// When the next draw is due, s after the launch; `None` once the stream has ended.
    pub fn next_at(&self) -> Option<f64> {
        let at = self.first_s + self.next as f64 * self.every_s;
        match self.end_s {
            Some(end) if at >= end - EPS => None,
            _ => Some(at),
        }
    }

    /// Ends the stream: no draw is due any more (the run's result is in).
    pub fn end(&mut self) {
        self.end_s = Some(f64::NEG_INFINITY);
    }

    /// Draws the next fault, whether due or not; `up` says whether the launcher sees a
    /// target up (its process running, not stopped or cut off by another fault). `None` once
    /// the stream has ended.
    pub fn draw(&mut self, up: impl Fn(NodeRef) -> bool) -> Option<Draw> {
        let at_s = self.next_at()?;
        let index = self.next;
        self.next += 1;
        let mut rng = Rng::derive(self.seed, "churn", ((self.fault as u64) << 32) | index);
        let kind = self.kinds[rng.below(self.kinds.len() as u64) as usize];
        let candidates: Vec<usize> = (0..self.targets.len())
            .filter(|&i| self.down_until[i] <= at_s + EPS && up(self.targets[i]))
            .collect();
        let target = (!candidates.is_empty()).then(|| {
            let i = candidates[rng.below(candidates.len() as u64) as usize];
            self.down_until[i] = at_s + self.down_s;
            self.targets[i]
        });
        Some(Draw { index, at_s, kind, target })
    }
}

/// The draws of the stream of `spec` (at position `fault`) due before `until_s` (or its end),
/// with nothing but the stream itself taking nodes down: a pure function of the seed and the
/// spec. A stream without `duration_s` needs a finite `until_s`.
pub fn expand(
    spec: &FaultSpec,
    fault: usize,
    seed: u64,
    arch: TrainArch,
    n: usize,
    until_s: f64,
) -> Vec<Draw> {
    let Some(mut stream) = Stream::new(spec, fault, seed, arch, n) else { return Vec::new() };
    let mut out = Vec::new();
    while stream.next_at().is_some_and(|t| t < until_s) {
        out.extend(stream.draw(|_| true));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;

    /// The one fault of a scenario made of `fault` (the body of a `[[fault]]` table).
    fn churn(fault: &str) -> FaultSpec {
        let text = format!("[run]\ncluster.nodes = 4\n[[fault]]\nkind = \"churn\"\n{fault}");
        Scenario::from_toml(&text, "churn.toml", "churn").unwrap().faults.remove(0)
    }

    #[test]
    fn a_stream_is_a_function_of_the_seed_and_keeps_to_its_targets_and_kinds() {
        let spec = churn(
            "every_s = 3\ndown_s = 1\nkinds = [\"kill\", \"stop\"]\ntargets = [\"node:1\", \"node:2\", \"node:3\"]\n\
             at_s = 3\nduration_s = 21\n",
        );
        let a = expand(&spec, 0, 7, TrainArch::P2p, 4, 1e9);
        assert_eq!(a, expand(&spec, 0, 7, TrainArch::P2p, 4, 1e9), "same seed, same stream");
        assert_ne!(a, expand(&spec, 0, 8, TrainArch::P2p, 4, 1e9), "another seed, another stream");
        assert_ne!(a, expand(&spec, 1, 7, TrainArch::P2p, 4, 1e9), "another fault, another stream");
        // 3, 6, …, 21: the stream ends before 3 + 21 s.
        let times: Vec<f64> = a.iter().map(|d| d.at_s).collect();
        assert_eq!(times, [3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 21.0]);
        assert!(a.iter().all(|d| matches!(d.kind, FaultKind::Kill | FaultKind::Stop)));
        let hit: Vec<usize> = a.iter().map(|d| d.target.expect("a target is always up").index).collect();
        assert!(hit.iter().all(|i| (1..=3).contains(i)), "{hit:?}");
        // Over many seeds every kind and every target comes up.
        let many: Vec<Draw> = (0..50).flat_map(|s| expand(&spec, 0, s, TrainArch::P2p, 4, 1e9)).collect();
        for k in [FaultKind::Kill, FaultKind::Stop] {
            assert!(many.iter().any(|d| d.kind == k), "{k:?} never drawn");
        }
        for i in 1..=3 {
            assert!(many.iter().any(|d| d.target.is_some_and(|t| t.index == i)), "node {i} never hit");
        }
        // In a PS run the same targets are workers.
        let ps = expand(&spec, 0, 7, TrainArch::Ps, 4, 1e9);
        assert!(ps.iter().all(|d| d.target.is_some_and(|t| t.role == "worker")), "{ps:?}");
    }

    #[test]
    fn defaults_hit_every_peer_or_worker_with_kills_and_the_ps_only_when_listed() {
        let spec = churn("every_s = 2\ndown_s = 0.5\n");
        let d = expand(&spec, 0, 1, TrainArch::Ps, 4, 41.0);
        assert_eq!(d.len(), 20, "at 2, 4, …, 40 s");
        assert!(d.iter().all(|d| d.kind == FaultKind::Kill));
        assert!(d.iter().all(|d| d.target.is_some_and(|t| t.role == "worker" && t.index < 4)), "{d:?}");
        let with_ps = churn("every_s = 2\ndown_s = 0.5\ntargets = [\"ps\", \"node:0\"]\n");
        let d = expand(&with_ps, 0, 1, TrainArch::Ps, 4, 100.0);
        assert!(d.iter().any(|d| d.target.is_some_and(|t| t.role == "ps")), "{d:?}");
        // In a P2P run `ps` is peer 0, the same node as node:0.
        let s = Stream::new(&with_ps, 0, 1, TrainArch::P2p, 4).unwrap();
        assert_eq!(s.targets(), [NodeRef { index: 0, role: "peer" }]);
        assert!(
            Stream::new(
                &churn("every_s = 1\ndown_s = 0\ntargets = [\"worker:1\"]\n"),
                0,
                1,
                TrainArch::P2p,
                4
            )
            .is_none()
        );
    }

    #[test]
    fn a_target_that_is_down_is_never_hit_and_a_tick_without_one_is_skipped() {
        // Each hit is down for 2.5 s, a fault every second, two targets: every third tick finds both
        // down.
        let spec = churn("every_s = 1\ndown_s = 2.5\ntargets = [\"node:1\", \"node:2\"]\nat_s = 1\n");
        let d = expand(&spec, 0, 3, TrainArch::P2p, 4, 100.0);
        let mut down_until = [f64::NEG_INFINITY; 4];
        for x in &d {
            match x.target {
                Some(t) => {
                    assert!(
                        down_until[t.index] <= x.at_s,
                        "{x:?} hit a node down until {}",
                        down_until[t.index]
                    );
                    down_until[t.index] = x.at_s + 2.5;
                }
                None => assert!(
                    down_until[1] > x.at_s && down_until[2] > x.at_s,
                    "{x:?} skipped with a target up"
                ),
            }
        }
        assert!(d.iter().any(|x| x.target.is_none()), "some tick is skipped");
        // The launcher's view counts too: with node 1 down for it, only node 2 is hit.
        let mut s = Stream::new(&spec, 0, 3, TrainArch::P2p, 4).unwrap();
        let first = s.draw(|t| t.index != 1).unwrap();
        assert_eq!(first.target.map(|t| t.index), Some(2));
        let second = s.draw(|t| t.index != 1).unwrap();
        assert_eq!(second.target, None, "node 2 is still down from the first draw");
        s.end();
        assert_eq!(s.draw(|_| true), None, "an ended stream draws nothing");
    }

    #[test]
    fn the_library_s_churn_scenario_is_the_issue_s_seven_kills() {
        // Node 1, 2 or 3 killed every 3 s from 3 s to 24 s.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scenarios/churn.toml");
        let churn = Scenario::load(std::path::Path::new(path)).unwrap();
        let draws = expand(&churn.faults[0], 0, 1, TrainArch::P2p, 4, f64::INFINITY);
        assert_eq!(draws.len(), 7, "{draws:?}");
        assert!(draws.iter().all(|d| d.kind == FaultKind::Kill && d.target.is_some_and(|t| t.index != 0)));
    }
}
