//! `dancegrpo generate`: deterministic ODE sampling from any checkpoint of a run
//! (or its base model), a PNG grid of the images, and their reward.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use dancegrpo::data::stack;
use dancegrpo::io::image::{grid, write_png};
use dancegrpo::models::PolicyModel;
use dancegrpo::rewards::{scores_to_tensor, Reward, RewardBatch};
use dancegrpo::rng::Philox;
use dancegrpo::sampler::generate::{generate, OdeSettings};
use dancegrpo::train::checkpoint;
use dancegrpo::train::trainer::{build_models, build_prompts, build_rewards};
use dancegrpo::train::TrainConfig;
use tch::Kind;

/// Arguments of `dancegrpo generate`.
#[derive(clap::Args)]
pub struct Args {
    /// The run directory (its config.toml names the model and prompts).
    #[arg(long)]
    run: PathBuf,
    /// A checkpoint directory; default: the run's newest; `base` for the untrained model.
    #[arg(long)]
    checkpoint: Option<String>,
    /// Number of images (prompts 0.. of the run's prompt set, cycled).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i64).range(1..))]
    images: i64,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling steps (default: the run's).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    steps: Option<i64>,
    /// Output PNG (default: `<run>/generated.png`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Runs `dancegrpo generate`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let device = super::train::parse_device(&args.device)?;
    let cfg = TrainConfig::load(&args.run.join("config.toml"), &[])?;
    let (model, vae) = build_models(&cfg, device)?;
    let ckpt = match args.checkpoint.as_deref() {
        Some("base") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => Some(
            checkpoint::latest(&args.run.join("checkpoints"))
                .with_context(|| format!("no complete checkpoint in {}", args.run.display()))?,
        ),
    };
    if let Some(dir) = &ckpt {
        checkpoint::load_weights_whole(dir, &model)?;
    }
    let prompts = build_prompts(&cfg, &model)?;
    let entries = (0..args.images as u64)
        .map(|i| prompts.get(i % prompts.len()))
        .collect::<dancegrpo::Result<Vec<_>>>()?;
    let (text, pooled) = stack(&entries);
    let (h, w) = (cfg.sampler.height / 8, cfg.sampler.width / 8);
    let noise =
        Philox::for_stream(args.seed, "generate/noise").normal_tensor(&[args.images, 16, h, w]);
    let settings = OdeSettings {
        steps: args.steps.unwrap_or(cfg.sampler.steps),
        shift: cfg.sampler.shift,
        guidance: model.guidance_embeds().then_some(cfg.sampler.guidance),
    };
    let start = Instant::now();
    let images = generate(
        &model,
        &vae,
        &text.to_device(device),
        &pooled.to_device(device),
        &noise.to_device(device),
        &settings,
    )?;
    let secs = start.elapsed().as_secs_f64();
    let captions: Vec<String> = entries.iter().map(|e| e.caption.clone()).collect();
    let mut reward = build_rewards(&cfg, device)?;
    let scores = reward.score(&RewardBatch {
        images: &images,
        prompts: &captions,
    })?;
    let mean = scores_to_tensor(&scores)
        .nanmean(None::<&[i64]>, false, None::<Kind>)
        .double_value(&[]);
    let out = args.out.unwrap_or_else(|| args.run.join("generated.png"));
    write_png(&out, &grid(&images, args.images.min(8)))?;
    let from = ckpt.map_or("the base model".to_string(), |c| c.display().to_string());
    println!(
        "generate: {} images from {from} in {secs:.2}s, mean reward {mean:.4}; wrote {}",
        args.images,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
