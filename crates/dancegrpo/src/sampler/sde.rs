//! The Dance-SDE step (the reference's `flux_step` with `sde_solver=True`):
//! predicted x0, the drift with the `-0.5 * eta^2 * score` correction, the
//! sample drawn from caller-provided noise, and the log-probability of a given
//! next latent.
//!
//! Scalars follow the reference exactly: sigmas are float32 0-d tensors,
//! `std = eta * sqrt(sigma - sigma_next)` is computed in float64 and rounded to
//! float32 where it multiplies a tensor, and `2 * std^2` is a float64 divisor.
//! With float64 sigmas and latents (the fixtures' float64 replay) nothing is
//! rounded to float32.

use tch::{Device, Tensor};

use crate::nn::upcast_kind;

/// What one SDE step produces.
#[derive(Debug)]
pub struct SdeStep {
    /// The next latent `z_{i+1}` (the given one when evaluating a stored transition).
    pub next: Tensor,
    /// The predicted clean sample `x0 = z - sigma * v`.
    pub pred_x0: Tensor,
    /// The mean of the step's Gaussian (the next latent without noise).
    pub mean: Tensor,
    /// Log-probability of `next` per sample `(b,)`, float32: the element mean of
    /// `-(next - mean)^2 / (2 std^2)` (no normalisation term, as the reference).
    pub log_prob: Tensor,
    /// The step's standard deviation `eta * sqrt(sigma - sigma_next)` (float64), per row.
    pub std: Vec<f64>,
}

/// Where the next latent comes from.
pub enum Next<'a> {
    /// Sample it: `mean + noise * std` with this standard-normal noise (same shape as `z`).
    Noise(&'a Tensor),
    /// Evaluate this given next latent (training: the stored trajectory).
    Given(&'a Tensor),
}

/// Which step each row of the batch takes.
#[derive(Debug, Clone, Copy)]
pub enum At<'a> {
    /// Every row takes step `i` (sampling).
    Step(i64),
    /// Row `r` takes step `steps[r]` (training on a random subset of transitions).
    Rows(&'a [i64]),
}

/// The scalars of a step: 0-d sigmas for a shared step, `(b, 1, 1)` for per-row steps.
struct Sigmas {
    sigma: Tensor,
    sigma_next: Tensor,
    std: Vec<f64>,
    /// `float32(std)` and `float32(2 std^2)` per row, `(b, 1, 1)`; `None` for a shared step.
    rows: Option<(Tensor, Tensor)>,
}

/// `sigmas[i]` and `sigmas[i + 1]` of a step, in `sigmas`' kind: 0-d for a
/// shared step, `(b, 1, 1)` on `device` for per-row steps (every step form uses these).
pub(super) fn step_sigmas(sigmas: &Tensor, at: At, device: Device) -> (Tensor, Tensor) {
    match at {
        At::Step(i) => (sigmas.get(i), sigmas.get(i + 1)),
        At::Rows(steps) => {
            let n = steps.len() as i64;
            let idx = Tensor::from_slice(steps).to_device(sigmas.device());
            let rows = |t: Tensor| t.view([n, 1, 1]).to_device(device);
            (
                rows(sigmas.index_select(0, &idx)),
                rows(sigmas.index_select(0, &(idx + 1))),
            )
        }
    }
}

fn step_std(sigmas: &Tensor, i: i64, eta: f64) -> f64 {
    let delta = (sigmas.get(i) - sigmas.get(i + 1)).double_value(&[]);
    eta * delta.sqrt()
}

impl Sigmas {
    fn new(sigmas: &Tensor, at: At, eta: f64, z: &Tensor) -> Sigmas {
        let (sigma, sigma_next) = step_sigmas(sigmas, at, z.device());
        match at {
            At::Step(i) => Sigmas {
                sigma,
                sigma_next,
                std: vec![step_std(sigmas, i, eta)],
                rows: None,
            },
            At::Rows(steps) => {
                let n = steps.len() as i64;
                let std: Vec<f64> = steps.iter().map(|&i| step_std(sigmas, i, eta)).collect();
                // the scalars rounded to the step's kind (float32; float64 stays exact)
                let kind = upcast_kind(z.kind());
                let scalars = |v: Vec<f64>| {
                    let t = Tensor::from_slice(&v).to_kind(kind);
                    t.view([n, 1, 1]).to_device(z.device())
                };
                let std_t = scalars(std.clone());
                let var2 = scalars(std.iter().map(|s| 2.0 * (s * s)).collect());
                Sigmas {
                    sigma,
                    sigma_next,
                    std,
                    rows: Some((std_t, var2)),
                }
            }
        }
    }
}

/// One Dance-SDE step from `sigmas[i]` to `sigmas[i + 1]` (`sigmas`: float32
/// `(S+1,)`), `i` shared by the batch or given per row.
pub fn sde_step(v: &Tensor, z: &Tensor, sigmas: &Tensor, at: At, eta: f64, next: Next) -> SdeStep {
    let s = Sigmas::new(sigmas, at, eta, z);
    let dsigma = &s.sigma_next - &s.sigma; // negative
    let mean = z + &dsigma * v;
    let pred_x0 = z - &s.sigma * v;
    // score = -(z - x0 (1 - sigma)) / sigma^2
    let one_minus = s.sigma.neg() + 1.0;
    let score = (z - &pred_x0 * &one_minus).neg() / s.sigma.pow_tensor_scalar(2);
    let mean = mean + (score * (-0.5 * (eta * eta))) * &dsigma;
    let next = match (next, &s.rows) {
        (Next::Noise(noise), None) => &mean + noise.to_kind(z.kind()) * s.std[0],
        (Next::Noise(noise), Some((std, _))) => &mean + noise.to_kind(z.kind()) * std,
        (Next::Given(t), _) => t.shallow_clone(),
    };
    let log_prob = match &s.rows {
        None => log_prob(&next, &mean, s.std[0]),
        Some((_, var2)) => log_prob_rows(&next, &mean, var2),
    };
    SdeStep {
        next,
        pred_x0,
        mean,
        log_prob,
        std: s.std,
    }
}

fn squared_error(x: &Tensor, mean: &Tensor) -> Tensor {
    let kind = upcast_kind(mean.kind());
    let diff = x.detach().to_kind(kind) - mean.to_kind(kind);
    diff.pow_tensor_scalar(2).neg()
}

fn mean_per_row(t: Tensor) -> Tensor {
    let dims: Vec<i64> = (1..t.dim() as i64).collect();
    t.mean_dim(dims.as_slice(), false, None)
}

/// `mean over all but dim 0 of -(x - mean)^2 / (2 std^2)`, in float32.
pub fn log_prob(x: &Tensor, mean: &Tensor, std: f64) -> Tensor {
    mean_per_row(squared_error(x, mean) / (2.0 * (std * std)))
}

/// [`log_prob`] with a per-row divisor `float32(2 std^2)` `(b, 1, 1)`.
fn log_prob_rows(x: &Tensor, mean: &Tensor, var2: &Tensor) -> Tensor {
    mean_per_row(squared_error(x, mean) / var2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Philox;
    use crate::sampler::Schedule;
    use tch::Kind;

    #[test]
    fn log_prob_is_maximal_at_the_mean() {
        let s = Schedule::shifted(4, 3.0);
        let mut rng = Philox::new(1, 1);
        let z = rng.normal_tensor(&[2, 4, 8]);
        let v = rng.normal_tensor(&[2, 4, 8]);
        let noise = rng.normal_tensor(&[2, 4, 8]);
        let at_mean = sde_step(
            &v,
            &z,
            &s.sigmas,
            At::Step(1),
            0.3,
            Next::Noise(&noise.zeros_like()),
        );
        let off = sde_step(&v, &z, &s.sigmas, At::Step(1), 0.3, Next::Noise(&noise));
        assert_eq!(
            Vec::<f32>::try_from(&at_mean.log_prob).unwrap(),
            vec![0.0, 0.0]
        );
        let lp: Vec<f32> = Vec::try_from(&off.log_prob).unwrap();
        assert!(lp.iter().all(|l| *l < 0.0));
        // with noise e, -(e std)^2 / (2 std^2) = -e^2 / 2 on average
        let want: Vec<f64> = (0..2)
            .map(|b| {
                -noise
                    .get(b)
                    .pow_tensor_scalar(2)
                    .mean(Kind::Float)
                    .double_value(&[])
                    / 2.0
            })
            .collect();
        for (a, b) in lp.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        // evaluating the sampled latent gives the same log-prob
        let again = sde_step(&v, &z, &s.sigmas, At::Step(1), 0.3, Next::Given(&off.next));
        assert!(again.log_prob.equal(&off.log_prob));
    }

    #[test]
    fn per_row_steps_match_shared_steps_bitwise() {
        let s = Schedule::shifted(6, 3.0);
        let mut rng = Philox::new(2, 1);
        let z = rng.normal_tensor(&[3, 4, 8]);
        let v = rng.normal_tensor(&[3, 4, 8]);
        let next = rng.normal_tensor(&[3, 4, 8]);
        let steps = [4i64, 0, 2];
        let rows = sde_step(&v, &z, &s.sigmas, At::Rows(&steps), 0.7, Next::Given(&next));
        for (r, &i) in steps.iter().enumerate() {
            let r = r as i64;
            let one = |t: &Tensor| t.narrow(0, r, 1);
            let shared = sde_step(
                &one(&v),
                &one(&z),
                &s.sigmas,
                At::Step(i),
                0.7,
                Next::Given(&one(&next)),
            );
            assert!(shared.log_prob.equal(&one(&rows.log_prob)));
            assert!(shared.pred_x0.equal(&one(&rows.pred_x0)));
            assert_eq!(shared.std[0], rows.std[r as usize]);
        }
    }
}
