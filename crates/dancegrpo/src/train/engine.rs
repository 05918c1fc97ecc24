//! The one mapping from the user's configuration ([`TrainConfig`]) to the
//! engine's: the iteration's settings and the optimizer's.

use super::config::{AdvantageGrouping, TrainConfig};
use crate::grpo::iteration::IterationConfig;
use crate::grpo::{AdamWConfig, Grouping, UpdateConfig};
use crate::sampler::rollout::{RolloutSettings, StepMeans};

impl TrainConfig {
    /// The settings of the first GRPO iteration ([`crate::grpo::run_iteration`]).
    pub fn iteration_config(&self) -> IterationConfig {
        self.iteration_config_at(0)
    }

    /// The settings of iteration `iteration` (its SDE window, if any).
    pub fn iteration_config_at(&self, iteration: u64) -> IterationConfig {
        let (s, g, o) = (&self.sampler, &self.grpo, &self.optim);
        let n = g.trainable.transitions(s.steps);
        let window = s.window.as_ref().map(|w| w.at(iteration, n, self.run.seed));
        IterationConfig {
            rollout: RolloutSettings {
                sde: s.sde,
                eta: s.eta,
                window,
                batch: s.rollout_batch,
                window_samples: None,
                means: match g.guard.ratio_norm() {
                    true => StepMeans::Keep,
                    false => StepMeans::Drop,
                },
                tree: s.tree.clone(),
                post: s.window.as_ref().map(|w| w.post).unwrap_or_default(),
            },
            decode_batch: s.decode_batch,
            grouping: match g.grouping {
                AdvantageGrouping::PerPrompt => Grouping::PerPrompt { size: s.group_size },
                AdvantageGrouping::Global => Grouping::Global,
            },
            adv_clip_max: g.adv_clip_max,
            mixing: g.reward_mixing,
            max_failed_reward_share: self.health.max_failed_reward_share,
            update: UpdateConfig {
                sde: s.sde,
                eta: s.eta,
                window,
                clip_range: g.clip_range,
                kl_beta: g.kl_beta,
                guard: g.guard,
                timestep_fraction: g.timestep_fraction,
                trainable: g.trainable,
                grad_accum: o.gradient_accumulation,
                max_grad_norm: o.max_grad_norm,
                learning_rate: o.learning_rate,
                lr_schedule: o.lr_schedule,
                batching: o.update_batching,
                max_rows: o.max_update_rows,
                first_window: o.first_window,
                grad_reduce: self.precision.reduce,
            },
        }
    }

    /// AdamW's settings (the learning rate comes with each step).
    pub fn adam(&self) -> AdamWConfig {
        AdamWConfig {
            betas: self.optim.betas,
            eps: self.optim.eps,
            weight_decay: self.optim.weight_decay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SdeForm;
    use std::path::Path;

    #[test]
    fn every_field_reaches_the_engine() {
        let set = [
            "sampler.eta=0.7",
            "sampler.sde=\"cps\"",
            "sampler.rollout_batch=4",
            "sampler.decode_batch=2",
            "grpo.clip_range=0.3",
            "grpo.timestep_fraction=0.5",
            "grpo.adv_clip_max=3.0",
            "optim.learning_rate=0.002",
            "optim.max_grad_norm=0.5",
            "optim.eps=1e-6",
            "optim.weight_decay=0.01",
            "health.max_failed_reward_share=0.5",
        ]
        .map(String::from);
        let cfg = TrainConfig::tiny_demo()
            .with_overrides(&set, Path::new("test"))
            .unwrap();
        let it = cfg.iteration_config();
        assert_eq!(
            (it.rollout.eta, it.rollout.batch, it.decode_batch),
            (0.7, 4, 2)
        );
        assert_eq!(
            (it.rollout.sde, it.update.sde),
            (SdeForm::Cps, SdeForm::Cps)
        );
        assert!(matches!(it.grouping, Grouping::PerPrompt { size: 8 }));
        assert_eq!((it.adv_clip_max, it.max_failed_reward_share), (3.0, 0.5));
        let u = &it.update;
        assert_eq!((u.eta, u.clip_range, u.timestep_fraction), (0.7, 0.3, 0.5));
        assert_eq!(
            (u.learning_rate, u.max_grad_norm, u.grad_accum),
            (0.002, 0.5, 16)
        );
        let a = cfg.adam();
        assert_eq!((a.eps, a.weight_decay), (1e-6, 0.01));
    }

    #[test]
    fn each_iteration_gets_its_window() {
        let set = ["sampler.window={size=3,stride=2,shift_interval=2}".to_string()];
        let cfg = TrainConfig::tiny_demo()
            .with_overrides(&set, Path::new("test"))
            .unwrap();
        let starts: Vec<i64> = (0..8)
            .map(|it| {
                let c = cfg.iteration_config_at(it);
                assert_eq!(c.rollout.window, c.update.window);
                c.rollout.window.unwrap().start
            })
            .collect();
        // 8 steps: 7 trainable transitions, windows of 3 at 0, 2, 4
        assert_eq!(starts, [0, 0, 2, 2, 4, 4, 4, 4]);
        assert_eq!(
            cfg.iteration_config_at(5).update.trained(8).unwrap(),
            (7, 3)
        );
        assert!(TrainConfig::tiny_demo()
            .iteration_config()
            .rollout
            .window
            .is_none());
    }
}
