//! The `optimizer` stage: gradient clipping and AdamW. Step 1 is fed the
//! reference's own first-window gradients; the grad norms, learning rates and
//! final parameters come from the teacher-forced update.

use tch::{Device, Kind, Tensor};

use super::grpo::GrpoCase;
use super::train::teacher_forced;
use super::{Case, Stage, StageAcc, StageReport};
use crate::error::Result;
use crate::grpo::clip_grad_norm;
use crate::models::VelocityModel;

/// Relative tolerance of the stage (float32).
pub const TOL: f64 = 1e-5;

/// Runs the stage on `case`.
pub fn run(case: &Case) -> Result<StageReport> {
    let mut acc = StageAcc::new(Stage::Optimizer, TOL);
    first_step_from_stored_grads(case, &mut acc)?;
    let (_, rec, stats) = teacher_forced(case)?;
    let norms = Tensor::from_slice(&stats.grad_norms);
    acc.compare(
        "optim/grad_norm",
        &norms,
        &case.expected("optim/grad_norm")?,
    );
    acc.compare(
        "optim/lr",
        &Tensor::from_slice(&stats.lrs),
        &case.expected("optim/lr")?,
    );
    let last = stats.grad_norms.last().copied().unwrap_or(f32::NAN) as f64;
    acc.compare(
        "optim/returned_grad_norm",
        &Tensor::from(last),
        &case.expected("optim/returned_grad_norm")?,
    );
    if let Some(final_params) = rec.params_after.last() {
        for (name, p) in final_params {
            let key = format!("params_after_final/{name}");
            acc.compare(&key, p, &case.expected(&key)?);
        }
    }
    Ok(acc.finish())
}

/// Clipping and AdamW step 1 on the stored `grad_window0`, from the stored initial parameters.
fn first_step_from_stored_grads(case: &Case, acc: &mut StageAcc) -> Result<()> {
    let g = GrpoCase::load(case)?;
    let named = g.model.parameters();
    let params: Vec<Tensor> = named.iter().map(|(_, p)| p.shallow_clone()).collect();
    // d/dp sum(p * g) = g exactly: installs the stored gradients
    let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for (name, p) in &named {
        let grad = case.expected(&format!("grad_window0/{name}"))?;
        total += (p * grad).sum(Kind::Float);
    }
    total.backward();
    let norm = clip_grad_norm(&params, g.cfg.max_grad_norm);
    acc.compare(
        "optim/grad_norm[0] (from stored grads)",
        &norm,
        &case.expected("optim/grad_norm")?.get(0),
    );
    let mut opt = g.optimizer();
    opt.step(&params, g.cfg.lr_schedule.lr(g.cfg.learning_rate, 0));
    for (name, p) in &named {
        let key = format!("params_after_step1/{name}");
        acc.compare(&key, p, &case.expected(&key)?);
    }
    Ok(())
}
