//! Tree rollouts: the leaves of a node hold its exact state until they
//! split, the model runs once per shared state and step, and the update
//! trains each node transition once: exactly the plain update over the
//! leaves' trajectories while no ratio is clipped.

use std::cell::Cell;

use dancegrpo::grpo::update::UpdateStats;
use dancegrpo::grpo::{UpdateConfig, UpdateObserver};
use dancegrpo::models::flux::FluxTransformer;
use dancegrpo::models::{ActivationCheckpointing, FlowInputs, TokenLayout, VelocityModel};
use dancegrpo::sampler::rollout::{rollout, Rollout, RolloutSettings};
use dancegrpo::sampler::tree::{Tree, TreeDraws};
use dancegrpo::sampler::{Draws, Schedule};
use tch::{Device, Tensor};

use super::setup::*;

/// Counts the rows the model evaluates.
struct Counting {
    inner: FluxTransformer,
    rows: Cell<i64>,
}

impl VelocityModel for Counting {
    fn velocity(&self, inputs: &FlowInputs) -> dancegrpo::Result<Tensor> {
        self.rows.set(self.rows.get() + inputs.latents.size()[0]);
        self.inner.velocity(inputs)
    }
    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.inner.parameters()
    }
    fn layout(&self) -> &dyn TokenLayout {
        self.inner.layout()
    }
}

/// Groups of 4 leaves: one root, splitting in 2 before steps 2 and 4 (6 steps).
fn tree() -> Tree {
    Tree {
        branches: 2,
        at: vec![2, 4],
    }
}

fn settings(batch: i64, tree: Option<Tree>) -> RolloutSettings {
    RolloutSettings {
        tree,
        ..rollout_settings(batch)
    }
}

fn run_rollout(m: &dyn VelocityModel, draws: &dyn Draws, s: &RolloutSettings) -> Rollout {
    let (cond, schedule) = (conditioning(), Schedule::shifted(STEPS, 3.0));
    rollout(m, &cond, draws, &schedule, [16, 8, 8], s, Device::Cpu).unwrap()
}

#[test]
fn leaves_share_their_node_and_the_model_runs_once_per_state() {
    let m = Counting {
        inner: model(ActivationCheckpointing::Off),
        rows: Cell::new(0),
    };
    let (tree, draws) = (tree(), draws());
    let ro = run_rollout(&m, &draws, &settings(G, Some(tree.clone())));
    // per group: the root's state at steps 0-2 (the split at 2 reuses it),
    // 2 states at steps 3-4, 4 at step 5: 11 rows instead of 24
    assert_eq!(tree.calls(G, STEPS), 11);
    assert_eq!(m.rows.get(), PROMPTS * 11);
    let z = |b: i64, j: i64| ro.latents.get(b).get(j);
    for g in [0, G] {
        // one state until the first split, pairs until the second, then all differ
        assert!(z(g, 2).equal(&z(g + 3, 2)));
        assert!(!z(g, 3).equal(&z(g + 2, 3)) && z(g, 3).equal(&z(g + 1, 3)));
        assert!(z(g, 4).equal(&z(g + 1, 4)) && !z(g, 5).equal(&z(g + 1, 5)));
    }
    // the two prompts' groups differ
    assert!(!z(0, 6).equal(&z(G, 6)));
    // every leaf evaluated on its own with the tree's draws: the same trajectories
    m.rows.set(0);
    let leafwise = TreeDraws {
        inner: &draws,
        tree: &tree,
    };
    let alone = run_rollout(&m, &leafwise, &settings(1, None));
    assert_eq!(m.rows.get(), PROMPTS * G * STEPS);
    assert!(alone.latents.equal(&ro.latents) && alone.log_probs.equal(&ro.log_probs));
    // a tree that cannot make the group, or batches that split roots, are refused
    let bad = Tree {
        branches: 3,
        at: vec![2],
    };
    let err = |s: RolloutSettings| {
        let (cond, schedule) = (conditioning(), Schedule::shifted(STEPS, 3.0));
        rollout(&m, &cond, &draws, &schedule, [16, 8, 8], &s, Device::Cpu)
            .unwrap_err()
            .to_string()
    };
    let e = err(settings(G, Some(bad)));
    assert!(
        e.contains("tree.branches") && e.contains("multiple of 3^1"),
        "{e}"
    );
    let e = err(settings(2, Some(tree)));
    assert!(
        e.contains("tree.batch") && e.contains("4 leaves per root"),
        "{e}"
    );
}

/// Everything one test update records: first-window ratios, trained
/// `(sample, step, leaves)` rows and the first step's gradients.
#[derive(Default)]
struct Seen {
    stepped: bool,
    first: Vec<f32>,
    later: Vec<f32>,
    rows: Vec<(i64, i64, i64)>,
    grads: Option<Tensor>,
}

impl UpdateObserver for Seen {
    fn transitions(
        &mut self,
        x: &dancegrpo::grpo::update::TransitionBatch,
    ) -> dancegrpo::Result<()> {
        let ratio: Vec<f32> = Vec::try_from(&x.terms.ratio).unwrap();
        for &r in x.active {
            let r = r as usize;
            self.rows.push((x.samples[r], x.steps[r], x.leaves[r]));
            match self.stepped {
                false => self.first.push(ratio[r]),
                true => self.later.push(ratio[r]),
            }
        }
        Ok(())
    }
    fn before_step(&mut self, _: u64, params: &[(String, Tensor)]) -> dancegrpo::Result<()> {
        if self.grads.is_none() {
            let g: Vec<Tensor> = params.iter().map(|(_, p)| p.grad().reshape([-1])).collect();
            self.grads = Some(Tensor::cat(&g, 0));
        }
        Ok(())
    }
    fn after_step(&mut self, _: u64, _: &[(String, Tensor)]) -> dancegrpo::Result<()> {
        self.stepped = true;
        Ok(())
    }
}

/// One update of a fresh tiny model on `ro` (drawn by a model with the same
/// weights) with the test rewards' advantages.
fn update(
    ro: &Rollout,
    draws: &dyn Draws,
    cfg: &UpdateConfig,
) -> (dancegrpo::Result<UpdateStats>, Seen) {
    let mut seen = Seen::default();
    let stats = update_on(
        &model(ActivationCheckpointing::Off),
        ro,
        draws,
        cfg,
        &mut seen,
    );
    (stats, seen)
}

#[test]
fn the_tree_update_trains_each_node_once_as_the_leaves_would() {
    let (tree, draws) = (tree(), draws());
    let m = model(ActivationCheckpointing::Off);
    // both groups in one model batch, one group per optimizer step
    let ro = run_rollout(&m, &draws, &settings(2 * G, Some(tree.clone())));
    let cfg = config(G);
    let (stats, seen) = update(&ro, &draws, &cfg);
    let stats = stats.unwrap();
    // every first-window ratio exactly 1, and the second window trained on a changed model
    assert!(!seen.first.is_empty() && seen.first.iter().all(|&r| r == 1.0));
    assert!(seen.later.iter().any(|&r| r != 1.0));
    // each root trains 3 of the 5 trainable steps (int(5 * 0.6)), its leaves the same:
    // node transitions at its steps, of 4 / node_size(j) nodes each, once
    let tree_draws = TreeDraws {
        inner: &draws,
        tree: &tree,
    };
    let mut expected = vec![];
    for root in [0, G] {
        for j in tree_draws.permutation(root, STEPS - 1).unwrap()[..3].to_vec() {
            let size = tree.node_size(j);
            expected.extend(
                (root..root + G)
                    .step_by(size as usize)
                    .map(|b| (b, j, size)),
            );
        }
    }
    let (mut got, mut want) = (seen.rows.clone(), expected);
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // statistics per leaf transition: 8 leaves x 3
    assert_eq!((stats.transitions, stats.grad_norms.len()), (24, 2));
    // the plain update over the same leaves (every leaf trains its root's steps
    // with its own advantage): the same first gradient, summed in another order
    let plain = Rollout {
        latents: ro.latents.shallow_clone(),
        log_probs: ro.log_probs.shallow_clone(),
        pred_x0: ro.pred_x0.shallow_clone(),
        means: None,
        batches: ro.batches.clone(),
        tree: None,
        model_rows: ro.model_rows,
        kept: Default::default(),
    };
    let (flat_stats, flat) = update(&plain, &tree_draws, &cfg);
    let flat_stats = flat_stats.unwrap();
    assert_eq!(flat.rows.len(), 24);
    let (g, f) = (seen.grads.unwrap(), flat.grads.unwrap());
    let err = (&g - &f).abs().max().double_value(&[]) / f.abs().max().double_value(&[]);
    assert!(
        f.abs().max().double_value(&[]) > 0.0 && err < 1e-5,
        "relative error {err}"
    );
    // the first window's losses: each leaf records its node's, the loss at
    // the mean of its leaves' advantages (the mean of their plain losses)
    let scale = flat_stats.losses[0]
        .iter()
        .fold(0f64, |m, l| m.max(l.abs()));
    for b in 0..G {
        let steps = tree_draws.permutation(b, STEPS - 1).unwrap();
        for k in 0..3 {
            let size = tree.node_size(steps[k]);
            let rep = b - b % size;
            let leaves = &flat_stats.losses[rep as usize..(rep + size) as usize];
            let mean = leaves.iter().map(|l| l[k]).sum::<f64>() / size as f64;
            let got = stats.losses[b as usize][k];
            assert!(
                (got - mean).abs() <= 1e-6 * scale,
                "leaf {b}, k {k}: {got} vs {mean}"
            );
        }
    }
}

#[test]
fn a_tree_update_refuses_roots_it_cannot_train_whole() {
    let (tree, draws) = (tree(), draws());
    let m = model(ActivationCheckpointing::Off);
    let ro = run_rollout(&m, &draws, &settings(G, Some(tree)));
    let err = |cfg: UpdateConfig| update(&ro, &draws, &cfg).0.unwrap_err().to_string();
    let e = err(config(2));
    assert!(
        e.contains("roots of 4 leaves") && e.contains("2 samples per optimizer step"),
        "{e}"
    );
    let e = err(UpdateConfig {
        batching: dancegrpo::grpo::UpdateBatching::PerSample,
        ..config(G)
    });
    assert!(e.contains("PerSample"), "{e}");
}
