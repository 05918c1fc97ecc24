//! Prompt embeddings for the server: FLUX's text encoders when the model
//! directory has them, otherwise the synthetic prompt set the tiny models
//! were trained on (a prompt `synthetic prompt N` is that prompt; any other
//! text gets a seeded stand-in embedding of its own); behind a cache, so a
//! prompt served again is not encoded again.

use std::collections::HashMap;

use tch::Tensor;

use crate::data::encode::FluxTextEncoder;
use crate::data::set::{PromptSet, SyntheticPrompts};
use crate::error::Result;
use crate::rng::Philox;

/// Turns a prompt into FLUX's conditioning.
pub trait PromptEmbedder {
    /// `(text (Lt, d), pooled (p,))` of `prompt`, on the CPU.
    fn embed(&self, prompt: &str) -> Result<(Tensor, Tensor)>;
}

impl PromptEmbedder for FluxTextEncoder {
    fn embed(&self, prompt: &str) -> Result<(Tensor, Tensor)> {
        let e = self.encode(&[prompt])?;
        Ok((e.prompt_embeds.get(0), e.pooled.get(0)))
    }
}

/// The synthetic prompts of the tiny models, and seeded stand-ins for other text.
pub struct StandIn {
    /// The prompt set (`synthetic prompt N` names its prompt `N`).
    pub prompts: SyntheticPrompts,
}

impl PromptEmbedder for StandIn {
    fn embed(&self, prompt: &str) -> Result<(Tensor, Tensor)> {
        let index = (prompt.strip_prefix("synthetic prompt "))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|&n| n < self.prompts.count);
        if let Some(n) = index {
            let e = self.prompts.get(n)?;
            return Ok((e.text, e.pooled));
        }
        // FNV-1a of the text names the stand-in's stream
        let hash = (prompt.bytes()).fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        let p = &self.prompts;
        let mut rng = Philox::for_stream(p.seed, &format!("serve/prompt/{hash:016x}"));
        Ok((
            rng.normal_tensor(&[p.text_len, p.text_dim]),
            rng.normal_tensor(&[p.pooled_dim]),
        ))
    }
}

/// A bounded cache in front of an embedder (emptied when full).
pub struct EmbeddingCache {
    inner: Box<dyn PromptEmbedder>,
    map: HashMap<String, (Tensor, Tensor)>,
    capacity: usize,
    /// Prompts answered from the cache.
    pub hits: u64,
}

impl EmbeddingCache {
    /// Caches up to `capacity` prompts of `inner`.
    pub fn new(inner: Box<dyn PromptEmbedder>, capacity: usize) -> Self {
        EmbeddingCache {
            inner,
            map: HashMap::new(),
            capacity: capacity.max(1),
            hits: 0,
        }
    }

    /// The embedding of `prompt`, from the cache when it is there.
    pub fn embed(&mut self, prompt: &str) -> Result<(Tensor, Tensor)> {
        if let Some((t, p)) = self.map.get(prompt) {
            self.hits += 1;
            return Ok((t.shallow_clone(), p.shallow_clone()));
        }
        let (t, p) = self.inner.embed(prompt)?;
        if self.map.len() >= self.capacity {
            self.map.clear();
        }
        self.map
            .insert(prompt.to_string(), (t.shallow_clone(), p.shallow_clone()));
        Ok((t, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_prompts_stand_ins_and_the_cache() {
        let prompts = SyntheticPrompts {
            count: 16,
            seed: 0,
            text_len: 4,
            text_dim: 8,
            pooled_dim: 3,
        };
        let want = prompts.get(3).unwrap();
        let mut cache = EmbeddingCache::new(Box::new(StandIn { prompts }), 2);
        let (t, p) = cache.embed("synthetic prompt 3").unwrap();
        assert!(t.equal(&want.text) && p.equal(&want.pooled));
        // other text: its own seeded embedding, the same every time
        let (a, _) = cache.embed("a red circle").unwrap();
        let (b, _) = cache.embed("a red circle").unwrap();
        let (c, _) = cache.embed("synthetic prompt 99").unwrap();
        assert!(a.equal(&b) && !a.equal(&c) && a.size() == [4, 8]);
        assert_eq!(cache.hits, 1);
    }
}
