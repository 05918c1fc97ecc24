//! Learning-rate schedules (diffusers' `get_scheduler` semantics, stepped once
//! per optimizer step).

use std::f64::consts::PI;

/// A learning-rate schedule: a factor of the base rate per optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// Linear warm-up from 0, then constant (the reference's `constant_with_warmup`).
    ConstantWithWarmup {
        /// Warm-up steps.
        warmup_steps: u64,
    },
    /// Linear warm-up, then a half cosine down to 0 at `total_steps`.
    CosineWithWarmup {
        /// Warm-up steps.
        warmup_steps: u64,
        /// Total optimizer steps of the run.
        total_steps: u64,
    },
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule::ConstantWithWarmup { warmup_steps: 0 }
    }
}

impl LrSchedule {
    /// The factor for the optimizer step that has `completed` steps before it.
    pub fn factor(&self, completed: u64) -> f64 {
        let s = completed as f64;
        match *self {
            LrSchedule::ConstantWithWarmup { warmup_steps } if completed < warmup_steps => {
                s / (warmup_steps.max(1) as f64)
            }
            LrSchedule::ConstantWithWarmup { .. } => 1.0,
            LrSchedule::CosineWithWarmup { warmup_steps, .. } if completed < warmup_steps => {
                s / (warmup_steps.max(1) as f64)
            }
            LrSchedule::CosineWithWarmup {
                warmup_steps,
                total_steps,
            } => {
                let progress = (completed - warmup_steps) as f64
                    / (total_steps.saturating_sub(warmup_steps).max(1) as f64);
                (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of that step for base rate `lr`.
    pub fn lr(&self, base: f64, completed: u64) -> f64 {
        base * self.factor(completed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_constant_or_cosine() {
        let c = LrSchedule::ConstantWithWarmup { warmup_steps: 4 };
        let f: Vec<f64> = (0..6).map(|s| c.factor(s)).collect();
        assert_eq!(f, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
        assert_eq!(LrSchedule::default().lr(1e-5, 0), 1e-5);
        let cos = LrSchedule::CosineWithWarmup {
            warmup_steps: 2,
            total_steps: 6,
        };
        assert_eq!(cos.factor(1), 0.5);
        assert_eq!(cos.factor(2), 1.0);
        assert!((cos.factor(4) - 0.5).abs() < 1e-12);
        assert!(cos.factor(6).abs() < 1e-12);
    }
}
