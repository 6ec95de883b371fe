//! The checks of a gradient request that need no I/O: field syntax, and the fit of model and dataset.

use peerless_core::flat::Digest;
use peerless_core::function::GradientRequest;
use peerless_ml::data::DataError;
use peerless_ml::{Arch, Backend, Dataset, DatasetName, ModelError, ModelSpec};

use super::error::{GradientError, invalid};

/// A request's fields, parsed.
pub(super) struct Parsed {
    pub(super) dataset: DatasetName,
    pub(super) spec: ModelSpec,
    pub(super) backend: Backend,
    pub(super) digest: Digest,
}

/// Checks every field that can be checked without I/O.
pub(super) fn parse(req: &GradientRequest) -> Result<Parsed, GradientError> {
    let dataset: DatasetName =
        req.dataset.parse().map_err(|e: DataError| invalid("dataset", e.to_string()))?;
    // `ModelError::Config` displays as "model <reason>"; the field name already says which.
    let reason = |e: ModelError| match e {
        ModelError::Config(r) => r,
        other => other.to_string(),
    };
    let spec = ModelSpec::from_id(&req.model).map_err(|e| invalid("model", reason(e)))?;
    let backend: Backend = req.backend.parse().map_err(|e| invalid("backend", reason(e)))?;
    let digest: Digest = req
        .params_digest
        .parse()
        .map_err(|e| invalid("params_digest", format!("{:?}: {e}", req.params_digest)))?;
    if req.indices.is_empty() {
        return Err(invalid("indices", "empty batch: at least one sample index is needed"));
    }
    if u32::try_from(req.indices.len()).is_err() {
        return Err(invalid("indices", format!("{} samples do not fit the response", req.indices.len())));
    }
    for (field, value) in
        [("params_key", &req.params_key), ("output_key", &req.output_key), ("store.url", &req.store.url)]
    {
        if value.trim().is_empty() {
            return Err(invalid(field, "empty"));
        }
    }
    if let Some(inner) = &req.inner {
        let steps = inner.steps as usize;
        if steps == 0 || !req.indices.len().is_multiple_of(steps) {
            return Err(invalid(
                "inner.steps",
                format!("{} samples do not split into {steps} equal mini-batches", req.indices.len()),
            ));
        }
        inner.optimizer.validate().map_err(|e| invalid("inner.optimizer", e.to_string()))?;
    }
    if req.output_key == req.params_key {
        return Err(invalid("output_key", format!("{:?} is also the parameters key", req.output_key)));
    }
    Ok(Parsed { dataset, spec, backend, digest })
}

/// The first index that is not in `data`, as an error naming it.
pub(super) fn check_indices(indices: &[u32], data: &Dataset) -> Result<(), GradientError> {
    match indices.iter().position(|&i| usize::try_from(i).map_or(true, |i| i >= data.len())) {
        Some(position) => Err(GradientError::IndexOutOfRange {
            position,
            index: indices[position],
            dataset: data.name.clone(),
            len: data.len(),
        }),
        None => Ok(()),
    }
}

/// The spec with the dataset's input shape, or why the model does not fit the dataset.
pub(super) fn fit_to_dataset(
    mut spec: ModelSpec,
    id: &str,
    data: &Dataset,
) -> Result<ModelSpec, GradientError> {
    let features = data.features();
    match spec.arch {
        Arch::Logreg | Arch::Mlp => {
            let [c, h, w] = spec.input;
            if c * h * w != features {
                return Err(invalid(
                    "model",
                    format!(
                        "{id} takes {} input features, but {} has {features} ({:?})",
                        c * h * w,
                        data.name,
                        data.shape
                    ),
                ));
            }
            spec.input = data.shape;
        }
        Arch::Lenet => {
            if spec.input != data.shape {
                return Err(invalid(
                    "model",
                    format!(
                        "{id} takes inputs of shape {:?}, but {} has {:?}",
                        spec.input, data.name, data.shape
                    ),
                ));
            }
        }
    }
    if spec.classes != data.classes {
        return Err(invalid(
            "model",
            format!("{id} has {} classes, but {} has {}", spec.classes, data.name, data.classes),
        ));
    }
    Ok(spec)
}
