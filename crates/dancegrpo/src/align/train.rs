//! The `train` stage: every trained transition re-evaluated with gradients from
//! the stored trajectory, old log-probs and advantages: new log-probs, ratios,
//! clipped and unclipped losses.
//!
//! Windows after an optimizer step run on teacher-forced weights. The float64
//! truth trains on its own float64 weights, so a float32 run is given, after
//! each step, our float64 replay's weights after that step (rounded to
//! float32): every window then sees the weights the truth saw, and no
//! near-zero gradient whose sign float32 rounding flips (AdamW moves it by
//! `lr` either way) can carry into later windows. A float64 run needs no
//! forcing. A case without a truth forces the reference's stored
//! `params_after_step1`.

use tch::{Kind, Tensor};

use super::grpo::{stored_params, stored_rollout, GrpoCase, Recorder};
use super::judge::Rule;
use super::{Case, Precision, Stage, StageAcc, StageReport};
use crate::dist::Shard;
use crate::error::{Error, Result};
use crate::grpo::{grpo_update, UpdateInputs, UpdateStats};
use crate::models::VelocityModel;

/// Bound of the stage against the float32 reference when a case has no truth.
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

/// A teacher-forced update and what it recorded (read by `train`, `grads`, `optimizer`).
pub(super) struct Forced {
    /// The precision it ran in.
    pub precision: Precision,
    /// The case as loaded.
    pub g: GrpoCase,
    /// What the update recorded.
    pub rec: Recorder,
    /// Its statistics.
    pub stats: UpdateStats,
}

/// Runs the teacher-forced update of `case` in `precision`.
pub(super) fn teacher_forced(case: &Case, precision: Precision) -> Result<Forced> {
    let force_after = match (precision, case.has_truth()) {
        (Precision::F64, _) => Vec::new(),
        (Precision::F32 | Precision::Bf16, true) => {
            let replay = update(case, Precision::F64, Vec::new())?;
            let to_f32 = |step: &Vec<(String, Tensor)>| {
                step.iter().map(|(_, p)| p.to_kind(Kind::Float)).collect()
            };
            replay.rec.params_after.iter().map(to_f32).collect()
        }
        (Precision::F32 | Precision::Bf16, false) => {
            let names = GrpoCase::load(case)?.model.parameters();
            vec![stored_params(case, "params_after_step1", &names)?]
        }
    };
    update(case, precision, force_after)
}

/// The stored trajectory's update in `precision`, loading `force_after[s - 1]`
/// after optimizer step `s`.
fn update(case: &Case, precision: Precision, force_after: Vec<Vec<Tensor>>) -> Result<Forced> {
    let kind = precision.state_kind();
    let g = GrpoCase::load_in(case, precision)?;
    let rollout = stored_rollout(case, kind)?;
    // the reference trains on its float32 advantages, the truth on its float64 ones
    let advantages = match precision {
        Precision::F32 | Precision::Bf16 => case.expected("advantages_clamped")?,
        Precision::F64 => case
            .truth("advantages_clamped")?
            .ok_or_else(|| no_truth(case))?,
    };
    let mut rec = Recorder {
        force_after,
        ..Default::default()
    };
    let mut opt = g.optimizer();
    let shard = Shard::whole(rollout.latents.size()[0]);
    let inputs = UpdateInputs {
        rollout: &rollout,
        shard: &shard,
        advantages: &advantages.to_kind(kind).to_device(case.device()),
        cond: &g.cond,
        schedule: &g.schedule,
        draws: &g.draws,
    };
    let stats = grpo_update(&g.model, &mut opt, &inputs, &g.cfg, &mut rec)?;
    Ok(Forced {
        precision,
        g,
        rec,
        stats,
    })
}

/// The error of a float64 run on a case without `expected_f64.safetensors`.
pub(super) fn no_truth(case: &Case) -> Error {
    Error::not_found(
        case.dir().join("expected_f64.safetensors"),
        "a float64 run needs the case's float64 truth",
    )
}

/// Runs the stage on the teacher-forced update `f` of `case`.
pub fn run(case: &Case, f: &Forced) -> Result<StageReport> {
    let mut acc = StageAcc::new(Stage::Train, Rule::new(f.precision, TOL));
    for name in TRAIN_TENSORS {
        let key = format!("train/{name}");
        acc.compare(&key, &f.rec.stacked(name), &case.reference(&key)?);
    }
    let sigma_index = f.rec.stacked("sigma_index");
    let timesteps =
        f.g.schedule
            .timestep_ints
            .index_select(0, &sigma_index.flatten(0, -1))
            .view_(sigma_index.size());
    acc.compare(
        "train/timesteps",
        &timesteps,
        &case.reference("train/timesteps")?,
    );
    // log(ratio) = new - old is a difference of two rounded log-probs, and the
    // total loss a sum of losses that cancel (advantages sum to zero per
    // group): judge each against the size of its terms.
    acc.compare_to_terms(
        "train/log_ratio",
        &f.rec.stacked("log_ratio"),
        &case.reference("train/log_ratio")?,
        ("new_log_probs", &case.reference("train/new_log_probs")?),
    );
    acc.compare_to_terms(
        "train/total_loss",
        &Tensor::from(f.stats.total_loss),
        &case.reference("train/total_loss")?,
        ("train/loss", &case.reference("train/loss")?),
    );
    Ok(acc.finish())
}
