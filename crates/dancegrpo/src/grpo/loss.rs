//! The clipped policy-ratio objective of GRPO (PPO-style, per transition) and
//! the optional KL term toward a reference policy.

use tch::Tensor;

use crate::sampler::SdeStep;

/// The terms of the clipped objective for a batch of transitions, each `(n,)` float32.
#[derive(Debug)]
pub struct PolicyLoss {
    /// `exp(new_log_prob - old_log_prob)`.
    pub ratio: Tensor,
    /// `ratio` clamped to `[1 - clip, 1 + clip]`.
    pub ratio_clamped: Tensor,
    /// `-A * ratio`.
    pub unclipped: Tensor,
    /// `-A * ratio_clamped`.
    pub clipped: Tensor,
    /// `max(unclipped, clipped) / scale` per transition: the value back-propagated.
    pub loss: Tensor,
}

impl PolicyLoss {
    /// Rows `start..start + len` of every term.
    pub fn rows(&self, start: i64, len: i64) -> PolicyLoss {
        let part = |t: &Tensor| t.narrow(0, start, len);
        PolicyLoss {
            ratio: part(&self.ratio),
            ratio_clamped: part(&self.ratio_clamped),
            unclipped: part(&self.unclipped),
            clipped: part(&self.clipped),
            loss: part(&self.loss),
        }
    }
}

/// The reference's loss per transition `(n,)`:
/// `max(-A * r, -A * clamp(r, 1 - clip, 1 + clip)) / scale` with
/// `r = exp(new_log_prob - old_log_prob)`; `advantages` are already clamped and
/// `scale` is `gradient_accumulation * trained_transitions`.
pub fn clipped_policy_loss(
    new_log_prob: &Tensor,
    old_log_prob: &Tensor,
    advantages: &Tensor,
    clip_range: f64,
    scale: f64,
) -> PolicyLoss {
    clipped_loss_of_log_ratio(
        &(new_log_prob - old_log_prob),
        advantages,
        clip_range,
        scale,
    )
}

/// [`clipped_policy_loss`] from the log-ratio `(n,)` itself (GRPO-Guard's
/// normalised one, [`super::guard::normalized_log_ratio`]).
pub fn clipped_loss_of_log_ratio(
    log_ratio: &Tensor,
    advantages: &Tensor,
    clip_range: f64,
    scale: f64,
) -> PolicyLoss {
    let ratio = log_ratio.exp();
    let ratio_clamped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range);
    let neg_adv = advantages.neg();
    let unclipped = &neg_adv * &ratio;
    let clipped = &neg_adv * &ratio_clamped;
    // one transition per sample: the reference's mean over a batch of 1 is the element itself
    let loss = unclipped.maximum(&clipped) / scale;
    PolicyLoss {
        ratio,
        ratio_clamped,
        unclipped,
        clipped,
        loss,
    }
}

/// `KL(policy step || reference step)` per row `(n,)`, float32 (float64 for
/// float64 steps): both steps are Gaussians of the same std around their
/// means, so the divergence is `|mean - mean_ref|^2 / (2 std^2)`, taken per
/// element (the mean over a latent's elements, as the log-probabilities are).
///
/// A row whose step has no noise (CPS's last step) has a KL of 0.
///
/// Flow-GRPO divides by the square of its noise level `std_dev_t` instead of
/// the step's variance `std_dev_t^2 |dt|`: its KL is `|dt|` times ours, so its
/// `beta` corresponds to ours times `|dt|` (which varies with the step).
pub fn step_kl(step: &SdeStep, reference: &SdeStep) -> Tensor {
    let kind = crate::nn::upcast_kind(step.mean.kind());
    let diff = step.mean.to_kind(kind) - reference.mean.to_kind(kind);
    let dims: Vec<i64> = (1..diff.dim() as i64).collect();
    let sq = diff
        .pow_tensor_scalar(2)
        .mean_dim(dims.as_slice(), false, None); // (n,)
                                                 // 1 / (2 std^2) per row, 0 where the step has no noise
    let inv: Vec<f64> = (step.std.iter())
        .map(|s| if *s > 0.0 { 1.0 / (2.0 * s * s) } else { 0.0 })
        .collect();
    &sq * Tensor::from_slice(&inv)
        .to_kind(kind)
        .to_device(sq.device()) // (n,) or (1,)
}

/// Whether the clipped branch is active for each transition (`|ratio - 1| > clip`).
pub fn clipped_mask(ratio: &Tensor, clip_range: f64) -> Tensor {
    (ratio - 1.0).abs().gt(clip_range)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::sde::{At, Next};
    use crate::sampler::SdeForm;
    use tch::Kind;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }

    #[test]
    fn ratio_one_gives_minus_mean_advantage() {
        let adv = t(&[1.5, -0.5, 0.25, -1.25]);
        let lp = t(&[-0.3, -0.7, -0.1, -2.0]);
        let out = clipped_policy_loss(&lp, &lp, &adv, 1e-4, 1.0);
        assert!(out
            .ratio
            .equal(&Tensor::ones([4], (Kind::Float, tch::Device::Cpu))));
        assert_eq!(out.loss.mean(Kind::Float).double_value(&[]), 0.0);
        let got: Vec<f32> = Vec::try_from(&out.loss).unwrap();
        assert_eq!(got, vec![-1.5, 0.5, -0.25, 1.25]);
        // the gradient of the loss with respect to the new log-prob at ratio 1 is -A
        let lp_leaf = lp.detach().set_requires_grad(true);
        let out = clipped_policy_loss(&lp_leaf, &lp, &adv, 1e-4, 2.0);
        out.loss.sum(Kind::Float).backward();
        let g: Vec<f32> = Vec::try_from(&lp_leaf.grad()).unwrap();
        assert_eq!(g, vec![-0.75, 0.25, -0.125, 0.625]);
    }

    #[test]
    fn clipping_engages_outside_the_range() {
        // ratio e^0.5 ~ 1.65 with clip 0.2: a positive advantage is capped at 1.2,
        // a negative one keeps the unclipped (pessimistic) value
        let old = t(&[0.0, 0.0, 0.0]);
        let new = t(&[0.5, 0.5, 0.1]).set_requires_grad(true);
        let adv = t(&[1.0, -1.0, 1.0]);
        let out = clipped_policy_loss(&new, &old, &adv, 0.2, 1.0);
        let loss: Vec<f32> = Vec::try_from(&out.loss.detach()).unwrap();
        let r = 0.5f32.exp();
        assert!((loss[0] + 1.2).abs() < 1e-6, "{loss:?}");
        assert!((loss[1] - r).abs() < 1e-6);
        assert!((loss[2] + 0.1f32.exp()).abs() < 1e-6);
        let mask: Vec<bool> = Vec::try_from(&clipped_mask(&out.ratio, 0.2)).unwrap();
        assert_eq!(mask, vec![true, true, false]);
        out.loss.sum(Kind::Float).backward();
        let g: Vec<f32> = Vec::try_from(&new.grad()).unwrap();
        // clipped branch wins for sample 0: no gradient
        assert_eq!(g[0], 0.0);
        assert!((g[1] - r).abs() < 1e-6);
    }

    #[test]
    fn kl_is_zero_at_the_reference_and_the_closed_form_elsewhere() {
        let sigmas = Tensor::from_slice(&[1.0f32, 0.75, 0.5, 0.25, 0.0]);
        let z = Tensor::from_slice(&[0.5f32, -1.0, 0.25, 2.0]).view([2, 2, 1]);
        let v = Tensor::from_slice(&[1.0f32, 0.5, -0.5, 0.0]).view([2, 2, 1]);
        // the reference's velocity differs by 0.2 on the first row only
        let v_ref = &v - Tensor::from_slice(&[0.2f32, 0.2, 0.0, 0.0]).view([2, 2, 1]);
        let eta = 0.3;
        for form in [SdeForm::Dance, SdeForm::FlowGrpo, SdeForm::Cps] {
            for at in [At::Step(1), At::Rows(&[1, 2])] {
                let step = |v: &Tensor| form.step(v, &z, &sigmas, at, eta, Next::Given(&z));
                let (a, b) = (step(&v), step(&v_ref));
                assert_eq!(
                    Vec::<f32>::try_from(step_kl(&a, &a)).unwrap(),
                    vec![0.0, 0.0]
                );
                let kl: Vec<f64> = Vec::try_from(step_kl(&a, &b).to_kind(Kind::Double)).unwrap();
                // by hand: the mean's difference over the velocity's, then / (2 std^2)
                let d: Vec<f64> =
                    Vec::try_from((&a.mean - &b.mean).to_kind(Kind::Double).reshape([-1])).unwrap();
                let std0 = a.std[0];
                let want = (d[0] * d[0] + d[1] * d[1]) / 2.0 / (2.0 * std0 * std0);
                assert!(
                    (kl[0] - want).abs() <= 1e-6 * want,
                    "{form:?} {kl:?} {want}"
                );
                assert!(kl[0] > 0.0 && kl[1] == 0.0, "{form:?} {kl:?}");
            }
        }
        // Dance-SDE at sigma 0.75 -> 0.5, eta 0.3: the mean moves by
        // dsigma (1 + eta^2 (1 - sigma) / (2 sigma)) dv = -0.25 * 1.015 * 0.2,
        // std^2 = eta^2 * 0.25: KL = d^2 / (2 std^2)
        let step =
            |v: &Tensor| SdeForm::Dance.step(v, &z, &sigmas, At::Step(1), eta, Next::Given(&z));
        let kl = step_kl(&step(&v), &step(&v_ref)).double_value(&[0]);
        let d = 0.25 * (1.0 + 0.09 * 0.25 / 1.5) * 0.2;
        let want = d * d / (2.0 * 0.09 * 0.25);
        assert!((kl - want).abs() < 1e-5 * want, "{kl} {want}");
    }

    #[test]
    fn a_step_without_noise_has_zero_kl_and_log_ratio() {
        // CPS's last step (sigma' = 0) has std 0: no division by it
        let sigmas = Tensor::from_slice(&[1.0f32, 0.5, 0.0]);
        let z = Tensor::from_slice(&[0.5f32, -1.0, 0.25, 2.0]).view([2, 2, 1]);
        let v = Tensor::from_slice(&[1.0f32, 0.5, -0.5, 0.0]).view([2, 2, 1]);
        let step =
            |v: &Tensor| SdeForm::Cps.step(v, &z, &sigmas, At::Step(1), 0.7, Next::Given(&z));
        let (a, b) = (step(&v), step(&(&v + 0.1)));
        assert_eq!(a.std, vec![0.0]);
        assert_eq!(
            Vec::<f32>::try_from(step_kl(&a, &b)).unwrap(),
            vec![0.0, 0.0]
        );
        let l = crate::grpo::guard::normalized_log_ratio(&b, &a.mean);
        assert_eq!(Vec::<f32>::try_from(l).unwrap(), vec![0.0, 0.0]);
    }
}
