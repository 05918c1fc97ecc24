//! MixGRPO-Flash: DPM-Solver++ 2M steps after the SDE window.

use dancegrpo::grpo::{UpdateBatching, UpdateConfig};
use dancegrpo::models::ActivationCheckpointing;
use dancegrpo::sampler::{DpmVariant, PostWindow, SdeForm, StepWindow, WindowTraining};

use super::setup::*;

/// The window's steps and everything before them are the Euler rollout's bit
/// for bit; after it, fewer model calls land near the Euler rollout's end
/// (not on it); the window trains with first ratios exactly 1.
#[test]
fn dpm_steps_after_the_window_keep_the_window_exact_with_fewer_calls() {
    let m = model(ActivationCheckpointing::Off);
    let window = StepWindow {
        start: 0,
        end: 2,
        train: WindowTraining::All,
    };
    let form = (SdeForm::FlowGrpo, 0.5, Some(window));
    let (.., euler) = seeded_rollout_with(&m, G, form);
    let post = PostWindow::DpmSolver2m {
        compress: 0.6,
        variant: DpmVariant::Midpoint,
    };
    let (_, _, draws, dpm) = seeded_rollout_post(&m, G, form, post);
    // 6 steps, window 0..2: int(5 * 0.6) = 3 sigmas after it, 2 steps (Euler: 4)
    let samples = PROMPTS * G;
    assert_eq!(dpm.latents.size()[1], 2 + 3);
    assert_eq!(dpm.log_probs.size(), [samples, 4]);
    assert_eq!(euler.model_rows, samples * STEPS);
    assert_eq!(dpm.model_rows, samples * 4);
    assert!(dpm
        .latents
        .narrow(1, 0, 3)
        .equal(&euler.latents.narrow(1, 0, 3)));
    assert!(dpm
        .log_probs
        .narrow(1, 0, 2)
        .equal(&euler.log_probs.narrow(1, 0, 2)));
    let after: Vec<Vec<f32>> = Vec::try_from(&dpm.log_probs.narrow(1, 2, 2)).unwrap();
    assert!(after.iter().flatten().all(|&l| l == 0.0));
    // the final data predictions agree with Euler's to the solvers' error on
    // this untrained model's rough field (measured: 0.21 relative L2)
    let rel = (&dpm.pred_x0 - &euler.pred_x0).norm().double_value(&[])
        / euler.pred_x0.norm().double_value(&[]);
    assert!(rel > 0.0 && rel < 0.4, "{rel}");
    // the last stored state is the last data prediction (the step to sigma 0)
    assert!(dpm.latents.select(1, 4).equal(&dpm.pred_x0));
    let mut obs = FirstWindow::default();
    let cfg = UpdateConfig {
        batching: UpdateBatching::Rollout,
        sde: form.0,
        eta: form.1,
        window: form.2,
        ..config(2)
    };
    let stats = update_on(&m, &dpm, &draws, &cfg, &mut obs).unwrap();
    assert_eq!(stats.transitions as i64, samples * 2);
    assert!(
        !obs.ratios.is_empty() && obs.ratios.iter().all(|&r| r == 1.0),
        "{:?}",
        obs.ratios
    );
}
