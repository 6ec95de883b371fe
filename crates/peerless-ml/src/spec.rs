//! What a model is, without burn: architecture, backend choice, [`ModelSpec`] with its id
//! (parsed by [`ModelSpec::from_id`]) and parameter [`Layout`], and [`ModelError`].
//!
//! Everything here builds without the `burn` feature, so that the model-id parser can be
//! fuzzed (and the run configuration parsed) without compiling burn.

use std::fmt;
use std::str::FromStr;

use peerless_core::flat::Layout;
use serde::{Deserialize, Serialize};

/// Errors from model construction and evaluation. Every one names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The flat parameter vector does not match the model's layout.
    #[error("parameters for {model} have {got} values, expected {expected}")]
    ParamLength {
        /// Model id.
        model: String,
        /// Layout length.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// A batch whose shape does not fit the model.
    #[error("batch for {model}: {reason}")]
    BadBatch {
        /// Model id.
        model: String,
        /// What is wrong.
        reason: String,
    },
    /// The model configuration cannot be built.
    #[error("model {0}")]
    Config(String),
    /// Reading a tensor back from the backend failed.
    #[error("backend read-back failed: {0}")]
    Backend(String),
    /// Reading the data of a batch failed.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Which architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Multinomial logistic regression: one linear layer.
    Logreg,
    /// Multi-layer perceptron with ReLU; hidden sizes from [`ModelSpec::hidden`].
    Mlp,
    /// LeNet-5-style CNN: conv(6,5×5)–pool–conv(16,5×5)–pool–fc 120–fc 84–fc classes.
    Lenet,
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::Logreg => "logreg",
            Arch::Mlp => "mlp",
            Arch::Lenet => "lenet",
        })
    }
}

impl FromStr for Arch {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "logreg" | "logistic" => Ok(Arch::Logreg),
            "mlp" => Ok(Arch::Mlp),
            "lenet" | "cnn" => Ok(Arch::Lenet),
            other => Err(ModelError::Config(format!(
                "unknown model {other:?}; expected one of: logreg, mlp, lenet"
            ))),
        }
    }
}

/// The CPU backend burn runs on, chosen at run time.
///
/// Measured here (`peerless bench step`, release builds, MLP 784-256-128-10, batch 64, one
/// thread as in a function instance): flex 1,058 steps/s, ndarray on OpenBLAS 918, ndarray on
/// matrixmultiply 844, PyTorch 755; OpenBLAS on two threads 1,116 against flex's 1,024. ndarray's
/// convolutions are ~25× slower than flex's (LeNet on digits: 836 vs 20,000 samples/s). So
/// `auto` is flex for every model, in every build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// flex (the fastest measured, for every model).
    #[default]
    Auto,
    /// burn's ndarray backend (deprecated upstream): matrixmultiply's kernels, or OpenBLAS's
    /// in a `--features openblas` build.
    Ndarray,
    /// burn's newer flex backend (fastest for convolutions).
    Flex,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Ndarray => "ndarray",
            Backend::Flex => "flex",
        })
    }
}

impl FromStr for Backend {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Backend::Auto),
            "ndarray" => Ok(Backend::Ndarray),
            "flex" => Ok(Backend::Flex),
            other => {
                Err(ModelError::Config(format!("unknown backend {other:?}; expected auto, ndarray or flex")))
            }
        }
    }
}

/// Whether this build's ndarray backend runs its dense kernels on OpenBLAS (feature `openblas`).
pub const OPENBLAS: bool = cfg!(feature = "openblas");

impl Backend {
    /// What computes this backend's matrix products in this build.
    pub fn kernels(self) -> &'static str {
        match self {
            Backend::Ndarray if OPENBLAS => "ndarray + OpenBLAS",
            Backend::Ndarray => "ndarray + matrixmultiply (pure Rust)",
            Backend::Flex => "flex (pure Rust)",
            Backend::Auto => "auto",
        }
    }

    /// The concrete backend (resolves `auto`).
    pub fn resolve(self) -> Backend {
        match self {
            Backend::Auto => Backend::Flex,
            b => b,
        }
    }
}

/// Everything that determines a model's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Architecture.
    pub arch: Arch,
    /// Input shape `[channels, height, width]`.
    pub input: [usize; 3],
    /// Number of classes.
    pub classes: usize,
    /// Hidden layer widths (MLP only).
    pub hidden: Vec<usize>,
}

impl ModelSpec {
    /// A spec for `arch` on inputs of `input` shape with `classes` outputs; the MLP gets the
    /// default hidden widths 256-128.
    pub fn new(arch: Arch, input: [usize; 3], classes: usize) -> Self {
        ModelSpec { arch, input, classes, hidden: vec![256, 128] }
    }

    /// A stable id naming architecture and shape, e.g. `mlp-784-256-128-10`. Checkpoints and
    /// gradients carry it so that parameters of another model are refused.
    pub fn id(&self) -> String {
        let [c, h, w] = self.input;
        match self.arch {
            Arch::Logreg => format!("logreg-{}-{}", c * h * w, self.classes),
            Arch::Mlp => {
                let mut s = format!("mlp-{}", c * h * w);
                for n in &self.hidden {
                    s += &format!("-{n}");
                }
                s + &format!("-{}", self.classes)
            }
            Arch::Lenet => format!("lenet-{c}x{h}x{w}-{}", self.classes),
        }
    }

    /// Parses a model id (see [`ModelSpec::id`]): `logreg-<features>-<classes>`,
    /// `mlp-<features>[-<hidden>…]-<classes>` or `lenet-<c>x<h>x<w>-<classes>`.
    ///
    /// The logreg and MLP ids carry only the flattened feature count, so their spec gets the
    /// input shape `[1, 1, features]`; a caller that knows the dataset replaces it with the
    /// dataset's `[c, h, w]` after checking the product matches. Numbers must be written
    /// canonically (decimal digits, no sign, no leading zeros) and be positive, with at least
    /// 2 classes, so that `ModelSpec::from_id(id)?.id() == id` for every accepted id.
    pub fn from_id(id: &str) -> Result<ModelSpec> {
        let bad = |why: String| {
            ModelError::Config(format!(
                "id {id:?} is invalid ({why}); expected e.g. logreg-64-10, \
                 mlp-784-256-128-10 or lenet-1x28x28-10"
            ))
        };
        let num = |what: &str, s: &str| -> Result<usize> {
            let canonical = !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && !(s.len() > 1 && s.starts_with('0'));
            match s.parse::<usize>() {
                Ok(n) if canonical && n > 0 => Ok(n),
                _ => Err(bad(format!("{what} {s:?} is not a positive decimal number"))),
            }
        };
        let parts: Vec<&str> = id.split('-').collect();
        let (arch, rest) = match parts.split_first() {
            Some((a, rest)) => (*a, rest),
            None => return Err(bad("empty".into())),
        };
        let arch = match arch {
            "logreg" => Arch::Logreg,
            "mlp" => Arch::Mlp,
            "lenet" => Arch::Lenet,
            other => {
                return Err(bad(format!("unknown architecture {other:?}; expected logreg, mlp or lenet")));
            }
        };
        let classes_of = |s: &str| -> Result<usize> {
            let k = num("class count", s)?;
            if k < 2 {
                return Err(bad(format!("{k} classes; at least 2 are needed")));
            }
            Ok(k)
        };
        let spec = match (arch, rest) {
            (Arch::Logreg, [features, classes]) => {
                ModelSpec::new(arch, [1, 1, num("feature count", features)?], classes_of(classes)?)
            }
            (Arch::Logreg, _) => return Err(bad(format!("logreg takes 2 numbers, got {}", rest.len()))),
            (Arch::Mlp, [features, hidden @ .., classes]) => ModelSpec {
                arch,
                input: [1, 1, num("feature count", features)?],
                classes: classes_of(classes)?,
                hidden: hidden.iter().map(|h| num("hidden width", h)).collect::<Result<_>>()?,
            },
            (Arch::Mlp, _) => return Err(bad("mlp takes a feature count and a class count".into())),
            (Arch::Lenet, [shape, classes]) => {
                let dims: Vec<&str> = shape.split('x').collect();
                let [c, h, w] = dims[..] else {
                    return Err(bad(format!("lenet input {shape:?} is not <c>x<h>x<w>")));
                };
                let input = [num("channels", c)?, num("height", h)?, num("width", w)?];
                ModelSpec::new(arch, input, classes_of(classes)?)
            }
            (Arch::Lenet, _) => {
                return Err(bad(format!(
                    "lenet takes <c>x<h>x<w> and a class count, got {} parts",
                    rest.len()
                )));
            }
        };
        let [c, h, w] = spec.input;
        if c.checked_mul(h).and_then(|ch| ch.checked_mul(w)).is_none() {
            return Err(bad(format!("input {c}x{h}x{w} overflows")));
        }
        Ok(spec)
    }

    /// The flat parameter layout of this model: names, shapes and offsets, in order.
    ///
    /// # Errors
    /// [`ModelError::Config`] when the spec cannot be built (no input, fewer than 2 classes,
    /// a zero hidden width, a LeNet input under 4×4, or a parameter count that overflows).
    pub fn layout(&self) -> Result<Layout> {
        Ok(self.build()?.0)
    }

    /// The layout, and the LeNet geometry for a CNN.
    pub(crate) fn build(&self) -> Result<(Layout, Option<LenetGeom>)> {
        let [c, h, w] = self.input;
        let features = c.checked_mul(h).and_then(|ch| ch.checked_mul(w)).unwrap_or(0);
        if features == 0 || self.classes < 2 {
            return Err(ModelError::Config(format!(
                "needs a non-empty input and at least 2 classes, got {:?} and {}",
                self.input, self.classes
            )));
        }
        let mut entries: Vec<(String, Vec<usize>)> = Vec::new();
        let mut lenet = None;
        match self.arch {
            Arch::Logreg => {
                entries.push(("fc.weight".into(), vec![features, self.classes]));
                entries.push(("fc.bias".into(), vec![self.classes]));
            }
            Arch::Mlp => {
                if self.hidden.contains(&0) {
                    return Err(ModelError::Config("mlp hidden widths must be positive".into()));
                }
                let mut fan_in = features;
                for (i, &n) in self.hidden.iter().chain([&self.classes]).enumerate() {
                    entries.push((format!("fc{i}.weight"), vec![fan_in, n]));
                    entries.push((format!("fc{i}.bias"), vec![n]));
                    fan_in = n;
                }
            }
            Arch::Lenet => {
                let g = LenetGeom::new(self.input)?;
                entries.push(("conv1.weight".into(), vec![6, c, 5, 5]));
                entries.push(("conv1.bias".into(), vec![6]));
                entries.push(("conv2.weight".into(), vec![16, 6, 5, 5]));
                entries.push(("conv2.bias".into(), vec![16]));
                for (i, (a, b)) in [(g.flat, 120), (120, 84), (84, self.classes)].into_iter().enumerate() {
                    entries.push((format!("fc{i}.weight"), vec![a, b]));
                    entries.push((format!("fc{i}.bias"), vec![b]));
                }
                lenet = Some(g);
            }
        }
        let layout = Layout::try_new(entries)
            .map_err(|e| ModelError::Config(format!("{} cannot be built: {e}", self.id())))?;
        Ok((layout, lenet))
    }
}

/// LeNet geometry, derived from the input size: conv1 pads by 2 (as LeNet-5 on 28×28 MNIST
/// does, emulating the original 32×32 input); conv2 is unpadded when the pooled map is large
/// enough (≥ 5), else padded by 2 so small inputs such as 8×8 digits still fit.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "burn"), allow(dead_code))] // read by the model
pub(crate) struct LenetGeom {
    pub(crate) pad2: usize,
    pub(crate) flat: usize,
}

impl LenetGeom {
    pub(crate) fn new([_, h, w]: [usize; 3]) -> Result<Self> {
        if h < 4 || w < 4 {
            return Err(ModelError::Config(format!("lenet needs inputs of at least 4×4, got {h}×{w}")));
        }
        let (h1, w1) = (h / 2, w / 2); // after conv1 (same) + pool
        let pad2 = if h1 >= 5 && w1 >= 5 { 0 } else { 2 };
        let (h2, w2) = ((h1 + 2 * pad2 - 4) / 2, (w1 + 2 * pad2 - 4) / 2);
        let flat = h2
            .checked_mul(w2)
            .and_then(|n| n.checked_mul(16))
            .ok_or_else(|| ModelError::Config(format!("lenet input {h}×{w} overflows")))?;
        Ok(LenetGeom { pad2, flat })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id that parses can still describe a model too big to lay out; that was a panic in
    /// `Layout::new` (through `Model::new`), reachable from a gradient request's `model`.
    #[test]
    fn an_overflowing_layout_is_an_error_not_a_panic() {
        for id in ["mlp-64-18446744073709551615-10", "mlp-4294967296-4294967296-10"] {
            let spec = ModelSpec::from_id(id).unwrap();
            let err = spec.layout().unwrap_err().to_string();
            assert!(err.contains("cannot be built") && err.contains("overflows"), "{id}: {err}");
        }
        assert_eq!(
            ModelSpec::from_id("mlp-64-32-10").unwrap().layout().unwrap().len(),
            64 * 32 + 32 + 32 * 10 + 10
        );
        let huge_lenet = ModelSpec::new(Arch::Lenet, [1, usize::MAX / 2, 8], 10);
        assert!(huge_lenet.layout().is_err());
    }
}
