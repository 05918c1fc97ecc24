//! `Trainer`: GRPO iterations from a [`TrainConfig`], with checkpoints, exact
//! resume, metrics (`metrics.jsonl` and TensorBoard event files), image grids,
//! the reward curve and fixed-seed evaluation (in [`super::evaluate`]).

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::batch::{Batch, BatchSource};
use super::build::{build_eval_prompts, build_gold_rewards};
pub use super::build::{build_models, build_prompts, build_rewards};
use super::checkpoint::{self, TrainState};
use super::config::TrainConfig;
use super::curve::RewardCurve;
use super::data::DataOrder;
use super::ema::Ema;
use super::evaluate::{
    check_sequence_split, truncate_eval, EvalInputs, EvalPromptSet, EvalRecord, Evaluator,
};
use super::health;
use super::images::ImageWriter;
use super::lock::RunLock;
use super::metrics::{append_line, truncate_lines, Metrics};
use super::tensorboard::{self, EventWriter};
use crate::data::PromptSet;
use crate::dist::fsdp::FullShard;
use crate::dist::{is_writer, Collective, Shard, SingleProcess, Subset};
use crate::error::{Error, Result};
use crate::grpo::iteration::{run_iteration, Iteration, IterationInputs, Stage};
use crate::grpo::{AdamW, NoObserver};
use crate::io::image::grid;
use crate::models::{LatentDecoder, PolicyModel};
use crate::rewards::combine::WeightedSum;
use crate::sampler::{Draws, Schedule};

/// A progress display's callback: `(stage, done, total)`.
pub type StageDisplay = Box<dyn Fn(Stage, usize, usize)>;

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
    /// Something that went wrong in this iteration and did not stop the run.
    pub warning: Option<&'a str>,
}

/// A training run.
///
/// One GRPO iteration of the built-in tiny run (what `dancegrpo demo` trains):
///
/// ```
/// use dancegrpo::train::{Resume, TrainConfig, Trainer};
///
/// let dir = std::env::temp_dir().join(format!("dancegrpo-doc-{}", std::process::id()));
/// let mut cfg = TrainConfig::tiny_demo();
/// cfg.run.iterations = 1;
/// let mut trainer = Trainer::new(cfg, &dir, Resume::Fresh, tch::Device::Cpu)?;
/// let metrics = trainer.step()?;
/// assert_eq!((metrics.iteration, trainer.iteration()), (1, 1));
/// assert!(metrics.reward_mean.is_finite());
/// # drop(trainer);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), dancegrpo::Error>(())
/// ```
pub struct Trainer {
    pub(super) cfg: TrainConfig,
    pub(super) dir: PathBuf,
    pub(super) device: Device,
    pub(super) model: Box<dyn PolicyModel>,
    /// The frozen latent decoder (FLUX: its VAE).
    pub(super) decoder: Box<dyn LatentDecoder>,
    pub(super) reward: WeightedSum,
    optimizer: AdamW,
    pub(super) prompts: Box<dyn PromptSet>,
    order: DataOrder,
    schedule: Schedule,
    pub(super) state: TrainState,
    pub(super) writer: ImageWriter,
    pub(super) ema: Option<Ema>,
    /// Fixed-seed evaluation: its prompts, gold rewards and settings.
    evaluator: Evaluator,
    pub(super) events: Option<EventWriter>,
    collective: Rc<dyn Collective>,
    /// The fully sharded state, when `parallel.sharding = "full"`.
    pub(super) sharded: Option<Rc<FullShard>>,
    stage_report: Option<StageDisplay>,
    skipped: health::SkippedSteps,
    warnings: Vec<String>,
    /// The run directory's lock, held by the writing process for the run's lifetime.
    lock: Option<RunLock>,
    /// The reward curve's series (the writer's).
    curve: RewardCurve,
}

/// Files a fresh run removes when an earlier, never checkpointed run left them.
const RUN_LOGS: [&str; 3] = ["metrics.jsonl", "rewards.txt", "eval.jsonl"];

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
        let mode = cfg.health.memory_check;
        let warning =
            crate::plan::check::check_memory(&cfg, collective.world_size(), device, mode)?;
        let notice = cfg.rollout_batch_notice(collective.world_size());
        if resume == Resume::Latest && !dir.is_dir() {
            let msg = format!("{}: no such run directory to resume", dir.display());
            return Err(Error::Input(msg));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // taken before the directory is read: another run may be writing it
        let lock = match is_writer(collective.as_ref()) {
            true => Some(RunLock::acquire(dir)?),
            false => None,
        };
        let ckpts = dir.join("checkpoints");
        let latest = checkpoint::latest(&ckpts);
        match (resume, &latest) {
            (Resume::Fresh, Some(found)) => {
                return Err(Error::Input(format!(
                    "{} already holds checkpoint {}: resume it or choose another output directory",
                    dir.display(),
                    found.display()
                )))
            }
            (Resume::Latest, None) => {
                return Err(Error::Input(format!(
                    "no complete checkpoint to resume in {}",
                    ckpts.display()
                )))
            }
            _ => {}
        }
        let mut trainer = Self::build(cfg, dir, device, Rc::from(collective))?;
        trainer.lock = lock;
        trainer.warnings.extend(warning.into_iter().chain(notice));
        match &latest {
            Some(found) => trainer.restore(found)?,
            None if trainer.writes() => trainer.clear_logs()?,
            None => {}
        }
        if trainer.writes() {
            trainer.events = trainer.open_events(latest.is_some())?;
            let config = trainer.dir.join("config.toml");
            crate::io::atomic::write_bytes_atomic(&config, trainer.cfg.to_toml().as_bytes())?;
        }
        Ok(trainer)
    }

    /// The run's parts at iteration 0.
    fn build(
        cfg: TrainConfig,
        dir: &Path,
        device: Device,
        collective: Rc<dyn Collective>,
    ) -> Result<Self> {
        crate::precision::set_tf32(cfg.precision.tf32);
        let (model, vae) = build_models(&cfg, device)?;
        if is_writer(collective.as_ref()) {
            super::build::save_built_in_base(&cfg, &model, dir)?;
        }
        health::require_finite(&model.base_parameters(), "the model's transformer weights")?;
        health::require_finite(&vae.decoder_parameters(), "the model's VAE weights")?;
        let (model, sharded) = super::build::shard(model, &cfg, collective.clone())?;
        let origin = dir.join("config.toml");
        check_sequence_split(&cfg, model.as_ref(), &vae, collective.as_ref(), &origin)?;
        let prompts = build_prompts(&cfg, model.as_ref())?;
        Ok(Trainer {
            order: DataOrder::new(cfg.run.seed, prompts.len()),
            prompts,
            evaluator: Evaluator::new(
                &cfg,
                build_eval_prompts(&cfg, model.as_ref())?,
                match is_writer(collective.as_ref()) {
                    true => build_gold_rewards(&cfg, device)?,
                    false => Vec::new(),
                },
            ),
            schedule: Schedule::shifted(cfg.sampler.steps, cfg.sampler.shift),
            reward: build_rewards(&cfg, device)?,
            optimizer: AdamW::new(cfg.adam(), &params(model.as_ref())),
            state: TrainState {
                iteration: 0,
                optimizer_steps: 0,
                data_position: 0,
                first_reward: None,
                skipped_steps_in_a_row: 0,
            },
            writer: ImageWriter::start(cfg.health.on_image_error),
            collective,
            sharded,
            stage_report: None,
            skipped: health::SkippedSteps::default(),
            warnings: Vec::new(),
            lock: None,
            curve: RewardCurve::default(),
            ema: match &cfg.optim.ema {
                Some(e) => Some(Ema::new(e, &model.parameters())?),
                None => None,
            },
            events: None,
            cfg,
            dir: dir.to_path_buf(),
            device,
            model,
            decoder: Box::new(vae),
        })
    }

    /// A fresh run: removes the logs and event files of an earlier run that
    /// never reached a checkpoint.
    fn clear_logs(&self) -> Result<()> {
        for f in RUN_LOGS {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        tensorboard::remove_event_files(&self.dir.join(tensorboard::DIR))
    }

    /// A new TensorBoard event file (when enabled); a resumed run's starts
    /// with `SessionLog START` at its first step, so TensorBoard drops what the
    /// interrupted run logged past the checkpoint.
    fn open_events(&self, resumed: bool) -> Result<Option<EventWriter>> {
        if !self.cfg.run.tensorboard {
            return Ok(None);
        }
        let mut events = EventWriter::create(&self.dir.join(tensorboard::DIR))?;
        let step = match resumed {
            true => self.state.iteration + 1,
            false => 0,
        };
        if resumed {
            events.session_start(step)?;
        }
        let toml = self.cfg.to_toml();
        // indented: a Markdown code block in the Text dashboard
        let text: String = toml.lines().map(|l| format!("    {l}\n")).collect();
        events.text(step, "config", &text)?;
        Ok(Some(events))
    }

    fn restore(&mut self, ckpt: &Path) -> Result<()> {
        checkpoint::load_weights(ckpt, self.model.as_ref())?;
        checkpoint::load_optimizer(ckpt, self.model.as_ref(), &mut self.optimizer)?;
        self.state = checkpoint::load_state(ckpt)?;
        self.skipped.in_a_row = self.state.skipped_steps_in_a_row;
        if let Some(ema) = &mut self.ema {
            checkpoint::load_ema(ckpt, self.model.as_ref(), ema)?;
        }
        let what = format!("checkpoint {}", ckpt.display());
        let c = self.collective.as_ref();
        health::require_finite_everywhere(&self.model.parameters(), &what, c)?;
        health::require_finite_everywhere(&self.optimizer_state(), &what, c)?;
        if !self.writes() {
            return Ok(());
        }
        let n = self.state.iteration as usize;
        truncate_lines(&self.dir.join("metrics.jsonl"), n)?;
        truncate_lines(&self.dir.join("rewards.txt"), n)?;
        truncate_eval(&self.dir.join("eval.jsonl"), self.state.iteration)?;
        self.curve = RewardCurve::read(&self.dir);
        Ok(())
    }

    /// The model being trained.
    pub fn model(&self) -> &dyn PolicyModel {
        self.model.as_ref()
    }

    /// What the set-up found worth saying but not fatal (for the caller to show).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Completed iterations.
    pub fn iteration(&self) -> u64 {
        self.state.iteration
    }

    /// Calls `report(stage, done, total)` as each iteration advances (a progress display).
    pub fn on_stage(&mut self, report: StageDisplay) {
        self.stage_report = Some(report);
    }

    /// Whether this process writes the run's files (rank 0).
    pub fn writes(&self) -> bool {
        is_writer(self.collective.as_ref())
    }

    /// Whether this process takes part in evaluations: the writer, and every
    /// process of a sharded model (whose forward passes are collective) or of
    /// an evaluation shared by `eval.parallel`.
    fn evaluates(&self) -> bool {
        let shares = self.evaluator.shared(self.collective.as_ref());
        self.writes() || self.sharded.is_some() || shares
    }

    /// Trains until `run.iterations`, checkpointing on cadence and at the end;
    /// `on_progress` is called after every iteration.
    pub fn run(&mut self, on_progress: &mut dyn FnMut(&Progress)) -> Result<()> {
        let start = Instant::now();
        let first_here = self.state.iteration;
        let (writes, evaluates) = (self.writes(), self.evaluates());
        if evaluates && self.state.iteration == 0 && !self.dir.join("eval.jsonl").exists() {
            self.evaluate()?;
        }
        while self.state.iteration < self.cfg.run.iterations {
            let metrics = self.step().map_err(|e| self.stopped(e))?;
            let done = self.state.iteration;
            let every = self.cfg.eval.every;
            if evaluates && every > 0 && done % every == 0 && done != self.cfg.run.iterations {
                self.evaluate()?;
            }
            let last = done == self.cfg.run.iterations;
            if done % self.cfg.run.checkpoint_every == 0 || last {
                match self.sharded.is_some() {
                    // every process writes its own part
                    true => self.save()?,
                    false => {
                        let c = self.collective.as_ref();
                        crate::dist::check_in_sync(c, &self.model.parameters())?;
                        if writes {
                            self.save()?;
                        }
                    }
                }
            }
            self.writer.check().map_err(|e| self.stopped(e))?;
            let warning = self.writer.take_warning();
            on_progress(&Progress {
                warning: warning.as_deref(),
                iteration: done,
                total: self.cfg.run.iterations,
                metrics: &metrics,
                first_reward: self.state.first_reward.unwrap_or(metrics.reward_mean),
                seconds_per_iteration: start.elapsed().as_secs_f64() / (done - first_here) as f64,
            });
        }
        if evaluates {
            self.evaluate()?;
        }
        if writes {
            self.write_curve()?;
        }
        self.writer.finish()?;
        // no process reports success before rank 0 has written the last checkpoint
        crate::dist::barrier(self.collective.as_ref())
    }

    /// One GRPO iteration; appends its metrics (rank 0).
    pub fn step(&mut self) -> Result<Metrics> {
        let cfg = &self.cfg;
        let p = cfg.run.prompts_per_iteration as u64;
        let collective = self.collective.clone();
        let shard = Shard::of_rank(
            p as i64 * cfg.sampler.group_size,
            cfg.optim.gradient_accumulation,
            collective.as_ref(),
        );
        let source = BatchSource {
            prompts: self.prompts.as_ref(),
            order: &mut self.order,
            position: self.state.data_position,
            iteration: self.state.iteration,
        };
        let batch = Batch::new(
            cfg,
            source,
            (self.model.as_ref(), self.decoder.as_ref()),
            &shard,
            self.device,
        )?;
        let subset = Subset::new(&batch.seeded, shard.samples().to_vec());
        let draws: &dyn Draws = match batch.per_sample {
            false => &batch.seeded,
            true => &subset,
        };
        let inputs = IterationInputs {
            cond: &batch.cond,
            prompts: &batch.captions,
            draws,
            shard: &shard,
            schedule: &self.schedule,
            latent: batch.latent,
            report: self.stage_report.as_deref(),
        };
        // a sharded model gathers each unit once per iteration (again after
        // every optimizer step), not once per forward
        let pinned = match cfg.parallel.gather {
            crate::dist::Gather::Iteration => self.sharded.as_ref().map(|s| s.pinned()),
            crate::dist::Gather::PerBlock => None,
        };
        let it = run_iteration(
            self.model.as_ref(),
            self.decoder.as_ref(),
            &mut self.reward,
            &mut self.optimizer,
            &inputs,
            &cfg.iteration_config_at(self.state.iteration),
            &mut NoObserver,
        )?;
        drop(pinned);
        self.after_step(it, &shard, p)
    }

    /// An iteration's bookkeeping: health of the new weights, EMA, state,
    /// metrics, the image grid and the skipped-step count.
    fn after_step(&mut self, it: Iteration, shard: &Shard, p: u64) -> Result<Metrics> {
        let after = "the trained weights after the update";
        let c = self.collective.as_ref();
        health::require_finite_everywhere(&self.model.parameters(), after, c)?;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.model.parameters());
        }
        self.state.iteration += 1;
        self.state.data_position += p;
        self.state.optimizer_steps = self.optimizer.steps();
        if it.report.reward.mean.is_finite() {
            self.state.first_reward.get_or_insert(it.report.reward.mean);
        }
        let means = it.report.reward_means.clone();
        let metrics = Metrics::new(self.state.iteration, &it.report, means, p as usize);
        let every = self.cfg.run.image_every;
        if every > 0 && self.state.iteration % every == 0 {
            let images = shard.gather(&it.images.to_kind(Kind::Float))?; // (B, H, W, 3)
            self.write_grid(self.state.iteration, &images.to_kind(Kind::Uint8))?;
        }
        if self.writes() {
            self.record(&metrics)?;
        }
        let max = self.cfg.health.max_skipped_steps;
        self.skipped.add(&it.report, max)?;
        self.state.skipped_steps_in_a_row = self.skipped.in_a_row;
        Ok(metrics)
    }

    /// The optimizer's moments under their checkpoint names.
    fn optimizer_state(&self) -> Vec<(String, Tensor)> {
        let names = self.model.parameters().into_iter().map(|(n, _)| n);
        let (m, v) = self.optimizer.moments();
        names
            .zip(m.iter().zip(v))
            .flat_map(|(n, (m, v))| {
                [
                    (format!("exp_avg.{n}"), m.shallow_clone()),
                    (format!("exp_avg_sq.{n}"), v.shallow_clone()),
                ]
            })
            .collect()
    }

    /// A health error with the iteration it stopped in and the checkpoint to go back to.
    fn stopped(&self, e: Error) -> Error {
        let Error::Health(msg) = e else { return e };
        let last = checkpoint::latest(&self.dir.join("checkpoints"));
        let last = last.map_or("none (nothing was checkpointed)".into(), |p| {
            p.display().to_string()
        });
        Error::Health(format!(
            "run stopped at iteration {}: {msg}; the last good checkpoint is {last}",
            self.state.iteration.max(1)
        ))
    }

    fn record(&mut self, m: &Metrics) -> Result<()> {
        let line = serde_json::to_string(m).expect("serialisable metrics");
        append_line(&self.dir.join("metrics.jsonl"), &line)?;
        append_line(&self.dir.join("rewards.txt"), &format!("{}", m.reward_mean))?;
        self.curve.push_reward(m.reward_mean);
        if let Some(events) = &mut self.events {
            events.scalars(m.iteration, &m.scalars())?;
        }
        Ok(())
    }

    /// `images/iter-N.png` from the iteration's images `(B, H, W, 3)` (rank 0).
    fn write_grid(&mut self, iteration: u64, images: &Tensor) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let dir = self.dir.join("images");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let cols = self.cfg.sampler.group_size.min(8);
        let path = dir.join(format!("iter-{iteration:06}.png"));
        let image = grid(images, cols);
        if let Some(events) = &mut self.events {
            events.image(iteration, "rollout/images", &image)?;
        }
        self.writer.write(path, image)
    }

    fn save(&mut self) -> Result<()> {
        let root = self.dir.join("checkpoints");
        let ema = self.ema.as_ref();
        let model = self.model.as_ref();
        match model.sharded_state() {
            Some(parts) => {
                let c = self.collective.as_ref();
                checkpoint::save_sharded(
                    &root,
                    model,
                    parts,
                    &self.optimizer,
                    ema,
                    &self.state,
                    c,
                )?;
                if !self.writes() {
                    return Ok(());
                }
            }
            None => {
                checkpoint::save(&root, model, &self.optimizer, ema, &self.state)?;
            }
        };
        checkpoint::prune(&root, self.cfg.run.keep_checkpoints)?;
        self.write_curve()
    }

    /// Writes `reward_curve.png`.
    fn write_curve(&mut self) -> Result<()> {
        let image = self.curve.image()?;
        self.writer.write(self.dir.join("reward_curve.png"), image)
    }

    /// The prompt set evaluations draw from, and which one it is.
    pub fn eval_prompts(&self) -> (&dyn PromptSet, EvalPromptSet) {
        self.evaluator.prompt_set(self.prompts.as_ref())
    }

    /// Evaluates the current model; the writer adds `eval/iter-N.png`, a line
    /// of `eval.jsonl`, the `eval/*` TensorBoard summaries and a point of the
    /// reward curve. Returns the line.
    pub fn evaluate(&mut self) -> Result<EvalRecord> {
        let inputs = EvalInputs {
            model: self.model.as_ref(),
            decoder: self.decoder.as_ref(),
            reward: &mut self.reward,
            training: self.prompts.as_ref(),
            sharded: self.sharded.as_ref(),
            collective: self.collective.as_ref(),
            device: self.device,
            iteration: self.state.iteration,
        };
        let (record, image) = self.evaluator.evaluate(inputs)?;
        // every process of a sharded model evaluates; one writes
        if !self.writes() {
            return Ok(record);
        }
        let dir = self.dir.join("eval");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        if let Some(events) = &mut self.events {
            events.scalars(record.iteration, &record.scalars())?;
            events.image(record.iteration, "eval/images", &image)?;
        }
        let name = format!("iter-{:06}.png", record.iteration);
        self.writer.write(dir.join(name), image)?;
        let line = serde_json::to_string(&record).expect("serialisable eval record");
        append_line(&self.dir.join("eval.jsonl"), &line)?;
        self.curve.push_eval(record.iteration, record.reward_mean);
        Ok(record)
    }
}

fn params(model: &dyn PolicyModel) -> Vec<Tensor> {
    model.parameters().into_iter().map(|(_, p)| p).collect()
}
