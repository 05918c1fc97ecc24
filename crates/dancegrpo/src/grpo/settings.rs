//! The update's settings: which transitions are trainable, the model batches
//! they are recomputed in, and the rest of [`UpdateConfig`] with the count of
//! trained transitions it implies.

use super::guard::Guard;
use super::lr::LrSchedule;
use crate::error::{Error, Result};
use crate::precision::ReduceDtype;
use crate::sampler::{SdeForm, StepWindow, WindowTraining};

/// Which transitions of a trajectory may be trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trainable {
    /// `0 ..= S-2`: the last transition is never trained (the reference, default).
    #[default]
    AllButLast,
    /// All `S` transitions.
    All,
}

impl Trainable {
    /// How many of the transitions of `steps` steps may be trained.
    pub fn transitions(self, steps: i64) -> i64 {
        match self {
            Trainable::AllButLast => steps - 1,
            Trainable::All => steps,
        }
    }
}

/// Which model batches the update recomputes transitions in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateBatching {
    /// The rollout's own batches (same samples, same rows): the first window's
    /// ratios are exactly 1 on any device, even where kernels round differently
    /// for different batch shapes (default).
    #[default]
    Rollout,
    /// One sample at a time, in sample order, as the reference: with a
    /// batch-invariant model (ours on the CPU) weights and metrics are then
    /// bit-identical whatever the rollout batch.
    PerSample,
    /// Every trained transition of an accumulation window's samples in one
    /// model batch (samples x trained timesteps rows): the fewest and largest
    /// calls, the fastest update. The gradient of the window is summed inside
    /// one backward pass, so the weights differ from the per-sample order in
    /// their last bits; the first window's ratios stay exactly 1 where the
    /// model is batch-invariant (ours on the CPU). Activation memory grows
    /// with the rows.
    Window,
}

/// Where the first accumulation window's velocities come from. Until the
/// first optimizer step the weights are the rollout's, so the update's forward
/// pass over that window repeats work the rollout already did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirstWindow {
    /// The update recomputes every transition with gradients (the reference, default).
    #[default]
    Recompute,
    /// The rollout evaluates the first window's trained transitions with
    /// gradients, in the model batches the update will back-propagate them in,
    /// and keeps their graphs until the update: one forward pass fewer per
    /// trained transition of that window. The values are the recomputation's
    /// (batch-invariant model: bit for bit, even in the reference order),
    /// the ratios are exactly 1, and the graphs of the whole window stay in
    /// memory from the rollout to the update. Needs a model whose backward
    /// pass is an ordinary one (no activation checkpointing, no sharding) and
    /// a rollout without a tree.
    RolloutGraphs,
}

/// Settings of the update.
#[derive(Debug, Clone, Copy)]
pub struct UpdateConfig {
    /// The stochastic step's form (must be the rollout's).
    pub sde: SdeForm,
    /// Its noise level (must be the rollout's).
    pub eta: f64,
    /// MixGRPO's window (must be the rollout's): every sample trains exactly
    /// its steps, in order, instead of a random `timestep_fraction`.
    pub window: Option<StepWindow>,
    /// PPO clip range of the ratio.
    pub clip_range: f64,
    /// Weight of the KL term toward the reference policy (0: none); needs a
    /// model with a reference ([`crate::models::VelocityModel::reference_velocity`]).
    pub kl_beta: f64,
    /// GRPO-Guard's corrections: ratio normalisation (needs the rollout's
    /// step means) and per-step gradient re-weighting.
    pub guard: Guard,
    /// Fraction of the trainable transitions trained per sample, in (0, 1].
    pub timestep_fraction: f64,
    /// Which transitions are trainable.
    pub trainable: Trainable,
    /// Samples per optimizer step, over all processes.
    pub grad_accum: i64,
    /// Total gradient-norm bound.
    pub max_grad_norm: f64,
    /// Base learning rate.
    pub learning_rate: f64,
    /// Learning-rate schedule (over optimizer steps).
    pub lr_schedule: LrSchedule,
    /// Model batches of the recomputation.
    pub batching: UpdateBatching,
    /// With [`UpdateBatching::Window`]: the most transitions per model batch
    /// (`None`: a whole window).
    pub max_rows: Option<i64>,
    /// Where the first accumulation window's velocities come from.
    pub first_window: FirstWindow,
    /// Dtype of the cross-process gradient sums.
    pub grad_reduce: ReduceDtype,
}

impl UpdateConfig {
    /// `(trainable transitions n, trained per sample T = int(n * fraction))` for `steps` steps.
    pub fn trained(&self, steps: i64) -> Result<(i64, i64)> {
        let f = self.timestep_fraction;
        if !(f > 0.0 && f <= 1.0) {
            return Err(Error::Input(format!(
                "timestep_fraction must be in (0, 1], got {f}"
            )));
        }
        let n = self.trainable.transitions(steps);
        // the transitions the fraction is taken of, and how many are trained
        let (of, t) = match self.window {
            Some(w) if w.start < 0 || w.end > n => {
                return Err(Error::Input(format!(
                    "the SDE window {}..{} is outside the {n} trainable transitions",
                    w.start, w.end
                )))
            }
            Some(w) if w.train == WindowTraining::All => (w.len(), w.len()),
            Some(w) => (w.len(), (w.len() as f64 * f) as i64),
            None => (n, (n as f64 * f) as i64), // Python int(): truncation
        };
        if t < 1 {
            return Err(Error::Input(format!(
                "timestep_fraction {f} of {of} trainable transitions trains none (int({of} * {f}) = 0)"
            )));
        }
        if self.grad_accum < 1 {
            return Err(Error::Input(format!(
                "gradient_accumulation_steps must be >= 1, got {}",
                self.grad_accum
            )));
        }
        Ok((n, t))
    }
}
