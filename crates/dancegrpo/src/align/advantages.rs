//! The `advantages` stage: group-relative advantages from the stored rewards.

use super::judge::Rule;
use super::{Case, Precision, Stage, StageAcc, StageReport};
use crate::error::Result;
use crate::grpo::advantages;

/// Bound of the stage against the float32 reference when a case has no truth.
pub const TOL: f64 = 1e-5;

/// Runs the stage on `case` in `precision`.
pub fn run(case: &Case, precision: Precision) -> Result<StageReport> {
    let rewards = case.expected("rewards")?.to_kind(precision.state_kind());
    let grouping = case.grouping()?;
    let adv = advantages(&rewards, grouping, case.hyper_f64("adv_clip_max")?)?;
    let mut acc = StageAcc::new(Stage::Advantages, Rule::new(precision, TOL));
    acc.compare("advantages", &adv.raw, &case.reference("advantages")?);
    acc.compare(
        "advantages_clamped",
        &adv.clamped,
        &case.reference("advantages_clamped")?,
    );
    Ok(acc.finish())
}
