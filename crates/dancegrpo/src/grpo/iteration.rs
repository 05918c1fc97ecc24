//! One GRPO iteration: rollout, decode, reward, advantages, update, with the
//! seconds spent in each stage and the statistics a user watches.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::update::{grpo_update, UpdateConfig, UpdateInputs, UpdateObserver, UpdateStats};
use super::{advantages, mixed_advantages, AdamW, Grouping, RewardMixing};
use crate::error::{Error, Result};
use crate::models::vae::Vae;
use crate::models::VelocityModel;
use crate::rewards::{scores_to_tensor, Reward, RewardBatch, RewardPart, Score};
use crate::sampler::rollout::{decode, rollout, RolloutSettings};
use crate::sampler::{Conditioning, Draws, Schedule};

/// Settings of an iteration beyond the update's.
#[derive(Debug, Clone, Copy)]
pub struct IterationConfig {
    /// Rollout noise level and model batch.
    pub rollout: RolloutSettings,
    /// VAE batch.
    pub decode_batch: i64,
    /// How advantages are normalised.
    pub grouping: Grouping,
    /// Advantage clamp.
    pub adv_clip_max: f64,
    /// How the parts of a combined reward ([`Reward::last_parts`]) make the
    /// advantages: their weighted score sum, or their weighted advantages.
    pub mixing: RewardMixing,
    /// The update.
    pub update: UpdateConfig,
}

/// Seconds per stage.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageSeconds {
    /// SDE sampling of every sample.
    pub rollout: f64,
    /// VAE decoding.
    pub decode: f64,
    /// Reward scoring.
    pub reward: f64,
    /// Advantages and the GRPO update.
    pub update: f64,
}

/// Mean, standard deviation (unbiased), min and max of the finite values.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Mean.
    pub mean: f64,
    /// Unbiased standard deviation.
    pub std: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

impl Summary {
    /// Summary of the finite values of `v`.
    pub fn of(v: &[f32]) -> Summary {
        let x: Vec<f64> = v
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| x as f64)
            .collect();
        if x.is_empty() {
            return Summary::default();
        }
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        Summary {
            mean,
            std: var.sqrt(),
            min: x.iter().cloned().fold(f64::INFINITY, f64::min),
            max: x.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// What an iteration did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IterationReport {
    /// Reward per sample (NaN where the reward failed).
    pub rewards: Vec<f32>,
    /// Summary of the rewards.
    pub reward: Summary,
    /// Items the reward could not score.
    pub failed_rewards: usize,
    /// Groups skipped because a reward failed.
    pub skipped_groups: usize,
    /// Groups whose rewards were all equal (zero advantage).
    pub zero_variance_groups: usize,
    /// Summary of the clamped advantages.
    pub advantage: Summary,
    /// Advantages changed by the clamp.
    pub clamped_advantages: usize,
    /// The update's losses, ratios and grad norms.
    pub update: UpdateStats,
    /// Seconds per stage.
    pub seconds: StageSeconds,
}

/// The iteration's outputs besides the report.
pub struct Iteration {
    /// The report.
    pub report: IterationReport,
    /// The decoded uint8 images `(B, H, W, 3)`.
    pub images: Tensor,
}

/// Everything one iteration reads besides the model and optimizer.
pub struct IterationInputs<'a> {
    /// Prompt conditioning (P prompts, groups of G).
    pub cond: &'a Conditioning,
    /// The prompt texts, one per prompt (for the reward).
    pub prompts: &'a [String],
    /// The random draws.
    pub draws: &'a dyn Draws,
    /// The sampling schedule.
    pub schedule: &'a Schedule,
    /// Latent shape `[c, h, w]`.
    pub latent: [i64; 3],
}

/// Runs one GRPO iteration on `model`.
pub fn run_iteration(
    model: &dyn VelocityModel,
    vae: &Vae,
    reward: &mut dyn Reward,
    optimizer: &mut AdamW,
    inputs: &IterationInputs,
    cfg: &IterationConfig,
    observer: &mut dyn UpdateObserver,
) -> Result<Iteration> {
    let cond = inputs.cond;
    let device = cond.device();
    let [_, h, w] = inputs.latent;
    let mut seconds = StageSeconds::default();
    let clock = Instant::now();
    let ro = rollout(
        model,
        cond,
        inputs.draws,
        inputs.schedule,
        inputs.latent,
        &cfg.rollout,
        device,
    )?;
    seconds.rollout = lap(clock, device);
    let clock = Instant::now();
    let (_, images) = decode(vae, &ro.pred_x0, h, w, cfg.decode_batch)?;
    seconds.decode = lap(clock, device);
    let clock = Instant::now();
    let sample_prompts = sample_prompts(inputs.prompts, cond)?;
    let scores = reward.score(&RewardBatch {
        images: &images,
        prompts: &sample_prompts,
    })?;
    seconds.reward = lap(clock, device);
    let clock = Instant::now();
    let rewards = scores_to_tensor(&scores);
    let adv = match cfg.mixing {
        RewardMixing::Reward => advantages(&rewards, cfg.grouping, cfg.adv_clip_max)?,
        RewardMixing::Advantage => {
            let parts = reward.last_parts().unwrap_or_else(|| {
                vec![RewardPart {
                    name: reward.name().to_string(),
                    weight: 1.0,
                    scores: scores.clone(),
                }]
            });
            let parts: Vec<(f64, Tensor)> = parts
                .iter()
                .map(|p| (p.weight, scores_to_tensor(&p.scores)))
                .collect();
            mixed_advantages(&parts, cfg.grouping, cfg.adv_clip_max)?
        }
    };
    let update_inputs = UpdateInputs {
        rollout: &ro,
        advantages: &adv.clamped.to_device(device),
        cond,
        schedule: inputs.schedule,
        draws: inputs.draws,
    };
    let update = grpo_update(model, optimizer, &update_inputs, &cfg.update, observer)?;
    seconds.update = lap(clock, device);
    let rewards: Vec<f32> = Vec::try_from(&rewards)?;
    let clamped: Vec<f32> = Vec::try_from(&adv.clamped)?;
    let raw: Vec<f32> = Vec::try_from(&adv.raw)?;
    let report = IterationReport {
        reward: Summary::of(&rewards),
        failed_rewards: scores
            .iter()
            .filter(|s| matches!(s, Score::Failed(_)))
            .count(),
        skipped_groups: adv.skipped_groups,
        zero_variance_groups: zero_variance_groups(&rewards, cfg.grouping),
        advantage: Summary::of(&clamped),
        clamped_advantages: raw.iter().zip(&clamped).filter(|(a, b)| a != b).count(),
        rewards,
        update,
        seconds,
    };
    Ok(Iteration {
        report,
        images: images.to_device(Device::Cpu).to_kind(Kind::Uint8),
    })
}

/// Seconds since `start`, after the device has finished its queued work.
fn lap(start: Instant, device: Device) -> f64 {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    start.elapsed().as_secs_f64()
}

fn sample_prompts(prompts: &[String], cond: &Conditioning) -> Result<Vec<String>> {
    let g = cond.group();
    let p = cond.samples() / g;
    if prompts.len() as i64 != p {
        return Err(Error::Input(format!(
            "{} prompt texts for {p} prompts of conditioning",
            prompts.len()
        )));
    }
    Ok((0..cond.samples())
        .map(|b| prompts[(b / g) as usize].clone())
        .collect())
}

fn zero_variance_groups(rewards: &[f32], grouping: Grouping) -> usize {
    let size = match grouping {
        Grouping::PerPrompt { size } => size as usize,
        Grouping::Global => rewards.len().max(1),
    };
    rewards
        .chunks(size)
        .filter(|g| g.iter().all(|r| r.is_finite() && *r == g[0]))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_and_zero_variance_groups() {
        let s = Summary::of(&[1.0, 2.0, 3.0, f32::NAN]);
        assert_eq!((s.mean, s.std, s.min, s.max), (2.0, 1.0, 1.0, 3.0));
        let r = [0.5, 0.5, 1.0, 2.0, f32::NAN, f32::NAN];
        assert_eq!(zero_variance_groups(&r, Grouping::PerPrompt { size: 2 }), 1);
        assert_eq!(zero_variance_groups(&r, Grouping::Global), 0);
    }
}
