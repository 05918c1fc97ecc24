//! The `train` stage: every trained transition re-evaluated with gradients from
//! the stored trajectory, old log-probs and advantages: new log-probs, ratios,
//! clipped and unclipped losses. The parameters after optimizer step 1 are the
//! reference's, so later windows are teacher forced too.

use tch::Tensor;

use super::grpo::{stored_params, stored_rollout, GrpoCase, Recorder};
use super::{Case, Stage, StageAcc, StageReport};
use crate::dist::Shard;
use crate::error::Result;
use crate::grpo::{grpo_update, UpdateInputs, UpdateStats};
use crate::models::VelocityModel;

/// Relative tolerance of the stage (float32).
pub const TOL: f64 = 1e-5;

/// The per-transition tensors compared as stored (`train/<name>`, shape `(B, T, ..)`).
const TRAIN_TENSORS: [&str; 12] = [
    "sigma_index",
    "timestep_input",
    "latents",
    "next_latents",
    "model_output",
    "old_log_probs",
    "new_log_probs",
    "ratio",
    "ratio_clamped",
    "unclipped_loss",
    "clipped_loss",
    "loss",
];

/// Runs the teacher-forced update of `case` and returns what it recorded.
pub(super) fn teacher_forced(case: &Case) -> Result<(GrpoCase, Recorder, UpdateStats)> {
    let g = GrpoCase::load(case)?;
    let rollout = stored_rollout(case)?;
    let advantages = case.expected("advantages_clamped")?;
    let names = g.model.parameters();
    let mut rec = Recorder {
        force_after_step1: Some(stored_params(case, "params_after_step1", &names)?),
        ..Default::default()
    };
    let mut opt = g.optimizer();
    let shard = Shard::whole(rollout.latents.size()[0]);
    let inputs = UpdateInputs {
        rollout: &rollout,
        shard: &shard,
        advantages: &advantages,
        cond: &g.cond,
        schedule: &g.schedule,
        draws: &g.draws,
    };
    let stats = grpo_update(&g.model, &mut opt, &inputs, &g.cfg, &mut rec)?;
    Ok((g, rec, stats))
}

/// Runs the stage on `case`.
pub fn run(case: &Case) -> Result<StageReport> {
    let (g, rec, stats) = teacher_forced(case)?;
    let mut acc = StageAcc::new(Stage::Train, TOL);
    for name in TRAIN_TENSORS {
        let key = format!("train/{name}");
        acc.compare(&key, &rec.stacked(name), &case.expected(&key)?);
    }
    let sigma_index = rec.stacked("sigma_index");
    let timesteps = g
        .schedule
        .timestep_ints
        .index_select(0, &sigma_index.flatten(0, -1))
        .view_(sigma_index.size());
    acc.compare(
        "train/timesteps",
        &timesteps,
        &case.expected("train/timesteps")?,
    );
    // log(ratio) = new - old is a difference of two float32-rounded log-probs,
    // and the total loss a sum of losses that cancel (advantages sum to zero
    // per group): judge each against the size of its terms.
    acc.compare_to_terms(
        "train/log_ratio",
        &rec.stacked("log_ratio"),
        &case.expected("train/log_ratio")?,
        ("new_log_probs", &case.expected("train/new_log_probs")?),
    );
    acc.compare_to_terms(
        "train/total_loss",
        &Tensor::from(stats.total_loss),
        &case.expected("train/total_loss")?,
        ("train/loss", &case.expected("train/loss")?),
    );
    Ok(acc.finish())
}
