//! The shifted flow-matching sigma schedule and the reference's timestep
//! quantisation.

use tch::{Device, Kind, Tensor};

/// Sigmas and model timesteps of an `steps`-step sampling run.
#[derive(Debug)]
pub struct Schedule {
    /// `steps + 1` sigmas from 1 down to 0, float32 (or float64) `(steps + 1,)`.
    pub sigmas: Tensor,
    /// Integer timesteps `int(sigma * 1000)` of the first `steps` sigmas `(steps,)`.
    pub timestep_ints: Tensor,
    /// The shift applied to the linear times.
    pub shift: f64,
}

impl Schedule {
    /// `linspace(1, 0, steps + 1)` shifted by `shift * t / (1 + (shift - 1) * t)`, float32;
    /// timesteps truncated as the reference does (0.59999996 -> 599).
    pub fn shifted(steps: i64, shift: f64) -> Self {
        Self::shifted_in(steps, shift, Kind::Float)
    }

    /// [`Self::shifted`] with the sigmas (and the model timesteps) computed in
    /// `kind`; the integer timesteps always come from the float32 sigmas, as the
    /// fixtures' float64 replay keeps them (599, where float64 gives 600).
    pub fn shifted_in(steps: i64, shift: f64, kind: Kind) -> Self {
        let sigmas_in = |kind: Kind| {
            let t = Tensor::linspace(1.0, 0.0, steps + 1, (kind, Device::Cpu));
            (&t * shift) / ((&t * (shift - 1.0)) + 1.0)
        };
        let timestep_ints = (sigmas_in(Kind::Float).narrow(0, 0, steps) * 1000.0)
            .trunc()
            .to_kind(Kind::Int64);
        Schedule {
            sigmas: sigmas_in(kind),
            timestep_ints,
            shift,
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

    /// The model's timestep input for step `i`: `float32(timestep_ints[i]) / 1000`
    /// (in the sigmas' kind), shape `(b,)`.
    pub fn model_timestep(&self, i: i64, b: i64) -> Tensor {
        let t = self.timestep_ints.get(i).to_kind(self.sigmas.kind()) / 1000.0;
        t.expand([b], false).contiguous()
    }

    /// The model's timestep inputs for steps `steps` (one per row), shape `(n,)`.
    pub fn model_timesteps(&self, steps: &[i64]) -> Tensor {
        let ints = self
            .timestep_ints
            .index_select(0, &Tensor::from_slice(steps));
        ints.to_kind(self.sigmas.kind()) / 1000.0
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
