//! The `optimizer` stage: gradient clipping and AdamW. Step 1 is fed the
//! first-window gradients of the reference (the truth's own in a float64
//! run); the grad norms, learning rates and final parameters come from the
//! teacher-forced update.

use tch::Tensor;

use super::grpo::GrpoCase;
use super::judge::Rule;
use super::train::{no_truth, Forced};
use super::{Case, Precision, Stage, StageAcc, StageReport};
use crate::error::Result;
use crate::grpo::clip_grad_norm;
use crate::models::VelocityModel;

/// Bound of the stage against the float32 reference when a case has no truth.
pub const TOL: f64 = 1e-5;

/// Runs the stage on the teacher-forced update `f` of `case`.
pub fn run(case: &Case, f: &Forced) -> Result<StageReport> {
    let mut acc = StageAcc::new(Stage::Optimizer, Rule::new(f.precision, TOL));
    first_step_from_stored_grads(case, f.precision, &mut acc)?;
    let norms = Tensor::from_slice(&f.stats.grad_norms);
    acc.compare(
        "optim/grad_norm",
        &norms,
        &case.reference("optim/grad_norm")?,
    );
    acc.compare(
        "optim/lr",
        &Tensor::from_slice(&f.stats.lrs),
        &case.reference("optim/lr")?,
    );
    let last = f.stats.grad_norms.last().copied().unwrap_or(f64::NAN);
    acc.compare(
        "optim/returned_grad_norm",
        &Tensor::from(last),
        &case.reference("optim/returned_grad_norm")?,
    );
    if let Some(final_params) = f.rec.params_after.last() {
        for (name, p) in final_params {
            let key = format!("params_after_final/{name}");
            acc.compare(&key, p, &case.reference(&key)?);
        }
    }
    Ok(acc.finish())
}

/// Clipping and AdamW step 1 on the stored `grad_window0`, from the stored initial parameters.
fn first_step_from_stored_grads(
    case: &Case,
    precision: Precision,
    acc: &mut StageAcc,
) -> Result<()> {
    let kind = precision.model_kind();
    let g = GrpoCase::load_in(case, precision)?;
    let named = g.model.parameters();
    let params: Vec<Tensor> = named.iter().map(|(_, p)| p.shallow_clone()).collect();
    // d/dp sum(p * g) = g exactly: installs the stored gradients
    let dev = case.device();
    let mut total = Tensor::zeros([], (kind, dev));
    for (name, p) in &named {
        let key = format!("grad_window0/{name}");
        let grad = match precision {
            Precision::F32 | Precision::Bf16 => case.expected(&key)?,
            Precision::F64 => case.truth(&key)?.ok_or_else(|| no_truth(case))?,
        };
        total += (p * grad.to_kind(kind).to_device(dev)).sum(kind);
    }
    total.backward();
    let norm = clip_grad_norm(&params, g.cfg.max_grad_norm);
    acc.compare(
        "optim/grad_norm[0] (from stored grads)",
        &norm,
        &case.reference("optim/grad_norm")?.get(0),
    );
    let mut opt = g.optimizer();
    opt.step(&params, g.cfg.lr_schedule.lr(g.cfg.learning_rate, 0));
    for (name, p) in &named {
        let key = format!("params_after_step1/{name}");
        acc.compare(&key, p, &case.reference(&key)?);
    }
    Ok(())
}
