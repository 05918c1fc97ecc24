//! Gradient clipping and AdamW with PyTorch's exact semantics (the
//! single-tensor `torch.optim.AdamW` and `torch.nn.utils.clip_grad_norm_`).

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// `(beta1, beta2)`.
    pub betas: (f64, f64),
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The reference's values: betas (0.9, 0.999), eps 1e-8, weight decay 1e-4.
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

/// AdamW state over a fixed list of parameters.
pub struct AdamW {
    config: AdamWConfig,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    /// Fresh state (moments at zero) for `params`.
    pub fn new(config: AdamWConfig, params: &[Tensor]) -> Self {
        let zeros = || params.iter().map(|p| p.detach().zeros_like()).collect();
        AdamW {
            config,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            step: 0,
        }
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The moment tensors `(exp_avg, exp_avg_sq)` per parameter (for checkpoints).
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// Restores moments and the step count (from a checkpoint).
    pub fn restore(
        &mut self,
        exp_avg: Vec<Tensor>,
        exp_avg_sq: Vec<Tensor>,
        step: u64,
    ) -> Result<()> {
        let same = |a: &[Tensor], b: &[Tensor]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.size() == y.size())
        };
        if !same(&exp_avg, &self.exp_avg) || !same(&exp_avg_sq, &self.exp_avg_sq) {
            return Err(Error::Input(
                "optimizer state does not match the model's parameters".into(),
            ));
        }
        for (dst, src) in self.exp_avg.iter_mut().zip(exp_avg) {
            dst.copy_(&src);
        }
        for (dst, src) in self.exp_avg_sq.iter_mut().zip(exp_avg_sq) {
            dst.copy_(&src);
        }
        self.step = step;
        Ok(())
    }

    /// One AdamW step on `params` (same list and order as at construction) with
    /// learning rate `lr`. Parameters without a gradient are skipped.
    pub fn step(&mut self, params: &[Tensor], lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let (b1, b2) = self.config.betas;
        let t = self.step as f64;
        let bias_correction1 = 1.0 - b1.powf(t);
        let bias_correction2_sqrt = (1.0 - b2.powf(t)).sqrt();
        let step_size = lr / bias_correction1;
        let values = [
            1.0 - lr * self.config.weight_decay,
            b2,
            1.0 - b2,
            bias_correction2_sqrt,
            self.config.eps,
            -step_size,
        ];
        let mut made: Vec<(Kind, [Tensor; 6])> = Vec::new();
        for ((p, m), v) in params
            .iter()
            .zip(&mut self.exp_avg)
            .zip(&mut self.exp_avg_sq)
        {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let kind = p.kind();
            let at = match made.iter().position(|(k, _)| *k == kind) {
                Some(at) => at,
                None => {
                    made.push((kind, values.map(|x| scalar(x, kind))));
                    made.len() - 1
                }
            };
            let [decay, b2, one_minus_b2, bc2_sqrt, eps, neg_step] = &made[at].1;
            let mut p = p.shallow_clone();
            let _ = p.g_mul_(decay);
            let _ = m.lerp_(&g, 1.0 - b1);
            // v * b2 + ((1 - b2) * g) * g, as addcmul_(g, g, value=1-b2)
            let _ = v.g_mul_(b2);
            let _ = v.addcmul_(&(&g * one_minus_b2), &g);
            let denom = (v.sqrt() / bc2_sqrt) + eps;
            // p + (-step_size * m) / denom, as addcdiv_(m, denom, value=-step_size)
            let _ = p.addcdiv_(&(&*m * neg_step), &denom);
        }
    }
}

/// The 0-dim CPU tensor standing for the number `v` in an operation with a
/// tensor of `kind`: the double itself for float64, its float32 rounding for
/// every other kind. ATen's CPU kernels read such an operand as the number
/// they would have read from `v` itself (float32 arithmetic for float32 and
/// the reduced kinds), but `v` passed as a Rust `f64` is first copied to the
/// other operand's type on every call: made once per step, the optimizer's
/// six numbers save that copy for every parameter (values unchanged).
fn scalar(v: f64, kind: Kind) -> Tensor {
    match kind {
        Kind::Double => Tensor::from(v),
        _ => Tensor::from(v as f32),
    }
}

/// Clips the gradients of `params` to total L2 norm `max_norm` the way
/// `clip_grad_norm_` does (norm of the per-parameter norms; the factor
/// `min(max_norm / (norm + 1e-6), 1)` always applied). Returns the norm before
/// clipping (float32 0-d).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    if grads.is_empty() {
        return Tensor::from(0f32);
    }
    let norms: Vec<Tensor> = grads.iter().map(vector_norm).collect();
    let device = norms[0].device();
    let total = Tensor::stack(
        &norms
            .iter()
            .map(|n| n.to_device(device))
            .collect::<Vec<_>>(),
        0,
    );
    let total = vector_norm(&total);
    let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
    for g in &grads {
        let _ = g.shallow_clone().g_mul_(&coef);
    }
    total
}

/// `torch.linalg.vector_norm(t, 2)` over all elements (ATen's 1-d `linalg_norm`
/// dispatches to it).
fn vector_norm(t: &Tensor) -> Tensor {
    t.reshape([-1])
        .linalg_norm(2.0, None::<&[i64]>, false, None::<Kind>)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn param(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).set_requires_grad(true)
    }

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        let p = param(&[1.0, -2.0, 0.5]);
        (&p * Tensor::from_slice(&[0.3f32, -4.0, 1e-3]))
            .sum(Kind::Float)
            .backward();
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
            &[p.shallow_clone()],
        );
        opt.step(&[p.shallow_clone()], 0.1);
        let got: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        // m_hat = g, v_hat = g^2: the step is lr * g / (|g| + eps)
        for (a, b) in got.iter().zip([0.9f32, -1.9, 0.4]) {
            assert!((a - b).abs() < 1e-5, "{got:?}");
        }
        assert_eq!(opt.steps(), 1);
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let p = param(&[2.0]);
        (&p * 0.0).sum(Kind::Float).backward();
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: 0.5,
                ..Default::default()
            },
            &[p.shallow_clone()],
        );
        opt.step(&[p.shallow_clone()], 0.1);
        // zero gradient: only the decay p * (1 - lr * wd)
        assert!((p.double_value(&[0]) - 1.9).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let a = param(&[0.0, 0.0]);
        let b = param(&[0.0]);
        (&a * Tensor::from_slice(&[3.0f32, 0.0]))
            .sum(Kind::Float)
            .backward();
        (&b * 4.0).sum(Kind::Float).backward();
        let norm = clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 1.0);
        assert_eq!(norm.double_value(&[]), 5.0);
        let ga: Vec<f32> = Vec::try_from(&a.grad()).unwrap();
        assert!((ga[0] - 0.6).abs() < 1e-6 && (b.grad().double_value(&[0]) - 0.8).abs() < 1e-6);
        // below the max the factor is exactly 1
        let n2 = clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 10.0);
        assert!((n2.double_value(&[]) - 1.0).abs() < 1e-6);
        assert!((b.grad().double_value(&[0]) - 0.8).abs() < 1e-6);
        let _ = Device::Cpu;
    }
}
