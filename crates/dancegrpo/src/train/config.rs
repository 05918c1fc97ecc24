//! The training configuration: one TOML file (plus `key=value` overrides),
//! validated at start with errors that name the field, and written resolved
//! into the run directory. Defaults are the reference's FLUX recipe.

use super::health::HealthConfig;
use crate::dist::ParallelConfig;
use crate::precision::PrecisionConfig;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::grpo::{FirstWindow, Guard, LrSchedule, RewardMixing, Trainable, UpdateBatching};
use crate::models::lora::LoraConfig;
use crate::models::ActivationCheckpointing;
use crate::rewards::jpeg::{JpegObjective, JpegSubsampling};
use crate::sampler::draws::{InitNoise, NoisePrecision};
use crate::sampler::tree::Tree;
use crate::sampler::CachePolicy;
use crate::sampler::{SdeForm, SdeWindow};

/// Where the base model comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSource {
    /// A FLUX.1 directory in the diffusers layout (`transformer/`, `vae/`).
    Dir {
        /// The model directory.
        path: PathBuf,
    },
    /// The built-in tiny FLUX and VAE, seeded (no download; for demos and tests).
    Tiny {
        /// Seed of the weights.
        seed: u64,
    },
    /// A model directory's architectures (`transformer/config.json`,
    /// `vae/config.json`) with random weights drawn on the device: a real-sized
    /// model without its weights, for benchmarks and acceptance runs.
    Random {
        /// The directory holding the two `config.json`.
        path: PathBuf,
        /// Seed of the weights.
        #[serde(default)]
        seed: u64,
    },
}

fn synthetic_text_len() -> i64 {
    32
}

/// Where the prompts come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataSource {
    /// Seeded synthetic prompt embeddings for the tiny model (no text encoders).
    Synthetic {
        /// Number of distinct prompts.
        prompts: u64,
        /// Seed of the embeddings.
        seed: u64,
        /// Text tokens per prompt (T5 length).
        #[serde(default = "synthetic_text_len")]
        text_len: i64,
    },
    /// A dataset written by `dancegrpo preprocess` (see [`crate::data`]).
    Dataset {
        /// The dataset directory.
        path: PathBuf,
    },
    /// What the reference's `preprocess_flux_embedding.py` writes
    /// (`videos2caption.json` and `.pt` tensors), read in place one prompt at a
    /// time (see [`crate::data::reference`]).
    Reference {
        /// The directory holding `videos2caption.json`.
        path: PathBuf,
    },
}

pub use crate::rewards::spec::RewardSpec;

/// The SDE sampler used for rollouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// Image height in pixels (a multiple of 16).
    pub height: i64,
    /// Image width in pixels (a multiple of 16).
    pub width: i64,
    /// Denoising steps.
    pub steps: i64,
    /// The stochastic step: `"dance"` (DanceGRPO's, the default), `"flow_grpo"`
    /// (Flow-GRPO's SDE), `"cps"` (coefficients-preserving) or `"ode"` (Euler,
    /// nothing to train).
    pub sde: SdeForm,
    /// The step's noise level: DanceGRPO's `eta` (0.3 in its scripts), Flow-GRPO's
    /// and CPS's `noise_level` (0.7 in flow_grpo's configs).
    pub eta: f64,
    /// MixGRPO's mixed sampling: only the window's steps are stochastic and
    /// trained, the others are ODE steps (absent: every step, DanceGRPO).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<SdeWindow>,
    /// Tree rollouts (BranchGRPO-style): each group's samples share their
    /// trajectory until branch steps and split there (`branches` children
    /// before each step of `at`); the model runs once per shared state, and
    /// the update trains each shared transition once, with its leaves' mean
    /// advantage (absent: every sample its own trajectory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tree: Option<Tree>,
    /// Refused when set: feature caching changes the velocities, and a
    /// rollout's log-probabilities must be the model's own. Caching is for
    /// ODE sampling: `eval.cache`, `dancegrpo generate --cache`,
    /// `dancegrpo bench generate --cache`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CachePolicy>,
    /// Schedule shift.
    pub shift: f64,
    /// Samples per prompt (G).
    pub group_size: i64,
    /// How the initial noise is shared.
    pub init_noise: InitNoise,
    /// Precision of the initial noise.
    pub noise_precision: NoisePrecision,
    /// Guidance value fed to guidance-distilled models.
    pub guidance: f64,
    /// Samples per model call in rollouts. With `optim.update_batching =
    /// "rollout"` a batch also ends where an accumulation window ends (a
    /// process's share of `optim.gradient_accumulation`): the update
    /// recomputes in these batches, and a batch holding two windows would be
    /// evaluated once for each (`train` says so when it cuts a batch).
    pub rollout_batch: i64,
    /// Images per VAE call.
    pub decode_batch: i64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            height: 720,
            width: 720,
            steps: 16,
            sde: SdeForm::Dance,
            eta: 0.3,
            window: None,
            tree: None,
            cache: None,
            shift: 3.0,
            group_size: 12,
            init_noise: InitNoise::SharedPerIteration,
            noise_precision: NoisePrecision::Bf16,
            guidance: 3.5,
            rollout_batch: 1,
            decode_batch: 1,
        }
    }
}

/// Advantage normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageGrouping {
    /// Per prompt group (the reference's `use_group`).
    PerPrompt,
    /// Over the whole batch.
    Global,
}

/// The GRPO objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Fraction of the trainable transitions trained per sample.
    pub timestep_fraction: f64,
    /// Which transitions are trainable.
    pub trainable: Trainable,
    /// PPO clip range.
    pub clip_range: f64,
    /// Weight `beta` of the KL term toward the reference policy, the base
    /// model (0: none, the reference's objective). Needs `[optim.lora]`: the
    /// reference is then the model with its adapters off, no second copy.
    pub kl_beta: f64,
    /// GRPO-Guard's corrections of the clipped ratio: `none` (default),
    /// `ratio_norm`, `grad_reweight` or `full` (both).
    pub guard: Guard,
    /// Advantage clamp.
    pub adv_clip_max: f64,
    /// Advantage normalisation.
    pub grouping: AdvantageGrouping,
    /// How several rewards combine: `reward` (weighted score sum) or
    /// `advantage` (weighted sum of per-reward advantages).
    pub reward_mixing: RewardMixing,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            timestep_fraction: 0.6,
            trainable: Trainable::AllButLast,
            clip_range: 1e-4,
            kl_beta: 0.0,
            guard: Guard::None,
            adv_clip_max: 5.0,
            grouping: AdvantageGrouping::PerPrompt,
            reward_mixing: RewardMixing::Reward,
        }
    }
}

/// Optimizer and schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Base learning rate.
    pub learning_rate: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam betas.
    pub betas: (f64, f64),
    /// Adam epsilon.
    pub eps: f64,
    /// Gradient-norm bound.
    pub max_grad_norm: f64,
    /// Samples whose gradients make one optimizer step, over all processes.
    pub gradient_accumulation: i64,
    /// Learning-rate schedule.
    pub lr_schedule: LrSchedule,
    /// Per-block activation checkpointing in the update.
    pub activation_checkpointing: ActivationCheckpointing,
    /// Model batches the update recomputes transitions in.
    pub update_batching: UpdateBatching,
    /// With `update_batching = "window"`: at most this many transitions per
    /// model batch (a window's trained timesteps are split to fit; at least one
    /// per sample). Absent: the whole window in one batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_update_rows: Option<i64>,
    /// Where the first accumulation window's velocities come from:
    /// `"recompute"` (default) or `"rollout_graphs"` (the rollout keeps them
    /// with gradients; needs `activation_checkpointing = "off"`).
    pub first_window: FirstWindow,
    /// Train LoRA adapters instead of every weight (absent: full fine-tune).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// Keep an exponential moving average of the trained weights (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema: Option<super::ema::EmaConfig>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            learning_rate: 1e-5,
            weight_decay: 1e-4,
            betas: (0.9, 0.999),
            eps: 1e-8,
            max_grad_norm: 1.0,
            gradient_accumulation: 12,
            lr_schedule: LrSchedule::default(),
            activation_checkpointing: ActivationCheckpointing::PerBlock,
            update_batching: UpdateBatching::Rollout,
            max_update_rows: None,
            first_window: FirstWindow::Recompute,
            lora: None,
            ema: None,
        }
    }
}

/// Length, cadence and seeds of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Seed of every random draw (data order, noise, permutations).
    pub seed: u64,
    /// Iterations to train.
    pub iterations: u64,
    /// Prompts per iteration over all processes.
    pub prompts_per_iteration: i64,
    /// Write a checkpoint every this many iterations (and at the end).
    pub checkpoint_every: u64,
    /// Write a rollout image grid every this many iterations (0: never).
    pub image_every: u64,
    /// Keep this many newest checkpoints (0: all).
    pub keep_checkpoints: usize,
    /// Write TensorBoard event files into `<run>/tensorboard/`.
    pub tensorboard: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            seed: 42,
            iterations: 300,
            prompts_per_iteration: 2,
            checkpoint_every: 40,
            image_every: 10,
            keep_checkpoints: 0,
            tensorboard: true,
        }
    }
}

/// Fixed-seed evaluation during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate every this many iterations (0: only before training and at the end).
    pub every: u64,
    /// Number of evaluation prompts (the first ones of the evaluation prompt set).
    pub prompts: u64,
    /// Rewards that score the evaluation images but are never trained on.
    pub gold_rewards: Vec<RewardSpec>,
    /// A held-out prompt set to evaluate on, shaped like `[data]` (absent: the
    /// first `prompts` prompts of the training set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<DataSource>,
    /// Feature caching of the evaluation's ODE sampling (absent: none):
    /// `{kind = "blocks", step_start, step_interval, step_end, block_start,
    /// block_end}` or `{kind = "steps", threshold}` (see `bench generate` for
    /// what each costs in quality).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CachePolicy>,
    /// Which processes of a multi-process run compute the evaluation.
    pub parallel: EvalParallel,
}

/// Which processes of a multi-process run compute the fixed-seed evaluation.
/// (A fully sharded model is always evaluated by every process, whose
/// forward passes are collective.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalParallel {
    /// Process 0 alone, the others waiting (the reference's way).
    #[default]
    Writer,
    /// Every process shares each forward pass (Ulysses sequence parallelism:
    /// image tokens and attention heads split over the processes; both must
    /// divide by the process count). Not with a block cache (`eval.cache`
    /// of kind `steps` works). The images equal one process's up to the
    /// attention's summation order.
    Sequence,
    /// Every process samples a contiguous share of the prompts; process 0
    /// gathers the images and scores them (N processes: about N times faster
    /// for many prompts). The images equal one process's where the model is
    /// batch-invariant (the CPU). Not with a whole-step `eval.cache` (its skip
    /// decision is one statistic over all the prompts).
    Prompts,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every: 0,
            prompts: 4,
            gold_rewards: Vec::new(),
            data: None,
            cache: None,
            parallel: EvalParallel::Writer,
        }
    }
}

/// The whole training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The base model.
    pub model: ModelSource,
    /// The prompts.
    pub data: DataSource,
    /// Rewards with weights.
    pub rewards: Vec<RewardSpec>,
    /// Rollout sampler.
    #[serde(default)]
    pub sampler: SamplerConfig,
    /// GRPO objective.
    #[serde(default)]
    pub grpo: GrpoConfig,
    /// Optimizer.
    #[serde(default)]
    pub optim: OptimConfig,
    /// Run length and cadence.
    #[serde(default)]
    pub run: RunConfig,
    /// Evaluation cadence and gold rewards.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Numeric precision (`fp32`, or `bf16` mixed precision).
    #[serde(default)]
    pub precision: PrecisionConfig,
    /// How processes share the trained state.
    #[serde(default)]
    pub parallel: ParallelConfig,
    /// When the run stops instead of going on wrong.
    #[serde(default)]
    pub health: HealthConfig,
}

/// Quantities derived from the global configuration for a number of processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Derived {
    /// Processes.
    pub world_size: i64,
    /// Samples per iteration over all processes (`prompts_per_iteration * G`).
    pub samples_per_iteration: i64,
    /// Samples each process rolls out and trains per iteration (the first
    /// processes take one more when they do not divide evenly).
    pub samples_per_process: i64,
    /// Optimizer steps per iteration.
    pub optimizer_steps_per_iteration: i64,
    /// Samples whose gradients make one optimizer step, over all processes
    /// (`optim.gradient_accumulation`).
    pub effective_batch: i64,
    /// Samples each process accumulates per optimizer step.
    pub accumulation_per_process: i64,
}

fn field_err(origin: &Path, field: &str, msg: impl Into<String>) -> Error {
    Error::config(origin, field, msg)
}

impl TrainConfig {
    /// The built-in tiny CPU run (`dancegrpo train` with no config): the seeded
    /// tiny FLUX, synthetic prompts and JPEG compressibility, a few minutes on 2 cores.
    pub fn tiny_demo() -> Self {
        TrainConfig {
            model: ModelSource::Tiny { seed: 0 },
            data: DataSource::Synthetic {
                prompts: 16,
                seed: 0,
                text_len: synthetic_text_len(),
            },
            rewards: vec![RewardSpec::Jpeg {
                objective: JpegObjective::Compressibility,
                quality: 95,
                subsampling: JpegSubsampling::default(),
                weight: 1.0,
            }],
            sampler: SamplerConfig {
                height: 64,
                width: 64,
                steps: 8,
                group_size: 8,
                rollout_batch: 8,
                decode_batch: 8,
                ..SamplerConfig::default()
            },
            grpo: GrpoConfig {
                clip_range: 0.2,
                ..GrpoConfig::default()
            },
            optim: OptimConfig {
                learning_rate: 1e-3,
                gradient_accumulation: 16,
                activation_checkpointing: ActivationCheckpointing::Off,
                ..OptimConfig::default()
            },
            run: RunConfig {
                seed: 0,
                iterations: 150,
                prompts_per_iteration: 2,
                checkpoint_every: 25,
                image_every: 25,
                keep_checkpoints: 2,
                tensorboard: true,
            },
            eval: EvalConfig::default(),
            precision: PrecisionConfig::default(),
            parallel: ParallelConfig::default(),
            health: HealthConfig::default(),
        }
    }

    /// Reads `path` (TOML), applies `overrides` (`section.key=value`, the value
    /// parsed as TOML, else taken as a string) and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: toml::Value = toml::from_str(&text).map_err(|e| Error::Toml {
            path: path.to_path_buf(),
            msg: e.to_string().trim_end().to_string(),
        })?;
        Self::from_value(value, overrides, path)
    }

    /// This configuration with `overrides` applied, validated (`origin` names it in errors).
    pub fn with_overrides(&self, overrides: &[String], origin: &Path) -> Result<Self> {
        let value = toml::Value::try_from(self).expect("serialisable config");
        Self::from_value(value, overrides, origin)
    }

    fn from_value(mut value: toml::Value, overrides: &[String], origin: &Path) -> Result<Self> {
        for o in overrides {
            apply_override(&mut value, o, origin)?;
        }
        let cfg: TrainConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let msg = e.inner().to_string();
            let field = match missing_field(&msg) {
                Some(name) if e.path().to_string() == "." => name.to_string(),
                Some(name) => format!("{}.{name}", e.path()),
                None => e.path().to_string(),
            };
            field_err(origin, &field, msg)
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// The configuration as TOML (what is written into the run directory).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("serialisable config")
    }

    /// Checks that `world_size` processes can share the configuration's work:
    /// every optimizer step's samples split evenly among them.
    pub fn check_world(&self, world_size: i64) -> Result<()> {
        let ga = self.optim.gradient_accumulation;
        if world_size < 1 || ga % world_size != 0 {
            return Err(field_err(
                Path::new("config"),
                "optim.gradient_accumulation",
                format!("{ga} samples per optimizer step cannot be shared by {world_size} processes (must be a multiple of {world_size})"),
            ));
        }
        let root = self.sampler.tree.as_ref().map_or(1, |t| t.root_size());
        if (ga / world_size) % root != 0 {
            return Err(field_err(
                Path::new("config"),
                "optim.gradient_accumulation",
                format!("{ga} samples per optimizer step over {world_size} processes leave {} per process, not whole roots of the tree's {root} leaves (a multiple of {} is needed)", ga / world_size, root * world_size),
            ));
        }
        Ok(())
    }

    /// Per-process quantities for `world_size` processes: the configuration's
    /// sizes are global, so the run is the same whatever the process count.
    pub fn derived(&self, world_size: i64) -> Derived {
        let w = world_size.max(1);
        let samples = self.run.prompts_per_iteration * self.sampler.group_size;
        let ga = self.optim.gradient_accumulation.max(1);
        Derived {
            world_size: w,
            samples_per_iteration: samples,
            samples_per_process: crate::dist::shard_samples(samples, ga, w, 0).len() as i64,
            optimizer_steps_per_iteration: samples / ga,
            effective_batch: ga,
            accumulation_per_process: ga / w,
        }
    }
}

/// The field named by serde's "missing field `name`" message (the path of
/// such an error stops at the table that lacks it).
fn missing_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `")?.split('`').next()
}

/// Sets `key=value` in `root` (nested tables created as needed).
fn apply_override(root: &mut toml::Value, spec: &str, origin: &Path) -> Result<()> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| field_err(origin, spec, "an override is `section.key=value`"))?;
    let key = key.trim();
    let raw = raw.trim();
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let mut node = root;
    for part in &parts[..parts.len() - 1] {
        let table = node
            .as_table_mut()
            .ok_or_else(|| field_err(origin, key, "not a table"))?;
        node = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    let table = node
        .as_table_mut()
        .ok_or_else(|| field_err(origin, key, "not a table"))?;
    let last = parts[parts.len() - 1];
    // Another variant of a tagged section (`data.kind=dataset`) starts from an
    // empty table: the old variant's fields do not belong to it.
    if last == "kind" && parts.len() > 1 && table.get("kind") != Some(&parsed) {
        table.clear();
    }
    table.insert(last.to_string(), parsed);
    Ok(())
}
