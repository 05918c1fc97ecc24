//! The ODE steps after the SDE window (MixGRPO-Flash): DPM-Solver++ of order
//! 2 (multistep, "2M") on a compressed schedule, in place of one Euler step
//! per remaining sigma. Nothing after the window is trained, so these steps
//! only change the final images (and cost fewer model calls).
//!
//! As MixGRPO's `sampling_utils.py` (`dpm_apply_strategy = "post"`,
//! `dpm_algorithm_type = "dpmsolver++"`, `dpm_solver_order = 2`): with the last
//! window step `l`, the sigmas after it are rebuilt as the shifted
//! `linspace(t[l + 1], 0, n)` of the linear times `t = linspace(1, 0, S + 1)`,
//! `n = int((S - l) * compress)` points; the data prediction is `x0 = z - sigma
//! v`, with `alpha = 1 - sigma`, `lambda = ln alpha - ln sigma`, `h = lambda_t -
//! lambda_s`; the history holds the data prediction of every step before (the
//! window's included, taken before its noise), so the first step after the
//! window is already of order 2; the last step (to sigma 0) is of order 1 and
//! lands on `x0`. One deliberate difference: MixGRPO's `max(n, 1)` leaves a
//! window ending within `1 / compress` steps of the end with a schedule that
//! stops short of 0 (undenoised images); ours takes at least 2 points, so the
//! last step always reaches 0.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::Schedule;

/// What samples the steps after the SDE window (`sampler.window.post`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "solver", rename_all = "snake_case", deny_unknown_fields)]
pub enum PostWindow {
    /// One Euler step per sigma of the schedule (MixGRPO without DPM, DanceGRPO).
    #[default]
    Euler,
    /// DPM-Solver++ 2M on a compressed schedule (MixGRPO-Flash).
    #[serde(rename = "dpm_solver_2m")]
    DpmSolver2m {
        /// Share of the remaining steps kept (MixGRPO's
        /// `dpm_post_compress_ratio`: 0.4 for MixGRPO-Flash, 0.2 for Flash*).
        #[serde(default = "default_compress")]
        compress: f64,
        /// The second-order correction (MixGRPO's `dpm_solver_type`; its
        /// Flash scripts use `midpoint`).
        #[serde(default)]
        variant: DpmVariant,
    },
}

fn default_compress() -> f64 {
    0.4
}

/// DPM-Solver++'s second-order correction term.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpmVariant {
    /// `-(1/2) alpha_t (e^-h - 1) D1`.
    #[default]
    Midpoint,
    /// `alpha_t ((e^-h - 1) / h + 1) D1`.
    Heun,
}

impl PostWindow {
    /// Why these settings cannot run: `(field, message)`.
    pub fn check(&self) -> Option<(&'static str, String)> {
        match *self {
            PostWindow::DpmSolver2m { compress, .. } if !(compress > 0.0 && compress <= 1.0) => {
                Some(("compress", format!("must be in (0, 1], got {compress}")))
            }
            _ => None,
        }
    }

    /// The sigmas from step `last + 1` of `schedule` down to 0 that the steps
    /// after a window ending with step `last` take (`None`: the schedule's own,
    /// by Euler, or nothing left: a window ending with the last step). The
    /// first is the schedule's own `sigma[last + 1]`, the last 0.
    pub fn sigmas_after(&self, schedule: &Schedule, last: i64) -> Option<Vec<f64>> {
        let PostWindow::DpmSolver2m { compress, .. } = *self else {
            return None;
        };
        let s = schedule.steps();
        if last + 1 >= s {
            return None; // the window's last step already reaches sigma 0
        }
        let n = (((s - last) as f64 * compress) as i64).max(2);
        // in the schedule's dtype, as MixGRPO does in float32 (its model
        // timesteps truncate these values: 0.59999996 is step 599, not 600)
        let kind = (schedule.sigmas.kind(), tch::Device::Cpu);
        let t0 = Tensor::linspace(1.0, 0.0, s + 1, kind).double_value(&[last + 1]);
        let t = Tensor::linspace(t0, 0.0, n, kind); // (n,), from t[last + 1] to 0
        let shift = schedule.shift;
        let sigmas = (&t * shift) / ((&t * (shift - 1.0)) + 1.0);
        Vec::<f64>::try_from(sigmas.to_kind(Kind::Double)).ok()
    }
}

/// The model's timestep input at `sigma` the way the schedule quantises its
/// own (`int(float32(sigma) * 1000) / 1000`), in `kind`, shape `(b,)`.
pub fn model_timestep(sigma: f64, kind: Kind, b: i64) -> Tensor {
    let t = ((sigma as f32) * 1000.0).trunc() as f64;
    (Tensor::from(t).to_kind(kind) / 1000.0)
        .expand([b], false)
        .contiguous()
}

/// DPM-Solver++ 2M's state along one batch of trajectories: the previous
/// step's data prediction and its sigma.
pub struct Dpm2M {
    variant: DpmVariant,
    prev: Option<(Tensor, f64)>,
}

/// `lambda(sigma) = ln(1 - sigma) - ln(sigma)`.
fn lambda(sigma: f64) -> f64 {
    (1.0 - sigma).ln() - sigma.ln()
}

impl Dpm2M {
    /// An empty history.
    pub fn new(variant: DpmVariant) -> Self {
        Dpm2M {
            variant,
            prev: None,
        }
    }

    /// Records the data prediction `x0` (n, L, c) of a step taken from `sigma`.
    pub fn record(&mut self, x0: &Tensor, sigma: f64) {
        self.prev = Some((x0.shallow_clone(), sigma));
    }

    /// One step of `z` (n, L, c) with velocity `v` from `sigma_s` to
    /// `sigma_t`: `(z_t, x0)`, `x0` recorded for the next step. Order 1 on
    /// the last step (`last`) or without history, else order 2.
    pub fn step(
        &mut self,
        z: &Tensor,
        v: &Tensor,
        (sigma_s, sigma_t): (f64, f64),
        last: bool,
    ) -> (Tensor, Tensor) {
        let v = v.to_kind(z.kind());
        let x0 = z - &v * sigma_s; // (n, L, c)
        if sigma_t == 0.0 {
            // h is infinite: the first-order step is x0 itself
            self.record(&x0, sigma_s);
            return (x0.copy(), x0);
        }
        let h = lambda(sigma_t) - lambda(sigma_s);
        let alpha_t = 1.0 - sigma_t;
        let em1 = (-h).exp_m1(); // e^-h - 1
        let first = z * (sigma_t / sigma_s) + &x0 * (-alpha_t * em1);
        let next = match (&self.prev, last) {
            (Some((m1, sigma_prev)), false) => {
                let r0 = (lambda(sigma_s) - lambda(*sigma_prev)) / h;
                let d1 = (&x0 - m1) / r0;
                let coef = match self.variant {
                    DpmVariant::Midpoint => -0.5 * alpha_t * em1,
                    DpmVariant::Heun => alpha_t * (em1 / h + 1.0),
                };
                first + d1 * coef
            }
            _ => first,
        };
        self.record(&x0, sigma_s);
        (next, x0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `z_s` on the straight path from `x0` to `eps` and the velocity of that path.
    fn straight(x0: &Tensor, eps: &Tensor, sigma: f64) -> (Tensor, Tensor) {
        (x0 * (1.0 - sigma) + eps * sigma, eps - x0)
    }

    #[test]
    fn the_compressed_schedule_follows_mixgrpo() {
        let s = Schedule::shifted(25, 3.0);
        let post = PostWindow::DpmSolver2m {
            compress: 0.4,
            variant: DpmVariant::Midpoint,
        };
        // window at steps 0..4 (last 3): int(22 * 0.4) = 8 points from sigma_4
        let sig = post.sigmas_after(&s, 3).unwrap();
        let want = [0.9403, 0.8852, 0.8182, 0.7347, 0.6279, 0.4865, 0.2903, 0.0];
        assert_eq!(sig.len(), want.len());
        for (a, b) in sig.iter().zip(want) {
            assert!((a - b).abs() < 5e-5, "{sig:?}");
        }
        assert_eq!(sig[0], s.sigma(4));
        // Flash*: 0.2 keeps 4 points; a window near the end still reaches 0
        assert_eq!(
            PostWindow::DpmSolver2m {
                compress: 0.2,
                variant: DpmVariant::Midpoint
            }
            .sigmas_after(&s, 3)
            .unwrap()
            .len(),
            4
        );
        let end = post.sigmas_after(&s, 23).unwrap();
        assert_eq!((end.len(), end[1]), (2, 0.0));
        // a window ending with the last step leaves nothing to solve (no 0 -> 0 call)
        assert_eq!(post.sigmas_after(&s, 24), None);
        // compress 1: the schedule's own sigmas
        let all = PostWindow::DpmSolver2m {
            compress: 1.0,
            variant: DpmVariant::Heun,
        };
        let own: Vec<f64> = (4..=25).map(|i| s.sigma(i)).collect();
        let got = all.sigmas_after(&s, 3).unwrap();
        for (a, b) in got.iter().zip(&own) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
        assert_eq!(PostWindow::Euler.sigmas_after(&s, 3), None);
    }

    #[test]
    fn a_straight_path_is_followed_exactly() {
        // a model whose data prediction is constant: every order is exact
        let x0 = Tensor::from_slice(&[0.3f64, -1.2, 2.0]).view([1, 1, 3]);
        let eps = Tensor::from_slice(&[1.1f64, 0.4, -0.7]).view([1, 1, 3]);
        let sigmas = [0.9, 0.7, 0.45, 0.2, 0.0];
        let mut dpm = Dpm2M::new(DpmVariant::Midpoint);
        let (mut z, _) = straight(&x0, &eps, sigmas[0]);
        for (k, w) in sigmas.windows(2).enumerate() {
            let (_, v) = straight(&x0, &eps, w[0]);
            let (next, pred) = dpm.step(&z, &v, (w[0], w[1]), k == sigmas.len() - 2);
            let (want, _) = straight(&x0, &eps, w[1]);
            assert!(
                (&next - &want).abs().max().double_value(&[]) < 1e-12,
                "step {k}"
            );
            assert!((&pred - &x0).abs().max().double_value(&[]) < 1e-12);
            z = next;
        }
        assert!((&z - &x0).abs().max().double_value(&[]) < 1e-12);
    }

    /// Integrates `dz/dsigma = v(z, sigma)` of a curved field from 0.8 to 0.1
    /// in `n` steps with `dpm` (or Euler): the end point.
    fn curved(n: usize, dpm: Option<DpmVariant>) -> f64 {
        // data prediction x0(sigma) = 1 + sigma^2: v = (z - x0) / sigma
        let sig: Vec<f64> = (0..=n).map(|k| 0.8 - 0.7 * k as f64 / n as f64).collect();
        let x0 = |s: f64| 1.0 + s * s;
        let mut z = Tensor::from_slice(&[0.5f64]);
        let mut state = dpm.map(Dpm2M::new);
        for w in sig.windows(2) {
            let x = z.double_value(&[0]);
            let v = Tensor::from_slice(&[(x - x0(w[0])) / w[0]]);
            z = match &mut state {
                Some(s) => s.step(&z, &v, (w[0], w[1]), false).0,
                None => &z + &v * (w[1] - w[0]),
            };
        }
        z.double_value(&[0])
    }

    #[test]
    fn the_second_order_steps_converge_faster_than_euler() {
        let truth = curved(100_000, None);
        let err = |n, m| (curved(n, m) - truth).abs();
        // measured: Euler 0.0100 at 16 steps, midpoint 0.0018, Heun 0.0023
        let (euler, mid, heun) = (
            err(16, None),
            err(16, Some(DpmVariant::Midpoint)),
            err(16, Some(DpmVariant::Heun)),
        );
        assert!(
            mid < euler / 4.0 && heun < euler / 3.0,
            "{euler} {mid} {heun}"
        );
        // second order: doubling the steps divides the error by about 4 (Euler's by 2)
        for v in [DpmVariant::Midpoint, DpmVariant::Heun] {
            let ratio = err(16, Some(v)) / err(32, Some(v));
            assert!(ratio > 3.5, "{v:?}: {ratio}");
        }
        assert!(euler / err(32, None) < 2.5);
    }

    #[test]
    fn bad_settings_name_the_field() {
        let bad = PostWindow::DpmSolver2m {
            compress: 0.0,
            variant: DpmVariant::Midpoint,
        };
        assert_eq!(bad.check().unwrap().0, "compress");
        assert!(PostWindow::Euler.check().is_none());
        let t = model_timestep(0.59999996, Kind::Float, 2);
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [0.599f32, 0.599]);
    }
}
