//! Feature caching for deterministic ODE sampling (generate, evaluation, the
//! demo's and pretraining's sample grids): a policy the sampler owns, applied
//! through the model's block hook ([`VelocityModel::velocity_blocks`]).
//!
//! - [`BlockCache`] (MindIE SD's "DiTCache"): on the steps it marks, the blocks
//!   `block_start..block_end` are not run; the residual they added to the
//!   hidden state at the last fully computed step is added to this step's
//!   input of the span instead (the residual, not the output, so the cached
//!   delta rides on the new input). Blocks are numbered in forward order over
//!   both kinds: FLUX's double-stream blocks first, then its single-stream
//!   blocks (FLUX.1-dev: 0-18 double, 19-56 single); a span may cross from one
//!   kind to the other, its residual taken on the joint `[text, image]` tokens.
//! - [`StepCache`] (TeaCache-like, simpler): a whole model call is skipped and
//!   the last computed velocity reused while the input latents have moved, in
//!   relative L1 accumulated since that call, less than `threshold`.
//!   (TeaCache measures the change of the timestep-modulated input of the
//!   first block and rescales it with a fitted polynomial; we measure the
//!   latents themselves, which the sampler owns.)
//!
//! Never in GRPO rollouts or training: their log-probabilities must be the
//! model's own, and the configuration refuses `sampler.cache`.

use tch::Tensor;

use crate::error::{Error, Result};
use crate::models::{FlowInputs, VelocityModel};

/// A cache policy for ODE sampling.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CachePolicy {
    /// Skip a span of blocks on some steps, re-using its residual (DiTCache).
    Blocks(BlockCache),
    /// Skip whole model calls while the input changes little (TeaCache-like).
    Steps(StepCache),
}

/// DiTCache's step and block schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockCache {
    /// The first step of the cached stretch (computed fully, it fills the cache).
    pub step_start: i64,
    /// Every `step_interval`-th step from `step_start` is computed fully
    /// (refreshing the residual); the steps between re-use it.
    pub step_interval: i64,
    /// The stretch ends before this step (every step from it on is computed fully).
    pub step_end: i64,
    /// The first skipped block (forward order, double-stream blocks first).
    pub block_start: usize,
    /// The skipped blocks end before this one.
    pub block_end: usize,
}

impl BlockCache {
    /// Whether step `i` re-uses the cached residual.
    pub fn reuses(&self, i: i64) -> bool {
        (self.step_start..self.step_end).contains(&i)
            && (i - self.step_start) % self.step_interval != 0
    }

    /// Why this schedule cannot run over `steps` steps of a model of
    /// `blocks` blocks: `(field, message)`.
    pub fn check(&self, steps: i64, blocks: usize) -> Option<(&'static str, String)> {
        if self.step_interval < 2 {
            return Some((
                "step_interval",
                format!(
                    "must be >= 2 (1 caches nothing), got {}",
                    self.step_interval
                ),
            ));
        }
        if self.step_start < 0 || self.step_start >= self.step_end || self.step_end > steps {
            return Some((
                "step_end",
                format!(
                    "the stretch {}..{} must be a non-empty part of the {steps} steps",
                    self.step_start, self.step_end
                ),
            ));
        }
        if self.block_start >= self.block_end || self.block_end > blocks {
            return Some((
                "block_end",
                format!(
                    "the span {}..{} must be a non-empty part of the model's {blocks} blocks",
                    self.block_start, self.block_end
                ),
            ));
        }
        None
    }
}

impl BlockCache {
    /// The seed's schedule (MindIE SD's DiTCache on FLUX.1-dev: of 50 steps,
    /// 20 to 47 with every second one computed; of 57 blocks, 10 to 30
    /// skipped) scaled to `steps` steps and `blocks` blocks (at least one).
    pub fn seed(steps: i64, blocks: usize) -> BlockCache {
        let at = |x: f64, of: f64, n: f64| (x * n / of).round();
        let block_start = at(10.0, 57.0, blocks as f64) as usize;
        BlockCache {
            step_start: at(20.0, 50.0, steps as f64) as i64,
            step_interval: 2,
            step_end: at(47.0, 50.0, steps as f64) as i64,
            block_start,
            block_end: (at(30.0, 57.0, blocks as f64) as usize).max(block_start + 1),
        }
    }
}

/// A cache setting as a user names it: the seed's schedule scaled to the
/// model, or a policy.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheSetting {
    /// [`BlockCache::seed`] for the sampling's steps and the model's blocks.
    Seed,
    /// This policy.
    Policy(CachePolicy),
}

impl CacheSetting {
    /// `seed`, or a TOML inline table such as `{kind = "steps", threshold = 0.2}`.
    pub fn parse(s: &str) -> Result<CacheSetting> {
        if s.trim() == "seed" {
            return Ok(CacheSetting::Seed);
        }
        #[derive(serde::Deserialize)]
        struct Wrapped {
            v: CachePolicy,
        }
        let parsed: std::result::Result<Wrapped, _> = toml::from_str(&format!("v = {s}"));
        parsed.map(|w| CacheSetting::Policy(w.v)).map_err(|e| {
            Error::Input(format!(
                "cache `{s}`: {} (write `seed` or e.g. {{kind = \"blocks\", step_start = 20, step_interval = 2, step_end = 47, block_start = 10, block_end = 30}} or {{kind = \"steps\", threshold = 0.2}})",
                e.message()
            ))
        })
    }

    /// The policy for `steps` steps of a model of `blocks` blocks.
    pub fn resolve(&self, steps: i64, blocks: usize) -> CachePolicy {
        match self {
            CacheSetting::Seed => CachePolicy::Blocks(BlockCache::seed(steps, blocks)),
            CacheSetting::Policy(p) => p.clone(),
        }
    }
}

/// The whole-step cache's threshold.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepCache {
    /// Largest accumulated relative L1 change of the input latents for which
    /// the last velocity is re-used (0.1 skips few calls, 0.5 many).
    pub threshold: f64,
}

impl CachePolicy {
    /// Why this policy cannot run over `steps` steps of a model of `blocks`
    /// blocks: `(field, message)`.
    pub fn check(&self, steps: i64, blocks: usize) -> Option<(&'static str, String)> {
        match self {
            CachePolicy::Blocks(b) => b.check(steps, blocks),
            CachePolicy::Steps(s) if !(s.threshold > 0.0 && s.threshold.is_finite()) => Some((
                "threshold",
                format!("must be finite and > 0, got {}", s.threshold),
            )),
            CachePolicy::Steps(_) => None,
        }
    }
}

/// What a cached sampling did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CacheStats {
    /// Steps whose model call ran every block.
    pub full_steps: i64,
    /// Steps that skipped a span of blocks.
    pub block_steps: i64,
    /// Steps that skipped the model call.
    pub skipped_steps: i64,
    /// Blocks run over all steps, and the blocks a full sampling runs.
    pub blocks_run: u64,
    /// See `blocks_run`.
    pub blocks_full: u64,
}

/// The cache's state while one sampling runs.
pub struct Cached<'a> {
    policy: Option<&'a CachePolicy>,
    blocks: usize,
    residual: Option<Tensor>,
    last_v: Option<Tensor>,
    previous_z: Option<Tensor>,
    moved: f64,
    /// What it did so far.
    pub stats: CacheStats,
}

impl<'a> Cached<'a> {
    /// A cache following `policy` (`None`: every step computed) for
    /// `model` over `steps` steps; refuses a policy that cannot run.
    pub fn new(
        policy: Option<&'a CachePolicy>,
        model: &dyn VelocityModel,
        steps: i64,
    ) -> Result<Self> {
        let blocks = model.cacheable_blocks();
        if let Some((field, msg)) = policy.and_then(|p| p.check(steps, blocks)) {
            return Err(Error::Input(format!("cache.{field}: {msg}")));
        }
        Ok(Cached {
            policy,
            blocks,
            residual: None,
            last_v: None,
            previous_z: None,
            moved: 0.0,
            stats: CacheStats::default(),
        })
    }

    /// The velocity of step `i` of `steps` for `inputs`, computed or re-used.
    pub fn velocity(
        &mut self,
        model: &dyn VelocityModel,
        inputs: &FlowInputs,
        i: i64,
        steps: i64,
    ) -> Result<Tensor> {
        let all = self.blocks as u64;
        self.stats.blocks_full += all;
        match self.policy {
            None => self.full(model.velocity(inputs)?),
            // outside the stretch no later step re-uses a residual: none is kept
            Some(CachePolicy::Blocks(b)) if !(b.step_start..b.step_end).contains(&i) => {
                self.residual = None;
                self.full(model.velocity(inputs)?)
            }
            Some(CachePolicy::Blocks(b)) => {
                let span = b.block_start..b.block_end;
                match (&self.residual, b.reuses(i)) {
                    (Some(res), true) => {
                        let (v, _) = model.velocity_blocks(inputs, span.clone(), Some(res))?;
                        self.stats.block_steps += 1;
                        self.stats.blocks_run += all - span.len() as u64;
                        Ok(v)
                    }
                    _ => {
                        let (v, res) = model.velocity_blocks(inputs, span, None)?;
                        self.residual = res;
                        self.full(v)
                    }
                }
            }
            Some(CachePolicy::Steps(s)) => self.step_cached(model, inputs, s.threshold, (i, steps)),
        }
    }

    fn full(&mut self, v: Tensor) -> Result<Tensor> {
        self.stats.full_steps += 1;
        self.stats.blocks_run += self.blocks as u64;
        Ok(v)
    }

    /// The whole-step cache: re-use the last velocity while the latents
    /// have moved less than `threshold` (the first and last steps always run).
    fn step_cached(
        &mut self,
        model: &dyn VelocityModel,
        inputs: &FlowInputs,
        threshold: f64,
        (i, steps): (i64, i64),
    ) -> Result<Tensor> {
        let z = inputs.latents;
        if let Some(prev) = &self.previous_z {
            // both sums read back at once (one wait for a GPU, not two)
            let sums = Tensor::stack(
                &[
                    (z - prev).abs().sum(tch::Kind::Double),
                    prev.abs().sum(tch::Kind::Double),
                ],
                0,
            );
            let sums = Vec::<f64>::try_from(&sums).unwrap_or_default();
            if let [diff, norm] = sums[..] {
                self.moved += diff / norm.max(1e-12);
            }
        }
        self.previous_z = Some(z.shallow_clone());
        let edge = i == 0 || i == steps - 1;
        if let (Some(v), false) = (&self.last_v, edge || self.moved >= threshold) {
            self.stats.skipped_steps += 1;
            return Ok(v.shallow_clone());
        }
        let v = model.velocity(inputs)?;
        self.moved = 0.0;
        self.last_v = Some(v.shallow_clone());
        self.full(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_schedule_by_hand() {
        // the seed's schedule on 50 steps: 20 computes, 21 re-uses, 22 computes, ... 46 computes
        let b = BlockCache {
            step_start: 20,
            step_interval: 2,
            step_end: 47,
            block_start: 10,
            block_end: 30,
        };
        let reused: Vec<i64> = (0..50).filter(|&i| b.reuses(i)).collect();
        assert_eq!(reused, (21..47).step_by(2).collect::<Vec<_>>());
        assert_eq!(reused.len(), 13);
        assert_eq!(b.check(50, 57), None);
        let field = |b: BlockCache| b.check(50, 57).map(|(f, _)| f);
        assert_eq!(
            field(BlockCache {
                step_interval: 1,
                ..b
            }),
            Some("step_interval")
        );
        assert_eq!(field(BlockCache { step_end: 51, ..b }), Some("step_end"));
        assert_eq!(
            field(BlockCache {
                step_start: 47,
                ..b
            }),
            Some("step_end")
        );
        assert_eq!(field(BlockCache { block_end: 58, ..b }), Some("block_end"));
        assert_eq!(
            field(BlockCache {
                block_start: 30,
                ..b
            }),
            Some("block_end")
        );
        let steps = CachePolicy::Steps(StepCache {
            threshold: f64::NAN,
        });
        assert_eq!(steps.check(50, 57).map(|(f, _)| f), Some("threshold"));
        // the policy reads as the configuration writes it
        let p: CachePolicy = toml::from_str(
            "kind = \"blocks\"\nstep_start = 20\nstep_interval = 2\nstep_end = 47\nblock_start = 10\nblock_end = 30",
        )
        .unwrap();
        assert_eq!(p, CachePolicy::Blocks(b));
        // the seed's schedule is itself on FLUX.1-dev's 57 blocks and 50 steps, scaled elsewhere
        assert_eq!(BlockCache::seed(50, 57), b);
        let tiny = BlockCache::seed(50, 3);
        assert_eq!((tiny.block_start, tiny.block_end), (1, 2));
        let short = BlockCache::seed(8, 57);
        assert_eq!((short.step_start, short.step_end), (3, 8));
        assert_eq!(CacheSetting::parse(" seed ").unwrap(), CacheSetting::Seed);
        let steps = CacheSetting::parse("{kind = \"steps\", threshold = 0.2}").unwrap();
        assert_eq!(
            steps.resolve(50, 3),
            CachePolicy::Steps(StepCache { threshold: 0.2 })
        );
        let err = CacheSetting::parse("{kind = \"blocks\", step_start = 1}").unwrap_err();
        assert!(err.to_string().contains("step_interval"), "{err}");
    }
}
