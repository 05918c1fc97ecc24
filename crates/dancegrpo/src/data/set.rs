//! The prompt sets training and evaluation draw from: the [`PromptSet`] trait
//! (implemented by the embedding datasets, the reference's directory read in
//! place, and [`SyntheticPrompts`]) and [`stack`], which batches entries.

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
