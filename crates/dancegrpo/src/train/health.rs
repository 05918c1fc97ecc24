//! The run-health guard: a run that goes numerically wrong stops with an error
//! naming what went wrong first, instead of finishing with NaN weights.
//!
//! Non-finite values are looked for where they first appear: the weights when
//! they are loaded or resumed (and the optimizer state), the prompt embeddings
//! when they are read, the final latents of every rollout (their images are
//! reward failures, see [`crate::grpo::iteration`]), the rewards (a share of
//! failures stops the run), the gradient norm of every optimizer step (a
//! non-finite one skips the step, see [`crate::grpo::update`]) and the trained
//! parameters after each iteration (never checkpointed when not finite).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::data::{PromptEntry, PromptSet};
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::grpo::iteration::IterationReport;

/// What a run does when the plan says one process does not fit its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryCheck {
    /// Stop before loading anything (the default).
    #[default]
    Stop,
    /// Say so and try anyway (the plan's activations are estimates).
    Warn,
    /// Do not check.
    Off,
}

/// `[health]`: when a run stops instead of going on wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Optimizer steps in a row whose gradients are not finite (each one
    /// skipped) after which the run stops.
    pub max_skipped_steps: u32,
    /// The run stops when at least this share of an iteration's samples have
    /// no reward (failed, or non-finite), before it trains on them; in (0, 1],
    /// 1: only when every reward failed.
    pub max_failed_reward_share: f64,
    /// What a failure to write an image (grid, reward curve) does.
    pub on_image_error: ImageErrors,
    /// What a run does when one process would not fit its device's memory
    /// (`dancegrpo plan`'s estimate, checked before anything is loaded).
    pub memory_check: MemoryCheck,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            max_skipped_steps: 3,
            max_failed_reward_share: 1.0,
            on_image_error: ImageErrors::Stop,
            memory_check: MemoryCheck::Stop,
        }
    }
}

/// What a failure to write an image does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageErrors {
    /// Stop the run with the error (the default).
    #[default]
    Stop,
    /// Say so once and train on without writing images.
    Disable,
}

impl HealthConfig {
    /// The first invalid field (its name inside `[health]`) and why.
    pub fn check(&self) -> Option<(&'static str, String)> {
        let s = self.max_failed_reward_share;
        (!(s > 0.0 && s <= 1.0)).then(|| {
            let msg = format!("must be in (0, 1], got {s}");
            ("max_failed_reward_share", msg)
        })
    }
}

/// The name of the first tensor of `named` holding a NaN or an infinity
/// (one device synchronisation for all of them).
pub fn first_nonfinite(named: &[(String, Tensor)]) -> Result<Option<String>> {
    if named.is_empty() {
        return Ok(None);
    }
    // one flag per tensor, stacked where they live: a single transfer (a
    // device transfer per tensor would synchronise once per tensor)
    let device = named[0].1.device();
    let flags: Vec<Tensor> = named
        .iter()
        .map(|(_, t)| t.detach().isfinite().logical_not().any().to_device(device))
        .collect();
    let flags = Tensor::stack(&flags, 0).to_device(tch::Device::Cpu);
    let flags: Vec<bool> = Vec::try_from(&flags)?;
    Ok(flags.iter().position(|&b| b).map(|i| named[i].0.clone()))
}

/// Fails, naming the tensor and `what` holds it, when a tensor of `named` is not finite.
pub fn require_finite(named: &[(String, Tensor)], what: &str) -> Result<()> {
    require_finite_everywhere(named, what, &crate::dist::SingleProcess)
}

/// [`first_nonfinite`] over the parts every process of `c` holds: whether any
/// process found one, and the name where this process did.
pub fn any_nonfinite(
    named: &[(String, Tensor)],
    c: &dyn Collective,
) -> Result<Option<Option<String>>> {
    let here = first_nonfinite(named)?;
    let flag = Tensor::from_slice(&[here.is_some() as i64 as f32]);
    if c.world_size() > 1 {
        c.all_reduce_sum(&flag)?;
    }
    let any = flag.double_value(&[0]) > 0.0;
    Ok(any.then_some(here))
}

/// [`require_finite`] on every process of `c` (this process holds its part
/// of `named`): all fail together, naming the tensor where it was found.
pub fn require_finite_everywhere(
    named: &[(String, Tensor)],
    what: &str,
    c: &dyn Collective,
) -> Result<()> {
    match any_nonfinite(named, c)? {
        None => Ok(()),
        Some(here) => Err(Error::Health(format!(
            "{what}: `{}` holds non-finite values (NaN or Inf)",
            here.as_deref().unwrap_or("a tensor of another process")
        ))),
    }
}

/// Counts optimizer steps skipped in a row across iterations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkippedSteps {
    /// Skipped steps since the last step that was taken.
    pub in_a_row: u32,
}

impl SkippedSteps {
    /// Adds an iteration's steps (their gradient norms, in order); fails when
    /// `max` steps in a row have been skipped, naming what went bad first.
    pub fn add(&mut self, report: &IterationReport, max: u32) -> Result<()> {
        for norm in &report.update.grad_norms {
            match norm.is_finite() {
                true => self.in_a_row = 0,
                false => self.in_a_row += 1,
            }
        }
        if self.in_a_row < max.max(1) {
            return Ok(());
        }
        Err(Error::Health(format!(
            "{} optimizer steps in a row had non-finite gradients (health.max_skipped_steps = {max}); first non-finite quantity of the last iteration: {}",
            self.in_a_row,
            first_bad_quantity(report)
        )))
    }
}

/// The first quantity of an iteration, in the order they are computed, that
/// is not finite.
pub fn first_bad_quantity(r: &IterationReport) -> String {
    let u = &r.update;
    let losses = u.losses.iter().flatten();
    let candidates = [
        (
            r.reward_error
                .as_deref()
                .is_some_and(|e| e.contains("non-finite latents")),
            "the rollout's latents",
        ),
        (r.failed_rewards == r.rewards.len(), "every reward"),
        (
            !(r.advantage.mean.is_finite() && r.advantage.std.is_finite()),
            "the advantages",
        ),
        (
            !(u.ratio_mean.is_finite() || u.transitions == 0),
            "the policy ratios (new log-probabilities)",
        ),
        (losses.clone().any(|l| !l.is_finite()), "the loss"),
        (
            u.grad_norms.iter().any(|g| !g.is_finite()),
            "the gradient norm",
        ),
    ];
    let found = candidates
        .iter()
        .find(|(bad, _)| *bad)
        .map(|(_, what)| *what);
    found.unwrap_or("none before the gradients").to_string()
}

/// Prompt `index` of `prompts`, failing when its embeddings are not finite.
pub fn checked_prompt(prompts: &dyn PromptSet, index: u64) -> Result<PromptEntry> {
    let e = prompts.get(index)?;
    let named = [
        ("text".to_string(), e.text.shallow_clone()),
        ("pooled".to_string(), e.pooled.shallow_clone()),
    ];
    match first_nonfinite(&named)? {
        None => Ok(e),
        Some(which) => Err(Error::Health(format!(
            "prompt {index} ({:?}) of the training set: its {which} embedding holds non-finite values (NaN or Inf); re-encode it",
            e.caption
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::SingleProcess;
    use tch::Kind;

    #[test]
    fn the_first_nonfinite_tensor_is_named() {
        let ok = Tensor::ones([3], (Kind::Float, tch::Device::Cpu));
        let inf = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
        let nan = Tensor::from_slice(&[f32::NAN]).to_kind(Kind::BFloat16);
        let named = |v: Vec<(&str, &Tensor)>| -> Vec<(String, Tensor)> {
            v.into_iter()
                .map(|(n, t)| (n.to_string(), t.shallow_clone()))
                .collect()
        };
        assert_eq!(first_nonfinite(&named(vec![("a", &ok)])).unwrap(), None);
        let both = named(vec![("a", &ok), ("b", &nan), ("c", &inf)]);
        assert_eq!(first_nonfinite(&both).unwrap().as_deref(), Some("b"));
        let err = require_finite(&both, "weights of x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("weights of x: `b` holds non-finite"), "{err}");
        assert_eq!(
            any_nonfinite(&both, &SingleProcess).unwrap(),
            Some(Some("b".into()))
        );
        assert_eq!(any_nonfinite(&[], &SingleProcess).unwrap(), None);
        let err = require_finite_everywhere(&both, "resumed", &SingleProcess);
        let err = err.unwrap_err().to_string();
        assert!(err.contains("resumed: `b` holds non-finite"), "{err}");
    }

    #[test]
    fn the_failed_share_must_be_a_share() {
        let bad = HealthConfig {
            max_failed_reward_share: 0.0,
            ..HealthConfig::default()
        };
        assert_eq!(bad.check().unwrap().0, "max_failed_reward_share");
        assert!(HealthConfig::default().check().is_none());
    }
    fn report(rewards: &[f32], grad_norms: &[f64]) -> IterationReport {
        use crate::grpo::iteration::{StageSeconds, Summary};
        IterationReport {
            rewards: rewards.to_vec(),
            reward_means: Vec::new(),
            reward: Summary::of(rewards),
            failed_rewards: rewards.iter().filter(|r| !r.is_finite()).count(),
            reward_error: None,
            skipped_groups: 0,
            partial_groups: 0,
            zero_variance_groups: 0,
            advantage: Summary::of(&[0.5, -0.5]),
            clamped_advantages: 0,
            update: crate::grpo::update::UpdateStats {
                grad_norms: grad_norms.to_vec(),
                ratio_mean: 1.0,
                transitions: 1,
                ..Default::default()
            },
            seconds: StageSeconds::default(),
            transformer_rows: 0,
        }
    }

    #[test]
    fn skipped_steps_stop_the_run_only_in_a_row() {
        let mut s = SkippedSteps::default();
        let bad = report(&[1.0, 2.0], &[f64::NAN, 0.5, f64::NAN]);
        s.add(&bad, 2).unwrap();
        assert_eq!(s.in_a_row, 1, "a good step in between resets the count");
        let err = s.add(&report(&[1.0, 2.0], &[f64::INFINITY]), 2);
        let err = err.unwrap_err().to_string();
        assert!(err.contains("2 optimizer steps in a row"), "{err}");
        assert!(err.contains("max_skipped_steps = 2"), "{err}");
        assert!(err.contains("the gradient norm"), "{err}");
        let mut s = SkippedSteps::default();
        s.add(&report(&[1.0, 2.0], &[0.1, 0.2]), 1).unwrap();
        assert_eq!(s.in_a_row, 0);
    }

    struct OnePrompt(f32);

    impl PromptSet for OnePrompt {
        fn len(&self) -> u64 {
            1
        }
        fn get(&self, _: u64) -> Result<PromptEntry> {
            Ok(PromptEntry {
                text: Tensor::from_slice(&[1.0f32, self.0]).view([1, 2]),
                pooled: Tensor::ones([2], (Kind::Float, tch::Device::Cpu)),
                caption: "a cat".into(),
            })
        }
    }

    #[test]
    fn a_nonfinite_prompt_embedding_is_named_with_its_caption() {
        assert!(checked_prompt(&OnePrompt(2.0), 0).is_ok());
        let err = checked_prompt(&OnePrompt(f32::NAN), 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("prompt 0 (\"a cat\")"), "{err}");
        assert!(err.contains("text embedding holds non-finite"), "{err}");
    }
}
