//! `dancegrpo bench generate`: seconds per image and per step of ODE sampling
//! with each feature-cache setting, and its quality (PSNR, SSIM, latent L2)
//! against the uncached sampling on the same seeds; a Markdown table and one
//! JSON line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use dancegrpo::bench::generate::{bench_generate, markdown, GenerateCase};
use dancegrpo::precision::PrecisionConfig;
use dancegrpo::sampler::cache::CacheSetting;
use dancegrpo::train::config::{DataSource, ModelSource};
use dancegrpo::train::TrainConfig;

/// Arguments of `dancegrpo bench generate`.
#[derive(clap::Args)]
pub struct Args {
    /// A model directory (`transformer/`, `vae/`; `dancegrpo pretrain` writes
    /// one), `tiny` for the seeded tiny model, or `random:DIR` for the
    /// architectures of DIR's two `config.json` with random weights (a
    /// real-sized model without its weights, for timings). The prompts are
    /// the demo's synthetic ones (the pretraining classes).
    model: String,
    /// Image height and width in pixels (a multiple of 16).
    #[arg(long, default_value_t = 64, value_parser = image_size)]
    size: i64,
    /// Text tokens per prompt (T5 length).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(i64).range(1..))]
    text_len: i64,
    /// `fp32`, or `bf16` (bfloat16 compute, as training's mixed precision).
    #[arg(long, default_value = "fp32")]
    precision: String,
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
    /// Sequence parallelism of the settings after the one-process baseline.
    #[command(flatten)]
    parallel: super::train::SequenceParallelArgs,
    /// libtorch CPU threads (of each process).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
}

/// Runs the benchmark: the table, then one JSON line.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let mut device = super::train::parse_device(&args.device)?;
    let collective = args.parallel.join("bench generate", &mut device)?;
    let world = collective.world_size();
    let settings = (args.cache.iter().enumerate())
        .map(|(i, arg)| {
            let (name, spec) = named(arg, i);
            let setting = CacheSetting::parse(spec).with_context(|| format!("--cache {arg}"))?;
            Ok((name, setting))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cfg = TrainConfig::tiny_demo();
    cfg.model = model_source(&args.model)?;
    (cfg.sampler.height, cfg.sampler.width) = (args.size, args.size);
    if let DataSource::Synthetic { text_len, .. } = &mut cfg.data {
        *text_len = args.text_len;
    }
    cfg.precision = match args.precision.as_str() {
        "fp32" => PrecisionConfig::default(),
        "bf16" => PrecisionConfig::bf16(),
        other => anyhow::bail!("--precision `{other}`: want fp32 or bf16"),
    };
    let case = GenerateCase {
        cfg: &cfg,
        steps: args.steps,
        images: args.images,
        seed: args.seed,
        rounds: args.rounds,
        device,
        parallel: (world > 1).then_some(collective.as_ref()),
    };
    let figures = bench_generate(&case, &settings)?;
    if collective.rank() != 0 {
        return Ok(ExitCode::SUCCESS); // process 0 reports
    }
    print!("{}", markdown(&figures, &case));
    let line = serde_json::json!({
        "bench": "generate",
        "model": args.model,
        "size": args.size,
        "precision": args.precision,
        "steps": args.steps,
        "images": args.images,
        "rounds": args.rounds,
        "sequence_parallel": args.parallel.sequence_parallel,
        "figures": figures,
    });
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

/// `tiny`, `random:DIR` or a model directory.
fn model_source(arg: &str) -> anyhow::Result<ModelSource> {
    let (path, random) = match arg {
        "tiny" => return Ok(ModelSource::Tiny { seed: 0 }),
        _ => match arg.strip_prefix("random:") {
            Some(dir) => (PathBuf::from(dir), true),
            None => (PathBuf::from(arg), false),
        },
    };
    for part in ["transformer", "vae"] {
        anyhow::ensure!(
            path.join(part).join("config.json").is_file(),
            "{}: not a model directory (no {part}/config.json)",
            path.display()
        );
    }
    Ok(match random {
        true => ModelSource::Random { path, seed: 0 },
        false => ModelSource::Dir { path },
    })
}

/// `--size`: a positive multiple of 16 (the VAE's 8x and the 2x2 packing).
fn image_size(arg: &str) -> Result<i64, String> {
    match arg.parse::<i64>() {
        Ok(n) if n >= 16 && n % 16 == 0 => Ok(n),
        Ok(n) => Err(format!("{n} pixels: must be a positive multiple of 16")),
        Err(e) => Err(e.to_string()),
    }
}

/// `NAME=SPEC` or `SPEC` (named `seed`, or `cache<i>`).
fn named(arg: &str, i: usize) -> (String, &str) {
    match arg.split_once('=') {
        Some((name, spec)) if !name.contains(['{', ' ', '"']) => (name.to_string(), spec),
        _ if arg.trim() == "seed" => ("seed".to_string(), arg),
        _ => (format!("cache{}", i + 1), arg),
    }
}
