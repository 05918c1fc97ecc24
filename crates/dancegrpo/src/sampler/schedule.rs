//! The shifted flow-matching sigma schedule and the reference's timestep
//! quantisation.

use tch::{Device, Kind, Tensor};

/// Sigmas and model timesteps of an `steps`-step sampling run.
#[derive(Debug)]
pub struct Schedule {
    /// `steps + 1` sigmas from 1 down to 0, float32 `(steps + 1,)`.
    pub sigmas: Tensor,
    /// Integer timesteps `int(sigma * 1000)` of the first `steps` sigmas `(steps,)`.
    pub timestep_ints: Tensor,
}

impl Schedule {
    /// `linspace(1, 0, steps + 1)` shifted by `shift * t / (1 + (shift - 1) * t)`, float32;
    /// timesteps truncated as the reference does (0.59999996 -> 599).
    pub fn shifted(steps: i64, shift: f64) -> Self {
        let t = Tensor::linspace(1.0, 0.0, steps + 1, (Kind::Float, Device::Cpu));
        let sigmas = (&t * shift) / ((&t * (shift - 1.0)) + 1.0);
        let timestep_ints = (sigmas.narrow(0, 0, steps) * 1000.0)
            .trunc()
            .to_kind(Kind::Int64);
        Schedule {
            sigmas,
            timestep_ints,
        }
    }

    /// Number of steps.
    pub fn steps(&self) -> i64 {
        self.timestep_ints.size()[0]
    }

    /// Sigma `i` as a float.
    pub fn sigma(&self, i: i64) -> f64 {
        self.sigmas.double_value(&[i])
    }

    /// The model's timestep input for step `i`: `float32(timestep_ints[i]) / 1000`, shape `(b,)`.
    pub fn model_timestep(&self, i: i64, b: i64) -> Tensor {
        let t = self.timestep_ints.get(i).to_kind(Kind::Float) / 1000.0;
        t.expand([b], false).contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_monotonic_and_truncated() {
        let s = Schedule::shifted(6, 3.0);
        assert_eq!(s.sigma(0), 1.0);
        assert_eq!(s.sigma(6), 0.0);
        let v: Vec<f32> = Vec::try_from(&s.sigmas).unwrap();
        assert!(v.windows(2).all(|w| w[0] > w[1]));
        let t: Vec<i64> = Vec::try_from(&s.timestep_ints).unwrap();
        assert_eq!(t[0], 1000);
        // float32 sigma 0.59999996 truncates to 599, 0.93750006 to 937 (PyTorch gives the same)
        assert_eq!(t, vec![1000, 937, 857, 750, 599, 375]);
    }
}
