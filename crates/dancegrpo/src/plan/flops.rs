//! Floating-point operations of the FLUX transformer, counted from its
//! configuration and the token counts (2 per multiply-accumulate; the
//! elementwise work is left out: it is a few percent at FLUX's widths).
//!
//! Per token, a double block's image and text streams each run q/k/v, the
//! attention output and a 4x MLP (`12 D^2` multiply-accumulates), a single
//! block q/k/v, the MLP input and the joint output projection (`12 D^2`);
//! attention adds `2 S^2 D` for `S` tokens (scores and weighted values);
//! the modulations are per sample. A training transition costs the forward and
//! a backward of twice the forward ("model FLOPs"; per-block checkpointing
//! recomputes one more forward, reported apart), less the forward of each
//! first-window transition whose graph the rollout keeps.

use crate::grpo::FirstWindow;
use crate::models::flux::FluxConfig;
use crate::models::ActivationCheckpointing;
use crate::train::config::TrainConfig;

/// FLOPs of one forward of one sample with `image` image and `text` text tokens.
pub fn forward(cfg: &FluxConfig, image: i64, text: i64) -> f64 {
    let d = cfg.inner_dim() as f64;
    let (l, lt) = (image as f64, text as f64);
    let s = l + lt;
    let (nd, ns) = (cfg.num_layers as f64, cfg.num_single_layers as f64);
    let mac_double = 12.0 * d * d * s + 2.0 * s * s * d + 2.0 * 6.0 * d * d;
    let mac_single = 12.0 * d * d * s + 2.0 * s * s * d + 3.0 * d * d;
    let embed = cfg.in_channels as f64 * d * l
        + cfg.joint_attention_dim as f64 * d * lt
        + 2.0 * (256.0 * d + d * d) // timestep and guidance embedders
        + cfg.pooled_projection_dim as f64 * d + d * d;
    let head = 2.0 * d * d + d * cfg.out_channels() as f64 * l;
    2.0 * (nd * mac_double + ns * mac_single + embed + head)
}

/// The transformer FLOPs of one iteration of `cfg` over all processes:
/// `(rollout, update (model FLOPs), recompute (per-block checkpointing))`;
/// a tree's update is bounded by the plain count.
pub fn iteration(cfg: &TrainConfig, flux: &FluxConfig, text: i64) -> (f64, f64, f64) {
    let s = &cfg.sampler;
    let image = (s.height / 16) * (s.width / 16);
    let fwd = forward(flux, image, text);
    let samples = (cfg.run.prompts_per_iteration * s.group_size) as f64;
    // the update's own count (a window's steps, or the timestep fraction)
    let update_cfg = cfg.iteration_config().update;
    let trained = update_cfg.trained(s.steps).map_or(0, |(_, t)| t) as f64;
    // a tree evaluates each shared state once; its update is counted as if
    // every leaf trained its own transitions (an upper bound)
    let rows_per_group = match &s.tree {
        Some(tree) => tree.calls(s.group_size, s.steps),
        None => s.group_size * s.steps,
    };
    let groups = cfg.run.prompts_per_iteration as f64;
    let rollout = groups * rows_per_group as f64 * fwd;
    // with the first window's graphs kept from the rollout, the update runs no
    // forward pass for that window's transitions
    let kept = match cfg.optim.first_window {
        FirstWindow::RolloutGraphs => update_cfg.grad_accum.min(samples as i64) as f64 * trained,
        FirstWindow::Recompute => 0.0,
    };
    let update = (samples * trained * 3.0 - kept) * fwd;
    let recompute = match cfg.optim.activation_checkpointing {
        ActivationCheckpointing::PerBlock => samples * trained * fwd,
        ActivationCheckpointing::Off => 0.0,
    };
    (rollout, update, recompute)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux_dev_forward_at_1024() {
        let cfg = FluxConfig {
            num_layers: 19,
            num_single_layers: 38,
            guidance_embeds: true,
            ..FluxConfig::tiny()
        };
        let dev = FluxConfig {
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            in_channels: 64,
            axes_dims_rope: vec![16, 56, 56],
            ..cfg
        };
        // 4096 image + 512 text tokens: every token passes 12 D^2 multiply-
        // accumulates per block (one stream of a double block), and attention
        // 2 S^2 D per block: 59.5 and 14.9 TFLOP
        let f = forward(&dev, 4096, 512);
        let (d, s) = (3072.0f64, 4608.0f64);
        let linear = 57.0 * 2.0 * 12.0 * d * d * s;
        let attention = 57.0 * 2.0 * 2.0 * s * s * d;
        assert!((f / (linear + attention) - 1.0).abs() < 0.01, "{f:e}");
        assert!((f / 1e12 - 74.4).abs() < 0.1, "{f:e}");
    }
}
