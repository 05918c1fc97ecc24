//! `dancegrpo generate`: deterministic ODE sampling from any checkpoint of a run
//! (or its base model), a PNG grid of the images, and their reward.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use dancegrpo::io::image::{grid, write_png};
use dancegrpo::sampler::cache::CacheSetting;
use dancegrpo::train::checkpoint;
use dancegrpo::train::generate::{generate_from_run, GenerateRequest};
use dancegrpo::train::TrainConfig;

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
    /// Feature caching (changes the images: see `bench generate`): `seed` or a
    /// TOML inline table such as `{kind = "steps", threshold = 0.2}`.
    #[arg(long)]
    cache: Option<String>,
    /// Sequence parallelism of every forward pass.
    #[command(flatten)]
    parallel: super::train::SequenceParallelArgs,
    /// libtorch CPU threads.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
}

/// Runs `dancegrpo generate`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let mut device = super::train::parse_device(&args.device)?;
    let collective = args.parallel.join("generate", &mut device)?;
    let (world, rank) = (collective.world_size(), collective.rank());
    let cfg = TrainConfig::load(&args.run.join("config.toml"), &[])?;
    let ckpt = match args.checkpoint.as_deref() {
        Some("base") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => Some(
            checkpoint::latest(&args.run.join("checkpoints"))
                .with_context(|| format!("no complete checkpoint in {}", args.run.display()))?,
        ),
    };
    let steps = args.steps.unwrap_or(cfg.sampler.steps);
    let cache = (args.cache.as_deref())
        .map(|c| CacheSetting::parse(c).context("--cache"))
        .transpose()?;
    let req = GenerateRequest {
        checkpoint: ckpt.as_deref(),
        images: args.images,
        seed: args.seed,
        steps: Some(steps),
        cache,
        sequence_parallel: (world > 1).then_some(collective.as_ref()),
    };
    let g = generate_from_run(&cfg, &req, device)?;
    if rank != 0 {
        return Ok(ExitCode::SUCCESS); // rank 0 writes and reports
    }
    let out = args.out.unwrap_or_else(|| args.run.join("generated.png"));
    write_png(&out, &grid(&g.images, args.images.min(8)))?;
    let from = ckpt.map_or("the base model".to_string(), |c| c.display().to_string());
    println!(
        "generate: {} images from {from} in {:.2}s, mean reward {:.4}; wrote {}",
        args.images,
        g.seconds,
        g.mean_reward,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
