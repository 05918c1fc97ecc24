//! The `sampling` stage: every Dance-SDE step, each fed the stored latent (the
//! velocity from our transformer, the noise from the recorded draws).

use super::judge::Rule;
use super::{Case, Precision, Stage, StageAcc, StageReport};
use crate::error::Result;
use crate::models::flux::packing;
use crate::models::VelocityModel;
use crate::sampler::sde::{sde_step, At, Next};
use crate::sampler::Schedule;

/// Bound of the stage against the float32 reference when a case has no truth.
pub const TOL: f64 = 1e-5;

/// Runs the stage on `case` in `precision`.
pub fn run(case: &Case, precision: Precision) -> Result<StageReport> {
    let kind = precision.state_kind();
    let model = case.transformer(precision)?;
    let eta = case.hyper_f64("eta")?;
    let cond = case.conditioning(model.config().guidance_embeds, kind)?;
    let latents = case.reference("sample/latents")?; // (B, S+1, L, c)
    let dev = case.device();
    let stored = latents.expected.to_kind(kind).to_device(dev);
    let (pred_x0, log_probs) = (
        case.reference("sample/pred_x0")?,
        case.reference("sample/log_probs")?,
    );
    let noise = case.input("sde_noise")?.to_kind(kind).to_device(dev); // (B, S, L, c)
    let init = case.input("init_noise")?; // (n_draws, 16, h, w)
    let steps = case.hyper_i64("sampling_steps")?;
    let s = Schedule::shifted_in(steps, case.hyper_f64("shift")?, kind);
    let mut acc = StageAcc::new(Stage::Sampling, Rule::new(precision, TOL));
    let _guard = tch::no_grad_guard();
    let (b_total, steps) = (log_probs.expected.size()[0], log_probs.expected.size()[1]);
    for b in 0..b_total {
        let draw = if init.size()[0] == 1 { 0 } else { b };
        let z0 = packing::pack(&init.narrow(0, draw, 1))?;
        let at = |i: i64| latents.map(|t| t.get(b).get(i));
        acc.compare(format!("sample/latents[{b},0]"), &z0.squeeze_dim(0), &at(0));
        for i in 0..steps {
            let z = stored.get(b).get(i).unsqueeze(0);
            let ts = s.model_timestep(i, 1).to_device(dev);
            let v = model.velocity(&cond.inputs(&cond.for_samples(&[b]), &z, &ts))?;
            let step = sde_step(
                &v,
                &z,
                &s.sigmas,
                At::Step(i),
                eta,
                Next::Noise(&noise.get(b).get(i).unsqueeze(0)),
            );
            acc.compare(
                format!("sample/latents[{b},{}]", i + 1),
                &step.next.squeeze_dim(0),
                &at(i + 1),
            );
            acc.compare(
                format!("sample/pred_x0[{b},{i}]"),
                &step.pred_x0.squeeze_dim(0),
                &pred_x0.map(|t| t.get(b).get(i)),
            );
            acc.compare(
                format!("sample/log_probs[{b},{i}]"),
                &step.log_prob,
                &log_probs.map(|t| t.get(b).narrow(0, i, 1)),
            );
        }
    }
    Ok(acc.finish())
}
