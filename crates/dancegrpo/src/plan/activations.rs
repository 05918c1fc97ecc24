//! Activation memory of one training process: estimates, not counts.
//!
//! The three phases of an iteration do not overlap, so the peak is the largest
//! of them, plus the rollout trajectories, which live through the update:
//!
//! * update (with gradients), per sample of a model batch, in the compute dtype,
//!   `S = L + Lt` tokens of width `D`: without checkpointing every block keeps
//!   about `20 S D` (double: norms, q/k/v and their rotated copies, attention
//!   output, projections, the 4D MLP before and after its GELU) or `22 S D`
//!   (single: the same plus the 5D concatenation); with per-block checkpointing
//!   one `S D` input per block plus one block's `22 S D`;
//!   with `first_window = "rollout_graphs"` the first window's graphs (every
//!   trained transition of its samples) are alive from the rollout on;
//! * rollout (no gradients): one block's `22 S D` per sample of a model batch;
//! * decode: about six full-resolution feature maps of the VAE's first decoder
//!   width per image of a decode batch, in the frozen dtype.
//!
//! Attention is assumed memory-efficient (flash or mem-efficient SDPA on CUDA:
//! no `S x S` matrix kept); CPU math attention holds `heads S^2` more per block.

use super::{kind_bytes, ModelCounts};
use crate::grpo::{FirstWindow, UpdateBatching};
use crate::models::ActivationCheckpointing;
use crate::train::config::TrainConfig;

/// The estimate and how it was made.
pub struct Activations {
    /// Bytes.
    pub bytes: u64,
    /// The phase that peaks and the shape it was counted at.
    pub detail: String,
    /// The configuration fields that size its larger part.
    pub field: &'static str,
}

/// Elements per token-width a block keeps for backward (see the module doc).
const DOUBLE_KEEPS: i64 = 20;
const SINGLE_KEEPS: i64 = 22;
/// Full-resolution feature maps alive in the VAE decoder's last up block.
const VAE_MAPS: i64 = 6;

/// The peak activation bytes of one of `world` processes running `cfg` with
/// `text_len` T5 tokens.
pub fn peak(cfg: &TrainConfig, c: &ModelCounts, text_len: i64, world: i64) -> Activations {
    let s = &cfg.sampler;
    let (h, w) = (s.height, s.width);
    let tokens = (h / 16) * (w / 16);
    let seq = tokens + text_len;
    let d = c.flux.inner_dim();
    let (nd, ns) = (c.flux.num_layers as i64, c.flux.num_single_layers as i64);
    let cb = kind_bytes(cfg.precision.compute_kind()) as i64;
    let (rollout_batch, update_batch) = model_batches(cfg, world);
    let per_token = match cfg.optim.activation_checkpointing {
        ActivationCheckpointing::Off => DOUBLE_KEEPS * nd + SINGLE_KEEPS * ns,
        ActivationCheckpointing::PerBlock => nd + ns + SINGLE_KEEPS,
    };
    let update = update_batch * seq * d * per_token * cb;
    let rollout = rollout_batch * seq * d * SINGLE_KEEPS * cb;
    let first_width = c.vae.block_out_channels.first().copied().unwrap_or(0);
    let frozen = kind_bytes(cfg.precision.frozen_kind()) as i64;
    let decode = s.decode_batch * VAE_MAPS * first_width * h * w * frozen;
    let trajectories = trajectory_bytes(cfg, world, tokens);
    let (phase, bytes) = [("update", update), ("rollout", rollout), ("decode", decode)]
        .into_iter()
        .max_by_key(|p| p.1)
        .expect("three phases");
    let field = match (phase, trajectories > bytes) {
        (_, true) => "run.prompts_per_iteration, sampler.group_size",
        ("decode", _) => "sampler.height, sampler.width, sampler.decode_batch",
        _ => "sampler.height, sampler.width",
    };
    Activations {
        field,
        bytes: (bytes + trajectories) as u64,
        detail: format!(
            "{phase} peaks; {h}x{w}: {tokens} image + {text_len} text tokens, width {d}, \
             update batch {update_batch}, {:?} checkpointing; + rollout trajectories {:.2} GiB",
            cfg.optim.activation_checkpointing,
            trajectories as f64 / super::GIB
        ),
    }
}

/// The rollout's and the update's model batches (rows) in one of `world` processes.
fn model_batches(cfg: &TrainConfig, world: i64) -> (i64, i64) {
    let s = &cfg.sampler;
    let derived = cfg.derived(world);
    // the samples of one accumulation window in this process
    let window = derived
        .accumulation_per_process
        .min(derived.samples_per_process)
        .max(1);
    let window_rows = || {
        let update = cfg.iteration_config().update;
        let (_, trained) = update.trained(s.steps).unwrap_or((1, 1));
        window * trained
    };
    // with the rollout's batches recomputed, rollout batches end with a window
    let rollout_batch = match cfg.optim.update_batching {
        UpdateBatching::Rollout => s.rollout_batch.min(window),
        _ => s.rollout_batch,
    };
    let update_batch = match (cfg.optim.first_window, cfg.optim.update_batching) {
        // the whole first window's graphs, kept from the rollout
        (FirstWindow::RolloutGraphs, _) | (_, UpdateBatching::Window) => window_rows(),
        (_, UpdateBatching::Rollout) => rollout_batch,
        (_, UpdateBatching::PerSample) => 1,
    };
    (rollout_batch, update_batch)
}

/// The local samples' trajectories `z_0..z_S` (float32, packed 64 channels
/// per image token), and with GRPO-Guard's ratio normalisation every step's
/// mean as well.
fn trajectory_bytes(cfg: &TrainConfig, world: i64, tokens: i64) -> i64 {
    let steps = cfg.sampler.steps;
    let kept = (steps + 1)
        + if cfg.grpo.guard.ratio_norm() {
            steps
        } else {
            0
        };
    cfg.derived(world).samples_per_process * kept * tokens * 64 * 4
}
