//! Several rewards with weights, combined at reward level (weighted sum of the
//! scores, then advantages); the per-reward scores of the last batch are kept
//! for metrics and for advantage-level mixing ([`Reward::last_parts`]).

use super::{Reward, RewardBatch, RewardPart, Score};
use crate::error::Result;

/// A weighted sum of rewards; an item fails if any reward fails on it.
pub struct WeightedSum {
    parts: Vec<(Box<dyn Reward>, f64)>,
    last: Vec<(String, Vec<Score>)>,
}

impl WeightedSum {
    /// Combines `parts` (reward, weight).
    pub fn new(parts: Vec<(Box<dyn Reward>, f64)>) -> Self {
        WeightedSum {
            parts,
            last: Vec::new(),
        }
    }

    /// Each reward's name and scores of the last scored batch.
    pub fn last_scores(&self) -> &[(String, Vec<Score>)] {
        &self.last
    }

    /// The rewards and their weights.
    pub fn parts(&self) -> impl Iterator<Item = (&dyn Reward, f64)> {
        self.parts.iter().map(|(r, w)| (&**r, *w))
    }
}

impl Reward for WeightedSum {
    fn name(&self) -> &str {
        "weighted_sum"
    }

    fn score(&mut self, batch: &RewardBatch) -> Result<Vec<Score>> {
        self.last.clear();
        let n = batch.prompts.len();
        let mut total = vec![Score::Value(0.0); n];
        for (reward, weight) in &mut self.parts {
            let scores = reward.score(batch)?;
            for (t, s) in total.iter_mut().zip(&scores) {
                *t = match (&*t, s) {
                    (Score::Failed(why), _) => Score::Failed(why.clone()),
                    (_, Score::Failed(why)) => Score::Failed(format!("{}: {why}", reward.name())),
                    (Score::Value(a), Score::Value(b)) => Score::Value(a + (*weight as f32) * b),
                };
            }
            self.last.push((reward.name().to_string(), scores));
        }
        Ok(total)
    }

    fn last_parts(&self) -> Option<Vec<RewardPart>> {
        Some(
            self.last
                .iter()
                .zip(&self.parts)
                .map(|((name, scores), (_, weight))| RewardPart {
                    name: name.clone(),
                    weight: *weight,
                    scores: scores.clone(),
                })
                .collect(),
        )
    }
}
