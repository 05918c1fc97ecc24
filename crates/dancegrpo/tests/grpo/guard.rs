//! GRPO-Guard in the update: the normalised ratio is exactly 1 while the
//! policy is the rollout's, moves after a step, and is nearer 1 on average
//! than the plain ratio; every guard changes the gradient, none the first ratios.

use dancegrpo::grpo::update::UpdateStats;
use dancegrpo::grpo::{
    advantages, grpo_update, AdamW, AdamWConfig, Grouping, Guard, UpdateConfig, UpdateInputs,
};
use dancegrpo::models::{ActivationCheckpointing, VelocityModel};
use dancegrpo::rng::Philox;
use dancegrpo::sampler::SdeForm;
use tch::Tensor;

use super::setup::*;

/// One update with `guard` and the step form `sde` (noise 0.7), one optimizer
/// step per 4 samples.
fn guarded_update(guard: Guard, sde: SdeForm) -> (FirstWindow, UpdateStats) {
    let m = model(ActivationCheckpointing::Off);
    let (cond, schedule, draws, ro) = seeded_rollout_with(&m, G, (sde, 0.7, None));
    let rewards = Philox::new(3, 0).normal_tensor(&[PROMPTS * G]);
    let adv = advantages(&rewards, Grouping::PerPrompt { size: G }, 5.0).unwrap();
    let params: Vec<Tensor> = m.parameters().into_iter().map(|(_, p)| p).collect();
    let mut opt = AdamW::new(AdamWConfig::default(), &params);
    let shard = dancegrpo::dist::Shard::whole(ro.latents.size()[0]);
    let inputs = UpdateInputs {
        rollout: &ro,
        shard: &shard,
        advantages: &adv.clamped,
        cond: &cond,
        schedule: &schedule,
        draws: &draws,
    };
    let cfg = UpdateConfig {
        guard,
        sde,
        eta: 0.7,
        ..config(G)
    };
    let mut obs = FirstWindow::default();
    let stats = grpo_update(&m, &mut opt, &inputs, &cfg, &mut obs).unwrap();
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
