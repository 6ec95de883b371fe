//! One node of a run (a P2P peer, the parameter server or a PS worker) and what every node
//! shares: its set-up, its event loop, its model replica, its gradient work, its files.
//!
//! A node is a [`driver::Node`] (the set-up every role shares: identity, network, data,
//! model, files) driven by [`driver::drive`] with a [`driver::Role`]: the protocol machine of
//! `peerless_core` and the small type that carries out its actions (the P2P peer in `p2p`,
//! the PS and the worker in `ps`).
//!
//! - [`driver`] — the node set-up and the one event loop: waits for the network, the gradient
//!   work, the evaluations, the timer and Ctrl-C, and hands each to the role.
//! - [`transport`] — libp2p (TCP + Noise + Yamux), random identities kept in files, the
//!   allow-list, one request-response protocol carrying wire frames.
//! - [`admit`] — admission by certificate: who presented a valid certificate, who accepted
//!   this node's.
//! - [`sampler`] — which samples a node's functions train on in each round, and take-over.
//! - [`net`] — the node's network: the swarm with the run's identities, bytes moved, its
//!   events sorted into what a role acts on.
//! - [`replica`] — the model replica of a peer or the PS: parameters, optimizer, aggregation,
//!   checkpoints, evaluation.
//! - [`work`] — the gradient work of a peer or worker: functions or in-process, retries, the
//!   outgoing message (through the attacker of a Byzantine node).
//! - [`files`], [`row`], [`events`], [`file`] — `metrics.csv` and `events.jsonl`; the typed
//!   metrics row and events; the node file and `summary.json`.

use std::path::{Path, PathBuf};

use peerless_core::protocol::PeerIdx;
use serde::{Deserialize, Serialize};

mod admit;
pub(crate) mod driver;
mod events;
mod file;
mod files;
mod lane;
pub(crate) mod net;
pub(crate) mod replica;
mod row;
pub mod sampler;
pub mod transport;
pub(crate) mod work;

pub use events::NodeEvent;
pub(crate) use file::null_as_nan;
pub use file::{NodeFile, NodeSection, NodeSummary};
pub(crate) use files::{Files, unix_ms};
pub use row::NodeRow;

/// Why a node (peer, PS or worker) stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad configuration or identity.
    #[error("{0}")]
    Config(String),
    /// Model or data.
    #[error(transparent)]
    Model(#[from] peerless_ml::ModelError),
    /// Dataset.
    #[error(transparent)]
    Data(#[from] peerless_ml::data::DataError),
    /// Files in the peer directory.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The network could not be set up.
    #[error("network: {0}")]
    Network(String),
    /// Gradient work failed beyond retries.
    #[error("computing the gradient of round {round}: {reason}")]
    Compute {
        /// Round.
        round: u64,
        /// Cause.
        reason: String,
    },
    /// Every gradient of the round was non-finite: the model diverged (e.g. under an attack
    /// the aggregation rule does not stop). Not retried: the same parameters give the same.
    #[error("the model diverged at round {round}: every gradient was non-finite ({reason})")]
    Diverged {
        /// Round.
        round: u64,
        /// The functions' error.
        reason: String,
    },
    /// Checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Optimizer.
    #[error(transparent)]
    Optim(#[from] peerless_core::optim::OptimError),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io { path: path.to_owned(), source }
}

/// Asks the kernel to SIGKILL this process when the thread that started it exits, so nodes a
/// launcher started never outlive it (Linux `PR_SET_PDEATHSIG`). SIGKILL, not SIGTERM: a
/// frozen (SIGSTOPped) node would never act on a SIGTERM.
pub fn die_with_parent() -> std::io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    Ok(())
}

/// What a launched node tells its launcher on stdout, one JSON object a line. The launcher
/// reads these to show progress, and to tell bad input (a node that fails before it is ready)
/// from a crash during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NodeLine {
    /// Set-up is done (data loaded, listening): from now on a failure is a crash.
    Ready {
        /// The node's index.
        ready: PeerIdx,
    },
    /// The node is exiting with this error.
    Failed {
        /// The node's index (`None` when it failed before reading its configuration).
        failed: Option<PeerIdx>,
        /// The error, as the node would print it.
        error: String,
    },
    /// A round done.
    Progress(Progress),
    /// Something the user should see in the launcher's output (a peer without a quorum).
    Notice {
        /// The node's index.
        notice: PeerIdx,
        /// What happened.
        says: String,
    },
}

/// One round done by a node (`NodeLine::Progress`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The node's index.
    #[serde(alias = "peer")]
    pub node: PeerIdx,
    /// Rounds (PS: model versions) done.
    pub round: u64,
    /// Rounds (versions) in the run.
    pub total: u64,
    /// The round's training loss.
    pub loss: Option<f32>,
    /// Nodes in the round's view.
    pub view: usize,
    /// Test accuracy, when the round was evaluated.
    #[serde(default)]
    pub test_accuracy: Option<f32>,
}

impl NodeLine {
    /// Prints the line on stdout, where the launcher reads it.
    pub fn print(&self) {
        println!("{}", serde_json::to_string(self).expect("invariant: NodeLine serializes"));
    }

    /// Parses one stdout line; `None` for anything else a node printed.
    pub fn parse(line: &str) -> Option<NodeLine> {
        serde_json::from_str(line).ok()
    }
}
