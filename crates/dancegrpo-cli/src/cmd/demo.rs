//! `dancegrpo demo`: the built-in tiny pipeline, end to end on the CPU with no
//! downloads: a seeded tiny FLUX transformer and VAE, seeded prompt embeddings,
//! ODE sampling, VAE decoding, and a PNG grid of the samples.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use dancegrpo::io::image::{grid, write_png};
use dancegrpo::models::flux::{FluxConfig, FluxTransformer};
use dancegrpo::models::vae::{Vae, VaeConfig};
use dancegrpo::rng::Philox;
use dancegrpo::sampler::generate::{generate, OdeSettings};
use dancegrpo::weights::Source;
use tch::{Device, Kind};

/// Arguments of `dancegrpo demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Output directory.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 4)]
    images: i64,
    /// Sampling steps.
    #[arg(long, default_value_t = 8)]
    steps: i64,
    /// Image side in pixels (a multiple of 16).
    #[arg(long, default_value_t = 64)]
    size: i64,
    /// Seed of the model weights, prompt embeddings and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs the demo and writes `samples.png` into the output directory.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.size % 16 == 0 && args.size > 0,
        "--size must be a positive multiple of 16"
    );
    let start = Instant::now();
    let cfg = FluxConfig::tiny();
    let model = FluxTransformer::new(
        cfg.clone(),
        Source::Seeded(args.seed),
        Kind::Float,
        Device::Cpu,
    )?;
    let vae = Vae::new(
        VaeConfig::tiny(),
        Source::Seeded(args.seed + 1),
        Kind::Float,
        Device::Cpu,
    )?;
    let mut rng = Philox::new(args.seed, 1);
    let b = args.images;
    let text = rng.normal_tensor(&[b, 32, cfg.joint_attention_dim]);
    let pooled = rng.normal_tensor(&[b, cfg.pooled_projection_dim]);
    let latent = args.size / 8;
    let noise = rng.normal_tensor(&[b, 16, latent, latent]);
    let settings = OdeSettings {
        steps: args.steps,
        shift: 3.0,
        guidance: Some(3.5),
    };
    let images = generate(&model, &vae, &text, &pooled, &noise, &settings)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let path = args.out.join("samples.png");
    write_png(&path, &grid(&images, b.min(4)))?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "demo: tiny FLUX ({} params) + tiny VAE, {b} images {}x{}, {} ODE steps in {secs:.2}s ({:.1} images/s)",
        model_params(&model),
        args.size,
        args.size,
        args.steps,
        b as f64 / secs
    );
    println!("wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}

fn model_params(model: &FluxTransformer) -> usize {
    use dancegrpo::models::VelocityModel;
    model.parameters().iter().map(|(_, p)| p.numel()).sum()
}
