//! The `end_to_end` stage: the whole iteration free-running from the recorded
//! random draws and the stored rewards (our rollout, our decode, our
//! advantages, our update), compared at the end of each stage up to the
//! gradients of the first window.
//!
//! Nothing is teacher forced, so every check is composed (see
//! [`COMPOSED_FLOOR`]). From the first optimizer step on, a free run's weights
//! differ from the reference's wherever rounding flipped the sign of a
//! near-zero gradient (AdamW moves such a weight by about `lr` either way), by
//! an amount that depends on the CPU, the thread count and the learning rate
//! rather than on the code; the `optimizer` stage judges the step on the
//! stored gradients and `train`, `grads` and `optimizer` the later windows on
//! teacher-forced weights.

use tch::Tensor;

use super::grpo::{GrpoCase, Recorder};
use super::judge::{Rule, COMPOSED_FLOOR};
use super::{Case, Precision, Stage, StageAcc, StageReport};
use crate::dist::Shard;
use crate::error::Result;
use crate::grpo::{advantages, grpo_update, UpdateInputs};
use crate::models::vae::Vae;
use crate::sampler::rollout::{decode, rollout, RolloutSettings, StepMeans};
use crate::sampler::Rollout;

/// Bound of the stage against the float32 reference when a case has no truth
/// (errors compound along the iteration).
pub const TOL: f64 = 1e-4;

/// Runs the stage on `case` in `precision`.
pub fn run(case: &Case, precision: Precision) -> Result<StageReport> {
    let kind = precision.state_kind();
    let g = GrpoCase::load_in(case, precision)?;
    let mut acc = StageAcc::new(
        Stage::EndToEnd,
        Rule::composed(precision, TOL, COMPOSED_FLOOR),
    );
    let ro = rollout_and_decode(case, &g, precision, &mut acc)?;
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
    first_window(case, &g, &ro, &adv.clamped, &mut acc)?;
    Ok(acc.finish())
}

/// The rollout from the recorded draws and its decoded images, compared.
fn rollout_and_decode(
    case: &Case,
    g: &GrpoCase,
    precision: Precision,
    acc: &mut StageAcc,
) -> Result<Rollout> {
    let (c, h, w) = latent_shape(case)?;
    let settings = RolloutSettings {
        sde: g.cfg.sde,
        eta: g.cfg.eta,
        window: g.cfg.window,
        batch: 1,
        window_samples: None,
        means: StepMeans::Drop,
        tree: None,
        post: Default::default(),
    };
    let dev = case.device();
    let ro = rollout(
        &g.model,
        &g.cond,
        &g.draws,
        &g.schedule,
        [c, h, w],
        &settings,
        dev,
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
    let vae = Vae::from_dir(&case.dir().join("vae"), precision.frozen_kind(), dev)?;
    let layout = crate::models::flux::FluxPacking;
    let (images, _) = decode(&vae, &layout, &ro.pred_x0, [c, h, w], 1)?;
    acc.compare("decode/image", &images, &case.reference("decode/image")?);
    Ok(ro)
}

/// The update on `advantages` `(B,)`: the first accumulation window's losses,
/// its gradient norm and gradients, compared.
fn first_window(
    case: &Case,
    g: &GrpoCase,
    ro: &Rollout,
    advantages: &Tensor,
    acc: &mut StageAcc,
) -> Result<()> {
    let mut rec = Recorder::default();
    let mut opt = g.optimizer();
    let shard = Shard::whole(ro.latents.size()[0]);
    let inputs = UpdateInputs {
        rollout: ro,
        shard: &shard,
        advantages: &advantages.to_device(case.device()),
        cond: &g.cond,
        schedule: &g.schedule,
        draws: &g.draws,
    };
    let stats = grpo_update(&g.model, &mut opt, &inputs, &g.cfg, &mut rec)?;
    // the first window: samples 0..GA-1
    let window = g.cfg.grad_accum.min(ro.latents.size()[0]);
    let first = |t: &Tensor| t.narrow(0, 0, window);
    acc.compare(
        "train/loss[first window]",
        &first(&rec.stacked("loss")),
        &case.reference("train/loss")?.map(first),
    );
    acc.compare(
        "optim/grad_norm[0]",
        &Tensor::from_slice(&stats.grad_norms[..1.min(stats.grad_norms.len())]),
        &case
            .reference("optim/grad_norm")?
            .map(|t| t.narrow(0, 0, 1)),
    );
    for (name, grad) in &rec.grads0 {
        let key = format!("grad_window0/{name}");
        acc.compare(&key, grad, &case.reference(&key)?);
    }
    Ok(())
}

/// `(c, h, w)` latent shape of the case, from its recorded initial noise.
fn latent_shape(case: &Case) -> Result<(i64, i64, i64)> {
    let s = case.input("init_noise")?.size();
    Ok((s[1], s[2], s[3]))
}
