//! `dancegrpo demo`: the built-in tiny GRPO run on the CPU (no downloads): a
//! seeded tiny FLUX and VAE, synthetic prompts, JPEG compressibility as the
//! reward; prints how much the reward rose and fails if it did not rise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use dancegrpo::train::{Resume, TrainConfig, Trainer};
use tch::Device;

/// Arguments of `dancegrpo demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Run directory (replaced if it holds an earlier run).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Override a config value of the built-in default (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// libtorch CPU threads.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
    /// The rise of the mean reward (last 10 iterations minus first 10) the demo
    /// must reach (default 1 kB from the seeded base, 0.15 kB from `--base`).
    #[arg(long, value_parser = finite)]
    min_rise: Option<f64>,
    /// Start from this model directory (e.g. written by `dancegrpo pretrain`)
    /// instead of the seeded tiny model.
    #[arg(long)]
    base: Option<PathBuf>,
}

/// Runs the demo.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let mut set = args.set.clone();
    if let Some(base) = &args.base {
        anyhow::ensure!(
            base.join("transformer").is_dir() && base.join("vae").is_dir(),
            "--base {}: not a model directory (transformer/ and vae/; `dancegrpo pretrain` writes one)",
            base.display()
        );
        set.insert(0, "model.kind=\"dir\"".to_string());
        set.insert(1, format!("model.path={:?}", base.display().to_string()));
    }
    let min_rise = args
        .min_rise
        .unwrap_or(if args.base.is_some() { 0.15 } else { 1.0 });
    let cfg = TrainConfig::tiny_demo()
        .with_overrides(&set, std::path::Path::new("(built-in tiny default)"))?;
    if args.out.join("config.toml").is_file() {
        eprintln!("demo: replacing the earlier run in {}", args.out.display());
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("removing {}", args.out.display()))?;
    }
    let start = Instant::now();
    let mut trainer = Trainer::new(cfg, &args.out, Resume::Fresh, Device::Cpu)?;
    let display = super::progress::TrainProgress::new(1);
    display.attach(&mut trainer);
    trainer.run(&mut |p| display.iteration(p))?;
    eprintln!();
    let rewards: Vec<f64> = std::fs::read_to_string(args.out.join("rewards.txt"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let k = rewards.len().min(10);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (first, last) = (mean(&rewards[..k]), mean(&rewards[rewards.len() - k..]));
    println!(
        "demo: {} GRPO iterations in {:.1}s; mean reward (JPEG compressibility, -kB) of the first {k} iterations {first:.3}, of the last {k} {last:.3}: {:+.3}",
        rewards.len(),
        start.elapsed().as_secs_f64(),
        last - first
    );
    println!(
        "wrote {0}/reward_curve.png, {0}/eval/ (before and after), {0}/images/, {0}/metrics.jsonl, {0}/checkpoints/",
        args.out.display()
    );
    if last - first < min_rise {
        eprintln!(
            "demo: the reward rose by {:.3}, less than {min_rise}",
            last - first
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// A finite number (clap refuses NaN and infinities with exit 2).
fn finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        Ok(x) => Err(format!("must be finite, got {x}")),
        Err(e) => Err(e.to_string()),
    }
}
