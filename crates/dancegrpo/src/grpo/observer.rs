//! Hooks into the GRPO update: what an [`UpdateObserver`] sees of each model
//! batch of re-evaluated transitions and of each optimizer step (alignment
//! against the fixtures, debugging, progress).

use tch::Tensor;

use super::loss::PolicyLoss;
use crate::error::Result;

/// One model batch of re-evaluated transitions, handed to an [`UpdateObserver`].
pub struct TransitionBatch<'a> {
    /// The samples of the batch (rows).
    pub samples: &'a [i64],
    /// Rows that belong to the current accumulation window (only they contribute).
    pub active: &'a [i64],
    /// Each active row's position `k` among its sample's trained transitions
    /// (its root's, in a tree; -1 for rows not trained).
    pub positions: &'a [i64],
    /// The transition `j` of each row.
    pub steps: &'a [i64],
    /// Leaves each row stands for (a tree node's; 1 for every row of a plain rollout).
    pub leaves: &'a [i64],
    /// The timestep fed to the model `(n,)`.
    pub timestep_input: &'a Tensor,
    /// `z_j` and `z_{j+1}` `(n, L, c)`.
    pub latents: &'a Tensor,
    /// See `latents`.
    pub next_latents: &'a Tensor,
    /// The velocity with the current parameters `(n, L, c)`.
    pub model_output: &'a Tensor,
    /// Rollout log-probabilities `(n,)`.
    pub old_log_probs: &'a Tensor,
    /// Recomputed log-probabilities `(n,)`.
    pub new_log_probs: &'a Tensor,
    /// The loss terms `(n,)`.
    pub terms: &'a PolicyLoss,
    /// The KL to the reference policy `(n,)`, with a KL term.
    pub kl: Option<&'a Tensor>,
}

/// Hooks into the update (alignment, debugging); every method defaults to nothing.
pub trait UpdateObserver {
    /// After each batch of transitions has been back-propagated.
    fn transitions(&mut self, _batch: &TransitionBatch) -> Result<()> {
        Ok(())
    }
    /// Before optimizer step `step` (1-based), with the accumulated, unclipped gradients.
    fn before_step(&mut self, _step: u64, _params: &[(String, Tensor)]) -> Result<()> {
        Ok(())
    }
    /// After optimizer step `step` (the parameters may be inspected or replaced).
    fn after_step(&mut self, _step: u64, _params: &[(String, Tensor)]) -> Result<()> {
        Ok(())
    }
}

/// An observer that does nothing.
pub struct NoObserver;
impl UpdateObserver for NoObserver {}
