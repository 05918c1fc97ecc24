//! The `grads` stage: the gradients accumulated over the first window (samples
//! `0..GA-1`), before clipping, from the teacher-forced update.

use super::judge::Rule;
use super::train::Forced;
use super::{Case, Stage, StageAcc, StageReport};
use crate::error::Result;

/// Bound of the stage against the float32 reference when a case has no truth.
pub const TOL: f64 = 1e-5;

/// Runs the stage on the teacher-forced update `f` of `case`.
pub fn run(case: &Case, f: &Forced) -> Result<StageReport> {
    let mut acc = StageAcc::new(Stage::Grads, Rule::new(f.precision, TOL));
    for (name, grad) in &f.rec.grads0 {
        let key = format!("grad_window0/{name}");
        acc.compare(&key, grad, &case.reference(&key)?);
    }
    Ok(acc.finish())
}
