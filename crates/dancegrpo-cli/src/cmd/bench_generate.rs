//! `dancegrpo bench generate`: seconds per image and per step of ODE sampling
//! with each feature-cache setting, and its quality (PSNR, SSIM, latent L2)
//! against the uncached sampling on the same seeds; a Markdown table and one
//! JSON line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use dancegrpo::bench::generate::{bench_generate, markdown, GenerateCase};
use dancegrpo::sampler::cache::CacheSetting;
use dancegrpo::train::config::ModelSource;
use dancegrpo::train::TrainConfig;

/// Arguments of `dancegrpo bench generate`.
#[derive(clap::Args)]
pub struct Args {
    /// A model directory (`transformer/`, `vae/`; `dancegrpo pretrain` writes
    /// one), or `tiny` for the seeded tiny model. The prompts are the demo's
    /// synthetic ones (the pretraining classes), the images 64x64.
    model: String,
    /// ODE steps.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
    steps: i64,
    /// A cache setting to measure, `[NAME=]SPEC`, repeatable: `seed` (MindIE's
    /// DiTCache schedule scaled to the model and steps), or a TOML inline
    /// table, `{kind = "blocks", step_start = 20, step_interval = 2, step_end =
    /// 47, block_start = 10, block_end = 30}` or `{kind = "steps", threshold = 0.2}`.
    #[arg(long)]
    cache: Vec<String>,
    /// Images per sampling (one batch).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i64).range(1..))]
    images: i64,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Timed rounds (each setting once per round, alternated; the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch CPU threads.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
}

/// Runs the benchmark: the table, then one JSON line.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let device = super::train::parse_device(&args.device)?;
    let settings = (args.cache.iter().enumerate())
        .map(|(i, arg)| {
            let (name, spec) = named(arg, i);
            let setting = CacheSetting::parse(spec).with_context(|| format!("--cache {arg}"))?;
            Ok((name, setting))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cfg = TrainConfig::tiny_demo();
    if args.model != "tiny" {
        let path = PathBuf::from(&args.model);
        anyhow::ensure!(
            path.join("transformer").is_dir(),
            "{}: not a model directory (no transformer/)",
            path.display()
        );
        cfg.model = ModelSource::Dir { path };
    }
    let case = GenerateCase {
        cfg: &cfg,
        steps: args.steps,
        images: args.images,
        seed: args.seed,
        rounds: args.rounds,
        device,
    };
    let figures = bench_generate(&case, &settings)?;
    print!("{}", markdown(&figures, &case));
    let line = serde_json::json!({
        "bench": "generate",
        "model": args.model,
        "steps": args.steps,
        "images": args.images,
        "rounds": args.rounds,
        "figures": figures,
    });
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

/// `NAME=SPEC` or `SPEC` (named `seed`, or `cache<i>`).
fn named(arg: &str, i: usize) -> (String, &str) {
    match arg.split_once('=') {
        Some((name, spec)) if !name.contains(['{', ' ', '"']) => (name.to_string(), spec),
        _ if arg.trim() == "seed" => ("seed".to_string(), arg),
        _ => (format!("cache{}", i + 1), arg),
    }
}
