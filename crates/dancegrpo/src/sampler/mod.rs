//! Sampling: the sigma schedule, the deterministic (ODE) Euler step, the
//! Dance-SDE step with log-probabilities, the random draws and group rollouts.

pub mod cache;
pub mod capture;
pub mod conditioning;
pub mod dpm;
pub mod draws;
pub mod forms;
pub mod generate;
pub mod rollout;
pub mod schedule;
pub mod sde;
pub mod tree;
pub mod window;

pub use cache::CachePolicy;
pub use capture::{CapturePlan, KeptVelocities};
pub use conditioning::{Conditioning, SampleConditioning};
pub use dpm::{DpmVariant, PostWindow};
pub use draws::{Draws, Recorded, Seeded};
pub use forms::SdeForm;
pub use rollout::{rollout, Rollout, RolloutSettings, StepMeans};
pub use schedule::Schedule;
pub use sde::SdeStep;
pub use window::{SdeWindow, StepWindow, WindowSchedule, WindowTraining};

use tch::Tensor;

/// One Euler step of the flow ODE from `sigma` to `sigma_next`:
/// returns `(z + (sigma_next - sigma) * v, predicted x0 = z - sigma * v)`.
pub fn euler_step(z: &Tensor, v: &Tensor, sigma: f64, sigma_next: f64) -> (Tensor, Tensor) {
    let next = z + v * (sigma_next - sigma);
    let x0 = z - v * sigma;
    (next, x0)
}
