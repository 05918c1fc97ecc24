//! The stochastic step's forms: DanceGRPO's Dance-SDE (the default, in
//! [`super::sde`]), Flow-GRPO's SDE, coefficients-preserving sampling (CPS) and
//! the plain Euler ODE step. Every form takes the same inputs (velocity, latent,
//! sigmas, which step, noise level, where the next latent comes from) and gives
//! the same [`SdeStep`], so the rollout and the update never branch on a
//! method's name.
//!
//! Flow-GRPO's forms follow `sde_step_with_logprob` of flow_grpo
//! (`flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`, `sde_type` `"sde"` and
//! `"cps"`): float32 tensor arithmetic in its order, sigmas as per-row tensors,
//! `sigma_max = sigmas[1]` standing in for `sigma = 1`. Their quirks are kept:
//! the SDE's log-probability carries the Gaussian's constants (`-log std -
//! log sqrt(2 pi)`), the CPS one is `-(x - mean)^2` with no variance and no
//! constants (flow_grpo's "remove all constants"); both are means over the
//! non-batch dimensions, as Dance-SDE's.

use tch::{Kind, Tensor};

use super::sde::{sde_step, step_sigmas, At, Next, SdeStep};
use crate::nn::upcast_kind;

/// Which stochastic step the sampler takes (`sampler.sde` in the config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SdeForm {
    /// DanceGRPO's `flux_step`: `std = eta sqrt(sigma - sigma_next)`, the drift
    /// with the `-eta^2/2 score` correction, log-prob without constants.
    #[default]
    Dance,
    /// Flow-GRPO's SDE: noise level `eta sqrt(sigma / (1 - sigma))`, step std
    /// that times `sqrt(sigma - sigma_next)`, the Gaussian log-density.
    FlowGrpo,
    /// Coefficients-preserving sampling: `x0 (1 - sigma_next) + x1
    /// sqrt(sigma_next^2 - s^2)` plus noise of std `s = sigma_next sin(eta pi / 2)`,
    /// so the next latent keeps the schedule's marginal noise level.
    Cps,
    /// The Euler ODE step `z + (sigma_next - sigma) v`: deterministic, log-prob 0,
    /// nothing to train.
    Ode,
}

impl SdeForm {
    /// Whether the step is stochastic (has a log-probability to train).
    pub fn is_stochastic(self) -> bool {
        self != SdeForm::Ode
    }

    /// One step from `sigmas[i]` to `sigmas[i + 1]` (`sigmas`: `(S+1,)`, float32
    /// or float64), `i` shared by the batch or given per row; `eta` is the
    /// form's noise level (Dance-SDE's `eta`, Flow-GRPO's and CPS's `noise_level`).
    pub fn step(
        self,
        v: &Tensor,
        z: &Tensor,
        sigmas: &Tensor,
        at: At,
        eta: f64,
        next: Next,
    ) -> SdeStep {
        match self {
            SdeForm::Dance => sde_step(v, z, sigmas, at, eta, next),
            _ => {
                let s = RowSigmas::new(sigmas, at, z);
                let (v, z) = (v.to_kind(s.kind), z.to_kind(s.kind));
                match self {
                    SdeForm::FlowGrpo => flow_grpo(&v, &z, &s, eta, next),
                    SdeForm::Cps => cps(&v, &z, &s, eta, next),
                    _ => ode(&v, &z, &s, next),
                }
            }
        }
    }
}

impl SdeForm {
    /// `d mean / d v` of step `j` of `sigmas` (`(S+1,)` values): every form's
    /// mean is linear in the velocity, with this gain (f64 arithmetic).
    pub fn velocity_gain(self, sigmas: &[f64], j: usize, eta: f64) -> f64 {
        let (sigma, next) = (sigmas[j], sigmas[j + 1]);
        let dt = next - sigma;
        match self {
            SdeForm::Dance => dt * (1.0 + eta * eta * (1.0 - sigma) / (2.0 * sigma)),
            SdeForm::FlowGrpo => {
                let safe = if sigma == 1.0 { sigmas[1] } else { sigma };
                let var = eta * eta * sigma / (1.0 - safe);
                dt * (1.0 + var * (1.0 - sigma) / (2.0 * sigma))
            }
            SdeForm::Cps => {
                let s = next * (eta * std::f64::consts::PI / 2.0).sin();
                -sigma * (1.0 - next) + (1.0 - sigma) * (next * next - s * s).sqrt()
            }
            SdeForm::Ode => dt,
        }
    }
}

/// `sigma`, `sigma_next` and Flow-GRPO's `sigma_max = sigmas[1]`: 0-d for a
/// shared step, `(b, 1, 1)` per row; in the latents' compute kind.
struct RowSigmas {
    sigma: Tensor,
    sigma_next: Tensor,
    sigma_max: f64,
    kind: Kind,
}

impl RowSigmas {
    fn new(sigmas: &Tensor, at: At, z: &Tensor) -> RowSigmas {
        let kind = upcast_kind(z.kind());
        let sig = sigmas.to_kind(kind);
        let (sigma, sigma_next) = step_sigmas(&sig, at, z.device());
        RowSigmas {
            sigma: sigma.to_device(z.device()),
            sigma_next: sigma_next.to_device(z.device()),
            sigma_max: sig.get(1).double_value(&[]),
            kind,
        }
    }

    /// One value per row (a shared step: one value), as f64.
    fn per_row(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap_or_default()
    }
}

/// Flow-GRPO's `sde_type="sde"` step.
fn flow_grpo(v: &Tensor, z: &Tensor, s: &RowSigmas, eta: f64, next: Next) -> SdeStep {
    let (sigma, sigma_next) = (&s.sigma, &s.sigma_next);
    let dt = sigma_next - sigma; // negative
    let at_one = sigma.eq(1.0);
    let safe = sigma.where_self(&at_one.logical_not(), &sigma.full_like(s.sigma_max));
    let std_dev_t = (sigma / (safe.neg() + 1.0)).sqrt() * eta;
    let var_t = std_dev_t.pow_tensor_scalar(2);
    let two_sigma = sigma * 2.0;
    let z_coef = (&var_t / &two_sigma * &dt) + 1.0;
    let v_coef = (&var_t * (sigma.neg() + 1.0) / &two_sigma) + 1.0;
    let mean = z * z_coef + v * v_coef * &dt;
    let std = &std_dev_t * dt.neg().sqrt();
    let next = match next {
        Next::Noise(noise) => &mean + &std * noise.to_kind(s.kind),
        Next::Given(t) => t.shallow_clone(),
    };
    let two_pi = Tensor::from(2.0 * std::f32::consts::PI).to_kind(s.kind);
    let diff = next.detach().to_kind(s.kind) - &mean;
    let density = diff.pow_tensor_scalar(2).neg() / (std.pow_tensor_scalar(2) * 2.0)
        - std.log()
        - two_pi.sqrt().log().to_device(z.device());
    SdeStep {
        pred_x0: z - sigma * v,
        log_prob: mean_per_row(density),
        mean,
        std: RowSigmas::per_row(&std),
        next,
    }
}

/// Flow-GRPO's `sde_type="cps"` step.
fn cps(v: &Tensor, z: &Tensor, s: &RowSigmas, eta: f64, next: Next) -> SdeStep {
    let (sigma, sigma_next) = (&s.sigma, &s.sigma_next);
    let std_dev_t = sigma_next * (eta * std::f64::consts::PI / 2.0).sin();
    let pred_x0 = z - sigma * v;
    let noise_estimate = z + v * (sigma.neg() + 1.0);
    let keep = (sigma_next.pow_tensor_scalar(2) - std_dev_t.pow_tensor_scalar(2)).sqrt();
    let mean = &pred_x0 * (sigma_next.neg() + 1.0) + noise_estimate * keep;
    let next = match next {
        Next::Noise(noise) => &mean + &std_dev_t * noise.to_kind(s.kind),
        Next::Given(t) => t.shallow_clone(),
    };
    let diff = next.detach().to_kind(s.kind) - &mean;
    SdeStep {
        log_prob: mean_per_row(diff.pow_tensor_scalar(2).neg()),
        mean,
        std: RowSigmas::per_row(&std_dev_t),
        pred_x0,
        next,
    }
}

/// The Euler ODE step (diffusers' `FlowMatchEulerDiscreteScheduler.step`); a
/// given next latent is returned as it is, the log-prob is 0.
fn ode(v: &Tensor, z: &Tensor, s: &RowSigmas, next: Next) -> SdeStep {
    let dt = &s.sigma_next - &s.sigma;
    let mean = z + v * &dt;
    let next = match next {
        Next::Noise(_) => mean.shallow_clone(),
        Next::Given(t) => t.shallow_clone(),
    };
    let rows = z.size()[0];
    SdeStep {
        pred_x0: z - &s.sigma * v,
        log_prob: Tensor::zeros([rows], (s.kind, z.device())),
        mean,
        std: vec![0.0; s.sigma.numel().max(1)],
        next,
    }
}

fn mean_per_row(t: Tensor) -> Tensor {
    let dims: Vec<i64> = (1..t.dim() as i64).collect();
    t.mean_dim(dims.as_slice(), false, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Philox;

    /// Fixed inputs that Python computes alike: `z = sin(0.37 k)`,
    /// `v = cos(0.11 k)`, noise `cos(0.23 k)`, k = 0..24 as `(2, 3, 4)`.
    fn inputs() -> (Tensor, Tensor, Tensor, Tensor) {
        let k = Tensor::arange(24, (Kind::Float, tch::Device::Cpu));
        let f = |t: Tensor| t.view([2, 3, 4]);
        let sigmas = Tensor::from_slice(&[1.0f32, 0.75, 0.5, 0.25, 0.0]);
        let (z, v) = (f((&k * 0.37).sin()), f((&k * 0.11).cos()));
        (z, v, f((&k * 0.23).cos()), sigmas)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        Vec::<f32>::try_from(t.reshape([-1]))
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn flow_grpo_and_cps_match_flow_grpos_arithmetic_bit_for_bit() {
        // flow_grpo's sde_step_with_logprob run by torch 2.11 on these inputs
        // (noise_level 0.7; per-row sigmas; `sde` and `cps`; steps 0 and 2)
        let cases: [(SdeForm, i64, [u32; 2], [u32; 4]); 4] = [
            (
                SdeForm::FlowGrpo,
                0,
                [0xbf48ce81, 0xbf4e3e20],
                [0x3ee66666, 0x3f34c2c8, 0x3f647108, 0x3f7ac7fe],
            ),
            (
                SdeForm::FlowGrpo,
                2,
                [0xbdbae365, 0xbde66050],
                [0x3d1eb850, 0x3eb28cff, 0x3f19ffb3, 0x3f42eec8],
            ),
            (
                SdeForm::Cps,
                0,
                [0xbe4b28bd, 0xbe5e944b],
                [0x3ed62582, 0x3f1d9e7e, 0x3f40c340, 0x3f4ecace],
            ),
            (
                SdeForm::Cps,
                2,
                [0xbcb495fd, 0xbcc5d929],
                [0xbdc39546, 0x3e59eb6e, 0x3ef14957, 0x3f24e712],
            ),
        ];
        let (z, v, e, sigmas) = inputs();
        for (form, i, lp, next) in cases {
            let rows = [i, i];
            for at in [At::Step(i), At::Rows(&rows)] {
                let s = form.step(&v, &z, &sigmas, at, 0.7, Next::Noise(&e));
                assert_eq!(bits(&s.log_prob), lp, "{form:?} step {i} {at:?}");
                assert_eq!(
                    bits(&s.next.get(0).get(0)),
                    next,
                    "{form:?} step {i} {at:?}"
                );
                // evaluating the sampled latent gives the same log-prob
                let again = form.step(&v, &z, &sigmas, at, 0.7, Next::Given(&s.next));
                assert!(again.log_prob.equal(&s.log_prob));
            }
        }
    }

    #[test]
    fn log_probs_are_maximal_at_the_mean() {
        let (z, v, e, sigmas) = inputs();
        for form in [SdeForm::FlowGrpo, SdeForm::Cps] {
            let at_mean = form.step(
                &v,
                &z,
                &sigmas,
                At::Step(1),
                0.7,
                Next::Noise(&e.zeros_like()),
            );
            let off = form.step(&v, &z, &sigmas, At::Step(1), 0.7, Next::Noise(&e));
            let (best, worse): (Vec<f32>, Vec<f32>) = (
                Vec::try_from(&at_mean.log_prob).unwrap(),
                Vec::try_from(&off.log_prob).unwrap(),
            );
            for (b, w) in best.iter().zip(&worse) {
                assert!(b > w, "{form:?}: {b} vs {w}");
            }
            // Flow-GRPO's is the Gaussian density: -log std - log sqrt(2 pi) at the mean
            if form == SdeForm::FlowGrpo {
                let std = at_mean.std[0];
                let want = -std.ln() - (2.0 * std::f64::consts::PI).sqrt().ln();
                assert!(
                    (best[0] as f64 - want).abs() < 1e-6,
                    "{} vs {want}",
                    best[0]
                );
            } else {
                assert_eq!(best, vec![0.0, 0.0]);
            }
        }
    }

    #[test]
    fn steps_have_the_variances_their_papers_state() {
        // a latent on the flow's path z = (1 - s) x0 + s e with the exact velocity e - x0
        let mut rng = Philox::new(7, 0);
        let (x0, eps, xi) = (
            rng.normal_tensor(&[4, 64, 256]),
            rng.normal_tensor(&[4, 64, 256]),
            rng.normal_tensor(&[4, 64, 256]),
        );
        let sigmas = Tensor::from_slice(&[1.0f32, 0.8, 0.55, 0.3, 0.0]);
        let (i, eta) = (1, 0.7);
        let (s, s_next) = (0.8f64, 0.55f64);
        let z = &x0 * (1.0 - s) + &eps * s;
        let v = &eps - &x0;
        let var = |t: &Tensor| t.var(true).double_value(&[]);
        // CPS keeps the schedule's noise level: next - (1 - s') x0 has variance s'^2
        let cps = SdeForm::Cps.step(&v, &z, &sigmas, At::Step(i), eta, Next::Noise(&xi));
        let noise_part = &cps.next - &x0 * (1.0 - s_next);
        assert!((var(&noise_part) / (s_next * s_next) - 1.0).abs() < 0.01);
        assert!((cps.std[0] - s_next * (eta * std::f64::consts::PI / 2.0).sin()).abs() < 1e-6);
        // Flow-GRPO's step std: eta sqrt(s / (1 - s)) sqrt(s - s')
        let fg = SdeForm::FlowGrpo.step(&v, &z, &sigmas, At::Step(i), eta, Next::Noise(&xi));
        let want = eta * (s / (1.0 - s)).sqrt() * (s - s_next).sqrt();
        assert!((fg.std[0] - want).abs() < 1e-6, "{} vs {want}", fg.std[0]);
        let mean = SdeForm::FlowGrpo.step(
            &v,
            &z,
            &sigmas,
            At::Step(i),
            eta,
            Next::Noise(&xi.zeros_like()),
        );
        assert!((var(&(&fg.next - &mean.next)) / (want * want) - 1.0).abs() < 0.01);
    }

    #[test]
    fn the_ode_step_is_the_sde_step_without_noise() {
        let (z, v, e, sigmas) = inputs();
        let ode = SdeForm::Ode.step(&v, &z, &sigmas, At::Step(2), 0.7, Next::Noise(&e));
        assert_eq!(Vec::<f32>::try_from(&ode.log_prob).unwrap(), vec![0.0, 0.0]);
        assert!(!SdeForm::Ode.is_stochastic());
        // Flow-GRPO's SDE at noise level 0 is this Euler step bit for bit
        let fg0 = SdeForm::FlowGrpo.step(&v, &z, &sigmas, At::Step(2), 0.0, Next::Noise(&e));
        assert!(fg0.next.equal(&ode.next));
        // CPS and Dance-SDE at 0 are the same step up to rounding
        for form in [SdeForm::Cps, SdeForm::Dance] {
            let s = form.step(&v, &z, &sigmas, At::Step(2), 0.0, Next::Noise(&e));
            assert!(s.next.allclose(&ode.next, 1e-6, 1e-6, false), "{form:?}");
        }
        // the x0 prediction is the same for every form
        assert!(fg0.pred_x0.equal(&ode.pred_x0));
    }

    #[test]
    fn the_velocity_gain_is_the_means_derivative() {
        let (z, v, _, sigmas) = inputs();
        let v = v.to_kind(Kind::Double); // v + 1 exact
        let s64: Vec<f64> = Vec::try_from(sigmas.to_kind(Kind::Double)).unwrap();
        for form in [
            SdeForm::Dance,
            SdeForm::FlowGrpo,
            SdeForm::Cps,
            SdeForm::Ode,
        ] {
            for j in 0..4 {
                let step = |v: &Tensor| {
                    let (z, v) = (z.to_kind(Kind::Double), v.to_kind(Kind::Double));
                    let s = sigmas.to_kind(Kind::Double);
                    form.step(&v, &z, &s, At::Step(j), 0.7, Next::Given(&z))
                        .mean
                };
                let d = (step(&(&v + 1.0)) - step(&v)).to_kind(Kind::Double);
                let g = form.velocity_gain(&s64, j as usize, 0.7);
                let err = (d - g).abs().max().double_value(&[]);
                assert!(err < 1e-9, "{form:?} step {j}: gain {g}, error {err}");
            }
        }
    }
}
