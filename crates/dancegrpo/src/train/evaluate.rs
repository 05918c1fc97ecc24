//! Fixed-seed evaluation during training: deterministic ODE samples of fixed
//! prompts with fixed noise, scored by the training rewards and by the gold
//! rewards that are never trained on. The prompts are the first `eval.prompts`
//! of the held-out set `[eval.data]` when there is one, else of the training set.

use std::path::Path;
use std::rc::Rc;

use serde::Serialize;
use tch::{Device, Tensor};

use super::config::{EvalParallel, TrainConfig};
use crate::data::{stack, PromptSet};
use crate::dist::fsdp::FullShard;
use crate::dist::{gather_rows, is_writer, Collective, Gather};
use crate::error::{Error, Result};
use crate::io::image::grid;
use crate::models::sequence::SequenceParallel;
use crate::models::{LatentDecoder, PolicyModel, VelocityModel};
use crate::rewards::combine::WeightedSum;
use crate::rewards::{mean_score, Reward, RewardBatch};
use crate::sampler::generate::{generate, OdeSettings};

/// Which prompts an evaluation used (recorded in each line of `eval.jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalPromptSet {
    /// The first prompts of the training set (`[data]`; no `[eval.data]`).
    Training,
    /// The held-out set `[eval.data]`.
    HeldOut,
}

/// One line of `eval.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRecord {
    /// Completed training iterations when evaluated (0: before training).
    pub iteration: u64,
    /// Mean of the training reward over the evaluation images.
    pub reward_mean: f64,
    /// Mean of each gold reward, by name.
    pub gold: serde_json::Map<String, serde_json::Value>,
    /// Where the prompts came from.
    pub prompt_set: EvalPromptSet,
    /// How many prompts were evaluated.
    pub prompts: u64,
}

impl EvalRecord {
    /// The scalars of this evaluation under TensorBoard tags
    /// (`eval/reward_mean`, `eval/gold/<name>`).
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let gold = self
            .gold
            .iter()
            .filter_map(|(name, v)| v.as_f64().map(|x| (format!("eval/gold/{name}"), x)));
        std::iter::once(("eval/reward_mean".to_string(), self.reward_mean))
            .chain(gold)
            .collect()
    }
}

/// Fixed-seed evaluation's own parts: the held-out prompt set (if any), the
/// gold rewards and the settings it samples with.
pub struct Evaluator {
    /// `[eval.data]`; without it the training set's first prompts are used.
    held_out: Option<Box<dyn PromptSet>>,
    /// Rewards that score the evaluation images but are never trained on.
    gold: Vec<Box<dyn Reward>>,
    /// How many prompts (`eval.prompts`).
    prompts: u64,
    /// Seed of the fixed noise (`run.seed`).
    seed: u64,
    /// Image size `(height, width)`.
    size: (i64, i64),
    /// The deterministic sampler's settings (`guidance` as the config gives it).
    ode: OdeSettings,
    /// When a sharded model is gathered.
    gather: Gather,
    /// Which processes compute it.
    parallel: EvalParallel,
}

/// What one evaluation borrows from the run.
pub struct EvalInputs<'a> {
    /// The model being trained.
    pub model: &'a dyn PolicyModel,
    /// Its latent decoder.
    pub decoder: &'a dyn LatentDecoder,
    /// The training reward.
    pub reward: &'a mut WeightedSum,
    /// The training prompt set (used without `[eval.data]`).
    pub training: &'a dyn PromptSet,
    /// The fully sharded state, when there is one.
    pub sharded: Option<&'a Rc<FullShard>>,
    /// The run's processes (every one of them evaluates under
    /// `eval.parallel = "sequence"` or a sharded model).
    pub collective: &'a dyn Collective,
    /// Where the model computes.
    pub device: Device,
    /// Completed training iterations.
    pub iteration: u64,
}

impl Evaluator {
    /// The evaluation `cfg` describes, over `held_out` prompts (or the
    /// training set's) with the `gold` rewards.
    pub fn new(
        cfg: &TrainConfig,
        held_out: Option<Box<dyn PromptSet>>,
        gold: Vec<Box<dyn Reward>>,
    ) -> Self {
        let s = &cfg.sampler;
        Evaluator {
            held_out,
            gold,
            prompts: cfg.eval.prompts.max(1),
            seed: cfg.run.seed,
            size: (s.height, s.width),
            ode: OdeSettings {
                steps: s.steps,
                shift: s.shift,
                guidance: Some(s.guidance),
                cache: cfg.eval.cache.clone(),
            },
            gather: cfg.parallel.gather,
            parallel: cfg.eval.parallel,
        }
    }

    /// Whether the processes of `c` share every forward pass of an evaluation.
    pub fn shares_forwards(&self, c: &dyn Collective) -> bool {
        self.parallel == EvalParallel::Sequence && c.world_size() > 1
    }

    /// Whether every process of `c` takes part in an evaluation (`eval.parallel`).
    pub fn shared(&self, c: &dyn Collective) -> bool {
        self.parallel != EvalParallel::Writer && c.world_size() > 1
    }

    /// The prompt set evaluations draw from (given the training set), and which one it is.
    pub fn prompt_set<'a>(
        &'a self,
        training: &'a dyn PromptSet,
    ) -> (&'a dyn PromptSet, EvalPromptSet) {
        match &self.held_out {
            Some(set) => (set.as_ref(), EvalPromptSet::HeldOut),
            None => (training, EvalPromptSet::Training),
        }
    }

    /// Samples the evaluation prompts with the fixed noise and scores them:
    /// the record and the image grid (uint8 `(H, W, 3)`, one row). Under
    /// `eval.parallel = "prompts"` process 0 gathers the images. Only process
    /// 0 scores: the other processes' records hold no reward (NaN).
    pub fn evaluate(&mut self, inp: EvalInputs) -> Result<(EvalRecord, Tensor)> {
        let (set, prompt_set) = self.prompt_set(inp.training);
        let n = set.len().min(self.prompts);
        let c = inp.collective;
        let share = match (self.parallel, c.world_size() > 1) {
            (EvalParallel::Prompts, true) => Some(prompt_share(n, c)),
            _ => None,
        };
        let rows: Vec<u64> = share.as_ref().map_or((0..n).collect(), |(r, _)| r.clone());
        let (images, mut captions) = self.sample(&inp, set, &rows)?; // (rows, H, W, 3)
        let images = match &share {
            None => images,
            Some((rows, own)) => {
                let ids: Vec<i64> = rows[..*own].iter().map(|&i| i as i64).collect();
                let mine = images.narrow(0, 0, *own as i64).to_kind(tch::Kind::Float);
                gather_rows(c, &mine, &ids, n as i64)?.to_kind(tch::Kind::Uint8)
            }
        }; // (n, H, W, 3)

        // only the writer scores: the other processes' records are not kept
        // (a remote reward gets one request, not one per process)
        let (reward_mean, gold) = match (&share, is_writer(c)) {
            (_, false) => (f64::NAN, serde_json::Map::new()),
            (None, true) => self.score(inp.reward, &images, &captions)?,
            (Some(_), true) => {
                // process 0 scores every prompt's image: their captions
                captions = (0..n)
                    .map(|i| Ok(set.get(i)?.caption))
                    .collect::<Result<Vec<_>>>()?;
                self.score(inp.reward, &images, &captions)?
            }
        };
        let record = EvalRecord {
            iteration: inp.iteration,
            reward_mean,
            gold,
            prompt_set,
            prompts: n,
        };
        Ok((record, grid(&images, n as i64)))
    }

    /// The images (uint8 `(rows, H, W, 3)`) of the prompts `rows` of `set`
    /// from their fixed noise, and their captions.
    fn sample(
        &self,
        inp: &EvalInputs,
        set: &dyn PromptSet,
        rows: &[u64],
    ) -> Result<(Tensor, Vec<String>)> {
        let n = set.len().min(self.prompts);
        let entries = rows
            .iter()
            .map(|&i| set.get(i))
            .collect::<Result<Vec<_>>>()?;
        let (text, pooled) = stack(&entries); // (rows, Lt, d), (rows, p)
        let [ch, h, w] = inp.decoder.latent_shape(self.size.0, self.size.1);
        let noise = crate::rng::Philox::for_stream(self.seed, "eval/noise")
            .normal_tensor(&[n as i64, ch, h, w]); // (n, c, h, w): the same for every share
        let picked: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
        let noise = noise.index_select(0, &Tensor::from_slice(&picked));
        let settings = OdeSettings {
            guidance: self.ode.guidance.filter(|_| inp.model.guidance_embeds()),
            ..self.ode.clone()
        };
        let _pinned = match self.gather {
            Gather::Iteration => inp.sharded.map(|s| s.pinned()),
            Gather::PerBlock => None,
        };
        let shares = self.shares_forwards(inp.collective);
        let parallel = SequenceParallel {
            model: inp.model,
            collective: inp.collective,
        };
        let model: &dyn VelocityModel = match shares {
            true => &parallel,
            false => inp.model,
        };
        let dev = inp.device;
        let (text, pooled, noise) = (
            text.to_device(dev),
            pooled.to_device(dev),
            noise.to_device(dev),
        );
        let images = generate(model, inp.decoder, &text, &pooled, &noise, &settings).map_err(
            |e| match (shares, e) {
                (true, Error::Input(msg)) => {
                    Error::Input(format!("eval.parallel = \"sequence\": {msg}"))
                }
                (_, e) => e,
            },
        )?;
        let captions = entries.into_iter().map(|e| e.caption).collect();
        Ok((images, captions))
    }

    /// The training reward's and every gold reward's mean over `images`.
    fn score(
        &mut self,
        reward: &mut WeightedSum,
        images: &Tensor,
        captions: &[String],
    ) -> Result<(f64, serde_json::Map<String, serde_json::Value>)> {
        let batch = RewardBatch {
            images,
            prompts: captions,
        };
        let reward_mean = mean_score(&reward.score(&batch)?);
        let mut gold = serde_json::Map::new();
        for reward in &mut self.gold {
            let mean = mean_score(&reward.score(&batch)?);
            gold.insert(reward.name().to_string(), mean.into());
        }
        Ok((reward_mean, gold))
    }
}

/// Refuses, before a run starts, an `eval.parallel = "sequence"` that the
/// model cannot split over the processes of `c` (found at the first
/// evaluation otherwise, which a resumed run reaches only after training).
pub fn check_sequence_split(
    cfg: &TrainConfig,
    model: &dyn VelocityModel,
    decoder: &dyn LatentDecoder,
    c: &dyn Collective,
    origin: &Path,
) -> Result<()> {
    if cfg.eval.parallel != EvalParallel::Sequence || c.world_size() < 2 || cfg.eval.prompts == 0 {
        return Ok(());
    }
    let [ch, h, w] = decoder.latent_shape(cfg.sampler.height, cfg.sampler.width);
    let latent = Tensor::zeros([1, ch, h, w], (tch::Kind::Float, Device::Cpu));
    let tokens = model.layout().pack(&latent)?.size()[1]; // (1, L, c)
    (model.check_sequence_split(tokens, c.world_size()))
        .map_err(|e| Error::config(origin, "eval.parallel", e.to_string()))
}

/// This process's share of `n` evaluation prompts: contiguous chunks of
/// `ceil(n / N)`, its own rows padded with repeats to the chunk size (every
/// process runs the same forward passes, as a sharded model needs), and how
/// many of them are its own.
fn prompt_share(n: u64, c: &dyn Collective) -> (Vec<u64>, usize) {
    let (w, r) = (c.world_size() as u64, c.rank() as u64);
    let chunk = n.div_ceil(w);
    let own: Vec<u64> = (r * chunk..((r + 1) * chunk).min(n)).collect();
    let count = own.len();
    let mut rows = own;
    let pad = rows.last().copied().unwrap_or(0);
    rows.resize(chunk as usize, pad);
    (rows, count)
}

/// Keeps the lines of `eval.jsonl` up to iteration `last` (after a resume).
pub(super) fn truncate_eval(path: &Path, last: u64) -> Result<()> {
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
