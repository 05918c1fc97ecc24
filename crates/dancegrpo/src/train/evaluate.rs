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
use crate::dist::{Collective, Gather};
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
    /// the record and the image grid (uint8 `(H, W, 3)`, one row).
    pub fn evaluate(&mut self, inp: EvalInputs) -> Result<(EvalRecord, Tensor)> {
        let (set, prompt_set) = self.prompt_set(inp.training);
        let n = set.len().min(self.prompts);
        let entries = (0..n).map(|i| set.get(i)).collect::<Result<Vec<_>>>()?;
        let (text, pooled) = stack(&entries); // (n, Lt, d), (n, p)
        let [c, h, w] = inp.decoder.latent_shape(self.size.0, self.size.1);
        let noise = crate::rng::Philox::for_stream(self.seed, "eval/noise")
            .normal_tensor(&[n as i64, c, h, w]); // (n, c, h, w)
        let settings = OdeSettings {
            guidance: self.ode.guidance.filter(|_| inp.model.guidance_embeds()),
            ..self.ode.clone()
        };
        let pinned = match self.gather {
            Gather::Iteration => inp.sharded.map(|s| s.pinned()),
            Gather::PerBlock => None,
        };
        let dev = inp.device;
        let parallel = SequenceParallel {
            model: inp.model,
            collective: inp.collective,
        };
        let model: &dyn VelocityModel = match self.shares_forwards(inp.collective) {
            true => &parallel,
            false => inp.model,
        };
        let images = generate(
            model,
            inp.decoder,
            &text.to_device(dev),
            &pooled.to_device(dev),
            &noise.to_device(dev),
            &settings,
        )
        .map_err(|e| match (self.shares_forwards(inp.collective), e) {
            (true, Error::Input(msg)) => {
                Error::Input(format!("eval.parallel = \"sequence\": {msg}"))
            }
            (_, e) => e,
        })?; // (n, H, W, 3)
        drop(pinned);
        let captions: Vec<String> = entries.iter().map(|e| e.caption.clone()).collect();
        let batch = RewardBatch {
            images: &images,
            prompts: &captions,
        };
        let reward_mean = mean_score(&inp.reward.score(&batch)?);
        let mut gold = serde_json::Map::new();
        for reward in &mut self.gold {
            let mean = mean_score(&reward.score(&batch)?);
            gold.insert(reward.name().to_string(), mean.into());
        }
        let record = EvalRecord {
            iteration: inp.iteration,
            reward_mean,
            gold,
            prompt_set,
            prompts: n,
        };
        Ok((record, grid(&images, n as i64)))
    }
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
