//! The `schedule` stage: sigmas, quantised timesteps, step standard deviations
//! and the timestep fed to every sampling call.

use tch::{Kind, Tensor};

use super::{Case, Stage, StageAcc, StageReport};
use crate::error::Result;
use crate::sampler::Schedule;

/// Relative tolerance of the stage.
pub const TOL: f64 = 1e-5;

/// Runs the stage on `case`.
pub fn run(case: &Case) -> Result<StageReport> {
    let steps = case.hyper_i64("sampling_steps")?;
    let shift = case.hyper_f64("shift")?;
    let eta = case.hyper_f64("eta")?;
    let s = Schedule::shifted(steps, shift);
    let mut acc = StageAcc::new(Stage::Schedule, TOL);
    let linspace = Tensor::linspace(1.0, 0.0, steps + 1, (Kind::Float, tch::Device::Cpu));
    acc.compare(
        "sigmas_linspace",
        &linspace,
        &case.expected("sigmas_linspace")?,
    );
    acc.compare("sigmas", &s.sigmas, &case.expected("sigmas")?);
    acc.compare(
        "timestep_ints",
        &s.timestep_ints,
        &case.expected("timestep_ints")?,
    );
    let std: Vec<f64> = (0..steps)
        .map(|i| {
            eta * (s.sigmas.get(i) - s.sigmas.get(i + 1))
                .double_value(&[])
                .sqrt()
        })
        .collect();
    acc.compare(
        "std_dev_t",
        &Tensor::from_slice(&std),
        &case.expected("std_dev_t")?,
    );
    let want = case.expected("sample/timestep_input")?; // (B, S)
    let ours = Tensor::stack(
        &(0..steps)
            .map(|i| s.model_timestep(i, want.size()[0]))
            .collect::<Vec<_>>(),
        1,
    );
    acc.compare("sample/timestep_input", &ours, &want);
    Ok(acc.finish())
}
