//! One optimiser per stage: AdamW (PyTorch semantics, [`crate::grpo::AdamW`]),
//! gradient-norm clipping, and a linear warm-up followed by a half cosine.

use tch::{Kind, Tensor};

use super::config::StageConfig;
use crate::grpo::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};

/// The optimiser of one stage over a fixed list of parameters.
pub(super) struct StageOptimiser {
    params: Vec<Tensor>,
    adamw: AdamW,
    schedule: LrSchedule,
    learning_rate: f64,
    max_grad_norm: f64,
}

impl StageOptimiser {
    /// AdamW over `params` for `stage` (warm-up: the first 5% of its steps).
    pub(super) fn new(
        params: Vec<Tensor>,
        stage: &StageConfig,
        weight_decay: f64,
        max_grad_norm: f64,
    ) -> Self {
        let adam = AdamWConfig {
            weight_decay,
            ..AdamWConfig::default()
        };
        StageOptimiser {
            adamw: AdamW::new(adam, &params),
            params,
            schedule: LrSchedule::CosineWithWarmup {
                warmup_steps: stage.steps / 20,
                total_steps: stage.steps,
            },
            learning_rate: stage.learning_rate,
            max_grad_norm,
        }
    }

    /// Back-propagates the scalar `loss`, clips, takes one AdamW step and clears
    /// the gradients. Returns the loss as a float.
    pub(super) fn step(&mut self, loss: &Tensor) -> f64 {
        loss.backward();
        let _norm = clip_grad_norm(&self.params, self.max_grad_norm);
        let lr = self.schedule.lr(self.learning_rate, self.adamw.steps());
        self.adamw.step(&self.params, lr);
        for p in &self.params {
            if p.grad().defined() {
                p.shallow_clone().zero_grad();
            }
        }
        loss.to_kind(Kind::Double).double_value(&[])
    }
}
