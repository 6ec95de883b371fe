//! DiLoCo's inner loop: local optimizer steps from a parameter vector, one mini-batch each, and
//! the parameter delta they add up to (the pseudo-gradient a node exchanges instead of a
//! gradient). The node's own compute and the gradient function run this same code, so both
//! give the same delta bit for bit.

use peerless_core::function::InnerSteps;
use peerless_core::optim::Optimizer;
use peerless_ml::{Dataset, Model, ModelError};

/// Why the local steps failed.
#[derive(Debug, thiserror::Error)]
pub enum InnerError {
    /// The samples do not split into the steps' mini-batches.
    #[error("{samples} samples do not split into {steps} equal mini-batches")]
    Split {
        /// Samples given.
        samples: usize,
        /// Steps asked for.
        steps: usize,
    },
    /// Gathering a mini-batch or its forward/backward failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The optimizer refused a step (a non-finite gradient, or its configuration).
    #[error("inner step {step}: {reason}")]
    Step {
        /// Which step, from 0.
        step: usize,
        /// The optimizer's error.
        reason: String,
    },
}

/// Takes `inner.steps` optimizer steps from `params`, on consecutive equal chunks of
/// `indices` (labels flipped when `flip`), and writes `params − end` into `delta`; returns the
/// mean loss of the steps. The optimizer's state starts fresh.
///
/// # Errors
/// See [`InnerError`].
pub fn pseudo_gradient(
    model: &Model,
    data: &Dataset,
    params: &[f32],
    indices: &[usize],
    inner: &InnerSteps,
    flip: bool,
    delta: &mut Vec<f32>,
) -> Result<f32, InnerError> {
    let steps = inner.steps.max(1) as usize;
    let chunk = indices.len() / steps;
    if chunk == 0 || !indices.len().is_multiple_of(steps) {
        return Err(InnerError::Split { samples: indices.len(), steps });
    }
    let mut opt = Optimizer::new(inner.optimizer.clone(), params.len())
        .map_err(|e| InnerError::Step { step: 0, reason: e.to_string() })?;
    let mut theta = params.to_vec();
    let mut grad = vec![0f32; params.len()];
    let mut loss = 0f64;
    for (s, idx) in indices.chunks_exact(chunk).enumerate() {
        let mut batch = data.gather(idx).map_err(ModelError::from)?;
        if flip {
            batch.flip_labels(data.classes);
        }
        loss += f64::from(model.loss_and_grad_into(&theta, &batch, &mut grad)?);
        opt.step(&mut theta, &grad).map_err(|e| InnerError::Step { step: s, reason: e.to_string() })?;
    }
    delta.clear();
    delta.extend(params.iter().zip(&theta).map(|(p, t)| p - t));
    Ok((loss / steps as f64) as f32)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use peerless_core::optim::OptimizerConfig;
    use peerless_ml::data::load;
    use peerless_ml::{Arch, Backend, DatasetName, ModelSpec};

    use super::*;

    fn setup() -> (Model, Dataset) {
        let data = load(DatasetName::Digits, Path::new("/unused")).unwrap().train;
        let spec = ModelSpec { hidden: vec![32], ..ModelSpec::new(Arch::Mlp, data.shape, data.classes) };
        (Model::new(spec, Backend::Auto).unwrap(), data)
    }

    #[test]
    fn the_delta_of_the_local_steps_lowers_the_loss_and_one_step_is_one_gradient_step() {
        let (model, data) = setup();
        let params = model.init(1);
        let idx: Vec<usize> = (0..160).collect();
        let inner = InnerSteps { steps: 10, optimizer: OptimizerConfig::sgd(0.1) };
        let mut delta = Vec::new();
        pseudo_gradient(&model, &data, &params, &idx, &inner, false, &mut delta).unwrap();
        let moved: Vec<f32> = params.iter().zip(&delta).map(|(p, d)| p - d).collect();
        let all = data.gather(&idx).unwrap();
        let mut g = vec![0f32; params.len()];
        let before = model.loss_and_grad_into(&params, &all, &mut g).unwrap();
        let after = model.loss_and_grad_into(&moved, &all, &mut g).unwrap();
        assert!(after < before * 0.9, "loss {before} → {after}");

        // One step of plain SGD: the delta is the step the optimizer takes on one gradient.
        let plain = OptimizerConfig::Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0, nesterov: false };
        let one = InnerSteps { steps: 1, optimizer: plain };
        pseudo_gradient(&model, &data, &params, &idx[..16], &one, false, &mut delta).unwrap();
        let batch = data.gather(&idx[..16]).unwrap();
        model.loss_and_grad_into(&params, &batch, &mut g).unwrap();
        let mut stepped = params.clone();
        Optimizer::new(one.optimizer.clone(), params.len()).unwrap().step(&mut stepped, &g).unwrap();
        let expected: Vec<f32> = params.iter().zip(&stepped).map(|(p, s)| p - s).collect();
        assert_eq!(delta, expected);
    }

    #[test]
    fn samples_that_do_not_split_into_the_steps_are_refused() {
        let (model, data) = setup();
        let params = model.init(1);
        let inner = InnerSteps { steps: 3, optimizer: OptimizerConfig::sgd(0.1) };
        let err = pseudo_gradient(&model, &data, &params, &[0, 1, 2, 3], &inner, false, &mut Vec::new())
            .unwrap_err();
        assert_eq!(err.to_string(), "4 samples do not split into 3 equal mini-batches");
    }
}
