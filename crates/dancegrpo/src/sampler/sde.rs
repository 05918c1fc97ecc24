//! The Dance-SDE step (the reference's `flux_step` with `sde_solver=True`):
//! predicted x0, the drift with the `-0.5 * eta^2 * score` correction, the
//! sample drawn from caller-provided noise, and the log-probability of a given
//! next latent.
//!
//! Scalars follow the reference exactly: sigmas are float32 0-d tensors,
//! `std = eta * sqrt(sigma - sigma_next)` is computed in float64 and rounded to
//! float32 where it multiplies a tensor, and `2 * std^2` is a float64 divisor.

use tch::{Kind, Tensor};

/// What one SDE step produces.
#[derive(Debug)]
pub struct SdeStep {
    /// The next latent `z_{i+1}` (the given one when evaluating a stored transition).
    pub next: Tensor,
    /// The predicted clean sample `x0 = z - sigma * v`.
    pub pred_x0: Tensor,
    /// Log-probability of `next` per sample `(b,)`, float32: the element mean of
    /// `-(next - mean)^2 / (2 std^2)` (no normalisation term, as the reference).
    pub log_prob: Tensor,
    /// The step's standard deviation `eta * sqrt(sigma - sigma_next)` (float64).
    pub std: f64,
}

/// Where the next latent comes from.
pub enum Next<'a> {
    /// Sample it: `mean + noise * std` with this standard-normal noise (same shape as `z`).
    Noise(&'a Tensor),
    /// Evaluate this given next latent (training: the stored trajectory).
    Given(&'a Tensor),
}

/// One Dance-SDE step from `sigmas[i]` to `sigmas[i + 1]` (`sigmas`: float32 `(S+1,)`).
pub fn sde_step(v: &Tensor, z: &Tensor, sigmas: &Tensor, i: i64, eta: f64, next: Next) -> SdeStep {
    let sigma = sigmas.get(i); // 0-d float32
    let sigma_next = sigmas.get(i + 1);
    let dsigma = &sigma_next - &sigma; // negative
    let mean = z + &dsigma * v;
    let pred_x0 = z - &sigma * v;
    let delta = (&sigma - &sigma_next).double_value(&[]);
    let std = eta * delta.sqrt();
    // score = -(z - x0 (1 - sigma)) / sigma^2
    let one_minus = sigma.neg() + 1.0;
    let score = (z - &pred_x0 * &one_minus).neg() / sigma.pow_tensor_scalar(2);
    let mean = mean + (score * (-0.5 * (eta * eta))) * &dsigma;
    let next = match next {
        Next::Noise(noise) => &mean + noise * std,
        Next::Given(t) => t.shallow_clone(),
    };
    let log_prob = log_prob(&next, &mean, std);
    SdeStep {
        next,
        pred_x0,
        log_prob,
        std,
    }
}

/// `mean over all but dim 0 of -(x - mean)^2 / (2 std^2)`, in float32.
pub fn log_prob(x: &Tensor, mean: &Tensor, std: f64) -> Tensor {
    let diff = x.detach().to_kind(Kind::Float) - mean.to_kind(Kind::Float);
    let lp = diff.pow_tensor_scalar(2).neg() / (2.0 * (std * std));
    let dims: Vec<i64> = (1..lp.dim() as i64).collect();
    lp.mean_dim(dims.as_slice(), false, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Philox;
    use crate::sampler::Schedule;

    #[test]
    fn log_prob_is_maximal_at_the_mean() {
        let s = Schedule::shifted(4, 3.0);
        let mut rng = Philox::new(1, 1);
        let z = rng.normal_tensor(&[2, 4, 8]);
        let v = rng.normal_tensor(&[2, 4, 8]);
        let noise = rng.normal_tensor(&[2, 4, 8]);
        let at_mean = sde_step(&v, &z, &s.sigmas, 1, 0.3, Next::Noise(&noise.zeros_like()));
        let off = sde_step(&v, &z, &s.sigmas, 1, 0.3, Next::Noise(&noise));
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
        let again = sde_step(&v, &z, &s.sigmas, 1, 0.3, Next::Given(&off.next));
        assert!(again.log_prob.equal(&off.log_prob));
    }
}
