//! What a run writes for the user: `metrics.jsonl` (one JSON object per
//! iteration), `rewards.txt` (the reference's reward log: one mean reward per
//! line); the images are written by [`super::images`].

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::grpo::iteration::{IterationReport, Summary};

/// One line of `metrics.jsonl`. A quantity without a value (the mean reward
/// of an iteration whose rewards all failed) is NaN, written `null`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    /// Iteration (1-based).
    pub iteration: u64,
    /// Combined reward summary over the valid rewards.
    pub reward_mean: f64,
    /// See `reward_mean`.
    pub reward_std: f64,
    /// Per-reward means (name, mean).
    pub rewards: Vec<(String, f64)>,
    /// Items whose reward failed.
    pub failed_rewards: usize,
    /// Groups without advantages (fewer than 2 valid rewards).
    pub skipped_groups: usize,
    /// Optimizer steps skipped because their gradients were not finite.
    pub skipped_steps: usize,
    /// Share of groups whose rewards were all equal.
    pub zero_variance_group_share: f64,
    /// Advantage summary (after clamping).
    pub advantage: Summary,
    /// Advantages changed by the clamp.
    pub clamped_advantages: usize,
    /// Sum of the per-transition losses.
    pub loss: f64,
    /// Ratio mean, min, max.
    pub ratio_mean: f64,
    /// See `ratio_mean`.
    pub ratio_min: f64,
    /// See `ratio_mean`.
    pub ratio_max: f64,
    /// Share of transitions outside the clip range.
    pub clip_fraction: f64,
    /// Mean KL to the reference policy over trained transitions (0 without `grpo.kl_beta`).
    pub kl: f64,
    /// Grad norm (before clipping) of the last optimizer step.
    pub grad_norm: f64,
    /// Learning rate of the last optimizer step.
    pub lr: f64,
    /// Rows the transformer evaluated in the iteration (rollout and update, all processes).
    pub transformer_rows: u64,
    /// Seconds per stage (not reproducible: left out of run comparisons).
    pub seconds: crate::grpo::iteration::StageSeconds,
    /// Sampled images per second over the whole iteration.
    pub images_per_second: f64,
}

impl Metrics {
    /// The metrics of iteration `iteration` from its report and per-reward means.
    pub fn new(
        iteration: u64,
        r: &IterationReport,
        rewards: Vec<(String, f64)>,
        groups: usize,
    ) -> Self {
        let s = &r.seconds;
        let total = s.rollout + s.decode + s.reward + s.update;
        Metrics {
            iteration,
            reward_mean: r.reward.mean,
            reward_std: r.reward.std,
            rewards,
            failed_rewards: r.failed_rewards,
            skipped_groups: r.skipped_groups,
            skipped_steps: r.update.skipped_steps,
            zero_variance_group_share: r.zero_variance_groups as f64 / groups.max(1) as f64,
            advantage: r.advantage.clone(),
            clamped_advantages: r.clamped_advantages,
            loss: r.update.total_loss,
            ratio_mean: r.update.ratio_mean,
            ratio_min: r.update.ratio_min,
            ratio_max: r.update.ratio_max,
            clip_fraction: r.update.clip_fraction,
            kl: r.update.kl_mean,
            grad_norm: r.update.grad_norms.last().copied().unwrap_or(0.0),
            lr: r.update.lrs.last().copied().unwrap_or(0.0),
            transformer_rows: r.transformer_rows,
            seconds: s.clone(),
            images_per_second: r.rewards.len() as f64 / total.max(1e-9),
        }
    }
}

impl Metrics {
    /// The scalars of this line under TensorBoard tags (`reward/mean`,
    /// `reward/<reward name>`, `advantage/std`, `train/loss`, `time/rollout_s`, ...).
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let (a, s) = (&self.advantage, &self.seconds);
        let fixed = [
            ("reward/mean", self.reward_mean),
            ("reward/std", self.reward_std),
            ("reward/failed", self.failed_rewards as f64),
            ("reward/skipped_groups", self.skipped_groups as f64),
            ("train/skipped_steps", self.skipped_steps as f64),
            (
                "reward/zero_variance_group_share",
                self.zero_variance_group_share,
            ),
            ("advantage/mean", a.mean),
            ("advantage/std", a.std),
            ("advantage/min", a.min),
            ("advantage/max", a.max),
            ("advantage/clamped", self.clamped_advantages as f64),
            ("train/loss", self.loss),
            ("train/ratio_mean", self.ratio_mean),
            ("train/ratio_min", self.ratio_min),
            ("train/ratio_max", self.ratio_max),
            ("train/clip_fraction", self.clip_fraction),
            ("train/kl", self.kl),
            ("train/grad_norm", self.grad_norm),
            ("train/lr", self.lr),
            ("time/rollout_s", s.rollout),
            ("time/decode_s", s.decode),
            ("time/reward_s", s.reward),
            ("time/update_s", s.update),
            ("time/images_per_s", self.images_per_second),
        ];
        let per_reward = self
            .rewards
            .iter()
            .map(|(name, mean)| (format!("reward/{name}"), *mean));
        fixed
            .into_iter()
            .map(|(tag, x)| (tag.to_string(), x))
            .chain(per_reward)
            .collect()
    }
}

/// Appends one line to `path` and flushes it to disk.
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))?;
    f.sync_data().map_err(|e| Error::io(path, e))
}

/// Keeps the first `lines` lines of `path` (after a resume: drop what the
/// interrupted run wrote past its last checkpoint).
pub fn truncate_lines(path: &Path, lines: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text.lines().take(lines).map(|l| format!("{l}\n")).collect();
    crate::io::atomic::write_bytes_atomic(path, kept.as_bytes())
}
