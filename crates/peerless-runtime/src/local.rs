//! Single-process training (`--arch local`): the reference every distributed run is measured against.
//!
//! A round is one optimizer step on one mini-batch. Each epoch's sample order is one shuffle
//! by the run's RNG, whose state at the start of the epoch is checkpointed; together with the
//! round, the parameters and the optimizer state that is everything needed to continue a run
//! bit-for-bit where it stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use peerless_core::flat::{Digest, digest};
use peerless_core::optim::{OptimError, Optimizer};
use peerless_core::rng::Rng;
use peerless_ml::{Model, ModelError, ModelSpec, Split};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::config::RunConfig;
use crate::rundir::{MetricsRow, RunDir, RunDirError};

/// Errors of a local run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Model construction or computation.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Optimizer.
    #[error("optimizer: {0}")]
    Optim(#[from] OptimError),
    /// Checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Run directory.
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    /// The loss diverged.
    #[error("training diverged at round {round}: loss is {loss}; lower optimizer.lr")]
    Diverged {
        /// Round.
        round: u64,
        /// Loss.
        loss: f32,
    },
}

/// What the loop reports as it goes (the binary turns these into a progress bar).
#[derive(Debug, Clone)]
pub enum Progress {
    /// Training starts (or resumes) at `done` of `total` rounds.
    Start {
        /// Total rounds.
        total: u64,
        /// Rounds already done.
        done: u64,
    },
    /// A round finished.
    Round(MetricsRow),
    /// A checkpoint was written after `round`.
    Checkpoint {
        /// Round.
        round: u64,
    },
}

/// Extra controls that are not part of the run's configuration.
#[derive(Debug, Default)]
pub struct Controls<'a> {
    /// Set (e.g. by Ctrl-C) to stop after the current round with a checkpoint.
    pub stop: Option<&'a AtomicBool>,
    /// Stop after this many rounds as if interrupted (tests of resume).
    pub halt_at_round: Option<u64>,
}

/// The final figures of a run; written to `summary.json` and printed last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Run directory name.
    pub run: String,
    /// `local`, `p2p`, `ps`.
    pub arch: String,
    /// Model id.
    pub model: String,
    /// Dataset.
    pub dataset: String,
    /// Seed.
    pub seed: u64,
    /// Whether every planned round ran (false when interrupted; resume continues it).
    pub completed: bool,
    /// Rounds completed.
    pub rounds: u64,
    /// Epochs completed (fractional).
    pub epochs: f64,
    /// Test accuracy in [0, 1].
    pub test_accuracy: f32,
    /// Test loss.
    pub test_loss: f32,
    /// Mean training loss over the last epoch's rounds (or all rounds if fewer).
    pub train_loss: f32,
    /// Training wall time, seconds (evaluation excluded), across resumes.
    pub wall_time_s: f64,
    /// Training samples per second.
    pub samples_per_s: f64,
    /// SHA-256 of the final parameters.
    pub param_digest: Digest,
}

/// Trains `config`'s model on `split` in this process, writing into `dir`. When `resume` is
/// given, continues from that checkpoint.
pub fn train(
    config: &RunConfig,
    split: &Split,
    dir: &mut RunDir,
    resume: Option<Checkpoint>,
    controls: Controls<'_>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Summary, TrainError> {
    let train = &split.train;
    let spec = ModelSpec {
        hidden: config.model.hidden.clone(),
        ..ModelSpec::new(config.model.arch, train.shape, train.classes)
    };
    let model = Model::new(spec, config.model.backend)?;
    let model_id = model.id();
    let layout_fp = model.layout().fingerprint();
    let n = train.len();
    let bs = config.train.batch_size.min(n).max(1);
    let per_epoch = n.div_ceil(bs) as u64;
    let total = if config.train.rounds > 0 {
        config.train.rounds
    } else {
        u64::from(config.train.epochs) * per_epoch
    };

    let mut optimizer = Optimizer::new(config.optimizer.clone(), model.num_params())?;
    let (mut params, mut round, mut epoch_rng, mut wall_before) = match resume {
        Some(ck) => {
            if ck.model != model_id || ck.layout != layout_fp {
                return Err(CheckpointError::WrongModel {
                    path: dir.checkpoint_path(),
                    expected: model_id,
                    found: ck.model,
                }
                .into());
            }
            optimizer.load_state(ck.optimizer)?;
            dir.event("resume", json!({ "round": ck.round }))?;
            (ck.params, ck.round, Rng::from_state(ck.rng), ck.wall_s)
        }
        None => {
            dir.event(
                "start",
                json!({ "model": model_id, "params": model.num_params(), "total_rounds": total }),
            )?;
            (model.init(config.seed), 0, Rng::derive(config.seed, "data-order", 0), 0.0)
        }
    };
    tracing::info!(model = %model_id, params = model.num_params(), rounds = total, done = round, "local training");
    progress(Progress::Start { total, done: round });

    let mut grad = vec![0f32; params.len()];
    let mut order: Vec<usize> = Vec::new();
    let mut order_epoch = u64::MAX;
    let mut epoch_start_state = epoch_rng.state();
    let started = Instant::now();
    let mut last_eval: Option<(f32, f32)> = None;
    let mut recent_losses: Vec<f32> = Vec::new();
    let samples_before = (round / per_epoch) * n as u64 + ((round % per_epoch) * bs as u64).min(n as u64);
    let mut samples = samples_before;
    let mut completed = true;

    while round < total {
        let epoch = round / per_epoch;
        if epoch != order_epoch {
            // The checkpointed RNG state is the one at the start of the epoch in progress, so
            // the same permutation is regenerated on resume.
            epoch_start_state = epoch_rng.state();
            order = (0..n).collect();
            epoch_rng.shuffle(&mut order);
            order_epoch = epoch;
            recent_losses.clear();
        }
        let pos = (round % per_epoch) as usize * bs;
        let idx = &order[pos..(pos + bs).min(n)];
        let batch = train.gather(idx);
        let loss = model.loss_and_grad_into(&params, &batch, &mut grad)?;
        if !loss.is_finite() {
            return Err(TrainError::Diverged { round, loss });
        }
        optimizer.step(&mut params, &grad)?;
        round += 1;
        samples += idx.len() as u64;
        recent_losses.push(loss);

        let end_of_epoch = round % per_epoch == 0;
        let eval_now = round == total
            || match config.train.eval_every {
                0 => end_of_epoch,
                k => round % k == 0,
            };
        let wall_s = wall_before + started.elapsed().as_secs_f64();
        let mut row = MetricsRow {
            round,
            epoch: round as f64 / per_epoch as f64,
            wall_s,
            train_loss: loss,
            test_loss: None,
            test_accuracy: None,
            samples,
            samples_per_s: (samples - samples_before) as f64 / started.elapsed().as_secs_f64().max(1e-9),
        };
        if eval_now {
            let t = Instant::now();
            let (l, a) = model.evaluate(&params, &split.test)?;
            // Evaluation time is not training time.
            wall_before -= t.elapsed().as_secs_f64();
            row.test_loss = Some(l);
            row.test_accuracy = Some(a);
            last_eval = Some((l, a));
            dir.event("eval", json!({ "round": round, "test_loss": l, "test_accuracy": a }))?;
        }
        dir.metrics(&row)?;
        progress(Progress::Round(row));

        let stop_requested = controls.stop.is_some_and(|s| s.load(Ordering::Relaxed))
            || controls.halt_at_round.is_some_and(|h| round >= h);
        let ck_every = config.train.checkpoint_every;
        if round == total || stop_requested || (ck_every > 0 && round % ck_every == 0) {
            // The RNG state to save is the one that regenerates the order of the epoch the
            // *next* round belongs to.
            let rng = if round % per_epoch == 0 { epoch_rng.state() } else { epoch_start_state };
            dir.flush()?;
            Checkpoint {
                model: model_id.clone(),
                layout: layout_fp.clone(),
                round,
                epoch: round / per_epoch,
                params: params.clone(),
                optimizer: optimizer.state(),
                rng,
                wall_s: wall_before + started.elapsed().as_secs_f64(),
            }
            .save(&dir.checkpoint_path())?;
            dir.event("checkpoint", json!({ "round": round }))?;
            progress(Progress::Checkpoint { round });
        }
        if stop_requested && round < total {
            dir.event("stop", json!({ "round": round, "reason": "interrupted" }))?;
            completed = false;
            break;
        }
    }

    let (test_loss, test_accuracy) = match last_eval {
        Some(e) => e,
        None => model.evaluate(&params, &split.test)?,
    };
    let wall_time_s = wall_before + started.elapsed().as_secs_f64();
    let train_loss = if recent_losses.is_empty() {
        f32::NAN
    } else {
        recent_losses.iter().sum::<f32>() / recent_losses.len() as f32
    };
    let summary = Summary {
        run: dir.path().file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        arch: "local".into(),
        model: model_id,
        dataset: config.data.dataset.to_string(),
        seed: config.seed,
        completed,
        rounds: round,
        epochs: round as f64 / per_epoch as f64,
        test_accuracy,
        test_loss,
        train_loss,
        wall_time_s,
        samples_per_s: samples as f64 / wall_time_s.max(1e-9),
        param_digest: digest(&params),
    };
    if completed {
        dir.event("finish", json!({ "round": round, "test_accuracy": test_accuracy }))?;
    }
    dir.summary(&summary)?;
    Ok(summary)
}
