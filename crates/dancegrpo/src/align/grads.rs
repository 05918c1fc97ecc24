//! The `grads` stage: the gradients accumulated over the first window (samples
//! `0..GA-1`), before clipping, from the teacher-forced update.

use super::train::teacher_forced;
use super::{Case, Stage, StageAcc, StageReport};
use crate::error::Result;

/// Relative tolerance of the stage (float32).
pub const TOL: f64 = 1e-5;

/// Runs the stage on `case`.
pub fn run(case: &Case) -> Result<StageReport> {
    let (_, rec, _) = teacher_forced(case)?;
    let mut acc = StageAcc::new(Stage::Grads, TOL);
    for (name, grad) in &rec.grads0 {
        let key = format!("grad_window0/{name}");
        acc.compare(&key, grad, &case.expected(&key)?);
    }
    Ok(acc.finish())
}
