//! Fixed-seed evaluation during training: deterministic ODE samples of fixed
//! prompts with fixed noise, scored by the training rewards and by the gold
//! rewards that are never trained on. The prompts are the first `eval.prompts`
//! of the held-out set `[eval.data]` when there is one, else of the training set.

use std::path::Path;

use serde::Serialize;
use tch::Kind;

use super::metrics::append_line;
use super::trainer::Trainer;
use crate::data::{stack, PromptSet};
use crate::error::{Error, Result};
use crate::io::image::grid;
use crate::rewards::{scores_to_tensor, Reward, RewardBatch, Score};
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

fn nan_mean(scores: &[Score]) -> f64 {
    scores_to_tensor(scores)
        .nanmean(None::<&[i64]>, false, None::<Kind>)
        .double_value(&[])
}

impl Trainer {
    /// The prompt set evaluations draw from, and which one it is.
    pub fn eval_prompts(&self) -> (&dyn PromptSet, EvalPromptSet) {
        match &self.eval_prompts {
            Some(set) => (set.as_ref(), EvalPromptSet::HeldOut),
            None => (self.prompts.as_ref(), EvalPromptSet::Training),
        }
    }

    /// Evaluates the current model: `eval/iter-N.png`, a line of `eval.jsonl`
    /// and the `eval/*` TensorBoard scalars. Returns the line.
    pub fn evaluate(&mut self) -> Result<EvalRecord> {
        let (set, prompt_set) = self.eval_prompts();
        let n = set.len().min(self.cfg.eval.prompts.max(1));
        let entries = (0..n).map(|i| set.get(i)).collect::<Result<Vec<_>>>()?;
        let (text, pooled) = stack(&entries);
        let (s, dev) = (&self.cfg.sampler, self.device);
        let [c, h, w] = self.decoder.latent_shape(s.height, s.width);
        let noise = crate::rng::Philox::for_stream(self.cfg.run.seed, "eval/noise")
            .normal_tensor(&[n as i64, c, h, w]);
        let settings = OdeSettings {
            steps: s.steps,
            shift: s.shift,
            guidance: self.model.guidance_embeds().then_some(s.guidance),
        };
        let sharded = match self.cfg.parallel.gather {
            crate::dist::Gather::Iteration => self.sharded.clone(),
            crate::dist::Gather::PerBlock => None,
        };
        let pinned = sharded.as_ref().map(|s| s.pinned());
        let images = generate(
            self.model.as_ref(),
            self.decoder.as_ref(),
            &text.to_device(dev),
            &pooled.to_device(dev),
            &noise.to_device(dev),
            &settings,
        )?;
        drop(pinned);
        let captions: Vec<String> = entries.iter().map(|e| e.caption.clone()).collect();
        let batch = RewardBatch {
            images: &images,
            prompts: &captions,
        };
        let reward_mean = nan_mean(&self.reward.score(&batch)?);
        let mut gold = serde_json::Map::new();
        for reward in &mut self.gold {
            let mean = nan_mean(&reward.score(&batch)?);
            gold.insert(reward.name().to_string(), mean.into());
        }
        let record = EvalRecord {
            iteration: self.state.iteration,
            reward_mean,
            gold,
            prompt_set,
            prompts: n,
        };
        // every process of a sharded model evaluates; one writes
        if self.writes() {
            self.write_eval(&record, grid(&images, n as i64))?;
        }
        Ok(record)
    }

    fn write_eval(&mut self, record: &EvalRecord, image: tch::Tensor) -> Result<()> {
        let dir = self.dir.join("eval");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let name = format!("iter-{:06}.png", record.iteration);
        if let Some(events) = &mut self.events {
            events.image(record.iteration, "eval/images", &image)?;
        }
        self.writer.write(dir.join(name), image)?;
        let line = serde_json::to_string(record).expect("serialisable eval record");
        append_line(&self.dir.join("eval.jsonl"), &line)?;
        if let Some(events) = &mut self.events {
            events.scalars(record.iteration, &record.scalars())?;
        }
        Ok(())
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
