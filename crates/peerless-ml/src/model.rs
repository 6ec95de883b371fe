//! Models on burn over flat parameter vectors: logistic regression, MLP, LeNet-5-style CNN.
//!
//! A [`Model`] owns no parameters. Parameters live in one flat `f32` vector described by the
//! model's [`Layout`]; every call builds burn tensors from slices of it (one `memcpy` per
//! parameter), runs forward and backward on burn's autodiff CPU backend, and writes the
//! gradient back into one flat vector. That keeps models interchangeable with the rest of
//! peerless, which averages, checksums and ships flat vectors without knowing the model.
//!
//! Weights are stored `[in, out]` (burn's `linear` convention, `y = x W + b`) and convolution
//! kernels `[out_c, in_c, kh, kw]`. Initialisation follows PyTorch's defaults for `nn.Linear`
//! and `nn.Conv2d` (uniform in ±1/√fan_in), drawn from the seeded [`Rng`], so the same seed
//! gives the same parameters on every backend and machine.

use std::fmt;
use std::str::FromStr;

pub use burn::tensor::Gradients;
use burn::tensor::module::{conv2d, linear, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData, activation, loss};
use peerless_core::flat::Layout;
use peerless_core::rng::Rng;
use serde::{Deserialize, Serialize};

use crate::data::{Batch, Dataset};

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
/// Measured here (`peerless bench step`, `cargo bench --bench step`): for dense models ndarray
/// with OpenBLAS is the fastest (MLP step ≈ PyTorch's), while its convolutions are ~25× slower
/// than flex's (LeNet on digits: 836 vs 20,000 samples/s). `auto` picks per architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// ndarray for logistic regression and MLP, flex for the CNN.
    #[default]
    Auto,
    /// burn's ndarray backend with OpenBLAS (deprecated upstream, fastest for dense layers).
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

impl Backend {
    /// The concrete backend for `arch` (resolves `auto`).
    pub fn resolve(self, arch: Arch) -> Backend {
        match (self, arch) {
            (Backend::Auto, Arch::Lenet) => Backend::Flex,
            (Backend::Auto, _) => Backend::Ndarray,
            (b, _) => b,
        }
    }

    #[allow(deprecated)] // burn marks ndarray deprecated in favour of flex; we measured both.
    fn device(self) -> Device {
        match self {
            Backend::Ndarray | Backend::Auto => Device::ndarray(),
            Backend::Flex => Device::flex(),
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
}

/// LeNet geometry, derived from the input size: conv1 pads by 2 (as LeNet-5 on 28×28 MNIST
/// does, emulating the original 32×32 input); conv2 is unpadded when the pooled map is large
/// enough (≥ 5), else padded by 2 so small inputs such as 8×8 digits still fit.
#[derive(Debug, Clone, Copy)]
struct LenetGeom {
    pad2: usize,
    flat: usize,
}

impl LenetGeom {
    fn new([_, h, w]: [usize; 3]) -> Result<Self> {
        if h < 4 || w < 4 {
            return Err(ModelError::Config(format!("lenet needs inputs of at least 4×4, got {h}×{w}")));
        }
        let (h1, w1) = (h / 2, w / 2); // after conv1 (same) + pool
        let pad2 = if h1 >= 5 && w1 >= 5 { 0 } else { 2 };
        let (h2, w2) = ((h1 + 2 * pad2 - 4) / 2, (w1 + 2 * pad2 - 4) / 2);
        Ok(LenetGeom { pad2, flat: 16 * h2 * w2 })
    }
}

/// A model: its spec, its layout, and the burn devices it runs on. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Model {
    spec: ModelSpec,
    layout: Layout,
    backend: Backend,
    device: Device,
    train_device: Device,
    lenet: Option<LenetGeom>,
}

impl Model {
    /// Builds the model for `spec` on `backend`.
    pub fn new(spec: ModelSpec, backend: Backend) -> Result<Self> {
        let [c, h, w] = spec.input;
        let features = c * h * w;
        if features == 0 || spec.classes < 2 {
            return Err(ModelError::Config(format!(
                "needs a non-empty input and at least 2 classes, got {:?} and {}",
                spec.input, spec.classes
            )));
        }
        let mut entries: Vec<(String, Vec<usize>)> = Vec::new();
        let mut lenet = None;
        match spec.arch {
            Arch::Logreg => {
                entries.push(("fc.weight".into(), vec![features, spec.classes]));
                entries.push(("fc.bias".into(), vec![spec.classes]));
            }
            Arch::Mlp => {
                if spec.hidden.contains(&0) {
                    return Err(ModelError::Config("mlp hidden widths must be positive".into()));
                }
                let mut fan_in = features;
                for (i, &n) in spec.hidden.iter().chain([&spec.classes]).enumerate() {
                    entries.push((format!("fc{i}.weight"), vec![fan_in, n]));
                    entries.push((format!("fc{i}.bias"), vec![n]));
                    fan_in = n;
                }
            }
            Arch::Lenet => {
                let g = LenetGeom::new(spec.input)?;
                entries.push(("conv1.weight".into(), vec![6, c, 5, 5]));
                entries.push(("conv1.bias".into(), vec![6]));
                entries.push(("conv2.weight".into(), vec![16, 6, 5, 5]));
                entries.push(("conv2.bias".into(), vec![16]));
                for (i, (a, b)) in [(g.flat, 120), (120, 84), (84, spec.classes)].into_iter().enumerate() {
                    entries.push((format!("fc{i}.weight"), vec![a, b]));
                    entries.push((format!("fc{i}.bias"), vec![b]));
                }
                lenet = Some(g);
            }
        }
        let backend = backend.resolve(spec.arch);
        let device = backend.device();
        let train_device = device.clone().autodiff();
        Ok(Model { spec, layout: Layout::new(entries), backend, device, train_device, lenet })
    }

    /// The spec this model was built from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The model's stable id (see [`ModelSpec::id`]).
    pub fn id(&self) -> String {
        self.spec.id()
    }

    /// The backend it runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Names, shapes and offsets of the parameters in the flat vector.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.layout.len()
    }

    /// Fresh parameters: PyTorch's default init (uniform ±1/√fan_in for weights and biases),
    /// drawn from `seed`.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = Rng::derive(seed, "model-init", 0);
        let mut params = vec![0f32; self.layout.len()];
        for e in self.layout.entries() {
            let fan_in = if e.name.ends_with(".bias") {
                // The bias's fan-in is that of its weight, the entry just before it.
                self.layout
                    .get(&e.name.replace(".bias", ".weight"))
                    .map(|w| weight_fan_in(&w.shape))
                    .expect("invariant: every bias follows its weight")
            } else {
                weight_fan_in(&e.shape)
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            let n: usize = e.shape.iter().product();
            for p in &mut params[e.offset..e.offset + n] {
                *p = ((rng.f64() * 2.0 - 1.0) * bound) as f32;
            }
        }
        params
    }

    fn check_params(&self, params: &[f32]) -> Result<()> {
        if params.len() != self.layout.len() {
            return Err(ModelError::ParamLength {
                model: self.id(),
                expected: self.layout.len(),
                got: params.len(),
            });
        }
        Ok(())
    }

    fn check_batch(&self, x: &[f32], y: &[u8], shape: [usize; 3]) -> Result<usize> {
        let bad = |reason: String| ModelError::BadBatch { model: self.id(), reason };
        if shape != self.spec.input {
            return Err(bad(format!("input shape {shape:?}, model expects {:?}", self.spec.input)));
        }
        let features = shape.iter().product::<usize>();
        let n = y.len();
        if n == 0 {
            return Err(bad("empty batch".into()));
        }
        if x.len() != n * features {
            return Err(bad(format!("{} input values for {n} labels of {features} features", x.len())));
        }
        if let Some(l) = y.iter().find(|&&l| usize::from(l) >= self.spec.classes) {
            return Err(bad(format!("label {l} out of range for {} classes", self.spec.classes)));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("non-finite input value {} at index {i}", x[i])));
        }
        Ok(n)
    }

    /// Builds one parameter tensor per layout entry on `device`, leaves marked for gradients
    /// when `train`.
    fn param_tensors(&self, params: &[f32], device: &Device, train: bool) -> Vec<Param> {
        self.layout
            .entries()
            .iter()
            .map(|e| {
                let n: usize = e.shape.iter().product();
                let data = params[e.offset..e.offset + n].to_vec();
                let p = match e.shape.len() {
                    1 => Param::D1(Tensor::<1>::from_data(TensorData::new(data, [n]), device)),
                    2 => Param::D2(Tensor::<2>::from_data(
                        TensorData::new(data, [e.shape[0], e.shape[1]]),
                        device,
                    )),
                    4 => Param::D4(Tensor::<4>::from_data(
                        TensorData::new(data, [e.shape[0], e.shape[1], e.shape[2], e.shape[3]]),
                        device,
                    )),
                    r => unreachable!("layouts only hold rank 1, 2 and 4 parameters, got {r}"),
                };
                if train { p.require_grad() } else { p }
            })
            .collect()
    }

    /// Logits `[n, classes]` for inputs `x` (`n × features`).
    fn forward(&self, p: &[Param], x: &[f32], n: usize, device: &Device) -> Tensor<2> {
        let [c, h, w] = self.spec.input;
        match self.spec.arch {
            Arch::Logreg => {
                let x = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [n, c * h * w]), device);
                linear(x, p[0].d2(), Some(p[1].d1()))
            }
            Arch::Mlp => {
                let mut a = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [n, c * h * w]), device);
                let layers = p.len() / 2;
                for l in 0..layers {
                    // [n, in] -> [n, out]
                    a = linear(a, p[2 * l].d2(), Some(p[2 * l + 1].d1()));
                    if l + 1 < layers {
                        a = activation::relu(a);
                    }
                }
                a
            }
            Arch::Lenet => {
                let g = self.lenet.expect("invariant: lenet geometry set for lenet");
                let x = Tensor::<4>::from_data(TensorData::new(x.to_vec(), [n, c, h, w]), device);
                let pool = || MaxPoolOptions::new([2, 2]);
                // [n, c, h, w] -> [n, 6, h/2, w/2]
                let a = conv2d(x, p[0].d4(), Some(p[1].d1()), ConvOptions::new([1, 1], [2, 2], [1, 1], 1));
                let a = max_pool2d(activation::relu(a), pool());
                // -> [n, 16, h2, w2]
                let a = conv2d(
                    a,
                    p[2].d4(),
                    Some(p[3].d1()),
                    ConvOptions::new([1, 1], [g.pad2, g.pad2], [1, 1], 1),
                );
                let a = max_pool2d(activation::relu(a), pool());
                let a: Tensor<2> = a.reshape([n, g.flat]);
                let a = activation::relu(linear(a, p[4].d2(), Some(p[5].d1())));
                let a = activation::relu(linear(a, p[6].d2(), Some(p[7].d1())));
                linear(a, p[8].d2(), Some(p[9].d1()))
            }
        }
    }

    fn one_hot(&self, y: &[u8], device: &Device) -> Tensor<2> {
        let k = self.spec.classes;
        let mut t = vec![0f32; y.len() * k];
        for (i, &l) in y.iter().enumerate() {
            t[i * k + usize::from(l)] = 1.0;
        }
        Tensor::<2>::from_data(TensorData::new(t, [y.len(), k]), device)
    }

    /// Mean cross-entropy loss on `batch` and its gradient as a flat vector.
    pub fn loss_and_grad(&self, params: &[f32], batch: &Batch) -> Result<(f32, Vec<f32>)> {
        let mut grad = vec![0f32; self.layout.len()];
        let loss = self.loss_and_grad_into(params, batch, &mut grad)?;
        Ok((loss, grad))
    }

    /// As [`Model::loss_and_grad`], writing the gradient into `grad` (reused across steps).
    pub fn loss_and_grad_into(&self, params: &[f32], batch: &Batch, grad: &mut [f32]) -> Result<f32> {
        let prepared = self.prepare(params)?;
        let (loss, grads) = self.forward_backward(&prepared, batch)?;
        self.flatten_grads(&prepared, &grads, grad)?;
        Ok(loss)
    }

    /// Step phase 1, *load*: builds the parameter tensors from the flat vector.
    pub fn prepare(&self, params: &[f32]) -> Result<Prepared> {
        self.check_params(params)?;
        Ok(Prepared { params: self.param_tensors(params, &self.train_device, true) })
    }

    /// Step phase 2, *compute*: forward, loss, backward. The loss is the batch mean of the
    /// cross-entropy.
    pub fn forward_backward(&self, p: &Prepared, batch: &Batch) -> Result<(f32, Gradients)> {
        let n = self.check_batch(&batch.x, &batch.y, batch.shape)?;
        let dev = &self.train_device;
        let logits = self.forward(&p.params, &batch.x, n, dev);
        let loss = loss::cross_entropy_with_logits(logits, self.one_hot(&batch.y, dev));
        let grads = loss.backward();
        let loss_value = read_f32(loss.without_autodiff())?[0];
        Ok((loss_value, grads))
    }

    /// Step phase 3, *flatten*: copies the gradients into one flat vector.
    pub fn flatten_grads(&self, p: &Prepared, grads: &Gradients, out: &mut [f32]) -> Result<()> {
        if out.len() != self.layout.len() {
            return Err(ModelError::ParamLength {
                model: self.id(),
                expected: self.layout.len(),
                got: out.len(),
            });
        }
        for (e, t) in self.layout.entries().iter().zip(&p.params) {
            let n: usize = e.shape.iter().product();
            t.write_grad(grads, &mut out[e.offset..e.offset + n])?;
        }
        Ok(())
    }

    /// Mean cross-entropy loss and accuracy of `params` on all of `data`, in chunks of
    /// `chunk` samples, without autodiff.
    pub fn evaluate(&self, params: &[f32], data: &Dataset) -> Result<(f32, f32)> {
        self.check_params(params)?;
        let total = data.len();
        if total == 0 {
            return Err(ModelError::BadBatch { model: self.id(), reason: "empty evaluation set".into() });
        }
        let dev = &self.device;
        let p = self.param_tensors(params, dev, false);
        let features = data.features();
        let k = self.spec.classes;
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        const CHUNK: usize = 1000;
        for start in (0..total).step_by(CHUNK) {
            let end = (start + CHUNK).min(total);
            let x = &data.images[start * features..end * features];
            let y = &data.labels[start..end];
            let n = self.check_batch(x, y, data.shape)?;
            let logits = read_f32(self.forward(&p, x, n, dev))?;
            for (row, &label) in logits.chunks_exact(k).zip(y) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = max as f64 + row.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln();
                loss_sum += lse - row[usize::from(label)] as f64;
                let arg =
                    row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
                correct += usize::from(arg == usize::from(label));
            }
        }
        Ok(((loss_sum / total as f64) as f32, correct as f32 / total as f32))
    }
}

/// Fan-in of a weight of shape `[in, out]` or `[out_c, in_c, kh, kw]`.
fn weight_fan_in(shape: &[usize]) -> usize {
    match shape {
        [i, _] => *i,
        [_, ic, kh, kw] => ic * kh * kw,
        other => other.iter().product(),
    }
}

/// Parameters loaded into burn tensors, ready for [`Model::forward_backward`].
#[derive(Debug, Clone)]
pub struct Prepared {
    params: Vec<Param>,
}

/// A parameter tensor of the ranks our layouts use.
#[derive(Debug, Clone)]
enum Param {
    D1(Tensor<1>),
    D2(Tensor<2>),
    D4(Tensor<4>),
}

impl Param {
    fn require_grad(self) -> Self {
        match self {
            Param::D1(t) => Param::D1(t.require_grad()),
            Param::D2(t) => Param::D2(t.require_grad()),
            Param::D4(t) => Param::D4(t.require_grad()),
        }
    }
    fn d1(&self) -> Tensor<1> {
        match self {
            Param::D1(t) => t.clone(),
            _ => unreachable!("invariant: rank-1 parameter expected"),
        }
    }
    fn d2(&self) -> Tensor<2> {
        match self {
            Param::D2(t) => t.clone(),
            _ => unreachable!("invariant: rank-2 parameter expected"),
        }
    }
    fn d4(&self) -> Tensor<4> {
        match self {
            Param::D4(t) => t.clone(),
            _ => unreachable!("invariant: rank-4 parameter expected"),
        }
    }
    /// Copies this parameter's gradient into `out` (zeros when it got none).
    fn write_grad(&self, grads: &Gradients, out: &mut [f32]) -> Result<()> {
        let data = match self {
            Param::D1(t) => t.grad(grads).map(contiguous_data),
            Param::D2(t) => t.grad(grads).map(contiguous_data),
            Param::D4(t) => t.grad(grads).map(contiguous_data),
        };
        match data {
            Some(d) => {
                let s = d.as_slice::<f32>().map_err(|e| ModelError::Backend(format!("{e:?}")))?;
                if s.len() != out.len() {
                    return Err(ModelError::Backend(format!(
                        "gradient has {} values, parameter {}",
                        s.len(),
                        out.len()
                    )));
                }
                out.copy_from_slice(s);
            }
            None => out.fill(0.0),
        }
        Ok(())
    }
}

/// Reads a tensor back as row-major data. On the ndarray backend the gradient of an `[in, out]`
/// weight comes back as a transposed view; reading it element by element is ~60× slower than
/// materialising it first, and `* 1.0` materialises it row-major. (Measured with
/// `peerless bench step`: without it the MLP step spends 72 % of its time here. Storing weights
/// `[out, in]` instead does not help: the gradient then stays column-major through `* 1.0`.)
fn contiguous_data<const D: usize>(t: Tensor<D>) -> TensorData {
    (t * 1.0).into_data()
}

fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data().try_into_vec::<f32>().map_err(|e| ModelError::Backend(format!("{e:?}")))
}
