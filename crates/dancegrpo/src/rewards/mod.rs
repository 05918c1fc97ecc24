//! Rewards: one trait for every scorer of (image, prompt) pairs.
//!
//! A reward never turns a failure into a number: each item is either a score
//! or a recorded failure (a non-finite score is one too), and the GRPO
//! advantages leave failed items out of their group's statistics.

pub mod clip_score;
pub mod combine;
pub mod hps;
pub mod jpeg;
mod libjpeg;
pub mod loopback;
pub mod pickscore;
pub mod remote;
pub mod spec;
pub mod tls;

use tch::Tensor;

use crate::error::Result;

/// A batch to score: images straight from the VAE and their prompts.
pub struct RewardBatch<'a> {
    /// uint8 images `(B, H, W, 3)` (what the reference's reward models consume).
    pub images: &'a Tensor,
    /// One prompt per image.
    pub prompts: &'a [String],
}

/// The outcome for one item.
#[derive(Debug, Clone, PartialEq)]
pub enum Score {
    /// A score.
    Value(f32),
    /// The reward could not score the item (why).
    Failed(String),
}

/// A reward model.
pub trait Reward {
    /// Short name used in logs and metrics (e.g. `hpsv2`, `jpeg`).
    fn name(&self) -> &str;
    /// Scores every item of `batch`, in order.
    fn score(&mut self, batch: &RewardBatch) -> Result<Vec<Score>>;
    /// For a combination of rewards: each part's name, weight and scores from
    /// the last [`Reward::score`] call (what advantage-level mixing needs).
    /// `None` (the default) for a single reward.
    fn last_parts(&self) -> Option<Vec<RewardPart>> {
        None
    }
}

/// One part of a combined reward: its scores of the last batch and its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardPart {
    /// The part's [`Reward::name`].
    pub name: String,
    /// Its weight.
    pub weight: f64,
    /// Its scores of the last batch.
    pub scores: Vec<Score>,
}

/// Scores as a float32 tensor `(B,)`, failures (and non-finite scores) as
/// NaN, which the advantages leave out.
pub fn scores_to_tensor(scores: &[Score]) -> Tensor {
    let v: Vec<f32> = scores
        .iter()
        .map(|s| match s {
            Score::Value(x) if x.is_finite() => *x,
            _ => f32::NAN,
        })
        .collect();
    Tensor::from_slice(&v)
}

/// The mean of the scores that are numbers (NaN when none is), in float32
/// as the scores are, accumulated by libtorch's `nanmean`.
pub fn mean_score(scores: &[Score]) -> f64 {
    scores_to_tensor(scores)
        .nanmean(None::<&[i64]>, false, None::<tch::Kind>)
        .double_value(&[])
}

/// Marks items whose prompt is empty (or only whitespace) as failed: a text
/// reward of an image against no text means nothing, and a silent score would
/// train on it.
pub fn fail_empty_prompts(prompts: &[String], scores: Vec<Score>) -> Vec<Score> {
    scores
        .into_iter()
        .zip(prompts)
        .map(|(s, p)| {
            if p.trim().is_empty() {
                Score::Failed("empty prompt".into())
            } else {
                s
            }
        })
        .collect()
}

/// Scores images of any sizes with `reward`: one call per distinct size
/// (`(H, W, 3)` uint8 each), in order of first appearance; the scores come
/// back in the images' order.
pub fn score_by_size(
    reward: &mut dyn Reward,
    images: &[Tensor],
    prompts: &[String],
) -> crate::error::Result<Vec<Score>> {
    if images.len() != prompts.len() {
        return Err(crate::error::Error::Input(format!(
            "{} images but {} prompts",
            images.len(),
            prompts.len()
        )));
    }
    let mut scores: Vec<Option<Score>> = vec![None; images.len()];
    let mut sizes: Vec<Vec<i64>> = Vec::new();
    for img in images {
        if !sizes.contains(&img.size()) {
            sizes.push(img.size());
        }
    }
    for size in sizes {
        let idx: Vec<usize> = (0..images.len())
            .filter(|&i| images[i].size() == size)
            .collect();
        let batch: Vec<Tensor> = idx.iter().map(|&i| images[i].shallow_clone()).collect();
        let batch = Tensor::stack(&batch, 0); // (n, H, W, 3)
        let batch_prompts: Vec<String> = idx.iter().map(|&i| prompts[i].clone()).collect();
        let got = reward.score(&RewardBatch {
            images: &batch,
            prompts: &batch_prompts,
        })?;
        if got.len() != idx.len() {
            return Err(crate::error::Error::Input(format!(
                "the reward `{}` returned {} scores for {} images",
                reward.name(),
                got.len(),
                idx.len()
            )));
        }
        for (i, s) in idx.into_iter().zip(got) {
            scores[i] = Some(s);
        }
    }
    Ok(scores
        .into_iter()
        .map(|s| s.expect("every size scored"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_prompts_fail_instead_of_scoring() {
        let prompts = vec!["a cat".to_string(), " \t".to_string(), String::new()];
        let scores = vec![Score::Value(0.5), Score::Value(0.25), Score::Value(0.1)];
        let out = fail_empty_prompts(&prompts, scores);
        assert_eq!(out[0], Score::Value(0.5));
        assert_eq!(out[1], Score::Failed("empty prompt".into()));
        assert_eq!(out[2], Score::Failed("empty prompt".into()));
        assert!(scores_to_tensor(&out).double_value(&[1]).is_nan());
    }
}
