//! One GRPO iteration: rollout, decode, reward, advantages, update, with the
//! seconds spent in each stage and the statistics a user watches.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::update::{
    first_window_plan, grpo_update, rollout_windows, UpdateConfig, UpdateInputs, UpdateObserver,
    UpdateStats,
};
use super::{advantages, mixed_advantages, AdamW, Advantages, Grouping, RewardMixing};
use crate::dist::Shard;
use crate::error::{Error, Result};
use crate::models::{LatentDecoder, VelocityModel};
use crate::rewards::{scores_to_tensor, Reward, RewardBatch, RewardPart, Score};
use crate::sampler::rollout::{decode, rollout_capturing, RolloutSettings};
use crate::sampler::{Conditioning, Draws, Rollout, Schedule};

/// Settings of an iteration beyond the update's.
#[derive(Debug, Clone)]
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
    /// The iteration stops with an error, before training, when at least this
    /// share of its rewards failed (1: only when all did).
    pub max_failed_reward_share: f64,
    /// The update.
    pub update: UpdateConfig,
}

/// The stages of an iteration, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// SDE sampling (progress in samples).
    Rollout,
    /// VAE decoding.
    Decode,
    /// Reward scoring.
    Reward,
    /// The GRPO update (progress in trained transitions).
    Update,
}

impl Stage {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Rollout => "rollout",
            Stage::Decode => "decode",
            Stage::Reward => "reward",
            Stage::Update => "update",
        }
    }
}

/// Called as an iteration advances: `(stage, done, total)` in the stage's units.
pub type StageReport<'a> = &'a dyn Fn(Stage, usize, usize);

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

/// Mean, standard deviation (unbiased), min and max of the finite values
/// (NaN, written `null`, where there is none: a gap, never a 0).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
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
        Summary::of_f64(&v.iter().map(|&x| x as f64).collect::<Vec<_>>())
    }

    /// [`Summary::of`] for float64 values.
    pub fn of_f64(v: &[f64]) -> Summary {
        let x: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        if x.is_empty() {
            let nan = f64::NAN;
            return Summary {
                mean: nan,
                std: nan,
                min: nan,
                max: nan,
            };
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
    /// Reward per sample of the iteration, all processes (NaN where the reward failed).
    pub rewards: Vec<f32>,
    /// Each reward's mean over the samples it scored (name, mean): the parts
    /// of a combined reward, else the one reward.
    pub reward_means: Vec<(String, f64)>,
    /// Summary of the rewards.
    pub reward: Summary,
    /// Items the reward could not score.
    pub failed_rewards: usize,
    /// The last failure of this process's samples (`sample i: why`), if any.
    pub reward_error: Option<String>,
    /// Groups without advantages: fewer than 2 of their rewards are valid.
    pub skipped_groups: usize,
    /// Groups normalised over their valid rewards only (some failed).
    pub partial_groups: usize,
    /// Groups whose rewards were all equal (zero advantage).
    pub zero_variance_groups: usize,
    /// Summary of the clamped advantages.
    pub advantage: Summary,
    /// Advantages changed by the clamp.
    pub clamped_advantages: usize,
    /// The update's losses, ratios and grad norms.
    pub update: UpdateStats,
    /// Rows the transformer evaluated in the rollout and the update, all processes.
    pub transformer_rows: u64,
    /// Seconds per stage.
    pub seconds: StageSeconds,
}

/// The iteration's outputs besides the report.
pub struct Iteration {
    /// The report.
    pub report: IterationReport,
    /// The decoded uint8 images `(n, H, W, 3)` of this process's samples.
    pub images: Tensor,
}

/// Everything one iteration reads besides the model and optimizer.
pub struct IterationInputs<'a> {
    /// Prompt conditioning of this process's samples.
    pub cond: &'a Conditioning,
    /// The prompt texts, one per prompt of `cond` (for the reward).
    pub prompts: &'a [String],
    /// The random draws of this process's samples.
    pub draws: &'a dyn Draws,
    /// Which samples of the iteration this process has ([`Shard::whole`] for one process).
    pub shard: &'a Shard<'a>,
    /// The sampling schedule.
    pub schedule: &'a Schedule,
    /// Latent shape `[c, h, w]`.
    pub latent: [i64; 3],
    /// Progress of the stages (for a display), if wanted.
    pub report: Option<StageReport<'a>>,
}

/// Runs one GRPO iteration on `model`.
pub fn run_iteration(
    model: &dyn VelocityModel,
    decoder: &dyn LatentDecoder,
    reward: &mut dyn Reward,
    optimizer: &mut AdamW,
    inputs: &IterationInputs,
    cfg: &IterationConfig,
    observer: &mut dyn UpdateObserver,
) -> Result<Iteration> {
    let device = inputs.cond.device();
    let mut seconds = StageSeconds::default();
    let report = inputs.report.unwrap_or(&|_, _, _| {});
    let clock = Instant::now();
    let ro = rollout_stage(model, inputs, cfg, report)?;
    seconds.rollout = lap(clock, device);
    report(Stage::Decode, 0, 1);
    let clock = Instant::now();
    let x0 = &ro.pred_x0;
    let (_, images) = decode(decoder, model.layout(), x0, inputs.latent, cfg.decode_batch)?;
    seconds.decode = lap(clock, device);
    let clock = Instant::now();
    report(Stage::Reward, 0, 1);
    let sample_prompts = sample_prompts(inputs.prompts, inputs.cond)?;
    let mut scores = reward.score(&RewardBatch {
        images: &images,
        prompts: &sample_prompts,
    })?;
    seconds.reward = lap(clock, device);
    let clock = Instant::now();
    let scored = score_groups(reward, x0, &mut scores, inputs.shard, cfg)?;
    let advantages = inputs
        .shard
        .local_rows(&scored.adv.clamped)
        .to_device(device);
    let stage_inputs = (inputs, &ro, &advantages);
    let update = update_stage(model, optimizer, stage_inputs, cfg, (observer, report))?;
    seconds.update = lap(clock, device);
    // rows of the rollout and the update, summed over the processes
    let rows = Tensor::from_slice(&[ro.model_rows as f64 + update.local_model_rows as f64]);
    let rows = rows.to_device(device);
    inputs.shard.collective().all_reduce_sum(&rows)?;
    let mut report = scored.report(update, seconds, cfg.grouping)?;
    report.transformer_rows = rows.double_value(&[0]) as u64;
    Ok(Iteration {
        report,
        images: images.to_device(Device::Cpu).to_kind(Kind::Uint8),
    })
}

/// The rollout of this process's samples, cut where accumulation windows
/// end and keeping the first window's graphs when the update asks for them.
fn rollout_stage(
    model: &dyn VelocityModel,
    inputs: &IterationInputs,
    cfg: &IterationConfig,
    report: StageReport,
) -> Result<Rollout> {
    let plan = first_window_plan(
        &cfg.update,
        inputs.schedule,
        inputs.draws,
        inputs.shard,
        cfg.rollout.batch,
    )?;
    if !plan.is_empty() && !model.plain_backward() {
        return Err(Error::Input(
            "first_window = \"rollout_graphs\" needs a model whose backward pass is an ordinary one: \
             no activation checkpointing, no sharded weights"
                .into(),
        ));
    }
    let settings = RolloutSettings {
        window_samples: rollout_windows(&cfg.update, inputs.shard),
        ..cfg.rollout.clone()
    };
    rollout_capturing(
        model,
        (inputs.cond, inputs.draws, inputs.schedule, inputs.latent),
        &settings,
        &plan,
        inputs.cond.device(),
        &|done, total| report(Stage::Rollout, done, total),
    )
}

/// The update over the rollout `ro` with the local samples' clamped
/// `advantages`, counting trained transitions for the progress `report`.
fn update_stage(
    model: &dyn VelocityModel,
    optimizer: &mut AdamW,
    (inputs, ro, advantages): (&IterationInputs, &Rollout, &Tensor),
    cfg: &IterationConfig,
    (observer, report): (&mut dyn UpdateObserver, StageReport),
) -> Result<UpdateStats> {
    let update_inputs = UpdateInputs {
        rollout: ro,
        shard: inputs.shard,
        advantages,
        cond: inputs.cond,
        schedule: inputs.schedule,
        draws: inputs.draws,
    };
    let (_, t) = cfg.update.trained(inputs.schedule.steps())?;
    let mut counting = Counting {
        inner: observer,
        report,
        done: 0,
        total: (inputs.cond.samples() * t) as usize,
    };
    grpo_update(model, optimizer, &update_inputs, &cfg.update, &mut counting)
}

/// An iteration's rewards over all processes and their advantages.
struct Scored {
    /// Weighted rewards `(B,)` (NaN: failed).
    rewards: Tensor,
    /// Each reward's `(name, weight, scores (B,))`.
    parts: Vec<(String, f64, Tensor)>,
    /// The last failure's message, if any item failed.
    reward_error: Option<String>,
    /// Group-relative advantages of `rewards` (or of the parts, mixed).
    adv: Advantages,
}

/// Gathers this process's `scores` into the batch's rewards (an image from
/// non-finite latents `x0` fails, whatever its pixels score), stops the run
/// past `cfg.max_failed_reward_share`, and computes the advantages.
fn score_groups(
    reward: &dyn Reward,
    x0: &Tensor,
    scores: &mut [Score],
    shard: &Shard,
    cfg: &IterationConfig,
) -> Result<Scored> {
    let broken = fail_nonfinite(x0, scores)?; // (b,) local
    let broken = shard.gather(&broken)?.to_kind(Kind::Bool); // (B,)
    let parts: Vec<(String, f64, Tensor)> =
        (reward_parts(reward, scores, shard)?.into_iter()) // global (B,) each
            .map(|(name, w, t)| (name, w, t.masked_fill(&broken, f64::NAN)))
            .collect();
    let rewards = shard.gather(&scores_to_tensor(scores))?; // (B,)
    let reward_error = last_failure(scores, shard);
    let share = cfg.max_failed_reward_share;
    check_rewards(&rewards, reward.name(), reward_error.as_deref(), share)?;
    let adv = match cfg.mixing {
        RewardMixing::Reward => advantages(&rewards, cfg.grouping, cfg.adv_clip_max)?,
        RewardMixing::Advantage => {
            let weighted: Vec<(f64, Tensor)> = (parts.iter())
                .map(|(_, w, t)| (*w, t.shallow_clone()))
                .collect();
            mixed_advantages(&weighted, cfg.grouping, cfg.adv_clip_max)?
        }
    };
    Ok(Scored {
        rewards,
        parts,
        reward_error,
        adv,
    })
}

impl Scored {
    /// The iteration's report with the update's statistics and stage times.
    fn report(
        self,
        update: UpdateStats,
        seconds: StageSeconds,
        grouping: Grouping,
    ) -> Result<IterationReport> {
        let rewards: Vec<f32> = Vec::try_from(&self.rewards)?;
        let clamped: Vec<f32> = Vec::try_from(&self.adv.clamped)?;
        let raw: Vec<f32> = Vec::try_from(&self.adv.raw)?;
        let reward_means = (self.parts.iter())
            .map(|(name, _, t)| Ok((name.clone(), Summary::of(&Vec::<f32>::try_from(t)?).mean)))
            .collect::<Result<Vec<_>>>()?;
        Ok(IterationReport {
            reward: Summary::of(&rewards),
            failed_rewards: rewards.iter().filter(|r| !r.is_finite()).count(),
            reward_error: self.reward_error,
            skipped_groups: self.adv.skipped_groups,
            partial_groups: self.adv.partial_groups,
            zero_variance_groups: zero_variance_groups(&rewards, grouping),
            advantage: Summary::of(&clamped),
            clamped_advantages: raw.iter().zip(&clamped).filter(|(a, b)| a != b).count(),
            rewards,
            reward_means,
            update,
            seconds,
            transformer_rows: 0,
        })
    }
}

/// Forwards to `inner` and reports the update's progress in transitions.
struct Counting<'a, 'b> {
    inner: &'a mut dyn UpdateObserver,
    report: StageReport<'b>,
    done: usize,
    total: usize,
}

impl UpdateObserver for Counting<'_, '_> {
    fn transitions(&mut self, batch: &super::update::TransitionBatch) -> Result<()> {
        // a tree's node stands for its leaves' transitions
        self.done += (batch.active.iter())
            .map(|&r| batch.leaves[r as usize] as usize)
            .sum::<usize>();
        (self.report)(Stage::Update, self.done, self.total);
        self.inner.transitions(batch)
    }
    fn before_step(&mut self, step: u64, params: &[(String, Tensor)]) -> Result<()> {
        self.inner.before_step(step, params)
    }
    fn after_step(&mut self, step: u64, params: &[(String, Tensor)]) -> Result<()> {
        self.inner.after_step(step, params)
    }
}

/// Each part of `reward` (name, weight, scores of every sample `(B,)`).
fn reward_parts(
    reward: &dyn Reward,
    scores: &[Score],
    shard: &Shard,
) -> Result<Vec<(String, f64, Tensor)>> {
    let parts = reward.last_parts().unwrap_or_else(|| {
        vec![RewardPart {
            name: reward.name().to_string(),
            weight: 1.0,
            scores: scores.to_vec(),
        }]
    });
    parts
        .into_iter()
        .map(|p| {
            Ok((
                p.name,
                p.weight,
                shard.gather(&scores_to_tensor(&p.scores))?,
            ))
        })
        .collect()
}

/// Marks as failed each sample whose final latents `(b, L, c)` hold a
/// non-finite value; returns the float mask `(b,)` (1: broken).
fn fail_nonfinite(latents: &Tensor, scores: &mut [Score]) -> Result<Tensor> {
    let b = latents.size()[0];
    let broken = latents
        .isfinite()
        .logical_not()
        .reshape([b, -1])
        .any_dim(1, false); // (b,)
    let flags: Vec<bool> = Vec::try_from(&broken.to_device(Device::Cpu))?;
    for (s, bad) in scores.iter_mut().zip(&flags) {
        if *bad {
            *s = Score::Failed("non-finite latents (the model produced NaN or Inf)".into());
        }
    }
    Ok(broken.to_device(Device::Cpu).to_kind(Kind::Float))
}

/// `sample i: why` of the last failed local sample (`i` its index in the iteration).
fn last_failure(scores: &[Score], shard: &Shard) -> Option<String> {
    scores
        .iter()
        .zip(shard.samples())
        .rev()
        .find_map(|(s, i)| match s {
            Score::Failed(why) => Some(format!("sample {i}: {why}")),
            Score::Value(_) => None,
        })
}

/// Fails when more than the allowed share of an iteration's `rewards` failed
/// (non-finite), naming the reward `name`, the share and `last_error` (this
/// process's last failure).
pub fn check_rewards(
    rewards: &Tensor,
    name: &str,
    last_error: Option<&str>,
    max_share: f64,
) -> Result<()> {
    let n = rewards.numel().max(1);
    let failed = rewards
        .isfinite()
        .logical_not()
        .sum(Kind::Int64)
        .int64_value(&[]) as usize;
    if (failed as f64) < max_share * n as f64 {
        return Ok(());
    }
    let why = last_error.unwrap_or("(the failures were on other processes: see their logs)");
    Err(Error::Health(format!(
        "{failed} of {n} rewards of `{name}` failed (health.max_failed_reward_share = {max_share}); last error: {why}"
    )))
}

/// Seconds since `start`, after the device has finished its queued work.
fn lap(start: Instant, device: Device) -> f64 {
    crate::process::seconds_since(start, device)
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
        let none = Summary::of(&[f32::NAN, f32::INFINITY]);
        assert!([none.mean, none.std, none.min, none.max]
            .iter()
            .all(|x| x.is_nan()));
        let r = [0.5, 0.5, 1.0, 2.0, f32::NAN, f32::NAN];
        assert_eq!(zero_variance_groups(&r, Grouping::PerPrompt { size: 2 }), 1);
        assert_eq!(zero_variance_groups(&r, Grouping::Global), 0);
    }

    #[test]
    fn reward_failures_stop_at_the_configured_share() {
        let r = Tensor::from_slice(&[1.0f32, f32::NAN, f32::NAN, 2.0]);
        assert!(check_rewards(&r, "jpeg", Some("x"), 1.0).is_ok());
        let err = check_rewards(&r, "remote", Some("remote: HTTP 500"), 0.5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 of 4 rewards of `remote` failed") && err.ends_with("remote: HTTP 500"),
            "{err}"
        );
        let all = Tensor::from_slice(&[f32::NAN, f32::INFINITY]);
        assert!(check_rewards(&all, "jpeg", None, 1.0)
            .unwrap_err()
            .to_string()
            .contains("other processes"));
    }
}
