//! The `advantages` stage: group-relative advantages from the stored rewards.

use super::{Case, Stage, StageAcc, StageReport};
use crate::error::Result;
use crate::grpo::advantages;

/// Relative tolerance of the stage (float32).
pub const TOL: f64 = 1e-5;

/// Runs the stage on `case`.
pub fn run(case: &Case) -> Result<StageReport> {
    let rewards = case.expected("rewards")?;
    let grouping = case.grouping()?;
    let adv = advantages(&rewards, grouping, case.hyper_f64("adv_clip_max")?)?;
    let mut acc = StageAcc::new(Stage::Advantages, TOL);
    acc.compare("advantages", &adv.raw, &case.expected("advantages")?);
    acc.compare(
        "advantages_clamped",
        &adv.clamped,
        &case.expected("advantages_clamped")?,
    );
    Ok(acc.finish())
}
