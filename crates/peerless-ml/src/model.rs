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

pub use burn::tensor::Gradients;
use burn::tensor::module::{conv2d, linear, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData, activation, loss};
use peerless_core::flat::Layout;
use peerless_core::rng::Rng;

use crate::data::{Batch, Dataset};
use crate::spec::LenetGeom;
pub use crate::spec::{Arch, Backend, ModelError, ModelSpec, Result};

#[allow(deprecated)] // burn marks ndarray deprecated in favour of flex; we measured both.
fn device(backend: Backend) -> Device {
    match backend {
        Backend::Ndarray | Backend::Auto => Device::ndarray(),
        Backend::Flex => Device::flex(),
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
        let (layout, lenet) = spec.build()?;
        let backend = backend.resolve();
        let device = device(backend);
        let train_device = device.clone().autodiff();
        Ok(Model { spec, layout, backend, device, train_device, lenet })
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
        let (loss, mut grads) = self.forward_backward(&prepared, batch)?;
        self.flatten_grads(&prepared, &mut grads, grad)?;
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

    /// Step phase 3, *flatten*: moves the gradients out of `grads` into one flat vector.
    pub fn flatten_grads(&self, p: &Prepared, grads: &mut Gradients, out: &mut [f32]) -> Result<()> {
        if out.len() != self.layout.len() {
            return Err(ModelError::ParamLength {
                model: self.id(),
                expected: self.layout.len(),
                got: out.len(),
            });
        }
        for (e, t) in self.layout.entries().iter().zip(&p.params) {
            let n: usize = e.shape.iter().product();
            t.write_grad(grads, self.backend == Backend::Ndarray, &mut out[e.offset..e.offset + n])?;
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
        let k = self.spec.classes;
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        const CHUNK: usize = 1000;
        for start in (0..total).step_by(CHUNK) {
            let end = (start + CHUNK).min(total);
            let chunk = data.range(start, end)?;
            let n = self.check_batch(&chunk.x, &chunk.y, data.shape)?;
            let logits = read_f32(self.forward(&p, &chunk.x, n, dev))?;
            for (row, &label) in logits.chunks_exact(k).zip(&chunk.y) {
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
    /// Moves this parameter's gradient out of `grads` into `out` (zeros when it got none);
    /// `views` when the backend hands gradients back as transposed views (ndarray).
    fn write_grad(&self, grads: &mut Gradients, views: bool, out: &mut [f32]) -> Result<()> {
        let data = match self {
            Param::D1(t) => t.grad_remove(grads).map(|g| row_major(g, views)),
            Param::D2(t) => t.grad_remove(grads).map(|g| row_major(g, views)),
            Param::D4(t) => t.grad_remove(grads).map(|g| row_major(g, views)),
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

/// Reads a tensor back as row-major data. On the ndarray backend (`views`) the gradient of an
/// `[in, out]` weight comes back as a transposed view; reading it element by element is ~60×
/// slower than materialising it first, and `* 1.0` materialises it row-major. (Measured with
/// `peerless bench step`: without it the MLP step spends 72 % of its time here. Storing weights
/// `[out, in]` instead does not help: the gradient then stays column-major through `* 1.0`.)
/// flex copies a view into row-major order itself, and hands a tensor it alone holds over
/// without a copy, so there the multiplication would only be one more pass.
fn row_major<const D: usize>(t: Tensor<D>, views: bool) -> TensorData {
    if views { (t * 1.0).into_data() } else { t.into_data() }
}

fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data().try_into_vec::<f32>().map_err(|e| ModelError::Backend(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DatasetName, load};

    /// A deterministic synthetic batch: `n` samples of `features` values in [-1, 1], labels
    /// cycling through `classes`.
    fn synthetic_batch(n: usize, features: usize, classes: usize, seed: u64) -> Batch {
        let mut rng = Rng::derive(seed, "model-test-batch", 0);
        let x = (0..n * features).map(|_| (rng.f64() * 2.0 - 1.0) as f32).collect();
        let y = (0..n).map(|i| (i % classes) as u8).collect();
        Batch { x, y, shape: [1, 1, features] }
    }

    fn digits_batch(n: usize) -> (Dataset, Batch) {
        let split = load(DatasetName::Digits, std::path::Path::new("/unused")).unwrap();
        let idx: Vec<usize> = (0..n).map(|i| (i * 37) % split.train.len()).collect();
        let batch = split.train.gather(&idx).unwrap();
        (split.train, batch)
    }

    #[test]
    fn from_id_round_trips_every_arch() {
        let ids = [
            "logreg-64-10",
            "logreg-784-10",
            "mlp-784-256-128-10",
            "mlp-64-32-10",
            "mlp-64-10",
            "lenet-1x28x28-10",
            "lenet-1x8x8-10",
            "lenet-3x32x32-100",
        ];
        for id in ids {
            let spec = ModelSpec::from_id(id).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(spec.id(), id);
            Model::new(spec, Backend::Auto).unwrap_or_else(|e| panic!("{id}: {e}"));
        }
        // Spec -> id -> spec: the id keeps everything but the [c, h, w] split of a dense
        // model's input, which comes back as [1, 1, features].
        for arch in [Arch::Logreg, Arch::Mlp, Arch::Lenet] {
            for input in [[1, 8, 8], [1, 28, 28]] {
                let spec = ModelSpec::new(arch, input, 10);
                let back = ModelSpec::from_id(&spec.id()).unwrap();
                assert_eq!(back.id(), spec.id());
                let expected_input = if arch == Arch::Lenet { input } else { [1, 1, input[1] * input[2]] };
                assert_eq!(back, ModelSpec { input: expected_input, ..spec });
            }
        }
        let custom = ModelSpec { hidden: vec![7, 5, 3], ..ModelSpec::new(Arch::Mlp, [1, 4, 4], 4) };
        assert_eq!(ModelSpec::from_id(&custom.id()).unwrap().hidden, [7, 5, 3]);
    }

    #[test]
    fn from_id_rejects_garbage_naming_the_problem() {
        let cases = [
            ("", "unknown architecture \"\""),
            ("resnet-64-10", "unknown architecture \"resnet\""),
            ("logreg", "logreg takes 2 numbers, got 0"),
            ("logreg-64", "logreg takes 2 numbers, got 1"),
            ("logreg-64-10-3", "logreg takes 2 numbers, got 3"),
            ("logreg-+64-10", "feature count \"+64\""),
            ("logreg-064-10", "feature count \"064\""),
            ("logreg-64-10 ", "class count \"10 \""),
            ("logreg-64-1", "1 classes"),
            ("logreg-64-0", "class count \"0\""),
            ("mlp-0-10", "feature count \"0\""),
            ("mlp-784", "mlp takes a feature count and a class count"),
            ("mlp-784-x-10", "hidden width \"x\""),
            ("mlp-784--10", "hidden width \"\""),
            ("mlp-99999999999999999999999-10", "feature count \"99999999999999999999999\""),
            ("lenet-28x28-10", "lenet input \"28x28\" is not <c>x<h>x<w>"),
            ("lenet-1x28x28x3-10", "is not <c>x<h>x<w>"),
            ("lenet-1x28x-10", "width \"\""),
            ("lenet-1x28x28", "lenet takes <c>x<h>x<w> and a class count, got 1 parts"),
            ("lenet-4294967296x4294967296x4294967296-10", "overflows"),
            ("MLP-784-10", "unknown architecture \"MLP\""),
        ];
        for (id, why) in cases {
            let err = ModelSpec::from_id(id).expect_err(id);
            let msg = err.to_string();
            assert!(matches!(err, ModelError::Config(_)), "{id}: {err:?}");
            assert!(msg.starts_with(&format!("model id {id:?} is invalid (")), "{id}: {msg}");
            assert!(msg.contains(why), "{id}: expected {why:?} in {msg}");
            assert!(msg.contains("expected e.g. logreg-64-10"), "{msg}");
        }
    }

    /// Central finite differences of the f32 loss against the analytic gradient on a few
    /// coordinates: in each parameter tensor, the coordinate with the largest |gradient|.
    ///
    /// Tolerance: the loss is ≈ 1 (3 classes) and computed in f32, so each evaluation is off by
    /// at most ~1e-6 (a few ulps per reduction); with h = 1e-2 the rounding error of the
    /// central difference is ≤ 2e-6 / 2h = 1e-4, and the truncation error h²/6 · |L'''| is of
    /// the same order for these inputs (|x| ≤ 1, |θ| ≲ 0.5). Checking only coordinates with
    /// |g| ≥ 1e-2 therefore bounds the relative error by ≈ 1e-2 in the worst case (measured:
    /// absolute errors 2–5e-6, relative ≤ 1.5e-4). The perturbed value is rounded to f32, so
    /// the step actually taken is used.
    fn check_gradient(model: &Model, params: &[f32], batch: &Batch, h: f32) {
        let (loss, grad) = model.loss_and_grad(params, batch).unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{loss}");
        let loss_at = |p: &[f32]| f64::from(model.loss_and_grad(p, batch).unwrap().0);
        for e in model.layout().entries() {
            let range = e.offset..e.offset + e.len();
            let i = range.clone().max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs())).unwrap();
            let g = f64::from(grad[i]);
            assert!(g.abs() >= 1e-2, "{}[{}]: gradient {g} too small for a meaningful check", e.name, i);
            let (mut plus, mut minus) = (params.to_vec(), params.to_vec());
            plus[i] += h;
            minus[i] -= h;
            let step = f64::from(plus[i]) - f64::from(minus[i]);
            let fd = (loss_at(&plus) - loss_at(&minus)) / step;
            let rel = (fd - g).abs() / fd.abs().max(g.abs());
            assert!(
                rel < 1e-2,
                "{}[{}]: finite difference {fd}, analytic {g}, relative error {rel}",
                e.name,
                i
            );
        }
    }

    #[test]
    fn logreg_gradient_matches_finite_differences() {
        let spec = ModelSpec::new(Arch::Logreg, [1, 1, 6], 3);
        let model = Model::new(spec, Backend::Ndarray).unwrap();
        let params = model.init(11);
        check_gradient(&model, &params, &synthetic_batch(8, 6, 3, 1), 1e-2);
    }

    #[test]
    fn mlp_gradient_matches_finite_differences() {
        let spec = ModelSpec { hidden: vec![5], ..ModelSpec::new(Arch::Mlp, [1, 1, 6], 3) };
        let model = Model::new(spec, Backend::Ndarray).unwrap();
        let params = model.init(12);
        let batch = synthetic_batch(8, 6, 3, 2);
        let h = 1e-2f32;
        // ReLU has a kink at 0: make sure no hidden pre-activation is within reach of a
        // perturbation (a first-layer weight moves it by h·|x| ≤ h, a bias by h), so the loss
        // is smooth along every perturbed coordinate and finite differences apply.
        let (w, b) = (model.layout().get("fc0.weight").unwrap(), model.layout().get("fc0.bias").unwrap());
        for (s, x) in batch.x.chunks_exact(6).enumerate() {
            for j in 0..5 {
                let a: f64 = f64::from(params[b.offset + j])
                    + (0..6).map(|i| f64::from(x[i]) * f64::from(params[w.offset + i * 5 + j])).sum::<f64>();
                assert!(
                    a.abs() > 2.0 * f64::from(h),
                    "sample {s} unit {j}: pre-activation {a} near the kink"
                );
            }
        }
        check_gradient(&model, &params, &batch, h);
    }

    #[test]
    fn gradients_are_deterministic_bit_for_bit() {
        let (train, batch) = digits_batch(32);
        for (arch, backend) in
            [(Arch::Mlp, Backend::Ndarray), (Arch::Lenet, Backend::Flex), (Arch::Logreg, Backend::Flex)]
        {
            let model = Model::new(ModelSpec::new(arch, train.shape, train.classes), backend).unwrap();
            let params = model.init(5);
            let (l1, g1) = model.loss_and_grad(&params, &batch).unwrap();
            let (l2, g2) = model.loss_and_grad(&params, &batch).unwrap();
            let mut g3 = vec![f32::NAN; model.num_params()];
            let l3 = model.loss_and_grad_into(&params, &batch, &mut g3).unwrap();
            assert_eq!(l1.to_bits(), l2.to_bits(), "{arch}");
            assert_eq!(l1.to_bits(), l3.to_bits(), "{arch}");
            let bits = |g: &[f32]| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&g1), bits(&g2), "{arch}: gradient differs between two identical calls");
            assert_eq!(bits(&g1), bits(&g3), "{arch}: loss_and_grad_into differs from loss_and_grad");
            assert!(g1.iter().all(|v| v.is_finite()) && g1.iter().any(|&v| v != 0.0), "{arch}");
        }
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let (train, batch) = digits_batch(4);
        let model =
            Model::new(ModelSpec::new(Arch::Mlp, train.shape, train.classes), Backend::Ndarray).unwrap();
        let params = model.init(1);
        let n = model.num_params();

        let err = model.loss_and_grad(&params[..n - 1], &batch).unwrap_err();
        assert!(
            matches!(err, ModelError::ParamLength { expected, got, .. } if expected == n && got == n - 1)
        );
        assert_eq!(
            err.to_string(),
            format!("parameters for mlp-64-256-128-10 have {} values, expected {n}", n - 1)
        );
        assert!(matches!(model.evaluate(&[], &train), Err(ModelError::ParamLength { got: 0, .. })));
        let mut short = vec![0.0; n + 1];
        assert!(matches!(
            model.loss_and_grad_into(&params, &batch, &mut short),
            Err(ModelError::ParamLength { .. })
        ));

        let bad_batch = |b: Batch, want: &str| {
            let err = model.loss_and_grad(&params, &b).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ModelError::BadBatch { .. }), "{msg}");
            assert!(msg.starts_with("batch for mlp-64-256-128-10: "), "{msg}");
            assert!(msg.contains(want), "expected {want:?} in {msg}");
        };
        bad_batch(
            Batch { shape: [1, 4, 16], ..batch.clone() },
            "input shape [1, 4, 16], model expects [1, 8, 8]",
        );
        bad_batch(
            Batch { x: batch.x[1..].to_vec(), ..batch.clone() },
            "255 input values for 4 labels of 64 features",
        );
        bad_batch(Batch { x: Vec::new(), y: Vec::new(), shape: batch.shape }, "empty batch");
        let mut labels = batch.clone();
        labels.y[2] = 10;
        bad_batch(labels, "label 10 out of range for 10 classes");
        let mut nan = batch.clone();
        nan.x[70] = f32::NAN;
        bad_batch(nan, "non-finite input value NaN at index 70");
        let mut inf = batch.clone();
        inf.x[0] = f32::NEG_INFINITY;
        bad_batch(inf, "non-finite input value -inf at index 0");
    }
}
