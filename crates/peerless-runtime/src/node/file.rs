//! A node's own files: the node file the launcher writes (the run's configuration and the
//! node's settings) and the summary the node writes at the end. Shared by peers, the PS and
//! workers.

use std::path::{Path, PathBuf};

use peerless_core::admission::MAX_PEERS;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, RunConfig};

/// A node's file (`peer.toml`, `ps.toml`, `worker.toml`): its configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// The node's own settings (`[node]`; `[peer]` is read as well, the name before 0.2).
    #[serde(alias = "peer")]
    pub node: NodeSection,
    /// The run's configuration (shared by all peers).
    pub run: RunConfig,
}

/// `[node]`: what is this node's own (the rest of the file is the run's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// This node's index in the run (0-based; the PS's is after the workers').
    pub index: u32,
    /// Listen address (multiaddr), e.g. `/ip4/127.0.0.1/tcp/40001`.
    pub listen: String,
    /// Addresses of the nodes this one dials (a peer: the other peers; a worker: the PS),
    /// dialled at start and redialled while unreachable.
    pub bootstrap: Vec<String>,
    /// Peer ids admitted, in index order (admission by allow-list). Empty: admission by
    /// certificate, which needs `run.admission` and `certificate`.
    pub allow: Vec<String>,
    /// The node's directory (checkpoint, metrics, events, summary).
    pub dir: PathBuf,
    /// Where other nodes can dial this one (multiaddr), as it tells them when it presents its
    /// certificate. Empty: its first listening address.
    pub external: String,
    /// Tell the members this node admits where the others can be dialled (its own address in
    /// its `Admit`, the others' in `Members`), so one bootstrap address is enough. The launcher
    /// turns it off: it wires every pair itself, through its fault proxy when it injects
    /// network faults, which dialling told addresses would bypass.
    pub share_addresses: bool,
    /// The node's identity (`peerless keygen`). Empty: `identity.key` in `dir`, generated
    /// (random) on first start.
    pub identity: PathBuf,
    /// The node's admission certificate (`peerless admit`). Empty: none (allow-list only).
    pub certificate: PathBuf,
    /// Join a run in progress: fetch the state from a live peer (or resume the own checkpoint).
    pub join: bool,
    /// Print JSON progress lines on stdout, at most one every 50 ms (for the launcher).
    pub progress: bool,
    /// Threads of the node's runtime (its loop, tensor lane, libp2p and embedded store).
    /// 0: one per CPU, at most 2. The launcher gives each node its share of this machine's
    /// CPUs, so 1 when it runs as many nodes as there are CPUs: a second thread then only
    /// adds wake-ups between the two (4 peers on 2 CPUs: a round 4 % faster with one).
    pub threads: usize,
    /// Stop after this many rounds as if killed (tests).
    pub halt_at_round: Option<u64>,
    /// Misbehave: a Byzantine node for experiments (written by the launcher for a scenario's
    /// `byzantine` fault), e.g. `attack = { kind = "sign-flip", from_round = 0 }`.
    pub attack: Option<peerless_core::attack::Attack>,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            index: 0,
            listen: "/ip4/127.0.0.1/tcp/0".into(),
            bootstrap: Vec::new(),
            allow: Vec::new(),
            dir: PathBuf::from("peer"),
            external: String::new(),
            share_addresses: true,
            identity: PathBuf::new(),
            certificate: PathBuf::new(),
            join: false,
            progress: false,
            threads: 0,
            halt_at_round: None,
            attack: None,
        }
    }
}

impl NodeSection {
    /// The threads of the node's runtime: `threads`, or for 0 one per CPU, at most 2.
    pub fn runtime_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(2)),
            n => n,
        }
    }
}

impl NodeFile {
    /// Reads and validates a node file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let f: NodeFile = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { origin: path.display().to_string(), message: e.to_string() })?;
        f.validate()?;
        Ok(f)
    }

    /// Checks the run's configuration and the node's index against it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.run.validate()?;
        // Index `cluster.nodes` is the parameter server of a PS run; P2P peers that join a
        // running run take the indices above it.
        if self.node.index >= MAX_PEERS {
            return Err(ConfigError::Invalid {
                key: "node.index".into(),
                value: self.node.index.to_string(),
                reason: format!("must be below {MAX_PEERS}"),
            });
        }
        Ok(())
    }

    /// The file as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("invariant: NodeFile always serializes")
    }
}

/// What a node (peer, PS or worker) reports at the end (its `summary.json`). Fields added
/// since the first release read as their default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeSummary {
    /// Peer index.
    pub peer: u32,
    /// libp2p peer id.
    pub peer_id: String,
    /// Whether every planned round ran.
    pub completed: bool,
    /// Training stopped because the model diverged (every gradient non-finite).
    pub diverged: bool,
    /// Rounds done (model version).
    pub rounds: u64,
    /// Test accuracy of the final model.
    pub test_accuracy: f32,
    /// Test loss of the final model (JSON `null` when not finite: a diverged model's).
    #[serde(deserialize_with = "null_as_nan")]
    pub test_loss: f32,
    /// SHA-256 of the final parameters.
    pub param_digest: String,
    /// Wall time in training, s.
    pub wall_time_s: f64,
    /// Samples this peer computed gradients on.
    pub samples: u64,
    /// Function invocation attempts.
    pub invocations: u64,
    /// Cold starts.
    pub cold_starts: u64,
    /// Retries.
    pub retries: u64,
    /// Function charges, pico-dollars.
    pub function_cost_pico: u64,
    /// This peer's node time, pico-dollars.
    pub node_cost_pico: u64,
    /// Bytes received from peers.
    pub bytes_in: u64,
    /// Bytes sent to peers.
    pub bytes_out: u64,
    /// Connections refused (peer ids off the allow-list).
    pub refused: u64,
    /// Peak resident memory of this node's process, MB (`VmHWM`; 0 where the kernel does
    /// not say). Its function instances are in `function_metrics.json`.
    pub max_memory_mb: u64,
    /// Lambda's "Max Memory Used" of this node's function instances: the largest of its
    /// invocations, MB (0 without invocations).
    pub function_max_memory_mb: u64,
    /// The memory size its functions were configured with (`function.memory_mb`), MB.
    pub function_memory_mb: u64,
}

/// Reads a float that JSON wrote as `null` (serde_json writes NaN and ±∞ so) as NaN.
pub(crate) fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}
