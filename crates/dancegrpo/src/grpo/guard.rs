//! GRPO-Guard's regulated clipping (Wang et al., 2025, arXiv 2510.22319):
//! ratio normalisation and per-step gradient re-weighting, as options of the
//! clipped objective.
//!
//! **Ratio normalisation.** A transition's next latent was drawn as
//! `x = mean_old + std * eps`. With both steps Gaussian of the same std, the
//! log-ratio is `l = mean(eps * dmu) / std - |dmu|^2 / (2 std^2)` (element
//! means, `dmu = mean_new - mean_old`): its average over the noise is `-KL`,
//! below 0 (the paper's left shift, which keeps positive-advantage samples out
//! of the clip range), and its spread `|dmu| / std` grows as the step's std
//! shrinks. The normalised log-ratio adds the KL back and multiplies by the
//! std: `l^ = std * (l + |dmu|^2 / (2 std^2)) = mean((x - mean_old) * dmu) / std`,
//! centred on 0 with a spread that no longer depends on the step's noise. It
//! is computed in that closed form, from the rollout's stored step means, so
//! it is the same for every step form (CPS's log-probability has no variance
//! in it) and exactly 0 while the policy is the rollout's.
//!
//! **Gradient re-weighting.** Every form's mean is linear in the velocity,
//! `d mean / d v = g(sigma, sigma')` (Dance-SDE: `(sigma' - sigma) (1 + eta^2 (1 -
//! sigma) / (2 sigma))`; Flow-GRPO: `(sigma' - sigma) (1 + eta^2 / 2)`), so the
//! normalised log-ratio's gradient with respect to the velocity is `g` times a
//! step-independent quantity. Each transition's loss is weighted by `1 / |g|`,
//! normalised to mean 1 over the trainable transitions of the schedule: the
//! steps' gradients are equalised and the overall scale (what the learning
//! rate means) stays. The paper writes its weight as `1 / dt` up to a
//! form-dependent constant; the normalisation to mean 1 is ours.

use tch::{Kind, Tensor};

use crate::sampler::{SdeForm, SdeStep};

/// Which of GRPO-Guard's corrections the objective applies (`grpo.guard`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guard {
    /// The plain clipped ratio (DanceGRPO's objective, default).
    #[default]
    None,
    /// Ratio normalisation only.
    RatioNorm,
    /// Gradient re-weighting only.
    GradReweight,
    /// Both: GRPO-Guard.
    Full,
}

impl Guard {
    /// Whether the log-ratio is normalised (the rollout keeps its step means).
    pub fn ratio_norm(self) -> bool {
        matches!(self, Guard::RatioNorm | Guard::Full)
    }

    /// Whether transitions' losses are re-weighted per step.
    pub fn grad_reweight(self) -> bool {
        matches!(self, Guard::GradReweight | Guard::Full)
    }
}

/// The normalised log-ratio `mean((x - mean_old) * (mean_new - mean_old)) / std`
/// per row `(n,)`, float32 (float64 for float64 steps); `step` is the current
/// policy's step evaluated at the stored next latent `x` (its `next`), `mean_old`
/// the rollout's step mean `(n, L, c)`. A row whose step has no noise (CPS's
/// last step) has a log-ratio of 0.
pub fn normalized_log_ratio(step: &SdeStep, mean_old: &Tensor) -> Tensor {
    let kind = crate::nn::upcast_kind(step.mean.kind());
    let old = mean_old.to_kind(kind);
    let noise = step.next.detach().to_kind(kind) - &old; // std * eps
    let shift = step.mean.to_kind(kind) - &old; // (n, L, c)
    let dims: Vec<i64> = (1..shift.dim() as i64).collect();
    let dot = (noise * shift).mean_dim(dims.as_slice(), false, None); // (n,)
    let inv: Vec<f64> = (step.std.iter())
        .map(|s| if *s > 0.0 { 1.0 / s } else { 0.0 })
        .collect();
    &dot * Tensor::from_slice(&inv)
        .to_kind(kind)
        .to_device(dot.device())
}

/// The re-weighting of every transition `0..S` of `sigmas` (`(S+1,)`):
/// `1 / |d mean / d v|`, normalised to mean 1 over the transitions that can
/// be trained, `trained` (the trainable ones, or a window's).
pub fn step_weights(form: SdeForm, sigmas: &[f64], eta: f64, trained: &[i64]) -> Vec<f64> {
    let inv: Vec<f64> = (0..sigmas.len().saturating_sub(1))
        .map(|j| 1.0 / form.velocity_gain(sigmas, j, eta).abs())
        .collect();
    let of: Vec<f64> = (trained.iter())
        .filter_map(|&j| inv.get(j as usize).copied())
        .collect();
    let mean = of.iter().sum::<f64>() / of.len().max(1) as f64;
    inv.iter().map(|w| w / mean).collect()
}

/// The weights of rows taking steps `steps`, as a float32 `(n,)` tensor.
pub fn row_weights(weights: &[f64], steps: &[i64]) -> Tensor {
    let w: Vec<f32> = steps.iter().map(|&j| weights[j as usize] as f32).collect();
    Tensor::from_slice(&w).to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Philox;
    use crate::sampler::sde::{At, Next};

    fn sigmas() -> Tensor {
        Tensor::from_slice(&[1.0f32, 0.8, 0.55, 0.3, 0.0])
    }

    #[test]
    fn the_normalised_log_ratio_is_centred_where_the_plain_one_is_left_shifted() {
        // one state, 4096 noise draws: the policy's velocity moved by 0.05 from the rollout's
        let mut rng = Philox::new(4, 0);
        let z = rng.normal_tensor(&[1, 16, 4]).repeat([4096, 1, 1]);
        let v_old = rng.normal_tensor(&[1, 16, 4]).repeat([4096, 1, 1]);
        let v_new = &v_old + 0.05;
        let noise = rng.normal_tensor(&[4096, 16, 4]);
        for form in [SdeForm::Dance, SdeForm::FlowGrpo] {
            let (s, at, eta) = (sigmas(), At::Step(1), 0.7);
            let old = form.step(&v_old, &z, &s, at, eta, Next::Noise(&noise));
            let new = form.step(&v_new, &z, &s, at, eta, Next::Given(&old.next));
            let plain = &new.log_prob - &old.log_prob; // (4096,)
            let kl = crate::grpo::loss::step_kl(&new, &old).double_value(&[0]);
            let norm = normalized_log_ratio(&new, &old.mean);
            let std = new.std[0];
            // the identity: l^ = std * (l + KL), row by row
            let want = (&plain + kl) * std;
            // (to the float32 rounding of the two log-probabilities, ~0.5 each)
            let err = (&norm - &want).abs().max().double_value(&[]);
            assert!(err < 1e-6, "{form:?} {err}");
            // the plain log-ratio averages -KL, the normalised one ~0 (4096 draws:
            // its mean's standard error is std(l^) / 64)
            let (pm, nm) = (
                plain.mean(Kind::Double).double_value(&[]),
                norm.mean(Kind::Double).double_value(&[]),
            );
            let nsd = norm.std(true).double_value(&[]);
            assert!(
                (pm + kl).abs() < 4.0 * plain.std(true).double_value(&[]) / 64.0,
                "{form:?} {pm} {kl}"
            );
            assert!(
                pm < -0.5 * kl && nm.abs() < 4.0 * nsd / 64.0,
                "{form:?} {pm} {nm} {nsd}"
            );
            // exactly 0 while the policy is the rollout's
            let same = form.step(&v_old, &z, &s, at, eta, Next::Given(&old.next));
            assert_eq!(
                normalized_log_ratio(&same, &old.mean)
                    .abs()
                    .max()
                    .double_value(&[]),
                0.0
            );
        }
    }

    #[test]
    fn weights_are_the_inverse_velocity_gain_with_mean_one() {
        let s = [1.0, 0.8, 0.55, 0.3, 0.0];
        // Flow-GRPO: the gain is dt (1 + eta^2 / 2) inside the schedule: weights ~ 1 / dt
        let w = step_weights(SdeForm::FlowGrpo, &s, 0.7, &[0, 1, 2]);
        let mean3 = (w[0] + w[1] + w[2]) / 3.0;
        assert!((mean3 - 1.0).abs() < 1e-12, "{w:?}");
        assert!((w[1] / w[2] - 0.25 / 0.25).abs() < 1e-12, "{w:?}");
        assert!((w[2] / w[3] - 0.3 / 0.25).abs() < 1e-12, "{w:?}");
        // Dance-SDE: 1 / (dt (1 + eta^2 (1 - sigma) / (2 sigma)))
        // normalised over a window of steps 1 and 2: mean 1 there
        let w12 = step_weights(SdeForm::Dance, &s, 0.3, &[1, 2]);
        assert!(((w12[1] + w12[2]) / 2.0 - 1.0).abs() < 1e-12, "{w12:?}");
        let w = step_weights(SdeForm::Dance, &s, 0.3, &[0, 1, 2, 3]);
        let g = |j: usize| (s[j] - s[j + 1]) * (1.0 + 0.09 * (1.0 - s[j]) / (2.0 * s[j]));
        let inv: Vec<f64> = (0..4).map(|j| 1.0 / g(j)).collect();
        let m = inv.iter().sum::<f64>() / 4.0;
        for j in 0..4 {
            assert!((w[j] - inv[j] / m).abs() < 1e-12, "{w:?}");
        }
        let rows = row_weights(&w, &[3, 0]);
        assert_eq!(
            Vec::<f32>::try_from(rows).unwrap(),
            vec![w[3] as f32, w[0] as f32]
        );
    }
}
