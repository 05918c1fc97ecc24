//! The GRPO engine end to end on a seeded tiny FLUX: batched rollouts keep the
//! first update's ratios at exactly 1.0, whatever the rollout batch.

mod dpm;
mod guard;
mod kl;
mod rollout_graphs;
mod setup;
mod tree;
mod windows;

use dancegrpo::grpo::{
    advantages, grpo_update, AdamW, AdamWConfig, Grouping, UpdateBatching, UpdateConfig,
    UpdateInputs,
};
use dancegrpo::models::flux::FluxTransformer;
use dancegrpo::models::{ActivationCheckpointing, VelocityModel};
use dancegrpo::rng::Philox;
use dancegrpo::sampler::rollout::rollout;
use dancegrpo::sampler::{SdeForm, StepWindow, WindowTraining};
use tch::{Device, Kind, Tensor};

use setup::*;

/// Every trained transition of a window in one model batch: the first
/// window's ratios are exactly 1 and its losses are the per-sample ones bit
/// for bit (the model is batch-invariant on the CPU); the summed gradient
/// differs from the per-sample accumulation in its last bits only.
#[test]
fn window_batching_keeps_the_first_window_exact() {
    let off = ActivationCheckpointing::Off;
    let (_, _, per_sample) = iteration_capped(1, 2, off, UpdateBatching::PerSample, None);
    for (batch, ga, mode, max_rows) in [
        (1, 2, off, None),
        (G, 4, ActivationCheckpointing::PerBlock, None),
        (1, 2, off, Some(3)), // two samples a batch: one trained timestep each
    ] {
        let (_, obs, stats) = iteration_capped(batch, ga, mode, UpdateBatching::Window, max_rows);
        assert_eq!(obs.ratios.len() as i64, ga * 3);
        assert!(obs.ratios.iter().all(|&r| r == 1.0), "{:?}", obs.ratios);
        assert!(obs.later.iter().any(|&r| r != 1.0));
        if ga == 2 {
            assert_eq!(
                stats.losses[..2],
                per_sample.losses[..2],
                "first window losses"
            );
            let (a, b) = (stats.grad_norms[0], per_sample.grad_norms[0]);
            assert!((a - b).abs() <= 1e-5 * b, "grad norm {a} vs {b}");
            for (x, y) in stats
                .losses
                .iter()
                .flatten()
                .zip(per_sample.losses.iter().flatten())
            {
                assert!((x - y).abs() <= 1e-3 * y.abs().max(1e-6), "loss {x} vs {y}");
            }
        }
    }
}

/// Flow-GRPO's SDE and CPS keep the exact first ratios too, with the rollout
/// batched or not and the update per rollout batch or per window, and their
/// log-probabilities are not Dance-SDE's.
#[test]
fn flow_grpo_and_cps_rollouts_keep_the_first_ratios_exact() {
    let off = ActivationCheckpointing::Off;
    let dance = iteration(1, 2, off).0;
    for sde in [SdeForm::FlowGrpo, SdeForm::Cps] {
        let mut first: Option<Tensor> = None;
        for (batch, batching) in [(1, UpdateBatching::Rollout), (G, UpdateBatching::Window)] {
            let rows = (batching, None);
            let (ro, obs, _) = iteration_sde(batch, 2, off, Kind::Float, rows, (sde, 0.7, None));
            assert_eq!(obs.ratios.len(), 6, "{sde:?}");
            assert!(
                obs.ratios.iter().all(|&r| r == 1.0),
                "{sde:?}: {:?}",
                obs.ratios
            );
            assert!(
                ro.log_probs.isfinite().all().int64_value(&[]) == 1,
                "{sde:?}"
            );
            assert!(!ro.log_probs.allclose(&dance.log_probs, 1e-3, 1e-3, false));
            match &first {
                None => first = Some(ro.latents),
                Some(l) => assert!(ro.latents.equal(l), "{sde:?}: batch {batch} differs"),
            }
        }
    }
}

/// MixGRPO's window: steps outside it are ODE steps (log-prob 0, the Euler
/// update), every sample trains exactly the window's steps, and the first
/// ratios stay exactly 1.
#[test]
fn a_window_samples_and_trains_only_its_steps() {
    let off = ActivationCheckpointing::Off;
    let window = StepWindow {
        start: 1,
        end: 3,
        train: WindowTraining::All,
    };
    for sde in [SdeForm::Dance, SdeForm::FlowGrpo] {
        let rows = (UpdateBatching::Rollout, None);
        let (ro, obs, stats) =
            iteration_sde(G, 2, off, Kind::Float, rows, (sde, 0.5, Some(window)));
        assert_eq!(stats.transitions as i64, PROMPTS * G * 2);
        assert_eq!(obs.ratios.len(), 4, "2 samples x 2 window steps");
        assert!(
            obs.ratios.iter().all(|&r| r == 1.0),
            "{sde:?}: {:?}",
            obs.ratios
        );
        let lp: Vec<Vec<f32>> = Vec::try_from(&ro.log_probs).unwrap();
        for row in &lp {
            for (i, l) in row.iter().enumerate() {
                let inside = window.contains(i as i64);
                assert_eq!(*l == 0.0, !inside, "{sde:?} step {i}: log-prob {l}");
            }
        }
        // the ODE steps before the window are the same for every form
        if sde == SdeForm::FlowGrpo {
            let (.., dance) =
                seeded_rollout_with(&model(off), G, (SdeForm::Dance, 0.5, Some(window)));
            assert!(ro
                .latents
                .narrow(1, 0, 2)
                .equal(&dance.latents.narrow(1, 0, 2)));
            assert!(!ro
                .latents
                .narrow(1, 2, 1)
                .equal(&dance.latents.narrow(1, 2, 1)));
        }
    }
}

/// `train = "fraction"`: a random `timestep_fraction` of the window per sample.
#[test]
fn a_window_can_train_a_random_fraction_of_its_steps() {
    let off = ActivationCheckpointing::Off;
    let window = StepWindow {
        start: 1,
        end: 5,
        train: WindowTraining::Fraction,
    };
    // 4 window steps x the fraction 0.6 of `config` = 2 per sample
    let rows = (UpdateBatching::Rollout, None);
    let sde = (SdeForm::Dance, 0.5, Some(window));
    let (_, obs, stats) = iteration_sde(G, 2, off, Kind::Float, rows, sde);
    assert_eq!(stats.transitions as i64, PROMPTS * G * 2);
    assert!(obs.ratios.iter().all(|&r| r == 1.0), "{:?}", obs.ratios);
    assert_eq!(obs.trained.len() as i64, PROMPTS * G * 2);
    assert!(
        obs.trained.iter().all(|&(_, j)| window.contains(j)),
        "{:?}",
        obs.trained
    );
    // two distinct steps per sample, not the same two for every sample
    for b in 0..PROMPTS * G {
        let mut steps: Vec<i64> = obs
            .trained
            .iter()
            .filter(|t| t.0 == b)
            .map(|t| t.1)
            .collect();
        steps.dedup();
        assert_eq!(steps.len(), 2, "sample {b}: {steps:?}");
    }
    assert!(obs.trained.iter().any(|t| t.1 != obs.trained[0].1));
}

#[test]
fn first_update_ratios_are_exactly_one_for_any_rollout_batch() {
    let reference = iteration(1, 2, ActivationCheckpointing::Off).0;
    for (batch, ga, mode) in [
        (1, 2, ActivationCheckpointing::Off),
        (G, 2, ActivationCheckpointing::Off), // model batches straddle accumulation windows
        (G, 4, ActivationCheckpointing::PerBlock),
        (3, 2, ActivationCheckpointing::Off), // uneven batches
        (PROMPTS * G, 8, ActivationCheckpointing::Off),
    ] {
        let (ro, obs) = iteration(batch, ga, mode);
        assert_eq!(
            obs.ratios.len() as i64,
            ga * 3,
            "batch {batch}: first-window transitions"
        );
        assert!(
            obs.ratios.iter().all(|&r| r == 1.0),
            "batch {batch}, grad_accum {ga}: first-window ratios {:?}",
            obs.ratios
        );
        // after a step the parameters moved, so later ratios are not all 1
        if !obs.later.is_empty() {
            assert!(
                obs.later.iter().any(|&r| r != 1.0),
                "batch {batch}: later ratios all 1"
            );
        }
        // the same draws give the same trajectories up to float32 rounding
        // the model is batch-invariant on the CPU: trajectories are bit-identical
        assert!(
            ro.latents.equal(&reference.latents),
            "batch {batch}: latents differ"
        );
        assert_eq!(ro.log_probs.size(), [PROMPTS * G, STEPS]);
    }
}

#[test]
fn first_update_ratios_are_exactly_one_in_bf16_mixed_precision() {
    let fp32 = iteration(1, 2, ActivationCheckpointing::Off).0;
    for (batch, ga, mode) in [
        (1, 2, ActivationCheckpointing::Off),
        (G, 2, ActivationCheckpointing::Off),
        (3, 4, ActivationCheckpointing::PerBlock),
    ] {
        let (ro, obs) = iteration_in(batch, ga, mode, Kind::BFloat16);
        assert_eq!(obs.ratios.len() as i64, ga * 3);
        assert!(
            obs.ratios.iter().all(|&r| r == 1.0),
            "bf16, batch {batch}, grad_accum {ga}: first-window ratios {:?}",
            obs.ratios
        );
        assert!(obs.later.iter().any(|&r| r != 1.0));
        // the SDE state and log-probabilities stay float32; the velocities were bf16
        assert_eq!(
            (ro.latents.kind(), ro.log_probs.kind()),
            (Kind::Float, Kind::Float)
        );
        // (bf16 also quantises t * 1000, as diffusers does, so the trajectories
        // part by more than the bf16 rounding of each step: 9% on this model)
        let (rel, _) = dancegrpo::align::errors(&ro.latents, &fp32.latents);
        assert!(rel > 1e-4 && rel < 0.5, "bf16 vs f32 trajectories: {rel}");
    }
}

#[test]
fn an_iteration_reports_rewards_failures_and_stage_times() {
    use dancegrpo::grpo::{run_iteration, NoObserver};
    let m = model(ActivationCheckpointing::Off);
    let vae = vae();
    let data = IterationData::new();
    let stages = std::cell::RefCell::new(Vec::new());
    let record = |stage: dancegrpo::grpo::iteration::Stage, done: usize, total: usize| {
        stages
            .borrow_mut()
            .push(format!("{} {done}/{total}", stage.name()))
    };
    let inputs = data.inputs(Some(&record));
    let cfg = iteration_settings(4, 2, config(4));
    let params: Vec<Tensor> = m.parameters().into_iter().map(|(_, p)| p).collect();
    let before: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
    let mut opt = AdamW::new(AdamWConfig::default(), &params);
    let mut reward = Brightness { fail: vec![5] };
    let it = run_iteration(
        &m,
        &vae,
        &mut reward,
        &mut opt,
        &inputs,
        &cfg,
        &mut NoObserver,
    )
    .unwrap();
    let r = &it.report;
    assert_eq!(it.images.size(), [8, 64, 64, 3]);
    assert_eq!(r.rewards.len(), 8);
    assert!(r.rewards[5].is_nan() && r.rewards[..5].iter().all(|x| x.is_finite()));
    // the failed item is left out of its group's statistics (3 valid of 4)
    assert_eq!(
        (r.failed_rewards, r.skipped_groups, r.partial_groups),
        (1, 0, 1)
    );
    let why = r.reward_error.as_deref().unwrap_or_default();
    assert_eq!(why, "sample 5: test failure");
    // each group's valid advantages are normalised: mean 0 (the failed item's is 0)
    assert!(r.advantage.mean.abs() < 1e-6, "{:?}", r.advantage);
    assert_eq!(r.update.grad_norms.len(), 2);
    assert_eq!(r.update.transitions, 8 * 3);
    assert!(r.update.ratio_min <= 1.0 && r.update.ratio_max >= 1.0);
    assert!(r.seconds.rollout > 0.0 && r.seconds.update > 0.0);
    // progress: two rollout batches of 4, decode, reward, then 8 samples x 3
    // transitions trained in batches of 4 rows
    let stages = stages.borrow();
    assert_eq!(
        stages[..6],
        [
            "rollout 0/8",
            "rollout 4/8",
            "decode 0/1",
            "reward 0/1",
            "update 4/24",
            "update 8/24"
        ]
    );
    assert_eq!(stages.last().unwrap(), "update 24/24");
    assert_eq!(stages.len(), 4 + 6);
    let moved = params
        .iter()
        .zip(&before)
        .filter(|(p, b)| !p.detach().equal(b))
        .count();
    assert!(moved > params.len() / 2, "only {moved} parameters moved");

    drop(stages);
    // a non-finite gradient skips its optimizer step (the weights stay finite)
    let steps = opt.steps();
    let mut poison = PoisonFirstStep(true);
    let it = run_iteration(&m, &vae, &mut reward, &mut opt, &inputs, &cfg, &mut poison).unwrap();
    let u = &it.report.update;
    assert!(
        u.grad_norms[0].is_nan() && u.grad_norms[1].is_finite(),
        "{:?}",
        u.grad_norms
    );
    assert_eq!((u.skipped_steps, opt.steps()), (1, steps + 1));
    assert!(params
        .iter()
        .all(|p| bool::try_from(p.isfinite().all()).unwrap()));

    // every reward failed: the iteration stops before training, naming the cause
    let mut failing = Brightness {
        fail: (0..8).collect(),
    };
    let err = run_iteration(
        &m,
        &vae,
        &mut failing,
        &mut opt,
        &inputs,
        &cfg,
        &mut NoObserver,
    );
    let err = err.err().unwrap().to_string();
    assert!(
        err.contains("8 of 8") && err.contains("test failure"),
        "{err}"
    );
    assert_eq!(opt.steps(), steps + 1);
}

/// Makes the gradients of the first optimizer step it sees NaN.
struct PoisonFirstStep(bool);

impl dancegrpo::grpo::UpdateObserver for PoisonFirstStep {
    fn before_step(&mut self, _: u64, params: &[(String, Tensor)]) -> dancegrpo::Result<()> {
        if std::mem::take(&mut self.0) {
            let _ = params[0].1.grad().fill_(f64::NAN);
        }
        Ok(())
    }
}

#[test]
fn bad_update_inputs_are_rejected_with_the_field() {
    let m = model(ActivationCheckpointing::Off);
    let (cond, schedule, draws, ro) = seeded_rollout(&m, 8);
    let params: Vec<Tensor> = m.parameters().into_iter().map(|(_, p)| p).collect();
    let mut opt = AdamW::new(AdamWConfig::default(), &params);
    let adv = Tensor::zeros([8], (Kind::Float, Device::Cpu));
    let run = |cfg: UpdateConfig, adv: &Tensor, opt: &mut AdamW| {
        let shard = dancegrpo::dist::Shard::whole(ro.latents.size()[0]);
        let inputs = UpdateInputs {
            rollout: &ro,
            shard: &shard,
            advantages: adv,
            cond: &cond,
            schedule: &schedule,
            draws: &draws,
        };
        grpo_update(&m, opt, &inputs, &cfg, &mut dancegrpo::grpo::NoObserver)
            .unwrap_err()
            .to_string()
    };
    for f in [0.0, 1.5, -0.1, f64::NAN] {
        let err = run(
            UpdateConfig {
                timestep_fraction: f,
                ..config(2)
            },
            &adv,
            &mut opt,
        );
        assert!(err.contains("timestep_fraction"), "{err}");
    }
    let err = run(
        UpdateConfig {
            timestep_fraction: 0.1,
            ..config(2)
        },
        &adv,
        &mut opt,
    );
    assert!(err.contains("trains none"), "{err}");
    let err = run(config(0), &adv, &mut opt);
    assert!(err.contains("gradient_accumulation_steps"), "{err}");
    let short = Tensor::zeros([5], (Kind::Float, Device::Cpu));
    let err = run(config(2), &short, &mut opt);
    assert!(err.contains("5 advantages for 8 samples"), "{err}");
    // recorded draws with the wrong latent shape name the tensor and both shapes
    let rec = dancegrpo::sampler::Recorded::new(
        Tensor::zeros([1, 16, 4, 4], (Kind::Float, Device::Cpu)),
        Tensor::zeros([8, STEPS, 4, 64], (Kind::Float, Device::Cpu)),
        Tensor::zeros([8, STEPS - 1], (Kind::Int64, Device::Cpu)),
    )
    .unwrap();
    let err = rollout(
        &m,
        &cond,
        &rec,
        &schedule,
        [16, 8, 8],
        &rollout_settings(8),
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("init_noise") && err.contains("[16, 8, 8]") && err.contains("[16, 4, 4]"),
        "{err}"
    );
}

#[test]
fn flux_forward_is_batch_invariant_on_the_cpu() {
    // (the VAE's convolutions are not: `sampler.decode_batch` defaults to 1)
    let m = model(ActivationCheckpointing::Off);
    let cond = conditioning();
    let mut rng = Philox::new(4, 0);
    let n = PROMPTS * G;
    let samples: Vec<i64> = (0..n).collect();
    let z = rng.normal_tensor(&[n, 16, 64]);
    let t = Tensor::from_slice(&[0.9f32, 0.3, 0.5, 0.7, 0.1, 1.0, 0.6, 0.2]);
    let _guard = tch::no_grad_guard();
    let all = cond.for_samples(&samples);
    let batched = m.velocity(&cond.inputs(&all, &z, &t)).unwrap();
    for b in 0..n {
        let one = cond.for_samples(&[b]);
        let (zb, tb) = (z.narrow(0, b, 1), t.narrow(0, b, 1));
        let single = m.velocity(&cond.inputs(&one, &zb, &tb)).unwrap();
        assert!(
            single.equal(&batched.narrow(0, b, 1)),
            "sample {b}: velocity depends on the batch"
        );
    }
}

/// A model whose output depends on the batch size in the last bits, as GPU
/// kernels often do: `v * (1 + 1e-6 * (b - 1))`.
struct BatchVariant(FluxTransformer);

impl VelocityModel for BatchVariant {
    fn velocity(&self, inputs: &dancegrpo::models::FlowInputs) -> dancegrpo::Result<Tensor> {
        let b = inputs.latents.size()[0];
        Ok(self.0.velocity(inputs)? * (1.0 + 1e-6 * (b - 1) as f64))
    }
    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.0.parameters()
    }
    fn layout(&self) -> &dyn dancegrpo::models::TokenLayout {
        self.0.layout()
    }
}

#[test]
fn recomputing_in_the_rollout_batches_keeps_ratios_exact_for_batch_variant_models() {
    let m = BatchVariant(model(ActivationCheckpointing::Off));
    let rewards = Philox::new(3, 0).normal_tensor(&[PROMPTS * G]);
    let adv = advantages(&rewards, Grouping::PerPrompt { size: G }, 5.0).unwrap();
    let (cond, schedule, draws, ro) = seeded_rollout(&m, G);
    let first_window = |batching: UpdateBatching| {
        let params: Vec<Tensor> = m
            .parameters()
            .into_iter()
            .map(|(_, p)| p.detach().copy())
            .collect();
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
            batching,
            ..config(PROMPTS * G)
        };
        let mut obs = FirstWindow::default();
        let live: Vec<Tensor> = m.parameters().into_iter().map(|(_, p)| p).collect();
        grpo_update(&m, &mut opt, &inputs, &cfg, &mut obs).unwrap();
        // undo the step so both variants start from the same weights
        let _guard = tch::no_grad_guard();
        for (p, saved) in live.iter().zip(&params) {
            p.shallow_clone().copy_(saved);
        }
        obs.ratios
    };
    let same_batches = first_window(UpdateBatching::Rollout);
    assert!(same_batches.iter().all(|&r| r == 1.0), "{same_batches:?}");
    // one sample at a time, the recomputed log-probs differ from the rollout's
    let per_sample = first_window(UpdateBatching::PerSample);
    assert!(per_sample.iter().any(|&r| r != 1.0), "{per_sample:?}");
}
