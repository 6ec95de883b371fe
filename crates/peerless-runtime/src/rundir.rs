//! The run directory: effective config, metrics, events, summary and checkpoint of one run.
//!
//! ```text
//! runs/<name>/
//!   config.toml              effective configuration, seed included (replayable)
//!   metrics.csv              one row per round
//!   events.jsonl             timestamped events (start, eval, checkpoint, resume, stop, ...)
//!   summary.json             final figures, the same the command prints last
//!   checkpoint.safetensors   latest checkpoint (atomic)
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::checkpoint::write_atomic;
use crate::config::RunConfig;

/// Column header of `metrics.csv` for single-process runs.
pub const METRICS_HEADER: &str =
    "round,epoch,wall_s,train_loss,test_loss,test_accuracy,samples,samples_per_s";

/// One row of `metrics.csv`. Test figures are present only on evaluation rounds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsRow {
    /// Rounds completed (1-based after the first step).
    pub round: u64,
    /// Fractional epochs completed.
    pub epoch: f64,
    /// Training wall time so far, seconds (evaluation excluded).
    pub wall_s: f64,
    /// Loss of this round's batch.
    pub train_loss: f32,
    /// Test loss, when evaluated this round.
    pub test_loss: Option<f32>,
    /// Test accuracy in [0, 1], when evaluated this round.
    pub test_accuracy: Option<f32>,
    /// Training samples processed so far.
    pub samples: u64,
    /// Training throughput so far.
    pub samples_per_s: f64,
}

impl MetricsRow {
    fn csv(&self) -> String {
        let opt = |v: Option<f32>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
        format!(
            "{},{:.4},{:.4},{:.6},{},{},{},{:.1}",
            self.round,
            self.epoch,
            self.wall_s,
            self.train_loss,
            opt(self.test_loss),
            opt(self.test_accuracy),
            self.samples,
            self.samples_per_s
        )
    }
}

/// Errors writing the run directory.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// An I/O error on a file of the run directory.
    #[error("run directory {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The directory already holds a run and neither resume nor overwrite was asked for.
    #[error("{0} already holds a run; pass --resume {0} to continue it, or choose another --out")]
    Exists(PathBuf),
}

/// An open run directory.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    metrics: BufWriter<File>,
    events: BufWriter<File>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |source| RunDirError::Io { path: path.to_owned(), source }
}

impl RunDir {
    /// Creates a fresh run directory (refusing one that already holds a run) and writes the
    /// effective config.
    pub fn create(path: &Path, config: &RunConfig) -> Result<Self, RunDirError> {
        if path.join("config.toml").exists() {
            return Err(RunDirError::Exists(path.to_owned()));
        }
        fs::create_dir_all(path).map_err(io(path))?;
        let cfg_path = path.join("config.toml");
        write_atomic(&cfg_path, config.to_toml().as_bytes()).map_err(io(&cfg_path))?;
        let metrics_path = path.join("metrics.csv");
        let mut metrics = BufWriter::new(File::create(&metrics_path).map_err(io(&metrics_path))?);
        writeln!(metrics, "{METRICS_HEADER}").map_err(io(&metrics_path))?;
        metrics.flush().map_err(io(&metrics_path))?;
        let events = open_append(&path.join("events.jsonl"))?;
        Ok(RunDir { path: path.to_owned(), metrics, events })
    }

    /// Reopens an existing run directory to continue it after round `round`: metrics rows of
    /// later rounds (written after the checkpoint, before the interruption) are dropped so the
    /// file reads as if the run had never stopped.
    pub fn reopen(path: &Path, round: u64) -> Result<Self, RunDirError> {
        let metrics_path = path.join("metrics.csv");
        let kept: Vec<String> = match File::open(&metrics_path) {
            Ok(f) => BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .enumerate()
                .filter(|(i, line)| {
                    *i == 0
                        || line
                            .split(',')
                            .next()
                            .and_then(|r| r.parse::<u64>().ok())
                            .is_some_and(|r| r <= round)
                })
                .map(|(_, l)| l)
                .collect(),
            Err(_) => vec![METRICS_HEADER.to_string()],
        };
        let mut text = kept.join("\n");
        text.push('\n');
        write_atomic(&metrics_path, text.as_bytes()).map_err(io(&metrics_path))?;
        let metrics = open_append(&metrics_path)?;
        let events = open_append(&path.join("events.jsonl"))?;
        Ok(RunDir { path: path.to_owned(), metrics, events })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the latest checkpoint lives.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.path.join("checkpoint.safetensors")
    }

    /// Appends a metrics row.
    pub fn metrics(&mut self, row: &MetricsRow) -> Result<(), RunDirError> {
        let p = self.path.join("metrics.csv");
        writeln!(self.metrics, "{}", row.csv()).map_err(io(&p))
    }

    /// Appends a typed event (an enum tagged `event`), stamped `t_ms` with the wall clock.
    pub fn record(&mut self, ev: &impl Serialize) -> Result<(), RunDirError> {
        let t_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let mut obj = serde_json::json!({ "t_ms": t_ms });
        if let (Some(o), Ok(serde_json::Value::Object(fields))) =
            (obj.as_object_mut(), serde_json::to_value(ev))
        {
            o.extend(fields);
        }
        let p = self.path.join("events.jsonl");
        writeln!(self.events, "{obj}").map_err(io(&p))?;
        self.events.flush().map_err(io(&p))
    }

    /// Flushes metrics to disk (called before each checkpoint, so the two agree).
    pub fn flush(&mut self) -> Result<(), RunDirError> {
        let p = self.path.join("metrics.csv");
        self.metrics.flush().map_err(io(&p))
    }

    /// Writes `summary.json` atomically.
    pub fn summary<T: Serialize>(&mut self, summary: &T) -> Result<(), RunDirError> {
        self.flush()?;
        let p = self.path.join("summary.json");
        let text = serde_json::to_string_pretty(summary).expect("invariant: summary serializes");
        write_atomic(&p, text.as_bytes()).map_err(io(&p))
    }
}

fn open_append(path: &Path) -> Result<BufWriter<File>, RunDirError> {
    let f = OpenOptions::new().create(true).append(true).open(path).map_err(io(path))?;
    Ok(BufWriter::new(f))
}
