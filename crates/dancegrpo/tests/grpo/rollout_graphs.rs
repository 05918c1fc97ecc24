//! `FirstWindow::RolloutGraphs`: the rollout keeps the first window's
//! velocities with their graphs and the update back-propagates them instead
//! of recomputing them.

use dancegrpo::dist::Shard;
use dancegrpo::grpo::update::first_window_plan;
use dancegrpo::grpo::{FirstWindow as WindowSource, UpdateBatching, UpdateConfig, UpdateStats};
use dancegrpo::models::{ActivationCheckpointing, VelocityModel};
use dancegrpo::sampler::rollout::rollout_capturing;
use dancegrpo::sampler::{CapturePlan, Schedule};
use tch::{Device, Tensor};

use super::setup::*;

/// The rollout's latents, the observed ratios, the statistics and the
/// weights after one update of a fresh seeded model.
fn trained(batch: i64, cfg: &UpdateConfig) -> (Tensor, FirstWindow, UpdateStats, Vec<Tensor>) {
    let m = model(ActivationCheckpointing::Off);
    let (cond, schedule, draws) = (conditioning(), Schedule::shifted(STEPS, 3.0), draws());
    let plan = plan(cfg, batch);
    let settings = rollout_settings(batch);
    let inputs = (&cond, &draws as _, &schedule, [16, 8, 8]);
    let ro = rollout_capturing(&m, inputs, &settings, &plan, Device::Cpu, &|_, _| {}).unwrap();
    assert_eq!(ro.kept.len(), plan.groups().len());
    let mut obs = FirstWindow::default();
    let stats = update_on(&m, &ro, &draws, cfg, &mut obs).unwrap();
    assert!(ro.kept.is_empty(), "every kept graph is trained");
    let params = m.parameters().into_iter().map(|(_, p)| p.detach().copy());
    (ro.latents.shallow_clone(), obs, stats, params.collect())
}

fn plan(cfg: &UpdateConfig, batch: i64) -> CapturePlan {
    let shard = Shard::whole(PROMPTS * G);
    let schedule = Schedule::shifted(STEPS, 3.0);
    first_window_plan(cfg, &schedule, &draws(), &shard, batch).unwrap()
}

fn config_of(batching: UpdateBatching, first_window: WindowSource) -> UpdateConfig {
    UpdateConfig {
        batching,
        first_window,
        ..config(2)
    }
}

/// In the reference's order (batch 1, sample by sample) the kept graphs give
/// the recomputation's gradients bit for bit: same rollout, losses, gradient
/// norms and weights, with 6 forward passes fewer (2 samples x 3 transitions).
#[test]
fn rollout_graphs_keep_the_reference_order_bit_for_bit() {
    let ps = UpdateBatching::PerSample;
    let (z0, _, s0, w0) = trained(1, &config_of(ps, WindowSource::Recompute));
    let (z1, obs, s1, w1) = trained(1, &config_of(ps, WindowSource::RolloutGraphs));
    assert!(z0.equal(&z1));
    assert_eq!(s0.losses, s1.losses);
    assert_eq!(s0.grad_norms, s1.grad_norms);
    assert_eq!(s0.local_model_rows - s1.local_model_rows, 6);
    assert!(obs.ratios.iter().all(|&r| r == 1.0), "{:?}", obs.ratios);
    for (a, b) in w0.iter().zip(&w1) {
        assert!(a.equal(b), "weights differ");
    }
}

/// The reference's numbers with batched rollouts: on the CPU the model is
/// batch-invariant, so a rollout of 4 samples per call that keeps the graphs
/// and a per-sample update trains exactly as the reference order does.
#[test]
fn batched_rollouts_with_rollout_graphs_train_as_the_reference_order() {
    let ps = UpdateBatching::PerSample;
    let (z0, _, s0, w0) = trained(1, &config_of(ps, WindowSource::Recompute));
    let (z1, _, s1, w1) = trained(G, &config_of(ps, WindowSource::RolloutGraphs));
    assert!(z0.equal(&z1));
    assert_eq!(s0.losses, s1.losses);
    assert_eq!(s0.grad_norms, s1.grad_norms);
    for (a, b) in w0.iter().zip(&w1) {
        assert!(a.equal(b), "weights differ");
    }
}

/// With the window's transitions in one backward pass (rollout batch 4) the
/// rollout keeps its values (its rows split by group), the first window's
/// ratios are exactly 1 and its losses the recomputation's; the summed
/// gradients differ in their last bits only.
#[test]
fn rollout_graphs_with_window_batching_keep_the_first_window_exact() {
    let w = UpdateBatching::Window;
    let (z0, _, s0, _) = trained(G, &config_of(w, WindowSource::Recompute));
    let (z1, obs, s1, _) = trained(G, &config_of(w, WindowSource::RolloutGraphs));
    assert!(z0.equal(&z1), "the rollout changed");
    assert_eq!(obs.ratios.len(), 6);
    assert!(obs.ratios.iter().all(|&r| r == 1.0), "{:?}", obs.ratios);
    assert!(obs.later.iter().any(|&r| r != 1.0));
    assert_eq!(s0.losses[..2], s1.losses[..2]);
    for (a, b) in s0.grad_norms.iter().zip(&s1.grad_norms) {
        assert!((a - b).abs() <= 1e-5 * b, "grad norm {a} vs {b}");
    }
    assert_eq!(s0.local_model_rows - s1.local_model_rows, 6);
}

/// The plan follows the update's model batches: one group per batch of the
/// first window whose rows all train in it.
#[test]
fn the_plan_groups_the_first_window_as_the_update_batches_it() {
    let sizes = |cfg: &UpdateConfig, batch: i64| -> Vec<usize> {
        plan(cfg, batch).groups().iter().map(|g| g.len()).collect()
    };
    let rg = WindowSource::RolloutGraphs;
    assert_eq!(sizes(&config_of(UpdateBatching::PerSample, rg), 1), [1; 6]);
    assert_eq!(sizes(&config_of(UpdateBatching::Window, rg), 4), [6]);
    let capped = UpdateConfig {
        max_rows: Some(3),
        ..config_of(UpdateBatching::Window, rg)
    };
    assert_eq!(sizes(&capped, 4), [2, 2, 2]);
    // the rollout's batches, cut where a window of 2 samples ends: 4 makes 2s
    assert_eq!(sizes(&config_of(UpdateBatching::Rollout, rg), 4), [2; 3]);
    assert_eq!(sizes(&config_of(UpdateBatching::Rollout, rg), 2), [2; 3]);
    assert!(plan(
        &config_of(UpdateBatching::Window, WindowSource::Recompute),
        4
    )
    .is_empty());
    // every transition of the window once, at a trainable step
    let groups = plan(&config_of(UpdateBatching::Window, rg), 4);
    let mut all: Vec<(i64, i64)> = groups.groups().concat();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 6);
    assert!(all
        .iter()
        .all(|&(b, j)| b < 2 && (0..STEPS - 1).contains(&j)));
}

/// A model that recomputes activations in its backward pass cannot take a
/// velocity computed beforehand.
#[test]
fn checkpointed_models_refuse_rollout_graphs() {
    assert!(model(ActivationCheckpointing::Off).plain_backward());
    assert!(!model(ActivationCheckpointing::PerBlock).plain_backward());
}
