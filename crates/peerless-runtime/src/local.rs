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

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::config::RunConfig;
use crate::rundir::{MetricsRow, RunDir, RunDirError};

/// What a local run records in its `events.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum LocalEvent {
    /// A fresh run starts.
    Start { model: String, params: usize, total_rounds: u64 },
    /// A run resumes from its checkpoint at `round`.
    Resume { round: u64 },
    /// The test-set evaluation after `round`.
    Eval { round: u64, test_loss: f32, test_accuracy: f32 },
    /// Checkpoint of `round` written.
    Checkpoint { round: u64 },
    /// Stopped by Ctrl-C.
    Stop { round: u64, reason: String },
    /// Every round done.
    Finish { round: u64, test_accuracy: f32 },
}

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
    /// Reading the data of a batch.
    #[error(transparent)]
    Data(#[from] peerless_ml::data::DataError),
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
    let schedule = Schedule::new(config, train.len());
    let mut optimizer = Optimizer::new(config.optimizer.clone(), model.num_params())?;
    let start = begin(config, &model, &mut optimizer, dir, resume, schedule.total)?;
    tracing::info!(model = %model.id(), params = model.num_params(), rounds = schedule.total, done = start.round, "local training");
    progress(Progress::Start { total: schedule.total, done: start.round });

    let mut run = Training::new(split, model, optimizer, schedule, start);
    let mut completed = true;
    while run.round < schedule.total {
        let loss = run.step()?;
        let row = run.record(config, loss, dir)?;
        progress(Progress::Round(row));

        let stop_requested = controls.stop_requested(run.round);
        let ck_every = config.train.checkpoint_every;
        if run.round == schedule.total
            || stop_requested
            || (ck_every > 0 && run.round.is_multiple_of(ck_every))
        {
            run.checkpoint(dir)?;
            progress(Progress::Checkpoint { round: run.round });
        }
        if stop_requested && run.round < schedule.total {
            dir.record(&LocalEvent::Stop { round: run.round, reason: "interrupted".into() })?;
            completed = false;
            break;
        }
    }
    run.finish(config, dir, completed)
}

impl Controls<'_> {
    /// Whether to stop after `round`: Ctrl-C, or the halt round reached.
    fn stop_requested(&self, round: u64) -> bool {
        self.stop.is_some_and(|s| s.load(Ordering::Relaxed)) || self.halt_at_round.is_some_and(|h| round >= h)
    }
}

/// How many rounds a run has: the training set's size, the batch size, rounds per epoch, total.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    n: usize,
    bs: usize,
    per_epoch: u64,
    total: u64,
}

impl Schedule {
    /// The schedule of `config` on `n` training samples.
    fn new(config: &RunConfig, n: usize) -> Schedule {
        let bs = config.train.batch_size.min(n).max(1);
        let per_epoch = n.div_ceil(bs) as u64;
        let total = if config.train.rounds > 0 {
            config.train.rounds
        } else {
            u64::from(config.train.epochs) * per_epoch
        };
        Schedule { n, bs, per_epoch, total }
    }
}

/// Where a run starts: its parameters, round, data-order RNG and training time so far.
struct Start {
    params: Vec<f32>,
    round: u64,
    epoch_rng: Rng,
    wall_s: f64,
}

/// Starts a run afresh, or from `resume` (checked against `model`, loaded into `optimizer`);
/// records which in `dir`.
fn begin(
    config: &RunConfig,
    model: &Model,
    optimizer: &mut Optimizer,
    dir: &mut RunDir,
    resume: Option<Checkpoint>,
    total: u64,
) -> Result<Start, TrainError> {
    let model_id = model.id();
    match resume {
        Some(ck) => {
            if ck.model != model_id || ck.layout != model.layout().fingerprint() {
                return Err(CheckpointError::WrongModel {
                    path: dir.checkpoint_path(),
                    expected: model_id,
                    found: ck.model,
                }
                .into());
            }
            optimizer.load_state(ck.optimizer)?;
            dir.record(&LocalEvent::Resume { round: ck.round })?;
            Ok(Start {
                params: ck.params,
                round: ck.round,
                epoch_rng: Rng::from_state(ck.rng),
                wall_s: ck.wall_s,
            })
        }
        None => {
            dir.record(&LocalEvent::Start {
                model: model_id,
                params: model.num_params(),
                total_rounds: total,
            })?;
            Ok(Start {
                params: model.init(config.seed),
                round: 0,
                epoch_rng: Rng::derive(config.seed, "data-order", 0),
                wall_s: 0.0,
            })
        }
    }
}

/// A local run in progress: the model, its parameters and optimizer, the data order and the
/// figures the summary needs.
struct Training<'a> {
    split: &'a Split,
    model: Model,
    model_id: String,
    layout_fp: String,
    optimizer: Optimizer,
    schedule: Schedule,
    params: Vec<f32>,
    grad: Vec<f32>,
    /// Rounds done.
    round: u64,
    epoch_rng: Rng,
    /// The sample order of epoch `order_epoch`.
    order: Vec<usize>,
    order_epoch: u64,
    /// `epoch_rng`'s state when `order` was drawn.
    epoch_start_state: [u64; 4],
    started: Instant,
    /// Training time before `started` (earlier sessions, minus evaluations), s.
    wall_before: f64,
    last_eval: Option<(f32, f32)>,
    /// Training losses of the epoch in progress.
    recent_losses: Vec<f32>,
    samples_before: u64,
    samples: u64,
}

impl<'a> Training<'a> {
    /// A run of `model` on `split` from `start`; its clock starts now.
    fn new(split: &'a Split, model: Model, optimizer: Optimizer, schedule: Schedule, start: Start) -> Self {
        let Schedule { n, bs, per_epoch, .. } = schedule;
        let round = start.round;
        let samples_before = (round / per_epoch) * n as u64 + ((round % per_epoch) * bs as u64).min(n as u64);
        Training {
            split,
            model_id: model.id(),
            layout_fp: model.layout().fingerprint(),
            model,
            optimizer,
            schedule,
            grad: vec![0f32; start.params.len()],
            params: start.params,
            round,
            epoch_start_state: start.epoch_rng.state(),
            epoch_rng: start.epoch_rng,
            order: Vec::new(),
            order_epoch: u64::MAX,
            started: Instant::now(),
            wall_before: start.wall_s,
            last_eval: None,
            recent_losses: Vec::new(),
            samples_before,
            samples: samples_before,
        }
    }

    /// One optimizer step on the next mini-batch; returns its loss.
    fn step(&mut self) -> Result<f32, TrainError> {
        let Schedule { n, bs, per_epoch, .. } = self.schedule;
        let epoch = self.round / per_epoch;
        if epoch != self.order_epoch {
            // The checkpointed RNG state is the one at the start of the epoch in progress, so
            // the same permutation is regenerated on resume.
            self.epoch_start_state = self.epoch_rng.state();
            self.order = (0..n).collect();
            self.epoch_rng.shuffle(&mut self.order);
            self.order_epoch = epoch;
            self.recent_losses.clear();
        }
        let pos = (self.round % per_epoch) as usize * bs;
        let idx = &self.order[pos..(pos + bs).min(n)];
        let batch = self.split.train.gather(idx)?;
        let loss = self.model.loss_and_grad_into(&self.params, &batch, &mut self.grad)?;
        if !loss.is_finite() {
            return Err(TrainError::Diverged { round: self.round, loss });
        }
        self.optimizer.step(&mut self.params, &self.grad)?;
        self.round += 1;
        self.samples += idx.len() as u64;
        self.recent_losses.push(loss);
        Ok(loss)
    }

    /// The metrics row of the round just done (evaluated when due), written to `dir`.
    fn record(&mut self, config: &RunConfig, loss: f32, dir: &mut RunDir) -> Result<MetricsRow, TrainError> {
        let (round, per_epoch) = (self.round, self.schedule.per_epoch);
        let end_of_epoch = round % per_epoch == 0;
        let eval_now = round == self.schedule.total
            || match config.train.eval_every {
                0 => end_of_epoch,
                k => round % k == 0,
            };
        let wall_s = self.wall_before + self.started.elapsed().as_secs_f64();
        let mut row = MetricsRow {
            round,
            epoch: round as f64 / per_epoch as f64,
            wall_s,
            train_loss: loss,
            test_loss: None,
            test_accuracy: None,
            samples: self.samples,
            samples_per_s: (self.samples - self.samples_before) as f64
                / self.started.elapsed().as_secs_f64().max(1e-9),
        };
        if eval_now {
            let t = Instant::now();
            let (l, a) = self.model.evaluate(&self.params, &self.split.test)?;
            // Evaluation time is not training time.
            self.wall_before -= t.elapsed().as_secs_f64();
            row.test_loss = Some(l);
            row.test_accuracy = Some(a);
            self.last_eval = Some((l, a));
            dir.record(&LocalEvent::Eval { round, test_loss: l, test_accuracy: a })?;
        }
        dir.metrics(&row)?;
        Ok(row)
    }

    /// Writes the checkpoint after the round just done, and records it in `dir`.
    fn checkpoint(&self, dir: &mut RunDir) -> Result<(), TrainError> {
        let (round, per_epoch) = (self.round, self.schedule.per_epoch);
        // The RNG state to save is the one that regenerates the order of the epoch the
        // *next* round belongs to.
        let rng = if round % per_epoch == 0 { self.epoch_rng.state() } else { self.epoch_start_state };
        dir.flush()?;
        Checkpoint {
            model: self.model_id.clone(),
            layout: self.layout_fp.clone(),
            round,
            epoch: round / per_epoch,
            params: self.params.clone(),
            optimizer: self.optimizer.state(),
            rng,
            wall_s: self.wall_before + self.started.elapsed().as_secs_f64(),
            error_feedback: None,
        }
        .save(&dir.checkpoint_path())?;
        dir.record(&LocalEvent::Checkpoint { round })?;
        Ok(())
    }

    /// Evaluates (unless the last round was), writes the summary and returns it.
    fn finish(self, config: &RunConfig, dir: &mut RunDir, completed: bool) -> Result<Summary, TrainError> {
        let (test_loss, test_accuracy) = match self.last_eval {
            Some(e) => e,
            None => self.model.evaluate(&self.params, &self.split.test)?,
        };
        let wall_time_s = self.wall_before + self.started.elapsed().as_secs_f64();
        let train_loss = if self.recent_losses.is_empty() {
            f32::NAN
        } else {
            self.recent_losses.iter().sum::<f32>() / self.recent_losses.len() as f32
        };
        let round = self.round;
        let summary = Summary {
            run: dir.path().file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            arch: "local".into(),
            model: self.model_id,
            dataset: config.data.dataset.to_string(),
            seed: config.seed,
            completed,
            rounds: round,
            epochs: round as f64 / self.schedule.per_epoch as f64,
            test_accuracy,
            test_loss,
            train_loss,
            wall_time_s,
            samples_per_s: self.samples as f64 / wall_time_s.max(1e-9),
            param_digest: digest(&self.params),
        };
        if completed {
            dir.record(&LocalEvent::Finish { round, test_accuracy })?;
        }
        dir.summary(&summary)?;
        Ok(summary)
    }
}
