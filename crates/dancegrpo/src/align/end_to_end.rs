//! The `end_to_end` stage: the whole iteration free-running from the recorded
//! random draws and the stored rewards (our rollout, our decode, our
//! advantages, our update), compared at the end of each stage.

use tch::{Device, Tensor};

use super::grpo::{GrpoCase, Recorder};
use super::judge::{Rule, COMPOSED_FLOOR};
use super::{Case, Precision, Stage, StageAcc, StageReport};
use crate::dist::Shard;
use crate::error::Result;
use crate::grpo::{advantages, grpo_update, UpdateInputs};
use crate::models::vae::Vae;
use crate::sampler::rollout::{decode, rollout, RolloutSettings};

/// Bound of the stage against the float32 reference when a case has no truth
/// (errors compound along the iteration).
pub const TOL: f64 = 1e-4;

/// Runs the stage on `case` in `precision`.
pub fn run(case: &Case, precision: Precision) -> Result<StageReport> {
    let kind = precision.kind();
    let g = GrpoCase::load_in(case, precision)?;
    let mut acc = StageAcc::new(
        Stage::EndToEnd,
        Rule::composed(precision, TOL, COMPOSED_FLOOR),
    );
    let (c, h, w) = latent_shape(case)?;
    let settings = RolloutSettings {
        eta: g.cfg.eta,
        batch: 1,
    };
    let ro = rollout(
        &g.model,
        &g.cond,
        &g.draws,
        &g.schedule,
        [c, h, w],
        &settings,
        Device::Cpu,
    )?;
    acc.compare(
        "sample/latents",
        &ro.latents,
        &case.reference("sample/latents")?,
    );
    acc.compare(
        "sample/log_probs",
        &ro.log_probs,
        &case.reference("sample/log_probs")?,
    );
    let pred = case.reference("sample/pred_x0")?;
    let last = pred.expected.size()[1] - 1;
    acc.compare(
        "sample/pred_x0[:, -1]",
        &ro.pred_x0,
        &pred.map(|t| t.select(1, last)),
    );
    let vae = Vae::from_dir(&case.dir().join("vae"), kind, Device::Cpu)?;
    let (images, _) = decode(&vae, &ro.pred_x0, h, w, 1)?;
    acc.compare("decode/image", &images, &case.reference("decode/image")?);
    let adv = advantages(
        &case.expected("rewards")?.to_kind(kind),
        case.grouping()?,
        case.hyper_f64("adv_clip_max")?,
    )?;
    acc.compare(
        "advantages_clamped",
        &adv.clamped,
        &case.reference("advantages_clamped")?,
    );
    let mut rec = Recorder::default();
    let mut opt = g.optimizer();
    let shard = Shard::whole(ro.latents.size()[0]);
    let inputs = UpdateInputs {
        rollout: &ro,
        shard: &shard,
        advantages: &adv.clamped,
        cond: &g.cond,
        schedule: &g.schedule,
        draws: &g.draws,
    };
    let stats = grpo_update(&g.model, &mut opt, &inputs, &g.cfg, &mut rec)?;
    let loss = case.reference("train/loss")?;
    acc.compare("train/loss", &rec.stacked("loss"), &loss);
    acc.compare_to_terms(
        "train/total_loss",
        &Tensor::from(stats.total_loss),
        &case.reference("train/total_loss")?,
        ("train/loss", &loss),
    );
    acc.compare(
        "optim/grad_norm",
        &Tensor::from_slice(&stats.grad_norms),
        &case.reference("optim/grad_norm")?,
    );
    if let Some(final_params) = rec.params_after.last() {
        for (name, p) in final_params {
            let key = format!("params_after_final/{name}");
            acc.compare(&key, p, &case.reference(&key)?);
        }
    }
    Ok(acc.finish())
}

/// `(16, h, w)` latent shape of the case, from its recorded initial noise.
fn latent_shape(case: &Case) -> Result<(i64, i64, i64)> {
    let s = case.input("init_noise")?.size();
    Ok((s[1], s[2], s[3]))
}
