//! Checkpoints in safetensors: parameters, optimizer state, round and RNG state, written atomically.
//!
//! One file holds tensor `params` (the flat parameter vector), one tensor `optim.<name>` per
//! optimizer buffer, and string metadata: format version, model id, layout fingerprint, round,
//! epoch, optimizer kind and step count, RNG state. It is written to a temporary file in the
//! same directory, fsynced, renamed over the old one and the directory fsynced, so a crash at
//! any instant leaves either the old or the new checkpoint, never a torn one. Loading checks
//! everything it reads and refuses a checkpoint of another model by name.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use peerless_core::optim::OptimizerState;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

const FORMAT: &str = "peerless-checkpoint-1";

/// Checkpoint errors.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing the file failed.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a valid checkpoint.
    #[error("checkpoint {path} is corrupt or not a peerless checkpoint: {reason}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint belongs to another model.
    #[error("checkpoint {path} is for model {found}, but this run trains {expected}")]
    WrongModel {
        /// File.
        path: PathBuf,
        /// Model of the run.
        expected: String,
        /// Model in the file.
        found: String,
    },
}

/// Everything needed to continue training exactly where it stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Model id ([`peerless_ml::ModelSpec::id`]).
    pub model: String,
    /// Layout fingerprint ([`peerless_core::flat::Layout::fingerprint`]).
    pub layout: String,
    /// Rounds (optimizer steps) completed.
    pub round: u64,
    /// Epoch in progress.
    pub epoch: u64,
    /// Flat parameters.
    pub params: Vec<f32>,
    /// Optimizer state.
    pub optimizer: OptimizerState,
    /// State of the run's RNG.
    pub rng: [u64; 4],
    /// Training wall time up to this checkpoint, seconds (so resumed runs report the total).
    pub wall_s: f64,
    /// What this node computed but has not sent yet (`p2p.compression`'s error feedback);
    /// `None` without compression. Tensor `error_feedback`.
    pub error_feedback: Option<Vec<f32>>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Checkpoint {
    /// Serializes to safetensors bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut owned: Vec<(String, Vec<u8>, usize)> =
            vec![("params".into(), f32_bytes(&self.params), self.params.len())];
        for (name, buf) in &self.optimizer.buffers {
            owned.push((format!("optim.{name}"), f32_bytes(buf), buf.len()));
        }
        if let Some(e) = &self.error_feedback {
            owned.push(("error_feedback".into(), f32_bytes(e), e.len()));
        }
        let views = owned.iter().map(|(name, bytes, n)| {
            let view =
                TensorView::new(Dtype::F32, vec![*n], bytes).expect("invariant: byte length matches shape");
            (name.clone(), view)
        });
        let meta: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("model", self.model.clone()),
            ("layout", self.layout.clone()),
            ("round", self.round.to_string()),
            ("epoch", self.epoch.to_string()),
            ("optim.kind", self.optimizer.kind.clone()),
            ("optim.steps", self.optimizer.steps.to_string()),
            (
                "optim.buffers",
                self.optimizer.buffers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(","),
            ),
            ("wall_s", format!("{}", self.wall_s)),
            ("rng", self.rng.iter().map(|x| format!("{x:016x}")).collect::<Vec<_>>().join(",")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::tensor::serialize(views, Some(meta))
            .expect("invariant: safetensors serialize of valid views")
    }

    /// Parses safetensors bytes; `path` only names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, CheckpointError> {
        let corrupt = |reason: String| CheckpointError::Corrupt { path: path.to_owned(), reason };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
        let meta = header.metadata().clone().ok_or_else(|| corrupt("no metadata".into()))?;
        let get =
            |k: &str| meta.get(k).cloned().ok_or_else(|| corrupt(format!("metadata key {k:?} missing")));
        let format = get("format")?;
        if format != FORMAT {
            return Err(corrupt(format!("format {format:?}, expected {FORMAT:?}")));
        }
        let num = |k: &str| -> Result<u64, CheckpointError> {
            get(k)?.parse().map_err(|e| corrupt(format!("metadata {k}: {e}")))
        };
        let rng_parts: Vec<u64> = get("rng")?
            .split(',')
            .map(|s| u64::from_str_radix(s, 16))
            .collect::<Result<_, _>>()
            .map_err(|e| corrupt(format!("rng state: {e}")))?;
        let rng: [u64; 4] =
            rng_parts.try_into().map_err(|_| corrupt("rng state must have 4 words".into()))?;
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
        let read = |name: &str| -> Result<Vec<f32>, CheckpointError> {
            let t = tensors.tensor(name).map_err(|e| corrupt(format!("tensor {name}: {e}")))?;
            if t.dtype() != Dtype::F32 || t.shape().len() != 1 {
                return Err(corrupt(format!("tensor {name} must be a 1-d F32 vector")));
            }
            Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let params = read("params")?;
        if let Some(i) = params.iter().position(|v| !v.is_finite()) {
            return Err(corrupt(format!("parameter {i} is {}", params[i])));
        }
        let names = get("optim.buffers")?;
        let mut buffers: Vec<(String, Vec<f32>)> = Vec::new();
        for name in names.split(',').filter(|s| !s.is_empty()) {
            if buffers.iter().any(|(n, _)| n == name) {
                return Err(corrupt(format!("optimizer buffer {name:?} is listed twice")));
            }
            let buf = read(&format!("optim.{name}"))?;
            if buf.len() != params.len() {
                return Err(corrupt(format!(
                    "optimizer buffer {name:?} has {} values, the parameters {}",
                    buf.len(),
                    params.len()
                )));
            }
            if let Some(i) = buf.iter().position(|v| !v.is_finite()) {
                return Err(corrupt(format!("optimizer buffer {name:?} value {i} is {}", buf[i])));
            }
            buffers.push((name.to_string(), buf));
        }
        let error_feedback = match tensors.names().contains(&"error_feedback") {
            false => None,
            true => {
                let e = read("error_feedback")?;
                if e.len() != params.len() || e.iter().any(|v| !v.is_finite()) {
                    return Err(corrupt(format!(
                        "error_feedback must hold {} finite values, the parameters' count",
                        params.len()
                    )));
                }
                Some(e)
            }
        };
        let wall_s: f64 = get("wall_s")?.parse().map_err(|e| corrupt(format!("metadata wall_s: {e}")))?;
        if !(wall_s.is_finite() && wall_s >= 0.0) {
            return Err(corrupt(format!("metadata wall_s = {wall_s}: must be a finite number of seconds")));
        }
        Ok(Checkpoint {
            model: get("model")?,
            layout: get("layout")?,
            round: num("round")?,
            epoch: num("epoch")?,
            params,
            optimizer: OptimizerState { kind: get("optim.kind")?, steps: num("optim.steps")?, buffers },
            rng,
            wall_s,
            error_feedback,
        })
    }

    /// Writes atomically: temp file, fsync, rename, fsync of the directory.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        write_atomic(path, &self.to_bytes())
            .map_err(|source| CheckpointError::Io { path: path.to_owned(), source })
    }

    /// Reads and validates a checkpoint file of any model.
    pub fn read(path: &Path) -> Result<Self, CheckpointError> {
        let bytes = fs::read(path).map_err(|source| CheckpointError::Io { path: path.to_owned(), source })?;
        Self::from_bytes(&bytes, path)
    }

    /// Reads and validates a checkpoint of model `model` with layout fingerprint `layout`.
    pub fn load(path: &Path, model: &str, layout: &str) -> Result<Self, CheckpointError> {
        let ck = Self::read(path)?;
        if ck.model != model || ck.layout != layout {
            return Err(CheckpointError::WrongModel {
                path: path.to_owned(),
                expected: model.into(),
                found: ck.model,
            });
        }
        Ok(ck)
    }
}

/// Writes `bytes` to `path` so that readers see the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            model: "mlp-64-8-10".into(),
            layout: "abc123".into(),
            round: 17,
            epoch: 2,
            params: vec![0.5, -1.25, 3.0],
            optimizer: OptimizerState {
                kind: "sgd".into(),
                steps: 17,
                buffers: vec![("momentum".into(), vec![0.1, 0.2, 0.3])],
            },
            rng: [1, 2, u64::MAX, 4],
            wall_s: 12.5,
            error_feedback: Some(vec![0.0, -1e-3, 2.0]),
        }
    }

    #[test]
    fn save_load_round_trips_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.safetensors");
        let ck = sample();
        ck.save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path, "mlp-64-8-10", "abc123").unwrap(), ck);
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn other_model_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.safetensors");
        sample().save(&path).unwrap();
        let err = Checkpoint::load(&path, "lenet-1x28x28-10", "zzz").unwrap_err().to_string();
        assert!(err.contains("mlp-64-8-10") && err.contains("lenet"), "{err}");
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 5);
        fs::write(&path, &bytes).unwrap();
        let err = Checkpoint::load(&path, "mlp-64-8-10", "abc123").unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
        fs::write(&path, b"not a checkpoint").unwrap();
        assert!(Checkpoint::load(&path, "mlp-64-8-10", "abc123").is_err());
    }

    /// Found by `fuzz/fuzz_targets/checkpoint.rs`: a NaN wall time (metadata `"NaN"` parses
    /// as an f64) was accepted; non-finite, short or repeated optimizer buffers are refused too.
    #[test]
    fn non_finite_and_inconsistent_state_is_refused() {
        let refused = |ck: &Checkpoint, want: &str| {
            let err = Checkpoint::from_bytes(&ck.to_bytes(), Path::new("ck")).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        };
        for wall_s in [f64::NAN, f64::INFINITY, -1.0] {
            refused(&Checkpoint { wall_s, ..sample() }, "wall_s");
        }
        refused(&Checkpoint { error_feedback: Some(vec![0.0]), ..sample() }, "error_feedback");
        refused(&Checkpoint { error_feedback: Some(vec![0.0, f32::NAN, 1.0]), ..sample() }, "error_feedback");
        let plain = Checkpoint { error_feedback: None, ..sample() };
        assert_eq!(Checkpoint::from_bytes(&plain.to_bytes(), Path::new("ck")).unwrap(), plain);
        let mut ck = sample();
        ck.optimizer.buffers[0].1[1] = f32::NAN;
        refused(&ck, "optimizer buffer \"momentum\" value 1 is NaN");
        let mut ck = sample();
        ck.optimizer.buffers[0].1.pop();
        refused(&ck, "has 2 values, the parameters 3");
        // A buffer listed twice in the metadata.
        let mut bytes = sample().to_bytes();
        let (from, to) = (br#""optim.buffers":"momentum""#, br#""optim.buffers":"momentum,momentum""#);
        let at = bytes.windows(from.len()).position(|w| w == from).expect("buffer list in the header");
        bytes.splice(at..at + from.len(), to.iter().copied());
        // Keep the header length (8 bytes, little-endian) right.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) + (to.len() - from.len()) as u64;
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        let err = Checkpoint::from_bytes(&bytes, Path::new("ck")).unwrap_err().to_string();
        assert!(err.contains("listed twice"), "{err}");
    }
}
