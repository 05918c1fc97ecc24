//! Images from a run: deterministic ODE samples of the run's first prompts
//! (cycled) from any of its checkpoints or its base model, scored by the run's
//! reward (`dancegrpo generate`).

use std::path::Path;
use std::time::Instant;

use tch::{Device, Tensor};

use super::build::{build_models_for, build_prompts, build_rewards, ModelUse};
use super::checkpoint;
use super::config::TrainConfig;
use crate::data::stack;
use crate::error::Result;
use crate::models::sequence::SequenceParallel;
use crate::models::{LatentDecoder, PolicyModel};
use crate::rewards::{mean_score, Reward, RewardBatch};
use crate::rng::Philox;
use crate::sampler::generate::{generate, OdeSettings};

/// What to generate.
#[derive(Clone)]
pub struct GenerateRequest<'a> {
    /// The checkpoint whose weights are used (`None`: the base model).
    pub checkpoint: Option<&'a Path>,
    /// Number of images (prompts `0..` of the run's prompt set, cycled).
    pub images: i64,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Sampling steps (`None`: the run's `sampler.steps`).
    pub steps: Option<i64>,
    /// Feature caching (`None`: none).
    pub cache: Option<crate::sampler::cache::CacheSetting>,
    /// The processes that share every forward pass (Ulysses sequence
    /// parallelism; each runs this same request), if any.
    pub sequence_parallel: Option<&'a dyn crate::dist::Collective>,
}

/// Generated images and their reward.
pub struct Generated {
    /// The images, uint8 `(n, H, W, 3)`.
    pub images: Tensor,
    /// Their prompts.
    pub captions: Vec<String>,
    /// The run's reward, averaged over the images that scored.
    pub mean_reward: f64,
    /// Seconds the sampling took (model loading and scoring excluded).
    pub seconds: f64,
}

/// Builds the run `cfg`'s model on `device`, loads `req.checkpoint` and
/// samples and scores `req.images` images.
pub fn generate_from_run(
    cfg: &TrainConfig,
    req: &GenerateRequest,
    device: Device,
) -> Result<Generated> {
    crate::precision::set_tf32(cfg.precision.tf32);
    let (model, vae) = build_models_for(cfg, device, ModelUse::Inference)?;
    if let Some(dir) = req.checkpoint {
        checkpoint::load_weights_whole(dir, &model)?;
    }
    let prompts = build_prompts(cfg, &model)?;
    let entries = (0..req.images as u64)
        .map(|i| prompts.get(i % prompts.len()))
        .collect::<Result<Vec<_>>>()?;
    let (text, pooled) = stack(&entries); // (n, Lt, d), (n, p)
    let [c, h, w] = vae.latent_shape(cfg.sampler.height, cfg.sampler.width);
    let noise =
        Philox::for_stream(req.seed, "generate/noise").normal_tensor(&[req.images, c, h, w]);
    let steps = req.steps.unwrap_or(cfg.sampler.steps);
    let blocks = crate::models::VelocityModel::cacheable_blocks(&model);
    let settings = OdeSettings {
        steps,
        shift: cfg.sampler.shift,
        guidance: model.guidance_embeds().then_some(cfg.sampler.guidance),
        cache: req.cache.as_ref().map(|c| c.resolve(steps, blocks)),
    };
    let parallel = (req.sequence_parallel).map(|c| SequenceParallel {
        model: &model,
        collective: c,
    });
    let velocity: &dyn crate::models::VelocityModel = match &parallel {
        Some(p) => p,
        None => &model,
    };
    let start = Instant::now();
    let images = generate(
        velocity,
        &vae,
        &text.to_device(device),
        &pooled.to_device(device),
        &noise.to_device(device),
        &settings,
    )?; // (n, H, W, 3)
    let seconds = crate::process::seconds_since(start, device);
    let captions: Vec<String> = entries.iter().map(|e| e.caption.clone()).collect();
    let mut reward = build_rewards(cfg, device)?;
    let scores = reward.score(&RewardBatch {
        images: &images,
        prompts: &captions,
    })?;
    let mean_reward = mean_score(&scores);
    Ok(Generated {
        images,
        captions,
        mean_reward,
        seconds,
    })
}
