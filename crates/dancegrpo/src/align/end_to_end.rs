//! The `end_to_end` stage: the whole iteration free-running from the recorded
//! random draws and the stored rewards (our rollout, our decode, our
//! advantages, our update), compared at the end of each stage.

use tch::{Device, Kind, Tensor};

use super::grpo::{GrpoCase, Recorder};
use super::{Case, Stage, StageAcc, StageReport};
use crate::dist::Shard;
use crate::error::Result;
use crate::grpo::{advantages, grpo_update, UpdateInputs};
use crate::models::vae::Vae;
use crate::sampler::rollout::{decode, rollout, RolloutSettings};

/// Relative tolerance of the stage (errors compound along the iteration).
pub const TOL: f64 = 1e-4;

/// Runs the stage on `case`.
pub fn run(case: &Case) -> Result<StageReport> {
    let g = GrpoCase::load(case)?;
    let mut acc = StageAcc::new(Stage::EndToEnd, TOL);
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
        &case.expected("sample/latents")?,
    );
    acc.compare(
        "sample/log_probs",
        &ro.log_probs,
        &case.expected("sample/log_probs")?,
    );
    let pred = case.expected("sample/pred_x0")?;
    acc.compare(
        "sample/pred_x0[:, -1]",
        &ro.pred_x0,
        &pred.select(1, pred.size()[1] - 1),
    );
    let vae = Vae::from_dir(&case.dir().join("vae"), Kind::Float, Device::Cpu)?;
    let (images, _) = decode(&vae, &ro.pred_x0, h, w, 1)?;
    acc.compare("decode/image", &images, &case.expected("decode/image")?);
    let grouping = case.grouping()?;
    let adv = advantages(
        &case.expected("rewards")?,
        grouping,
        case.hyper_f64("adv_clip_max")?,
    )?;
    acc.compare(
        "advantages_clamped",
        &adv.clamped,
        &case.expected("advantages_clamped")?,
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
    acc.compare(
        "train/loss",
        &rec.stacked("loss"),
        &case.expected("train/loss")?,
    );
    acc.compare_to_terms(
        "train/total_loss",
        &Tensor::from(stats.total_loss),
        &case.expected("train/total_loss")?,
        ("train/loss", &case.expected("train/loss")?),
    );
    acc.compare(
        "optim/grad_norm",
        &Tensor::from_slice(&stats.grad_norms),
        &case.expected("optim/grad_norm")?,
    );
    if let Some(final_params) = rec.params_after.last() {
        for (name, p) in final_params {
            let key = format!("params_after_final/{name}");
            acc.compare(&key, p, &case.expected(&key)?);
        }
    }
    Ok(acc.finish())
}

/// `(16, h, w)` latent shape of the case, from its recorded initial noise.
fn latent_shape(case: &Case) -> Result<(i64, i64, i64)> {
    let s = case.input("init_noise")?.size();
    Ok((s[1], s[2], s[3]))
}
