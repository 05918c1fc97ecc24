//! Sampling: the sigma schedule, the deterministic (ODE) Euler step and the
//! Dance-SDE step with log-probabilities.

pub mod generate;
pub mod schedule;
pub mod sde;

pub use schedule::Schedule;

use tch::Tensor;

/// One Euler step of the flow ODE from `sigma` to `sigma_next`:
/// returns `(z + (sigma_next - sigma) * v, predicted x0 = z - sigma * v)`.
pub fn euler_step(z: &Tensor, v: &Tensor, sigma: f64, sigma_next: f64) -> (Tensor, Tensor) {
    let next = z + v * (sigma_next - sigma);
    let x0 = z - v * sigma;
    (next, x0)
}
