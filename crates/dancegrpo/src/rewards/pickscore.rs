//! PickScore (Kirstain et al. 2023, `yuvalkirstain/PickScore_v1`): a CLIP-H
//! fine-tuned on human preferences, in the transformers `CLIPModel` layout (its
//! processor is `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s: copy that
//! `preprocessor_config.json` and tokenizer files into the model directory).
//!
//! The score is PickScore's inference code: `logit_scale.exp() * cosine` of the
//! normalised image and text embeddings (about 20 to 23 for typical images),
//! without the softmax across candidates.

use std::path::Path;

use tch::Device;

use super::clip_score::{to_scores, ClipScorer};
use super::{Reward, RewardBatch, Score};
use crate::error::Result;

/// The PickScore reward.
pub struct PickScoreReward {
    scorer: ClipScorer,
}

impl PickScoreReward {
    /// A reward on `scorer`'s model.
    pub fn new(scorer: ClipScorer) -> Self {
        PickScoreReward { scorer }
    }

    /// Loads a transformers CLIP directory (see [`ClipScorer::from_dir`]).
    pub fn from_dir(dir: &Path, kind: tch::Kind, device: Device) -> Result<Self> {
        Ok(Self::new(ClipScorer::from_dir(dir, kind, device)?))
    }

    /// The scorer.
    pub fn scorer(&self) -> &ClipScorer {
        &self.scorer
    }
}

impl Reward for PickScoreReward {
    fn name(&self) -> &str {
        "pickscore"
    }

    fn score(&mut self, batch: &RewardBatch) -> Result<Vec<Score>> {
        let cos = self.scorer.cosines(batch)?;
        let scale = self
            .scorer
            .model()
            .logit_scale()
            .detach()
            .to_device(Device::Cpu)
            .to_kind(tch::Kind::Float)
            .exp();
        let scores = to_scores(&(cos * scale), "PickScore")?;
        Ok(super::fail_empty_prompts(batch.prompts, scores))
    }
}
