//! Stage 1: the VAE (encoder and decoder) on procedural images, MSE
//! reconstruction of a sampled latent plus a small KL term; then the latent
//! statistics that set `shift_factor` and `scaling_factor`.

use std::time::Instant;

use tch::{Kind, Tensor};

use super::config::PretrainConfig;
use super::images::ProceduralImages;
use super::optimise::StageOptimiser;
use super::{Stage, StepProgress};
use crate::error::Result;
use crate::models::vae::Vae;
use crate::rng::Philox;

/// First image index of the held-out images (latent statistics, reconstruction
/// error, the reference row of `samples.png`); training never reaches it.
pub(super) const HELD_OUT: u64 = 1 << 40;

/// Trains `vae` for `cfg.vae.steps` steps; returns the loss of every step.
pub(super) fn train_vae(
    vae: &Vae,
    images: &ProceduralImages,
    cfg: &PretrainConfig,
    progress: &mut dyn FnMut(&StepProgress),
) -> Result<Vec<f64>> {
    let params: Vec<Tensor> = vae.parameters().into_iter().map(|(_, p)| p).collect();
    let device = params[0].device();
    let mut opt = StageOptimiser::new(params, &cfg.vae, cfg.weight_decay, cfg.max_grad_norm);
    let b = cfg.vae.batch as u64;
    let start = Instant::now();
    let mut losses = Vec::with_capacity(cfg.vae.steps as usize);
    for step in 0..cfg.vae.steps {
        let indices: Vec<u64> = (step * b..(step + 1) * b).collect();
        let (x, _) = images.batch(&indices); // (b, 3, H, W)
        let x = random_crops(&x, cfg, step); // (b, 3, crop, crop)
        let loss = vae_loss(vae, &x.to_device(device), cfg, step)?;
        losses.push(opt.step(&loss));
        progress(&StepProgress {
            stage: Stage::Vae,
            step: step + 1,
            total: cfg.vae.steps,
            loss: losses[step as usize],
            seconds_per_step: start.elapsed().as_secs_f64() / (step + 1) as f64,
        });
    }
    Ok(losses)
}

/// A crop of `cfg.vae_crop` pixels of every image `x` (b, 3, H, W), at offsets
/// that are multiples of 8 drawn from the stream `pretrain/vae-crop/{step}`.
fn random_crops(x: &Tensor, cfg: &PretrainConfig, step: u64) -> Tensor {
    let (b, _, h, _) = x.size4().expect("(b, 3, H, W) images");
    let c = cfg.vae_crop;
    if c == h {
        return x.shallow_clone();
    }
    let positions = ((h - c) / 8 + 1) as f64;
    let mut rng = Philox::for_stream(cfg.seed, &format!("pretrain/vae-crop/{step}"));
    let mut offset = || 8 * ((rng.uniform() * positions) as i64).min(positions as i64 - 1);
    let crops: Vec<Tensor> = (0..b)
        .map(|i| {
            let (oy, ox) = (offset(), offset());
            x.get(i).narrow(1, oy, c).narrow(2, ox, c) // (3, c, c)
        })
        .collect();
    Tensor::stack(&crops, 0)
}

/// `mean((decode(z) - x)^2) + kl_weight * KL per latent element`, with
/// `z = mean + std * n` and `n` drawn from the stream `pretrain/vae/{step}`.
fn vae_loss(vae: &Vae, x: &Tensor, cfg: &PretrainConfig, step: u64) -> Result<Tensor> {
    let dist = vae.encode(x)?; // (b, c, h, w)
    let size = dist.mean.size();
    let noise = Philox::for_stream(cfg.seed, &format!("pretrain/vae/{step}"))
        .normal_tensor(&size)
        .to_device(x.device());
    let rec = vae.decode(&dist.sample(&noise), None); // (b, 3, H, W)
    let mse = (rec - x).square().mean(Kind::Float);
    let per_sample: i64 = size[1..].iter().product();
    let kl = dist.kl().mean(Kind::Float) / per_sample as f64;
    Ok(mse + kl * cfg.kl_weight)
}

/// Latent statistics and reconstruction error over held-out images.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatentStats {
    /// Mean of the latent means over every element (becomes `shift_factor`).
    pub mean: f64,
    /// Their standard deviation (`scaling_factor = 1 / std`).
    pub std: f64,
    /// Per-pixel MSE of `decode(mean)` against the image, in [-1, 1] units.
    pub reconstruction_mse: f64,
}

/// Encodes `n` held-out images (batches of 32) and measures [`LatentStats`].
pub(super) fn latent_stats(vae: &Vae, images: &ProceduralImages, n: u64) -> Result<LatentStats> {
    let _guard = tch::no_grad_guard();
    let device = vae.parameters()[0].1.device();
    let (mut means, mut sq_errors) = (Vec::new(), Vec::new());
    for first in (0..n).step_by(32) {
        let indices: Vec<u64> = (HELD_OUT + first..HELD_OUT + n.min(first + 32)).collect();
        let x = images.batch(&indices).0.to_device(device); // (b, 3, H, W)
        let mean = vae.encode(&x)?.mean; // (b, c, h, w)
        sq_errors.push((vae.decode(&mean, None) - &x).square().flatten(0, -1));
        means.push(mean.flatten(0, -1));
    }
    let all = Tensor::cat(&means, 0).to_kind(Kind::Double);
    Ok(LatentStats {
        mean: all.mean(Kind::Double).double_value(&[]),
        std: all.std(true).double_value(&[]),
        reconstruction_mse: Tensor::cat(&sq_errors, 0)
            .mean(Kind::Double)
            .double_value(&[]),
    })
}
