//! `Trainer`: GRPO iterations from a [`TrainConfig`], with checkpoints, exact
//! resume, metrics, image grids, the reward curve and fixed-seed evaluation.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::checkpoint::{self, TrainState};
use super::config::{AdvantageGrouping, DataSource, ModelSource, TrainConfig};
use super::data::{stack, DataOrder, PromptSet, SyntheticPrompts};
use super::ema::Ema;
use super::metrics::{append_line, truncate_lines, ImageWriter, Metrics};
use super::plot::line_plot;
use crate::dist::{is_writer, Collective, Shard, SingleProcess, Subset};
use crate::error::{Error, Result};
use crate::grpo::iteration::{run_iteration, IterationConfig, IterationInputs};
use crate::grpo::{AdamW, AdamWConfig, Grouping, NoObserver, UpdateConfig};
use crate::io::image::grid;
use crate::models::flux::{FluxConfig, FluxTransformer};
use crate::models::vae::{packing, Vae, VaeConfig};
use crate::models::VelocityModel;
use crate::rewards::combine::WeightedSum;
use crate::rewards::spec::RewardSpec;
use crate::rewards::{scores_to_tensor, Reward, RewardBatch, Score};
use crate::sampler::generate::{generate, OdeSettings};
use crate::sampler::rollout::RolloutSettings;
use crate::sampler::{Conditioning, Draws, Schedule, Seeded};

/// Whether a run starts fresh or continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// A new run (the directory must not hold checkpoints).
    Fresh,
    /// Continue from the newest complete checkpoint (error if there is none).
    Latest,
}

/// Progress after an iteration, for the caller's display.
pub struct Progress<'a> {
    /// The iteration just finished (1-based).
    pub iteration: u64,
    /// Total iterations of the run.
    pub total: u64,
    /// Its metrics.
    pub metrics: &'a Metrics,
    /// Mean reward of the first iteration.
    pub first_reward: f64,
    /// Seconds per iteration in this process so far.
    pub seconds_per_iteration: f64,
}

/// A training run.
pub struct Trainer {
    cfg: TrainConfig,
    dir: PathBuf,
    device: Device,
    model: FluxTransformer,
    vae: Vae,
    reward: WeightedSum,
    optimizer: AdamW,
    prompts: Box<dyn PromptSet>,
    order: DataOrder,
    schedule: Schedule,
    state: TrainState,
    writer: ImageWriter,
    ema: Option<Ema>,
    gold: Vec<Box<dyn Reward>>,
    collective: Box<dyn Collective>,
}

impl Trainer {
    /// Sets up the run in `dir` on `device` (fresh, or resumed from its newest checkpoint).
    pub fn new(cfg: TrainConfig, dir: &Path, resume: Resume, device: Device) -> Result<Self> {
        Self::with_collective(cfg, dir, resume, device, Box::new(SingleProcess))
    }

    /// [`Trainer::new`] as one of the processes of `collective`: each process
    /// rolls out and trains its share of every iteration's samples
    /// ([`crate::dist::shard_samples`]), gradients are summed over processes
    /// before each optimizer step, and only rank 0 writes files.
    pub fn with_collective(
        cfg: TrainConfig,
        dir: &Path,
        resume: Resume,
        device: Device,
        collective: Box<dyn Collective>,
    ) -> Result<Self> {
        cfg.check_world(collective.world_size())?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let ckpts = dir.join("checkpoints");
        let latest = checkpoint::latest(&ckpts);
        let (model, vae) = build_models(&cfg, device)?;
        let mut trainer = Trainer {
            prompts: build_prompts(&cfg, &model)?,
            order: DataOrder::new(cfg.run.seed, 1),
            schedule: Schedule::shifted(cfg.sampler.steps, cfg.sampler.shift),
            reward: build_rewards(&cfg, device)?,
            optimizer: AdamW::new(adam(&cfg), &params(&model)),
            state: TrainState {
                iteration: 0,
                optimizer_steps: 0,
                data_position: 0,
                first_reward: None,
            },
            writer: ImageWriter::start(),
            gold: match is_writer(collective.as_ref()) {
                true => build_gold_rewards(&cfg, device)?,
                false => Vec::new(),
            },
            collective,
            ema: match &cfg.optim.ema {
                Some(e) => Some(Ema::new(e, &model.parameters())?),
                None => None,
            },
            cfg,
            dir: dir.to_path_buf(),
            device,
            model,
            vae,
        };
        trainer.order = DataOrder::new(trainer.cfg.run.seed, trainer.prompts.len());
        match (resume, latest) {
            (Resume::Fresh, Some(found)) => Err(Error::Input(format!(
                "{} already holds checkpoint {}: resume it (--resume) or choose another output directory",
                dir.display(),
                found.display()
            ))),
            (Resume::Latest, None) => Err(Error::Input(format!(
                "no complete checkpoint to resume in {}",
                ckpts.display()
            ))),
            (Resume::Latest, Some(found)) => {
                trainer.restore(&found)?;
                Ok(trainer)
            }
            (Resume::Fresh, None) => {
                if trainer.writes() {
                    for f in ["metrics.jsonl", "rewards.txt", "eval.jsonl"] {
                        let _ = std::fs::remove_file(dir.join(f));
                    }
                }
                Ok(trainer)
            }
        }
        .and_then(|t| {
            if t.writes() {
                let toml = t.cfg.to_toml();
                crate::io::atomic::write_bytes_atomic(&t.dir.join("config.toml"), toml.as_bytes())?;
            }
            Ok(t)
        })
    }

    fn restore(&mut self, ckpt: &Path) -> Result<()> {
        checkpoint::load_weights(ckpt, &self.model)?;
        checkpoint::load_optimizer(ckpt, &self.model, &mut self.optimizer)?;
        self.state = checkpoint::load_state(ckpt)?;
        if let Some(ema) = &mut self.ema {
            ema.load(&ckpt.join("ema.safetensors"))?;
        }
        if !self.writes() {
            return Ok(());
        }
        let n = self.state.iteration as usize;
        truncate_lines(&self.dir.join("metrics.jsonl"), n)?;
        truncate_lines(&self.dir.join("rewards.txt"), n)?;
        truncate_eval(&self.dir.join("eval.jsonl"), self.state.iteration)?;
        Ok(())
    }

    /// The model being trained.
    pub fn model(&self) -> &FluxTransformer {
        &self.model
    }

    /// Completed iterations.
    pub fn iteration(&self) -> u64 {
        self.state.iteration
    }

    /// Whether this process writes the run's files (rank 0).
    pub fn writes(&self) -> bool {
        is_writer(self.collective.as_ref())
    }

    /// Trains until `run.iterations`, checkpointing on cadence and at the end;
    /// `on_progress` is called after every iteration.
    pub fn run(&mut self, on_progress: &mut dyn FnMut(&Progress)) -> Result<()> {
        let start = Instant::now();
        let first_here = self.state.iteration;
        let writes = self.writes();
        if writes && self.state.iteration == 0 && !self.dir.join("eval.jsonl").exists() {
            self.evaluate()?;
        }
        while self.state.iteration < self.cfg.run.iterations {
            let metrics = self.step()?;
            let done = self.state.iteration;
            let every = self.cfg.eval.every;
            if writes && every > 0 && done % every == 0 && done != self.cfg.run.iterations {
                self.evaluate()?;
            }
            let last = done == self.cfg.run.iterations;
            if done % self.cfg.run.checkpoint_every == 0 || last {
                let c = self.collective.as_ref();
                crate::dist::check_in_sync(c, &self.model.parameters())?;
                if writes {
                    self.save()?;
                }
            }
            on_progress(&Progress {
                iteration: done,
                total: self.cfg.run.iterations,
                metrics: &metrics,
                first_reward: self.state.first_reward.unwrap_or(metrics.reward_mean),
                seconds_per_iteration: start.elapsed().as_secs_f64() / (done - first_here) as f64,
            });
        }
        if writes {
            self.evaluate()?;
            self.write_curve()?;
        }
        self.writer.finish()?;
        // no process reports success before rank 0 has written the last checkpoint
        crate::dist::barrier(self.collective.as_ref())
    }

    /// One GRPO iteration; appends its metrics (rank 0).
    pub fn step(&mut self) -> Result<Metrics> {
        let (cfg, dev) = (&self.cfg, self.device);
        let p = cfg.run.prompts_per_iteration as u64;
        let g = cfg.sampler.group_size;
        let positions: Vec<u64> =
            (self.state.data_position..self.state.data_position + p).collect();
        let shard = Shard::of_rank(
            p as i64 * g,
            cfg.optim.gradient_accumulation,
            self.collective.as_ref(),
        );
        // one conditioning row per prompt (groups of G), or per local sample
        let (rows, group): (Vec<usize>, i64) = match shard.samples().len() as i64 == shard.total() {
            true => ((0..p as usize).collect(), g),
            false => (
                shard.samples().iter().map(|&s| (s / g) as usize).collect(),
                1,
            ),
        };
        let entries = rows
            .iter()
            .map(|&i| self.prompts.get(self.order.index(positions[i])))
            .collect::<Result<Vec<_>>>()?;
        let (text, pooled) = stack(&entries);
        let (h, w) = (cfg.sampler.height / 8, cfg.sampler.width / 8);
        let cond = Conditioning::new(
            text.to_device(dev),
            pooled.to_device(dev),
            packing::text_ids(text.size()[1], dev),
            packing::image_ids(h, w, dev),
            self.model
                .config()
                .guidance_embeds
                .then_some(cfg.sampler.guidance),
            group,
        )?;
        let captions: Vec<String> = entries.iter().map(|e| e.caption.clone()).collect();
        let seeded = Seeded {
            seed: cfg.run.seed,
            iteration: self.state.iteration,
            prompt_ids: positions,
            group: g,
            init: cfg.sampler.init_noise,
            precision: cfg.sampler.noise_precision,
        };
        let subset = Subset::new(&seeded, shard.samples().to_vec());
        let draws: &dyn Draws = if group == g { &seeded } else { &subset };
        let inputs = IterationInputs {
            cond: &cond,
            prompts: &captions,
            draws,
            shard: &shard,
            schedule: &self.schedule,
            latent: [16, h, w],
        };
        let icfg = iteration_config(cfg);
        let it = run_iteration(
            &self.model,
            &self.vae,
            &mut self.reward,
            &mut self.optimizer,
            &inputs,
            &icfg,
            &mut NoObserver,
        )?;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.model.parameters());
        }
        self.state.iteration += 1;
        self.state.data_position += p;
        self.state.optimizer_steps = self.optimizer.steps();
        self.state.first_reward.get_or_insert(it.report.reward.mean);
        let means = it.report.reward_means.clone();
        let metrics = Metrics::new(self.state.iteration, &it.report, means, p as usize);
        let every = self.cfg.run.image_every;
        if every > 0 && self.state.iteration % every == 0 {
            let images = shard
                .gather(&it.images.to_kind(Kind::Float))?
                .to_kind(Kind::Uint8);
            self.write_grid(self.state.iteration, &images)?;
        }
        if self.writes() {
            self.record(&metrics)?;
        }
        Ok(metrics)
    }

    fn record(&mut self, m: &Metrics) -> Result<()> {
        let line = serde_json::to_string(m).expect("serialisable metrics");
        append_line(&self.dir.join("metrics.jsonl"), &line)?;
        append_line(&self.dir.join("rewards.txt"), &format!("{}", m.reward_mean))
    }

    /// `images/iter-N.png` from the iteration's images `(B, H, W, 3)` (rank 0).
    fn write_grid(&self, iteration: u64, images: &Tensor) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let dir = self.dir.join("images");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let cols = self.cfg.sampler.group_size.min(8);
        let path = dir.join(format!("iter-{iteration:06}.png"));
        self.writer.write(path, grid(images, cols));
        Ok(())
    }

    fn save(&mut self) -> Result<()> {
        let root = self.dir.join("checkpoints");
        let ema = self.ema.as_ref();
        checkpoint::save(&root, &self.model, &self.optimizer, ema, &self.state)?;
        checkpoint::prune(&root, self.cfg.run.keep_checkpoints)?;
        self.write_curve()
    }

    /// Writes `reward_curve.png` from `rewards.txt`.
    fn write_curve(&self) -> Result<()> {
        let path = self.dir.join("rewards.txt");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let pts: Vec<(f64, f64)> = text
            .lines()
            .enumerate()
            .filter_map(|(i, l)| l.trim().parse::<f64>().ok().map(|y| (i as f64 + 1.0, y)))
            .collect();
        let smooth = moving_average(&pts, 5);
        let img = line_plot(&[(pts, [150, 180, 230]), (smooth, [20, 60, 200])], 480, 240);
        self.writer.write(self.dir.join("reward_curve.png"), img);
        Ok(())
    }

    /// Deterministic ODE samples of fixed evaluation prompts with fixed noise,
    /// scored by the training rewards and the gold rewards: `eval/iter-N.png`
    /// and a line of `eval.jsonl`.
    pub fn evaluate(&mut self) -> Result<f64> {
        let n = self.prompts.len().min(self.cfg.eval.prompts.max(1));
        let entries = (0..n)
            .map(|i| self.prompts.get(i))
            .collect::<Result<Vec<_>>>()?;
        let (text, pooled) = stack(&entries);
        let (h, w) = (self.cfg.sampler.height / 8, self.cfg.sampler.width / 8);
        let noise = crate::rng::Philox::for_stream(self.cfg.run.seed, "eval/noise")
            .normal_tensor(&[n as i64, 16, h, w]);
        let settings = OdeSettings {
            steps: self.cfg.sampler.steps,
            shift: self.cfg.sampler.shift,
            guidance: self
                .model
                .config()
                .guidance_embeds
                .then_some(self.cfg.sampler.guidance),
        };
        let images = generate(
            &self.model,
            &self.vae,
            &text.to_device(self.device),
            &pooled.to_device(self.device),
            &noise.to_device(self.device),
            &settings,
        )?;
        let captions: Vec<String> = entries.iter().map(|e| e.caption.clone()).collect();
        let scores = self.reward.score(&RewardBatch {
            images: &images,
            prompts: &captions,
        })?;
        let mean_of = |scores: &[Score]| {
            scores_to_tensor(scores)
                .nanmean(None::<&[i64]>, false, None::<Kind>)
                .double_value(&[])
        };
        let mean = mean_of(&scores);
        let batch = RewardBatch {
            images: &images,
            prompts: &captions,
        };
        let mut gold = serde_json::Map::new();
        for reward in &mut self.gold {
            let scores = reward.score(&batch)?;
            gold.insert(reward.name().to_string(), mean_of(&scores).into());
        }
        let dir = self.dir.join("eval");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        self.writer.write(
            dir.join(format!("iter-{:06}.png", self.state.iteration)),
            grid(&images, n as i64),
        );
        let line = serde_json::json!({"iteration": self.state.iteration, "reward_mean": mean, "gold": gold});
        append_line(&self.dir.join("eval.jsonl"), &line.to_string())?;
        Ok(mean)
    }
}

/// Keeps the lines of `eval.jsonl` up to iteration `last` (after a resume).
fn truncate_eval(path: &Path, last: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["iteration"].as_u64())
                .is_some_and(|i| i <= last)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::io::atomic::write_bytes_atomic(path, kept.as_bytes())
}

/// The evaluation-only rewards of a configuration.
fn build_gold_rewards(cfg: &TrainConfig, device: Device) -> Result<Vec<Box<dyn Reward>>> {
    let built = build_specs(&cfg.eval.gold_rewards, "eval.gold_rewards", device)?;
    Ok(built.into_iter().map(|(reward, _)| reward).collect())
}

/// Builds each spec of `specs` with its weight; errors name `<field>[i].<source field>`.
fn build_specs(
    specs: &[RewardSpec],
    field: &str,
    device: Device,
) -> Result<Vec<(Box<dyn Reward>, f64)>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let reward = spec.build(device).map_err(|e| {
                let name = format!("{field}[{i}].{}", spec.source_field());
                Error::config(field, &name, e.to_string())
            })?;
            Ok((reward, spec.weight()))
        })
        .collect()
}

fn moving_average(pts: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    (0..pts.len())
        .map(|i| {
            let lo = i.saturating_sub(k - 1);
            let w = &pts[lo..=i];
            (
                pts[i].0,
                w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64,
            )
        })
        .collect()
}

fn params(model: &FluxTransformer) -> Vec<Tensor> {
    model.parameters().into_iter().map(|(_, p)| p).collect()
}

fn adam(cfg: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        betas: cfg.optim.betas,
        eps: cfg.optim.eps,
        weight_decay: cfg.optim.weight_decay,
    }
}

fn iteration_config(cfg: &TrainConfig) -> IterationConfig {
    IterationConfig {
        rollout: RolloutSettings {
            eta: cfg.sampler.eta,
            batch: cfg.sampler.rollout_batch,
        },
        decode_batch: cfg.sampler.decode_batch,
        grouping: match cfg.grpo.grouping {
            AdvantageGrouping::PerPrompt => Grouping::PerPrompt {
                size: cfg.sampler.group_size,
            },
            AdvantageGrouping::Global => Grouping::Global,
        },
        adv_clip_max: cfg.grpo.adv_clip_max,
        mixing: cfg.grpo.reward_mixing,
        update: UpdateConfig {
            eta: cfg.sampler.eta,
            clip_range: cfg.grpo.clip_range,
            timestep_fraction: cfg.grpo.timestep_fraction,
            trainable: cfg.grpo.trainable,
            grad_accum: cfg.optim.gradient_accumulation,
            max_grad_norm: cfg.optim.max_grad_norm,
            learning_rate: cfg.optim.learning_rate,
            lr_schedule: cfg.optim.lr_schedule,
            batching: cfg.optim.update_batching,
        },
    }
}

/// The transformer and VAE a configuration names (base weights), on `device`.
pub fn build_models(cfg: &TrainConfig, device: Device) -> Result<(FluxTransformer, Vae)> {
    let (mut model, vae) = match &cfg.model {
        ModelSource::Tiny { seed } => (
            FluxTransformer::new(
                FluxConfig::tiny(),
                crate::weights::Source::Seeded(*seed),
                Kind::Float,
                device,
            )?,
            Vae::new(
                VaeConfig::tiny(),
                crate::weights::Source::Seeded(seed + 1),
                Kind::Float,
                device,
            )?,
        ),
        ModelSource::Dir { path } => (
            FluxTransformer::from_dir(&path.join("transformer"), Kind::Float, device)?,
            Vae::from_dir(&path.join("vae"), Kind::Float, device)?,
        ),
    };
    model.set_checkpointing(cfg.optim.activation_checkpointing);
    if let Some(lora) = &cfg.optim.lora {
        model.attach_lora(lora, cfg.run.seed)?;
    }
    Ok((model, vae))
}

/// The prompt set a configuration names.
pub fn build_prompts(cfg: &TrainConfig, model: &FluxTransformer) -> Result<Box<dyn PromptSet>> {
    match &cfg.data {
        DataSource::Synthetic { prompts, seed } => {
            if *prompts == 0 {
                return Err(Error::config("config", "data.prompts", "must be >= 1"));
            }
            Ok(Box::new(SyntheticPrompts {
                count: *prompts,
                seed: *seed,
                text_len: 32,
                text_dim: model.config().joint_attention_dim,
                pooled_dim: model.config().pooled_projection_dim,
            }))
        }
        DataSource::Dataset { path } => {
            let data = crate::data::EmbeddingDataset::open(path)
                .map_err(|e| Error::config("config", "data.path", e.to_string()))?;
            let (info, cfg) = (data.info(), model.config());
            if info.text_dim != cfg.joint_attention_dim
                || info.pooled_dim != cfg.pooled_projection_dim
            {
                return Err(Error::config(
                    "config",
                    "data.path",
                    format!(
                        "{}: embeddings of width {} (text) and {} (pooled) do not fit the model's joint_attention_dim {} and pooled_projection_dim {}",
                        path.display(),
                        info.text_dim,
                        info.pooled_dim,
                        cfg.joint_attention_dim,
                        cfg.pooled_projection_dim
                    ),
                ));
            }
            Ok(Box::new(data))
        }
    }
}

/// The weighted rewards a configuration names, their models on `device`. A
/// reward that cannot be built is an error naming its field (`rewards[i].path`).
pub fn build_rewards(cfg: &TrainConfig, device: Device) -> Result<WeightedSum> {
    Ok(WeightedSum::new(build_specs(
        &cfg.rewards,
        "rewards",
        device,
    )?))
}
