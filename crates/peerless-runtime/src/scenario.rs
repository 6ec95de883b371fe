//! Experiment scenarios: a workload (a [`RunConfig`]) and a schedule of faults the launcher
//! injects for real (signals to processes, a fault proxy between nodes).
//!
//! ```toml
//! name = "peer-crash"                 # default: the file's stem
//! description = "One node is SIGKILLed at round 60 and does not come back."
//! target_accuracy = 0.95              # for time-to-target in the report
//! seed = 1                            # first seed; `--seeds k` runs seed, seed+1, …
//! timeout_s = 900                     # a run still going after this long is stopped (failed)
//! baseline = "no-faults"              # the fault-free twin for goodput (default: no-faults)
//!
//! [run]                               # the workload: the same keys as a --config file
//! data.dataset = "mnist"
//! train.epochs = 2
//! cluster.nodes = 4
//!
//! [[fault]]
//! kind = "kill"                       # kill | stop | straggle | partition | delay | bandwidth | byzantine
//! targets = ["node:1"]                # node:i (peer i / worker i), peer:i, worker:i, ps
//! at_round = 60                       # or at_s = 12.5 (seconds after the launch)
//! restart_after_s = 5                 # kill: start it again (a peer rejoins with --join)
//!
//! [[fault]]
//! kind = "churn"                      # a seeded random stream of faults
//! every_s = 3                         # one fault every every_s seconds
//! kinds = ["kill", "stop", "partition"]  # drawn uniformly (default ["kill"])
//! down_s = 1                          # restarted / continued / healed after down_s
//! targets = ["node:1", "node:2"]      # default: every peer (P2P) or worker (PS)
//! at_s = 3                            # the first fault (default every_s)
//! duration_s = 21                     # no fault from at_s + duration_s on (default: the end)
//! ```
//!
//! - `kill`: SIGKILL. The PS is always restarted by the launcher after `ps.restart_delay_ms`
//!   (the cloud restarting its instance); peers and workers only with `restart_after_s`.
//! - `stop`: SIGSTOP for `duration_s`, then SIGCONT (a frozen node).
//! - `straggle`: SIGSTOP for `stop_ms` of every `period_ms` (a slow node), for `duration_s` or
//!   to the end.
//! - `partition`: the targets are cut off from every other node for `duration_s` (or to the
//!   end): existing connections are closed and new ones refused by the fault proxy.
//! - `delay`: every byte to or from the targets is delivered `delay_ms` late.
//! - `bandwidth`: each direction of every link to or from the targets carries at most
//!   `rate_mbit` megabits per second (a link's bytes leave one after another at that rate;
//!   with a `delay` too, they then arrive `delay_ms` later), for `duration_s` or to the end.
//!   Targets `["node:0", "node:1", …]` cap every link of those nodes.
//! - `byzantine`: the targets (peers or workers, never the PS) misbehave from `at_round` on
//!   with `attack = "sign-flip" | "gaussian" | "label-flip" | "nan" | "wrong-length" |
//!   "replay"` ([`peerless_core::attack`]). The launcher writes the attack into their node
//!   files, so their own processes attack; the injection is recorded when the round comes.
//! - `churn`: a fault every `every_s` from `at_s` (default `every_s`) for `duration_s` (default:
//!   until the first node holding the result finishes). Each is a `kill` (restarted after
//!   `down_s`; a peer rejoins with `--join`, the PS is restarted by the launcher as always), a
//!   `stop` (SIGCONT after `down_s`) or a `partition` (healed after `down_s`) of one target,
//!   kind and target drawn uniformly from the run's seed (by the launcher's `cluster/churn.rs`): the same
//!   seed gives the same stream. A target that is down (killed and not yet restarted, stopped,
//!   cut off) is never picked; a tick with none up is skipped and recorded (`fault_skipped`).
//!   Targets default to every peer (P2P) or every worker (PS); the PS only when listed.
//!   `every_s` > 0 and `down_s` ≥ 0 are required; `at_round` does not apply.
//!
//! Function failures (crash, timeout, throttle, slow cold starts) are rates in the workload's
//! `[run.function.faults]`; the launcher records them as a `function_faults` injection.
//!
//! Target `ps` in a P2P run means peer 0: the same machine loss, in the architecture without
//! a central node.

use std::path::Path;

use serde::{Deserialize, Serialize};

use peerless_core::attack::{Attack, AttackKind};

use crate::config::{ConfigError, RunConfig, TrainArch};

/// A scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name (default: the file's stem).
    #[serde(default)]
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// Test accuracy for time-to-target.
    #[serde(default = "default_target")]
    pub target_accuracy: f32,
    /// First seed.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Runs still going after this long are stopped and count as failed, s.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// The fault-free twin the report compares throughput with (goodput); default: the
    /// scenario named `no-faults` in the same experiment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// The workload.
    #[serde(default)]
    pub run: RunConfig,
    /// The faults, in any order.
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultSpec>,
}

fn default_target() -> f32 {
    0.95
}
fn default_seed() -> u64 {
    1
}
fn default_timeout() -> u64 {
    900
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL.
    Kill,
    /// SIGSTOP, then SIGCONT.
    Stop,
    /// Periodic SIGSTOP/SIGCONT.
    Straggle,
    /// Cut the targets off from the others.
    Partition,
    /// Deliver the targets' traffic late.
    Delay,
    /// Cap the rate of the targets' links.
    Bandwidth,
    /// Make the targets Byzantine: they send attacked gradients from `at_round` on.
    Byzantine,
    /// A seeded random stream of `kill`, `stop` and `partition` faults, one every `every_s`.
    Churn,
    /// A new P2P peer (a fresh identity and certificate, the index after the starting members
    /// and earlier joins) joins the running run.
    Join,
}

impl FaultKind {
    /// Its name in events.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Stop => "stop",
            FaultKind::Straggle => "straggle",
            FaultKind::Partition => "partition",
            FaultKind::Delay => "delay",
            FaultKind::Bandwidth => "bandwidth",
            FaultKind::Byzantine => "byzantine",
            FaultKind::Churn => "churn",
            FaultKind::Join => "join",
        }
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// What.
    pub kind: FaultKind,
    /// Whom: `node:i`, `peer:i`, `worker:i` or `ps` (`churn`: default every peer or worker).
    #[serde(default)]
    pub targets: Vec<String>,
    /// When the cluster's highest completed round reaches this.
    #[serde(default)]
    pub at_round: Option<u64>,
    /// When this many seconds passed since the launch.
    #[serde(default)]
    pub at_s: Option<f64>,
    /// `stop`, `straggle`, `partition`, `delay`: how long (default: to the end; required for
    /// `stop`). `churn`: how long the stream lasts from its first fault (default: to the end).
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// `kill`: restart the node this long after the kill.
    #[serde(default)]
    pub restart_after_s: Option<f64>,
    /// `delay`: added latency, ms.
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// `bandwidth`: megabits per second each direction of a capped link carries.
    #[serde(default)]
    pub rate_mbit: Option<f64>,
    /// `straggle`: stopped for this long …
    #[serde(default)]
    pub stop_ms: Option<u64>,
    /// … out of every this long, ms.
    #[serde(default)]
    pub period_ms: Option<u64>,
    /// `byzantine`: what the targets do (`sign-flip`, `gaussian`, `label-flip`, `nan`,
    /// `wrong-length`, `replay`; see [`peerless_core::attack`]).
    #[serde(default)]
    pub attack: Option<AttackKind>,
    /// `churn`: one fault every this long, s.
    #[serde(default)]
    pub every_s: Option<f64>,
    /// `churn`: the kinds each fault is drawn from, uniformly (`kill`, `stop`, `partition`;
    /// default `kill`).
    #[serde(default)]
    pub kinds: Option<Vec<FaultKind>>,
    /// `churn`: how long each fault lasts, s: a killed node is started again after it, a
    /// stopped one continued, a partition healed.
    #[serde(default)]
    pub down_s: Option<f64>,
}

/// The kinds a `churn` stream can draw.
pub const CHURN_KINDS: [FaultKind; 3] = [FaultKind::Kill, FaultKind::Stop, FaultKind::Partition];

impl FaultSpec {
    /// The attack a `byzantine` fault gives its targets.
    pub fn byzantine(&self) -> Option<Attack> {
        match (self.kind, self.attack) {
            (FaultKind::Byzantine, Some(kind)) => {
                Some(Attack { kind, from_round: self.at_round.unwrap_or(0) })
            }
            _ => None,
        }
    }

    /// Checks this fault for a cluster of `n` peers or workers; the error says what is wrong.
    fn check(&self, n: usize) -> Result<(), String> {
        self.check_timing()?;
        match self.kind {
            FaultKind::Join if !self.targets.is_empty() => {
                return Err("a join starts a new peer, after the starting members: give no targets".into());
            }
            FaultKind::Churn | FaultKind::Join => {}
            _ if self.targets.is_empty() => return Err("targets is empty (give the nodes it hits)".into()),
            _ => {}
        }
        for t in &self.targets {
            parse_target(t, n)?;
        }
        for (key, v) in [
            ("duration_s", self.duration_s),
            ("restart_after_s", self.restart_after_s),
            ("down_s", self.down_s),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(format!("{key} = {v}: must be a non-negative number"));
            }
        }
        self.check_keys_apply()?;
        self.check_kind_needs()
    }

    /// Exactly one of `at_round` and `at_s`, a time being a non-negative number; a `churn`
    /// stream is timed, `at_s` optional.
    fn check_timing(&self) -> Result<(), String> {
        match (self.at_round, self.at_s) {
            (Some(_), _) if self.kind == FaultKind::Churn => {
                Err("at_round does not apply to churn: its faults are timed (at_s, every_s)".into())
            }
            (None, None) if self.kind == FaultKind::Churn => Ok(()),
            (Some(_), Some(_)) => Err("give at_round or at_s, not both".into()),
            (None, None) => Err("give at_round or at_s".into()),
            (None, Some(s)) if !(s.is_finite() && s >= 0.0) => {
                Err(format!("at_s = {s}: must be a non-negative number"))
            }
            _ => Ok(()),
        }
    }

    /// Only the keys of this kind of fault are given.
    fn check_keys_apply(&self) -> Result<(), String> {
        let only = |key: &str, given: bool, kinds: &[FaultKind]| -> Result<(), String> {
            if given && !kinds.contains(&self.kind) {
                return Err(format!("{key} does not apply to {}", self.kind.name()));
            }
            Ok(())
        };
        only("restart_after_s", self.restart_after_s.is_some(), &[FaultKind::Kill])?;
        only("delay_ms", self.delay_ms.is_some(), &[FaultKind::Delay])?;
        only("rate_mbit", self.rate_mbit.is_some(), &[FaultKind::Bandwidth])?;
        only("stop_ms", self.stop_ms.is_some(), &[FaultKind::Straggle])?;
        only("period_ms", self.period_ms.is_some(), &[FaultKind::Straggle])?;
        only("attack", self.attack.is_some(), &[FaultKind::Byzantine])?;
        only("every_s", self.every_s.is_some(), &[FaultKind::Churn])?;
        only("kinds", self.kinds.is_some(), &[FaultKind::Churn])?;
        only("down_s", self.down_s.is_some(), &[FaultKind::Churn])?;
        only(
            "duration_s",
            self.duration_s.is_some(),
            &[
                FaultKind::Stop,
                FaultKind::Straggle,
                FaultKind::Partition,
                FaultKind::Delay,
                FaultKind::Bandwidth,
                FaultKind::Churn,
            ],
        )
    }

    /// A `churn` stream's own keys: a positive `every_s`, a `down_s`, known `kinds`.
    fn check_churn(&self) -> Result<(), String> {
        match self.every_s {
            None => return Err("needs every_s (seconds between two faults)".into()),
            Some(e) if !(e.is_finite() && e > 0.0) => {
                return Err(format!("every_s = {e}: must be a positive number"));
            }
            Some(_) => {}
        }
        if self.down_s.is_none() {
            return Err(
                "needs down_s (how long each fault lasts: a killed node is restarted after it)".into()
            );
        }
        match &self.kinds {
            Some(k) if k.is_empty() => Err("kinds is empty: give some of kill, stop, partition".into()),
            Some(k) => match k.iter().find(|k| !CHURN_KINDS.contains(k)) {
                Some(bad) => Err(format!("kinds: {} cannot churn; use kill, stop or partition", bad.name())),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// A `churn` stream's kinds (default `kill`).
    pub fn churn_kinds(&self) -> Vec<FaultKind> {
        self.kinds.clone().unwrap_or_else(|| vec![FaultKind::Kill])
    }

    /// What each kind of fault needs, and the targets it cannot have.
    fn check_kind_needs(&self) -> Result<(), String> {
        let has_ps = self.targets.iter().any(|t| t == "ps");
        let reason = match self.kind {
            FaultKind::Stop if self.duration_s.is_none() => {
                "needs duration_s (a node stopped for good is a kill)"
            }
            FaultKind::Straggle => match (self.stop_ms, self.period_ms) {
                (Some(s), Some(p)) if s > 0 && s < p && p <= 60_000 => return Ok(()),
                _ => "needs 0 < stop_ms < period_ms ≤ 60000 (stopped stop_ms of every period_ms)",
            },
            FaultKind::Delay if !self.delay_ms.is_some_and(|d| (1..=60_000).contains(&d)) => {
                "needs delay_ms in 1..=60000"
            }
            FaultKind::Bandwidth if !self.rate_mbit.is_some_and(|r| (0.001..=1e6).contains(&r)) => {
                "needs rate_mbit in 0.001..=1000000 (megabits per second)"
            }
            FaultKind::Byzantine if self.attack.is_none() => {
                "needs attack: sign-flip, gaussian, label-flip, nan, wrong-length or replay"
            }
            FaultKind::Byzantine if self.at_s.is_some() => {
                "give at_round (the node attacks from that round on), not at_s"
            }
            FaultKind::Byzantine if has_ps => {
                "the PS cannot be Byzantine: the PS baseline trusts its server (docs/threat-model.md)"
            }
            FaultKind::Partition if has_ps && self.targets.len() > 1 => {
                "partition the PS alone, or a set of nodes without it"
            }
            FaultKind::Churn => return self.check_churn(),
            _ => return Ok(()),
        };
        Err(reason.into())
    }
}

/// A target resolved for one run: the launcher's node index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRef {
    /// Index among the launcher's nodes (peers 0..n; workers 0..n and the PS at n).
    pub index: usize,
    /// `peer`, `worker` or `ps`.
    pub role: &'static str,
}

impl std::fmt::Display for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.role {
            "ps" => write!(f, "ps"),
            r => write!(f, "{r} {}", self.index),
        }
    }
}

/// Scenario errors; each names the scenario and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Bad TOML or an unknown key.
    #[error("invalid scenario {origin}: {message}")]
    Parse {
        /// File.
        origin: String,
        /// The parser's message (names the key and position).
        message: String,
    },
    /// The workload's config is invalid.
    #[error("scenario {origin}: [run] {source}")]
    Config {
        /// File.
        origin: String,
        /// Cause.
        source: ConfigError,
    },
    /// A fault entry is invalid.
    #[error("scenario {origin}: fault #{index} ({kind}): {reason}")]
    Fault {
        /// File.
        origin: String,
        /// Position in the file, from 1.
        index: usize,
        /// Its kind.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Read { path: path.display().to_string(), source })?;
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Scenario::from_toml(&text, &path.display().to_string(), &stem)
    }

    /// Parses and validates scenario text; `origin` names it in errors, `stem` is the default
    /// name. Keys of `[run]` still under their names before 0.2 are read, with a warning.
    pub fn from_toml(text: &str, origin: &str, stem: &str) -> Result<Scenario, ScenarioError> {
        let parse =
            |e: toml::de::Error| ScenarioError::Parse { origin: origin.into(), message: e.to_string() };
        let mut table: toml::Table = toml::from_str(text).map_err(parse)?;
        let warnings = match table.get_mut("run") {
            Some(toml::Value::Table(run)) => crate::config::move_legacy_keys(run)
                .map_err(|source| ScenarioError::Config { origin: origin.into(), source })?,
            _ => Vec::new(),
        };
        // Without old keys, parse the text itself: its errors then point at a line.
        let mut s: Scenario =
            if warnings.is_empty() { toml::from_str(text) } else { table.try_into() }.map_err(parse)?;
        for w in warnings {
            tracing::warn!(scenario = origin, "{w}");
        }
        if s.name.is_empty() {
            s.name = stem.to_owned();
        }
        s.validate(origin)?;
        Ok(s)
    }

    /// Checks the workload and every fault.
    pub fn validate(&self, origin: &str) -> Result<(), ScenarioError> {
        let named =
            |n: &str| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        for (key, value) in [("name", Some(&self.name)), ("baseline", self.baseline.as_ref())] {
            if let Some(v) = value
                && !named(v)
            {
                return Err(ScenarioError::Parse {
                    origin: origin.into(),
                    message: format!("{key} {v:?}: use letters, digits, '-', '_' or '.'"),
                });
            }
        }
        if !(0.0..=1.0).contains(&self.target_accuracy) {
            return Err(ScenarioError::Parse {
                origin: origin.into(),
                message: format!("target_accuracy = {}: must be in [0, 1]", self.target_accuracy),
            });
        }
        self.run.validate().map_err(|source| ScenarioError::Config { origin: origin.into(), source })?;
        let n = self.run.cluster.nodes as usize;
        for (i, f) in self.faults.iter().enumerate() {
            f.check(n).map_err(|reason| ScenarioError::Fault {
                origin: origin.into(),
                index: i + 1,
                kind: f.kind.name(),
                reason,
            })?;
        }
        Ok(())
    }

    /// The run config of one run: the workload with `arch` and `seed`.
    pub fn run_config(&self, arch: TrainArch, seed: u64) -> RunConfig {
        let mut cfg = self.run.clone();
        cfg.train.arch = arch;
        cfg.seed = seed;
        cfg
    }
}

/// Parses a target for a cluster of `n` peers or workers (checks the index only).
fn parse_target(t: &str, n: usize) -> Result<(&str, Option<usize>), String> {
    if t == "ps" {
        return Ok(("ps", None));
    }
    let (role, idx) = t
        .split_once(':')
        .ok_or_else(|| format!("target {t:?}: expected node:<i>, peer:<i>, worker:<i> or ps"))?;
    if !["node", "peer", "worker"].contains(&role) {
        return Err(format!("target {t:?}: expected node:<i>, peer:<i>, worker:<i> or ps"));
    }
    let i: usize = idx.parse().map_err(|_| format!("target {t:?}: {idx:?} is not an index"))?;
    if i >= n {
        return Err(format!("target {t:?}: the run has {n} nodes (0..{n})"));
    }
    Ok((role, Some(i)))
}

/// Resolves a target for one run of `arch` with `n` peers or workers; `None` when it does not
/// exist in that architecture (`peer:i` in a PS run, `worker:i` in a P2P run).
pub fn resolve_target(t: &str, arch: TrainArch, n: usize) -> Option<NodeRef> {
    let (role, idx) = parse_target(t, n).ok()?;
    match (arch, role, idx) {
        (TrainArch::P2p, "ps", _) => Some(NodeRef { index: 0, role: "peer" }),
        (TrainArch::P2p, "node" | "peer", Some(i)) => Some(NodeRef { index: i, role: "peer" }),
        (TrainArch::Ps, "ps", _) => Some(NodeRef { index: n, role: "ps" }),
        (TrainArch::Ps, "node" | "worker", Some(i)) => Some(NodeRef { index: i, role: "worker" }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
description = "a peer dies"
[run]
cluster.nodes = 4
[[fault]]
kind = "kill"
targets = ["node:1"]
at_round = 10
restart_after_s = 2
[[fault]]
kind = "straggle"
targets = ["ps"]
at_s = 1.5
stop_ms = 50
period_ms = 200
"#;

    #[test]
    fn a_scenario_parses_with_defaults_and_resolves_targets_per_arch() {
        let s = Scenario::from_toml(OK, "t.toml", "crash").unwrap();
        assert_eq!(s.name, "crash");
        assert_eq!(s.seed, 1);
        assert_eq!(s.faults.len(), 2);
        assert_eq!(resolve_target("node:1", TrainArch::P2p, 4), Some(NodeRef { index: 1, role: "peer" }));
        assert_eq!(resolve_target("node:1", TrainArch::Ps, 4), Some(NodeRef { index: 1, role: "worker" }));
        assert_eq!(resolve_target("ps", TrainArch::Ps, 4), Some(NodeRef { index: 4, role: "ps" }));
        assert_eq!(resolve_target("ps", TrainArch::P2p, 4), Some(NodeRef { index: 0, role: "peer" }));
        assert_eq!(resolve_target("peer:2", TrainArch::Ps, 4), None);
        let b = Scenario::from_toml(
            "[[fault]]\nkind = \"byzantine\"\ntargets = [\"node:3\"]\nat_round = 5\nattack = \"sign-flip\"\n",
            "b.toml",
            "b",
        )
        .unwrap();
        assert_eq!(b.faults[0].byzantine(), Some(Attack { kind: AttackKind::SignFlip, from_round: 5 }));
        assert_eq!(s.faults[0].byzantine(), None);
        let cfg = s.run_config(TrainArch::Ps, 7);
        assert_eq!((cfg.train.arch, cfg.seed), (TrainArch::Ps, 7));
    }

    #[test]
    fn a_churn_fault_needs_only_its_rate_and_down_time_and_names_its_twin() {
        let text = "baseline = \"calm\"\n[run]\ncluster.nodes = 4\n[[fault]]\nkind = \"churn\"\nevery_s = 3\ndown_s = 1\n\
                    [[fault]]\nkind = \"churn\"\nevery_s = 5\ndown_s = 0\nkinds = [\"stop\", \"partition\"]\n\
                    targets = [\"ps\", \"node:2\"]\nat_s = 0\nduration_s = 60\n";
        let s = Scenario::from_toml(text, "churn.toml", "churn").unwrap();
        assert_eq!(s.baseline.as_deref(), Some("calm"));
        let (a, b) = (&s.faults[0], &s.faults[1]);
        assert_eq!((a.churn_kinds(), a.targets.len(), a.at_s), (vec![FaultKind::Kill], 0, None));
        assert_eq!(b.churn_kinds(), [FaultKind::Stop, FaultKind::Partition]);
        // Written back, it loads back equal (the fuzz target checks the same of every input).
        let back = Scenario::from_toml(&toml::to_string(&s).unwrap(), "back.toml", "churn").unwrap();
        assert_eq!(back, s);
        let err = Scenario::from_toml("baseline = \"no faults\"\n", "b.toml", "b").unwrap_err().to_string();
        assert!(err.contains("b.toml") && err.contains("baseline \"no faults\": use letters"), "{err}");
    }

    #[test]
    fn every_scenario_of_the_library_loads_and_names_a_twin_it_has() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
        let mut names = Vec::new();
        let mut scenarios = Vec::new();
        for sub in [dir.clone(), dir.join("attacks")] {
            for e in std::fs::read_dir(&sub).unwrap() {
                let path = e.unwrap().path();
                if path.extension().is_some_and(|x| x == "toml") {
                    let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                    names.push(s.name.clone());
                    scenarios.push(s);
                }
            }
        }
        for s in &scenarios {
            if let Some(b) = &s.baseline {
                let twin =
                    scenarios.iter().find(|t| &t.name == b).unwrap_or_else(|| panic!("{}: no {b}", s.name));
                assert!(twin.faults.is_empty(), "{}: its twin {b} has faults", s.name);
                assert_eq!(twin.run, s.run, "{}: its twin {b} runs another workload", s.name);
            }
        }
    }

    #[test]
    fn bad_scenarios_are_refused_with_the_fault_and_reason() {
        let cases = [
            ("[[fault]]\nkind = \"kill\"\ntargets = [\"node:9\"]\nat_round = 1\n", "the run has 4 nodes"),
            ("[[fault]]\nkind = \"kill\"\ntargets = [\"node:1\"]\n", "give at_round or at_s"),
            ("[[fault]]\nkind = \"stop\"\ntargets = [\"node:1\"]\nat_s = 1\n", "needs duration_s"),
            ("[[fault]]\nkind = \"delay\"\ntargets = [\"node:1\"]\nat_s = 1\n", "needs delay_ms"),
            ("[[fault]]\nkind = \"bandwidth\"\ntargets = [\"node:1\"]\nat_s = 1\n", "needs rate_mbit"),
            (
                "[[fault]]\nkind = \"bandwidth\"\ntargets = [\"node:1\"]\nat_s = 1\nrate_mbit = 0.0\n",
                "needs rate_mbit",
            ),
            (
                "[[fault]]\nkind = \"delay\"\ntargets = [\"node:1\"]\nat_s = 1\ndelay_ms = 5\nrate_mbit = 5\n",
                "rate_mbit does not apply",
            ),
            (
                "[[fault]]\nkind = \"kill\"\ntargets = [\"node:1\"]\nat_s = 1\ndelay_ms = 3\n",
                "does not apply",
            ),
            ("[[fault]]\nkind = \"melt\"\ntargets = [\"node:1\"]\nat_s = 1\n", "unknown variant"),
            ("[[fault]]\nkind = \"kill\"\ntargets = [\"node:1\"]\nat_s = 1\ncolour = 1\n", "unknown field"),
            ("[run]\ncluster.nodes = 0\n", "cluster.nodes"),
            ("[[fault]]\nkind = \"byzantine\"\ntargets = [\"node:1\"]\nat_round = 0\n", "needs attack"),
            (
                "[[fault]]\nkind = \"byzantine\"\ntargets = [\"node:1\"]\nat_s = 1\nattack = \"nan\"\n",
                "give at_round",
            ),
            (
                "[[fault]]\nkind = \"byzantine\"\ntargets = [\"ps\"]\nat_round = 0\nattack = \"nan\"\n",
                "cannot be Byzantine",
            ),
            (
                "[[fault]]\nkind = \"byzantine\"\ntargets = [\"node:1\"]\nat_round = 0\nattack = \"melt\"\n",
                "unknown variant",
            ),
            (
                "[[fault]]\nkind = \"kill\"\ntargets = [\"node:1\"]\nat_round = 1\nattack = \"nan\"\n",
                "does not apply",
            ),
            ("target_accuracy = 2.0\n", "target_accuracy"),
            (
                "[[fault]]\nkind = \"straggle\"\ntargets = [\"node:1\"]\nat_s = 1\nstop_ms = 300\nperiod_ms = 200\n",
                "stop_ms < period_ms",
            ),
            ("[[fault]]\nkind = \"kill\"\nat_s = 1\n", "targets is empty"),
            ("[[fault]]\nkind = \"churn\"\ndown_s = 1\n", "needs every_s"),
            ("[[fault]]\nkind = \"churn\"\nevery_s = 0\ndown_s = 1\n", "every_s = 0: must be a positive"),
            ("[[fault]]\nkind = \"churn\"\nevery_s = -2\ndown_s = 1\n", "every_s = -2"),
            ("[[fault]]\nkind = \"churn\"\nevery_s = 3\n", "needs down_s"),
            (
                "[[fault]]\nkind = \"churn\"\nevery_s = 3\ndown_s = -1\n",
                "down_s = -1: must be a non-negative",
            ),
            ("[[fault]]\nkind = \"churn\"\nevery_s = 3\ndown_s = 1\nkinds = []\n", "kinds is empty"),
            (
                "[[fault]]\nkind = \"churn\"\nevery_s = 3\ndown_s = 1\nkinds = [\"kill\", \"delay\"]\n",
                "kinds: delay cannot churn",
            ),
            ("[[fault]]\nkind = \"churn\"\nevery_s = 3\ndown_s = 1\nkinds = [\"melt\"]\n", "unknown variant"),
            (
                "[[fault]]\nkind = \"churn\"\nevery_s = 3\ndown_s = 1\nat_round = 4\n",
                "at_round does not apply",
            ),
            (
                "[[fault]]\nkind = \"churn\"\nevery_s = 3\ndown_s = 1\nrestart_after_s = 1\n",
                "restart_after_s does not apply to churn",
            ),
            (
                "[[fault]]\nkind = \"churn\"\nevery_s = 3\ndown_s = 1\ntargets = [\"node:4\"]\n",
                "the run has 4 nodes",
            ),
            (
                "[[fault]]\nkind = \"kill\"\ntargets = [\"node:1\"]\nat_s = 1\nevery_s = 3\n",
                "every_s does not apply to kill",
            ),
            (
                "[[fault]]\nkind = \"stop\"\ntargets = [\"node:1\"]\nat_s = 1\nduration_s = 1\ndown_s = 1\n",
                "down_s does not apply to stop",
            ),
            (
                "[[fault]]\nkind = \"kill\"\ntargets = [\"node:1\"]\nat_s = 1\nkinds = [\"kill\"]\n",
                "kinds does not apply to kill",
            ),
        ];
        for (text, want) in cases {
            let text =
                format!("[run.p2p]\npeers = 4\n{text}").replace("[run.p2p]\npeers = 4\n[run]\n", "[run]\n");
            let err = Scenario::from_toml(&text, "bad.toml", "bad").unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("bad.toml"), "{text}: {err}");
        }
    }
}
