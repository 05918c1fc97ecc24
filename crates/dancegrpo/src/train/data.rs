//! Prompts for training: a set of conditioning entries and the data order, a
//! pure function of `(seed, position)` (one seeded permutation per epoch).

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::rng::Philox;

/// One prompt's conditioning.
pub struct PromptEntry {
    /// Text token embeddings `(Lt, d)`.
    pub text: Tensor,
    /// Pooled embedding `(p,)`.
    pub pooled: Tensor,
    /// The caption.
    pub caption: String,
}

/// A collection of prompts the trainer draws from.
pub trait PromptSet {
    /// Number of prompts.
    fn len(&self) -> u64;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Prompt `index`.
    fn get(&self, index: u64) -> Result<PromptEntry>;
}

/// Seeded random embeddings standing in for encoded prompts (tiny models, demos).
pub struct SyntheticPrompts {
    /// Number of prompts.
    pub count: u64,
    /// Seed.
    pub seed: u64,
    /// Text length.
    pub text_len: i64,
    /// Text embedding width.
    pub text_dim: i64,
    /// Pooled width.
    pub pooled_dim: i64,
}

impl PromptSet for SyntheticPrompts {
    fn len(&self) -> u64 {
        self.count
    }

    fn get(&self, index: u64) -> Result<PromptEntry> {
        if index >= self.count {
            return Err(Error::Input(format!(
                "prompt {index} of {} synthetic prompts",
                self.count
            )));
        }
        let mut rng = Philox::for_stream(self.seed, &format!("prompt/{index}"));
        Ok(PromptEntry {
            text: rng.normal_tensor(&[self.text_len, self.text_dim]),
            pooled: rng.normal_tensor(&[self.pooled_dim]),
            caption: format!("synthetic prompt {index}"),
        })
    }
}

/// The data order: position `n` of the stream maps to a prompt index, epoch by epoch.
pub struct DataOrder {
    seed: u64,
    len: u64,
    cached: Option<(u64, Vec<u64>)>,
}

impl DataOrder {
    /// The order over `len` prompts under `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        DataOrder {
            seed,
            len,
            cached: None,
        }
    }

    /// The prompt index at stream position `position`.
    pub fn index(&mut self, position: u64) -> u64 {
        let epoch = position / self.len;
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            let mut rng = Philox::for_stream(self.seed, &format!("data/{epoch}"));
            let mut perm: Vec<u64> = (0..self.len).collect();
            for i in (1..perm.len()).rev() {
                let j = ((rng.uniform() * (i + 1) as f64) as usize).min(i);
                perm.swap(i, j);
            }
            self.cached = Some((epoch, perm));
        }
        self.cached.as_ref().expect("cached").1[(position % self.len) as usize]
    }
}

/// Stacks entries into `(P, Lt, d)` and `(P, p)`.
pub fn stack(entries: &[PromptEntry]) -> (Tensor, Tensor) {
    let text: Vec<Tensor> = entries
        .iter()
        .map(|e| e.text.to_kind(Kind::Float))
        .collect();
    let pooled: Vec<Tensor> = entries
        .iter()
        .map(|e| e.pooled.to_kind(Kind::Float))
        .collect();
    (Tensor::stack(&text, 0), Tensor::stack(&pooled, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_order_is_a_permutation_per_epoch() {
        let mut order = DataOrder::new(3, 10);
        let mut first: Vec<u64> = (0..10).map(|p| order.index(p)).collect();
        let second: Vec<u64> = (10..20).map(|p| order.index(p)).collect();
        assert_ne!(first, second);
        assert_eq!(order.index(3), DataOrder::new(3, 10).index(3));
        first.sort_unstable();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
    }
}
