//! Pretraining a tiny FLUX-architecture base model from scratch on procedural
//! images, so demos have a base model that draws something without downloads.
//!
//! 1. **VAE** (the built-in tiny `AutoencoderKL`, encoder and decoder): per-pixel
//!    MSE of the reconstruction of a sampled latent plus `kl_weight` times the KL
//!    to the standard normal per latent element. Afterwards `shift_factor` and
//!    `scaling_factor` are set from the mean and standard deviation of the latent
//!    means of held-out images, so diffusion-space latents have about unit scale.
//! 2. **Flow** (the built-in tiny FLUX transformer): rectified flow on the
//!    normalised, packed latent means, `x_t = (1 - t) x0 + t eps`, target
//!    `eps - x0`, `t` logit-normal by default ([`TimestepSampling`]); image class
//!    `c` is conditioned on synthetic prompt `c` of the trainer's prompt set, with
//!    the trainer's guidance value.
//!
//! Both stages use AdamW with gradient clipping, a 5% warm-up and a cosine decay.
//! Every draw (weights, images, noise, times) is a pure function of the seed and
//! the step, so a run is reproducible (for a given libtorch thread count).
//! The model sizes are those of the trainer's `model.kind = "tiny"`, so the output
//! directory loads with `model.kind = "dir"`.

mod autoencoder;
pub mod config;
mod flow;
pub mod images;
mod optimise;
mod output;

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind};

pub use autoencoder::LatentStats;
pub use config::{PretrainConfig, StageConfig, TimestepSampling};
pub use images::ProceduralImages;
pub use output::trainer_settings;

use crate::error::Result;
use crate::models::flux::{FluxConfig, FluxTransformer};
use crate::models::vae::{Vae, VaeConfig, VaeParts};
use crate::weights::Source;

/// The stage a progress report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The VAE (encoder and decoder).
    Vae,
    /// The transformer (rectified flow).
    Flow,
}

/// Progress after one optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct StepProgress {
    /// The stage.
    pub stage: Stage,
    /// Steps done in this stage (1-based).
    pub step: u64,
    /// Steps of this stage.
    pub total: u64,
    /// This step's loss.
    pub loss: f64,
    /// Mean seconds per step of this stage so far.
    pub seconds_per_step: f64,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct PretrainReport {
    /// The VAE loss of every step.
    pub vae_losses: Vec<f64>,
    /// The flow loss of every step.
    pub flow_losses: Vec<f64>,
    /// Latent statistics and reconstruction error after the VAE stage.
    pub latents: LatentStats,
    /// Seconds of the VAE stage.
    pub vae_seconds: f64,
    /// Seconds of the flow stage.
    pub flow_seconds: f64,
}

impl PretrainReport {
    /// The summary written into `pretrain.json` and printed by the CLI.
    pub fn figures(&self) -> serde_json::Value {
        let ends = |v: &[f64]| (v.first().copied(), mean_of_last(v, 20));
        let (vae_first, vae_last) = ends(&self.vae_losses);
        let (flow_first, flow_last) = ends(&self.flow_losses);
        serde_json::json!({
            "vae_steps": self.vae_losses.len(),
            "flow_steps": self.flow_losses.len(),
            "vae_loss_first": vae_first,
            "vae_loss_last20": vae_last,
            "flow_loss_first": flow_first,
            "flow_loss_last20": flow_last,
            "reconstruction_mse": self.latents.reconstruction_mse,
            "shift_factor": self.latents.mean,
            "scaling_factor": 1.0 / self.latents.std,
            "vae_seconds": self.vae_seconds,
            "flow_seconds": self.flow_seconds,
        })
    }
}

/// Mean of the last `k` values (fewer when there are fewer).
pub fn mean_of_last(v: &[f64], k: usize) -> Option<f64> {
    let tail = &v[v.len().saturating_sub(k)..];
    (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64)
}

/// A pretrained model in memory.
pub struct Pretrained {
    /// The transformer.
    pub transformer: FluxTransformer,
    /// The VAE (encoder and decoder), its latent scaling set.
    pub vae: Vae,
    /// What the run measured.
    pub report: PretrainReport,
}

/// The VAE after the first stage.
pub struct TrainedVae {
    /// The VAE (encoder and decoder), its latent scaling set from [`TrainedVae::latents`].
    pub vae: Vae,
    /// The loss of every step.
    pub losses: Vec<f64>,
    /// Latent statistics and reconstruction error of held-out images.
    pub latents: LatentStats,
    /// Seconds the stage took.
    pub seconds: f64,
}

/// Stage 1 on `device`: trains the seeded tiny VAE (seed `cfg.seed + 1`, as the
/// trainer's tiny default) and sets its latent scaling.
pub fn train_autoencoder(
    cfg: &PretrainConfig,
    device: Device,
    progress: &mut dyn FnMut(&StepProgress),
) -> Result<TrainedVae> {
    cfg.validate()?;
    let start = Instant::now();
    let images = ProceduralImages::new(cfg.seed, cfg.image_size, cfg.classes)?;
    let mut vae = Vae::with_parts(
        VaeConfig::tiny(),
        VaeParts::EncoderDecoder,
        Source::Seeded(cfg.seed + 1),
        Kind::Float,
        device,
    )?;
    let losses = autoencoder::train_vae(&vae, &images, cfg, progress)?;
    let latents = autoencoder::latent_stats(&vae, &images, cfg.latent_stats_images)?;
    vae.set_latent_scaling(latents.mean, 1.0 / latents.std);
    Ok(TrainedVae {
        vae,
        losses,
        latents,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Stage 2: trains the seeded tiny FLUX transformer (seed `cfg.seed`) on the
/// latents of `stage1`'s VAE, on the VAE's device.
pub fn train_transformer(
    cfg: &PretrainConfig,
    stage1: TrainedVae,
    progress: &mut dyn FnMut(&StepProgress),
) -> Result<Pretrained> {
    cfg.validate()?;
    let start = Instant::now();
    let device = stage1.vae.parameters()[0].1.device();
    let images = ProceduralImages::new(cfg.seed, cfg.image_size, cfg.classes)?;
    let transformer = FluxTransformer::new(
        FluxConfig::tiny(),
        Source::Seeded(cfg.seed),
        Kind::Float,
        device,
    )?;
    let flow_losses = flow::train_flow(&transformer, &stage1.vae, &images, cfg, progress)?;
    Ok(Pretrained {
        transformer,
        vae: stage1.vae,
        report: PretrainReport {
            vae_losses: stage1.losses,
            flow_losses,
            latents: stage1.latents,
            vae_seconds: stage1.seconds,
            flow_seconds: start.elapsed().as_secs_f64(),
        },
    })
}

/// Both stages on `device` from the seeded tiny default weights.
pub fn train(
    cfg: &PretrainConfig,
    device: Device,
    progress: &mut dyn FnMut(&StepProgress),
) -> Result<Pretrained> {
    let stage1 = train_autoencoder(cfg, device, progress)?;
    train_transformer(cfg, stage1, progress)
}

/// Writes the model directory of `pre` to `out` (temporary sibling, then renamed).
pub fn write_model_dir(pre: &Pretrained, cfg: &PretrainConfig, out: &Path) -> Result<()> {
    let staging = output::Staging::prepare(out)?;
    output::write_model(pre, cfg, staging.dir())?;
    staging.commit()
}

/// Pretrains and writes the model directory `out`: `transformer/` and `vae/`
/// (diffusers layout), `samples.png`, `loss.png` and `pretrain.json`. `out` is
/// checked and its temporary sibling created before training; the complete
/// directory replaces `out` at the end.
pub fn run(
    cfg: &PretrainConfig,
    out: &Path,
    device: Device,
    progress: &mut dyn FnMut(&StepProgress),
) -> Result<Pretrained> {
    cfg.validate()?;
    let staging = output::Staging::prepare(out)?;
    let pre = train(cfg, device, progress)?;
    output::write_model(&pre, cfg, staging.dir())?;
    staging.commit()?;
    Ok(pre)
}
