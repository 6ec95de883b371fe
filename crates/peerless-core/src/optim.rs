//! SGD and Adam on flat `f32` vectors, with flat state that can be checkpointed and shipped.
//!
//! The update rules are those of PyTorch's `torch.optim.SGD` (no dampening) and
//! `torch.optim.Adam` (L2 weight decay, bias correction, no AMSGrad), following the operation
//! order of PyTorch's CPU kernels except for Adam's denominator (see `adam_kernel`). Vectors
//! are updated in `f32`; per-step scalars (bias corrections) are computed in `f64` with plain
//! IEEE operations (no `powf`), so an update is bit-reproducible across machines.

use serde::{Deserialize, Serialize};

use crate::flat::{FlatError, check_finite};

/// Which optimizer to use, with its hyperparameters.
///
/// Deserializes from e.g. `{ kind = "adam", lr = 3e-4 }`; omitted fields take the documented
/// defaults and unknown fields are rejected. Call [`OptimizerConfig::validate`] (or
/// [`Optimizer::new`], which does) before use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// Stochastic gradient descent with optional (Nesterov) momentum, as `torch.optim.SGD`.
    Sgd {
        /// Learning rate. Default 0.02.
        #[serde(default = "defaults::sgd_lr")]
        lr: f64,
        /// Momentum factor in `[0, 1)`; 0 disables the momentum buffer. Default 0.9.
        #[serde(default = "defaults::sgd_momentum")]
        momentum: f64,
        /// L2 penalty added to the gradient (`g + weight_decay * p`). Default 0.
        #[serde(default)]
        weight_decay: f64,
        /// Use Nesterov momentum (requires `momentum > 0`). Default false.
        #[serde(default)]
        nesterov: bool,
    },
    /// Adam with L2 weight decay, as `torch.optim.Adam` (not AdamW).
    Adam {
        /// Learning rate. Default 1e-3.
        #[serde(default = "defaults::adam_lr")]
        lr: f64,
        /// Decay rate of the first-moment average, in `[0, 1)`. Default 0.9.
        #[serde(default = "defaults::adam_beta1")]
        beta1: f64,
        /// Decay rate of the second-moment average, in `[0, 1)`. Default 0.999.
        #[serde(default = "defaults::adam_beta2")]
        beta2: f64,
        /// Added to the denominator for numerical stability; positive. Default 1e-8.
        #[serde(default = "defaults::adam_eps")]
        eps: f64,
        /// L2 penalty added to the gradient (`g + weight_decay * p`). Default 0.
        #[serde(default)]
        weight_decay: f64,
    },
}

mod defaults {
    pub fn sgd_lr() -> f64 {
        0.02
    }
    pub fn sgd_momentum() -> f64 {
        0.9
    }
    pub fn adam_lr() -> f64 {
        1e-3
    }
    pub fn adam_beta1() -> f64 {
        0.9
    }
    pub fn adam_beta2() -> f64 {
        0.999
    }
    pub fn adam_eps() -> f64 {
        1e-8
    }
}

/// Errors from configuring, stepping or restoring an [`Optimizer`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimError {
    /// A hyperparameter is out of range.
    #[error("{key} = {value}: {reason}")]
    InvalidConfig {
        /// Dotted config key, e.g. `"optimizer.lr"`.
        key: String,
        /// The rejected value, as written.
        value: String,
        /// What the value must satisfy.
        reason: String,
    },
    /// Parameters or gradient have the wrong length, or the gradient is not finite.
    #[error(transparent)]
    Flat(#[from] FlatError),
    /// A saved [`OptimizerState`] does not fit this optimizer.
    #[error("optimizer state does not fit this {kind} optimizer over {n} parameters: {reason}")]
    StateMismatch {
        /// This optimizer's kind (`"sgd"` / `"adam"`).
        kind: String,
        /// This optimizer's parameter count.
        n: usize,
        /// What does not fit.
        reason: String,
    },
}

impl OptimizerConfig {
    /// SGD with learning rate `lr` and the other defaults (momentum 0.9).
    pub fn sgd(lr: f64) -> Self {
        OptimizerConfig::Sgd { lr, momentum: defaults::sgd_momentum(), weight_decay: 0.0, nesterov: false }
    }

    /// Adam with learning rate `lr` and the other defaults.
    pub fn adam(lr: f64) -> Self {
        OptimizerConfig::Adam {
            lr,
            beta1: defaults::adam_beta1(),
            beta2: defaults::adam_beta2(),
            eps: defaults::adam_eps(),
            weight_decay: 0.0,
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerConfig::Sgd { lr, .. } | OptimizerConfig::Adam { lr, .. } => lr,
        }
    }

    /// The same config with learning rate `lr`.
    pub fn with_lr(mut self, new_lr: f64) -> Self {
        match &mut self {
            OptimizerConfig::Sgd { lr, .. } | OptimizerConfig::Adam { lr, .. } => *lr = new_lr,
        }
        self
    }

    /// `"sgd"` or `"adam"`: the serde tag, also [`OptimizerState::kind`].
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd { .. } => "sgd",
            OptimizerConfig::Adam { .. } => "adam",
        }
    }

    /// Checks every hyperparameter's range; the error names the offending key.
    pub fn validate(&self) -> Result<(), OptimError> {
        fn bad(key: &str, value: impl ToString, reason: &str) -> Result<(), OptimError> {
            Err(OptimError::InvalidConfig {
                key: format!("optimizer.{key}"),
                value: value.to_string(),
                reason: reason.to_string(),
            })
        }
        fn unit(key: &str, x: f64) -> Result<(), OptimError> {
            if (0.0..1.0).contains(&x) { Ok(()) } else { bad(key, x, "must be in [0, 1)") }
        }
        fn weight_decay(x: f64) -> Result<(), OptimError> {
            if x >= 0.0 && x.is_finite() {
                Ok(())
            } else {
                bad("weight_decay", x, "must be non-negative and finite")
            }
        }
        let lr = self.lr();
        if !(lr > 0.0 && lr.is_finite()) {
            return bad("lr", lr, "must be positive and finite");
        }
        match *self {
            OptimizerConfig::Sgd { momentum, weight_decay: wd, nesterov, .. } => {
                unit("momentum", momentum)?;
                weight_decay(wd)?;
                if nesterov && momentum == 0.0 {
                    return bad("nesterov", nesterov, "requires momentum > 0");
                }
            }
            OptimizerConfig::Adam { beta1, beta2, eps, weight_decay: wd, .. } => {
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                if !(eps > 0.0 && eps.is_finite()) {
                    return bad("eps", eps, "must be positive and finite");
                }
                weight_decay(wd)?;
            }
        }
        Ok(())
    }

    /// Names of the state buffers, in [`OptimizerState::buffers`] order.
    fn buffer_names(&self) -> &'static [&'static str] {
        match *self {
            OptimizerConfig::Sgd { momentum: 0.0, .. } => &[],
            OptimizerConfig::Sgd { .. } => &["momentum"],
            OptimizerConfig::Adam { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }
}

/// An optimizer's full mutable state, flat, for checkpoints and for shipping to another
/// process.
///
/// - SGD with momentum > 0: one buffer `"momentum"` (length n). It holds zeros until the first
///   step, which sets it to the (weight-decayed) gradient, as PyTorch does; it is only read
///   once `steps > 0`. SGD with momentum 0 has no buffers.
/// - Adam: `"exp_avg"` then `"exp_avg_sq"` (each length n), zeros before the first step.
///
/// Hyperparameters are not part of the state; they come from the [`OptimizerConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    /// [`OptimizerConfig::name`] of the optimizer that produced it.
    pub kind: String,
    /// Steps taken so far.
    pub steps: u64,
    /// Named state vectors, in a fixed order per kind.
    pub buffers: Vec<(String, Vec<f32>)>,
}

/// An optimizer over a flat parameter vector of fixed length.
#[derive(Debug, Clone)]
pub struct Optimizer {
    config: OptimizerConfig,
    n: usize,
    steps: u64,
    /// One vector of length `n` per name in `config.buffer_names()`, in that order.
    buffers: Vec<Vec<f32>>,
}

impl Optimizer {
    /// A fresh optimizer over `n` parameters; validates `config`.
    pub fn new(config: OptimizerConfig, n: usize) -> Result<Self, OptimError> {
        config.validate()?;
        let buffers = config.buffer_names().iter().map(|_| vec![0.0f32; n]).collect();
        Ok(Optimizer { config, n, steps: 0, buffers })
    }

    /// The configuration.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// The number of parameters this optimizer was built for.
    pub fn num_params(&self) -> usize {
        self.n
    }

    /// Changes the learning rate (for schedules) without touching the state.
    pub fn set_lr(&mut self, lr: f64) -> Result<(), OptimError> {
        let config = self.config.clone().with_lr(lr);
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// How many `f32`s its state holds (every buffer of [`OptimizerState`]).
    pub fn state_floats(&self) -> usize {
        self.buffers.len() * self.n
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update of `params` from `grad`.
    ///
    /// Both must have [`Optimizer::num_params`] elements and `grad` must be finite; all of
    /// this is checked before anything is modified, so on error `params`, the state and the
    /// step count are unchanged.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) -> Result<(), OptimError> {
        self.step_each(params, grad, |_| ())
    }

    /// [`Optimizer::step`], piece by piece: `updated` sees each piece of `params` right after
    /// it changed, while it is in cache (consecutive pieces of [`STEP_PIECE`] elements, the
    /// last one shorter). The result is bit for bit [`Optimizer::step`]'s.
    pub fn step_each(
        &mut self,
        params: &mut [f32],
        grad: &[f32],
        mut updated: impl FnMut(&[f32]),
    ) -> Result<(), OptimError> {
        for (what, len) in [("parameters", params.len()), ("gradient", grad.len())] {
            if len != self.n {
                return Err(
                    FlatError::LengthMismatch { what: what.to_string(), expected: self.n, got: len }.into()
                );
            }
        }
        check_finite("gradient", grad)?;
        let kernel = self.kernel();
        for start in (0..self.n).step_by(STEP_PIECE) {
            let r = start..(start + STEP_PIECE).min(self.n);
            let (p, g) = (&mut params[r.clone()], &grad[r.clone()]);
            match (kernel, self.buffers.as_mut_slice()) {
                (Kernel::Sgd(h, _), []) => sgd_plain(p, g, h),
                (Kernel::Sgd(h, nesterov), [buf]) if self.steps == 0 => {
                    sgd_first(p, g, &mut buf[r.clone()], h, nesterov)
                }
                (Kernel::Sgd(h, nesterov), [buf]) => sgd_momentum(p, g, &mut buf[r.clone()], h, nesterov),
                (Kernel::Adam(h), [exp_avg, exp_avg_sq]) if h.wd == 0.0 => {
                    adam_kernel::<false>(p, g, &mut exp_avg[r.clone()], &mut exp_avg_sq[r.clone()], h)
                }
                (Kernel::Adam(h), [exp_avg, exp_avg_sq]) => {
                    adam_kernel::<true>(p, g, &mut exp_avg[r.clone()], &mut exp_avg_sq[r.clone()], h)
                }
                _ => unreachable!("invariant: sgd has at most one buffer, adam exactly two"),
            }
            updated(&params[r]);
        }
        self.steps += 1;
        Ok(())
    }

    /// The kernel of the next step and its scalars.
    fn kernel(&self) -> Kernel {
        match self.config {
            OptimizerConfig::Sgd { lr, momentum, weight_decay, nesterov } => Kernel::Sgd(
                SgdScalars { lr: lr as f32, momentum: momentum as f32, wd: weight_decay as f32 },
                nesterov,
            ),
            OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay } => {
                let t = self.steps + 1;
                let bias_correction1 = 1.0 - pow_u64(beta1, t);
                let bias_correction2 = 1.0 - pow_u64(beta2, t);
                let bias_correction2_sqrt = bias_correction2.sqrt();
                Kernel::Adam(AdamScalars {
                    one_minus_beta1: (1.0 - beta1) as f32,
                    beta2: beta2 as f32,
                    one_minus_beta2: (1.0 - beta2) as f32,
                    step_size: (lr * bias_correction2_sqrt / bias_correction1) as f32,
                    eps: (eps * bias_correction2_sqrt) as f32,
                    wd: weight_decay as f32,
                })
            }
        }
    }

    /// A copy of the full state (see [`OptimizerState`]).
    pub fn state(&self) -> OptimizerState {
        OptimizerState {
            kind: self.config.name().to_string(),
            steps: self.steps,
            buffers: self
                .config
                .buffer_names()
                .iter()
                .map(|s| s.to_string())
                .zip(self.buffers.iter().cloned())
                .collect(),
        }
    }

    /// Replaces the state with `state`, after checking its kind, buffer names and lengths,
    /// and that the buffers are finite. On error nothing changes.
    pub fn load_state(&mut self, state: OptimizerState) -> Result<(), OptimError> {
        let kind = self.config.name();
        let mismatch =
            |reason: String| OptimError::StateMismatch { kind: kind.to_string(), n: self.n, reason };
        if state.kind != kind {
            return Err(mismatch(format!("state is for {:?}", state.kind)));
        }
        let want = self.config.buffer_names();
        let got: Vec<&str> = state.buffers.iter().map(|(name, _)| name.as_str()).collect();
        if got != want {
            return Err(mismatch(format!("buffers are {got:?}, expected {want:?}")));
        }
        for (name, buf) in &state.buffers {
            if buf.len() != self.n {
                return Err(mismatch(format!("buffer {name:?} has {} elements", buf.len())));
            }
            check_finite(&format!("optimizer state buffer {name:?}"), buf)?;
        }
        self.steps = state.steps;
        self.buffers = state.buffers.into_iter().map(|(_, b)| b).collect();
        Ok(())
    }
}

/// `base^exp` by repeated squaring: only IEEE multiplications, so identical on every machine
/// (unlike `powf`, whose last bit depends on the libm).
fn pow_u64(base: f64, mut exp: u64) -> f64 {
    let mut acc = 1.0;
    let mut b = base;
    while exp > 0 {
        if exp & 1 == 1 {
            acc *= b;
        }
        b *= b;
        exp >>= 1;
    }
    acc
}

/// Elements per piece of [`Optimizer::step_each`]: a piece of the parameters, the gradient
/// and two buffers (64 KB) stays in a core's L2 cache while it is used again.
pub const STEP_PIECE: usize = 4096;

/// Which update a step makes, with its scalars.
#[derive(Clone, Copy)]
enum Kernel {
    /// SGD with its scalars, and whether the momentum is Nesterov's.
    Sgd(SgdScalars, bool),
    Adam(AdamScalars),
}

#[derive(Clone, Copy)]
struct SgdScalars {
    lr: f32,
    momentum: f32,
    wd: f32,
}

// The kernels below are zips over equal-length slices with no branches in the loop body
// (weight decay and Nesterov are hoisted), which LLVM vectorizes. Operation order follows
// PyTorch: d = g + wd*p; buf = momentum*buf + d; d = d + momentum*buf (Nesterov) or buf;
// p = p + (-lr)*d.

fn sgd_plain(params: &mut [f32], grad: &[f32], h: SgdScalars) {
    let neg_lr = -h.lr;
    if h.wd == 0.0 {
        for (p, &g) in params.iter_mut().zip(grad) {
            *p += neg_lr * g;
        }
    } else {
        for (p, &g) in params.iter_mut().zip(grad) {
            *p += neg_lr * (g + h.wd * *p);
        }
    }
}

/// First momentum step: `buf = d` (PyTorch initializes the buffer with the gradient).
fn sgd_first(params: &mut [f32], grad: &[f32], buf: &mut [f32], h: SgdScalars, nesterov: bool) {
    let neg_lr = -h.lr;
    let wd = h.wd;
    let m = h.momentum;
    for ((p, &g), b) in params.iter_mut().zip(grad).zip(buf.iter_mut()) {
        let d = if wd == 0.0 { g } else { g + wd * *p };
        *b = d;
        let step = if nesterov { d + m * d } else { d };
        *p += neg_lr * step;
    }
}

fn sgd_momentum(params: &mut [f32], grad: &[f32], buf: &mut [f32], h: SgdScalars, nesterov: bool) {
    match (h.wd == 0.0, nesterov) {
        (true, false) => sgd_momentum_kernel::<false, false>(params, grad, buf, h),
        (true, true) => sgd_momentum_kernel::<false, true>(params, grad, buf, h),
        (false, false) => sgd_momentum_kernel::<true, false>(params, grad, buf, h),
        (false, true) => sgd_momentum_kernel::<true, true>(params, grad, buf, h),
    }
}

#[inline(always)]
fn sgd_momentum_kernel<const WD: bool, const NESTEROV: bool>(
    params: &mut [f32],
    grad: &[f32],
    buf: &mut [f32],
    h: SgdScalars,
) {
    let neg_lr = -h.lr;
    let m = h.momentum;
    for ((p, &g), b) in params.iter_mut().zip(grad).zip(buf.iter_mut()) {
        let d = if WD { g + h.wd * *p } else { g };
        *b = *b * m + d;
        let step = if NESTEROV { d + m * *b } else { *b };
        *p += neg_lr * step;
    }
}

#[derive(Clone, Copy)]
struct AdamScalars {
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `lr * sqrt(bc2) / bc1`.
    step_size: f32,
    /// `eps * sqrt(bc2)`.
    eps: f32,
    wd: f32,
}

/// PyTorch's single-tensor Adam, per element:
/// `g += wd*p; m = m + (1-β1)(g - m)` (its `lerp_`); `v = v*β2 + (1-β2)*g*g`;
/// `p = p - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)`.
///
/// The last line is evaluated in the algebraically identical form
/// `p - (lr*sqrt(bc2)/bc1) * m / (sqrt(v) + eps*sqrt(bc2))`, with the scalars folded in f64:
/// one division per element instead of two. Division and square root share one slow unit,
/// so this is what keeps a step over ~235k parameters well under 0.3 ms on baseline x86-64.
#[inline(always)]
fn adam_kernel<const WD: bool>(
    params: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    h: AdamScalars,
) {
    for (((p, &g), m), v) in params.iter_mut().zip(grad).zip(exp_avg.iter_mut()).zip(exp_avg_sq.iter_mut()) {
        let g = if WD { g + h.wd * *p } else { g };
        *m += h.one_minus_beta1 * (g - *m);
        *v = *v * h.beta2 + h.one_minus_beta2 * g * g;
        *p -= h.step_size * *m / (v.sqrt() + h.eps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P0: [f32; 3] = [1.0, -2.0, 0.5];
    const GRADS: [[f32; 3]; 3] = [[0.1, 0.2, -0.3], [-0.5, 0.25, 1.0], [0.0, -1.0, 2.0]];

    /// Runs three steps from `P0` and compares each step's parameters with `expected`,
    /// which was computed in f64 straight from the PyTorch update formulas (python, see the
    /// call sites), so the tolerance only absorbs f32 rounding.
    fn check_trajectory(config: OptimizerConfig, expected: [[f64; 3]; 3]) {
        let mut opt = Optimizer::new(config.clone(), 3).unwrap();
        let mut p = P0;
        for (step, (g, want)) in GRADS.iter().zip(expected).enumerate() {
            opt.step(&mut p, g).unwrap();
            for (i, (got, want)) in p.iter().zip(want).enumerate() {
                assert!(
                    (f64::from(*got) - want).abs() < 2e-6,
                    "{config:?} step {step} param {i}: {got} vs {want}"
                );
            }
        }
        assert_eq!(opt.steps(), 3);
    }

    // Reference (python, f64):
    //   d = g + wd*p; buf = d if first else mom*buf + d; d = d + mom*buf if nesterov else buf
    //   p = p - lr*d
    #[test]
    fn sgd_matches_pytorch_formulas() {
        let sgd = |momentum, weight_decay, nesterov| OptimizerConfig::Sgd {
            lr: 0.1,
            momentum,
            weight_decay,
            nesterov,
        };
        check_trajectory(
            sgd(0.9, 0.01, false),
            [
                [0.989, -2.018, 0.5295],
                [1.028111, -2.057182, 0.4555205],
                [1.062282789, -1.990388618, 0.1884834295],
            ],
        );
        check_trajectory(
            sgd(0.9, 0.01, true),
            [
                [0.9791, -2.0342, 0.55605],
                [1.06332971, -2.09241502, 0.388888505],
                [1.0929973125510002, -1.930163729462, -0.0517952836595],
            ],
        );
        check_trajectory(
            sgd(0.0, 0.0, false),
            [[0.99, -2.02, 0.53], [1.04, -2.045, 0.43], [1.04, -1.945, 0.23]],
        );
    }

    // Reference (python, f64): g = g + wd*p; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g
    //   p = p - lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)
    #[test]
    fn adam_matches_pytorch_formulas() {
        check_trajectory(
            OptimizerConfig::Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 },
            [
                [0.9900000004999999, -2.0, 0.5099999996],
                [0.9936703327599067, -2.00744136613146, 0.5043102880972279],
                [0.9950563961174915, -2.0012979554519887, 0.49660867800140274],
            ],
        );
        // Without weight decay the first Adam step moves every coordinate by ~lr against
        // the gradient's sign.
        let mut opt = Optimizer::new(OptimizerConfig::adam(0.01), 3).unwrap();
        let mut p = P0;
        opt.step(&mut p, &GRADS[0]).unwrap();
        let moved: Vec<f32> = p.iter().zip(P0).map(|(a, b)| a - b).collect();
        for (d, g) in moved.iter().zip(GRADS[0]) {
            assert!((d + 0.01 * g.signum()).abs() < 1e-6, "{moved:?}");
        }
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| r.normal() as f32).collect()
    }

    /// One optimizer of each kind: SGD with Nesterov momentum and weight decay, with momentum,
    /// plain; Adam with weight decay.
    fn kinds() -> [OptimizerConfig; 4] {
        [
            OptimizerConfig::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4, nesterov: true },
            OptimizerConfig::sgd(0.1),
            OptimizerConfig::Sgd { lr: 0.05, momentum: 0.0, weight_decay: 0.0, nesterov: false },
            OptimizerConfig::Adam { lr: 1e-3, beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.01 },
        ]
    }

    #[test]
    fn a_step_in_pieces_shows_each_piece_updated_and_equals_steps_of_the_pieces_alone() {
        let n = 2 * STEP_PIECE + 5;
        for config in kinds() {
            let mut whole = Optimizer::new(config.clone(), n).unwrap();
            let mut p = pseudo_random(n, 1);
            let mut alone: Vec<(Optimizer, Vec<f32>)> = p
                .chunks(STEP_PIECE)
                .map(|c| (Optimizer::new(config.clone(), c.len()).unwrap(), c.to_vec()))
                .collect();
            for s in 0..3 {
                let g = pseudo_random(n, 10 + s);
                let mut seen = Vec::new();
                whole.step_each(&mut p, &g, |piece| seen.push(piece.to_vec())).unwrap();
                assert_eq!(seen.iter().map(Vec::len).collect::<Vec<_>>(), vec![STEP_PIECE, STEP_PIECE, 5]);
                assert_eq!(seen.concat(), p, "the pieces shown are the updated parameters, in order");
                for ((o, q), g) in alone.iter_mut().zip(g.chunks(STEP_PIECE)) {
                    o.step(q, g).unwrap();
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let pieces: Vec<f32> = alone.iter().flat_map(|(_, q)| q.clone()).collect();
                assert_eq!(bits(&p), bits(&pieces), "{config:?} step {s}");
            }
        }
    }

    #[test]
    fn state_round_trip_gives_bit_identical_next_step() {
        let n = 1003;
        for config in kinds() {
            let mut a = Optimizer::new(config.clone(), n).unwrap();
            let mut p = pseudo_random(n, 1);
            for s in 0..3 {
                a.step(&mut p, &pseudo_random(n, 10 + s)).unwrap();
            }
            let state = a.state();
            assert_eq!(state.kind, config.name());
            assert_eq!(state.steps, 3);

            let mut b = Optimizer::new(config.clone(), n).unwrap();
            b.load_state(state.clone()).unwrap();
            assert_eq!(b.state(), state);
            let mut pa = p.clone();
            let mut pb = p;
            let g = pseudo_random(n, 99);
            a.step(&mut pa, &g).unwrap();
            b.step(&mut pb, &g).unwrap();
            assert_eq!(crate::flat::digest(&pa), crate::flat::digest(&pb), "{config:?}");
            assert_eq!(a.state(), b.state());
        }
    }

    #[test]
    fn state_before_first_step_is_explicit_zeros() {
        let s = Optimizer::new(OptimizerConfig::sgd(0.1), 2).unwrap().state();
        assert_eq!(
            s,
            OptimizerState { kind: "sgd".into(), steps: 0, buffers: vec![("momentum".into(), vec![0.0; 2])] }
        );
        let plain = OptimizerConfig::Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0, nesterov: false };
        assert!(Optimizer::new(plain, 2).unwrap().state().buffers.is_empty());
        let names: Vec<String> = Optimizer::new(OptimizerConfig::adam(0.1), 2)
            .unwrap()
            .state()
            .buffers
            .into_iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(names, ["exp_avg", "exp_avg_sq"]);
    }

    #[test]
    fn load_state_rejects_wrong_kind_names_lengths_and_nan() {
        let mut opt = Optimizer::new(OptimizerConfig::adam(0.1), 4).unwrap();
        let good = opt.state();
        let sgd_state = Optimizer::new(OptimizerConfig::sgd(0.1), 4).unwrap().state();
        let err = opt.load_state(sgd_state).unwrap_err();
        assert!(err.to_string().contains("state is for \"sgd\""), "{err}");

        let mut renamed = good.clone();
        renamed.buffers.swap(0, 1);
        assert!(
            opt.load_state(renamed)
                .unwrap_err()
                .to_string()
                .contains("expected [\"exp_avg\", \"exp_avg_sq\"]")
        );

        let mut short = good.clone();
        short.buffers[1].1.pop();
        let err = opt.load_state(short).unwrap_err();
        assert_eq!(
            err.to_string(),
            "optimizer state does not fit this adam optimizer over 4 parameters: buffer \"exp_avg_sq\" has 3 elements"
        );

        let mut nan = good.clone();
        nan.steps = 7;
        nan.buffers[0].1[2] = f32::NAN;
        assert!(matches!(opt.load_state(nan), Err(OptimError::Flat(FlatError::NonFinite { index: 2, .. }))));
        assert_eq!(opt.state(), good, "failed loads change nothing");
    }

    #[test]
    fn step_rejects_nan_gradient_and_leaves_everything_unchanged() {
        for config in [OptimizerConfig::sgd(0.1), OptimizerConfig::adam(0.1)] {
            let mut opt = Optimizer::new(config, 600).unwrap();
            let mut p = pseudo_random(600, 3);
            opt.step(&mut p, &pseudo_random(600, 4)).unwrap();
            let (p_before, state_before) = (p.clone(), opt.state());

            let mut g = pseudo_random(600, 5);
            g[517] = f32::NAN;
            let err = opt.step(&mut p, &g).unwrap_err();
            assert!(matches!(err, OptimError::Flat(FlatError::NonFinite { index: 517, .. })), "{err:?}");
            assert_eq!(err.to_string(), "gradient: non-finite value NaN at index 517");
            g[517] = f32::NEG_INFINITY;
            assert!(opt.step(&mut p, &g).is_err());

            let err = opt.step(&mut p, &g[..599]).unwrap_err();
            assert_eq!(err.to_string(), "gradient: expected 600 elements, got 599");
            let err = opt.step(&mut p[..10], &g).unwrap_err();
            assert_eq!(err.to_string(), "parameters: expected 600 elements, got 10");

            assert_eq!(crate::flat::to_le_bytes(&p), crate::flat::to_le_bytes(&p_before));
            assert_eq!(opt.state(), state_before);
        }
    }

    #[test]
    fn validation_errors_name_the_key() {
        let cases: [(OptimizerConfig, &str); 10] = [
            (OptimizerConfig::sgd(-0.1), "optimizer.lr = -0.1: must be positive and finite"),
            (OptimizerConfig::adam(0.0), "optimizer.lr = 0: must be positive and finite"),
            (OptimizerConfig::sgd(f64::NAN), "optimizer.lr = NaN: must be positive and finite"),
            (
                OptimizerConfig::Sgd { lr: 0.1, momentum: 1.0, weight_decay: 0.0, nesterov: false },
                "optimizer.momentum = 1: must be in [0, 1)",
            ),
            (
                OptimizerConfig::Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0, nesterov: true },
                "optimizer.nesterov = true: requires momentum > 0",
            ),
            (
                OptimizerConfig::Sgd { lr: 0.1, momentum: 0.5, weight_decay: -1.0, nesterov: false },
                "optimizer.weight_decay = -1: must be non-negative and finite",
            ),
            (
                OptimizerConfig::Adam { lr: 0.1, beta1: -0.1, beta2: 0.9, eps: 1e-8, weight_decay: 0.0 },
                "optimizer.beta1 = -0.1: must be in [0, 1)",
            ),
            (
                OptimizerConfig::Adam { lr: 0.1, beta1: 0.9, beta2: 1.0, eps: 1e-8, weight_decay: 0.0 },
                "optimizer.beta2 = 1: must be in [0, 1)",
            ),
            (
                OptimizerConfig::Adam { lr: 0.1, beta1: 0.9, beta2: 0.9, eps: 0.0, weight_decay: 0.0 },
                "optimizer.eps = 0: must be positive and finite",
            ),
            (
                OptimizerConfig::Adam {
                    lr: 0.1,
                    beta1: 0.9,
                    beta2: 0.9,
                    eps: 1e-8,
                    weight_decay: f64::INFINITY,
                },
                "optimizer.weight_decay = inf: must be non-negative and finite",
            ),
        ];
        for (config, msg) in cases {
            assert_eq!(config.validate().unwrap_err().to_string(), msg);
            assert_eq!(Optimizer::new(config, 1).unwrap_err().to_string(), msg);
        }
        assert!(OptimizerConfig::sgd(0.1).validate().is_ok());
        assert!(OptimizerConfig::adam(1e-3).validate().is_ok());
    }

    #[test]
    fn config_helpers_and_set_lr() {
        let c = OptimizerConfig::adam(0.1).with_lr(0.2);
        assert_eq!((c.lr(), c.name()), (0.2, "adam"));
        assert_eq!(OptimizerConfig::sgd(0.3).name(), "sgd");
        let mut opt = Optimizer::new(OptimizerConfig::sgd(0.1), 1).unwrap();
        assert!(opt.set_lr(-1.0).is_err());
        assert_eq!(opt.config().lr(), 0.1);
        opt.set_lr(0.5).unwrap();
        assert_eq!(opt.config(), &OptimizerConfig::sgd(0.5));
        assert_eq!(opt.num_params(), 1);
    }

    #[test]
    fn pow_u64_matches_repeated_multiplication() {
        assert_eq!(pow_u64(0.9, 0), 1.0);
        assert_eq!(pow_u64(0.9, 1), 0.9);
        assert_eq!(pow_u64(0.5, 10), 1.0 / 1024.0);
        assert!((pow_u64(0.999, 1000) - 0.999f64.powi(1000)).abs() < 1e-14);
    }

    /// A minimal self-describing value so the serde attributes can be exercised without a
    /// format crate.
    mod value {
        use serde::de::value::{Error, MapDeserializer};
        use serde::de::{Deserializer, IntoDeserializer, Visitor};

        #[derive(Clone, Copy)]
        pub enum V {
            S(&'static str),
            F(f64),
            B(bool),
        }

        impl<'de> Deserializer<'de> for V {
            type Error = Error;
            fn deserialize_any<W: Visitor<'de>>(self, w: W) -> Result<W::Value, Error> {
                match self {
                    V::S(s) => w.visit_borrowed_str(s),
                    V::F(f) => w.visit_f64(f),
                    V::B(b) => w.visit_bool(b),
                }
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
                option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
                identifier ignored_any
            }
        }

        impl IntoDeserializer<'_, Error> for V {
            type Deserializer = V;
            fn into_deserializer(self) -> V {
                self
            }
        }

        pub fn parse<T: serde::de::DeserializeOwned>(fields: &[(&'static str, V)]) -> Result<T, Error> {
            T::deserialize(MapDeserializer::new(fields.iter().copied()))
        }
    }

    #[test]
    fn config_deserializes_with_defaults_and_rejects_unknown_fields() {
        use value::{V, parse};
        let c: OptimizerConfig = parse(&[("kind", V::S("sgd"))]).unwrap();
        assert_eq!(c, OptimizerConfig::Sgd { lr: 0.02, momentum: 0.9, weight_decay: 0.0, nesterov: false });
        let c: OptimizerConfig =
            parse(&[("kind", V::S("sgd")), ("lr", V::F(0.2)), ("nesterov", V::B(true))]).unwrap();
        assert_eq!(c, OptimizerConfig::Sgd { lr: 0.2, momentum: 0.9, weight_decay: 0.0, nesterov: true });
        let c: OptimizerConfig = parse(&[("kind", V::S("adam")), ("weight_decay", V::F(0.01))]).unwrap();
        assert_eq!(
            c,
            OptimizerConfig::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
        );
        assert_eq!(parse::<OptimizerConfig>(&[("kind", V::S("adam"))]).unwrap(), OptimizerConfig::adam(1e-3));

        let err = parse::<OptimizerConfig>(&[("kind", V::S("sgd")), ("betas", V::F(0.9))]).unwrap_err();
        assert!(err.to_string().contains("unknown field `betas`"), "{err}");
        assert!(parse::<OptimizerConfig>(&[("kind", V::S("lamb"))]).is_err());
        assert!(parse::<OptimizerConfig>(&[("lr", V::F(0.1))]).is_err(), "kind is required");
    }
}
