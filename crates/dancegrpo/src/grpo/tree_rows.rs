//! The update's model batches for a tree rollout ([`crate::sampler::tree`]).
//!
//! At a trained step `j` the model re-evaluates exactly the states the
//! rollout evaluated in the same model batch (the same rows in the same
//! order, so the first ratios are exactly 1 on any device), and each node
//! transition `z_j -> z_{j+1}` of the batch is one row of the loss: its
//! advantage is the mean of its leaves', its weight its leaf count. Every
//! leaf of a root trains the steps its root drew, so a step is re-evaluated
//! once for all the roots of the batch that train it (the rows of the others
//! stay out of the loss).

use tch::{Kind, Tensor};

use super::batches::Rows;
use super::settings::{UpdateBatching, UpdateConfig};
use crate::dist::Shard;
use crate::error::{Error, Result};
use crate::sampler::tree::{distinct_rows, Tree};
use crate::sampler::Rollout;

/// Refuses a tree rollout whose roots are not whole in every model batch,
/// accumulation window and process (the update trains each node once).
pub(super) fn check_tree_layout(
    tree: &Tree,
    (rollout, shard): (&Rollout, &Shard),
    cfg: &UpdateConfig,
) -> Result<()> {
    let root = tree.root_size();
    let whole = |start: i64, len: usize| start % root == 0 && len as i64 % root == 0;
    let refuse = |what: String| {
        Err(Error::Input(format!(
            "a tree rollout trains each node once, so its roots of {root} leaves must be whole: {what}"
        )))
    };
    if cfg.batching != UpdateBatching::Rollout {
        return refuse(format!(
            "the update recomputes in {:?} batches; trees need the rollout's",
            cfg.batching
        ));
    }
    if cfg.grad_accum % root != 0 {
        return refuse(format!("{} samples per optimizer step", cfg.grad_accum));
    }
    if let Some(b) = (rollout.batches.iter()).find(|b| !whole(b[0], b.len())) {
        return refuse(format!("a model batch of samples {b:?}"));
    }
    let global = shard.samples();
    if let Some(row) = (0..global.len()).find(|&r| global[r] % root != r as i64 % root) {
        return refuse(format!(
            "local sample {row} is sample {} of the iteration",
            global[row]
        ));
    }
    Ok(())
}

/// The model batches training the roots `window` (local samples, the roots'
/// leaves) of the rollout's model batch `samples`, one per step any of them
/// trains, in step order; `perms[b]` are sample `b`'s trained steps (its
/// root's) and `advantages` `(B,)` the leaves'.
pub(super) fn tree_batches(
    tree: &Tree,
    samples: &[i64],
    window: &[i64],
    perms: &[Vec<i64>],
    advantages: &Tensor,
) -> Result<Vec<Rows>> {
    let roots: Vec<i64> = (window.iter().copied())
        .filter(|&b| tree.root(b) == b)
        .collect();
    let mut steps: Vec<i64> = (roots.iter())
        .flat_map(|&r| perms[r as usize].iter().copied())
        .collect();
    steps.sort_unstable();
    steps.dedup();
    Ok((steps.into_iter())
        .map(|j| rows_at(tree, samples, j, (&roots, perms), advantages))
        .collect())
}

/// The rows of step `j`: the batch's states as model rows, its nodes as
/// transition rows; those of the `roots` that train `j` are active.
fn rows_at(
    tree: &Tree,
    samples: &[i64],
    j: i64,
    (roots, perms): (&[i64], &[Vec<i64>]),
    advantages: &Tensor,
) -> Rows {
    let (states, state_of) = distinct_rows(samples, tree.state_size(j));
    let size = tree.node_size(j);
    let (nodes, _) = distinct_rows(samples, size);
    let reps: Vec<i64> = nodes.iter().map(|&r| samples[r as usize]).collect();
    let positions: Vec<i64> = (reps.iter())
        .map(|&b| {
            let root = tree.root(b);
            let trained = roots.contains(&root);
            let at = perms[root as usize].iter().position(|&s| s == j);
            at.filter(|_| trained).map_or(-1, |k| k as i64)
        })
        .collect();
    // each node's advantage: the mean of its leaves'
    let adv: Vec<Tensor> = (reps.iter())
        .map(|&b| advantages.narrow(0, b, size).mean(Kind::Float))
        .collect();
    Rows {
        model_samples: states.iter().map(|&r| samples[r as usize]).collect(),
        model_steps: vec![j; states.len()],
        expand: Some(nodes.iter().map(|&r| state_of[r as usize]).collect()),
        steps: vec![j; reps.len()],
        active: (0..reps.len() as i64)
            .filter(|&i| positions[i as usize] >= 0)
            .collect(),
        positions,
        leaves: Some(vec![size; reps.len()]),
        adv: Tensor::stack(&adv, 0).to_kind(advantages.kind()), // (nodes,)
        samples: reps,
    }
}
