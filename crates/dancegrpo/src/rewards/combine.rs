//! Several rewards with weights, combined at reward level (weighted sum of the
//! scores, then advantages); the per-reward scores of the last batch are kept
//! for metrics and for advantage-level mixing ([`Reward::last_parts`]).

use super::{Reward, RewardBatch, RewardPart, Score};
use crate::error::Result;

/// A weighted sum of rewards; an item fails if any reward fails on it.
pub struct WeightedSum {
    parts: Vec<(Box<dyn Reward>, f64)>,
    last: Vec<(String, Vec<Score>)>,
    /// The parts' names joined by `+` (`hpsv2+remote`).
    name: String,
}

impl WeightedSum {
    /// Combines `parts` (reward, weight).
    pub fn new(parts: Vec<(Box<dyn Reward>, f64)>) -> Self {
        let names: Vec<&str> = parts.iter().map(|(r, _)| r.name()).collect();
        WeightedSum {
            name: names.join("+"),
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
        &self.name
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
                    (_, Score::Value(b)) if !b.is_finite() => {
                        Score::Failed(format!("{}: score {b} is not finite", reward.name()))
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    /// Returns fixed scores whatever the batch.
    struct Fixed(&'static str, Vec<Score>);
    impl Reward for Fixed {
        fn name(&self) -> &str {
            self.0
        }
        fn score(&mut self, _: &RewardBatch) -> Result<Vec<Score>> {
            Ok(self.1.clone())
        }
    }

    #[test]
    fn failures_and_non_finite_scores_fail_the_item_naming_the_reward() {
        let v = Score::Value;
        let a = Fixed("a", vec![v(1.0), v(f32::NAN), v(2.0), v(1.0)]);
        let b = Fixed(
            "b",
            vec![v(0.5), v(0.5), v(f32::INFINITY), Score::Failed("x".into())],
        );
        let mut sum = WeightedSum::new(vec![(Box::new(a), 1.0), (Box::new(b), 2.0)]);
        let images = Tensor::zeros([4, 2, 2, 3], (tch::Kind::Uint8, tch::Device::Cpu));
        let prompts = vec![String::from("p"); 4];
        let out = sum
            .score(&RewardBatch {
                images: &images,
                prompts: &prompts,
            })
            .unwrap();
        assert_eq!(out[0], v(2.0));
        assert_eq!(out[1], Score::Failed("a: score NaN is not finite".into()));
        assert_eq!(out[2], Score::Failed("b: score inf is not finite".into()));
        assert_eq!(out[3], Score::Failed("b: x".into()));
        assert!(super::super::scores_to_tensor(&[v(f32::INFINITY)])
            .double_value(&[0])
            .is_nan());
    }
}
