//! Which transitions the update trains and in which model batches: each
//! sample's trained steps, the sample chunks, the rows of each batch and the
//! accumulation windows whose optimizer steps follow them, and
//! from those the first window's transitions a rollout keeps with their
//! graphs ([`FirstWindow::RolloutGraphs`]). The update and the rollout's
//! capture plan are made by the same functions, so they cannot disagree.

use tch::Tensor;

use crate::dist::Shard;
use crate::error::Result;
use crate::sampler::tree::Tree;
use crate::sampler::{CapturePlan, Draws, Schedule, WindowTraining};

use super::settings::{FirstWindow, UpdateBatching, UpdateConfig};

/// The transitions of the first accumulation window that the rollout should
/// evaluate with gradients for `cfg.first_window =
/// `[`FirstWindow::RolloutGraphs`], grouped as the update back-propagates
/// them: the model batches of that window whose rows all train in it
/// (the others are recomputed). Empty with [`FirstWindow::Recompute`].
pub fn first_window_plan(
    cfg: &UpdateConfig,
    schedule: &Schedule,
    draws: &dyn Draws,
    shard: &Shard,
    rollout_batch: i64,
) -> Result<CapturePlan> {
    if cfg.first_window == FirstWindow::Recompute {
        return Ok(CapturePlan::none());
    }
    let (n, t) = cfg.trained(schedule.steps())?;
    let b_local = shard.samples().len() as i64;
    let perms = trained_steps(draws, None, cfg, (n, t), b_local)?;
    let window = |row: i64| shard.samples()[row as usize] / cfg.grad_accum;
    let rollout_batches =
        crate::sampler::rollout::batches(b_local, rollout_batch, rollout_windows(cfg, shard));
    let mut groups = Vec::new();
    for samples in update_chunks(cfg.batching, &rollout_batches, b_local, window) {
        if !samples.iter().all(|&r| window(r) == 0) {
            continue;
        }
        for ks in ks_chunks(cfg, t, samples.len() as i64) {
            let (rows, steps) = flat_transitions(&perms, &samples, &ks);
            groups.push(rows.into_iter().zip(steps).collect());
        }
    }
    CapturePlan::new(groups)
}

/// The samples of one accumulation window this process rolls out, when the
/// rollout's batches must not straddle windows: with
/// [`UpdateBatching::Rollout`] the update recomputes in the rollout's
/// batches, and would evaluate a batch holding two windows' samples once for
/// each (twice the model work). `None` with the other batchings, which make
/// their own batches.
pub fn rollout_windows(cfg: &UpdateConfig, shard: &Shard) -> Option<i64> {
    if cfg.batching != UpdateBatching::Rollout {
        return None;
    }
    let samples = shard.samples();
    let first = samples.first()? / cfg.grad_accum.max(1);
    // every window gives each process the same number of consecutive samples
    let per_window = samples
        .iter()
        .take_while(|&&s| s / cfg.grad_accum.max(1) == first);
    Some(per_window.count() as i64)
}

/// The trained transitions `j` of each local sample, in training order:
/// its first `t` of a permutation of the `n` trainable ones (of the window's,
/// with a window; every leaf of a tree trains its root's).
pub(super) fn trained_steps(
    draws: &dyn Draws,
    tree: Option<&Tree>,
    cfg: &UpdateConfig,
    (n, t): (i64, i64),
    b_local: i64,
) -> Result<Vec<Vec<i64>>> {
    let drawn = |b: i64| tree.map_or(b, |t| t.root(b));
    (0..b_local)
        .map(|b| match cfg.window {
            Some(w) if w.train == WindowTraining::All => Ok(w.steps()),
            Some(w) => Ok(draws.permutation(drawn(b), w.len())?[..t as usize]
                .iter()
                .map(|k| w.start + k)
                .collect()),
            None => Ok(draws.permutation(drawn(b), n)?[..t as usize].to_vec()),
        })
        .collect()
}

/// The local rows of each of the update's sample chunks, in order.
pub(super) fn update_chunks(
    batching: UpdateBatching,
    rollout_batches: &[Vec<i64>],
    b_local: i64,
    window: impl Fn(i64) -> i64,
) -> Vec<Vec<i64>> {
    match batching {
        UpdateBatching::Rollout => rollout_batches.to_vec(),
        UpdateBatching::PerSample => (0..b_local).map(|b| vec![b]).collect(),
        UpdateBatching::Window => window_chunks(b_local, window),
    }
}

/// The trained positions `k` of each model batch of a chunk of `n` samples:
/// one position per batch, or as many as fit with [`UpdateBatching::Window`].
pub(super) fn ks_chunks(cfg: &UpdateConfig, t: i64, n: i64) -> Vec<Vec<i64>> {
    let per_batch = match cfg.batching {
        UpdateBatching::Window => (cfg.max_rows).map_or(t, |m| (m / n).clamp(1, t)),
        _ => 1,
    };
    let ks: Vec<i64> = (0..t).collect();
    ks.chunks(per_batch as usize).map(|c| c.to_vec()).collect()
}

/// The rows `(samples, steps)` of transitions `ks` of `samples`, k-major:
/// for each `k`, every sample.
pub(super) fn flat_transitions(
    perms: &[Vec<i64>],
    samples: &[i64],
    ks: &[i64],
) -> (Vec<i64>, Vec<i64>) {
    let rows: Vec<i64> = ks.iter().flat_map(|_| samples.iter().copied()).collect();
    let steps: Vec<i64> = (ks.iter())
        .flat_map(|&k| samples.iter().map(move |&b| (b, k)))
        .map(|(b, k)| perms[b as usize][k as usize])
        .collect();
    (rows, steps)
}

/// The local rows of each accumulation window, in window order.
fn window_chunks(rows: i64, window: impl Fn(i64) -> i64) -> Vec<Vec<i64>> {
    let mut chunks: Vec<Vec<i64>> = Vec::new();
    for row in 0..rows {
        match chunks.last_mut() {
            Some(c) if window(c[0]) == window(row) => c.push(row),
            _ => chunks.push(vec![row]),
        }
    }
    chunks
}

/// One model batch of the update: the rows the model evaluates and the
/// transitions trained from its velocities.
pub(super) struct Rows {
    /// The sample whose state each model row holds, and its step.
    pub model_samples: Vec<i64>,
    /// See `model_samples`.
    pub model_steps: Vec<i64>,
    /// Each transition row's model row (`None`: one transition per model row, in order).
    pub expand: Option<Vec<i64>>,
    /// The sample whose transition `z_j -> z_{j+1}` each row is, and `j`.
    pub samples: Vec<i64>,
    /// See `samples`.
    pub steps: Vec<i64>,
    /// Each row's position among its sample's trained transitions (-1: not trained).
    pub positions: Vec<i64>,
    /// Leaves each row stands for (`None`: 1 each, a plain rollout).
    pub leaves: Option<Vec<i64>>,
    /// Advantage of each row `(n,)`.
    pub adv: Tensor,
    /// The rows whose loss is back-propagated.
    pub active: Vec<i64>,
}

/// The accumulation windows of a process's samples: which window each local
/// row falls in, and after which row each full window's optimizer step comes.
pub(super) struct Windows<'a> {
    shard: &'a Shard<'a>,
    grad_accum: i64,
    /// The last local row of each full window (-1: none here).
    last_row: Vec<i64>,
}

impl<'a> Windows<'a> {
    pub(super) fn new(shard: &'a Shard<'a>, grad_accum: i64) -> Self {
        let mut windows = Windows {
            shard,
            grad_accum,
            last_row: vec![-1; (shard.total() / grad_accum) as usize],
        };
        for row in 0..shard.samples().len() as i64 {
            let w = windows.of(row) as usize;
            if let Some(last) = windows.last_row.get_mut(w) {
                *last = row;
            }
        }
        windows
    }

    /// The window of local row `row`.
    pub(super) fn of(&self, row: i64) -> i64 {
        self.shard.samples()[row as usize] / self.grad_accum
    }

    /// Whether window `w`'s optimizer step follows the model batch `samples`
    /// (it holds the window's last local row; a partial last window never steps).
    pub(super) fn steps_after(&self, w: i64, samples: &[i64]) -> bool {
        (self.last_row.get(w as usize)).is_some_and(|last| samples.contains(last))
    }
}
