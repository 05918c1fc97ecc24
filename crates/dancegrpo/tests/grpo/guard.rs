//! GRPO-Guard in the update: the normalised ratio is exactly 1 while the
//! policy is the rollout's, moves after a step, and is nearer 1 on average
//! than the plain ratio; every guard changes the gradient, none the first ratios.

use dancegrpo::grpo::update::UpdateStats;
use dancegrpo::grpo::{Guard, UpdateConfig};
use dancegrpo::models::ActivationCheckpointing;
use dancegrpo::sampler::SdeForm;

use super::setup::*;

/// One update with `guard` and the step form `sde` (noise 0.7), one optimizer
/// step per 4 samples.
fn guarded_update(guard: Guard, sde: SdeForm) -> (FirstWindow, UpdateStats) {
    let m = model(ActivationCheckpointing::Off);
    let cfg = UpdateConfig {
        guard,
        sde,
        eta: 0.7,
        ..config(G)
    };
    let mut obs = FirstWindow::default();
    let stats = update_after_rollout(&m, G, &cfg, &mut obs).1.unwrap();
    (obs, stats)
}

#[test]
fn guarded_ratios_are_exactly_one_until_the_first_step() {
    for sde in [SdeForm::Dance, SdeForm::FlowGrpo, SdeForm::Cps] {
        let (plain_obs, plain) = guarded_update(Guard::None, sde);
        for guard in [Guard::RatioNorm, Guard::GradReweight, Guard::Full] {
            let (obs, stats) = guarded_update(guard, sde);
            assert_eq!(obs.ratios.len() as i64, G * 3);
            assert!(
                obs.ratios.iter().all(|&r| r == 1.0),
                "{sde:?} {guard:?} {:?}",
                obs.ratios
            );
            assert!(obs.later.iter().any(|&r| r != 1.0), "{sde:?} {guard:?}");
            // at ratio 1 the loss is -A / scale, re-weighted or not: the same values
            assert_eq!(stats.losses[..G as usize], plain.losses[..G as usize]);
            // the normalised log-ratio's gradient is the step's std times the plain
            // one's (CPS: another factor), re-weighting scales steps: the first
            // step's gradient changes with every guard
            assert_ne!(
                stats.grad_norms[0], plain.grad_norms[0],
                "{sde:?} {guard:?}"
            );
            if guard == Guard::RatioNorm {
                // after the step, the normalised ratios sit nearer 1 than the plain ones
                let dev = |r: &[f32]| r.iter().map(|&x| (x as f64 - 1.0).abs()).sum::<f64>();
                assert!(dev(&obs.later) < dev(&plain_obs.later), "{sde:?}");
            }
        }
    }
}
