//! CLIP score: the cosine similarity of the L2-normalised image and text
//! embeddings of a transformers `CLIPModel` (e.g. `openai/clip-vit-large-patch14`),
//! with `CLIPImageProcessor` preprocessing and the model directory's CLIP tokenizer.
//!
//! Two scales ([`ClipScoreScale`]): the raw cosine in [-1, 1] (the default: no
//! clamp, so GRPO still sees differences among poor matches), or torchmetrics'
//! `CLIPScore`, `max(100 * cosine, 0)`.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::hps::{l2_normalize, TokenizeFn};
use super::{Reward, RewardBatch, Score};
use crate::error::{Error, Result};
use crate::models::clip::{ClipModel, ImageProcessor};
use crate::text::{ClipTokenizer, Padding};

/// How the cosine is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipScoreScale {
    /// The cosine similarity itself, in [-1, 1].
    #[default]
    Cosine,
    /// torchmetrics' `CLIPScore`: `max(100 * cosine, 0)`.
    Torchmetrics,
}

/// A `CLIPModel` with its image processor and tokenizer, producing normalised
/// embeddings and their cosine (shared by the CLIP-score and PickScore rewards).
pub struct ClipScorer {
    model: ClipModel,
    processor: ImageProcessor,
    tokenize: TokenizeFn,
    batch_size: usize,
}

impl ClipScorer {
    /// A scorer from a model, its image processor and a tokenizer returning at
    /// most `context_length` ids per prompt.
    pub fn new(model: ClipModel, processor: ImageProcessor, tokenize: TokenizeFn) -> Self {
        ClipScorer {
            model,
            processor,
            tokenize,
            batch_size: 16,
        }
    }

    /// Loads a transformers CLIP directory: the model (see
    /// [`ClipModel::from_dir`]), `preprocessor_config.json` if present, and the
    /// tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`).
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let model = ClipModel::from_dir(dir, kind, device)?;
        let processor = ImageProcessor::from_dir(dir, model.image_size())?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let len = model.context_length() as usize;
        let tokenize: TokenizeFn =
            Box::new(move |text: &str| Ok(tokenizer.encode(text, len, Padding::EndOfText)?.ids));
        Ok(Self::new(model, processor, tokenize))
    }

    /// Sets how many items go through the model per call (at least 1; default 16).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The model.
    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    /// The image processor.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// Token ids `(B, L)` of `prompts` (all of one length).
    pub fn tokenize(&self, prompts: &[String]) -> Result<Tensor> {
        let rows = prompts
            .iter()
            .map(|p| (self.tokenize)(p))
            .collect::<Result<Vec<_>>>()?;
        let l = rows.first().map_or(0, Vec::len);
        if l == 0 || rows.iter().any(|r| r.len() != l) {
            return Err(Error::Input(
                "CLIP reward: the tokenizer returned rows of different or zero length".into(),
            ));
        }
        let flat: Vec<i64> = rows.into_iter().flatten().collect();
        Ok(Tensor::from_slice(&flat).view([prompts.len() as i64, l as i64]))
    }

    /// L2-normalised image and text embeddings `(B, E)` of a batch.
    pub fn embeddings(&self, batch: &RewardBatch) -> Result<(Tensor, Tensor)> {
        let b = batch.images.size().first().copied().unwrap_or(0);
        if batch.prompts.len() as i64 != b || b == 0 {
            return Err(Error::Input(format!(
                "CLIP reward: {b} images but {} prompts",
                batch.prompts.len()
            )));
        }
        let _guard = tch::no_grad_guard();
        let pixels = self
            .processor
            .apply(&batch.images.to_device(self.model.device()))?;
        let ids = self.tokenize(batch.prompts)?;
        let chunk = self.batch_size as i64;
        let (mut img, mut txt) = (Vec::new(), Vec::new());
        for s in (0..b).step_by(self.batch_size) {
            let n = (b - s).min(chunk);
            img.push(l2_normalize(
                &self.model.image_features(&pixels.narrow(0, s, n))?,
            ));
            txt.push(l2_normalize(
                &self.model.text_features(&ids.narrow(0, s, n))?,
            ));
        }
        Ok((Tensor::cat(&img, 0), Tensor::cat(&txt, 0)))
    }

    /// Cosine similarities `(B,)` (float32, on the CPU) of each image with its prompt.
    pub fn cosines(&self, batch: &RewardBatch) -> Result<Tensor> {
        let (img, txt) = self.embeddings(batch)?;
        Ok((img * txt)
            .sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
            .to_device(Device::Cpu))
    }
}

/// Turns a score tensor into per-item scores, non-finite values as failures.
pub(crate) fn to_scores(t: &Tensor, what: &str) -> Result<Vec<Score>> {
    let v = Vec::<f32>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Float))?;
    Ok(v.into_iter()
        .map(|s| {
            if s.is_finite() {
                Score::Value(s)
            } else {
                Score::Failed(format!("non-finite {what} score {s}"))
            }
        })
        .collect())
}

/// The CLIP-score reward.
pub struct ClipScoreReward {
    scorer: ClipScorer,
    scale: ClipScoreScale,
}

impl ClipScoreReward {
    /// A reward on `scorer`'s model reporting on `scale`.
    pub fn new(scorer: ClipScorer, scale: ClipScoreScale) -> Self {
        ClipScoreReward { scorer, scale }
    }

    /// Loads a transformers CLIP directory (see [`ClipScorer::from_dir`]).
    pub fn from_dir(dir: &Path, scale: ClipScoreScale, kind: Kind, device: Device) -> Result<Self> {
        Ok(Self::new(ClipScorer::from_dir(dir, kind, device)?, scale))
    }

    /// The scorer.
    pub fn scorer(&self) -> &ClipScorer {
        &self.scorer
    }
}

impl Reward for ClipScoreReward {
    fn name(&self) -> &str {
        "clip_score"
    }

    fn score(&mut self, batch: &RewardBatch) -> Result<Vec<Score>> {
        let cos = self.scorer.cosines(batch)?;
        let s = match self.scale {
            ClipScoreScale::Cosine => cos,
            ClipScoreScale::Torchmetrics => (cos * 100.0).clamp_min(0.0),
        };
        Ok(super::fail_empty_prompts(
            batch.prompts,
            to_scores(&s, "CLIP")?,
        ))
    }
}
