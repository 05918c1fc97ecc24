//! The FLUX transformer's floating-point work, counted analytically from its
//! config and the sequence lengths, with the conventions of PyTorch's
//! `torch.utils.flop_counter` (which made the reference's figures in
//! `../shared/bench/README.md`): `2 m n k` per matrix product, attention as its
//! two batched products (`4 L^2 D` forward) and its backward as five (the
//! scores recomputed, `10 L^2 D`), every other backward product twice its
//! forward, except that the embedders' inputs (latents, text, timestep and
//! pooled features) take no gradient. Element-wise work (norms, RoPE,
//! activations, the SDE step) is not counted. With these conventions the three
//! presets come to 0.285, 28.92 and 927.3 GFLOP per iteration, the
//! reference's 0.29, 28.9 and 927.

use crate::models::flux::FluxConfig;

/// Sinusoidal timestep features fed to the time embedder.
const TIME_FEATURES: i64 = 256;

/// FLOPs of one transformer call on one sample, split the way the backward
/// pass needs them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardFlops {
    /// Every counted product.
    pub total: f64,
    /// The embedders' first products (their inputs take no gradient).
    pub embedders: f64,
    /// The attention products (scores and weighted values).
    pub attention: f64,
}

impl ForwardFlops {
    /// The forward of `cfg` on `image_tokens` packed image tokens and
    /// `text_tokens` text tokens, batch 1.
    pub fn of(cfg: &FluxConfig, image_tokens: i64, text_tokens: i64) -> Self {
        let d = cfg.inner_dim();
        let (li, lt) = (image_tokens, text_tokens);
        let l = li + lt;
        let mm = |m: i64, k: i64, n: i64| 2.0 * (m * k * n) as f64;
        let guidance = i64::from(cfg.guidance_embeds);
        let embedders = mm(li, cfg.in_channels, d)
            + mm(lt, cfg.joint_attention_dim, d)
            + (1 + guidance) as f64 * mm(1, TIME_FEATURES, d)
            + mm(1, cfg.pooled_projection_dim, d);
        let conditioning = (2 + guidance) as f64 * mm(1, d, d);
        let attention_one = 4.0 * (l * l * d) as f64;
        // (b, L, D): adaLN, QKV, attention, output, 4x MLP per stream
        let stream = |n: i64| mm(n, d, 3 * d) + mm(n, d, d) + mm(n, d, 4 * d) + mm(n, 4 * d, d);
        let double = 2.0 * mm(1, d, 6 * d) + stream(li) + stream(lt) + attention_one;
        // (b, L, D): adaLN, MLP in, QKV, attention, output over [attn, mlp]
        let single =
            mm(1, d, 3 * d) + mm(l, d, 4 * d) + mm(l, d, 3 * d) + attention_one + mm(l, 5 * d, d);
        let out = mm(1, d, 2 * d) + mm(li, d, cfg.out_channels());
        let blocks = cfg.num_layers as f64 * double + cfg.num_single_layers as f64 * single;
        ForwardFlops {
            total: embedders + conditioning + blocks + out,
            embedders,
            attention: (cfg.num_layers + cfg.num_single_layers) as f64 * attention_one,
        }
    }

    /// Forward plus backward of one trained call.
    pub fn trained(&self) -> f64 {
        let dense = self.total - self.embedders - self.attention;
        self.total + 2.0 * dense + self.embedders + 2.5 * self.attention
    }
}

/// The transformer work of one GRPO iteration, in FLOPs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IterationFlops {
    /// The rollouts' gradient-free forwards.
    pub rollout: f64,
    /// The update's forwards and backwards.
    pub update: f64,
    /// One forward call of one sample.
    pub per_call: f64,
}

impl IterationFlops {
    /// `samples` rollouts of `steps` calls each, then `trained` trained calls
    /// per sample.
    pub fn of(call: ForwardFlops, samples: i64, steps: i64, trained: i64) -> Self {
        IterationFlops {
            rollout: (samples * steps) as f64 * call.total,
            update: (samples * trained) as f64 * call.trained(),
            per_call: call.total,
        }
    }

    /// The same iteration with the update's forward pass of `transitions`
    /// trained transitions left out (their velocities kept from the rollout).
    pub fn without_forwards(self, transitions: i64) -> Self {
        IterationFlops {
            update: self.update - transitions as f64 * self.per_call,
            ..self
        }
    }

    /// Both phases.
    pub fn total(&self) -> f64 {
        self.rollout + self.update
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(inner: i64, double: usize, single: usize, joint: i64, pooled: i64) -> FluxConfig {
        let mut c = FluxConfig::tiny();
        c.attention_head_dim = 16;
        c.num_attention_heads = inner / 16;
        c.num_layers = double;
        c.num_single_layers = single;
        c.joint_attention_dim = joint;
        c.pooled_projection_dim = pooled;
        c.in_channels = 64;
        c.out_channels = None;
        c.guidance_embeds = true;
        c
    }

    /// The reference's flop_counter figures of the three presets (G = 4).
    #[test]
    fn presets_match_the_reference_counts() {
        let cases = [
            (config(32, 1, 2, 32, 4), 16, 32, 6, 3, 0.285_364_224),
            (config(128, 2, 4, 64, 32), 64, 64, 8, 4, 28.922_871_808),
            (config(256, 4, 8, 128, 64), 256, 128, 10, 5, 927.302_942_72),
        ];
        for (cfg, li, lt, steps, trained, want) in cases {
            let call = ForwardFlops::of(&cfg, li, lt);
            let got = IterationFlops::of(call, 4, steps, trained).total() / 1e9;
            assert!((got - want).abs() < 1e-9, "{got} GFLOP, want {want}");
        }
    }
}
