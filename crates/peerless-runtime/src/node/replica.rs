//! The model replica of a peer or the PS: parameters and optimizer, the aggregation rule that
//! turns a round's gradients into one update, and the checkpoint they resume from.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use peerless_core::aggregate::Aggregator;
use peerless_core::compress::{Compression, ErrorFeedback};
use peerless_core::flat::{Digest, Fingerprinter, digest, fingerprint};
use peerless_core::optim::Optimizer;
use peerless_core::protocol::PeerIdx;
use peerless_core::wire::{ParamsMsg, StateMsg};

use super::NodeError;
use super::driver::Node;
use crate::checkpoint::Checkpoint;

/// Parameters, optimizer, aggregation rule and checkpoint file of one node.
pub(crate) struct Replica {
    /// Shared with the round's gradient work while it runs (no copy per round); an update
    /// writes in place once the work has let go of it. Changed only here, with `fingerprint`.
    params: Arc<Vec<f32>>,
    /// `fingerprint(params)`, taken as the step writes them (each piece still in cache)
    /// rather than in another pass over them when the next round's work starts.
    fingerprint: Digest,
    optimizer: Optimizer,
    aggregator: Box<dyn Aggregator>,
    /// The aggregate of the round being applied.
    agg: Vec<f32>,
    ck_path: PathBuf,
    /// What this node computed but has not sent (`p2p.compression`).
    pub(crate) feedback: ErrorFeedback,
}

/// What applying one round took.
pub(crate) struct Applied {
    pub(crate) aggregate_ms: f64,
    pub(crate) update_ms: f64,
    /// How many Byzantine gradients the rule tolerated.
    pub(crate) effective_f: usize,
}

impl Replica {
    /// The replica of `node`: from its checkpoint when it holds one of this model (the
    /// round it resumes at is returned too), else freshly initialized from the run's seed.
    pub(crate) fn open(node: &Node) -> Result<(Replica, Option<u64>), NodeError> {
        let run = &node.file.run;
        let model = &node.model;
        let n = model.num_params();
        let ck_path = node.file.node.dir.join("checkpoint.safetensors");
        let params = model.init(run.seed);
        let mut replica = Replica {
            fingerprint: fingerprint(&params),
            params: Arc::new(params),
            optimizer: Optimizer::new(run.p2p.update_optimizer(&run.optimizer), n)?,
            aggregator: run.cluster.aggregator.build(),
            agg: vec![0f32; n],
            ck_path,
            feedback: ErrorFeedback::new(run.p2p.compression(), n),
        };
        let resumed = match Checkpoint::read(&replica.ck_path) {
            Ok(ck) if ck.model == model.id() && ck.layout == model.layout().fingerprint() => {
                replica.fingerprint = fingerprint(&ck.params);
                replica.params = Arc::new(ck.params);
                replica.optimizer.load_state(ck.optimizer)?;
                if let Some(e) = ck.error_feedback {
                    replica.feedback.residual = e;
                }
                Some(ck.round)
            }
            Ok(ck) => {
                return Err(NodeError::Config(format!(
                    "{} holds a checkpoint of model {}, not {}",
                    replica.ck_path.display(),
                    ck.model,
                    model.id()
                )));
            }
            Err(_) => None,
        };
        Ok((replica, resumed))
    }

    /// Aggregates `inputs` (ordered by node) and takes one optimizer step. A lone gradient
    /// when `lone_as_is` (asynchronous PS) is the update itself.
    pub(crate) fn apply(
        &mut self,
        round: u64,
        inputs: &[(PeerIdx, Vec<f32>)],
        lone_as_is: bool,
    ) -> Result<Applied, NodeError> {
        if inputs.is_empty() {
            // Nothing was agreed (the P2P agreement left every gradient out): the round
            // changes nothing, on every replica alike.
            return Ok(Applied { aggregate_ms: 0.0, update_ms: 0.0, effective_f: 0 });
        }
        let t = Instant::now();
        let (update, effective_f): (&[f32], usize) = match inputs {
            [(_, g)] if lone_as_is => (g, 0),
            _ => {
                let refs: Vec<&[f32]> = inputs.iter().map(|(_, g)| g.as_slice()).collect();
                self.aggregator
                    .aggregate(&refs, &mut self.agg)
                    .map_err(|e| NodeError::Compute { round, reason: e.to_string() })?;
                (&self.agg, self.aggregator.effective_f(inputs.len()))
            }
        };
        let aggregate_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let mut f = Fingerprinter::new();
        self.optimizer.step_each(Arc::make_mut(&mut self.params).as_mut_slice(), update, |p| f.update(p))?;
        self.fingerprint = f.finish();
        Ok(Applied { aggregate_ms, update_ms: t.elapsed().as_secs_f64() * 1e3, effective_f })
    }

    /// The parameters.
    pub(crate) fn params(&self) -> &Arc<Vec<f32>> {
        &self.params
    }

    /// The parameters and their fingerprint, for a round's gradient work.
    pub(crate) fn version(&self) -> (Arc<Vec<f32>>, Digest) {
        (Arc::clone(&self.params), self.fingerprint)
    }

    /// Saves the replica as model version `round` (atomically).
    pub(crate) fn checkpoint(&self, node: &Node, round: u64, epoch: u64) -> Result<(), NodeError> {
        Checkpoint {
            model: node.model.id(),
            layout: node.model.layout().fingerprint(),
            round,
            epoch,
            params: self.params.to_vec(),
            optimizer: self.optimizer.state(),
            rng: [0; 4],
            wall_s: node.t0.elapsed().as_secs_f64(),
            error_feedback: (node.file.run.p2p.compression() != Compression::None)
                .then(|| self.feedback.residual.clone()),
        }
        .save(&self.ck_path)?;
        Ok(())
    }

    /// The full state at round `round`, for a peer that joins, with the peers its next round
    /// needs a quorum of.
    pub(crate) fn state(&self, round: u64, base: Vec<u32>) -> StateMsg {
        StateMsg {
            round,
            digest: digest(&self.params),
            params: self.params.to_vec(),
            optimizer: self.optimizer.state(),
            base,
        }
    }

    /// How many `f32`s a state of this replica holds (parameters and optimizer state).
    pub(crate) fn state_floats(&self) -> usize {
        self.params.len() + self.optimizer.state_floats()
    }

    /// Model version `round`, as the PS publishes it.
    pub(crate) fn published(&self, round: u64) -> ParamsMsg {
        ParamsMsg { round, digest: digest(&self.params), params: self.params.to_vec() }
    }

    /// Takes over a state another peer served.
    pub(crate) fn adopt(&mut self, state: StateMsg) -> Result<(), NodeError> {
        self.optimizer.load_state(state.optimizer)?;
        self.fingerprint = fingerprint(&state.params);
        self.params = Arc::new(state.params);
        // What was left unsent belongs to this node's old trajectory.
        self.feedback.reset();
        Ok(())
    }
}
