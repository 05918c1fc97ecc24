//! The `schedule` stage: sigmas, quantised timesteps, step standard deviations
//! and the timestep fed to every sampling call.

use tch::Tensor;

use super::judge::Rule;
use super::{Case, Precision, Stage, StageAcc, StageReport};
use crate::error::Result;
use crate::sampler::Schedule;

/// Bound of the stage against the float32 reference when a case has no truth.
pub const TOL: f64 = 1e-5;

/// Runs the stage on `case` in `precision`.
pub fn run(case: &Case, precision: Precision) -> Result<StageReport> {
    let kind = precision.state_kind();
    let steps = case.hyper_i64("sampling_steps")?;
    let shift = case.hyper_f64("shift")?;
    let eta = case.hyper_f64("eta")?;
    let s = Schedule::shifted_in(steps, shift, kind);
    let mut acc = StageAcc::new(Stage::Schedule, Rule::new(precision, TOL));
    let linspace = Tensor::linspace(1.0, 0.0, steps + 1, (kind, tch::Device::Cpu));
    acc.compare(
        "sigmas_linspace",
        &linspace,
        &case.reference("sigmas_linspace")?,
    );
    acc.compare("sigmas", &s.sigmas, &case.reference("sigmas")?);
    acc.compare(
        "timestep_ints",
        &s.timestep_ints,
        &case.reference("timestep_ints")?,
    );
    // sigma - sigma_next in the sigmas' kind, then float64
    let std: Vec<f64> = (0..steps)
        .map(|i| {
            let delta = (s.sigmas.get(i) - s.sigmas.get(i + 1)).double_value(&[]);
            eta * delta.sqrt()
        })
        .collect();
    acc.compare(
        "std_dev_t",
        &Tensor::from_slice(&std),
        &case.reference("std_dev_t")?,
    );
    let want = case.reference("sample/timestep_input")?; // (B, S)
    let b = want.expected.size()[0];
    let ours = Tensor::stack(
        &(0..steps)
            .map(|i| s.model_timestep(i, b))
            .collect::<Vec<_>>(),
        1,
    );
    acc.compare("sample/timestep_input", &ours, &want);
    Ok(acc.finish())
}
