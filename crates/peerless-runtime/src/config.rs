//! The run configuration: one TOML file, every field documented and defaulted, validated.
//!
//! Unknown keys are refused by serde (`deny_unknown_fields`) with the key's name and position;
//! out-of-range values are refused by [`RunConfig::validate`] with the dotted key path, e.g.
//! `optimizer.lr = -0.1: must be positive and finite`. The effective config (defaults and
//! command-line overrides applied, seed included) is written into every run directory, and a
//! run can be replayed from it alone.

use std::path::{Path, PathBuf};

use peerless_core::optim::OptimizerConfig;
use peerless_ml::{Arch, Backend, DatasetName};
use serde::{Deserialize, Serialize};

pub use crate::config_error::ConfigError;

/// Shows configuration enums by the name their TOML uses (`p2p`, `in-store`, `async`).
macro_rules! display_as_toml_name {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let v = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
                f.write_str(v.as_str().ok_or(std::fmt::Error)?)
            }
        }
    )*};
}
display_as_toml_name!(
    TrainArch,
    Compute,
    Aggregation,
    PsModeName,
    SyncMode,
    CompressionName,
    QuorumName,
    TensorTransport
);

/// Parses a configuration enum from the name its TOML uses (`"p2p"`, `"in-store"`, `"async"`):
/// one spelling for files and flags, the error listing the names allowed.
pub fn parse_name<T: serde::de::DeserializeOwned>(name: &str) -> Result<T, String> {
    use serde::de::value::{Error, StrDeserializer};
    T::deserialize(StrDeserializer::<Error>::new(name)).map_err(|e| e.to_string())
}

fn invalid(key: &str, value: impl ToString, reason: &str) -> ConfigError {
    ConfigError::Invalid { key: key.into(), value: value.to_string(), reason: reason.into() }
}

/// How training is organised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainArch {
    /// One process, no functions: the reference.
    #[default]
    Local,
    /// Peer-to-peer serverless training.
    P2p,
    /// Serverless parameter server.
    Ps,
}

/// Everything a run needs. `peerless train --config run.toml` reads it; flags override it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run name; the run directory defaults to `runs/<name>/`. Empty: derived from the
    /// architecture, model, dataset and start time.
    pub name: String,
    /// The one seed every random choice derives from (init, data order, partitions, faults).
    pub seed: u64,
    /// Data.
    pub data: DataConfig,
    /// Model.
    pub model: ModelConfig,
    /// Training loop.
    pub train: TrainConfig,
    /// Optimizer; `kind = "sgd"` or `"adam"`.
    pub optimizer: OptimizerConfig,
    /// What both distributed architectures share: how many nodes compute gradients, where,
    /// and how a round's gradients are combined.
    pub cluster: ClusterConfig,
    /// What only peer-to-peer training uses (`train.arch = "p2p"`).
    pub p2p: P2pConfig,
    /// What only the parameter-server baseline uses (`train.arch = "ps"`).
    pub ps: PsSection,
    /// The function runtime gradients are computed in.
    pub function: crate::function::Config,
    /// The local launcher (`peerless train --arch p2p|ps`): how it ends a run.
    pub launcher: LauncherSection,
    /// Admission by certificate (written by `peerless run init`); empty: the nodes admit by
    /// peer-id allow-list.
    pub admission: AdmissionSection,
}

/// `[admission]`: the run's id and the public half of its admission key. A node of a run that
/// has them admits other nodes by certificate (see [`peerless_core::admission`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSection {
    /// The run's id, 32 hex characters. Empty: no admission by certificate.
    pub run_id: String,
    /// The run's public admission key, 64 hex characters.
    pub public_key: String,
}

impl AdmissionSection {
    /// The run id and key, or `None` when the section is empty.
    pub fn parsed(
        &self,
    ) -> Result<Option<(peerless_core::admission::RunId, peerless_core::admission::PublicKey)>, ConfigError>
    {
        if self.run_id.is_empty() && self.public_key.is_empty() {
            return Ok(None);
        }
        let run =
            self.run_id.parse().map_err(|e| invalid("admission.run_id", &self.run_id, &format!("{e}")))?;
        let key = self
            .public_key
            .parse()
            .map_err(|e| invalid("admission.public_key", &self.public_key, &format!("{e}")))?;
        Ok(Some((run, key)))
    }
}

/// `[launcher]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LauncherSection {
    /// Once a node holding the result (a P2P peer, the PS) has finished, a node still running
    /// this long afterwards (frozen, hung) is stopped: SIGTERM, then SIGKILL. Also how long
    /// Ctrl-C waits for the nodes to write their summaries before killing them. ms.
    pub grace_ms: u64,
    /// With functions on the local backend, run each peer's or worker's function instances in
    /// a function service of their own (`peerless function-service`), which the launcher
    /// starts before the nodes and kills at the run's end, so that a restarted node finds its
    /// instances warm. Off: the instances are children of the node and die with it.
    pub function_services: bool,
    /// Put each node (and its function service) on a host of its own: a network namespace
    /// with its own address, linked through a bridge, so that partitions and bandwidth caps
    /// are made on real links (`ip link`, `tc … tbf`) instead of the loopback fault proxy.
    /// Needs root and iproute2; `delay` faults need the proxy (this kernel has no `netem`).
    pub netns: bool,
}

impl Default for LauncherSection {
    fn default() -> Self {
        LauncherSection { grace_ms: 15_000, function_services: true, netns: false }
    }
}

/// `[ps]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PsSection {
    /// When the PS process dies, the launcher (standing in for the cloud) restarts it after
    /// this long, ms.
    pub restart_delay_ms: u64,
    /// A PS that keeps dying is restarted at most this many times in a row without a round
    /// done in between; then the run ends with the PS's last error.
    pub max_restarts: u32,
    /// `sync`: a round aggregates one gradient per worker, like P2P. `async`: each gradient
    /// is applied on arrival as the next model version; `train.rounds`/`epochs` then count
    /// `workers` updates per round, so both modes train on the same number of samples.
    pub mode: PsModeName,
    /// Asynchronous mode: gradients computed on a version more than this many updates older
    /// than the PS's are dropped. With `n` workers the usual staleness is about `n − 1`.
    pub max_staleness: u64,
}

/// `ps.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PsModeName {
    /// Synchronous rounds.
    #[default]
    Sync,
    /// Asynchronous updates with a staleness bound.
    Async,
}

impl Default for PsSection {
    fn default() -> Self {
        PsSection { restart_delay_ms: 1_000, max_restarts: 3, mode: PsModeName::Sync, max_staleness: 16 }
    }
}

impl PsSection {
    /// The core machine's mode.
    pub fn mode(&self) -> peerless_core::ps::PsMode {
        match self.mode {
            PsModeName::Sync => peerless_core::ps::PsMode::Sync,
            PsModeName::Async => peerless_core::ps::PsMode::Async { max_staleness: self.max_staleness },
        }
    }

    /// Model versions per synchronous round: 1, or one per worker in asynchronous mode.
    pub fn versions_per_round(&self, workers: u32) -> u64 {
        match self.mode {
            PsModeName::Sync => 1,
            PsModeName::Async => u64::from(workers),
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: String::new(),
            seed: 42,
            data: DataConfig::default(),
            model: ModelConfig::default(),
            train: TrainConfig::default(),
            optimizer: OptimizerConfig::sgd(0.02),
            cluster: ClusterConfig::default(),
            p2p: P2pConfig::default(),
            ps: PsSection::default(),
            function: crate::function::Config::default(),
            launcher: LauncherSection::default(),
            admission: AdmissionSection::default(),
        }
    }
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `digits` (embedded, no set-up), `mnist` or `fashion-mnist`.
    pub dataset: DatasetName,
    /// Directory holding `<dataset>/` IDX files. Empty: `$PEERLESS_DATA_DIR`, else the
    /// user's data directory (`~/.local/share/peerless`).
    pub dir: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { dataset: DatasetName::Digits, dir: PathBuf::new() }
    }
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `logreg`, `mlp` or `lenet`.
    pub arch: Arch,
    /// MLP hidden widths (default 256, 128: the 784-256-128-10 MLP on MNIST).
    pub hidden: Vec<usize>,
    /// burn CPU backend: `auto` (flex, measured fastest), `ndarray` (on OpenBLAS in a
    /// `--features openblas` build) or `flex`.
    pub backend: Backend,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { arch: Arch::Mlp, hidden: vec![256, 128], backend: Backend::default() }
    }
}

/// `[train]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// `local`, `p2p` or `ps`.
    pub arch: TrainArch,
    /// Passes over the training set (ignored when `rounds` > 0).
    pub epochs: u32,
    /// Optimizer steps to run; 0 means `epochs` full passes.
    pub rounds: u64,
    /// Mini-batch size (per step).
    pub batch_size: usize,
    /// Evaluate on the test split every this many rounds; 0 means once per epoch.
    pub eval_every: u64,
    /// Write a checkpoint every this many rounds (and always at the end); 0 means only at the end.
    pub checkpoint_every: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            arch: TrainArch::Local,
            epochs: 3,
            rounds: 0,
            batch_size: 64,
            eval_every: 0,
            checkpoint_every: 200,
        }
    }
}

/// Where a peer's gradients are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// Gradient function invocations (serverless).
    #[default]
    Functions,
    /// In the peer process (the serverful baseline).
    Local,
}

/// Where a node's k gradients of a round are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// In the store, as they land (SPIRT's in-database operation): the node reads one sum.
    #[default]
    InStore,
    /// Each function stores its gradient; the node fetches all k and sums them itself
    /// (the baseline in-store aggregation is measured against).
    Fetch,
}

/// `[cluster]`: what P2P and the PS baseline share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Nodes that compute gradients: the peers (P2P), or the workers (PS; the PS is one more).
    pub nodes: u32,
    /// Gradient functions each node invokes per round, one mini-batch of `train.batch_size`
    /// each; a round's global batch is `nodes × functions_per_node × batch_size`.
    pub functions_per_node: u32,
    /// `functions` (serverless) or `local` (gradients in the node's process).
    pub compute: Compute,
    /// Functions: `in-store` (gradients summed where they land) or `fetch` (the node fetches
    /// each and sums them).
    pub aggregation: Aggregation,
    /// Shortest round deadline, ms.
    pub deadline_floor_ms: u64,
    /// Longest round deadline, ms.
    pub deadline_ceiling_ms: u64,
    /// Deadline = this × the smoothed observed wait, within floor and ceiling.
    pub deadline_factor: f64,
    /// How long nodes wait for each other at start (and a joiner for a live peer), ms.
    pub start_timeout_ms: u64,
    /// Aggregation rule: `"mean"` (default), `"median"`, `"trimmed-mean"`, `"krum"`,
    /// `"multi-krum"`, `"bulyan"`, `"centered-clipping"`, or a table with the rule's parameters,
    /// e.g. `{ rule = "krum", f = 1 }` (see [`peerless_core::aggregate::AggregatorConfig`]). Its
    /// precondition is checked against `nodes`.
    pub aggregator: peerless_core::aggregate::AggregatorConfig,
    /// The password of the nodes' embedded stores (identities no longer derive from it: each
    /// node has its own key, admitted by certificate). Empty: the launcher draws one at random
    /// (and writes it into the node files).
    pub secret: String,
    /// The store functions read parameters from and accumulate gradients into: `embedded`
    /// (served by each node), or a `redis://` URL of a Redis server.
    pub store: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nodes: 4,
            functions_per_node: 4,
            compute: Compute::Functions,
            aggregation: Aggregation::InStore,
            deadline_floor_ms: 1_000,
            deadline_ceiling_ms: 10_000,
            deadline_factor: 4.0,
            start_timeout_ms: 20_000,
            aggregator: peerless_core::aggregate::AggregatorConfig::Mean,
            secret: String::new(),
            store: "embedded".into(),
        }
    }
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.nodes) {
            return Err(invalid("cluster.nodes", self.nodes, "must be in 1..=64"));
        }
        if !(1..=64).contains(&self.functions_per_node) {
            return Err(invalid("cluster.functions_per_node", self.functions_per_node, "must be in 1..=64"));
        }
        if self.deadline_floor_ms == 0 {
            return Err(invalid("cluster.deadline_floor_ms", 0, "must be positive"));
        }
        if self.deadline_ceiling_ms < self.deadline_floor_ms {
            return Err(invalid(
                "cluster.deadline_ceiling_ms",
                self.deadline_ceiling_ms,
                "must be at least cluster.deadline_floor_ms",
            ));
        }
        if !(self.deadline_factor.is_finite() && self.deadline_factor >= 1.0) {
            return Err(invalid("cluster.deadline_factor", self.deadline_factor, "must be finite and ≥ 1"));
        }
        // A round aggregates one gradient per peer (P2P) or per worker (PS): `nodes` of them.
        self.aggregator.validate(self.nodes as usize).map_err(|e| {
            invalid("cluster.aggregator", self.aggregator, &format!("{e} (n = cluster.nodes)"))
        })?;
        if self.store != "embedded" && !self.store.starts_with("redis://") {
            return Err(invalid("cluster.store", &self.store, "must be \"embedded\" or a redis:// URL"));
        }
        Ok(())
    }
}

/// `[p2p]`: what only peer-to-peer training uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct P2pConfig {
    /// Survivors take over the shards of peers that left, so their data is still trained on.
    pub takeover: bool,
    /// A connected peer silent this long (frozen, or cut off with its connection up) is
    /// detected by heartbeats and not waited for, ms; the round deadline stays for stragglers.
    pub detection_ms: u64,
    /// How often nodes synchronise (P2P and the synchronous PS alike): `every-step` exchanges
    /// gradients every optimizer step; `diloco` takes `inner_steps` local steps between
    /// exchanges of parameter deltas.
    pub sync: SyncMode,
    /// `diloco`: local optimizer steps (the `optimizer` section, its state fresh every outer
    /// round) each function takes per round, one mini-batch each.
    pub inner_steps: u32,
    /// `diloco`: learning rate of the outer optimizer (SGD with Nesterov momentum) that applies
    /// the aggregated parameter delta (the pseudo-gradient).
    pub outer_lr: f64,
    /// `diloco`: Nesterov momentum of the outer optimizer, in `[0, 1)`.
    pub outer_momentum: f64,
    /// What a node sends of its gradient (or DiLoCo delta), P2P and PS alike: `none`
    /// (dense), `int8` (one byte an element, a scale per block), `int4` (half a byte an
    /// element, a scale per block) or `topk` (the `topk_fraction`
    /// largest); what is left out is kept per node and added to the next one (error feedback).
    pub compression: CompressionName,
    /// `topk`: the share of elements sent, in `(0, 1]`.
    pub topk_fraction: f64,
    /// Which side of a partition trains: `majority` (the side holding a majority of the last
    /// rounds' contributors, half with the lowest index; the others wait and then adopt its
    /// state) or `none` (every side trains on; a cut-off minority's work is lost at the heal).
    pub quorum: QuorumName,
    /// How peers send each other their gradients: `libp2p` (the encrypted, authenticated
    /// connection everything else uses) or `tcp` (a plain TCP connection per direction and
    /// pair, opened with a token handed out over libp2p; several times cheaper, unencrypted
    /// like PyTorch's gloo: for networks you trust).
    pub tensor_transport: TensorTransport,
}

/// `p2p.tensor_transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TensorTransport {
    /// On the peers' libp2p connection (TCP + Noise + Yamux).
    #[default]
    Libp2p,
    /// On a plain TCP lane per direction and pair.
    Tcp,
}

/// `p2p.quorum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuorumName {
    /// A majority of the last two rounds' contributors.
    #[default]
    Majority,
    /// No quorum.
    None,
}

impl From<QuorumName> for peerless_core::p2p::Quorum {
    fn from(q: QuorumName) -> Self {
        match q {
            QuorumName::Majority => peerless_core::p2p::Quorum::Majority,
            QuorumName::None => peerless_core::p2p::Quorum::None,
        }
    }
}

/// `p2p.compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompressionName {
    /// Dense `f32`.
    #[default]
    None,
    /// int8 with a scale per block of 1024.
    Int8,
    /// int4 (`−7..=7`, two to a byte) with a scale per block of 1024.
    Int4,
    /// Top-k by magnitude.
    Topk,
}

/// `p2p.sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// One optimizer step per round on the round's aggregated gradient.
    #[default]
    EveryStep,
    /// DiLoCo: `inner_steps` local steps per round, then the aggregated parameter delta is
    /// applied by the outer optimizer.
    Diloco,
}

impl Default for P2pConfig {
    fn default() -> Self {
        P2pConfig {
            takeover: true,
            detection_ms: 250,
            sync: SyncMode::EveryStep,
            inner_steps: 50,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            compression: CompressionName::None,
            topk_fraction: 0.01,
            quorum: QuorumName::Majority,
            tensor_transport: TensorTransport::Libp2p,
        }
    }
}

impl P2pConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(5..=600_000).contains(&self.detection_ms) {
            return Err(invalid("p2p.detection_ms", self.detection_ms, "must be in 5..=600000"));
        }
        if !(1..=100_000).contains(&self.inner_steps) {
            return Err(invalid("p2p.inner_steps", self.inner_steps, "must be in 1..=100000"));
        }
        if !(self.outer_lr.is_finite() && self.outer_lr > 0.0) {
            return Err(invalid("p2p.outer_lr", self.outer_lr, "must be positive and finite"));
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return Err(invalid("p2p.outer_momentum", self.outer_momentum, "must be in [0, 1)"));
        }
        if !(self.topk_fraction > 0.0 && self.topk_fraction <= 1.0) {
            return Err(invalid("p2p.topk_fraction", self.topk_fraction, "must be in (0, 1]"));
        }
        Ok(())
    }

    /// The compression nodes apply to what they send.
    pub fn compression(&self) -> peerless_core::compress::Compression {
        use peerless_core::compress::Compression;
        match self.compression {
            CompressionName::None => Compression::None,
            CompressionName::Int8 => Compression::Int8,
            CompressionName::Int4 => Compression::Int4,
            CompressionName::Topk => Compression::TopK { fraction: self.topk_fraction },
        }
    }

    /// Local steps per round: `inner_steps` under DiLoCo, else 1.
    pub fn steps_per_round(&self) -> u32 {
        match self.sync {
            SyncMode::EveryStep => 1,
            SyncMode::Diloco => self.inner_steps,
        }
    }

    /// What a node's replica applies a round's aggregate with: the outer optimizer under
    /// DiLoCo, else `optimizer` (the run's).
    pub fn update_optimizer(&self, optimizer: &OptimizerConfig) -> OptimizerConfig {
        match self.sync {
            SyncMode::EveryStep => optimizer.clone(),
            SyncMode::Diloco => OptimizerConfig::Sgd {
                lr: self.outer_lr,
                momentum: self.outer_momentum,
                weight_decay: 0.0,
                nesterov: self.outer_momentum > 0.0,
            },
        }
    }
}

/// The keys `[cluster]` took over from `[p2p]` (before 0.2): old name, new name.
const MOVED_FROM_P2P: [(&str, &str); 11] = [
    ("peers", "nodes"),
    ("functions_per_peer", "functions_per_node"),
    ("compute", "compute"),
    ("aggregation", "aggregation"),
    ("deadline_floor_ms", "deadline_floor_ms"),
    ("deadline_ceiling_ms", "deadline_ceiling_ms"),
    ("deadline_factor", "deadline_factor"),
    ("start_timeout_ms", "start_timeout_ms"),
    ("aggregator", "aggregator"),
    ("secret", "secret"),
    ("store", "store"),
];

/// Moves the keys of `run` (a run configuration as a TOML table) that are still under `[p2p]`
/// to `[cluster]`, under their new names; returns one warning per key moved. A key set under
/// both names is an error naming both.
pub fn move_legacy_keys(run: &mut toml::Table) -> Result<Vec<String>, ConfigError> {
    let Some(toml::Value::Table(p2p)) = run.get_mut("p2p") else { return Ok(Vec::new()) };
    let moved: Vec<(&str, &str, toml::Value)> =
        MOVED_FROM_P2P.iter().filter_map(|&(old, new)| p2p.remove(old).map(|v| (old, new, v))).collect();
    if moved.is_empty() {
        return Ok(Vec::new());
    }
    let cluster = run.entry("cluster").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(cluster) = cluster else {
        return Err(invalid("cluster", "?", "must be a table"));
    };
    let mut warnings = Vec::new();
    for (old, new, v) in moved {
        if cluster.contains_key(new) {
            return Err(invalid(
                &format!("p2p.{old}"),
                &v,
                &format!("is also set as cluster.{new}: keep one"),
            ));
        }
        warnings.push(format!("p2p.{old} is now cluster.{new}; the old name is read until the next release"));
        cluster.insert(new.to_owned(), v);
    }
    Ok(warnings)
}

impl RunConfig {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors. Keys still under their
    /// names before 0.2 are read, each with a warning in the log.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parse = |e: toml::de::Error| ConfigError::Parse { origin: origin.into(), message: e.to_string() };
        let mut table: toml::Table = toml::from_str(text).map_err(parse)?;
        let warnings = move_legacy_keys(&mut table)?;
        // Without old keys, parse the text itself: its errors then point at a line.
        let cfg: RunConfig =
            if warnings.is_empty() { toml::from_str(text) } else { table.try_into() }.map_err(parse)?;
        for w in warnings {
            tracing::warn!(config = origin, "{w}");
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The effective config as TOML (what goes into the run directory).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("invariant: RunConfig always serializes")
    }

    /// Checks every value's range; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.train;
        if t.batch_size == 0 || t.batch_size > 1 << 20 {
            return Err(invalid("train.batch_size", t.batch_size, "must be in 1..=1048576"));
        }
        if t.epochs == 0 && t.rounds == 0 {
            return Err(invalid("train.epochs", t.epochs, "must be positive when train.rounds = 0"));
        }
        let widths = &self.model.hidden;
        if self.model.arch == Arch::Mlp
            && (widths.is_empty() || widths.iter().any(|&w| w == 0 || w > 1 << 16))
        {
            return Err(invalid(
                "model.hidden",
                format!("{widths:?}"),
                "must list one or more widths in 1..=65536",
            ));
        }
        self.cluster.validate()?;
        self.p2p.validate()?;
        self.admission.parsed()?;
        if self.p2p.sync == SyncMode::Diloco
            && self.train.arch == TrainArch::Ps
            && self.ps.mode == PsModeName::Async
        {
            return Err(invalid(
                "p2p.sync",
                "diloco",
                "needs ps.mode = \"sync\" (outer rounds are synchronous)",
            ));
        }
        self.function.validate()?;
        self.optimizer.validate().map_err(|e| match e {
            peerless_core::optim::OptimError::InvalidConfig { key, value, reason } => ConfigError::Invalid {
                key: format!("optimizer.{}", key.trim_start_matches("optimizer.")),
                value,
                reason,
            },
            other => invalid("optimizer", "?", &other.to_string()),
        })?;
        self.check_integers_fit_toml()
    }

    /// Every integer must fit TOML's (a signed 64-bit one), or the effective config written
    /// into the run directory would not load back: e.g. `--seed 18446744073709551615`.
    fn check_integers_fit_toml(&self) -> Result<(), ConfigError> {
        let text = self.to_toml();
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = format!("{}.", name.trim_matches('['));
                continue;
            }
            let Some((key, value)) = line.split_once(" = ") else { continue };
            let too_large = value
                .split(|c: char| !c.is_ascii_digit())
                .any(|n| !n.is_empty() && n.parse::<i64>().is_err() && !value.starts_with('"'));
            if too_large {
                let reason = format!("must be at most {} (the largest TOML integer)", i64::MAX);
                return Err(invalid(&format!("{section}{key}"), value, &reason));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_parse_from_their_toml_names() {
        assert_eq!(parse_name::<TrainArch>("p2p"), Ok(TrainArch::P2p));
        assert_eq!(parse_name::<Aggregation>("in-store"), Ok(Aggregation::InStore));
        assert_eq!(parse_name::<PsModeName>("async"), Ok(PsModeName::Async));
        assert_eq!(parse_name::<Compute>("local"), Ok(Compute::Local));
        for a in [TrainArch::Local, TrainArch::P2p, TrainArch::Ps] {
            assert_eq!(parse_name::<TrainArch>(&a.to_string()), Ok(a));
        }
        assert_eq!(Aggregation::InStore.to_string(), "in-store");
        let err = parse_name::<TrainArch>("mesh").unwrap_err();
        assert!(err.contains("mesh") && err.contains("p2p"), "{err}");
    }

    #[test]
    fn diloco_keys_load_validate_and_choose_the_outer_optimizer() {
        let cfg = RunConfig::from_toml("[p2p]\nsync = \"diloco\"\ninner_steps = 20\nouter_lr = 0.5\n", "x")
            .unwrap();
        assert_eq!((cfg.p2p.sync, cfg.p2p.steps_per_round()), (SyncMode::Diloco, 20));
        assert_eq!(
            cfg.p2p.update_optimizer(&cfg.optimizer),
            OptimizerConfig::Sgd { lr: 0.5, momentum: 0.9, weight_decay: 0.0, nesterov: true }
        );
        assert_eq!(RunConfig::default().p2p.update_optimizer(&cfg.optimizer), cfg.optimizer);
        assert_eq!(RunConfig::default().p2p.steps_per_round(), 1);
        for (text, key) in [
            ("inner_steps = 0", "p2p.inner_steps"),
            ("outer_lr = -1.0", "p2p.outer_lr"),
            ("outer_momentum = 1.0", "p2p.outer_momentum"),
        ] {
            let err = RunConfig::from_toml(&format!("[p2p]\nsync = \"diloco\"\n{text}\n"), "x").unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
        assert!(RunConfig::from_toml("[p2p]\nsync = \"local-sgd\"\n", "x").is_err());
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let cfg = RunConfig::default();
        let back = RunConfig::from_toml(&cfg.to_toml(), "test").unwrap();
        assert_eq!(cfg, back);
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = RunConfig::from_toml("[train]\nepochz = 3\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("epochz") && err.contains("x.toml"), "{err}");
        let err = RunConfig::from_toml("[optimizer]\nkind = \"sgd\"\nmomentun = 0.9\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("momentun"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        let err =
            RunConfig::from_toml("[optimizer]\nkind = \"sgd\"\nlr = -0.1\n", "x").unwrap_err().to_string();
        assert!(err.starts_with("optimizer.lr = -0.1"), "{err}");
        let err = RunConfig::from_toml("[train]\nbatch_size = 0\n", "x").unwrap_err().to_string();
        assert!(err.starts_with("train.batch_size = 0"), "{err}");
        let err = RunConfig::from_toml("[model]\narch = \"transformer\"\n", "x").unwrap_err().to_string();
        assert!(err.contains("transformer"), "{err}");
    }

    #[test]
    fn aggregator_precondition_is_checked_against_nodes() {
        use peerless_core::aggregate::AggregatorConfig;
        let err = RunConfig::from_toml("[cluster]\nnodes = 4\naggregator = \"krum\"\n", "x")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "cluster.aggregator = krum (f = 1): krum needs n ≥ 2f+3 = 5 inputs for f = 1, the run has 4 (n = cluster.nodes)"
        );
        let cfg = RunConfig::from_toml("[cluster]\nnodes = 5\naggregator = \"krum\"\n", "x").unwrap();
        assert_eq!(cfg.cluster.aggregator, AggregatorConfig::Krum { f: 1 });
        let err =
            RunConfig::from_toml("[cluster]\nnodes = 9\naggregator = { rule = \"bulyan\", f = 2 }\n", "x")
                .unwrap_err()
                .to_string();
        assert!(err.contains("bulyan needs n ≥ 4f+3 = 11"), "{err}");
        let err = RunConfig::from_toml("[cluster]\naggregator = { rule = \"krum\", byzantine = 1 }\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("byzantine"), "{err}");
        assert_eq!(RunConfig::default().cluster.aggregator, AggregatorConfig::Mean);
    }

    #[test]
    fn aggregator_tables_round_trip_through_the_effective_config() {
        let text = "[cluster]\nnodes = 7\naggregator = { rule = \"multi-krum\", f = 2, m = 3 }\nstore = \"embedded\"\n";
        let cfg = RunConfig::from_toml(text, "x").unwrap();
        let back = RunConfig::from_toml(&cfg.to_toml(), "effective").unwrap();
        assert_eq!(cfg, back);
        let text = "[cluster]\nnodes = 5\n[cluster.aggregator]\nrule = \"centered-clipping\"\ntau = 0.5\n";
        let cfg = RunConfig::from_toml(text, "x").unwrap();
        assert_eq!(cfg, RunConfig::from_toml(&cfg.to_toml(), "effective").unwrap());
    }

    /// Found by `fuzz/fuzz_targets/config.rs` (issue #20): an `eval_every` above TOML's
    /// largest integer was accepted, and the effective config then did not load back.
    #[test]
    fn integers_beyond_toml_s_range_are_refused_naming_the_key() {
        let mut cfg = RunConfig::default();
        cfg.train.eval_every = 18_446_743_409_740_954_912;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("train.eval_every = 18446743409740954912: must be at most"), "{err}");
        let cfg = RunConfig { seed: u64::MAX, ..RunConfig::default() };
        assert!(cfg.validate().unwrap_err().to_string().starts_with("seed = "));
        let cfg = RunConfig { seed: i64::MAX as u64, ..RunConfig::default() };
        cfg.validate().unwrap();
        assert_eq!(RunConfig::from_toml(&cfg.to_toml(), "x").unwrap(), cfg);
        let mut cfg = RunConfig::default();
        cfg.model.hidden = vec![7_021_802_706_024_166_491];
        assert!(cfg.validate().unwrap_err().to_string().starts_with("model.hidden"));
    }

    #[test]
    fn keys_under_their_old_p2p_names_are_read_as_cluster_keys() {
        let cfg = RunConfig::from_toml("[p2p]\npeers = 3\nfunctions_per_peer = 2\ntakeover = false\n", "x")
            .unwrap();
        assert_eq!((cfg.cluster.nodes, cfg.cluster.functions_per_node, cfg.p2p.takeover), (3, 2, false));
        let cfg = RunConfig::from_toml("p2p.compute = \"local\"\ncluster.nodes = 2\n", "x").unwrap();
        assert_eq!((cfg.cluster.compute, cfg.cluster.nodes), (Compute::Local, 2));
        let err =
            RunConfig::from_toml("[p2p]\npeers = 3\n[cluster]\nnodes = 4\n", "x").unwrap_err().to_string();
        assert!(err.contains("p2p.peers") && err.contains("cluster.nodes"), "{err}");
        // The new names parse from the text itself, so an error still points at its line.
        let err = RunConfig::from_toml("[cluster]\nnodes = 3\nnodez = 4\n", "x").unwrap_err().to_string();
        assert!(err.contains("nodez") && err.contains("line 3"), "{err}");
    }
}
