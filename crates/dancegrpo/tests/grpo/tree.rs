//! Tree rollouts: the leaves of a node hold its exact state until they
//! split, and the model runs once per node and step.

use std::cell::Cell;

use dancegrpo::models::flux::FluxTransformer;
use dancegrpo::models::{ActivationCheckpointing, FlowInputs, TokenLayout, VelocityModel};
use dancegrpo::sampler::rollout::{rollout_tree, RolloutSettings, StepMeans};
use dancegrpo::sampler::tree::Tree;
use dancegrpo::sampler::{Schedule, SdeForm};
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

#[test]
fn leaves_share_their_node_and_the_model_runs_once_per_node() {
    let m = Counting {
        inner: model(ActivationCheckpointing::Off),
        rows: Cell::new(0),
    };
    // groups of 4 leaves: one root, splitting in 2 before steps 2 and 4 (6 steps)
    let tree = Tree {
        branches: 2,
        at: vec![2, 4],
    };
    let (cond, schedule, draws) = (conditioning(), Schedule::shifted(STEPS, 3.0), draws());
    let run = |batch: i64| {
        let settings = RolloutSettings {
            sde: SdeForm::Dance,
            eta: 0.3,
            window: None,
            batch,
            means: StepMeans::Drop,
        };
        m.rows.set(0);
        let inputs = (
            &cond,
            &draws as &dyn dancegrpo::sampler::Draws,
            &schedule,
            [16, 8, 8],
        );
        let ro = rollout_tree(&m, inputs, &settings, &tree, Device::Cpu).unwrap();
        (ro, m.rows.get())
    };
    let (ro, calls) = run(G);
    // per group: 1 node x 2 steps + 2 x 2 + 4 x 2 = 14 rows instead of 24
    assert_eq!(tree.calls(G, STEPS), 14);
    assert_eq!(calls, PROMPTS * 14);
    let z = |b: i64, j: i64| ro.latents.get(b).get(j);
    for g in [0, G] {
        // one state until the first split, pairs until the second, then all differ
        assert!(z(g, 2).equal(&z(g + 3, 2)));
        assert!(!z(g, 3).equal(&z(g + 2, 3)) && z(g, 3).equal(&z(g + 1, 3)));
        assert!(z(g, 4).equal(&z(g + 1, 4)) && !z(g, 5).equal(&z(g + 1, 5)));
    }
    // the two prompts' groups differ
    assert!(!z(0, 6).equal(&z(G, 6)));
    // one sample per model call evaluates every leaf: the same trajectories
    let (alone, calls) = run(1);
    assert_eq!(calls, PROMPTS * G * STEPS);
    assert!(alone.latents.equal(&ro.latents) && alone.log_probs.equal(&ro.log_probs));
    // a tree that cannot make the group is refused, naming the field
    let bad = Tree {
        branches: 3,
        at: vec![2],
    };
    let settings = RolloutSettings {
        sde: SdeForm::Dance,
        eta: 0.3,
        window: None,
        batch: G,
        means: StepMeans::Drop,
    };
    let inputs = (
        &cond,
        &draws as &dyn dancegrpo::sampler::Draws,
        &schedule,
        [16, 8, 8],
    );
    let err = rollout_tree(&m, inputs, &settings, &bad, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tree.branches") && err.contains("multiple of 3^1"),
        "{err}"
    );
}
